"""Semantic checks of decoded usage records and their dead-letter reasons (SPEC §3)."""

from __future__ import annotations

from typing import Any

import pytest

from core.errors import DeadLetterReason, RejectedEvent
from core.periods import iso_to_ms, month_of, month_start, ms_to_iso, parse_period
from core.validation import MAX_TOKENS_PER_KIND, check_cost, validate_usage

NOW = iso_to_ms("2026-11-28T12:00:00Z")


def record(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "event_id": "e1",
        "occurred_at": NOW - 1000,
        "org_id": "org",
        "plan": "TEAM",
        "user_id": "u",
        "seat_tier": "PREMIUM",
        "product": "CLAUDE_CODE",
        "model": "claude-sonnet-4-0",
        "input_tokens": 1,
        "output_tokens": 2,
        "cache_creation_input_tokens": 3,
        "cache_read_input_tokens": 4,
        "extra_usage": True,
    }
    base.update(changes)
    return base


def reason_of(rec: dict[str, Any]) -> DeadLetterReason:
    with pytest.raises(RejectedEvent) as caught:
        validate_usage(rec, NOW)
    return caught.value.reason


def test_valid_record_becomes_an_event() -> None:
    event = validate_usage(record(), NOW)
    assert event.usage.prompt_tokens == 1 + 3 + 4
    assert event.plan.value == "TEAM" and event.extra_usage is True


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"event_id": ""}, DeadLetterReason.INVALID_FIELD),
        ({"org_id": ""}, DeadLetterReason.INVALID_FIELD),
        ({"user_id": None}, DeadLetterReason.INVALID_FIELD),
        ({"org_id": "x" * 257}, DeadLetterReason.INVALID_FIELD),
        ({"input_tokens": -1}, DeadLetterReason.INVALID_FIELD),
        ({"cache_read_input_tokens": None}, DeadLetterReason.INVALID_FIELD),
        ({"output_tokens": MAX_TOKENS_PER_KIND + 1}, DeadLetterReason.OUT_OF_RANGE),
        ({"output_tokens": 2**63 - 1}, DeadLetterReason.OUT_OF_RANGE),
        ({"occurred_at": NOW + 3_600_001}, DeadLetterReason.FUTURE_TIMESTAMP),
        ({"plan": "FREE"}, DeadLetterReason.INVALID_FIELD),
    ],
)
def test_bad_records_get_their_reason(changes: dict[str, Any], reason: DeadLetterReason) -> None:
    assert reason_of(record(**changes)) is reason


def test_one_hour_ahead_is_still_accepted() -> None:
    assert (
        validate_usage(record(occurred_at=NOW + 3_600_000), NOW).occurred_at_ms == NOW + 3_600_000
    )


def test_maximum_token_count_is_accepted() -> None:
    assert validate_usage(record(input_tokens=MAX_TOKENS_PER_KIND), NOW).usage.input_tokens == (
        MAX_TOKENS_PER_KIND
    )


def test_sql_looking_and_unicode_ids_are_kept_verbatim() -> None:
    nasty = "x'); DROP TABLE metering.priced_events; -- ünï©ødé 🚀"
    assert validate_usage(record(user_id=nasty), NOW).user_id == nasty


def test_cost_limit() -> None:
    check_cost(10_000 * 10**9)
    with pytest.raises(RejectedEvent) as caught:
        check_cost(10_000 * 10**9 + 1)
    assert caught.value.reason is DeadLetterReason.OUT_OF_RANGE


def test_periods_are_utc_calendar_months() -> None:
    assert month_of(iso_to_ms("2026-10-31T23:59:59.999Z")) == "2026-10"
    assert month_of(iso_to_ms("2026-11-01T00:00:00Z")) == "2026-11"
    assert month_of(iso_to_ms("2026-11-01T00:30:00+01:00")) == "2026-10"
    assert month_start("2026-02").isoformat() == "2026-02-01"
    assert ms_to_iso(iso_to_ms("2026-11-28T18:17:29.123Z")) == "2026-11-28T18:17:29.123Z"
    with pytest.raises(ValueError):
        parse_period("2026-13")
    with pytest.raises(ValueError):
        iso_to_ms("2026-11-01T00:00:00")
