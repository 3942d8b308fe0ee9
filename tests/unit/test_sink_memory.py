"""The sink port's buffering contract, through the in-memory sink."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from core.usage import (
    Plan,
    Price,
    PricedEvent,
    Product,
    SeatTier,
    TokenUsage,
    UsageEvent,
)
from sinks.clickhouse import enforcement_row_values, nano_to_usd, priced_row_values, redact_dsn
from sinks.ddl import ENFORCEMENT_COLUMNS, PRICED_COLUMNS
from sinks.errors import SinkError
from sinks.memory import MemorySink
from sinks.port import BatchingSink, EnforcementRecord, PricedRow, Sink


def priced_row(
    event_id: str = "e1",
    *,
    org_id: str = "org-1",
    cost_nano: int = 1_000,
    revision: int = 0,
    partition: int = 0,
    offset: int = 0,
) -> PricedRow:
    event = UsageEvent(
        event_id=event_id,
        occurred_at_ms=1_735_689_600_123,
        org_id=org_id,
        plan=Plan.TEAM,
        user_id="user-1",
        seat_tier=SeatTier.STANDARD,
        product=Product.CLAUDE_CODE,
        model="claude-sonnet-4-0",
        usage=TokenUsage(10, 20, 30, 40),
        extra_usage=True,
    )
    price = Price("Sonnet 4", "2025-01", False, cost_nano)
    return PricedRow(PricedEvent(event, price, revision), partition, offset)


def pause_record(event_id: str = "p1", **overrides: object) -> dict[str, object]:
    record: dict[str, object] = {
        "event_id": event_id,
        "action": "PAUSE",
        "scope": "USER",
        "reason": "CAP_REACHED",
        "org_id": "org-1",
        "user_id": "user-1",
        "period": "2025-01",
        "spend_nano_usd": 5_000_000_000,
        "limit_nano_usd": 5_000_000_000,
        "limit_source": "USER",
        "trigger_id": "e1",
        "emitted_at": 1_735_689_600_123,
    }
    record.update(overrides)
    return record


def costs(sink: MemorySink) -> dict[str, int]:
    return {row.priced.event.event_id: row.priced.price.cost_nano for row in sink.rows()}


def test_memory_sink_implements_the_port() -> None:
    sink = MemorySink()
    assert isinstance(sink, Sink)
    assert isinstance(sink, BatchingSink)


def test_add_buffers_without_writing_and_flush_writes_one_insert_per_table() -> None:
    sink = MemorySink()
    sink.add([priced_row("e1"), priced_row("e2")])
    sink.add_enforcement([pause_record("p1")])
    assert sink.pending() == 3
    assert sink.rows() == [] and sink.inserts == []
    assert sink.flush() == 3
    assert sink.pending() == 0
    assert sink.inserts == [("priced_events_store", 2), ("enforcement_log_store", 1)]
    assert costs(sink) == {"e1": 1_000, "e2": 1_000}
    assert [r.event_id for r in sink.enforcement_records()] == ["p1"]


def test_empty_flush_touches_nothing() -> None:
    sink = MemorySink()
    assert sink.flush() == 0
    assert sink.inserts == []


def test_redelivery_is_counted_once_and_highest_revision_wins() -> None:
    sink = MemorySink()
    sink.add([priced_row("e1", cost_nano=100), priced_row("e1", cost_nano=100)])
    assert sink.pending() == 1  # deduplicated in the buffer already
    sink.flush()
    sink.add([priced_row("e1", cost_nano=100)])  # re-delivery after a restart
    sink.add([priced_row("e2", cost_nano=1)])
    sink.flush()
    sink.add([priced_row("e1", cost_nano=250, revision=3)])  # replay
    sink.flush()
    sink.add([priced_row("e1", cost_nano=100, revision=0)])  # late re-delivery of the original
    sink.flush()
    assert costs(sink) == {"e1": 250, "e2": 1}


def test_same_event_id_in_two_orgs_is_two_events() -> None:
    sink = MemorySink()
    sink.add([priced_row("e1", org_id="a"), priced_row("e1", org_id="b")])
    sink.flush()
    assert [row.key for row in sink.rows()] == [("a", "e1"), ("b", "e1")]


def test_buffer_keeps_the_highest_revision_regardless_of_arrival_order() -> None:
    sink = MemorySink()
    sink.add([priced_row("e1", cost_nano=7, revision=2), priced_row("e1", cost_nano=5)])
    sink.flush()
    assert costs(sink) == {"e1": 7}


def test_failed_flush_raises_and_keeps_every_row_for_the_retry() -> None:
    sink = MemorySink()
    sink.add([priced_row("e1"), priced_row("e2")])
    sink.add_enforcement([pause_record("p1")])
    sink.fail_next_writes(1)
    with pytest.raises(SinkError, match="injected"):
        sink.flush()
    assert sink.pending() == 3
    assert sink.rows() == []
    assert sink.flush() == 3
    assert set(costs(sink)) == {"e1", "e2"}


def test_a_write_that_succeeded_is_not_repeated_after_a_later_one_fails() -> None:
    sink = MemorySink()
    sink.add([priced_row("e1")])
    sink.add_enforcement([pause_record("p1")])

    original = sink._write_enforcement

    def failing(records: object) -> None:
        raise SinkError("enforcement insert refused")

    sink._write_enforcement = failing  # type: ignore[method-assign]
    with pytest.raises(SinkError):
        sink.flush()
    assert set(costs(sink)) == {"e1"}
    assert sink.pending() == 1  # only the enforcement record is left
    sink._write_enforcement = original  # type: ignore[method-assign]
    assert sink.flush() == 1
    assert sink.inserts == [("priced_events_store", 1), ("enforcement_log_store", 1)]


def test_rows_added_after_a_failed_flush_win_over_the_restored_ones() -> None:
    sink = MemorySink()
    sink.add([priced_row("e1", cost_nano=1, revision=1)])
    sink.fail_next_writes(1)
    with pytest.raises(SinkError):
        sink.flush()
    sink.add([priced_row("e1", cost_nano=2, revision=1)])  # same revision, newer
    sink.flush()
    assert costs(sink) == {"e1": 2}


def test_rows_added_during_a_flush_wait_for_the_next_one() -> None:
    """``add`` on the event loop while ``flush`` runs on the store thread."""
    in_write = threading.Event()
    release = threading.Event()

    class SlowSink(MemorySink):
        def _write_priced(self, rows):  # type: ignore[no-untyped-def]
            in_write.set()
            assert release.wait(5)
            super()._write_priced(rows)

    sink = SlowSink()
    sink.add([priced_row("e1")])
    flusher = threading.Thread(target=sink.flush)
    flusher.start()
    assert in_write.wait(5)
    sink.add([priced_row("e2")])
    assert sink.pending() == 1
    release.set()
    flusher.join(5)
    assert set(costs(sink)) == {"e1"}
    assert sink.flush() == 1
    assert set(costs(sink)) == {"e1", "e2"}


def test_drop_pending_discards_the_buffer() -> None:
    sink = MemorySink()
    sink.add([priced_row("e1"), priced_row("e2")])
    sink.add_enforcement([pause_record("p1")])
    assert sink.drop_pending() == 3
    assert sink.pending() == 0
    assert sink.flush() == 0
    assert sink.rows() == []


def test_drop_pending_of_revoked_partitions_keeps_the_others() -> None:
    sink = MemorySink()
    sink.add([priced_row("e1", partition=0), priced_row("e2", partition=1)])
    sink.add_enforcement([pause_record("p0")], source_partition=0)
    sink.add_enforcement([pause_record("p1")], source_partition=1)
    sink.add_enforcement([pause_record("px")])
    assert sink.drop_pending([1]) == 2
    sink.flush()
    assert set(costs(sink)) == {"e1"}
    assert [r.event_id for r in sink.enforcement_records()] == ["p0", "px"]


def test_rows_of_a_partition_revoked_during_a_failing_flush_are_not_restored() -> None:
    in_write = threading.Event()
    release = threading.Event()

    class FailingSink(MemorySink):
        def _write_priced(self, rows):  # type: ignore[no-untyped-def]
            in_write.set()
            assert release.wait(5)
            raise SinkError("store down")

    sink = FailingSink()
    sink.add([priced_row("e1", partition=0), priced_row("e2", partition=1)])
    errors: list[BaseException] = []

    def flush() -> None:
        try:
            sink.flush()
        except SinkError as error:
            errors.append(error)

    flusher = threading.Thread(target=flush)
    flusher.start()
    assert in_write.wait(5)
    sink.drop_pending([1])
    release.set()
    flusher.join(5)
    assert len(errors) == 1
    assert sink.pending() == 1  # e1 came back, e2 (revoked partition) did not


def test_close_discards_unflushed_rows_and_refuses_further_use() -> None:
    sink = MemorySink()
    sink.add([priced_row("e1")])
    sink.close()
    sink.close()  # idempotent
    assert sink.closed
    assert sink.rows() == []
    with pytest.raises(RuntimeError, match="closed"):
        sink.add([priced_row("e2")])
    with pytest.raises(RuntimeError, match="closed"):
        sink.flush()


# --- enforcement records ----------------------------------------------------------------------


def test_enforcement_record_from_avro_fields() -> None:
    emitted = datetime(2025, 1, 1, 0, 0, 0, 123_000, tzinfo=UTC)
    record = EnforcementRecord.from_record(
        pause_record(user_id=None, limit_nano_usd=None, limit_source=None, emitted_at=emitted)
    )
    assert record.emitted_at_ms == 1_735_689_600_123
    assert record.user_id is None and record.limit_nano_usd is None
    assert record.amount_nano_usd is None and record.balance_nano_usd is None
    other_zone = emitted.astimezone(timezone(timedelta(hours=-5)))
    assert EnforcementRecord.from_record(pause_record(emitted_at=other_zone)).emitted_at_ms == (
        1_735_689_600_123
    )


def test_reload_requested_record() -> None:
    record = EnforcementRecord.from_record(
        pause_record(
            action="RELOAD_REQUESTED",
            scope="ORG",
            reason="BALANCE_LOW",
            user_id=None,
            limit_source="BALANCE",
            amount_nano_usd=50 * 10**9,
            balance_nano_usd=-1,
        )
    )
    assert (record.amount_nano_usd, record.balance_nano_usd) == (50 * 10**9, -1)


def test_invalid_enforcement_records_are_refused_when_added() -> None:
    sink = MemorySink()
    bad = pause_record(
        "p2",
        org_id="",
        spend_nano_usd=1.5,
        emitted_at=datetime(2025, 1, 1),  # naive: ambiguous
    )
    del bad["period"]
    with pytest.raises(ValueError) as raised:
        sink.add_enforcement([pause_record("p1"), bad])
    message = str(raised.value)
    for field in ("org_id", "period", "spend_nano_usd", "emitted_at"):
        assert field in message
    assert sink.pending() == 0  # all or nothing


def test_enforcement_repeat_is_stored_once() -> None:
    sink = MemorySink()
    sink.add_enforcement([pause_record("p1"), pause_record("p1", emitted_at=1)])
    sink.flush()
    sink.add_enforcement([pause_record("p1", emitted_at=2)])
    sink.flush()
    assert [(r.event_id, r.emitted_at_ms) for r in sink.enforcement_records()] == [("p1", 2)]


# --- row conversion for ClickHouse (pure) ---------------------------------------------------


def test_nano_to_usd_is_exact() -> None:
    assert nano_to_usd(1) == Decimal("0.000000001")
    assert nano_to_usd(-1_500_000_000) == Decimal("-1.5")
    big = 10**37 + 1  # 38 digits: Decimal(38, 9)'s full precision
    # The default decimal context (28 digits) would round this; the sink must not.
    assert str(nano_to_usd(big)) == "10000000000000000000000000000.000000001"


def test_priced_row_values_follow_the_insert_columns() -> None:
    values = dict(zip(PRICED_COLUMNS, priced_row_values(priced_row(revision=4)), strict=True))
    assert values["occurred_at"] == 1_735_689_600_123
    assert values["plan"] == "TEAM" and type(values["plan"]) is str
    assert values["seat_tier"] == "STANDARD" and values["product"] == "CLAUDE_CODE"
    assert values["cost_usd"] == Decimal("0.000001")
    assert (values["long_context"], values["extra_usage"]) == (0, 1)
    assert values["cache_read_input_tokens"] == 40
    assert (values["revision"], values["source_partition"]) == (4, 0)


def test_enforcement_row_values_follow_the_insert_columns() -> None:
    record = EnforcementRecord.from_record(pause_record(limit_nano_usd=None))
    values = dict(zip(ENFORCEMENT_COLUMNS, enforcement_row_values(record), strict=True))
    assert values["spend_usd"] == Decimal(5)
    assert values["limit_usd"] is None and values["amount_usd"] is None
    assert values["emitted_at"] == 1_735_689_600_123


@pytest.mark.parametrize(
    ("dsn", "safe"),
    [
        ("chdb:///var/lib/metering/clickhouse", "chdb:///var/lib/metering/clickhouse"),
        (
            "http://bob:pw%40x@ch.internal:8123/metering?password=pw",
            "http://ch.internal:8123/metering",
        ),
        ("https://ch.example.com", "https://ch.example.com"),
    ],
)
def test_redacted_dsn_has_no_credentials(dsn: str, safe: str) -> None:
    assert redact_dsn(dsn) == safe
