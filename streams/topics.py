"""The topics of a deployment: names, partition counts, retention, and their creation.

Topic names are logical (``usage.events``) and deployed with ``METERING_TOPIC_PREFIX``. Every
topic keyed by ``org_id`` has ``METERING_PARTITIONS`` partitions so that an org's usage,
control messages, priced events and enforcement events share one partition number; the
worker's table changelogs (created by Faust) have the same count.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

from aiokafka.partitioner import murmur2

from core.errors import ConfigError
from core.settings import Settings
from streams.kafka_config import quiet_client_config, unreachable

USAGE = "usage.events"
CONTROL = "metering.control"
PRICED = "metering.priced"
DEAD_LETTER = "metering.dead-letter"
PAUSES = "metering.pauses"
BILLING = "metering.billing"
REPLAYS = "metering.replays"

UNLIMITED = -1


class KafkaUnavailable(ConfigError):
    """The Kafka cluster cannot be reached or refused an administrative request."""


log = logging.getLogger(__name__)

LARGEST_STATE_MESSAGE = 32 * 1024 * 1024
"""Largest table changelog message (bytes) the worker may write (its producer's
``max_request_size`` too). Values are small; an org's policy grows for a while only when
one input paused or resumed thousands of members (its outbox keeps their events)."""


@dataclass(frozen=True)
class TopicSpec:
    """A topic the pipeline needs. ``co_partitioned`` topics must match the usage topic."""

    name: str
    retention_ms: int
    co_partitioned: bool
    compacted: bool = False


TOPICS: tuple[TopicSpec, ...] = (
    # Retention long enough to replay (SPEC §3): unlimited by default.
    TopicSpec(USAGE, UNLIMITED, co_partitioned=True),
    TopicSpec(CONTROL, UNLIMITED, co_partitioned=True),
    # Worker -> sink hand-off. Unlimited, so a sink that is down for any length of time
    # catches up instead of losing invoice lines; operators may shorten it once sink lag is
    # monitored.
    TopicSpec(PRICED, UNLIMITED, co_partitioned=True),
    # Dead letters are sent to the partition of the record they describe.
    TopicSpec(DEAD_LETTER, UNLIMITED, co_partitioned=True),
    TopicSpec(PAUSES, UNLIMITED, co_partitioned=True),
    TopicSpec(BILLING, UNLIMITED, co_partitioned=True),
    # One record per finished replay (metering replay -> sink -> metering.replay_log).
    TopicSpec(REPLAYS, UNLIMITED, co_partitioned=False),
)


@functools.lru_cache(maxsize=65_536)
def partition_for(org_id: str, partitions: int) -> int:
    """The partition of an organisation: murmur2 of the UTF-8 key, as Java/Confluent clients
    (cached: the worker asks for every event, and murmur2 here is pure Python)."""
    return (murmur2(org_id.encode()) & 0x7FFFFFFF) % partitions


TABLES: dict[str, str] = {
    "seen": "(org, event_id) -> first offset and price",
    "totals": "calendar-month totals per org, seat tier and user",
    "policies": "org -> caps, balance and enforcement state (core.enforcement.OrgPolicy); "
    "(org, member) -> the member's USER scope (streams.members)",
    "org_index": "(partition, org) -> the orgs with a policy there (the wall-clock period tick)",
}
"""The worker's Faust tables (name -> help); changelogs are ``<app id>-<table>-changelog``.
The worker creates exactly these, so :func:`ensure_topics` can pre-create their changelogs."""


def changelog_topic(settings: Settings, table: str) -> str:
    return f"{settings.app_id}-{table}-changelog"


def ensure_topics(settings: Settings, timeout: float = 15.0) -> list[str]:
    """Create the missing topics and check the existing ones; returns the names created.

    Raises :class:`ConfigError` when an existing co-partitioned topic has another partition
    count than ``METERING_PARTITIONS`` (events would land on the wrong partitions), and
    :class:`KafkaUnavailable` when the cluster does not answer within ``timeout``.
    """
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient(quiet_client_config(settings))
    try:
        metadata = admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise KafkaUnavailable(
            unreachable(
                settings,
                exc.args[0].str() if exc.args else str(exc),
                "start it with `metering kafka start` or set METERING_KAFKA_BOOTSTRAP",
                admin,
            )
        ) from None
    existing = metadata.topics
    problems: list[str] = []
    wanted: list[NewTopic] = []
    # Changelogs are created here too, before the worker joins its group: Faust checks their
    # partition count against a metadata snapshot taken at the join, and a changelog it has
    # only just created itself can appear there with 0 partitions (PartitionsMismatch).
    specs = [(settings.topic(spec.name), spec) for spec in TOPICS] + [
        (changelog_topic(settings, table), TopicSpec(table, UNLIMITED, True, compacted=True))
        for table in TABLES
    ]
    small_changelogs: list[str] = []
    for name, spec in specs:
        if name in existing:
            if spec.compacted:
                small_changelogs.append(name)
            count = len(existing[name].partitions)
            if spec.co_partitioned and count != settings.partitions:
                problems.append(
                    f"topic {name} has {count} partitions but METERING_PARTITIONS is "
                    f"{settings.partitions}"
                )
            continue
        config = (
            {"cleanup.policy": "compact", "max.message.bytes": str(LARGEST_STATE_MESSAGE)}
            if spec.compacted
            else {"retention.ms": str(spec.retention_ms)}
        )
        if settings.replication_factor > 1:
            config["min.insync.replicas"] = str(min(2, settings.replication_factor))
        wanted.append(
            NewTopic(
                name,
                num_partitions=settings.partitions,
                replication_factor=settings.replication_factor,
                config=config,
            )
        )
    if problems:
        raise ConfigError("; ".join(problems))
    _allow_large_state_messages(admin, small_changelogs, timeout)
    created: list[str] = []
    if not wanted:
        return created
    for name, future in admin.create_topics(wanted, request_timeout=timeout).items():
        try:
            future.result(timeout=timeout)
            created.append(name)
        except KafkaException as exc:
            error = exc.args[0]
            if error.name() != "TOPIC_ALREADY_EXISTS":  # a concurrent creator won the race
                raise KafkaUnavailable(f"could not create topic {name}: {error.str()}") from None
    return created


def _allow_large_state_messages(admin: object, topics: list[str], timeout: float) -> None:
    """Changelogs created before :data:`LARGEST_STATE_MESSAGE` was set get it too (a topic's
    ``max.message.bytes`` is set, never lowered). A cluster that refuses (no ALTER_CONFIGS
    permission) is logged, not fatal: the topic keeps the broker's limit."""
    if not topics:
        return
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import (
        AlterConfigOpType,
        ConfigEntry,
        ConfigResource,
        ResourceType,
    )

    wanted = str(LARGEST_STATE_MESSAGE)
    try:
        described = admin.describe_configs(  # type: ignore[attr-defined]
            [ConfigResource(ResourceType.TOPIC, name) for name in topics],
            request_timeout=timeout,
        )
        resources = []
        for resource, future in described.items():
            entry = future.result(timeout=timeout).get("max.message.bytes")
            if entry is None or int(entry.value) < LARGEST_STATE_MESSAGE:
                entry = ConfigEntry(
                    "max.message.bytes",
                    wanted,
                    incremental_operation=AlterConfigOpType.SET,
                )
                resources.append(
                    ConfigResource(ResourceType.TOPIC, resource.name, incremental_configs=[entry])
                )
        if resources:
            altered = admin.incremental_alter_configs(  # type: ignore[attr-defined]
                resources, request_timeout=timeout
            )
            for future in altered.values():
                future.result(timeout=timeout)
    except KafkaException as exc:
        log.warning(
            "could not raise max.message.bytes of the table changelogs to %s: %s",
            wanted,
            exc.args[0].str() if exc.args else exc,
        )
