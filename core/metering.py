"""Metering one usage event: dedupe, price, add to the monthly totals (SPEC §2-§4).

:class:`Meter` is the whole business rule of the hot path, kept free of Faust so it can be
tested with plain dicts. The adapter hands it two mutable mappings (Faust tables in the worker)
and the source offset of the event; Meter decides and writes, the adapter sends what the
returned :class:`Outcome` says.

At-least-once contract (FAUST_NOTES): Kafka may deliver an event again after a crash, and a
crash may have persisted some of its table writes and not others. Meter tells three cases
apart by the ``seen`` record of ``(org_id, event_id)``:

* no record: the event is new — price it, record the price with its offset, apply it;
* a record with the *same* offset: the same message delivered again — reuse the recorded price
  (never re-price: the table may have changed across the restart), apply it to every total that
  has not seen this offset, and write every value back so a changelog that lost a write is
  repaired; the adapter re-sends the outputs (their ids are deterministic, so repeats are
  harmless);
* a record with *another* offset: a genuine duplicate — counted once, nothing is written.

A replay (``metering replay``) corrects events already metered with :meth:`Meter.reprice`:
see its contract there.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import orjson

from core.errors import DeadLetterReason, RejectedEvent
from core.periods import month_of
from core.pricing import PriceTable
from core.totals import (
    CACHE_READ,
    CACHE_WRITE,
    COST,
    INPUT,
    OUTPUT,
    apply_correction,
    apply_event,
    org_key,
    tier_key,
    user_key,
)
from core.usage import Price, PricedEvent, UsageEvent
from core.validation import MAX_TOTAL, check_cost


class Status(StrEnum):
    APPLIED = "APPLIED"
    REDELIVERED = "REDELIVERED"
    DUPLICATE = "DUPLICATE"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one event. ``priced`` is None only for a duplicate."""

    status: Status
    priced: PricedEvent | None
    period: str


@dataclass(frozen=True, slots=True)
class Correction:
    """One event re-priced by a replay: the event with its new price, and the price the
    replay found on record for it (what the worker had billed)."""

    priced: PricedEvent
    old_cost_nano: int
    old_pricing_version: str
    source_partition: int = 0  # where the event was read (kept on its priced record)
    source_offset: int = 0

    @property
    def cost_delta_nano(self) -> int:
        return self.priced.price.cost_nano - self.old_cost_nano


@dataclass(frozen=True, slots=True)
class RepriceOutcome:
    """What one correction message changed. ``applied`` are the corrections whose new price
    now stands (to be sent to the sink again); ``stale`` were skipped because the price on
    record is neither the old nor this message's new one (see :meth:`Meter.reprice`)."""

    applied: list[Correction]
    stale: list[Correction]
    extra_delta_nano: int


SEEN_CORRECTED_BY = 6
"""Index of the optional 7th element of a ``seen`` record: the control offset of the correction
message that last re-priced the event."""


class Store(Protocol):
    """The two operations Meter needs of a table: a plain dict satisfies it."""

    def get(self, key: str, default: list | None = None, /) -> list | None: ...

    def __setitem__(self, key: str, value: list, /) -> None: ...


def seen_key(org_id: str, event_id: str) -> str:
    """Dedupe-table key of an event's identity (SPEC §3: ``(org_id, event_id)``)."""
    return orjson.dumps([org_id, event_id]).decode()


class Meter:
    """Applies validated usage events to a dedupe table and the monthly totals table.

    ``seen`` maps :func:`seen_key` to ``[offset, occurred_at_ms, model_family,
    pricing_version, long_context, cost_nano]``; ``totals`` maps the keys of
    :mod:`core.totals` to total lists. Both are written only from :meth:`process`.
    """

    def __init__(
        self,
        prices: PriceTable,
        seen: Store,
        totals: Store,
    ) -> None:
        self.prices = prices
        self.seen = seen
        self.totals = totals

    def process(self, event: UsageEvent, offset: int) -> Outcome:
        """Meter ``event`` found at ``offset`` of its organisation's partition.

        Raises :class:`core.errors.RejectedEvent` (unknown model, no price, cost out of range)
        before writing anything; such an event is not recorded as seen, so a corrected copy
        with the same id can still be metered.
        """
        period = month_of(event.occurred_at_ms)
        key = seen_key(event.org_id, event.event_id)
        record = self.seen.get(key)
        if record is not None and record[0] != offset:
            return Outcome(Status.DUPLICATE, None, period)
        org = event.org_id
        total_keys = (
            org_key(org, period),
            tier_key(org, period, event.seat_tier.value),
            user_key(org, period, event.user_id),
        )
        org_total = self.totals.get(total_keys[0])  # read once: headroom check and update
        if record is None:
            price = self.prices.price(event.model, event.usage, event.occurred_at_ms)
            check_cost(price.cost_nano)
            _check_headroom(org_total, event, price.cost_nano, period)
            status = Status.APPLIED
            self.seen[key] = [
                offset,
                event.occurred_at_ms,
                price.model_family,
                price.pricing_version,
                int(price.long_context),
                price.cost_nano,
            ]
        else:
            price = Price(record[2], record[3], bool(record[4]), record[5])
            status = Status.REDELIVERED
            self.seen[key] = record
        priced = PricedEvent(event, price)
        for total_key in total_keys:
            current = org_total if total_key is total_keys[0] else self.totals.get(total_key)
            updated = apply_event(current, priced, offset)
            if updated is None:
                status = Status.REDELIVERED
                self.totals[total_key] = current  # type: ignore[assignment]  # repair write
            else:
                self.totals[total_key] = updated
        return Outcome(status, priced, period)

    def reprice(self, corrections: list[Correction], offset: int) -> RepriceOutcome:
        """Apply one correction message of a replay, found at ``offset`` of the org's control
        partition: each event's new price replaces the recorded one, and the monthly totals
        (org, tier, user of the event's month) change by the difference.

        Exactly once, whatever was persisted before a crash:

        * a correction applies when the ``seen`` record still holds its old price (the first
          delivery), or holds its new price *written by this same message* (a re-delivery
          after a crash that persisted the record but perhaps not every total);
        * each total takes the message's summed difference at most once: it remembers the
          offset of the last correction message applied (:func:`core.totals.apply_correction`);
        * any other recorded price (another replay re-priced the event meanwhile, or the
          event is unknown here) makes the correction *stale*: it is skipped and reported,
          never applied on top of a price it was not computed from.

        ``extra_delta_nano`` is the change of extra cost of the applied corrections (for a Team
        balance); counts and tokens never change.
        """
        applied: list[Correction] = []
        stale: list[Correction] = []
        deltas: dict[str, list[int]] = {}
        extra_delta = 0
        for correction in corrections:
            priced = correction.priced
            event, price = priced.event, priced.price
            key = seen_key(event.org_id, event.event_id)
            record = self.seen.get(key)
            first = (
                record is not None
                and record[5] == correction.old_cost_nano
                and record[3] == correction.old_pricing_version
            )
            again = (
                record is not None
                and len(record) > SEEN_CORRECTED_BY
                and record[SEEN_CORRECTED_BY] == offset
                and record[5] == price.cost_nano
                and record[3] == price.pricing_version
            )
            if record is None or not (first or again):
                stale.append(correction)
                continue
            self.seen[key] = [
                record[0],
                record[1],
                price.model_family,
                price.pricing_version,
                int(price.long_context),
                price.cost_nano,
                offset,
            ]
            applied.append(correction)
            cost_delta = correction.cost_delta_nano
            extra = cost_delta if event.extra_usage else 0
            extra_delta += extra
            period = month_of(event.occurred_at_ms)
            for total_key in (
                org_key(event.org_id, period),
                tier_key(event.org_id, period, event.seat_tier.value),
                user_key(event.org_id, period, event.user_id),
            ):
                summed = deltas.setdefault(total_key, [0, 0])
                summed[0] += cost_delta
                summed[1] += extra
        for total_key, (cost_delta, extra) in deltas.items():
            current = self.totals.get(total_key)
            updated = apply_correction(current, cost_delta, extra, offset)
            # Already applied (a re-delivery): write the value back anyway, so a changelog
            # write that a crash lost is repaired, as for a re-delivered usage event.
            self.totals[total_key] = updated if updated is not None else current  # type: ignore[assignment]
        return RepriceOutcome(applied, stale, extra_delta)


def _check_headroom(
    total: list[int] | None, event: UsageEvent, cost_nano: int, period: str
) -> None:
    """Refuse an event that would overflow its organisation's month (the largest total)."""
    if total is None:
        return
    usage = event.usage
    additions = (
        (COST, cost_nano),
        (INPUT, usage.input_tokens),
        (OUTPUT, usage.output_tokens),
        (CACHE_WRITE, usage.cache_creation_input_tokens),
        (CACHE_READ, usage.cache_read_input_tokens),
    )
    for index, amount in additions:
        if total[index] + amount > MAX_TOTAL:
            raise RejectedEvent(
                DeadLetterReason.OUT_OF_RANGE,
                f"the organisation's {period} total would exceed a 64-bit integer",
            )
