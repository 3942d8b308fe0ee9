"""An in-memory sink with the ClickHouse sink's semantics, for tests of the stream side.

It shares the buffering of :class:`~sinks.port.BatchingSink` with the ClickHouse sink and stores
what a ``FINAL`` read of the store would show: one row per (org_id, event_id) with the highest
revision (the latest written on a tie), one enforcement record per event_id (the latest).
Failures can be injected with :meth:`MemorySink.fail_next_writes` to test that a failed flush
keeps the rows and blocks the offset commit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sinks.errors import SinkError
from sinks.port import BatchingSink, EnforcementRecord, PricedRow


class MemorySink(BatchingSink):
    """A :class:`~sinks.port.Sink` that stores rows in dictionaries."""

    def __init__(self) -> None:
        super().__init__()
        self._stored: dict[tuple[str, str], PricedRow] = {}
        self._stored_enforcement: dict[str, EnforcementRecord] = {}
        self.replays: dict[str, dict[str, Any]] = {}
        self._failures_left = 0
        self.inserts: list[tuple[str, int]] = []
        """Every successful write as (table, row count), in order: one per table per flush."""
        self.closed = False

    def fail_next_writes(self, count: int = 1) -> None:
        """Make the next ``count`` writes raise ``SinkError`` without storing anything."""
        self._failures_left = count

    def rows(self) -> list[PricedRow]:
        """The stored priced rows (deduplicated), ordered by (org_id, event_id)."""
        return [self._stored[key] for key in sorted(self._stored)]

    def enforcement_records(self) -> list[EnforcementRecord]:
        """The stored enforcement records (deduplicated), ordered by event_id."""
        return [self._stored_enforcement[key] for key in sorted(self._stored_enforcement)]

    def _fail_if_injected(self) -> None:
        if self._failures_left > 0:
            self._failures_left -= 1
            raise SinkError("injected failure: the in-memory store refused the insert")

    def _write_priced(self, rows: Sequence[PricedRow]) -> None:
        self._fail_if_injected()
        for row in rows:
            current = self._stored.get(row.key)
            if current is None or row.priced.revision >= current.priced.revision:
                self._stored[row.key] = row
        self.inserts.append(("priced_events_store", len(rows)))

    def _write_enforcement(self, records: Sequence[EnforcementRecord]) -> None:
        self._fail_if_injected()
        for record in records:
            self._stored_enforcement[record.event_id] = record
        self.inserts.append(("enforcement_log_store", len(records)))

    def write_replays(self, records: Sequence[Mapping[str, Any]]) -> None:
        self._fail_if_injected()
        for record in records:
            self.replays[record["replay_id"]] = dict(record)
        self.inserts.append(("replay_log_store", len(records)))

    def _close(self) -> None:
        self.closed = True
