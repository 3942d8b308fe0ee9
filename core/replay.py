"""Replay after a price-table fix: which billed events change price, and by how much.

Pure planning for ``metering replay`` (the adapter is :mod:`jobs.replay`). The input is the
*ledger*: every event the worker metered, as the latest record per ``(org_id, event_id)`` on
``metering.priced`` (the highest revision wins; the sink keeps the same one). Each entry holds
the whole validated event and the price it was billed at, so re-pricing needs neither the
usage topic nor the worker's tables, and dedupe holds by construction: a duplicate was never
priced, whatever side of ``--since`` its original lies on.

:func:`plan` re-prices every ledger entry whose ``occurred_at`` lies in ``[since, until)``
with the table as it is now and keeps those whose price changed (cost, version, family or
tier: the priced row must equal what a fresh pipeline would write). Each becomes a
:class:`core.metering.Correction` with the next revision. :func:`diff` sums the corrections
per org and month for the operator; :func:`messages` cuts them into the per-org correction
messages the worker applies (:meth:`core.metering.Meter.reprice`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from core.errors import RejectedEvent
from core.metering import Correction
from core.periods import month_of
from core.pricing import PriceTable
from core.usage import PricedEvent
from core.validation import check_cost

MAX_CORRECTIONS_PER_MESSAGE = 500
"""A correction carries one priced record (~200 bytes): 500 keep a message near 100 KB, far
below Kafka's 1 MB default limit."""


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One billed event as the ledger holds it, with where it was read from usage.events."""

    priced: PricedEvent
    source_partition: int
    source_offset: int


@dataclass(slots=True)
class ReplayPlan:
    """What a replay found: the corrections, and what it scanned and could not re-price."""

    corrections: list[Correction] = field(default_factory=list)
    in_range: int = 0
    unchanged: int = 0
    unpriceable: list[tuple[LedgerEntry, str]] = field(default_factory=list)
    versions_used: set[str] = field(default_factory=set)


def plan(
    entries: Iterable[LedgerEntry], prices: PriceTable, since_ms: int, until_ms: int | None
) -> ReplayPlan:
    """Re-price the entries with ``occurred_at`` in ``[since_ms, until_ms)`` (no end when
    ``until_ms`` is None).

    An entry the table can no longer price (its model or version was removed, or its new cost
    exceeds the per-request maximum) is reported in ``unpriceable`` with the reason and left
    as billed: a replay never zeroes an invoice line.
    """
    result = ReplayPlan()
    end = until_ms if until_ms is not None else float("inf")
    for entry in entries:
        event = entry.priced.event
        if not since_ms <= event.occurred_at_ms < end:
            continue
        result.in_range += 1
        try:
            price = prices.price(event.model, event.usage, event.occurred_at_ms)
            check_cost(price.cost_nano)  # as the worker: beyond the maximum is refused
        except RejectedEvent as rejected:
            result.unpriceable.append((entry, f"{rejected.reason.value}: {rejected.detail}"))
            continue
        result.versions_used.add(price.pricing_version)
        old = entry.priced.price
        if price == old:
            result.unchanged += 1
            continue
        result.corrections.append(
            Correction(
                PricedEvent(event, price, revision=entry.priced.revision + 1),
                old.cost_nano,
                old.pricing_version,
                entry.source_partition,
                entry.source_offset,
            )
        )
    return result


@dataclass(slots=True)
class MonthDiff:
    """One org's month: the re-priced events' cost before and after (nano-USD)."""

    org_id: str
    month: str
    events: int = 0
    old_cost_nano: int = 0
    new_cost_nano: int = 0
    old_extra_nano: int = 0
    new_extra_nano: int = 0

    @property
    def delta_nano(self) -> int:
        return self.new_cost_nano - self.old_cost_nano

    @property
    def extra_delta_nano(self) -> int:
        return self.new_extra_nano - self.old_extra_nano


def diff(corrections: Iterable[Correction]) -> list[MonthDiff]:
    """Per (org, month) sums of the corrections, sorted by org then month."""
    rows: dict[tuple[str, str], MonthDiff] = {}
    for correction in corrections:
        event = correction.priced.event
        month = month_of(event.occurred_at_ms)
        row = rows.get((event.org_id, month))
        if row is None:
            row = rows[(event.org_id, month)] = MonthDiff(event.org_id, month)
        new = correction.priced.price.cost_nano
        row.events += 1
        row.old_cost_nano += correction.old_cost_nano
        row.new_cost_nano += new
        if event.extra_usage:
            row.old_extra_nano += correction.old_cost_nano
            row.new_extra_nano += new
    return [rows[key] for key in sorted(rows)]


def messages(
    corrections: Iterable[Correction], size: int = MAX_CORRECTIONS_PER_MESSAGE
) -> Iterator[tuple[str, int, list[Correction], bool]]:
    """``(org_id, index, corrections, final)`` per correction message: each org's corrections
    in ledger order, ``size`` at a time, the org's last message marked ``final``."""
    by_org: dict[str, list[Correction]] = {}
    for correction in corrections:
        by_org.setdefault(correction.priced.event.org_id, []).append(correction)
    for org_id in sorted(by_org):
        items = by_org[org_id]
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        for index, chunk in enumerate(chunks):
            yield org_id, index, chunk, index == len(chunks) - 1
