"""End-to-end worker throughput against the machine's ceiling, measured in one run.

Run: ``.venv/bin/python -m benchmarks.throughput [--events 50000] [--no-sink]``

Starts its own Kafka broker (free ports, temporary data dir), pre-produces ``--events``
generated usage records (realistic mix, no bad records), then measures:

* **ceiling** — a raw confluent-kafka consumer that only reads and Avro-decodes the records;
* **pipeline** — a real ``metering worker`` process from start until its consumer group has
  committed every offset (worker start-up time is reported separately and excluded), with the
  in-process ClickHouse sink unless ``--no-sink``.

Prints events/s for both and the ratio pipeline/ceiling.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import uuid

from benchmarks.harness import REPO, start_deployment


def ceiling(settings: object, events: int) -> float:
    """Events/s of a plain consumer that decodes every usage record."""
    from confluent_kafka import Consumer

    from streams.codec import Codecs
    from streams.topics import USAGE

    codec = Codecs.from_settings(settings).usage  # type: ignore[arg-type]
    consumer = Consumer(
        {
            **settings.kafka_client_config(),  # type: ignore[attr-defined]
            "group.id": uuid.uuid4().hex,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([settings.topic(USAGE)])  # type: ignore[attr-defined]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--no-sink", action="store_true")
    args = parser.parse_args()

    from jobs.generate import GeneratorConfig, generate
    from jobs.producer import UsageProducer
    from jobs.progress import group_position
    from streams.topics import USAGE

    deployment = start_deployment(args.partitions)
    workdir, kafka, settings = deployment.workdir, deployment.kafka, deployment.settings
    worker = None
    try:
        producer = UsageProducer(settings)
        config = GeneratorConfig(
            events=args.events, orgs=200, users=20_000, bad_fraction=0.0, duplicate_fraction=0.0
        )
        for item in generate(config, int(time.time() * 1000)):
            producer.send_event(item.event)  # type: ignore[arg-type]
        producer.close()
        print(f"produced {args.events:,} events", flush=True)
        ceiling_rate = ceiling(settings, args.events)
        print(f"ceiling (decode only): {ceiling_rate:,.0f} events/s", flush=True)

        env = deployment.process_env
        command = [sys.executable, "-m", "jobs.cli", "worker"]
        if args.no_sink:
            command.append("--no-sink")
        log = (workdir / "worker.log").open("wb")
        launched = time.perf_counter()
        worker = subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        first: tuple[float, int] | None = None
        while True:
            position = group_position(settings, settings.app_id, settings.topic(USAGE))
            now = time.perf_counter()
            if first is None and position.committed > 0:
                first = (now, position.committed)
                print(f"worker start-up: {now - launched:.1f}s", flush=True)
            if position.committed >= args.events:
                break
            if worker.poll() is not None:
                raise SystemExit(f"worker exited {worker.returncode}; log {workdir}/worker.log")
            time.sleep(0.25)
        assert first is not None
        rate = (args.events - first[1]) / max(now - first[0], 1e-9)
        sink = "without" if args.no_sink else "with"
        print(f"pipeline ({sink} the in-process sink): {rate:,.0f} events/s")
        print(f"ratio pipeline / ceiling: {rate / ceiling_rate:.3f}")
        print(
            f"machine: {os.cpu_count()} cores, partitions {args.partitions}, events {args.events:,}"
        )
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                worker.kill()
        kafka.stop()


if __name__ == "__main__":
    main()
