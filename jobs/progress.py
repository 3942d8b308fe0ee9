"""How far consumer groups have got: the "caught up" condition of the demo and the tests."""

from __future__ import annotations

from dataclasses import dataclass

from confluent_kafka import Consumer, TopicPartition

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
        committed_tps = consumer.committed(tps, timeout=timeout) if tps else []
        committed = end = 0
        for tp in committed_tps:
            low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, tp.partition), timeout=timeout
            )
            end += high
            committed += tp.offset if tp.offset >= 0 else low
        return GroupPosition(committed, end)
    finally:
        consumer.close()
