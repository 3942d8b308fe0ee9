"""The test oracle: hand-computed SPEC §2 prices, SPEC §3 validity, SPEC §6 view contents."""

from __future__ import annotations

import ast
import datetime as dt
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobs.generate import GeneratorConfig, generate
from tests.oracle import (
    FAMILY_OF_MODEL,
    MEASURES,
    RATES_USD_PER_MTOK,
    TOKEN_FIELDS,
    Expected,
    as_utc,
    classify,
    expected_dead_letters,
    expected_views,
    price_usd,
)

NOW_MS = 1_757_000_000_000  # 2025-09-04T15:33:20Z
HOUR_MS = 3_600_000
JAN_2025_MS = 1_735_689_600_000
UTC = dt.UTC


def usage(**overrides: Any) -> dict[str, Any]:
    """A valid usage event; zero tokens unless overridden."""
    event: dict[str, Any] = {
        "event_id": "e-1",
        "occurred_at": NOW_MS - HOUR_MS,
        "org_id": "org-a",
        "plan": "TEAM",
        "user_id": "user-1",
        "seat_tier": "STANDARD",
        "product": "CLAUDE",
        "model": "claude-sonnet-4-20250514",
        "input_tokens": 0,
        "output_tokens": 0,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "extra_usage": False,
    }
    event.update(overrides)
    return event


# --- independence -------------------------------------------------------------------------


def test_oracle_imports_nothing_from_the_project() -> None:
    source = (Path(__file__).parents[1] / "oracle.py").read_text()
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= {"__future__", "datetime", "collections", "dataclasses", "decimal", "typing"}


# --- prices, computed by hand from the SPEC §2 table ----------------------------------------


def test_one_haiku_cache_read_token() -> None:
    tokens = dict.fromkeys(TOKEN_FIELDS, 0) | {"cache_read_input_tokens": 1}
    assert price_usd("claude-3-5-haiku-20241022", tokens) == (
        "haiku-3.5",
        False,
        Decimal("0.00000008"),
    )


def test_one_token_of_each_kind_on_opus_4() -> None:
    tokens = dict.fromkeys(TOKEN_FIELDS, 1)
    # 15 + 75 + 18.75 + 1.50 = 110.25 USD/MTok
    assert price_usd("claude-opus-4-0", tokens)[2] == Decimal("0.00011025")


def test_sonnet_4_above_200k_prices_every_kind_at_long_context_rates() -> None:
    tokens = {
        "input_tokens": 100_000,
        "output_tokens": 1_000,
        "cache_creation_input_tokens": 50_000,
        "cache_read_input_tokens": 50_001,  # prompt = 200,001
    }
    # 100,000 * 6 + 1,000 * 22.50 + 50,000 * 7.50 + 50,001 * 0.60 = 1,027,500.6 USD/MTok
    assert price_usd("claude-sonnet-4", tokens) == ("sonnet-4", True, Decimal("1.0275006"))


def test_sonnet_4_at_exactly_200k_is_standard() -> None:
    tokens = {
        "input_tokens": 100_000,
        "output_tokens": 1_000,
        "cache_creation_input_tokens": 50_000,
        "cache_read_input_tokens": 50_000,  # prompt = 200,000
    }
    # 100,000 * 3 + 1,000 * 15 + 50,000 * 3.75 + 50,000 * 0.30 = 517,500 USD/MTok
    assert price_usd("claude-sonnet-4-0", tokens) == ("sonnet-4", False, Decimal("0.5175"))


def test_output_alone_never_makes_long_context() -> None:
    tokens = dict.fromkeys(TOKEN_FIELDS, 0) | {"output_tokens": 300_000}
    assert price_usd("claude-sonnet-4-20250514", tokens) == ("sonnet-4", False, Decimal("4.5"))


def test_other_families_have_no_long_context_tier() -> None:
    tokens = dict.fromkeys(TOKEN_FIELDS, 0) | {"input_tokens": 300_000}
    assert price_usd("claude-opus-4-1", tokens) == ("opus-4.1", False, Decimal("4.5"))
    assert price_usd("claude-3-7-sonnet-latest", tokens) == ("sonnet-3.7", False, Decimal("0.9"))


def test_max_request_is_exact_at_nine_places() -> None:
    tokens = dict.fromkeys(TOKEN_FIELDS, 100_000_000)
    # (6 + 22.50 + 7.50 + 0.60) * 100 = 3,660 USD
    assert price_usd("claude-sonnet-4", tokens)[2] == Decimal("3660")
    assert price_usd("claude-3-opus-latest", tokens)[2] == Decimal("11025")


def test_aliases_resolve_to_the_spec_families() -> None:
    assert (
        set(FAMILY_OF_MODEL.values())
        == set(RATES_USD_PER_MTOK)
        == {
            "opus-4.1",
            "opus-4",
            "sonnet-4",
            "sonnet-3.7",
            "opus-3",
            "haiku-3.5",
        }
    )
    assert len(FAMILY_OF_MODEL) == 13
    assert FAMILY_OF_MODEL["claude-opus-4-1-20250805"] == "opus-4.1"
    assert FAMILY_OF_MODEL["claude-opus-4-20250514"] == "opus-4"
    assert FAMILY_OF_MODEL["claude-3-opus-20240229"] == "opus-3"


def test_an_unknown_model_has_no_price() -> None:
    with pytest.raises(KeyError):
        price_usd("claude-5-imaginary", dict.fromkeys(TOKEN_FIELDS, 1))


# --- validity -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({}, None),
        ({"event_id": ""}, "INVALID_FIELD"),
        ({"org_id": ""}, "INVALID_FIELD"),
        ({"user_id": ""}, "INVALID_FIELD"),
        ({"input_tokens": -1}, "INVALID_FIELD"),
        ({"cache_read_input_tokens": None}, "INVALID_FIELD"),
        ({"output_tokens": 100_000_000}, None),
        ({"output_tokens": 100_000_001}, "OUT_OF_RANGE"),
        ({"model": "claude-5-imaginary"}, "UNKNOWN_MODEL"),
        ({"occurred_at": JAN_2025_MS}, None),
        ({"occurred_at": JAN_2025_MS - 1}, "NO_PRICE"),
        ({"occurred_at": NOW_MS + HOUR_MS}, None),
        ({"occurred_at": NOW_MS + HOUR_MS + 1}, "FUTURE_TIMESTAMP"),
        ({"occurred_at": "2024-12-31T23:59:59.999Z"}, "NO_PRICE"),
        ({"occurred_at": dt.datetime(2025, 1, 1, tzinfo=UTC)}, None),
    ],
)
def test_validity_rules_and_their_boundaries(overrides: dict, reason: str | None) -> None:
    assert classify(usage(**overrides), NOW_MS) == reason


def test_a_missing_token_count_is_invalid() -> None:
    event = usage()
    del event["output_tokens"]
    assert classify(event, NOW_MS) == "INVALID_FIELD"


def test_an_optional_cost_ceiling_makes_expensive_requests_out_of_range() -> None:
    event = usage(output_tokens=1_000_000)  # 15 USD on Sonnet 4
    assert classify(event, NOW_MS, max_cost_usd=Decimal("15")) is None
    assert classify(event, NOW_MS, max_cost_usd=Decimal("14.99")) == "OUT_OF_RANGE"


# --- views --------------------------------------------------------------------------------


def test_priced_event_row() -> None:
    event = usage(
        occurred_at=1_743_465_599_999,  # 2025-03-31T23:59:59.999Z
        model="claude-3-5-haiku-latest",
        cache_read_input_tokens=1,
        extra_usage=True,
    )
    expected = expected_views([event], NOW_MS)
    row = expected.priced_events[("org-a", "e-1")]
    assert row["occurred_at"] == dt.datetime(2025, 3, 31, 23, 59, 59, 999_000, tzinfo=UTC)
    assert row["model_family"] == "haiku-3.5"
    assert row["long_context"] == 0
    assert row["extra_usage"] == 1
    assert row["cost_usd"] == Decimal("0.00000008")
    assert row["cost_usd"].as_tuple().exponent == -9  # Decimal(38, 9)
    month = dt.date(2025, 3, 1)
    hour = dt.datetime(2025, 3, 31, 23, tzinfo=UTC)
    measures = {
        "events": 1,
        "input_tokens": 0,
        "output_tokens": 0,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 1,
        "cost_usd": Decimal("0.00000008"),
        "extra_cost_usd": Decimal("0.00000008"),
    }
    assert expected.org_month == {(month, "org-a"): measures}
    assert expected.tier_month == {(month, "org-a", "STANDARD"): measures}
    assert expected.user_month == {(month, "org-a", "user-1"): measures}
    assert expected.usage_hourly == {(hour, "org-a", "user-1", "haiku-3.5"): measures}


def test_months_split_at_utc_midnight_of_the_first() -> None:
    events = [
        usage(event_id="march", occurred_at=1_743_465_599_999, input_tokens=100_000),
        usage(event_id="april", occurred_at=1_743_465_600_000, input_tokens=200_000),
    ]
    org_month = expected_views(events, NOW_MS).org_month
    assert org_month[(dt.date(2025, 3, 1), "org-a")]["cost_usd"] == Decimal("0.3")
    assert org_month[(dt.date(2025, 4, 1), "org-a")]["cost_usd"] == Decimal("0.6")


def test_extra_cost_counts_extra_usage_events_only() -> None:
    events = [
        usage(event_id="seat", input_tokens=100_000),
        usage(event_id="extra", input_tokens=200_000, extra_usage=True),
        usage(event_id="long", input_tokens=200_001, extra_usage=True),
    ]
    totals = next(iter(expected_views(events, NOW_MS).org_month.values()))
    # 0.3 + 0.6 + 200,001 * 6 / 1,000,000 (long context)
    assert totals["cost_usd"] == Decimal("2.100006")
    assert totals["extra_cost_usd"] == Decimal("1.800006")


def test_tier_totals_follow_the_tier_on_each_event() -> None:
    events = [
        usage(event_id="1", seat_tier="STANDARD", output_tokens=1_000_000),
        usage(event_id="2", seat_tier="PREMIUM", output_tokens=1_000_000),
    ]
    tier_month = expected_views(events, NOW_MS).tier_month
    assert {key[2]: row["cost_usd"] for key, row in tier_month.items()} == {
        "STANDARD": Decimal("15"),
        "PREMIUM": Decimal("15"),
    }


def test_dedupe_keeps_the_first_occurrence_per_org() -> None:
    first = usage(input_tokens=1_000_000)
    resend = usage(input_tokens=5_000_000)  # same identity, different content: ignored
    other_org = usage(org_id="org-b", input_tokens=1_000_000)  # same event_id, other org
    expected = expected_views([first, resend, dict(first), other_org], NOW_MS)
    assert expected.duplicates == 2
    assert set(expected.priced_events) == {("org-a", "e-1"), ("org-b", "e-1")}
    assert expected.priced_events[("org-a", "e-1")]["input_tokens"] == 1_000_000
    assert sum(row["events"] for row in expected.org_month.values()) == 2


def test_an_invalid_record_does_not_claim_its_identity() -> None:
    bad = usage(input_tokens=-1)
    good = usage(input_tokens=1)
    expected = expected_views([bad, good], NOW_MS)
    assert ("org-a", "e-1") in expected.priced_events
    assert expected.dead_letters == Counter({"INVALID_FIELD": 1})


def test_generated_stream_dead_letters_match_the_generator_tags() -> None:
    records = list(generate(GeneratorConfig(events=20_000, seed=11), NOW_MS))
    tags = Counter(str(r.expected_reason) for r in records if r.expected_reason is not None)
    assert expected_dead_letters(records, NOW_MS) == tags
    assert len(tags) == 7  # every reason the generator can produce
    expected = expected_views(records, NOW_MS)
    kinds = Counter(record.kind for record in records)
    assert expected.duplicates == kinds["duplicate"]
    assert len(expected.priced_events) == kinds["event"]


def test_plain_dicts_and_generated_records_give_the_same_views() -> None:
    records = list(generate(GeneratorConfig(events=2_000, seed=5, bad_fraction=0), NOW_MS))
    from_records = expected_views(records, NOW_MS)
    from_dicts = expected_views([record.event for record in records], NOW_MS)
    assert from_records == from_dicts


def test_raw_records_need_a_tag() -> None:
    class Raw:
        event = None
        expected_reason = None

    with pytest.raises(ValueError, match="neither"):
        expected_views([Raw()], NOW_MS)


def assert_totals_equal_line_items(expected: Expected) -> None:
    """Every aggregate view sums to the same measures as the priced events behind it."""
    lines = list(expected.priced_events.values())
    grand_total = {
        "events": len(lines),
        **{name: sum(row[name] for row in lines) for name in TOKEN_FIELDS},
        "cost_usd": sum((row["cost_usd"] for row in lines), Decimal(0)),
        "extra_cost_usd": sum(
            (row["cost_usd"] for row in lines if row["extra_usage"]),
            Decimal(0),
        ),
    }
    for view in (
        expected.org_month,
        expected.tier_month,
        expected.user_month,
        expected.usage_hourly,
    ):
        summed = {
            name: sum((row[name] for row in view.values()), Decimal(0) if "usd" in name else 0)
            for name in MEASURES
        }
        assert summed == grand_total
    # ... and each org-month row is the sum of its own events.
    for (month, org_id), totals in expected.org_month.items():
        own = [
            row
            for row in lines
            if row["org_id"] == org_id and row["occurred_at"].date().replace(day=1) == month
        ]
        assert totals["events"] == len(own)
        assert totals["cost_usd"] == sum((row["cost_usd"] for row in own), Decimal(0))


def test_totals_equal_the_sum_of_line_items_on_generated_load() -> None:
    records = list(generate(GeneratorConfig(events=5_000, seed=2), NOW_MS))
    assert_totals_equal_line_items(expected_views(records, NOW_MS))


token_counts = st.integers(0, 100_000_000)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "event_id": st.sampled_from(["a", "b", "c", "d", "e", "f"]),
                "org_id": st.sampled_from(["org-1", "org-2"]),
                "user_id": st.sampled_from(["u-1", "u-2", "u-3"]),
                "seat_tier": st.sampled_from(["STANDARD", "PREMIUM"]),
                "model": st.sampled_from(sorted(FAMILY_OF_MODEL)),
                "occurred_at": st.integers(JAN_2025_MS, NOW_MS),
                "input_tokens": token_counts,
                "output_tokens": token_counts,
                "cache_creation_input_tokens": token_counts,
                "cache_read_input_tokens": token_counts,
                "extra_usage": st.booleans(),
            }
        ),
        max_size=30,
    )
)
def test_totals_equal_the_sum_of_line_items_for_any_events(events: list[dict]) -> None:
    events = [usage(**event) for event in events]
    assert_totals_equal_line_items(expected_views(events, NOW_MS))


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from(sorted(FAMILY_OF_MODEL)),
    st.fixed_dictionaries({name: token_counts for name in TOKEN_FIELDS}),
    st.fixed_dictionaries({name: token_counts for name in TOKEN_FIELDS}),
)
def test_standard_tier_pricing_is_additive(model: str, first: dict, second: dict) -> None:
    def cost(tokens: dict) -> Decimal:
        return price_usd(model, tokens)[2]

    both = {name: first[name] + second[name] for name in TOKEN_FIELDS}
    if any(price_usd(model, tokens)[1] for tokens in (first, second, both)):
        return  # the long-context switch is deliberately not additive
    assert cost(both) == cost(first) + cost(second)


def test_as_utc_normalises_naive_and_aware_datetimes() -> None:
    naive = dt.datetime(2025, 5, 1, 12)
    aware = dt.datetime(2025, 5, 1, 14, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert as_utc(naive) == as_utc(aware) == dt.datetime(2025, 5, 1, 12, tzinfo=UTC)
    assert as_utc(aware).tzinfo == UTC
