"""The sink loop: ``metering.priced`` (and the enforcement topics ``metering.pauses`` and
``metering.billing``) -> batches -> ClickHouse, at least once.

Runs in its own consumer group (``<app id>.sink``), either inside ``metering worker`` (when it
owns the embedded store) or alone as ``metering sink``. Contract:

* rows are buffered and written in one insert per batch (by size or age), never per message;
* every ClickHouse call runs on one dedicated thread, never on the event loop (chDB is an
  in-process engine and the client is blocking);
* offsets are committed only after the rows up to them are flushed, so a crash or a failed
  flush re-reads them; rows are idempotent (ReplacingMergeTree keyed by the event identity),
  so re-reading never double counts;
* while ClickHouse fails, the loop pauses consumption (back-pressure), logs and counts every
  failure, and retries with backoff until the write succeeds or the process is stopped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError

from core.errors import MeteringError
from core.settings import Settings
from sinks.errors import SinkError
from sinks.port import PricedRow, Sink
from streams import metrics
from streams.codec import Codecs, record_to_priced
from streams.kafka_config import aiokafka_config
from streams.topics import BILLING, PAUSES, PRICED, REPLAYS

log = logging.getLogger(__name__)
T = TypeVar("T")


class StoreThread:
    """The one thread that talks to ClickHouse in this process (sink writes and web reads)."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clickhouse")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, runner: SinkRunner) -> None:
        self.runner = runner

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.runner.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("sink assigned %d partitions", len(assigned))


class SinkRunner:
    """Consumes priced events and writes them through a :class:`sinks.port.Sink`."""

    def __init__(
        self,
        settings: Settings,
        sink: Sink,
        store: StoreThread,
        codecs: Codecs,
        *,
        batch_rows: int = 20_000,
        max_batch_age: float = 1.0,
        retry_backoff: tuple[float, float] = (0.5, 10.0),
    ) -> None:
        self.settings = settings
        self.sink = sink
        self.store = store
        self.codecs = codecs
        self.batch_rows = batch_rows
        self.max_batch_age = max_batch_age
        self.retry_backoff = retry_backoff
        self._offsets: dict[TopicPartition, int] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._oldest_pending: float | None = None
        self.stopping = asyncio.Event()
        self._priced_topic = settings.topic(PRICED)
        self._billing_topic = settings.topic(BILLING)
        self._replays_topic = settings.topic(REPLAYS)
        self._replays: list[dict[str, Any]] = []
        self.rows_written = 0

    async def run(self) -> None:
        """Consume until :attr:`stopping` is set; then flush and commit what is buffered."""
        consumer = AIOKafkaConsumer(
            **aiokafka_config(self.settings),
            group_id=self.settings.sink_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=self.batch_rows,
            fetch_max_bytes=64 * 1024 * 1024,
            max_partition_fetch_bytes=16 * 1024 * 1024,
        )
        self._consumer = consumer
        consumer.subscribe(
            [
                self._priced_topic,
                self.settings.topic(PAUSES),
                self._billing_topic,
                self._replays_topic,
            ],
            listener=_Rebalance(self),
        )
        await consumer.start()
        try:
            while not self.stopping.is_set():
                batch = await consumer.getmany(timeout_ms=200, max_records=self.batch_rows)
                for tp, messages in batch.items():
                    self._buffer(tp, messages)
                if self._due():
                    await self.flush_and_commit()
            await self.flush_and_commit()
        finally:
            self._consumer = None
            await consumer.stop()

    def _buffer(self, tp: TopicPartition, messages: list[Any]) -> None:
        if tp.topic == self._replays_topic:
            self._buffer_replays(tp, messages)
            return
        if tp.topic != self._priced_topic:
            self._buffer_enforcement(tp, messages)
            return
        rows = []
        for message in messages:
            try:
                record = self.codecs.priced.decode(message.value)
                priced, partition, offset = record_to_priced(record)
            except MeteringError as exc:
                # Our own topic: an unreadable record means a worker/sink version mismatch or a
                # foreign producer. Skipping it would silently drop an invoice line, so stop
                # here without committing, loudly, until an operator fixes it.
                metrics.SINK_UNREADABLE.inc()
                raise SinkError(
                    f"unreadable record at {tp.topic}[{tp.partition}]@{message.offset}: {exc}"
                ) from None
            rows.append(PricedRow(priced, partition, offset))
        if rows:
            self.sink.add(rows)
            if self._oldest_pending is None:
                self._oldest_pending = time.monotonic()
        if messages:
            self._offsets[tp] = messages[-1].offset + 1

    def _buffer_enforcement(self, tp: TopicPartition, messages: list[Any]) -> None:
        """PAUSE/RESUME (``metering.pauses``) and RELOAD_REQUESTED (``metering.billing``)
        rows for ``metering.enforcement_log``."""
        codec = self.codecs.billing if tp.topic == self._billing_topic else self.codecs.pause
        records = []
        for message in messages:
            try:
                records.append(codec.decode(message.value))
            except MeteringError as exc:
                metrics.SINK_UNREADABLE.inc()
                raise SinkError(
                    f"unreadable record at {tp.topic}[{tp.partition}]@{message.offset}: {exc}"
                ) from None
        if records:
            try:
                self.sink.add_enforcement(records, tp.partition)
            except ValueError as exc:
                raise SinkError(f"invalid enforcement record on {tp.topic}: {exc}") from None
            if self._oldest_pending is None:
                self._oldest_pending = time.monotonic()
        if messages:
            self._offsets[tp] = messages[-1].offset + 1

    def _buffer_replays(self, tp: TopicPartition, messages: list[Any]) -> None:
        """``metering replay`` log records, written at the next flush."""
        for message in messages:
            try:
                self._replays.append(self.codecs.replay.decode(message.value))
            except MeteringError as exc:
                metrics.SINK_UNREADABLE.inc()
                raise SinkError(
                    f"unreadable record at {tp.topic}[{tp.partition}]@{message.offset}: {exc}"
                ) from None
        if messages:
            self._offsets[tp] = messages[-1].offset + 1
            if self._oldest_pending is None:
                self._oldest_pending = time.monotonic()

    def _write_all(self) -> int:
        """One flush of the buffered rows, then the replay records (store thread)."""
        written = self.sink.flush()
        if self._replays:
            self.sink.write_replays(self._replays)
            written += len(self._replays)
            self._replays = []
        return written

    def _due(self) -> bool:
        if not self._offsets:
            return False
        if self.sink.pending() >= self.batch_rows:
            return True
        oldest = self._oldest_pending
        return oldest is None or time.monotonic() - oldest >= self.max_batch_age

    async def flush_and_commit(self) -> None:
        """Write the buffer (retrying while ClickHouse fails), then commit its offsets."""
        if not self._offsets:
            return
        consumer = self._consumer
        delay, max_delay = self.retry_backoff
        paused = False
        while True:
            started = time.monotonic()
            try:
                written = await self.store.run(self._write_all)
                break
            except SinkError as exc:
                metrics.SINK_FLUSH_FAILURES.inc()
                log.warning("sink: ClickHouse write failed, retrying in %.1fs: %s", delay, exc)
                if consumer is not None and not paused:
                    consumer.pause(*consumer.assignment())  # back-pressure, stay in the group
                    paused = True
                if self.stopping.is_set() and delay >= max_delay:
                    raise
                if consumer is not None:
                    # Polling the paused partitions returns nothing but keeps this member in
                    # its group however long the outage lasts (max.poll.interval.ms).
                    await consumer.getmany(timeout_ms=int(delay * 1000))
                else:
                    await asyncio.sleep(delay)
                delay = min(delay * 2, max_delay)
        if paused and consumer is not None:
            consumer.resume(*consumer.assignment())
            log.info("sink: ClickHouse writes recovered")
        metrics.SINK_FLUSHES.inc()
        metrics.SINK_ROWS.inc(written)
        metrics.SINK_FLUSH_SECONDS.observe(time.monotonic() - started)
        self.rows_written += written
        self._oldest_pending = None
        if consumer is not None:
            offsets = dict(self._offsets)
            try:
                await consumer.commit(offsets)
            except (CommitFailedError, IllegalStateError) as exc:
                # The group moved on (a rebalance): the rows are written and idempotent, the
                # partitions' next owner re-reads from the last commit. Nothing is lost.
                log.warning("sink: offset commit refused after a rebalance: %s", exc)
        self._offsets.clear()

    async def on_revoked(self, revoked: list[TopicPartition]) -> None:
        """Before giving partitions away, write and commit what we hold for them."""
        if not self._offsets:
            return
        try:
            await self.flush_and_commit()
        except SinkError:
            self.sink.drop_pending()  # the next owner re-reads the uncommitted rows
            self._replays = []
            self._offsets.clear()
            self._oldest_pending = None
