"""Topic layout, partitioning and the dead-letter envelope."""

from __future__ import annotations

import pytest

from core.settings import load_settings
from streams.topics import TOPICS, USAGE, partition_for


@pytest.mark.parametrize(
    ("key", "java_murmur2"),
    # Vectors from Apache Kafka's UtilsTest: Java clients put these keys on
    # toPositive(murmur2(key)) % partitions.
    [
        ("21", -973932308),
        ("foobar", -790332482),
        ("a-little-bit-long-string", -985981536),
        ("a-little-bit-longer-string", -1486304829),
        ("abc", 479470107),
    ],
)
def test_org_partition_matches_the_java_default_partitioner(key: str, java_murmur2: int) -> None:
    for partitions in (1, 4, 8, 12):
        assert partition_for(key, partitions) == (java_murmur2 & 0x7FFFFFFF) % partitions


def test_every_topic_is_prefixed_and_org_keyed_topics_are_co_partitioned() -> None:
    settings = load_settings(topic_prefix="blue.")
    assert settings.topic(USAGE) == "blue.usage.events"
    co_partitioned = {spec.name for spec in TOPICS if spec.co_partitioned}
    assert {"usage.events", "metering.control", "metering.priced"} <= co_partitioned
    usage = next(spec for spec in TOPICS if spec.name == USAGE)
    assert usage.retention_ms == -1  # unlimited: replay needs history


def test_settings_report_every_problem_at_once() -> None:
    from core.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        load_settings(partitions=0, period_grace="soon", app_id="bad id")
    message = str(caught.value)
    for name in ("METERING_PARTITIONS", "METERING_PERIOD_GRACE", "METERING_APP_ID"):
        assert name in message


def test_secrets_never_print() -> None:
    settings = load_settings(kafka_sasl_password="hunter2", clickhouse_password="s3cret")
    assert "hunter2" not in repr(settings) and "s3cret" not in str(settings)
    assert settings.kafka_client_config()["sasl.password"] == "hunter2"
