"""Bulk restore of table state from the changelogs, before Faust's own recovery.

Faust restores a table by sending every changelog record through its per-message machinery:
about 4,300 records/s here, 232 s for a million dedupe records (BENCHMARKS.md), while a plain
librdkafka consumer reads them in 8 s. A worker that starts without its local state (a new
machine, a wiped disk) would stall metering for that long.

:func:`restore_tables` runs when the worker starts, before it joins its group: for every
partition of every table whose local RocksDB store is more than ``threshold`` records behind
the changelog, it reads the missing records with a confluent-kafka consumer and writes them
in RocksDB write batches, exactly as Faust's ``apply_changelog_batch`` does (the raw key and
value bytes; a tombstone deletes), then records the last offset read as the store's persisted
offset. Faust's recovery then starts after that offset and reads only the tail. Partitions
the worker may never own are restored too: they are then warm standbys (Faust keeps one per
table by default as well).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import rocksdict
from faust.types import TP

from core.settings import Settings
from streams.kafka_config import quiet_client_config, read_ranges

log = logging.getLogger(__name__)

BATCH = 50_000


def restore_tables(settings: Settings, tables: Iterable[Any], threshold: int = 20_000) -> int:
    """Restore what each table partition lacks (see the module docstring); returns the
    number of changelog records applied. Blocking: run it in an executor."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(
        {
            **quiet_client_config(settings),
            "group.id": f"{settings.app_id}.restore",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "fetch.max.bytes": 64 * 1024 * 1024,
            "max.partition.fetch.bytes": 16 * 1024 * 1024,
            "enable.partition.eof": True,
        }
    )
    applied = 0
    try:
        for table in tables:
            store = table.data
            topic = table.changelog_topic.get_topic_name()
            for partition in range(settings.partitions):
                low, high = consumer.get_watermark_offsets(
                    TopicPartition(topic, partition), timeout=15
                )
                persisted = store.persisted_offset(TP(topic, partition))
                start = max(low, persisted + 1 if persisted is not None else low)
                if high - start < threshold:
                    continue
                started = time.monotonic()
                count = _restore_partition(consumer, store, topic, partition, start, high)
                applied += count
                log.info(
                    "restored %d records of %s[%d] in %.1f s before recovery",
                    count,
                    topic,
                    partition,
                    time.monotonic() - started,
                )
    finally:
        consumer.close()
    return applied


def _restore_partition(
    consumer: Any, store: Any, topic: str, partition: int, start: int, high: int
) -> int:
    db = store._db_for_partition(partition)
    tp = TP(topic, partition)
    batch = rocksdict.WriteBatch(raw_mode=True)
    pending = count = 0
    last = start - 1
    for message in read_ranges(consumer, topic, {partition: (start, high)}):
        value = message.value()
        if value is None:
            batch.delete(message.key())
        else:
            batch.put(message.key(), value)
        last = message.offset()
        pending += 1
        count += 1
        if pending >= BATCH:
            db.write(batch)
            store.set_persisted_offset(tp, last)
            batch = rocksdict.WriteBatch(raw_mode=True)
            pending = 0
    if pending:
        db.write(batch)
    if last >= start:
        store.set_persisted_offset(tp, last)
    return count
