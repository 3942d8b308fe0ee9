"""An independent oracle for what ClickHouse must contain after a test run (SPEC §2, §3, §4, §6).

Integration tests produce records (the :class:`jobs.generate.Generated` objects, or plain usage
dicts), let the pipeline run, then compare the ``metering.*`` views with :func:`expected_views`.

Independence is the point: this module imports **nothing** from the project. The price table,
the model aliases, the validity rules and the aggregation are re-typed here from the SPEC text,
with Decimal USD per MTok instead of the production code's integer nano-USD, so a shared
mistake would have to be made twice, in two different ways.

Conventions of the returned :class:`Expected`:

* Money is :class:`~decimal.Decimal` USD quantized to 9 decimal places (``Decimal(38, 9)``).
* ``month`` keys are :class:`datetime.date` (first day of the UTC month).
* ``hour`` keys and ``occurred_at`` values are **timezone-aware UTC** :class:`datetime.datetime`;
  :func:`as_utc` normalises whatever a ClickHouse client returns for comparison.
* Dead-letter reasons are plain strings (the SPEC §3 names), so they compare equal to
  ``core.errors.DeadLetterReason`` members without importing them.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, localcontext
from typing import Any

__all__ = [
    "FAMILY_OF_MODEL",
    "MAX_TOKENS_PER_KIND",
    "RATES_USD_PER_MTOK",
    "Expected",
    "as_utc",
    "classify",
    "expected_dead_letters",
    "expected_views",
    "price_usd",
]

# --- SPEC §2, typed again by hand ----------------------------------------------------------

# (input, output, cache write, cache read) in USD per million tokens.
RATES_USD_PER_MTOK: dict[str, tuple[Decimal, Decimal, Decimal, Decimal]] = {
    "opus-4.1": (Decimal("15"), Decimal("75"), Decimal("18.75"), Decimal("1.50")),
    "opus-4": (Decimal("15"), Decimal("75"), Decimal("18.75"), Decimal("1.50")),
    "sonnet-4": (Decimal("3"), Decimal("15"), Decimal("3.75"), Decimal("0.30")),
    "sonnet-3.7": (Decimal("3"), Decimal("15"), Decimal("3.75"), Decimal("0.30")),
    "opus-3": (Decimal("15"), Decimal("75"), Decimal("18.75"), Decimal("1.50")),
    "haiku-3.5": (Decimal("0.80"), Decimal("4"), Decimal("1"), Decimal("0.08")),
}
"""Standard rates per family."""

LONG_CONTEXT_RATES_USD_PER_MTOK: dict[str, tuple[Decimal, Decimal, Decimal, Decimal]] = {
    "sonnet-4": (Decimal("6"), Decimal("22.50"), Decimal("7.50"), Decimal("0.60")),
}
"""Rates of every token kind of a request whose prompt exceeds :data:`LONG_CONTEXT_PROMPT`."""

LONG_CONTEXT_PROMPT = 200_000
"""A prompt *greater than* this is long context; exactly this many tokens is standard."""

FAMILY_OF_MODEL: dict[str, str] = {
    "claude-sonnet-4-20250514": "sonnet-4",
    "claude-sonnet-4-0": "sonnet-4",
    "claude-sonnet-4": "sonnet-4",
    "claude-opus-4-1-20250805": "opus-4.1",
    "claude-opus-4-1": "opus-4.1",
    "claude-opus-4-20250514": "opus-4",
    "claude-opus-4-0": "opus-4",
    "claude-3-7-sonnet-20250219": "sonnet-3.7",
    "claude-3-7-sonnet-latest": "sonnet-3.7",
    "claude-3-opus-20240229": "opus-3",
    "claude-3-opus-latest": "opus-3",
    "claude-3-5-haiku-20241022": "haiku-3.5",
    "claude-3-5-haiku-latest": "haiku-3.5",
}
"""Model id -> family, exactly the ids listed in SPEC §2."""

TOKEN_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)
ID_FIELDS = ("event_id", "org_id", "user_id")

MAX_TOKENS_PER_KIND = 100_000_000
"""The documented per-request maximum of each token count; above it is ``OUT_OF_RANGE``."""

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
ONE_MS = dt.timedelta(milliseconds=1)
FIRST_PRICE_AT = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
FIRST_PRICE_MS = (FIRST_PRICE_AT - EPOCH) // ONE_MS
FUTURE_TOLERANCE_MS = 60 * 60 * 1000
"""An event more than one hour ahead of the worker's clock is ``FUTURE_TIMESTAMP``."""

NINE_PLACES = Decimal("0.000000001")
ZERO_USD = Decimal("0").quantize(NINE_PLACES)

MEASURES = (
    "events",
    *TOKEN_FIELDS,
    "cost_usd",
    "extra_cost_usd",
)
"""The measure columns of ``org_month``, ``tier_month``, ``user_month`` and ``usage_hourly``."""


# --- pricing -------------------------------------------------------------------------------


def price_usd(model: str, tokens: Mapping[str, int]) -> tuple[str, bool, Decimal]:
    """``(model_family, long_context, cost_usd)`` of one request; KeyError for unknown models.

    cost = sum(tokens_k * rate_k / 1,000,000) in Decimal, exact, then quantized to 9 places
    (every SPEC rate is a whole number of nano-USD per token, so quantizing loses nothing).
    """
    family = FAMILY_OF_MODEL[model]
    prompt = (
        tokens["input_tokens"]
        + tokens["cache_creation_input_tokens"]
        + tokens["cache_read_input_tokens"]
    )
    long_context = family in LONG_CONTEXT_RATES_USD_PER_MTOK and prompt > LONG_CONTEXT_PROMPT
    rates = (LONG_CONTEXT_RATES_USD_PER_MTOK if long_context else RATES_USD_PER_MTOK)[family]
    with localcontext() as context:
        context.prec = 60  # far beyond any sum here: the arithmetic below is exact
        cost = sum(
            (
                Decimal(tokens[name]) * rate / Decimal(1_000_000)
                for name, rate in zip(TOKEN_FIELDS, rates, strict=True)
            ),
            Decimal(0),
        )
        quantized = cost.quantize(NINE_PLACES)
    if quantized != cost:
        raise AssertionError(f"cost {cost} of {model} is not a whole number of nano-USD")
    return family, long_context, quantized


# --- validity ------------------------------------------------------------------------------


def _occurred_at_ms(value: Any) -> int:
    """Epoch ms from an int (ms), an aware datetime, or an ISO-8601 string (as the CLI takes)."""
    if isinstance(value, bool):
        raise TypeError(f"occurred_at must be epoch ms or a datetime, not {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if isinstance(value, dt.datetime):
        return (as_utc(value) - EPOCH) // ONE_MS
    raise TypeError(f"occurred_at must be epoch ms or a datetime, not {value!r}")


def classify(
    event: Mapping[str, Any], now_ms: int, max_cost_usd: Decimal | None = None
) -> str | None:
    """The dead-letter reason of a decodable usage event, or None when it is meterable.

    Checks, in this order (a record generated with a single defect gets the same answer in
    any order): empty or missing ids and null, missing or negative counts (``INVALID_FIELD``);
    a count above 100,000,000 (``OUT_OF_RANGE``); ``occurred_at`` more than one hour past
    ``now_ms`` (``FUTURE_TIMESTAMP``) or before 2025-01-01T00:00:00Z (``NO_PRICE``); a model
    outside SPEC §2 (``UNKNOWN_MODEL``); a cost above ``max_cost_usd`` when given
    (``OUT_OF_RANGE``).
    """
    for name in ID_FIELDS:
        value = event.get(name)
        if not isinstance(value, str) or value == "":
            return "INVALID_FIELD"
    for name in TOKEN_FIELDS:
        value = event.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return "INVALID_FIELD"
    if any(event[name] > MAX_TOKENS_PER_KIND for name in TOKEN_FIELDS):
        return "OUT_OF_RANGE"
    if event.get("occurred_at") is None:
        return "INVALID_FIELD"
    occurred_at_ms = _occurred_at_ms(event["occurred_at"])
    if occurred_at_ms > now_ms + FUTURE_TOLERANCE_MS:
        return "FUTURE_TIMESTAMP"
    if occurred_at_ms < FIRST_PRICE_MS:
        return "NO_PRICE"
    if event.get("model") not in FAMILY_OF_MODEL:
        return "UNKNOWN_MODEL"
    if max_cost_usd is not None and price_usd(event["model"], event)[2] > max_cost_usd:
        return "OUT_OF_RANGE"
    return None


# --- the views -----------------------------------------------------------------------------

Row = dict[str, Any]


@dataclass
class Expected:
    """What the SPEC §6 views must hold, keyed like their natural keys.

    * ``priced_events``: ``(org_id, event_id)`` -> the row's columns except ``pricing_version``
      (which this oracle does not know): ``occurred_at`` (aware UTC datetime), the event's own
      fields, ``model_family``, ``long_context`` / ``extra_usage`` (0 or 1), ``cost_usd``.
    * ``org_month``: ``(month, org_id)``; ``tier_month``: ``(month, org_id, seat_tier)``;
      ``user_month``: ``(month, org_id, user_id)``; ``usage_hourly``:
      ``(hour, org_id, user_id, model_family)`` -> :data:`MEASURES`.
    * ``dead_letters``: reason -> number of records dead-lettered with it.
    * ``duplicates``: valid records dropped as re-sends of an earlier (org_id, event_id).
    """

    priced_events: dict[tuple[str, str], Row] = field(default_factory=dict)
    org_month: dict[tuple[dt.date, str], Row] = field(default_factory=dict)
    tier_month: dict[tuple[dt.date, str, str], Row] = field(default_factory=dict)
    user_month: dict[tuple[dt.date, str, str], Row] = field(default_factory=dict)
    usage_hourly: dict[tuple[dt.datetime, str, str, str], Row] = field(default_factory=dict)
    dead_letters: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0


def _empty_measures() -> Row:
    return {
        "events": 0,
        **dict.fromkeys(TOKEN_FIELDS, 0),
        "cost_usd": ZERO_USD,
        "extra_cost_usd": ZERO_USD,
    }


def _add(totals: dict[Any, Row], key: Any, row: Row) -> None:
    measures = totals.get(key)
    if measures is None:
        measures = totals[key] = _empty_measures()
    measures["events"] += 1
    for name in TOKEN_FIELDS:
        measures[name] += row[name]
    measures["cost_usd"] += row["cost_usd"]
    if row["extra_usage"]:
        measures["extra_cost_usd"] += row["cost_usd"]


def _unpack(record: Any) -> Mapping[str, Any] | str:
    """The usage dict of a plain dict or ``Generated``-like object, else its tagged reason."""
    if isinstance(record, Mapping):
        return record
    event = getattr(record, "event", None)
    if event is not None:
        return event
    reason = getattr(record, "expected_reason", None)
    if reason is None:
        raise ValueError(f"record {record!r} has neither an event nor an expected reason")
    return str(getattr(reason, "value", reason))


def expected_views(
    records: Iterable[Any],
    now_ms: int | None = None,
    *,
    max_cost_usd: Decimal | None = None,
) -> Expected:
    """Compute the SPEC §6 view contents for ``records`` consumed in the given order.

    ``records`` are ``Generated``-like objects (attributes ``event``, ``expected_reason``) or
    plain usage dicts (SPEC §3 field names; ``occurred_at`` epoch ms, ISO string or datetime).
    A record without an event (raw bytes) counts as a dead letter under its tagged reason. Every
    other record is judged by :func:`classify` against ``now_ms`` (the worker's clock; default:
    the current time), never by its tag. Valid events are deduplicated on ``(org_id,
    event_id)``, the first occurrence winning, and then priced and summed.
    """
    if now_ms is None:
        now_ms = (dt.datetime.now(dt.UTC) - EPOCH) // ONE_MS
    expected = Expected()
    for record in records:
        event = _unpack(record)
        if isinstance(event, str):  # raw bytes: only the producer knows what is wrong
            expected.dead_letters[event] += 1
            continue
        reason = classify(event, now_ms, max_cost_usd)
        if reason is not None:
            expected.dead_letters[reason] += 1
            continue
        identity = (event["org_id"], event["event_id"])
        if identity in expected.priced_events:
            expected.duplicates += 1
            continue
        row = _priced_row(event)
        expected.priced_events[identity] = row
        occurred_at: dt.datetime = row["occurred_at"]
        month = occurred_at.date().replace(day=1)
        hour = occurred_at.replace(minute=0, second=0, microsecond=0)
        org_id, user_id = row["org_id"], row["user_id"]
        _add(expected.org_month, (month, org_id), row)
        _add(expected.tier_month, (month, org_id, row["seat_tier"]), row)
        _add(expected.user_month, (month, org_id, user_id), row)
        _add(expected.usage_hourly, (hour, org_id, user_id, row["model_family"]), row)
    return expected


def expected_dead_letters(
    records: Iterable[Any],
    now_ms: int | None = None,
    *,
    max_cost_usd: Decimal | None = None,
) -> Counter[str]:
    """Dead letters by reason for ``records``; see :func:`expected_views`."""
    return expected_views(records, now_ms, max_cost_usd=max_cost_usd).dead_letters


def _priced_row(event: Mapping[str, Any]) -> Row:
    family, long_context, cost = price_usd(event["model"], event)
    occurred_at_ms = _occurred_at_ms(event["occurred_at"])
    return {
        "event_id": event["event_id"],
        "occurred_at": EPOCH + occurred_at_ms * ONE_MS,
        "org_id": event["org_id"],
        "plan": str(event["plan"]),
        "user_id": event["user_id"],
        "seat_tier": str(event["seat_tier"]),
        "product": str(event["product"]),
        "model": event["model"],
        "model_family": family,
        **{name: event[name] for name in TOKEN_FIELDS},
        "long_context": int(long_context),
        "extra_usage": int(bool(event["extra_usage"])),
        "cost_usd": cost,
    }


def as_utc(value: dt.datetime) -> dt.datetime:
    """An aware UTC datetime from a naive (assumed UTC) or aware one, for comparing keys."""
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC)
