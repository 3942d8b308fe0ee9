"""A real Apache Kafka broker through ``KafkaLocal``: start, use, restart-proof, stop.

Uses the shared jar cache (``default_cache_dir()``), so only the first run on a machine fetches
from Maven Central. Ports are chosen free at test time, so a developer's own broker on 9092 and
other tests' brokers are not disturbed. Skipped when Java (or Maven, with no cached jars) is
missing, except under ``CI=true``, where that fails.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from jobs.kafka_local import KafkaLocal, default_cache_dir, free_port, port_in_use

pytestmark = pytest.mark.integration


def _require_tools(manager: KafkaLocal) -> None:
    """Skip without java (or without mvn and no cached jars); under CI, fail instead."""
    missing = [
        tool
        for tool, needed in (("java", True), ("mvn", not manager.jars_ready()))
        if needed and shutil.which(tool) is None
    ]
    if not missing:
        return
    message = f"needs {' and '.join(missing)} on PATH"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"integration prerequisites missing under CI: {message}", pytrace=False)
    pytest.skip(message)


@pytest.fixture
def local(tmp_path: Path) -> Iterator[KafkaLocal]:
    manager = KafkaLocal(
        data_dir=tmp_path / "data",
        bootstrap=f"127.0.0.1:{free_port('127.0.0.1')}",
        cache_dir=default_cache_dir(),
    )
    _require_tools(manager)
    yield manager
    manager.stop(timeout=30)  # harmless when the test already stopped it


def test_start_use_and_stop_a_real_broker(local: KafkaLocal) -> None:
    started = local.start(timeout=120)
    assert not started.already_running
    assert started.bootstrap == local.bootstrap

    status = local.status()
    assert status.running
    assert status.answering
    assert status.pid == started.pid
    assert status.bootstrap == local.bootstrap
    assert status.data_dir == local.data_dir

    again = local.start(timeout=30)
    assert again.already_running
    assert again.pid == started.pid

    admin = AdminClient({"bootstrap.servers": local.bootstrap})
    topic = f"kafka-local-test-{uuid.uuid4().hex[:8]}"
    futures = admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])
    futures[topic].result(timeout=30)
    metadata = admin.list_topics(timeout=10)
    assert topic in metadata.topics
    assert len(metadata.topics[topic].partitions) == 3

    stopped = local.stop(timeout=30)
    assert stopped.was_running
    assert stopped.pid == started.pid
    assert not stopped.forced, "the broker should shut down on SIGTERM"

    status = local.status()
    assert not status.running
    assert not status.answering
    assert status.pid is None
    assert not local.pid_file.exists()
    assert not port_in_use(local.address)

    # Data survives a restart: same data dir, the topic is still there.
    restarted = local.start(timeout=120)
    assert not restarted.already_running
    admin = AdminClient({"bootstrap.servers": local.bootstrap})
    assert topic in admin.list_topics(timeout=10).topics
    assert local.stop(timeout=30).was_running


def test_changelogs_made_before_allow_large_state_messages(
    local: KafkaLocal, tmp_path: Path
) -> None:
    """A deployment whose changelogs were created with the broker's 1 MB limit gets the
    worker's larger one when the topics are next ensured (every worker start)."""
    from confluent_kafka.admin import ConfigResource, ResourceType

    from core.settings import Settings
    from streams.topics import LARGEST_STATE_MESSAGE, changelog_topic, ensure_topics

    local.start(timeout=180)
    settings = Settings(kafka_bootstrap=local.bootstrap, data_dir=tmp_path / "d", partitions=2)
    admin = AdminClient({"bootstrap.servers": local.bootstrap})
    old = changelog_topic(settings, "policies")
    futures = admin.create_topics(
        [
            NewTopic(
                old, num_partitions=2, replication_factor=1, config={"cleanup.policy": "compact"}
            )
        ]
    )
    futures[old].result(timeout=30)

    def limit() -> int:
        resource = ConfigResource(ResourceType.TOPIC, old)
        configs = admin.describe_configs([resource])[resource].result(timeout=30)
        return int(configs["max.message.bytes"].value)

    assert limit() < LARGEST_STATE_MESSAGE
    ensure_topics(settings)
    assert limit() == LARGEST_STATE_MESSAGE
