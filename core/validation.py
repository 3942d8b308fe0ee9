"""Semantic validation of a decoded usage event (SPEC §3).

The Avro schema only guarantees shapes; whether a record can be metered is decided here.
``validate_usage`` either returns a :class:`core.usage.UsageEvent` or raises
:class:`core.errors.RejectedEvent` with the dead-letter reason and a one-line detail.

Documented maxima per request (beyond them a record is ``OUT_OF_RANGE``): each token count at
most :data:`MAX_TOKENS_PER_KIND` and the priced cost at most :data:`MAX_COST_NANO_PER_REQUEST`.
No real request comes near either; they exist so that one hostile value cannot overflow a
64-bit field. Monthly totals are guarded separately (:data:`MAX_TOTAL`): an event that would
push a total past it is refused as ``OUT_OF_RANGE`` rather than wrapping or crashing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from core.errors import DeadLetterReason, RejectedEvent
from core.usage import NANO_PER_USD, Plan, Product, SeatTier, TokenUsage, UsageEvent

MAX_TOKENS_PER_KIND = 100_000_000
"""Largest token count of one kind in one request (100M; the largest context is 1M)."""

MAX_COST_NANO_PER_REQUEST = 10_000 * NANO_PER_USD
"""Largest cost of one request: $10,000."""

MAX_TOTAL = 2**63 - 1
"""Largest value a monthly total (nano-USD or tokens) may reach: a signed 64-bit integer."""

MAX_ID_LENGTH = 256
"""Longest ``event_id``, ``org_id`` or ``user_id``, in characters."""

FUTURE_TOLERANCE_MS = 3_600_000
"""An event more than one hour ahead of the worker's clock is ``FUTURE_TIMESTAMP``."""

_ID_FIELDS = ("event_id", "org_id", "user_id")
_PLANS = {p.value: p for p in Plan}
_TIERS = {t.value: t for t in SeatTier}
_PRODUCTS = {p.value: p for p in Product}


def _invalid(detail: str) -> RejectedEvent:
    return RejectedEvent(DeadLetterReason.INVALID_FIELD, detail)


def _count(record: Mapping[str, Any], name: str) -> int:
    value = record.get(name)
    if value is None:
        raise _invalid(f"{name} is missing")
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(f"{name} is not an integer")
    if value < 0:
        raise _invalid(f"{name} is negative ({value})")
    if value > MAX_TOKENS_PER_KIND:
        raise RejectedEvent(
            DeadLetterReason.OUT_OF_RANGE,
            f"{name} = {value} exceeds the per-request maximum of {MAX_TOKENS_PER_KIND}",
        )
    return value


def validate_usage(record: Mapping[str, Any], now_ms: int) -> UsageEvent:
    """Check a decoded usage record and build the domain event.

    ``now_ms`` is the worker's wall clock. Checks, in order: ids non-empty and at most
    :data:`MAX_ID_LENGTH` characters, enums known, counts present, non-negative and within
    :data:`MAX_TOKENS_PER_KIND`, ``occurred_at`` not more than an hour in the future.
    Pricing problems (unknown model, no price) are found later by the price table.
    """
    ids = []
    for name in _ID_FIELDS:
        value = record.get(name)
        if not isinstance(value, str) or not value:
            raise _invalid(f"{name} is empty")
        if len(value) > MAX_ID_LENGTH:
            raise _invalid(f"{name} is longer than {MAX_ID_LENGTH} characters")
        ids.append(value)
    model = record.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid("model is empty")
    if len(model) > MAX_ID_LENGTH:
        raise _invalid(f"model is longer than {MAX_ID_LENGTH} characters")
    plan = _PLANS.get(record.get("plan"))  # type: ignore[arg-type]
    tier = _TIERS.get(record.get("seat_tier"))  # type: ignore[arg-type]
    product = _PRODUCTS.get(record.get("product"))  # type: ignore[arg-type]
    if plan is None or tier is None or product is None:
        raise _invalid("plan, seat_tier or product is not a known value")
    occurred_at = record.get("occurred_at")
    if isinstance(occurred_at, bool) or not isinstance(occurred_at, int):
        raise _invalid("occurred_at is not epoch milliseconds")
    if occurred_at < 0:
        # Before 1970 is before every price version; also keeps calendar arithmetic in range.
        raise RejectedEvent(
            DeadLetterReason.NO_PRICE, f"occurred_at {occurred_at} is before 1970-01-01"
        )
    if occurred_at > now_ms + FUTURE_TOLERANCE_MS:
        raise RejectedEvent(
            DeadLetterReason.FUTURE_TIMESTAMP,
            f"occurred_at {occurred_at} is more than 1 h ahead of the worker clock {now_ms}",
        )
    extra = record.get("extra_usage")
    if not isinstance(extra, bool):
        raise _invalid("extra_usage is not a boolean")
    usage = TokenUsage(
        _count(record, "input_tokens"),
        _count(record, "output_tokens"),
        _count(record, "cache_creation_input_tokens"),
        _count(record, "cache_read_input_tokens"),
    )
    return UsageEvent(
        event_id=ids[0],
        occurred_at_ms=occurred_at,
        org_id=ids[1],
        plan=plan,
        user_id=ids[2],
        seat_tier=tier,
        product=product,
        model=model,
        usage=usage,
        extra_usage=extra,
    )


def check_cost(cost_nano: int) -> None:
    """Refuse a priced cost beyond :data:`MAX_COST_NANO_PER_REQUEST` (``OUT_OF_RANGE``)."""
    if cost_nano > MAX_COST_NANO_PER_REQUEST:
        raise RejectedEvent(
            DeadLetterReason.OUT_OF_RANGE,
            f"cost {cost_nano} nano-USD exceeds the per-request maximum "
            f"of {MAX_COST_NANO_PER_REQUEST}",
        )
