"""What every benchmark needs: its own broker on free ports and a deployment's settings."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class BenchDeployment:
    """A started local Kafka, the ``METERING_*`` variables of a worker, and its settings."""

    workdir: Path
    kafka: Any
    env_settings: dict[str, str]
    settings: Any

    @property
    def process_env(self) -> dict[str, str]:
        """The environment for a worker subprocess of this deployment."""
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("METERING_")}
        return {**inherited, **self.env_settings, "PYTHONPATH": str(REPO)}


def start_deployment(partitions: int) -> BenchDeployment:
    """Start Kafka in a temporary dir (stop it with ``deployment.kafka.stop()``)."""
    from core.settings import Settings
    from jobs.kafka_local import KafkaLocal, default_cache_dir
    from streams.topics import ensure_topics

    workdir = Path(tempfile.mkdtemp(prefix="metering-bench-"))
    bootstrap = f"127.0.0.1:{free_port()}"
    kafka = KafkaLocal(data_dir=workdir, bootstrap=bootstrap, cache_dir=default_cache_dir())
    kafka.start(timeout=180)
    env_settings = {
        "METERING_KAFKA_BOOTSTRAP": bootstrap,
        "METERING_DATA_DIR": str(workdir / "data"),
        "METERING_APP_ID": "bench",
        "METERING_TOPIC_PREFIX": "bench.",
        "METERING_PARTITIONS": str(partitions),
        "METERING_WEB_PORT": str(free_port()),
    }
    settings = Settings(
        **{k.removeprefix("METERING_").lower(): v for k, v in env_settings.items()}  # type: ignore[arg-type]
    )
    ensure_topics(settings)
    return BenchDeployment(workdir, kafka, env_settings, settings)


def ceiling(settings: object, events: int) -> float:
    """Events/s of a plain consumer that decodes every usage record."""
    from streams.topics import USAGE

    return decode_rate(settings, USAGE, "usage", events)


def decode_rate(settings: object, topic: str, codec_name: str, events: int) -> float:
    """Records/s of a plain consumer that reads ``topic`` (a logical name) from the beginning
    and decodes each record with the ``codec_name`` codec, until ``events`` were read."""
    from confluent_kafka import Consumer

    from streams.codec import Codecs

    codec = getattr(Codecs.from_settings(settings), codec_name)  # type: ignore[arg-type]
    consumer = Consumer(
        {
            **settings.kafka_client_config(),  # type: ignore[attr-defined]
            "group.id": uuid.uuid4().hex,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([settings.topic(topic)])  # type: ignore[attr-defined]
    seen = 0
    started = None
    while seen < events:
        batch = consumer.consume(2000, 1.0)
        if batch and started is None:
            started = time.perf_counter()
        for message in batch:
            if not message.error():
                codec.decode(message.value())
                seen += 1
    elapsed = time.perf_counter() - (started or time.perf_counter())
    consumer.close()
    return seen / max(elapsed, 1e-9)


def process_memory_mb(pid: int) -> dict[str, float]:
    """Resident memory of a process from ``/proc``: ``VmRSS`` (now) and ``VmHWM`` (peak), MB."""
    values: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0]) / 1024
    return values


def spawn_worker(
    deployment: BenchDeployment, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """``metering worker --no-sink`` (and ``args``) of ``deployment``, logging to a file in
    its work dir."""
    log = (deployment.workdir / f"worker-{time.monotonic_ns()}.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "worker", "--no-sink", *args],
        env={**deployment.process_env, **(env or {})},
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
