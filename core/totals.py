"""Calendar-month totals per organisation, seat tier and user (SPEC §4).

A total is kept as a small list so it serialises compactly into a Faust table value::

    [last_offset, events, input_tokens, output_tokens,
     cache_creation_input_tokens, cache_read_input_tokens, cost_nano, extra_cost_nano]

``last_offset`` is the source offset of the last event applied to this total. Events of one
organisation are processed in offset order on one partition, so "apply only if the event's
offset is greater" makes a re-delivered event (at-least-once) harmless for every total
independently, even when a crash persisted some totals of an event and not others.

A ninth element, present once a replay corrected the total, is the offset of the last
correction message applied (on the org's control partition: another offset space than
``last_offset``), with the same "only if greater" rule (:meth:`core.metering.Meter.reprice`).
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from core.usage import PricedEvent

LAST_OFFSET, EVENTS, INPUT, OUTPUT, CACHE_WRITE, CACHE_READ, COST, EXTRA_COST = range(8)
TOTAL_WIDTH = 8
LAST_CORRECTION = 8  # optional: see the module docstring


def org_key(org_id: str, period: str) -> str:
    """Table key of an organisation's month. Every key starts with the org (FAUST_NOTES)."""
    return orjson.dumps([org_id, period]).decode()


def tier_key(org_id: str, period: str, seat_tier: str) -> str:
    """Table key of a seat tier's month within an organisation."""
    return orjson.dumps([org_id, period, "tier", seat_tier]).decode()


def user_key(org_id: str, period: str, user_id: str) -> str:
    """Table key of a member's month within an organisation."""
    return orjson.dumps([org_id, period, "user", user_id]).decode()


def empty_total() -> list[int]:
    """A total that has seen nothing (``last_offset`` -1)."""
    return [-1, 0, 0, 0, 0, 0, 0, 0]


def apply_event(total: list[int] | None, priced: PricedEvent, offset: int) -> list[int] | None:
    """Add one priced event to a total.

    Returns the new total, or ``None`` when the total has already applied this offset (a
    re-delivery), in which case the caller leaves it unchanged. Never mutates ``total``.
    """
    current = total if total is not None else empty_total()
    if current[LAST_OFFSET] >= offset:
        return None
    usage = priced.event.usage
    cost = priced.price.cost_nano
    return [
        offset,
        current[EVENTS] + 1,
        current[INPUT] + usage.input_tokens,
        current[OUTPUT] + usage.output_tokens,
        current[CACHE_WRITE] + usage.cache_creation_input_tokens,
        current[CACHE_READ] + usage.cache_read_input_tokens,
        current[COST] + cost,
        current[EXTRA_COST] + (cost if priced.event.extra_usage else 0),
        *current[TOTAL_WIDTH:],  # a replay's correction marker is kept
    ]


def apply_correction(
    total: list[int] | None, cost_delta: int, extra_delta: int, correction_offset: int
) -> list[int] | None:
    """Add a replay's cost change to a total, once per correction message.

    Returns the new total, or ``None`` when the message at ``correction_offset`` was already
    applied (a re-delivery). Counts and tokens are unchanged: a replay re-prices events, it
    never adds or removes one. Never mutates ``total``.
    """
    current = total if total is not None else empty_total()
    marker = current[LAST_CORRECTION] if len(current) > LAST_CORRECTION else -1
    if marker >= correction_offset:
        return None
    updated = list(current[:TOTAL_WIDTH])
    updated[COST] += cost_delta
    updated[EXTRA_COST] += extra_delta
    return [*updated, correction_offset]


def extra_cost_nano(total: list[int] | None) -> int:
    """The billable figure of a total (what caps count): ``MonthTotals.of(total)
    .extra_cost_nano`` without building the view (read several times per event)."""
    return 0 if total is None else total[EXTRA_COST]


@dataclass(frozen=True, slots=True)
class MonthTotals:
    """A read-only view of one total, for reports and the enforcement rules."""

    events: int
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int
    cost_nano: int
    extra_cost_nano: int

    @classmethod
    def of(cls, total: list[int] | None) -> MonthTotals:
        values = total if total is not None else empty_total()
        return cls(*values[EVENTS:TOTAL_WIDTH])
