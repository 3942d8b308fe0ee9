"""``metering replay``: re-price history after a price-table fix, through the live worker.

Steps (the planning rules are :mod:`core.replay`):

1. **Scan the ledger.** ``metering.priced`` holds every event the worker billed, with its
   fields and price. The scan seeks each partition by time to ``since - margin`` (a priced
   record is written after its event's ``occurred_at`` minus the 1 h future tolerance, so a
   2 h margin misses nothing) and reads to the end offsets taken at the start, keeping the
   highest revision per ``(org_id, event_id)``.
2. **Plan.** Re-price the events with ``occurred_at`` in ``[since, until)`` with the price
   table as it is now; keep the changed ones; print the per-org, per-month diff.
3. **Wait for the worker's commits.** A priced record whose usage event the worker has not
   committed yet may be re-metered after a crash; corrections wait until the worker group's
   committed offsets pass every corrected event.
4. **Send** the corrections as ``Reprice`` control messages on each org's partition of
   ``metering.control``: the live worker applies them in order with the org's usage (new
   prices into its dedupe records and monthly totals, corrected rows to the sink with the
   next revision, one re-decision per scope with reason ``REPRICED``). Exactly once, whatever
   crashes (:meth:`core.metering.Meter.reprice`). Nothing here opens ClickHouse, so the
   embedded store keeps its one owner.
5. **Wait until applied** (the worker group commits past the messages) and record the replay
   on ``metering.replays`` (the sink writes it to ``metering.replay_log``).

``--dry-run`` stops after step 2 and writes nothing. Running the same replay again finds
nothing to correct (the ledger's latest revisions already carry the new prices).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition

from core.errors import MeteringError
from core.metering import Correction
from core.pricing import PriceTable, default_price_table_path
from core.replay import LedgerEntry, MonthDiff, ReplayPlan, diff, messages, plan
from core.settings import Settings
from jobs.progress import _retrying
from streams.codec import Codecs, priced_to_record, record_to_priced
from streams.kafka_config import quiet_client_config, read_ranges, unreachable
from streams.topics import CONTROL, PRICED, REPLAYS, USAGE, ensure_topics, partition_for

DEFAULT_MARGIN_MS = 2 * 3_600_000
"""Seek margin: the worker refuses events more than 1 h ahead of its clock, so a priced record
is never written more than 1 h before its event's ``occurred_at``; 1 h more covers clock skew."""


class ReplayError(MeteringError):
    """The replay cannot go on (the message names the fix)."""


@dataclass
class ReplayResult:
    """What a replay found and did (``sent`` is 0 for a dry run)."""

    replay_id: str
    since_ms: int
    until_ms: int | None
    scanned: int
    plan: ReplayPlan
    months: list[MonthDiff]
    sent: int = 0
    messages: int = 0
    applied: int = 0
    """Corrections whose corrected priced record the worker wrote (read back after the run)."""
    scan_seconds: float = 0.0

    @property
    def events_per_second(self) -> float:
        return self.scanned / self.scan_seconds if self.scan_seconds else 0.0


Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``: called while scanning and while waiting."""


def run_replay(
    settings: Settings,
    since_ms: int,
    until_ms: int | None,
    *,
    dry_run: bool = False,
    prices: PriceTable | None = None,
    margin_ms: int = DEFAULT_MARGIN_MS,
    timeout: float = 600.0,
    progress: Progress | None = None,
) -> ReplayResult:
    """Run one replay (see the module docstring); raises :class:`ReplayError`."""
    from confluent_kafka import KafkaException

    if until_ms is not None and until_ms <= since_ms:
        raise ReplayError("--until must be later than --since")
    if margin_ms < 0:
        raise ReplayError("--margin-hours cannot be negative")
    try:
        return _run(settings, since_ms, until_ms, dry_run, prices, margin_ms, timeout, progress)
    except KafkaException as exc:
        detail = exc.args[0].str() if exc.args else str(exc)
        raise ReplayError(
            unreachable(settings, detail, "is it running? (METERING_KAFKA_BOOTSTRAP)")
        ) from None


def _run(
    settings: Settings,
    since_ms: int,
    until_ms: int | None,
    dry_run: bool,
    prices: PriceTable | None,
    margin_ms: int,
    timeout: float,
    progress: Progress | None,
) -> ReplayResult:
    prices = prices or PriceTable.load(settings.price_table or default_price_table_path())
    codecs = Codecs.from_settings(settings)
    report = progress or (lambda stage, done, total: None)
    replay_id = f"replay-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"

    # Corrections still queued for the worker (an earlier replay's) would make this plan stale
    # and could race with it: start from a ledger the worker has caught up with. A dry run
    # never waits (it writes nothing, so it cannot race).
    if not dry_run:
        _wait_for_control_backlog(settings, timeout, report)
    started = time.monotonic()
    end = until_ms if until_ms is not None else float("inf")
    ledger, scanned = scan_ledger(
        settings, codecs, since_ms - margin_ms, report, lambda at: since_ms <= at < end
    )
    result = ReplayResult(
        replay_id,
        since_ms,
        until_ms,
        scanned,
        plan(ledger, prices, since_ms, until_ms),
        [],
        scan_seconds=time.monotonic() - started,
    )
    result.months = diff(result.plan.corrections)
    if dry_run or not result.plan.corrections:
        if not dry_run:
            _record(settings, codecs, result, prices)
        return result

    ensure_topics(settings)
    _wait_for_worker_commits(settings, result.plan.corrections, timeout, report)
    marks = {p: high for p, (_, high) in _watermarks(settings, settings.topic(PRICED)).items()}
    positions = _send(settings, codecs, replay_id, result)
    _wait_until_applied(settings, positions, timeout, report)
    result.applied = _count_applied(settings, codecs, marks, result.plan.corrections)
    _record(settings, codecs, result, prices)
    return result


def _watermarks(settings: Settings, topic: str) -> dict[int, tuple[int, int]]:
    """(low, high) watermark of every partition of ``topic`` (none when it does not exist)."""
    consumer = Consumer({**quiet_client_config(settings), "group.id": settings.app_id})
    try:
        metadata = consumer.list_topics(topic, timeout=15)
        if topic not in metadata.topics or metadata.topics[topic].error is not None:
            return {}
        return {
            partition: _retrying(
                consumer.get_watermark_offsets, 15, TopicPartition(topic, partition)
            )
            for partition in metadata.topics[topic].partitions
        }
    finally:
        consumer.close()


def _reader(settings: Settings) -> Consumer:
    """A consumer that reads assigned ranges of the ledger (never joins or commits)."""
    return Consumer(
        {
            **quiet_client_config(settings),
            "group.id": f"{settings.app_id}.replay",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            "fetch.max.bytes": 64 * 1024 * 1024,
            "max.partition.fetch.bytes": 16 * 1024 * 1024,
        }
    )


def _count_applied(
    settings: Settings, codecs: Codecs, marks: dict[int, int], corrections: list[Correction]
) -> int:
    """How many corrections the worker applied: their corrected priced record (the planned
    revision) was written to the ledger after ``marks``. A correction the worker skipped as
    stale has none."""
    topic = settings.topic(PRICED)
    wanted = {
        (c.priced.event.org_id, c.priced.event.event_id): c.priced.revision for c in corrections
    }
    ranges = {
        partition: (marks.get(partition, low), high)
        for partition, (low, high) in _watermarks(settings, topic).items()
    }
    consumer = _reader(settings)
    found: set[tuple[str, str]] = set()
    try:
        for message in read_ranges(consumer, topic, ranges):
            record = codecs.priced.decode(message.value())
            key = (record["org_id"], record["event_id"])
            if wanted.get(key) == record["revision"]:
                found.add(key)
    finally:
        consumer.close()
    return len(found)


# -- the ledger -----------------------------------------------------------------------------


def scan_ledger(
    settings: Settings,
    codecs: Codecs,
    from_ms: int,
    progress: Progress,
    occurred: Callable[[int], bool] = lambda _: True,
) -> tuple[list[LedgerEntry], int]:
    """The latest record of every event on ``metering.priced`` written at or after
    ``from_ms`` (record timestamps) whose ``occurred_at`` passes ``occurred``, up to the end
    offsets taken now; and how many records were read."""
    topic = settings.topic(PRICED)
    watermarks = _watermarks(settings, topic)
    if not watermarks:
        return [], 0  # nothing was ever priced
    consumer = _reader(settings)
    try:
        wanted = [TopicPartition(topic, p, max(from_ms, 0)) for p in sorted(watermarks)]
        ranges = {
            start.partition: (start.offset, watermarks[start.partition][1])
            for start in _retrying(consumer.offsets_for_times, 15, wanted)
            if start.offset >= 0  # -1: no record at or after from_ms
        }
        total = sum(max(end - start, 0) for start, end in ranges.values())
        latest: dict[tuple[str, str], tuple[int, int, dict[str, Any]]] = {}
        read = 0
        progress("scan", 0, total)
        for message in read_ranges(consumer, topic, ranges):
            read += 1
            offset = message.offset()
            try:
                record = codecs.priced.decode(message.value())
            except MeteringError as exc:
                # The sink stops on the same record: never plan around a billed line.
                raise ReplayError(
                    f"unreadable record at {topic}[{message.partition()}]@{offset}: {exc}"
                ) from None
            if occurred(record["occurred_at"]):
                key = (record["org_id"], record["event_id"])
                held = latest.get(key)
                if held is None or (record["revision"], offset) >= held[:2]:
                    latest[key] = (record["revision"], offset, record)
            if read % 10_000 == 0:
                progress("scan", read, total)
        progress("scan", read, total)
        entries = []
        for _, _, record in latest.values():
            priced, source_partition, source_offset = record_to_priced(record)
            entries.append(LedgerEntry(priced, source_partition, source_offset))
        return entries, read
    finally:
        consumer.close()


# -- talking to the worker ------------------------------------------------------------------


def _wait_for(
    settings: Settings,
    topic: str,
    needed: dict[int, int],
    timeout: float,
    stage: str,
    progress: Progress,
    what: str,
) -> None:
    """Wait until the worker group's committed offset of every partition in ``needed``
    passes the offset given for it."""
    deadline = time.monotonic() + timeout
    total = len(needed)
    tps = [TopicPartition(topic, p) for p in sorted(needed)]
    # Reads the group's commits without joining it (no rebalance is caused).
    consumer = Consumer(
        {**quiet_client_config(settings), "group.id": settings.app_id, "enable.auto.commit": False}
    )
    try:
        while True:
            committed = {tp.partition: tp.offset for tp in _retrying(consumer.committed, 15, tps)}
            behind = {p: o for p, o in needed.items() if committed.get(p, -1) <= o}
            progress(stage, total - len(behind), total)
            if not behind:
                return
            if time.monotonic() > deadline:
                raise ReplayError(
                    f"the worker ({settings.app_id}) has not committed {what} within "
                    f"{timeout:.0f}s (partitions {sorted(behind)} of {topic}); start `metering "
                    "worker` and run the replay again: it only corrects what is still uncorrected"
                )
            time.sleep(0.5)
    finally:
        consumer.close()


def _wait_for_control_backlog(settings: Settings, timeout: float, progress: Progress) -> None:
    """Wait until the worker has committed every control message written so far."""
    topic = settings.topic(CONTROL)
    needed = {p: high - 1 for p, (low, high) in _watermarks(settings, topic).items() if high > low}
    if needed:
        _wait_for(
            settings, topic, needed, timeout, "worker", progress, "the pending control messages"
        )


def _wait_for_worker_commits(
    settings: Settings, corrections: list[Correction], timeout: float, progress: Progress
) -> None:
    needed: dict[int, int] = {}
    for correction in corrections:
        partition = correction.source_partition
        needed[partition] = max(needed.get(partition, -1), correction.source_offset)
    _wait_for(
        settings,
        settings.topic(USAGE),
        needed,
        timeout,
        "worker",
        progress,
        "the usage events being corrected",
    )


def _send(
    settings: Settings, codecs: Codecs, replay_id: str, result: ReplayResult
) -> dict[int, int]:
    """Produce the correction messages; returns the highest offset written per partition."""
    topic = settings.topic(CONTROL)
    producer = Producer(
        {**quiet_client_config(settings), "enable.idempotence": True, "linger.ms": 20}
    )
    positions: dict[int, int] = {}
    failures: list[str] = []

    def delivered(error: Any, message: Any) -> None:
        if error is not None:
            failures.append(str(error))
        else:
            partition = message.partition()
            positions[partition] = max(positions.get(partition, -1), message.offset())

    now_ms = int(time.time() * 1000)
    for org_id, index, chunk, final in messages(result.plan.corrections):
        record = {
            "message_id": f"{replay_id}:{org_id}:{index}",
            "org_id": org_id,
            "issued_at": now_ms,
            "command": (
                "Reprice",
                {
                    "replay_id": replay_id,
                    "final": final,
                    "corrections": [_correction_record(codecs, c) for c in chunk],
                },
            ),
        }
        while True:
            try:
                producer.produce(
                    topic,
                    key=org_id.encode(),
                    value=codecs.control.encode(record),
                    partition=partition_for(org_id, settings.partitions),
                    on_delivery=delivered,
                )
                break
            except BufferError:
                producer.poll(0.1)
        result.messages += 1
        result.sent += len(chunk)
        producer.poll(0)
    if producer.flush(60) > 0:
        failures.append("not every correction message was delivered within 60 s")
    if failures:
        raise ReplayError(
            f"sending corrections failed ({failures[0]}); run the replay again: corrections "
            "already applied are not applied twice"
        )
    return positions


def _correction_record(codecs: Codecs, correction: Correction) -> dict[str, Any]:
    record = priced_to_record(
        correction.priced, correction.source_partition, correction.source_offset
    )
    return {
        "priced": codecs.priced.encode(record),
        "old_cost_nano": correction.old_cost_nano,
        "old_pricing_version": correction.old_pricing_version,
    }


def _wait_until_applied(
    settings: Settings, positions: dict[int, int], timeout: float, progress: Progress
) -> None:
    _wait_for(
        settings,
        settings.topic(CONTROL),
        positions,
        timeout,
        "apply",
        progress,
        "the correction messages",
    )


def _record(settings: Settings, codecs: Codecs, result: ReplayResult, prices: PriceTable) -> None:
    """The replay's line in ``metering.replay_log`` (through the sink)."""
    record = replay_log_record(result, prices)
    producer = Producer(quiet_client_config(settings))
    producer.produce(
        settings.topic(REPLAYS), key=result.replay_id.encode(), value=codecs.replay.encode(record)
    )
    if producer.flush(30) > 0:
        raise ReplayError("the replay log record was not delivered within 30 s")


def replay_log_record(result: ReplayResult, prices: PriceTable) -> dict[str, Any]:
    """The ``metering.replays`` record of a finished replay."""
    months = result.months
    return {
        "replay_id": result.replay_id,
        "finished_at": int(time.time() * 1000),
        "since": result.since_ms,
        "until": result.until_ms,
        "price_versions": list(prices.version_ids),
        "versions_used": sorted(result.plan.versions_used),
        "records_scanned": result.scanned,
        "events_in_range": result.plan.in_range,
        "events_repriced": result.applied,
        "events_unpriceable": len(result.plan.unpriceable),
        "orgs": len({row.org_id for row in months}),
        "old_cost_nano": sum(row.old_cost_nano for row in months),
        "new_cost_nano": sum(row.new_cost_nano for row in months),
    }
