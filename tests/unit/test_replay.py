"""Replay in the pure core: planning corrections from the ledger, applying them exactly once to
the dedupe records and totals, and the enforcer's REPRICED re-decision."""

from __future__ import annotations

import copy
import random
from dataclasses import replace

import pytest

from core.enforcement import (
    REPRICING_WINDOW_MS,
    Action,
    ControlMessage,
    Enforcer,
    OrgPolicy,
    Reason,
    Repriced,
    SetCap,
)
from core.metering import Correction, Meter, Status
from core.periods import iso_to_ms, month_of
from core.pricing import PriceTable, PriceVersion, default_price_table_path
from core.replay import LedgerEntry, diff, messages, plan
from core.totals import MonthTotals, org_key
from core.usage import Plan, PricedEvent, Product, SeatTier, TokenUsage, UsageEvent

OLD = PriceTable.load(default_price_table_path())
FIX = iso_to_ms("2026-10-01T00:00:00Z")
MODELS = ("claude-3-5-haiku-latest", "claude-opus-4-1", "claude-sonnet-4-0")


def fixed_table() -> PriceTable:
    """The shipped table plus a version from 2026-10-01: Haiku input $1 (was $0.80), Opus 4.1
    output $60 (was $75)."""
    first = OLD.versions[0]
    families = dict(first.families)
    haiku, opus = families["haiku-3.5"], families["opus-4.1"]
    families["haiku-3.5"] = replace(haiku, standard=replace(haiku.standard, input=1_000))
    families["opus-4.1"] = replace(opus, standard=replace(opus.standard, output=60_000))
    fixed = PriceVersion("2026-10-01", FIX, families, dict(first.aliases))
    return PriceTable([first, fixed])


NEW = fixed_table()


def events(count: int = 300, seed: int = 3) -> list[tuple[UsageEvent, int]]:
    """(event, offset) pairs of two orgs around the fix, with some re-sent duplicates."""
    rng = random.Random(seed)
    start, end = iso_to_ms("2026-09-10T00:00:00Z"), iso_to_ms("2026-11-20T00:00:00Z")
    out = []
    for index in range(count):
        org = rng.choice(("org-a", "org-b"))
        event = UsageEvent(
            event_id=f"e{index}",
            occurred_at_ms=rng.randrange(start, end),
            org_id=org,
            plan=Plan.TEAM if org == "org-a" else Plan.ENTERPRISE,
            user_id=f"u{rng.randrange(3)}",
            seat_tier=rng.choice((SeatTier.STANDARD, SeatTier.PREMIUM)),
            product=Product.CLAUDE,
            model=rng.choice(MODELS),
            usage=TokenUsage(rng.randrange(300_000), rng.randrange(9_000), 0, 0),
            extra_usage=rng.random() < 0.6,
        )
        out.append(event)
    for original in rng.sample(out, 20):
        out.append(original)  # a duplicate: counted once
    return [(event, offset) for offset, event in enumerate(out)]


def meter_all(prices: PriceTable, stream: list[tuple[UsageEvent, int]]) -> tuple[dict, dict, list]:
    seen: dict = {}
    totals: dict = {}
    meter = Meter(prices, seen, totals)
    ledger = []
    for event, offset in stream:
        outcome = meter.process(event, offset)
        if outcome.status is Status.APPLIED:
            assert outcome.priced is not None
            ledger.append(LedgerEntry(outcome.priced, 0, offset))
    return seen, totals, ledger


def apply_messages(meter: Meter, corrections: list[Correction], first_offset: int = 100) -> None:
    for offset, (_, _, chunk, _) in enumerate(messages(corrections, size=7), first_offset):
        meter.reprice(chunk, offset)


def test_corrected_totals_equal_a_fresh_run_with_the_corrected_table() -> None:
    stream = events()
    seen, totals, ledger = meter_all(OLD, stream)
    _, fresh_totals, fresh_ledger = meter_all(NEW, stream)
    planned = plan(ledger, NEW, FIX, None)
    assert planned.corrections, "the fix must change some events"
    assert all(c.priced.event.occurred_at_ms >= FIX for c in planned.corrections)
    apply_messages(Meter(NEW, seen, totals), planned.corrections)

    def money(table: dict) -> dict:
        return {
            k: (
                MonthTotals.of(v).cost_nano,
                MonthTotals.of(v).extra_cost_nano,
                MonthTotals.of(v).events,
            )
            for k, v in table.items()
        }

    assert money(totals) == money(fresh_totals)
    fresh_prices = {(e.priced.event.event_id): e.priced.price for e in fresh_ledger}
    for correction in planned.corrections:
        assert correction.priced.price == fresh_prices[correction.priced.event.event_id]
        assert correction.priced.revision == 1


def test_a_message_applies_once_whatever_a_crash_persisted() -> None:
    stream = events(120, seed=8)
    seen, totals, ledger = meter_all(OLD, stream)
    corrections = plan(ledger, NEW, FIX, None).corrections
    _, want, _ = meter_all(NEW, stream)
    chunk = corrections  # one message at offset 50

    # Delivered twice with everything persisted: the second delivery changes nothing.
    s1, t1 = copy.deepcopy(seen), copy.deepcopy(totals)
    first = Meter(NEW, s1, t1).reprice(chunk, 50)
    after_first = copy.deepcopy((s1, t1))
    again = Meter(NEW, s1, t1).reprice(chunk, 50)
    assert len(first.applied) == len(again.applied) == len(chunk) and not again.stale
    assert (s1, t1) == after_first and _costs(t1) == _costs(want)

    # The crash persisted the dedupe records but no total: the re-delivery fixes the totals.
    s2, t2 = copy.deepcopy(s1), copy.deepcopy(totals)
    Meter(NEW, s2, t2).reprice(chunk, 50)
    assert _costs(t2) == _costs(want)

    # ... or the totals but no dedupe record: still applied once.
    s3, t3 = copy.deepcopy(seen), copy.deepcopy(t1)
    Meter(NEW, s3, t3).reprice(chunk, 50)
    assert _costs(t3) == _costs(want) and s3 == s1

    # Another message carrying the same corrections (a second replay planned before the
    # first was applied) finds prices it was not computed from: stale, nothing applied.
    late = Meter(NEW, s1, t1).reprice(chunk, 51)
    assert not late.applied and len(late.stale) == len(chunk)
    assert _costs(t1) == _costs(want)


def _costs(totals: dict) -> dict:
    return {
        k: (MonthTotals.of(v).cost_nano, MonthTotals.of(v).extra_cost_nano)
        for k, v in totals.items()
    }


def test_usage_after_a_correction_keeps_the_correction_marker() -> None:
    stream = events(60, seed=4)
    seen, totals, ledger = meter_all(OLD, stream)
    corrections = plan(ledger, NEW, FIX, None).corrections
    meter = Meter(NEW, seen, totals)
    meter.reprice(corrections, 10)
    corrected = _costs(totals)
    later = replace(stream[-1][0], event_id="later")
    meter.process(later, 10_000)
    meter.reprice(corrections, 10)  # a re-delivery after newer usage: still once
    key = org_key(
        later.org_id,
        "2026-11"
        if later.occurred_at_ms >= iso_to_ms("2026-11-01T00:00:00Z")
        else "2026-10"
        if later.occurred_at_ms >= FIX
        else "2026-09",
    )
    cost = meter.prices.price(later.model, later.usage, later.occurred_at_ms).cost_nano
    assert MonthTotals.of(totals[key]).cost_nano == corrected[key][0] + cost


def test_plan_keeps_the_range_and_skips_unchanged_events() -> None:
    _, _, ledger = meter_all(OLD, events())
    until = iso_to_ms("2026-11-01T00:00:00Z")
    planned = plan(ledger, NEW, FIX, until)
    in_range = [e for e in ledger if FIX <= e.priced.event.occurred_at_ms < until]
    assert planned.in_range == len(in_range)
    # Every event in range changes version; only Haiku and Opus 4.1 change cost.
    assert len(planned.corrections) + planned.unchanged == len(in_range)
    assert planned.unchanged == 0
    assert planned.versions_used == {"2026-10-01"}
    sonnet = [c for c in planned.corrections if c.priced.event.model == "claude-sonnet-4-0"]
    assert sonnet and all(c.cost_delta_nano == 0 for c in sonnet)
    # Re-planning the corrected ledger finds nothing left to do.
    corrected = [
        LedgerEntry(c.priced, c.source_partition, c.source_offset) for c in planned.corrections
    ]
    assert plan(corrected, NEW, FIX, until).corrections == []


def test_diff_and_messages() -> None:
    _, _, ledger = meter_all(OLD, events())
    corrections = plan(ledger, NEW, FIX, None).corrections
    months = diff(corrections)
    assert sum(m.events for m in months) == len(corrections)
    assert sum(m.delta_nano for m in months) == sum(c.cost_delta_nano for c in corrections)
    assert {m.month for m in months} == {"2026-10", "2026-11"}
    cut = list(messages(corrections, size=10))
    assert sum(len(chunk) for _, _, chunk, _ in cut) == len(corrections)
    for org in {c.priced.event.org_id for c in corrections}:
        own = [(index, final) for o, index, _, final in cut if o == org]
        assert [index for index, _ in own] == list(range(len(own)))
        assert [final for _, final in own] == [False] * (len(own) - 1) + [True]


@pytest.mark.parametrize("final", [False, True])
def test_the_enforcer_re_decides_only_on_the_final_message(final: bool) -> None:
    enforcer = Enforcer()
    policy = OrgPolicy(plan="ENTERPRISE", period="2026-11")
    spend = {"value": 900}

    def lookup(period: str | None, user: str | None) -> int:
        return spend["value"] if user is None else 0

    cap = ControlMessage("m1", "org-a", 0, SetCap("ORG", 1_000))
    assert enforcer.on_control(policy, cap, 1, lookup, 0).events == []
    spend["value"] = 1_100  # the replay's corrections raised the month's spend
    step = enforcer.on_control(
        policy, ControlMessage("m2", "org-a", 0, Repriced(200, final)), 2, lookup, 0
    )
    if not final:
        assert step.events == [] and not policy.paused
        return
    assert [(e.action, e.reason) for e in step.events] == [(Action.PAUSE, Reason.REPRICED)]
    spend["value"] = 800
    step = enforcer.on_control(
        policy, ControlMessage("m3", "org-a", 0, Repriced(-300, True)), 3, lookup, 0
    )
    assert [(e.action, e.reason) for e in step.events] == [(Action.RESUME, Reason.REPRICED)]
    # A re-delivered message re-sends the same event, never a new one.
    again = enforcer.on_control(
        policy, ControlMessage("m3", "org-a", 0, Repriced(-300, True)), 3, lookup, 0
    )
    assert again.redelivered and [e.event_id for e in again.events] == [
        e.event_id for e in step.events
    ]


def test_a_team_balance_follows_the_corrected_extra_cost() -> None:
    enforcer = Enforcer()
    policy = OrgPolicy(plan="TEAM", period="2026-11", topups_nano=1_000, extra_total_nano=900)
    step = enforcer.on_control(
        policy,
        ControlMessage("m1", "org-a", 0, Repriced(150, True)),
        1,
        lambda period, user: 0,
        0,
    )
    assert policy.balance_nano == -50
    assert [(e.action, e.reason) for e in step.events] == [(Action.PAUSE, Reason.REPRICED)]


def org_a_usage() -> PricedEvent:
    """A usage event of the Enterprise org ``org-a`` in 2026-11, priced with the fix."""
    event = replace(events(40)[0][0], org_id="org-a", plan=Plan.ENTERPRISE)
    event = replace(event, occurred_at_ms=iso_to_ms("2026-11-20T00:00:00Z"))
    return PricedEvent(event, NEW.price(event.model, event.usage, event.occurred_at_ms))


def test_a_replay_that_never_sent_its_final_message_stops_labelling_usage() -> None:
    """A replay that died after an org's first correction message leaves the org marked as
    being repriced; its usage transitions are its own again after REPRICING_WINDOW_MS."""
    enforcer = Enforcer()
    policy = OrgPolicy(plan="ENTERPRISE", period="2026-11")
    spend = {"value": 700}

    def lookup(period: str | None, user: str | None) -> int:
        return spend["value"] if user is None else 0

    enforcer.on_control(
        policy, ControlMessage("m1", "org-a", 0, SetCap("ORG", 1_000)), 1, lookup, 0
    )
    enforcer.on_control(
        policy, ControlMessage("m2", "org-a", 0, Repriced(100, False)), 2, lookup, 1_000
    )
    stored = OrgPolicy.from_json(policy.to_json())
    assert stored.repricing and stored.repriced_at_ms == 1_000
    usage = org_a_usage()
    spend["value"] = 1_200  # this usage crosses the cap, long after the replay died
    step = enforcer.on_usage(stored, usage, 10, lookup, 1_000 + REPRICING_WINDOW_MS + 1)
    assert [(e.action, e.reason) for e in step.events if e.scope.value == "ORG"] == [
        (Action.PAUSE, Reason.CAP_REACHED)
    ]


def test_a_team_balance_corrected_to_zero_extra_cost_still_blocks() -> None:
    """SPEC: the balance blocks "after the org's first top-up or extra spend": a replay that
    corrects every extra cost of an org without top-ups to zero leaves it at a zero balance,
    still exhausted, and the policy remembers that across a store round trip."""
    enforcer = Enforcer()
    policy = OrgPolicy(plan="TEAM", period="2026-11", extra_total_nano=400, paused=True)
    step = enforcer.on_control(
        policy,
        ControlMessage("m1", "org-a", 0, Repriced(-400, True)),
        1,
        lambda period, user: 0,
        0,
    )
    assert policy.balance_nano == 0 and policy.paused and step.events == []
    stored = OrgPolicy.from_json(policy.to_json())
    assert stored.balance_tracked and stored.balance_nano == 0


class RecordingDict(dict):
    """A dict that remembers every key written (the write-behind state's changelog)."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.writes: list[str] = []

    def __setitem__(self, key: str, value: object) -> None:
        self.writes.append(key)
        super().__setitem__(key, value)


def test_a_redelivered_message_writes_its_totals_back() -> None:
    """A total that reached the local store but not the changelog before a crash is
    repaired by the re-delivery, as for usage: the value is written again."""
    stream = events(60, seed=5)
    seen, totals, ledger = meter_all(OLD, stream)
    corrections = plan(ledger, NEW, FIX, None).corrections
    Meter(NEW, seen, totals).reprice(corrections, 7)
    recording = RecordingDict(totals)
    Meter(NEW, seen, recording).reprice(corrections, 7)
    touched = {
        org_key(c.priced.event.org_id, month_of(c.priced.event.occurred_at_ms)) for c in corrections
    }
    assert touched <= set(recording.writes)
    assert recording == totals


def test_usage_between_an_orgs_correction_messages_reports_repriced() -> None:
    enforcer = Enforcer()
    policy = OrgPolicy(plan="ENTERPRISE", period="2026-11")
    spend = {"value": 1_200}

    def lookup(period: str | None, user: str | None) -> int:
        return spend["value"] if user is None else 0

    enforcer.on_control(
        policy, ControlMessage("m1", "org-a", 0, SetCap("ORG", 1_000)), 1, lookup, 0
    )
    assert policy.paused
    # First of two correction messages: lowers spend, no decision yet.
    spend["value"] = 700
    first = enforcer.on_control(
        policy, ControlMessage("m2", "org-a", 0, Repriced(-500, False)), 2, lookup, 0
    )
    assert first.events == [] and policy.repricing
    assert OrgPolicy.from_json(policy.to_json()).repricing
    # Live usage in between: the resume it causes is the correction's doing.
    usage = org_a_usage()
    step = enforcer.on_usage(policy, usage, 10, lookup, 0)
    assert [(e.action, e.reason) for e in step.events if e.scope.value == "ORG"] == [
        (Action.RESUME, Reason.REPRICED)
    ]
    final = enforcer.on_control(
        policy, ControlMessage("m3", "org-a", 0, Repriced(0, True)), 3, lookup, 0
    )
    assert not policy.repricing and [e for e in final.events if e.scope.value == "ORG"] == []
