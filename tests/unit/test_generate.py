"""The synthetic load generator: deterministic, realistic in mix, honest about bad records."""

from __future__ import annotations

import itertools
import statistics
import uuid
from collections import Counter, defaultdict

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.errors import ConfigError, DeadLetterReason
from jobs.generate import (
    DAY_MS,
    FIRST_PRICED_MS,
    OUT_OF_RANGE_TOKENS,
    UNKNOWN_SCHEMA_ID,
    USAGE_SCHEMA_ID,
    Generated,
    GeneratorConfig,
    _org_sizes,
    _uuid4,
    event_window,
    generate,
)
from tests.oracle import FAMILY_OF_MODEL, classify

NOW_MS = 1_757_000_000_000  # 2025-09-04T15:33:20Z
HOUR_MS = 3_600_000

EVENT_FIELDS = {
    "event_id",
    "occurred_at",
    "org_id",
    "plan",
    "user_id",
    "seat_tier",
    "product",
    "model",
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "extra_usage",
}
TOKEN_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)


def prompt(event: dict) -> int:
    return (
        event["input_tokens"]
        + event["cache_creation_input_tokens"]
        + event["cache_read_input_tokens"]
    )


@pytest.fixture(scope="module")
def stream() -> list[Generated]:
    """A stream large enough for proportions to settle (shared: generation is the slow part)."""
    return list(generate(GeneratorConfig(events=40_000, seed=7), NOW_MS))


@pytest.fixture(scope="module")
def valid_events(stream: list[Generated]) -> list[dict]:
    return [record.event for record in stream if record.kind == "event"]


# --- determinism and shape --------------------------------------------------------------------


def test_same_config_and_clock_give_the_same_stream() -> None:
    config = GeneratorConfig(events=2_000, seed=3)
    assert list(generate(config, NOW_MS)) == list(generate(config, NOW_MS))


def test_another_seed_gives_another_stream() -> None:
    first = list(generate(GeneratorConfig(events=200, seed=1), NOW_MS))
    second = list(generate(GeneratorConfig(events=200, seed=2), NOW_MS))
    assert first != second


def test_yields_exactly_the_requested_number_of_records(stream: list[Generated]) -> None:
    assert len(stream) == 40_000


def test_events_have_exactly_the_spec_fields(stream: list[Generated]) -> None:
    for record in stream:
        if record.event is not None:
            assert set(record.event) == EVENT_FIELDS
            assert type(record.event["occurred_at"]) is int
            assert type(record.event["extra_usage"]) is bool
            assert record.raw is None
        else:
            assert record.kind == "bad_bytes"
            assert isinstance(record.raw, bytes)


def test_valid_events_are_valid_by_the_independent_rules(valid_events: list[dict]) -> None:
    for event in valid_events:
        assert classify(event, NOW_MS) is None, event


def test_key_is_the_org_id(stream: list[Generated]) -> None:
    org_ids = {record.event["org_id"] for record in stream if record.kind == "event"}
    for record in stream:
        if record.event is not None:
            assert record.key == record.event["org_id"]
        else:
            assert record.key in org_ids


def test_event_ids_are_unique_uuid4_among_non_duplicates(stream: list[Generated]) -> None:
    ids = [
        record.event["event_id"]
        for record in stream
        if record.kind in ("event", "bad_event") and record.event["event_id"]
    ]
    assert len(ids) == len(set(ids))
    assert all(uuid.UUID(event_id).version == 4 for event_id in ids[:500])


def test_uuid4_helper_matches_the_standard_library() -> None:
    for bits in (0, (1 << 128) - 1, 0x0123456789ABCDEF0123456789ABCDEF):
        assert _uuid4(bits) == str(uuid.UUID(int=bits, version=4))


# --- time ---------------------------------------------------------------------------------


def test_default_window_is_the_three_days_before_now() -> None:
    assert event_window(GeneratorConfig(events=1), NOW_MS) == (NOW_MS - 3 * DAY_MS, NOW_MS)


def test_default_window_never_starts_before_the_first_price() -> None:
    now = FIRST_PRICED_MS + DAY_MS
    assert event_window(GeneratorConfig(events=1), now) == (FIRST_PRICED_MS, now)


def test_valid_events_are_inside_the_window_and_never_in_the_future(
    valid_events: list[dict],
) -> None:
    start, end = event_window(GeneratorConfig(events=1), NOW_MS)
    times = [event["occurred_at"] for event in valid_events]
    assert start <= min(times)
    assert max(times) <= end <= NOW_MS
    # Spread over the whole window, not bunched at one end.
    assert min(times) < start + 2 * HOUR_MS
    assert max(times) > end - 2 * HOUR_MS


def test_stream_is_roughly_in_time_order(valid_events: list[dict]) -> None:
    times = [event["occurred_at"] for event in valid_events]
    worst_step_back = max(before - after for before, after in itertools.pairwise(times))
    assert worst_step_back <= 10_000  # jitter only


def test_explicit_window_is_respected() -> None:
    start = NOW_MS - 40 * DAY_MS
    end = NOW_MS - 30 * DAY_MS
    config = GeneratorConfig(events=3_000, start_ms=start, end_ms=end, bad_fraction=0)
    times = [record.event["occurred_at"] for record in generate(config, NOW_MS)]
    assert start <= min(times) and max(times) <= end


def test_daytime_is_busier_than_night(valid_events: list[dict]) -> None:
    hours = Counter((event["occurred_at"] // HOUR_MS) % 24 for event in valid_events)
    assert hours[16] > 1.5 * hours[3]


def test_a_window_reaching_past_now_is_refused() -> None:
    config = GeneratorConfig(events=10, end_ms=NOW_MS + 1)
    with pytest.raises(ConfigError, match="future"):
        generate(config, NOW_MS)


def test_a_clock_before_2025_is_refused() -> None:
    with pytest.raises(ConfigError):
        generate(GeneratorConfig(events=10), FIRST_PRICED_MS - 1)


# --- the mix ------------------------------------------------------------------------------


def test_duplicate_and_bad_fractions(stream: list[Generated]) -> None:
    kinds = Counter(record.kind for record in stream)
    total = len(stream)
    assert 0.0075 < kinds["duplicate"] / total < 0.0125
    assert 0.0035 < (kinds["bad_event"] + kinds["bad_bytes"]) / total < 0.0065
    assert kinds["bad_bytes"] > 0 and kinds["bad_event"] > kinds["bad_bytes"]


def test_duplicates_are_exact_resends_of_earlier_events(stream: list[Generated]) -> None:
    seen: dict[tuple[str, str], dict] = {}
    duplicates = 0
    for record in stream:
        if record.kind == "event":
            seen[(record.event["org_id"], record.event["event_id"])] = record.event
        elif record.kind == "duplicate":
            duplicates += 1
            identity = (record.event["org_id"], record.event["event_id"])
            assert seen[identity] == record.event  # earlier in the stream, same content
            assert record.expected_reason is None
    assert duplicates > 0


def test_fractions_of_zero_give_only_fresh_events() -> None:
    config = GeneratorConfig(events=2_000, duplicate_fraction=0, bad_fraction=0)
    assert {record.kind for record in generate(config, NOW_MS)} == {"event"}


def test_all_bad_gives_only_bad_records() -> None:
    config = GeneratorConfig(events=500, duplicate_fraction=0, bad_fraction=1)
    kinds = {record.kind for record in generate(config, NOW_MS)}
    assert kinds == {"bad_event", "bad_bytes"}


def test_plans_tiers_products_and_models_all_appear(valid_events: list[dict]) -> None:
    assert {event["plan"] for event in valid_events} == {"TEAM", "ENTERPRISE"}
    assert {event["seat_tier"] for event in valid_events} == {"STANDARD", "PREMIUM"}
    assert {event["product"] for event in valid_events} == {"CLAUDE", "CLAUDE_CODE"}
    assert {event["model"] for event in valid_events} == set(FAMILY_OF_MODEL)


def test_sonnet_4_is_the_most_used_family(valid_events: list[dict]) -> None:
    families = Counter(FAMILY_OF_MODEL[event["model"]] for event in valid_events)
    assert families.most_common(1)[0][0] == "sonnet-4"
    assert families["sonnet-4"] > 0.4 * len(valid_events)


def test_about_three_percent_of_sonnet_4_requests_are_long_context(
    valid_events: list[dict],
) -> None:
    sonnet_4 = [e for e in valid_events if FAMILY_OF_MODEL[e["model"]] == "sonnet-4"]
    long_context = [e for e in sonnet_4 if prompt(e) > 200_000]
    assert 0.02 < len(long_context) / len(sonnet_4) < 0.04
    others = [e for e in valid_events if FAMILY_OF_MODEL[e["model"]] != "sonnet-4"]
    assert all(prompt(e) <= 200_000 for e in others)


def test_extra_usage_fraction(valid_events: list[dict]) -> None:
    share = sum(event["extra_usage"] for event in valid_events) / len(valid_events)
    assert 0.28 < share < 0.32


def test_token_counts_are_realistic(valid_events: list[dict]) -> None:
    for name in TOKEN_FIELDS:
        assert all(event[name] >= 0 for event in valid_events)
    inputs = [event["input_tokens"] for event in valid_events]
    outputs = [event["output_tokens"] for event in valid_events]
    assert 300 < statistics.median(inputs) < 5_000
    assert 200 < statistics.median(outputs) < 3_000
    cached = sum(event["cache_read_input_tokens"] > 0 for event in valid_events)
    assert cached > 0.5 * len(valid_events)  # cache use is common


def test_claude_code_reads_more_cache_and_writes_more_output(valid_events: list[dict]) -> None:
    def median_of(product: str, name: str) -> float:
        return statistics.median(e[name] for e in valid_events if e["product"] == product)

    for name in ("cache_read_input_tokens", "output_tokens"):
        assert median_of("CLAUDE_CODE", name) > 1.5 * median_of("CLAUDE", name)


def test_orgs_and_users_are_long_tailed(valid_events: list[dict]) -> None:
    members: dict[str, set[str]] = defaultdict(set)
    for event in valid_events:
        members[event["org_id"]].add(event["user_id"])
    sizes = sorted((len(users) for users in members.values()), reverse=True)
    assert len(sizes) == 50
    assert sizes[0] > 10 * sizes[len(sizes) // 2]  # a few big orgs, many small ones
    activity = sorted(Counter(event["user_id"] for event in valid_events).values(), reverse=True)
    top_decile = sum(activity[: len(activity) // 10])
    assert top_decile > 0.25 * sum(activity)  # a minority of users make much of the usage


def test_org_sizes_sum_to_users_and_give_everyone_a_member() -> None:
    sizes = _org_sizes(50, 2_000)
    assert sum(sizes) == 2_000
    assert min(sizes) >= 1
    assert sizes == sorted(sizes, reverse=True)
    assert _org_sizes(3, 3) == [1, 1, 1]


def test_org_ids_and_plans_are_fixed(valid_events: list[dict]) -> None:
    plans: dict[str, set[str]] = defaultdict(set)
    orgs_of_user: dict[str, set[str]] = defaultdict(set)
    for event in valid_events:
        plans[event["org_id"]].add(event["plan"])
        orgs_of_user[event["user_id"]].add(event["org_id"])
        assert event["org_id"].startswith("org-")
    assert all(len(plan) == 1 for plan in plans.values())
    assert all(len(orgs) == 1 for orgs in orgs_of_user.values())


def test_seat_tiers_are_stable_and_change_only_rarely() -> None:
    def tiers_per_user(fraction: float) -> dict[str, set[str]]:
        config = GeneratorConfig(events=5_000, tier_change_fraction=fraction, bad_fraction=0)
        tiers: dict[str, set[str]] = defaultdict(set)
        for record in generate(config, NOW_MS):
            tiers[record.event["user_id"]].add(record.event["seat_tier"])
        return tiers

    assert all(len(tiers) == 1 for tiers in tiers_per_user(0.0).values())
    changed = [user for user, tiers in tiers_per_user(0.01).items() if len(tiers) == 2]
    assert 0 < len(changed) < 100


# --- bad records --------------------------------------------------------------------------


def test_every_defect_appears_with_its_reason(stream: list[Generated]) -> None:
    defects = {
        record.defect: record.expected_reason
        for record in stream
        if record.kind in ("bad_event", "bad_bytes")
    }
    assert defects == {
        "negative_token_count": DeadLetterReason.INVALID_FIELD,
        "null_token_count": DeadLetterReason.INVALID_FIELD,
        "empty_event_id": DeadLetterReason.INVALID_FIELD,
        "empty_org_id": DeadLetterReason.INVALID_FIELD,
        "empty_user_id": DeadLetterReason.INVALID_FIELD,
        "unknown_model": DeadLetterReason.UNKNOWN_MODEL,
        "before_first_price": DeadLetterReason.NO_PRICE,
        "future_timestamp": DeadLetterReason.FUTURE_TIMESTAMP,
        "token_count_out_of_range": DeadLetterReason.OUT_OF_RANGE,
        "garbage_bytes": DeadLetterReason.UNDECODABLE,
        "unknown_schema_id": DeadLetterReason.UNKNOWN_SCHEMA,
        "truncated_body": DeadLetterReason.UNDECODABLE,
    }


def test_bad_events_get_their_tagged_reason_from_the_independent_rules(
    stream: list[Generated],
) -> None:
    for record in stream:
        if record.kind == "bad_event":
            assert classify(record.event, NOW_MS) == record.expected_reason, record
            # Still encodable: only nullable token counts may be None.
            assert all(record.event[name] is not None for name in EVENT_FIELDS - set(TOKEN_FIELDS))


def test_bad_events_have_exactly_one_defect(stream: list[Generated]) -> None:
    for record in stream:
        if record.kind != "bad_event":
            continue
        event = record.event
        if record.defect == "future_timestamp":
            # Two hours of margin past the one the worker allows: still future an hour later.
            assert event["occurred_at"] > NOW_MS + 2 * HOUR_MS
            assert classify(event, NOW_MS + HOUR_MS) == "FUTURE_TIMESTAMP"
        elif record.defect == "before_first_price":
            assert event["occurred_at"] < FIRST_PRICED_MS
        elif record.defect == "unknown_model":
            assert event["model"] not in FAMILY_OF_MODEL
        elif record.defect == "token_count_out_of_range":
            assert OUT_OF_RANGE_TOKENS in [event[name] for name in TOKEN_FIELDS]
        elif record.defect == "null_token_count":
            assert [event[name] for name in TOKEN_FIELDS].count(None) == 1


def test_bad_bytes_are_shaped_as_their_defect_says(stream: list[Generated]) -> None:
    for record in stream:
        if record.kind != "bad_bytes":
            continue
        raw = record.raw
        assert raw
        if record.defect == "garbage_bytes":
            assert raw[0] != 0  # never the Confluent magic byte
        elif record.defect == "unknown_schema_id":
            assert raw[0] == 0
            assert int.from_bytes(raw[1:5], "big") == UNKNOWN_SCHEMA_ID
            assert len(raw) > 5
        else:
            assert record.defect == "truncated_body"
            assert raw[0] == 0
            assert int.from_bytes(raw[1:5], "big") == USAGE_SCHEMA_ID
            assert 5 < len(raw) <= 5 + 12  # too short for any 13-field record


# --- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"events": 0}, "events"),
        ({"events": -5}, "events"),
        ({"orgs": 0}, "orgs"),
        ({"orgs": 10, "users": 9}, "users"),
        ({"duplicate_fraction": -0.1}, "duplicate_fraction"),
        ({"bad_fraction": 1.5}, "bad_fraction"),
        ({"extra_usage_fraction": float("nan")}, "extra_usage_fraction"),
        ({"long_context_fraction": 2}, "long_context_fraction"),
        ({"duplicate_fraction": 0.6, "bad_fraction": 0.6}, "exceed"),
        ({"start_ms": FIRST_PRICED_MS - 1}, "start_ms"),
        ({"start_ms": NOW_MS, "end_ms": NOW_MS - 1}, "after end_ms"),
    ],
)
def test_bad_config_is_a_one_line_config_error(overrides: dict, message: str) -> None:
    arguments = {"events": 10, **overrides}
    with pytest.raises(ConfigError, match=message) as raised:
        GeneratorConfig(**arguments)
    assert "\n" not in str(raised.value)


def test_config_error_lists_every_problem() -> None:
    with pytest.raises(ConfigError) as raised:
        GeneratorConfig(events=0, orgs=0, bad_fraction=2)
    assert all(word in str(raised.value) for word in ("events", "orgs", "bad_fraction"))


# --- properties over many small configurations ----------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=st.integers(1, 300),
    orgs=st.integers(1, 6),
    extra_users=st.integers(0, 30),
    seed=st.integers(0, 2**32),
    duplicate_fraction=st.floats(0, 0.3),
    bad_fraction=st.floats(0, 0.3),
    window_ms=st.integers(0, 40 * DAY_MS),
)
def test_invariants_hold_for_any_configuration(
    events: int,
    orgs: int,
    extra_users: int,
    seed: int,
    duplicate_fraction: float,
    bad_fraction: float,
    window_ms: int,
) -> None:
    config = GeneratorConfig(
        events=events,
        orgs=orgs,
        users=orgs + extra_users,
        seed=seed,
        start_ms=NOW_MS - window_ms,
        duplicate_fraction=duplicate_fraction,
        bad_fraction=bad_fraction,
    )
    records = list(generate(config, NOW_MS))
    assert len(records) == events
    fresh_ids: set[str] = set()
    for record in records:
        if record.kind in ("event", "duplicate"):
            assert classify(record.event, NOW_MS) is None
            assert NOW_MS - window_ms <= record.event["occurred_at"] <= NOW_MS
        elif record.kind == "bad_event":
            assert classify(record.event, NOW_MS) == record.expected_reason
        else:
            assert record.expected_reason in (
                DeadLetterReason.UNDECODABLE,
                DeadLetterReason.UNKNOWN_SCHEMA,
            )
        if record.kind == "event":
            assert record.event["event_id"] not in fresh_ids
            fresh_ids.add(record.event["event_id"])
