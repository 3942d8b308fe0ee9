"""The sink port: what the stream side hands to the analytics store, and the buffering contract.

The consumer loop calls :meth:`Sink.add` for every priced event it processed (cheap, no I/O),
then, when a batch is complete, :meth:`Sink.flush` (blocking; run it off the event loop) and
commits its Kafka offsets **only if the flush returned**. A failed flush raises
:class:`~sinks.errors.SinkError` and keeps every row, so the next ``flush()`` rewrites them: rows
are idempotent (identity (org_id, event_id), the highest ``revision`` wins), so a retry or a
re-delivery after a crash never double counts. When a partition is revoked, its buffered rows are
discarded with :meth:`Sink.drop_pending`; the new owner re-reads them from the last commit.

:class:`BatchingSink` implements the buffering once; a store implements two writes
(``sinks.clickhouse.ClickHouseSink``, ``sinks.memory.MemorySink``).
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Protocol, runtime_checkable

from core.usage import PricedEvent

logger = logging.getLogger(__name__)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class PricedRow:
    """One priced event and the Kafka position it was read from (kept for tracing in the store)."""

    priced: PricedEvent
    source_partition: int
    source_offset: int

    @property
    def key(self) -> tuple[str, str]:
        """The event identity of SPEC §3: (org_id, event_id)."""
        return (self.priced.event.org_id, self.priced.event.event_id)


@dataclass(frozen=True, slots=True)
class EnforcementRecord:
    """One PAUSE, RESUME or RELOAD_REQUESTED event as the enforcement log stores it.

    Money is integer nano-USD (``None`` where the event has no such amount, e.g. an unlimited
    ``limit_nano_usd``); ``emitted_at_ms`` is epoch milliseconds, UTC. Build it from a decoded
    Avro record with :meth:`from_record`.
    """

    event_id: str
    action: str
    scope: str
    reason: str
    org_id: str
    user_id: str | None
    period: str
    spend_nano_usd: int
    limit_nano_usd: int | None
    limit_source: str | None
    trigger_id: str
    emitted_at_ms: int
    amount_nano_usd: int | None = None
    balance_nano_usd: int | None = None

    REQUIRED_TEXT: ClassVar[tuple[str, ...]] = (
        "event_id",
        "action",
        "scope",
        "reason",
        "org_id",
        "period",
        "trigger_id",
    )
    OPTIONAL_TEXT: ClassVar[tuple[str, ...]] = ("user_id", "limit_source")
    OPTIONAL_NANO: ClassVar[tuple[str, ...]] = (
        "limit_nano_usd",
        "amount_nano_usd",
        "balance_nano_usd",
    )

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> EnforcementRecord:
        """Validate a decoded pause/resume/reload record (keys = its Avro field names).

        Required: the text fields of :attr:`REQUIRED_TEXT`, ``spend_nano_usd`` (int) and
        ``emitted_at`` (epoch ms as int, or a timezone-aware ``datetime`` as fastavro decodes
        ``timestamp-millis``). Optional (missing or ``None`` = SQL NULL): ``user_id``,
        ``limit_source``, ``limit_nano_usd``, ``amount_nano_usd``, ``balance_nano_usd``. Other
        keys are ignored. Raises ``ValueError`` naming every problem at once: a record the
        sink could never write must fail where it is added, not in every later flush.
        """
        problems: list[str] = []

        def text(name: str, *, required: bool) -> str | None:
            value = record.get(name)
            if value is None and not required:
                return None
            if not isinstance(value, str) or (required and not value):
                problems.append(f"{name} must be a non-empty string, got {value!r}")
                return None
            return str(value)

        def nano(name: str, *, required: bool) -> int | None:
            value = record.get(name)
            if value is None and not required:
                return None
            if not isinstance(value, int) or isinstance(value, bool):
                problems.append(f"{name} must be an integer amount of nano-USD, got {value!r}")
                return None
            return value

        fields: dict[str, Any] = {name: text(name, required=True) for name in cls.REQUIRED_TEXT}
        fields.update({name: text(name, required=False) for name in cls.OPTIONAL_TEXT})
        fields["spend_nano_usd"] = nano("spend_nano_usd", required=True)
        fields.update({name: nano(name, required=False) for name in cls.OPTIONAL_NANO})
        fields["emitted_at_ms"] = _epoch_ms(record.get("emitted_at"), problems)
        if problems:
            event_id = record.get("event_id")
            raise ValueError(f"invalid enforcement record {event_id!r}: " + "; ".join(problems))
        return cls(**fields)


def _epoch_ms(value: object, problems: list[str]) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, datetime) and value.utcoffset() is not None:
        return (value - _EPOCH) // timedelta(milliseconds=1)
    problems.append(f"emitted_at must be epoch ms or an aware datetime, got {value!r}")
    return 0


@runtime_checkable
class Sink(Protocol):
    """The port the consumer loop writes priced events and enforcement records through.

    ``add``/``add_enforcement``/``pending``/``drop_pending`` are cheap and do no I/O.
    ``flush`` blocks on the store. All methods may be called from different threads (e.g.
    ``add`` on the event loop while ``flush`` runs in an executor).
    """

    def add(self, rows: Sequence[PricedRow]) -> None:
        """Buffer priced rows; a row replaces a buffered one of the same identity unless its
        revision is lower."""
        ...

    def add_enforcement(
        self, records: Sequence[Mapping[str, Any]], source_partition: int | None = None
    ) -> None:
        """Validate and buffer enforcement records (see :meth:`EnforcementRecord.from_record`);
        raises ``ValueError`` and buffers none of them if any is invalid."""
        ...

    def flush(self) -> int:
        """Write everything buffered, one insert per table; return the number of rows written.

        Raises ``SinkError`` on failure and keeps the unwritten rows for the next call.
        """
        ...

    def pending(self) -> int:
        """Rows buffered and not yet handed to a flush."""
        ...

    def drop_pending(self, partitions: Iterable[int] | None = None) -> int:
        """Discard buffered rows whose ``source_partition`` is in ``partitions`` (all rows when
        ``None``); return how many."""
        ...

    def write_replays(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Write replay-log records (``metering.replays``) at once, blocking; they are rare
        (one per replay). Raises ``SinkError`` when the store refuses them."""
        ...

    def close(self) -> None:
        """Release the store connection. Does not flush: call ``flush()`` first."""
        ...


class BatchingSink(ABC):
    """Buffering shared by every sink; subclasses implement the two writes and ``_close``.

    Guarantees:

    * The buffer holds at most one row per identity: priced rows by (org_id, event_id), keeping
      the highest revision (the latest added on a tie, as ReplacingMergeTree does); enforcement
      records by event_id, keeping the latest.
    * ``flush()`` takes the buffer as one batch, writes priced rows then enforcement records
      (one write each), and returns the number of rows written. If a write fails, the rows of
      that write and of any later one go back into the buffer (rows added meanwhile win over
      them by the rules above; rows of partitions dropped meanwhile stay dropped) and the error
      propagates; a write that already succeeded is not repeated.
    * Flushes are serialized; rows added while a flush runs wait for the next one.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._priced: dict[tuple[str, str], PricedRow] = {}
        self._enforcement: dict[str, tuple[EnforcementRecord, int | None]] = {}
        # Partitions dropped while a flush is in flight (None = all); their in-flight rows must
        # not come back into the buffer if that flush fails.
        self._dropped_in_flight: set[int] | None = set()
        self._closed = False

    # --- writes a store implements ---------------------------------------------------------

    @abstractmethod
    def _write_priced(self, rows: Sequence[PricedRow]) -> None:
        """Write all rows in one insert; raise ``SinkError`` if the store did not accept them."""

    @abstractmethod
    def _write_enforcement(self, records: Sequence[EnforcementRecord]) -> None:
        """Write all records in one insert; raise ``SinkError`` if the store did not accept them."""

    @abstractmethod
    def write_replays(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Write replay-log records at once (see :meth:`Sink.write_replays`)."""

    def _close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release store resources (called once by :meth:`close`)."""

    # --- the port ---------------------------------------------------------------------------

    def add(self, rows: Sequence[PricedRow]) -> None:
        """Buffer priced rows (no I/O). See the class docstring for the dedupe rule."""
        with self._lock:
            self._check_open()
            for row in rows:
                _keep_newer(self._priced, row)

    def add_enforcement(
        self, records: Sequence[Mapping[str, Any]], source_partition: int | None = None
    ) -> None:
        """Validate and buffer enforcement records (no I/O); ``ValueError`` if any is invalid.

        ``source_partition`` tags them so :meth:`drop_pending` can discard them with that
        partition's priced rows; untagged records are only dropped by ``drop_pending()``.
        """
        parsed = [EnforcementRecord.from_record(record) for record in records]
        with self._lock:
            self._check_open()
            for record in parsed:
                self._enforcement[record.event_id] = (record, source_partition)

    def pending(self) -> int:
        """Rows buffered and not yet taken by a flush."""
        with self._lock:
            return len(self._priced) + len(self._enforcement)

    def drop_pending(self, partitions: Iterable[int] | None = None) -> int:
        """Discard buffered rows of ``partitions`` (every row when ``None``); return the count.

        A priced row belongs to its :attr:`PricedRow.source_partition`, an enforcement record to
        the ``source_partition`` it was added with. If the rows were consumed from a topic whose
        partitions differ from those, call it without arguments.

        Call it when partitions are revoked: their offsets were not committed, so the new owner
        re-reads those events. Rows of a flush already in flight are still written (harmless:
        rows are idempotent) but are not put back if that flush fails.
        """
        with self._lock:
            before = len(self._priced) + len(self._enforcement)
            if partitions is None:
                self._priced.clear()
                self._enforcement.clear()
                self._dropped_in_flight = None
            else:
                revoked = set(partitions)
                self._priced = {
                    key: row
                    for key, row in self._priced.items()
                    if row.source_partition not in revoked
                }
                self._enforcement = {
                    key: entry
                    for key, entry in self._enforcement.items()
                    if entry[1] is None or entry[1] not in revoked
                }
                if self._dropped_in_flight is not None:
                    self._dropped_in_flight |= revoked
            return before - len(self._priced) - len(self._enforcement)

    def flush(self) -> int:
        """Write the buffer (blocking) and return the number of rows written.

        Returns 0 without touching the store when nothing is buffered. Raises ``SinkError``
        (and keeps the unwritten rows) when the store fails.
        """
        with self._flush_lock:
            with self._lock:
                self._check_open()
                priced = list(self._priced.values())
                enforcement = list(self._enforcement.values())
                self._priced = {}
                self._enforcement = {}
                self._dropped_in_flight = set()
            written = 0
            try:
                if priced:
                    self._write_priced(priced)
                    written += len(priced)
                    priced = []
                if enforcement:
                    self._write_enforcement([record for record, _ in enforcement])
                    written += len(enforcement)
                    enforcement = []
            except BaseException:
                self._restore(priced, enforcement)
                raise
            logger.debug("sink flushed %d rows", written)
            return written

    def close(self) -> None:
        """Release the store; idempotent. Unflushed rows are discarded with a warning (their
        offsets were never committed, so they are read again on restart)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            left = len(self._priced) + len(self._enforcement)
            self._priced.clear()
            self._enforcement.clear()
        if left:
            logger.warning("sink closed with %d unflushed rows; they will be re-consumed", left)
        self._close()

    # --- internals ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the sink is closed")

    def _restore(
        self,
        priced: list[PricedRow],
        enforcement: list[tuple[EnforcementRecord, int | None]],
    ) -> None:
        """Put a failed flush's rows back under any added since (those are newer)."""
        with self._lock:
            dropped = self._dropped_in_flight
            if dropped is None or self._closed:
                return
            for row in priced:
                if row.source_partition in dropped:
                    continue
                current = self._priced.get(row.key)
                if current is None or row.priced.revision > current.priced.revision:
                    self._priced[row.key] = row
            for record, partition in enforcement:
                if partition is not None and partition in dropped:
                    continue
                self._enforcement.setdefault(record.event_id, (record, partition))


def _keep_newer(buffer: dict[tuple[str, str], PricedRow], row: PricedRow) -> None:
    current = buffer.get(row.key)
    if current is None or row.priced.revision >= current.priced.revision:
        buffer[row.key] = row
