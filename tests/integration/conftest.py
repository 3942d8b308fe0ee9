"""Real services for the integration tests: a Kafka broker and the chDB engine.

The broker is, in order of preference: ``METERING_TEST_KAFKA_BOOTSTRAP`` (an existing
cluster), a local broker started from the official jars by ``jobs.kafka_local`` (on free
ports, in a temporary data dir, stopped at the end). When none can be had the tests are
skipped on a developer machine and FAIL under ``CI=true`` — CI never silently skips them.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.harness import Deployment


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _unavailable(message: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"integration services unavailable under CI: {message}", pytrace=False)
    pytest.skip(f"integration services unavailable: {message}")


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    existing = os.environ.get("METERING_TEST_KAFKA_BOOTSTRAP")
    if existing:
        yield existing
        return
    from core.errors import MeteringError
    from jobs.kafka_local import KafkaLocal, default_cache_dir

    data_dir = tmp_path_factory.mktemp("kafka")
    kafka = KafkaLocal(
        data_dir=data_dir, bootstrap=f"127.0.0.1:{_free_port()}", cache_dir=default_cache_dir()
    )
    try:
        kafka.start(timeout=180)
    except MeteringError as exc:
        _unavailable(str(exc))
    try:
        yield kafka.bootstrap
    finally:
        kafka.stop()


def new_deployment(kafka_bootstrap: str, root: Path) -> Deployment:
    """A pipeline of its own under ``root``: app id, topic prefix, data dir (chDB path) and
    web port, on the given broker."""
    tag = uuid.uuid4().hex[:8]
    root.mkdir(parents=True, exist_ok=True)
    env = {
        "METERING_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "METERING_APP_ID": f"it-{tag}",
        "METERING_TOPIC_PREFIX": f"it-{tag}.",
        "METERING_DATA_DIR": str(root / "data"),
        "METERING_WEB_PORT": str(_free_port()),
        "METERING_PARTITIONS": "4",
    }
    return Deployment(env=env, root=root)


@pytest.fixture
def deployment(kafka_bootstrap: str, tmp_path: Path) -> Iterator[Deployment]:
    """A pipeline of its own (:func:`new_deployment`), stopped after the test."""
    deployment = new_deployment(kafka_bootstrap, tmp_path)
    try:
        yield deployment
    finally:
        deployment.stop_all()
