"""The hot-path rule: dedupe, price, monthly totals, and at-least-once re-delivery."""

from __future__ import annotations

import contextlib
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import DeadLetterReason, RejectedEvent
from core.metering import Meter, Status
from core.periods import iso_to_ms
from core.pricing import PriceTable, default_price_table_path
from core.totals import MonthTotals, org_key, tier_key, user_key
from core.usage import Plan, Product, SeatTier, TokenUsage, UsageEvent

PRICES = PriceTable.load(default_price_table_path())
NOV = iso_to_ms("2026-11-10T12:00:00Z")


def event(event_id: str = "e1", **changes: object) -> UsageEvent:
    base = UsageEvent(
        event_id=event_id,
        occurred_at_ms=NOV,
        org_id="org-a",
        plan=Plan.ENTERPRISE,
        user_id="u1",
        seat_tier=SeatTier.STANDARD,
        product=Product.CLAUDE,
        model="claude-3-5-haiku-20241022",
        usage=TokenUsage(1_000, 100, 0, 0),
        extra_usage=True,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


# 1000 input x 800 + 100 output x 4000 nano-USD (Haiku 3.5: $0.80 and $4 per MTok)
HAIKU_COST = 1_000 * 800 + 100 * 4_000


def totals_of(totals: dict, key: str) -> MonthTotals:
    return MonthTotals.of(totals.get(key))


def test_new_event_is_priced_and_counted_in_all_three_totals() -> None:
    seen: dict = {}
    totals: dict = {}
    outcome = Meter(PRICES, seen, totals).process(event(), offset=7)
    assert outcome.status is Status.APPLIED
    assert outcome.priced is not None and outcome.priced.price.cost_nano == HAIKU_COST
    assert outcome.period == "2026-11"
    for key in (
        org_key("org-a", "2026-11"),
        tier_key("org-a", "2026-11", "STANDARD"),
        user_key("org-a", "2026-11", "u1"),
    ):
        total = totals_of(totals, key)
        assert (total.events, total.cost_nano, total.extra_cost_nano) == (1, HAIKU_COST, HAIKU_COST)
        assert (total.input_tokens, total.output_tokens) == (1_000, 100)


def test_duplicate_with_another_offset_is_counted_once() -> None:
    seen: dict = {}
    totals: dict = {}
    meter = Meter(PRICES, seen, totals)
    meter.process(event(), offset=1)
    outcome = meter.process(event(), offset=2)
    assert outcome.status is Status.DUPLICATE and outcome.priced is None
    assert totals_of(totals, org_key("org-a", "2026-11")).events == 1


def test_same_id_in_another_org_is_a_different_event() -> None:
    totals: dict = {}
    meter = Meter(PRICES, {}, totals)
    meter.process(event(), offset=1)
    assert meter.process(event(org_id="org-b"), offset=2).status is Status.APPLIED


def test_redelivery_after_partial_crash_completes_missing_totals_only() -> None:
    """A crash persisted the dedupe record and the org total but not the user total."""
    seen: dict = {}
    totals: dict = {}
    meter = Meter(PRICES, seen, totals)
    meter.process(event(), offset=5)
    lost_user_key = user_key("org-a", "2026-11", "u1")
    del totals[lost_user_key]
    outcome = meter.process(event(), offset=5)
    assert outcome.status is Status.REDELIVERED
    assert outcome.priced is not None and outcome.priced.price.cost_nano == HAIKU_COST
    assert totals_of(totals, org_key("org-a", "2026-11")).events == 1
    assert totals_of(totals, lost_user_key).events == 1


def test_redelivery_reuses_the_recorded_price_even_if_the_table_changed() -> None:
    seen: dict = {}
    totals: dict = {}
    Meter(PRICES, seen, totals).process(event(), offset=5)
    dearer = PriceTable.from_mapping({"versions": [{**_raw_version(), "id": "dearer"}]})
    outcome = Meter(dearer, seen, totals).process(event(), offset=5)
    assert outcome.priced is not None
    assert outcome.priced.price.pricing_version == PRICES.versions[0].version_id
    assert totals_of(totals, org_key("org-a", "2026-11")).cost_nano == HAIKU_COST


def _raw_version() -> dict:
    import tomllib

    raw = tomllib.loads(default_price_table_path().read_text())["versions"][0]
    raw["families"]["haiku-3.5"]["input"] = "1"
    return raw


def test_lost_dedupe_record_with_applied_totals_is_not_double_counted() -> None:
    seen: dict = {}
    totals: dict = {}
    meter = Meter(PRICES, seen, totals)
    meter.process(event(), offset=9)
    seen.clear()
    outcome = meter.process(event(), offset=9)
    assert outcome.status is Status.REDELIVERED
    assert totals_of(totals, org_key("org-a", "2026-11")).events == 1
    assert seen  # the dedupe record is written again


def test_unknown_model_is_rejected_and_not_remembered() -> None:
    seen: dict = {}
    totals: dict = {}
    meter = Meter(PRICES, seen, totals)
    with pytest.raises(RejectedEvent) as caught:
        meter.process(event(model="claude-9"), offset=1)
    assert caught.value.reason is DeadLetterReason.UNKNOWN_MODEL
    assert not seen and not totals
    assert meter.process(event(), offset=2).status is Status.APPLIED


def test_event_before_first_price_version_is_no_price() -> None:
    with pytest.raises(RejectedEvent) as caught:
        Meter(PRICES, {}, {}).process(event(occurred_at_ms=iso_to_ms("2024-12-31T23:59:59Z")), 1)
    assert caught.value.reason is DeadLetterReason.NO_PRICE


def test_included_usage_counts_in_cost_but_not_extra_cost() -> None:
    totals: dict = {}
    Meter(PRICES, {}, totals).process(event(extra_usage=False), offset=1)
    total = totals_of(totals, org_key("org-a", "2026-11"))
    assert (total.cost_nano, total.extra_cost_nano) == (HAIKU_COST, 0)


def test_tier_follows_each_event() -> None:
    totals: dict = {}
    meter = Meter(PRICES, {}, totals)
    meter.process(event("e1"), offset=1)
    meter.process(event("e2", seat_tier=SeatTier.PREMIUM), offset=2)
    assert totals_of(totals, tier_key("org-a", "2026-11", "STANDARD")).events == 1
    assert totals_of(totals, tier_key("org-a", "2026-11", "PREMIUM")).events == 1
    assert totals_of(totals, user_key("org-a", "2026-11", "u1")).events == 2


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 15),
            st.integers(0, 3),
            st.integers(0, 50_000),
            st.integers(0, 5_000),
            st.booleans(),
        ),
        min_size=1,
        max_size=40,
    ),
    st.data(),
)
def test_totals_equal_sum_of_unique_line_items_under_redelivery(
    records: list, data: st.DataObject
) -> None:
    """Any stream with duplicates, replayed from any earlier offset, gives the same totals."""
    stream = [
        event(f"e{eid}", user_id=f"u{user}", usage=TokenUsage(inp, out, 0, 0), extra_usage=extra)
        for eid, user, inp, out, extra in records
    ]
    seen: dict = {}
    totals: dict = {}
    meter = Meter(PRICES, seen, totals)
    first_cost: dict[str, int] = {}
    for offset, item in enumerate(stream):
        outcome = meter.process(item, offset)
        if outcome.status is Status.APPLIED:
            assert outcome.priced is not None
            first_cost[item.event_id] = outcome.priced.price.cost_nano
    restart = data.draw(st.integers(0, len(stream) - 1))
    for offset in range(restart, len(stream)):  # at-least-once: replay a suffix
        meter.process(stream[offset], offset)
    org_total = totals_of(totals, org_key("org-a", "2026-11"))
    assert org_total.events == len(first_cost)
    assert org_total.cost_nano == sum(first_cost.values())
    user_sum = sum(
        totals_of(totals, user_key("org-a", "2026-11", f"u{u}")).cost_nano for u in range(4)
    )
    assert user_sum == org_total.cost_nano


def test_a_total_that_would_overflow_64_bits_is_refused_before_any_write() -> None:
    totals: dict = {}
    seen: dict = {}
    meter = Meter(PRICES, seen, totals)
    meter.process(event("e1"), offset=1)
    key = org_key("org-a", "2026-11")
    totals[key] = [*totals[key][:6], 2**63 - 10, 0]  # cost nearly at the limit
    before = dict(totals)
    with pytest.raises(RejectedEvent) as caught:
        meter.process(event("e2"), offset=2)
    assert caught.value.reason is DeadLetterReason.OUT_OF_RANGE
    assert totals == before and len(seen) == 1


@settings(max_examples=300, deadline=None)
@given(st.integers(-(2**63), 2**63 - 1))
def test_any_timestamp_is_metered_or_rejected_never_crashes(occurred_at: int) -> None:
    """A hostile occurred_at must become a dead letter, never an unexpected exception."""
    from core.validation import validate_usage

    record = {
        "event_id": "e",
        "occurred_at": occurred_at,
        "org_id": "o",
        "plan": "TEAM",
        "user_id": "u",
        "seat_tier": "STANDARD",
        "product": "CLAUDE",
        "model": "claude-3-5-haiku-latest",
        "input_tokens": 1,
        "output_tokens": 1,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "extra_usage": True,
    }
    with contextlib.suppress(RejectedEvent):
        Meter(PRICES, {}, {}).process(validate_usage(record, NOV), offset=0)
