"""How far consumer groups have got: the "caught up" condition of the demo and the tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from core.settings import Settings
from streams.kafka_config import quiet_client_config


@dataclass(frozen=True)
class GroupPosition:
    """Committed offsets of a group against the end of a topic, summed over partitions."""

    committed: int
    end: int

    @property
    def lag(self) -> int:
        return max(self.end - self.committed, 0)


def group_position(
    settings: Settings, group: str, topic: str, timeout: float = 10.0
) -> GroupPosition:
    """Sum of committed offsets of ``group`` and of end offsets of ``topic``.

    Reads without joining the group (no rebalance is caused). A partition the group never
    committed counts from its low watermark.
    """
    consumer = Consumer(
        {**quiet_client_config(settings), "group.id": group, "enable.auto.commit": False}
    )
    try:
        metadata = consumer.list_topics(topic, timeout=timeout)
        partitions = sorted(metadata.topics[topic].partitions) if topic in metadata.topics else []
        tps = [TopicPartition(topic, p) for p in partitions]
        committed_tps = _retrying(consumer.committed, timeout, tps) if tps else []
        committed = end = 0
        for tp in committed_tps:
            low, high = _retrying(
                consumer.get_watermark_offsets, timeout, TopicPartition(topic, tp.partition)
            )
            end += high
            committed += tp.offset if tp.offset >= 0 else low
        return GroupPosition(committed, end)
    finally:
        consumer.close()


_COORDINATOR_MOVING = frozenset(
    {
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
    }
)


def _retrying(call: Callable[..., Any], timeout: float, *args: Any) -> Any:
    """``call(*args, timeout=...)``, retried while the broker answers with a retriable error
    (the group coordinator or a partition leader moving or still loading, common right after
    a broker starts), within ``timeout`` seconds in all."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call(*args, timeout=max(deadline - time.monotonic(), 0.1))
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            retriable = isinstance(error, KafkaError) and (
                error.retriable() or error.code() in _COORDINATOR_MOVING
            )
            if not retriable or time.monotonic() >= deadline:
                raise
            time.sleep(0.2)
