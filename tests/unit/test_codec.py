"""The Confluent wire-format codec (streams/codec.py): golden bytes, round trips, invalid
input (always RejectedEvent with the right reason), evolution, and interoperability with
confluent-kafka's own Avro serializers through an in-process registry double.

Regenerate the golden files only for a deliberate change of an encoding:
``.venv/bin/python -m tests.unit.test_codec --update-golden``.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.errors import ConfigError, DeadLetterReason, MeteringError, RejectedEvent
from core.usage import Plan, Price, PricedEvent, Product, SeatTier, TokenUsage, UsageEvent
from streams.codec import (
    AVRO_DIR,
    MAX_DEAD_LETTER_ORIGINAL_BYTES,
    AvroSchema,
    Codec,
    Codecs,
    EncodeError,
    PinnedSchemas,
    PinnedVersion,
    RegistryError,
    RegistrySchemas,
    Subject,
    dead_letter_record,
    parse_header,
    priced_to_record,
    record_to_priced,
)
from tests.registry_double import RegistryDouble

GOLDEN_DIR = Path(__file__).parent / "golden"
JUNE_2025_MS = 1_748_736_000_000  # 2025-06-01T00:00:00Z

USAGE: dict[str, Any] = {
    "event_id": "evt-0001",
    "occurred_at": JUNE_2025_MS + 123,
    "org_id": "org-acme",
    "plan": "ENTERPRISE",
    "user_id": "user-ada",
    "seat_tier": "PREMIUM",
    "product": "CLAUDE_CODE",
    "model": "claude-sonnet-4-20250514",
    "input_tokens": 150_000,
    "output_tokens": 2_048,
    "cache_creation_input_tokens": 40_000,
    "cache_read_input_tokens": 20_000,
    "extra_usage": True,
}

PRICED_EVENT = PricedEvent(
    event=UsageEvent(
        event_id="evt-0001",
        occurred_at_ms=JUNE_2025_MS + 123,
        org_id="org-acme",
        plan=Plan.ENTERPRISE,
        user_id="user-ada",
        seat_tier=SeatTier.PREMIUM,
        product=Product.CLAUDE_CODE,
        model="claude-sonnet-4-20250514",
        usage=TokenUsage(150_000, 2_048, 40_000, 20_000),
        extra_usage=True,
    ),
    price=Price(
        model_family="Claude Sonnet 4",
        pricing_version="2025-01-01",
        long_context=True,
        cost_nano=1_278_080_000,
    ),
    revision=2,
)
PRICED = priced_to_record(PRICED_EVENT, 3, 12_345)

PAUSE: dict[str, Any] = {
    "event_id": "pause-org-acme-user-ada-evt-0001",
    "action": "PAUSE",
    "scope": "USER",
    "reason": "CAP_REACHED",
    "org_id": "org-acme",
    "user_id": "user-ada",
    "period": "2025-06",
    "spend_nano_usd": 51_000_000_000,
    "limit_nano_usd": 50_000_000_000,
    "limit_source": "SEAT_TIER",
    "trigger_id": "evt-0001",
    "emitted_at": JUNE_2025_MS + 500,
    "amount_nano_usd": None,
    "balance_nano_usd": None,
}

RELOAD: dict[str, Any] = {
    **PAUSE,
    "event_id": "reload-org-team-1",
    "action": "RELOAD_REQUESTED",
    "scope": "ORG",
    "reason": "BALANCE_LOW",
    "org_id": "org-team",
    "user_id": None,
    "spend_nano_usd": 95_000_000_000,
    "limit_nano_usd": 100_000_000_000,
    "limit_source": "BALANCE",
    "amount_nano_usd": 50_000_000_000,
    "balance_nano_usd": 5_000_000_000,
}


def control(command: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "message_id": "ctl-0001",
        "org_id": "org-acme",
        "issued_at": JUNE_2025_MS + 900,
        "command": command,
    }


CONTROL = control(
    (
        "SetCap",
        {
            "scope": "SEAT_TIER",
            "user_id": None,
            "seat_tier": "PREMIUM",
            "limit_nano_usd": 50 * 10**9,
        },
    )
)

REPLAY_LOG: dict[str, Any] = {
    "replay_id": "replay-20261201T000000Z-0123abcd",
    "finished_at": 1_764_547_200_000,
    "since": 1_759_276_800_000,
    "until": None,
    "price_versions": ["2025-01-01", "2026-10-01"],
    "versions_used": ["2026-10-01"],
    "records_scanned": 120_000,
    "events_in_range": 80_000,
    "events_repriced": 12_345,
    "events_unpriceable": 0,
    "orgs": 17,
    "old_cost_nano": 987_654_321_000,
    "new_cost_nano": 1_234_567_890_000,
}

DEAD_LETTER = dead_letter_record(
    reason=DeadLetterReason.UNKNOWN_MODEL,
    detail="model 'claude-9' is not in price table version 2025-01-01",
    original=b"\x00\x00\x00\x00\x01 not really avro",
    key=b"org-acme",
    source_topic="usage.events",
    source_partition=5,
    source_offset=42,
    dead_lettered_at_ms=JUNE_2025_MS + 1_000,
)

# golden file name -> (codec attribute, record, pinned id)
GOLDEN: dict[str, tuple[str, dict[str, Any], int]] = {
    "usage_event": ("usage", USAGE, 1),
    "priced_event": ("priced", PRICED, 2),
    "pause_event": ("pause", PAUSE, 3),
    "billing_event": ("billing", RELOAD, 4),
    "control_message": ("control", CONTROL, 7),
    "dead_letter": ("dead_letter", DEAD_LETTER, 6),
    "replay_log": ("replay", REPLAY_LOG, 8),
}
CODEC_NAMES = ("usage", "priced", "pause", "billing", "control", "dead_letter", "replay")


@pytest.fixture(scope="module")
def codecs() -> Codecs:
    return Codecs.pinned()


def rejected(call: Callable[[], object]) -> RejectedEvent:
    with pytest.raises(RejectedEvent) as info:
        call()
    return info.value


def golden_bytes(name: str) -> bytes:
    return (GOLDEN_DIR / f"{name}.bin").read_bytes()


# -- golden bytes ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", GOLDEN)
def test_golden_bytes(codecs: Codecs, name: str) -> None:
    attr, record, pinned_id = GOLDEN[name]
    codec: Codec = getattr(codecs, attr)
    data = codec.encode(record)
    assert data == golden_bytes(name), f"{name}: the encoding changed (see module docstring)"
    assert data[:5] == b"\x00" + pinned_id.to_bytes(4, "big")
    assert codec.decode(golden_bytes(name)) == record


def test_usage_event_header_and_first_field_spelled_out(codecs: Codecs) -> None:
    data = golden_bytes("usage_event")
    assert data[0] == 0x00  # magic byte
    assert data[1:5] == b"\x00\x00\x00\x01"  # schema id 1, big-endian
    assert parse_header(data) == 1
    # event_id: zig-zag varint length (8 -> 0x10), then UTF-8.
    assert data[5:14] == b"\x10evt-0001"


# -- round trips --------------------------------------------------------------------------------

ROUND_TRIPS: list[tuple[str, dict[str, Any]]] = [
    ("usage", USAGE),
    ("usage", {**USAGE, "input_tokens": None, "cache_read_input_tokens": None}),
    ("usage", {**USAGE, "output_tokens": -1, "event_id": "", "model": "no-such-model"}),
    ("usage", {**USAGE, "input_tokens": 2**63 - 1, "output_tokens": -(2**63)}),
    ("priced", PRICED),
    ("priced", {**PRICED, "revision": 0, "long_context": False, "source_partition": 2**31 - 1}),
    ("pause", PAUSE),
    ("pause", {**PAUSE, "action": "RESUME", "reason": "PERIOD_RESET", "limit_nano_usd": None}),
    ("pause", {**PAUSE, "scope": "ORG", "user_id": None, "limit_source": None}),
    ("billing", RELOAD),
    ("control", CONTROL),
    (
        "control",
        control(
            ("SetCap", {"scope": "USER", "user_id": "u", "seat_tier": None, "limit_nano_usd": None})
        ),
    ),
    ("control", control(("SetEnabled", {"user_id": None, "enabled": False}))),
    ("control", control(("SetEnabled", {"user_id": "user-ada", "enabled": True}))),
    ("control", control(("TopUp", {"purchase_id": "pur-1", "amount_nano_usd": 10**11}))),
    (
        "control",
        control(
            (
                "SetAutoReload",
                {"enabled": True, "threshold_nano_usd": 10**10, "amount_nano_usd": 5 * 10**10},
            )
        ),
    ),
    (
        "control",
        control(
            (
                "SetAutoReload",
                {"enabled": False, "threshold_nano_usd": None, "amount_nano_usd": None},
            )
        ),
    ),
    ("control", control(("PeriodTick", {"wall_clock_ms": JUNE_2025_MS + 3_600_000}))),
    ("dead_letter", DEAD_LETTER),
    ("dead_letter", {**DEAD_LETTER, "key": None, "original": b"", "original_size": 0}),
]


@pytest.mark.parametrize(("attr", "record"), ROUND_TRIPS)
def test_round_trip(codecs: Codecs, attr: str, record: dict[str, Any]) -> None:
    codec: Codec = getattr(codecs, attr)
    assert codec.decode(codec.encode(record)) == record


def test_fields_with_defaults_may_be_omitted(codecs: Codecs) -> None:
    sparse = {k: v for k, v in USAGE.items() if k not in ("input_tokens", "output_tokens")}
    assert codecs.usage.decode(codecs.usage.encode(sparse)) == {
        **USAGE,
        "input_tokens": None,
        "output_tokens": None,
    }
    command = control(("SetCap", {"scope": "ORG"}))
    decoded = codecs.control.decode(codecs.control.encode(command))
    assert decoded["command"] == (
        "SetCap",
        {"scope": "ORG", "user_id": None, "seat_tier": None, "limit_nano_usd": None},
    )


def test_enum_members_encode_as_their_symbols(codecs: Codecs) -> None:
    record = {**USAGE, "plan": Plan.TEAM, "seat_tier": SeatTier.STANDARD, "product": Product.CLAUDE}
    decoded = codecs.usage.decode(codecs.usage.encode(record))
    assert (decoded["plan"], decoded["seat_tier"], decoded["product"]) == (
        "TEAM",
        "STANDARD",
        "CLAUDE",
    )


def test_timestamps_are_int_epoch_milliseconds_both_ways(codecs: Codecs) -> None:
    decoded = codecs.usage.decode(codecs.usage.encode(USAGE))
    assert type(decoded["occurred_at"]) is int
    assert decoded["occurred_at"] == JUNE_2025_MS + 123
    tick = codecs.control.decode(
        codecs.control.encode(control(("PeriodTick", {"wall_clock_ms": 7})))
    )
    assert type(tick["issued_at"]) is int
    assert tick["command"][1]["wall_clock_ms"] == 7
    assert type(codecs.pause.decode(codecs.pause.encode(PAUSE))["emitted_at"]) is int
    # One representation only: a datetime is refused rather than silently converted.
    when = dt.datetime(2025, 6, 1, tzinfo=dt.UTC)
    with pytest.raises(EncodeError, match="occurred_at"):
        codecs.usage.encode({**USAGE, "occurred_at": when})


usage_records = st.fixed_dictionaries(
    {
        "event_id": st.text(max_size=40),
        "occurred_at": st.integers(min_value=-(2**63), max_value=2**63 - 1),
        "org_id": st.text(max_size=20),
        "plan": st.sampled_from([p.value for p in Plan]),
        "user_id": st.text(max_size=20),
        "seat_tier": st.sampled_from([t.value for t in SeatTier]),
        "product": st.sampled_from([p.value for p in Product]),
        "model": st.text(max_size=40),
        "input_tokens": st.none() | st.integers(min_value=-(2**63), max_value=2**63 - 1),
        "output_tokens": st.none() | st.integers(min_value=0, max_value=2**40),
        "cache_creation_input_tokens": st.none() | st.integers(min_value=0, max_value=2**40),
        "cache_read_input_tokens": st.none() | st.integers(min_value=0, max_value=2**40),
        "extra_usage": st.booleans(),
    }
)


@given(record=usage_records)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_schema_valid_usage_event_round_trips(codecs: Codecs, record: dict[str, Any]) -> None:
    assert codecs.usage.decode(codecs.usage.encode(record)) == record


# -- priced and dead-letter helpers -------------------------------------------------------------


def test_priced_event_round_trips_through_its_topic(codecs: Codecs) -> None:
    record = priced_to_record(PRICED_EVENT, 3, 12_345)
    assert record_to_priced(codecs.priced.decode(codecs.priced.encode(record))) == (
        PRICED_EVENT,
        3,
        12_345,
    )


def test_dead_letter_keeps_a_truncated_copy_and_the_hash_of_the_whole() -> None:
    original = bytes(range(256)) * (MAX_DEAD_LETTER_ORIGINAL_BYTES // 256 + 10)
    record = dead_letter_record(
        reason=DeadLetterReason.UNDECODABLE,
        detail="x",
        original=original,
        key=None,
        source_topic="usage.events",
        source_partition=0,
        source_offset=1,
        dead_lettered_at_ms=2,
    )
    assert record["truncated"] is True
    assert record["original"] == original[:MAX_DEAD_LETTER_ORIGINAL_BYTES]
    assert record["original_size"] == len(original)
    assert record["original_sha256"] == hashlib.sha256(original).hexdigest()
    assert DEAD_LETTER["truncated"] is False
    assert DEAD_LETTER["original_size"] == len(DEAD_LETTER["original"])


def test_a_tombstone_dead_letters_as_zero_bytes(codecs: Codecs) -> None:
    record = dead_letter_record(
        reason=DeadLetterReason.UNDECODABLE,
        detail="message has no value (tombstone)",
        original=None,
        key=b"org",
        source_topic="usage.events",
        source_partition=0,
        source_offset=1,
        dead_lettered_at_ms=2,
    )
    assert (record["original"], record["original_size"]) == (b"", 0)
    assert record["original_sha256"] == hashlib.sha256(b"").hexdigest()
    assert codecs.dead_letter.decode(codecs.dead_letter.encode(record)) == record


# -- invalid records are refused with the field named -------------------------------------------

ENCODE_ERRORS: list[tuple[str, dict[str, Any], str]] = [
    ("usage", {**USAGE, "input_tokens": "12"}, "field input_tokens: expected null or long"),
    ("usage", {**USAGE, "input_tokens": 2**63}, "field input_tokens"),
    ("usage", {**USAGE, "input_tokens": 1.0}, "field input_tokens"),
    ("usage", {**USAGE, "plan": "FREE"}, "field plan: expected Plan (TEAM|ENTERPRISE)"),
    ("usage", {**USAGE, "extra_usage": 1}, "field extra_usage: expected boolean"),
    ("usage", {**USAGE, "occurred_at": 1.5}, "field occurred_at: expected long"),
    ("usage", {**USAGE, "event_id": None}, "field event_id: expected string"),
    ("usage", {k: v for k, v in USAGE.items() if k != "model"}, "field model: missing"),
    ("usage", {**USAGE, "colour": "red"}, "unknown field(s) colour"),
    ("priced", {**PRICED, "source_partition": 2**31}, "field source_partition"),
    ("priced", {**PRICED, "input_tokens": None}, "field input_tokens: expected long"),
    ("pause", {**PAUSE, "reason": "BORED"}, "field reason"),
    ("pause", {**PAUSE, "limit_source": "TEAM"}, "field limit_source"),
    ("control", control(("SetCap", {"scope": "ORG", "limit_nano_usd": "5"})), "command.SetCap"),
    ("control", control(("Reboot", {})), "unknown record name 'Reboot'"),
    ("control", {**CONTROL, "command": {"scope": "ORG"}}, "(record name, fields)"),
    ("control", control(("TopUp", {"purchase_id": "p"})), "command.TopUp.amount_nano_usd"),
    ("dead_letter", {**DEAD_LETTER, "original": "text"}, "field original: expected bytes"),
]


@pytest.mark.parametrize(("attr", "record", "message"), ENCODE_ERRORS)
def test_invalid_records_raise_encode_error_naming_the_field(
    codecs: Codecs, attr: str, record: dict[str, Any], message: str
) -> None:
    with pytest.raises(EncodeError) as info:
        getattr(codecs, attr).encode(record)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, MeteringError)


def test_a_record_that_is_not_a_mapping_is_refused(codecs: Codecs) -> None:
    with pytest.raises(EncodeError, match="expected record UsageEvent"):
        codecs.usage.encode(["not", "a", "record"])  # type: ignore[arg-type]


# -- bad bytes: always RejectedEvent with the right reason ---------------------------------------


@pytest.mark.parametrize("data", [b"", b"\x00", b"\x00\x00", b"\x00\x00\x00", b"\x00\x00\x00\x00"])
def test_values_shorter_than_the_header_are_undecodable(codecs: Codecs, data: bytes) -> None:
    assert rejected(lambda: codecs.usage.decode(data)).reason is DeadLetterReason.UNDECODABLE


def test_a_tombstone_is_undecodable(codecs: Codecs) -> None:
    assert rejected(lambda: codecs.usage.decode(None)).reason is DeadLetterReason.UNDECODABLE


@pytest.mark.parametrize(
    "value",
    [
        lambda: b"\x01" + golden_bytes("usage_event")[1:],
        lambda: json.dumps(USAGE).encode(),
        lambda: b"\xff\xff\xff\xff\xff\xff",
    ],
    ids=["magic-1", "json", "ff"],
)
def test_a_wrong_magic_byte_is_undecodable(codecs: Codecs, value: Callable[[], bytes]) -> None:
    data = value()
    error = rejected(lambda: codecs.usage.decode(data))
    assert error.reason is DeadLetterReason.UNDECODABLE
    assert "magic byte" in error.detail


@pytest.mark.parametrize("schema_id", [0, 7, 2**31, 2**32 - 1])
def test_an_unknown_schema_id_is_unknown_schema(codecs: Codecs, schema_id: int) -> None:
    data = b"\x00" + schema_id.to_bytes(4, "big") + golden_bytes("usage_event")[5:]
    error = rejected(lambda: codecs.usage.decode(data))
    assert error.reason is DeadLetterReason.UNKNOWN_SCHEMA
    assert str(schema_id) in error.detail


@pytest.mark.parametrize(
    ("attr", "golden"),
    [("usage", "pause_event"), ("pause", "billing_event"), ("billing", "pause_event")],
)
def test_an_id_of_another_subject_is_unknown_schema(codecs: Codecs, attr: str, golden: str) -> None:
    error = rejected(lambda: getattr(codecs, attr).decode(golden_bytes(golden)))
    assert error.reason is DeadLetterReason.UNKNOWN_SCHEMA
    assert "belongs to subject" in error.detail


def test_control_messages_written_with_the_first_schema_version_still_decode(
    codecs: Codecs,
) -> None:
    """Version 2 of the control schema added the Reprice command; a worker reads records
    written with version 1 (pinned id 5) by producers that were not upgraded yet."""
    data = (GOLDEN_DIR / "control_message_v1.bin").read_bytes()
    assert parse_header(data) == 5
    assert codecs.control.decode(data) == CONTROL


@pytest.mark.parametrize("name", GOLDEN)
def test_every_truncation_of_a_valid_value_is_undecodable(codecs: Codecs, name: str) -> None:
    codec: Codec = getattr(codecs, GOLDEN[name][0])
    data = golden_bytes(name)
    for cut in range(len(data)):
        error = rejected(lambda cut=cut: codec.decode(data[:cut]))
        assert error.reason is DeadLetterReason.UNDECODABLE, (cut, error)


def test_trailing_bytes_are_undecodable(codecs: Codecs) -> None:
    error = rejected(lambda: codecs.usage.decode(golden_bytes("usage_event") + b"\x00"))
    assert error.reason is DeadLetterReason.UNDECODABLE
    assert "trailing" in error.detail


def test_a_garbage_body_is_undecodable_with_a_stable_one_line_detail(codecs: Codecs) -> None:
    # An enum index past the symbols, a bad union branch, invalid UTF-8, a negative length.
    for body in (b"\x02x\x00\x02x\x7f", b"\x02\xff", b"\x01"):
        error = rejected(lambda body=body: codecs.usage.decode(b"\x00\x00\x00\x00\x01" + body))
        assert error.reason is DeadLetterReason.UNDECODABLE
        assert "\n" not in error.detail
        assert " at 0x" not in error.detail


@pytest.mark.parametrize("attr", CODEC_NAMES)
@given(data=st.binary(max_size=80))
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=200)
def test_random_bytes_never_raise_anything_but_rejected_event(
    codecs: Codecs, attr: str, data: bytes
) -> None:
    try:
        getattr(codecs, attr).decode(data)
    except RejectedEvent as error:
        assert error.reason in (DeadLetterReason.UNDECODABLE, DeadLetterReason.UNKNOWN_SCHEMA)


@pytest.mark.parametrize("name", GOLDEN)
@given(body=st.binary(max_size=120))
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=200)
def test_a_garbage_body_behind_a_valid_header_is_undecodable(
    codecs: Codecs, name: str, body: bytes
) -> None:
    attr, _, pinned_id = GOLDEN[name]
    try:
        getattr(codecs, attr).decode(b"\x00" + pinned_id.to_bytes(4, "big") + body)
    except RejectedEvent as error:
        assert error.reason is DeadLetterReason.UNDECODABLE


@pytest.mark.parametrize("name", GOLDEN)
@given(position=st.integers(min_value=5), value=st.integers(min_value=0, max_value=255))
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=200)
def test_a_corrupted_byte_never_raises_anything_but_undecodable(
    codecs: Codecs, name: str, position: int, value: int
) -> None:
    data = bytearray(golden_bytes(name))
    data[5 + position % (len(data) - 5)] = value  # the body only: the header is tested apart
    try:
        getattr(codecs, GOLDEN[name][0]).decode(bytes(data))
    except RejectedEvent as error:
        assert error.reason is DeadLetterReason.UNDECODABLE


# -- evolution ----------------------------------------------------------------------------------


def usage_schema_json() -> dict[str, Any]:
    return json.loads((AVRO_DIR / "usage_event.avsc").read_text(encoding="utf-8"))


def evolved(change: Callable[[dict[str, Any]], None]) -> AvroSchema:
    schema = copy.deepcopy(usage_schema_json())
    change(schema)
    return AvroSchema.from_json(schema)


def add_request_id(schema: dict[str, Any]) -> None:
    """The documented v2 (avro/README.md): an optional field with a default."""
    schema["fields"].append(
        {
            "name": "request_id",
            "type": ["null", "string"],
            "default": None,
            "doc": "API request id.",
        }
    )


V1 = AvroSchema.from_json(usage_schema_json())
V2 = evolved(add_request_id)


def two_versions(newer: AvroSchema, newer_id: int = 7) -> PinnedSchemas:
    return PinnedSchemas(
        {
            Subject.USAGE.value: [
                PinnedVersion(1, "usage_event.avsc", V1),
                PinnedVersion(newer_id, "usage_event.v2.avsc", newer),
            ]
        }
    )


def test_a_new_reader_reads_old_writers(codecs: Codecs) -> None:
    resolver = two_versions(V2)
    v2_reader = Codec(Subject.USAGE.value, resolver.current(Subject.USAGE), resolver)
    old_bytes = codecs.usage.encode(USAGE)  # written with the shipped v1, id 1
    assert v2_reader.decode(old_bytes) == {**USAGE, "request_id": None}
    assert v2_reader.writer_id == 7


def test_an_old_reader_reads_new_writers() -> None:
    resolver = two_versions(V2)
    v2_writer = Codec(Subject.USAGE.value, V2, resolver)
    v1_reader = Codec(Subject.USAGE.value, V1, resolver)
    new_bytes = v2_writer.encode({**USAGE, "request_id": "req-1"})
    assert parse_header(new_bytes) == 7
    assert v1_reader.decode(new_bytes) == USAGE


def test_a_writer_that_does_not_resolve_is_unknown_schema() -> None:
    def event_id_as_long(schema: dict[str, Any]) -> None:
        schema["fields"][0]["type"] = "long"

    resolver = two_versions(evolved(event_id_as_long))
    writer = Codec(Subject.USAGE.value, resolver.current(Subject.USAGE), resolver)
    reader = Codec(Subject.USAGE.value, V1, resolver)
    error = rejected(lambda: reader.decode(writer.encode({**USAGE, "event_id": 5})))
    assert error.reason is DeadLetterReason.UNKNOWN_SCHEMA


def test_an_enum_symbol_the_reader_does_not_know_is_unknown_schema() -> None:
    def add_product(schema: dict[str, Any]) -> None:
        schema["fields"][6]["type"]["symbols"].append("CLAUDE_API")

    resolver = two_versions(evolved(add_product))
    writer = Codec(Subject.USAGE.value, resolver.current(Subject.USAGE), resolver)
    reader = Codec(Subject.USAGE.value, V1, resolver)
    assert reader.decode(writer.encode(USAGE)) == USAGE
    error = rejected(lambda: reader.decode(writer.encode({**USAGE, "product": "CLAUDE_API"})))
    assert error.reason is DeadLetterReason.UNKNOWN_SCHEMA


def test_a_schema_that_is_not_pinned_cannot_be_written() -> None:
    pinned = PinnedSchemas.load()
    with pytest.raises(ConfigError, match="not pinned"):
        Codec(Subject.USAGE.value, V2, pinned).encode(USAGE)


# -- construction -------------------------------------------------------------------------------


def test_create_without_a_registry_uses_the_pinned_ids() -> None:
    codecs = Codecs.create(None)
    ids = [getattr(codecs, attr).writer_id for attr in CODEC_NAMES]
    assert ids == [1, 2, 3, 4, 7, 6, 8]  # control is at version 2 (id 7); replays id 8
    assert [getattr(codecs, attr).subject for attr in CODEC_NAMES] == [
        "usage.events-value",
        "metering.priced-value",
        "metering.pauses-value",
        "metering.billing-value",
        "metering.control-value",
        "metering.dead-letter-value",
        "metering.replays-value",
    ]


def test_settings_choose_registry_or_pinned_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    from core.settings import Settings

    assert Codecs.from_settings(Settings(schema_registry_url=None)).usage.writer_id == 1
    monkeypatch.setitem(sys.modules, "confluent_kafka.schema_registry", None)
    with pytest.raises(ConfigError, match="registry"):
        Codecs.from_settings(Settings(schema_registry_url="http://127.0.0.1:1"))


def test_a_missing_registry_client_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "confluent_kafka.schema_registry", None)
    with pytest.raises(ConfigError, match=r"confluent-kafka\[schemaregistry\]"):
        Codecs.from_registry("http://127.0.0.1:1")


# -- Schema Registry: interoperability with confluent-kafka's serializers -----------------------


@pytest.fixture
def registry() -> Iterator[RegistryDouble]:
    pytest.importorskip(
        "confluent_kafka.schema_registry",
        reason="confluent-kafka's schema registry client needs the [schemaregistry] extra",
    )
    with RegistryDouble(first_id=100) as double:
        yield double


def registry_client(registry: RegistryDouble) -> Any:
    from confluent_kafka.schema_registry import SchemaRegistryClient

    return SchemaRegistryClient({"url": registry.url, "max.retries": 0})


def confluent_serialize(
    registry: RegistryDouble, schema_text: str, record: dict[str, Any]
) -> bytes:
    from confluent_kafka.schema_registry.avro import AvroSerializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    serializer = AvroSerializer(registry_client(registry), schema_text)
    return serializer(record, SerializationContext("usage.events", MessageField.VALUE))


def registry_codecs(registry: RegistryDouble, **options: Any) -> Codecs:
    return Codecs.from_registry(registry.url, client_conf={"max.retries": 0}, **options)


def test_a_confluent_serializer_record_decodes(registry: RegistryDouble) -> None:
    text = (AVRO_DIR / "usage_event.avsc").read_text(encoding="utf-8")
    when = dt.datetime.fromtimestamp((JUNE_2025_MS + 123) / 1000, tz=dt.UTC)
    data = confluent_serialize(registry, text, {**USAGE, "occurred_at": when})
    assert parse_header(data) == 100
    assert registry_codecs(registry).usage.decode(data) == USAGE


def test_our_bytes_are_the_confluent_serializer_bytes(registry: RegistryDouble) -> None:
    from confluent_kafka.schema_registry.avro import AvroDeserializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    text = (AVRO_DIR / "usage_event.avsc").read_text(encoding="utf-8")
    theirs = confluent_serialize(registry, text, USAGE)
    ours = registry_codecs(registry).usage.encode(USAGE)
    assert ours == theirs
    decoded = AvroDeserializer(registry_client(registry))(
        ours, SerializationContext("usage.events", MessageField.VALUE)
    )
    assert decoded is not None
    assert decoded["event_id"] == USAGE["event_id"]
    assert decoded["occurred_at"] == dt.datetime.fromtimestamp(
        (JUNE_2025_MS + 123) / 1000, tz=dt.UTC
    )


def test_registry_codecs_register_their_schemas(registry: RegistryDouble) -> None:
    codecs = registry_codecs(registry)
    for attr, record in (("pause", PAUSE), ("billing", RELOAD), ("control", CONTROL)):
        codec: Codec = getattr(codecs, attr)
        data = codec.encode(record)
        assert parse_header(data) >= 100
        assert codec.decode(data) == record
    # One schema, two subjects, one registry id: pauses and billing share it.
    assert codecs.pause.writer_id == codecs.billing.writer_id


def test_a_producer_ahead_of_the_worker_is_read(registry: RegistryDouble) -> None:
    data = confluent_serialize(registry, V2.text, {**USAGE, "request_id": "req-9"})
    assert registry_codecs(registry).usage.decode(data) == USAGE


def test_registry_ids_unknown_or_of_another_record_are_unknown_schema(
    registry: RegistryDouble,
) -> None:
    codecs = registry_codecs(registry)
    pause_bytes = codecs.pause.encode(PAUSE)
    error = rejected(lambda: codecs.usage.decode(pause_bytes))
    assert error.reason is DeadLetterReason.UNKNOWN_SCHEMA
    assert "PauseEvent" in error.detail
    error = rejected(lambda: codecs.usage.decode(b"\x00\x00\x00\x03\xe7" + b"\x00"))
    assert error.reason is DeadLetterReason.UNKNOWN_SCHEMA  # id 999 is not registered
    json_id = registry.register("usage.events-value", '{"type": "object"}', "JSON")
    error = rejected(lambda: codecs.usage.decode(b"\x00" + json_id.to_bytes(4, "big") + b"{}"))
    assert error.reason is DeadLetterReason.UNKNOWN_SCHEMA
    assert "JSON" in error.detail


def test_a_registry_outage_is_infrastructure_trouble_not_poison(registry: RegistryDouble) -> None:
    codecs = registry_codecs(registry)
    known = codecs.usage.encode(USAGE)
    assert codecs.usage.decode(known) == USAGE
    registry.failure_status = 503
    # Already-resolved ids keep working while the registry is down...
    assert codecs.usage.decode(known) == USAGE
    assert codecs.usage.encode(USAGE) == known
    # ...and anything that needs it raises RegistryError, never a dead-letter reason.
    with pytest.raises(RegistryError):
        codecs.usage.decode(b"\x00\x00\x00\x03\xe7\x00")
    with pytest.raises(RegistryError):
        codecs.pause.encode(PAUSE)


def test_without_auto_registration_the_schema_must_be_registered(registry: RegistryDouble) -> None:
    with pytest.raises(ConfigError, match="not registered"):
        registry_codecs(registry, auto_register=False).usage.encode(USAGE)
    schema_id = registry.register("usage.events-value", V1.text)
    assert registry_codecs(registry, auto_register=False).usage.writer_id == schema_id


def test_registry_schemas_is_a_resolver_on_its_own(registry: RegistryDouble) -> None:
    resolver = RegistrySchemas(registry_client(registry))
    schema_id = resolver.writer_id(Subject.USAGE.value, V1)
    assert resolver.writer_id(Subject.USAGE.value, V1) == schema_id
    assert (
        resolver.writer_schema(Subject.USAGE.value, schema_id).canonical_form == V1.canonical_form
    )


# -- golden file maintenance ----------------------------------------------------------------------


def _update_golden() -> None:
    codecs = Codecs.pinned()
    GOLDEN_DIR.mkdir(exist_ok=True)
    for name, (attr, record, _) in GOLDEN.items():
        (GOLDEN_DIR / f"{name}.bin").write_bytes(getattr(codecs, attr).encode(record))


if __name__ == "__main__":
    if sys.argv[1:] == ["--update-golden"]:
        _update_golden()
    else:
        raise SystemExit("usage: python -m tests.unit.test_codec --update-golden")
