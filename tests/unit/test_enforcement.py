"""The enforcement state machine (SPEC §5), case by case.

Most cases are one row of :data:`CASES`: a plan, the inputs that build the org's policy, one
more input, and the PAUSE / RESUME / RELOAD_REQUESTED events that input must emit, each as
``(action, scope, reason, user_id, limit_source, spend, limit)`` with money in whole USD
(RELOAD_REQUESTED rows add the reload amount and the balance). The :class:`Harness` drives the
enforcer the way the worker does: a usage event is added to the monthly extra-cost totals
*before* enforcement sees it, and each input gets the next offset of its topic.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal

import pytest

from core.enforcement import (
    Action,
    Command,
    ControlMessage,
    EnforcementEvent,
    Enforcer,
    OrgPolicy,
    PeriodTick,
    SetAutoReload,
    SetCap,
    SetEnabled,
    Step,
    TopUp,
    describe,
)
from core.errors import DeadLetterReason, RejectedEvent
from core.periods import iso_to_ms
from core.usage import (
    NANO_PER_USD,
    Plan,
    Price,
    PricedEvent,
    Product,
    SeatTier,
    TokenUsage,
    UsageEvent,
)

TEAM, ENTERPRISE = Plan.TEAM, Plan.ENTERPRISE
STD, PRE = "STANDARD", "PREMIUM"
FEB, MARCH, APRIL = "2026-02", "2026-03", "2026-04"
ORG = "org-1"
GRACE_MS = 3_600_000  # the Enforcer's default grace, one hour


def usd(amount: int | str | None) -> int | None:
    """Whole or decimal USD -> nano-USD (None stays None: unlimited)."""
    if amount is None:
        return None
    return int(Decimal(str(amount)) * NANO_PER_USD)


# -- inputs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Use:
    """One usage event of the org: ``cost`` USD at list price, extra usage unless told."""

    user: str
    cost: int | str
    tier: str = STD
    month: str = MARCH
    extra: bool = True


def use(user: str, cost: int | str, tier: str = STD, month: str = MARCH, extra: bool = True) -> Use:
    return Use(user, cost, tier, month, extra)


@dataclass(frozen=True)
class Control:
    command: Command


def org_cap(amount: int | None) -> Control:
    return Control(SetCap("ORG", usd(amount)))


def tier_cap(tier: str, amount: int | None) -> Control:
    return Control(SetCap("SEAT_TIER", usd(amount), seat_tier=tier))


def user_cap(user: str, amount: int | None) -> Control:
    return Control(SetCap("USER", usd(amount), user_id=user))


def disable(user: str | None = None) -> Control:
    return Control(SetEnabled(False, user))


def enable(user: str | None = None) -> Control:
    return Control(SetEnabled(True, user))


def top_up(purchase_id: str, amount: int) -> Control:
    return Control(TopUp(purchase_id, usd(amount) or 0))


def auto_reload(threshold: int, amount: int) -> Control:
    return Control(SetAutoReload(True, usd(threshold), usd(amount)))


def auto_reload_off() -> Control:
    return Control(SetAutoReload(False))


def tick(wall_clock: str) -> Control:
    return Control(PeriodTick(iso_to_ms(wall_clock)))


Input = Use | Control


class Harness:
    """One org's policy, its monthly extra-cost totals and its two input topics."""

    def __init__(self, plan: Plan, enforcer: Enforcer | None = None, org_id: str = ORG) -> None:
        self.plan = plan
        self.org_id = org_id
        self.enforcer = enforcer or Enforcer()
        self.policy = OrgPolicy()
        self.totals: dict[tuple[str, str | None], int] = {}
        self.offsets = {"usage": -1, "control": -1}
        self.sequence = 0
        self.now_ms = iso_to_ms("2026-03-20T00:00:00Z")
        self.sent: dict[tuple[str, int], PricedEvent | ControlMessage] = {}

    def spend(self, period: str | None, user_id: str | None) -> int:
        return self.totals.get((period, user_id), 0) if period else 0

    def apply(self, item: Input) -> Step:
        self.sequence += 1
        self.now_ms += 1_000
        if isinstance(item, Use):
            return self.apply_usage(item)
        return self.apply_control(item)

    def apply_usage(self, item: Use) -> Step:
        cost = usd(item.cost) or 0
        event = UsageEvent(
            event_id=f"e{self.sequence}",
            occurred_at_ms=iso_to_ms(f"{item.month}-15T12:00:00Z"),
            org_id=self.org_id,
            plan=self.plan,
            user_id=item.user,
            seat_tier=SeatTier(item.tier),
            product=Product.CLAUDE_CODE,
            model="claude-sonnet-4-20250514",
            usage=TokenUsage(1_000, 100, 0, 0),
            extra_usage=item.extra,
        )
        if item.extra:  # the worker adds the event to the totals before enforcement sees it
            for user in (None, item.user):
                key = (item.month, user)
                self.totals[key] = self.totals.get(key, 0) + cost
        offset = self.offsets["usage"] = self.offsets["usage"] + 1
        self.sent["usage", offset] = PricedEvent(event, Price("Sonnet 4", "v1", False, cost))
        return self.redeliver("usage", offset)

    def apply_control(self, item: Control) -> Step:
        message = ControlMessage(f"m{self.sequence}", self.org_id, self.now_ms, item.command)
        offset = self.offsets["control"] = self.offsets["control"] + 1
        self.sent["control", offset] = message
        return self.redeliver("control", offset)

    def redeliver(self, topic: str, offset: int) -> Step:
        """(Re-)deliver what was sent at ``offset`` of ``topic``, as the worker would."""
        sent = self.sent[topic, offset]
        if isinstance(sent, PricedEvent):
            return self.enforcer.on_usage(self.policy, sent, offset, self.spend, self.now_ms)
        return self.enforcer.on_control(self.policy, sent, offset, self.spend, self.now_ms)

    def run(self, items: list[Input]) -> list[EnforcementEvent]:
        events: list[EnforcementEvent] = []
        for item in items:
            events.extend(self.apply(item).events)
        return events

    def snapshot(self) -> str:
        return json.dumps(self.policy.to_json(), sort_keys=True)


# -- expected events ------------------------------------------------------------------------

Row = tuple[object, ...]


def row(event: EnforcementEvent) -> Row:
    """What a case asserts of an emitted event (money in nano-USD)."""
    base: Row = (
        event.action.value,
        event.scope.value,
        event.reason.value,
        event.user_id,
        event.limit_source.value if event.limit_source else None,
        event.spend_nano_usd,
        event.limit_nano_usd,
    )
    if event.action is Action.RELOAD_REQUESTED:
        return (*base, event.amount_nano_usd, event.balance_nano_usd)
    return base


def _transition(
    action: str, reason: str, user: str | None, source: str | None, spend: int, limit: int | None
) -> Row:
    scope = "ORG" if user is None else "USER"
    return (action, scope, reason, user, source, usd(spend), usd(limit))


def pause(reason: str, user: str | None, source: str, spend: int, limit: int | None) -> Row:
    return _transition("PAUSE", reason, user, source, spend, limit)


def resume(reason: str, user: str | None, source: str | None, spend: int, limit: int | None) -> Row:
    return _transition("RESUME", reason, user, source, spend, limit)


def reload_requested(spend: int, topups: int, amount: int, balance: int) -> Row:
    """RELOAD_REQUESTED: cumulative extra cost, cumulative top-ups, reload amount, balance."""
    return (
        "RELOAD_REQUESTED",
        "ORG",
        "BALANCE_LOW",
        None,
        "BALANCE",
        usd(spend),
        usd(topups),
        usd(amount),
        usd(balance),
    )


def case(
    case_id: str,
    plan: Plan,
    setup: list[Input],
    trigger: Input,
    expected: list[Row],
    *,
    period_timer: bool = True,
    marks: tuple[pytest.MarkDecorator, ...] = (),
) -> object:
    return pytest.param(plan, setup, trigger, expected, period_timer, id=case_id, marks=marks)


E, T = ENTERPRISE, TEAM
APRIL_AFTER_GRACE = "2026-04-01T01:00:00Z"
APRIL_BEFORE_GRACE = "2026-04-01T00:59:59.999Z"

CASES = [
    # -- PAUSE CAP_REACHED: usage crosses a cap; the crossing request counts in full ----------
    case(
        "pause/cap-reached/org-cap",
        E,
        [org_cap(10), use("ann", 6)],
        use("bob", 5),
        [pause("CAP_REACHED", None, "ORG", 11, 10)],
    ),
    case(
        "pause/cap-reached/user-cap",
        E,
        [user_cap("ann", 5), use("ann", 3)],
        use("ann", 4),
        [pause("CAP_REACHED", "ann", "USER", 7, 5)],
    ),
    case(
        "pause/cap-reached/seat-tier-cap-exactly-reached",
        E,
        [tier_cap(PRE, 5), use("ann", 3, PRE)],
        use("ann", 2, PRE),
        [pause("CAP_REACHED", "ann", "SEAT_TIER", 5, 5)],
    ),
    case(
        "pause/cap-reached/user-cap-of-a-team-org",
        T,
        [top_up("p1", 100), user_cap("ann", 5), use("ann", 3)],
        use("ann", 3),
        [pause("CAP_REACHED", "ann", "USER", 6, 5)],
    ),
    case(
        "pause/cap-reached/tier-change-by-usage-into-lower-cap",
        E,
        [tier_cap(STD, 5), use("ann", 8, PRE)],
        use("ann", 1, STD),
        [pause("CAP_REACHED", "ann", "SEAT_TIER", 9, 5)],
    ),
    case(
        "pause/cap-reached/tier-change-by-included-usage",
        E,
        [tier_cap(STD, 5), use("ann", 8, PRE)],
        use("ann", 1, STD, extra=False),
        [pause("CAP_REACHED", "ann", "SEAT_TIER", 8, 5)],
    ),
    case(
        "pause/cap-reached/other-tier-member-untouched",
        E,
        [tier_cap(STD, 5), use("ann", 4, STD), use("bob", 4, PRE)],
        use("bob", 4, PRE),
        [],
    ),
    case(
        "no-event/below-cap",
        E,
        [user_cap("ann", 5), use("ann", 3)],
        use("ann", "1.999999999"),
        [],
    ),
    case(
        "no-event/included-usage-does-not-count",
        E,
        [user_cap("ann", 5), org_cap(5), use("ann", 4)],
        use("ann", 50, extra=False),
        [],
    ),
    case(
        "no-event/already-paused-user-spends-more",
        E,
        [user_cap("ann", 5), use("ann", 6)],
        use("ann", 6),
        [],
    ),
    # -- PAUSE CAP_LOWERED: a cap change, effective at once ----------------------------------
    case(
        "pause/cap-lowered/org",
        E,
        [use("ann", 6)],
        org_cap(5),
        [pause("CAP_LOWERED", None, "ORG", 6, 5)],
    ),
    case(
        "pause/cap-lowered/tier-every-member-over-it",
        E,
        [use("ann", 6), use("bob", 7), use("cat", 9, PRE), use("dan", 3)],
        tier_cap(STD, 5),
        [
            pause("CAP_LOWERED", "ann", "SEAT_TIER", 6, 5),
            pause("CAP_LOWERED", "bob", "SEAT_TIER", 7, 5),
        ],
    ),
    case(
        "pause/cap-lowered/user",
        E,
        [use("ann", 6)],
        user_cap("ann", 5),
        [pause("CAP_LOWERED", "ann", "USER", 6, 5)],
    ),
    case(
        "pause/cap-lowered/user-cap-zero-before-any-usage",
        E,
        [],
        user_cap("ann", 0),
        [pause("CAP_LOWERED", "ann", "USER", 0, 0)],
    ),
    case(
        "pause/cap-lowered/org-cap-zero-before-any-usage",
        T,
        [],
        org_cap(0),
        [pause("CAP_LOWERED", None, "ORG", 0, 0)],
    ),
    case(
        "no-event/cap-lowered-but-not-reached",
        E,
        [use("ann", 6)],
        user_cap("ann", 7),
        [],
    ),
    # -- PAUSE DISABLED ------------------------------------------------------------------------
    case(
        "pause/disabled/org", E, [use("ann", 2)], disable(), [pause("DISABLED", None, "ORG", 2, 0)]
    ),
    case(
        "pause/disabled/user",
        E,
        [use("ann", 2)],
        disable("ann"),
        [pause("DISABLED", "ann", "USER", 2, 0)],
    ),
    case(
        "pause/disabled/member-before-any-usage",
        T,
        [],
        disable("bob"),
        [pause("DISABLED", "bob", "USER", 0, 0)],
    ),
    case(
        "no-event/disabling-a-user-already-paused-by-a-cap",
        E,
        [user_cap("ann", 1), use("ann", 2)],
        disable("ann"),
        [],
    ),
    # -- PAUSE BALANCE_EXHAUSTED (Team) ------------------------------------------------------
    case(
        "pause/balance-exhausted/first-extra-spend-without-top-up",
        T,
        [],
        use("ann", 1),
        [pause("BALANCE_EXHAUSTED", None, "BALANCE", 1, 0)],
    ),
    case(
        "no-event/team-included-usage-without-top-up",
        T,
        [],
        use("ann", 1, extra=False),
        [],
    ),
    case(
        "pause/balance-exhausted/spend-past-the-top-ups",
        T,
        [top_up("p1", 10), use("ann", 6)],
        use("bob", 5),
        [pause("BALANCE_EXHAUSTED", None, "BALANCE", 11, 10)],
    ),
    case(
        "pause/balance-exhausted/balance-exactly-zero",
        T,
        [top_up("p1", 10), use("ann", 4)],
        use("ann", 6),
        [pause("BALANCE_EXHAUSTED", None, "BALANCE", 10, 10)],
    ),
    case(
        "pause/balance-exhausted/across-months",
        T,
        [top_up("p1", 10), use("ann", 6, month=MARCH)],
        use("ann", 5, month=APRIL),
        [pause("BALANCE_EXHAUSTED", None, "BALANCE", 11, 10)],
    ),
    case(
        "no-event/enterprise-has-no-balance",
        E,
        [],
        use("ann", 1_000),
        [],
    ),
    # -- RESUME CAP_RAISED ---------------------------------------------------------------------
    case(
        "resume/cap-raised/org",
        E,
        [org_cap(5), use("ann", 6)],
        org_cap(10),
        [resume("CAP_RAISED", None, "ORG", 6, 10)],
    ),
    case(
        "resume/cap-raised/user",
        E,
        [user_cap("ann", 5), use("ann", 6)],
        user_cap("ann", 7),
        [resume("CAP_RAISED", "ann", "USER", 6, 7)],
    ),
    case(
        "resume/cap-raised/tier",
        E,
        [tier_cap(STD, 5), use("ann", 6), use("bob", 9)],
        tier_cap(STD, 8),
        [resume("CAP_RAISED", "ann", "SEAT_TIER", 6, 8)],
    ),
    case(
        "no-event/cap-raised-to-exactly-the-spend",
        E,
        [user_cap("ann", 5), use("ann", 6)],
        user_cap("ann", 6),
        [],
    ),
    case(
        "resume/cap-raised/tier-change-by-usage",
        E,
        [tier_cap(STD, 5), tier_cap(PRE, 20), use("ann", 6, STD)],
        use("ann", 1, PRE),
        [resume("CAP_RAISED", "ann", "SEAT_TIER", 7, 20)],
    ),
    case(
        "resume/cap-raised/tier-change-by-usage-into-unlimited-tier",
        E,
        [tier_cap(STD, 5), use("ann", 6, STD)],
        use("ann", 1, PRE, extra=False),
        [resume("CAP_RAISED", "ann", None, 6, None)],
    ),
    # -- RESUME CAP_REMOVED --------------------------------------------------------------------
    case(
        "resume/cap-removed/org",
        E,
        [org_cap(5), use("ann", 6)],
        org_cap(None),
        [resume("CAP_REMOVED", None, None, 6, None)],
    ),
    case(
        "resume/cap-removed/user",
        E,
        [user_cap("ann", 5), use("ann", 6)],
        user_cap("ann", None),
        [resume("CAP_REMOVED", "ann", None, 6, None)],
    ),
    case(
        "resume/cap-removed/tier",
        E,
        [tier_cap(STD, 5), use("ann", 6)],
        tier_cap(STD, None),
        [resume("CAP_REMOVED", "ann", None, 6, None)],
    ),
    case(
        "resume/cap-removed/user-unlimited-tier-cap-now-binding-but-not-reached",
        E,
        [tier_cap(STD, 10), user_cap("ann", 4), use("ann", 6)],
        user_cap("ann", None),
        [resume("CAP_REMOVED", "ann", "SEAT_TIER", 6, 10)],
    ),
    case(
        "no-event/user-unlimited-still-over-seat-tier-cap",
        E,
        [tier_cap(STD, 5), user_cap("ann", 4), use("ann", 6)],
        user_cap("ann", None),
        [],
    ),
    # -- RESUME ENABLED ------------------------------------------------------------------------
    case(
        "resume/enabled/org",
        E,
        [disable(), use("ann", 2)],
        enable(),
        [resume("ENABLED", None, None, 2, None)],
    ),
    case(
        "resume/enabled/user",
        E,
        [disable("ann"), use("ann", 2)],
        enable("ann"),
        [resume("ENABLED", "ann", None, 2, None)],
    ),
    case(
        "resume/enabled/user-reports-its-cap",
        E,
        [user_cap("ann", 5), disable("ann"), use("ann", 2)],
        enable("ann"),
        [resume("ENABLED", "ann", "USER", 2, 5)],
    ),
    case(
        "no-event/enabling-a-user-still-over-a-cap",
        E,
        [user_cap("ann", 1), disable("ann"), use("ann", 2)],
        enable("ann"),
        [],
    ),
    case(
        "no-event/enabling-an-org-still-over-its-cap",
        E,
        [org_cap(1), disable(), use("ann", 2)],
        enable(),
        [],
    ),
    case(
        "no-event/enabling-a-team-org-with-exhausted-balance",
        T,
        [disable(), use("ann", 2)],
        enable(),
        [],
    ),
    case("no-event/enabling-what-was-never-disabled", E, [use("ann", 2)], enable("ann"), []),
    # -- RESUME PERIOD_RESET -------------------------------------------------------------------
    case(
        "resume/period-reset/usage-of-a-newer-month",
        E,
        [org_cap(5), user_cap("ann", 3), use("ann", 6)],
        use("bob", 1, month=APRIL),
        [
            resume("PERIOD_RESET", None, "ORG", 0, 5),
            resume("PERIOD_RESET", "ann", "USER", 0, 3),
        ],
    ),
    case(
        "resume/period-reset/then-the-new-months-event-crosses-again",
        E,
        [user_cap("ann", 3), use("ann", 6)],
        use("ann", 4, month=APRIL),
        [
            resume("PERIOD_RESET", "ann", "USER", 0, 3),
            pause("CAP_REACHED", "ann", "USER", 4, 3),
        ],
    ),
    case(
        "resume/period-reset/tick-after-the-grace",
        E,
        [user_cap("ann", 3), org_cap(4), use("ann", 6)],
        tick(APRIL_AFTER_GRACE),
        [
            resume("PERIOD_RESET", None, "ORG", 0, 4),
            resume("PERIOD_RESET", "ann", "USER", 0, 3),
        ],
    ),
    case(
        "no-event/tick-before-the-grace",
        E,
        [user_cap("ann", 3), use("ann", 6)],
        tick(APRIL_BEFORE_GRACE),
        [],
    ),
    case(
        "no-event/tick-ignored-with-period-timer-off",
        E,
        [user_cap("ann", 3), use("ann", 6)],
        tick("2026-04-15T00:00:00Z"),
        [],
        period_timer=False,
    ),
    case(
        "no-event/tick-before-the-orgs-first-usage",
        E,
        [user_cap("ann", 0)],
        tick("2026-05-15T00:00:00Z"),
        [],
    ),
    case(
        "no-event/event-of-the-old-month-after-a-tick-is-late",
        E,
        [user_cap("ann", 3), use("ann", 2), tick(APRIL_AFTER_GRACE)],
        use("ann", 5, month=MARCH),
        [],
    ),
    case(
        "resume/period-reset/cap-of-zero-stays-paused",
        E,
        [user_cap("ann", 0), user_cap("bob", 2), use("ann", 1), use("bob", 3)],
        tick(APRIL_AFTER_GRACE),
        [resume("PERIOD_RESET", "bob", "USER", 0, 2)],
    ),
    case(
        "resume/period-reset/org-cap-of-zero-stays-paused",
        E,
        [org_cap(0), user_cap("bob", 2), use("bob", 3)],
        use("ann", 0, month=APRIL, extra=False),
        [resume("PERIOD_RESET", "bob", "USER", 0, 2)],
    ),
    case(
        "resume/period-reset/disabled-member-stays-paused",
        E,
        [disable("ann"), user_cap("bob", 2), use("ann", 1), use("bob", 3)],
        tick(APRIL_AFTER_GRACE),
        [resume("PERIOD_RESET", "bob", "USER", 0, 2)],
    ),
    case(
        "no-event/period-reset-disabled-org-stays-paused",
        E,
        [disable(), use("ann", 1)],
        use("ann", 1, month=APRIL),
        [],
    ),
    case(
        "resume/period-reset/exhausted-team-balance-stays-paused",
        T,
        [top_up("p1", 5), user_cap("bob", 2), use("ann", 4), use("bob", 3)],
        tick(APRIL_AFTER_GRACE),
        [resume("PERIOD_RESET", "bob", "USER", 0, 2)],
    ),
    case(
        "no-event/period-reset-exhausted-team-balance-by-usage",
        T,
        [top_up("p1", 5), use("ann", 6)],
        use("ann", 0, month=APRIL, extra=False),
        [],
    ),
    # -- RESUME BALANCE_TOPPED_UP --------------------------------------------------------------
    case(
        "resume/balance-topped-up",
        T,
        [top_up("p1", 5), use("ann", 6)],
        top_up("p2", 10),
        [resume("BALANCE_TOPPED_UP", None, None, 6, None)],
    ),
    case(
        "resume/balance-topped-up/first-spend-without-top-up",
        T,
        [use("ann", 2)],
        top_up("p1", 3),
        [resume("BALANCE_TOPPED_UP", None, None, 2, None)],
    ),
    case(
        "no-event/repeated-purchase-id-applied-once",
        T,
        [top_up("p1", 5), use("ann", 6)],
        top_up("p1", 5),
        [],
    ),
    case(
        "no-event/top-up-to-exactly-zero-balance",
        T,
        [top_up("p1", 5), use("ann", 6)],
        top_up("p2", 1),
        [],
    ),
    case(
        "no-event/topped-up-but-still-over-the-org-cap",
        T,
        [org_cap(5), top_up("p1", 5), use("ann", 6)],
        top_up("p2", 10),
        [],
    ),
    # -- RELOAD_REQUESTED (Team auto-reload) ---------------------------------------------------
    case(
        "reload/downward-crossing-to-the-threshold",
        T,
        [top_up("p1", 10), auto_reload(3, 20), use("ann", 5)],
        use("ann", 2),
        [reload_requested(spend=7, topups=10, amount=20, balance=3)],
    ),
    case(
        "reload/not-again-on-the-next-event-below",
        T,
        [top_up("p1", 10), auto_reload(3, 20), use("ann", 5), use("ann", 2)],
        use("ann", 1),
        [],
    ),
    case(
        "reload/again-after-a-top-up-lifts-the-balance-above",
        T,
        [top_up("p1", 10), auto_reload(3, 20), use("ann", 7), top_up("p2", 20)],
        use("ann", 20),
        [reload_requested(spend=27, topups=30, amount=20, balance=3)],
    ),
    case(
        "reload/not-again-after-a-top-up-that-stays-at-the-threshold",
        T,
        [top_up("p1", 10), auto_reload(3, 20), use("ann", 8), top_up("p2", 1)],
        use("ann", 1),
        [],
    ),
    case(
        "reload/on-enabling-while-below",
        T,
        [top_up("p1", 10), use("ann", 8)],
        auto_reload(5, 20),
        [reload_requested(spend=8, topups=10, amount=20, balance=2)],
    ),
    case(
        "reload/on-enabling-while-exactly-at",
        T,
        [top_up("p1", 10), use("ann", 5)],
        auto_reload(5, 20),
        [reload_requested(spend=5, topups=10, amount=20, balance=5)],
    ),
    case(
        "reload/not-on-enabling-while-above",
        T,
        [top_up("p1", 10), use("ann", 4)],
        auto_reload(5, 20),
        [],
    ),
    case(
        "reload/not-again-when-the-same-setting-is-sent-again",
        T,
        [top_up("p1", 10), use("ann", 8), auto_reload(5, 20)],
        auto_reload(5, 20),
        [],
    ),
    case(
        "reload/once-when-a-raised-threshold-passes-the-balance",
        T,
        [top_up("p1", 10), auto_reload(3, 20), use("ann", 5)],
        auto_reload(6, 20),
        [reload_requested(spend=5, topups=10, amount=20, balance=5)],
    ),
    case(
        "reload/again-on-enabling-after-turning-it-off",
        T,
        [top_up("p1", 10), use("ann", 8), auto_reload(5, 20), auto_reload_off()],
        auto_reload(5, 20),
        [reload_requested(spend=8, topups=10, amount=20, balance=2)],
    ),
    case(
        "reload/again-when-a-lowered-threshold-is-crossed",
        T,
        [top_up("p1", 10), use("ann", 8), auto_reload(5, 20), auto_reload(1, 20)],
        use("ann", 1),
        [reload_requested(spend=9, topups=10, amount=20, balance=1)],
    ),
    case(
        "reload/then-pause-when-one-event-exhausts-the-balance",
        T,
        [top_up("p1", 10), auto_reload(3, 20), use("ann", 5)],
        use("ann", 6),
        [
            reload_requested(spend=11, topups=10, amount=20, balance=-1),
            pause("BALANCE_EXHAUSTED", None, "BALANCE", 11, 10),
        ],
    ),
    case(
        "reload/none-once-turned-off",
        T,
        [top_up("p1", 10), auto_reload(3, 20), auto_reload_off(), use("ann", 5)],
        use("ann", 3),
        [],
    ),
    case(
        "reload/late-event-crossing-requests-a-reload",
        T,
        [top_up("p1", 10), auto_reload(3, 20), use("ann", 5, month=APRIL)],
        use("ann", 3, month=MARCH),
        [reload_requested(spend=8, topups=10, amount=20, balance=2)],
    ),
    # -- late events: counted, never pause or resume -------------------------------------------
    case(
        "late/exhausting-the-team-balance-does-not-pause",
        T,
        [top_up("p1", 10), use("ann", 5, month=APRIL)],
        use("ann", 6, month=MARCH),
        [],
    ),
    case(
        "late/spend-is-in-the-balance-the-next-event-sees",
        T,
        [top_up("p1", 10), use("ann", 5, month=APRIL), use("ann", 6, month=MARCH)],
        use("ann", 1, month=APRIL, extra=False),
        [pause("BALANCE_EXHAUSTED", None, "BALANCE", 11, 10)],
    ),
    case(
        "late/over-a-cap-in-its-month-does-not-pause",
        E,
        [user_cap("ann", 5), org_cap(5), use("ann", 1, month=APRIL)],
        use("ann", 10, month=MARCH),
        [],
    ),
    case(
        "late/tier-change-does-not-resume",
        E,
        [tier_cap(STD, 5), use("ann", 6, STD, month=APRIL)],
        use("ann", 1, PRE, month=MARCH),
        [],
    ),
    case(
        "late/tier-is-not-the-members-current-tier",
        E,
        [tier_cap(STD, 5), use("ann", 4, PRE, month=APRIL), use("ann", 1, STD, month=FEB)],
        use("ann", 1, PRE, month=APRIL),
        [],
    ),
    # -- limit_source precedence -----------------------------------------------------------------
    case(
        "source/balance-before-org-cap",
        T,
        [org_cap(1)],
        use("ann", 2),
        [pause("BALANCE_EXHAUSTED", None, "BALANCE", 2, 0)],
    ),
    case(
        "source/user-wins-a-tie-with-seat-tier",
        E,
        [tier_cap(STD, 5), user_cap("ann", 5), use("ann", 4)],
        use("ann", 1),
        [pause("CAP_REACHED", "ann", "USER", 5, 5)],
    ),
    case(
        "source/smaller-seat-tier-cap",
        E,
        [tier_cap(STD, 4), user_cap("ann", 5)],
        use("ann", 6),
        [pause("CAP_REACHED", "ann", "SEAT_TIER", 6, 4)],
    ),
    case(
        "source/smaller-user-cap",
        E,
        [tier_cap(STD, 5), user_cap("ann", 4)],
        use("ann", 6),
        [pause("CAP_REACHED", "ann", "USER", 6, 4)],
    ),
    case(
        "no-event/seat-tier-cap-never-binds-a-team-org",
        T,
        [tier_cap(STD, 1), top_up("p1", 100)],  # accepted: the plan is not known yet
        use("ann", 6),
        [],
    ),
    case(
        "no-event/team-org-user-under-its-cap",
        T,
        [top_up("p1", 100), user_cap("ann", 50)],
        use("ann", 6, PRE),
        [],
    ),
]


@pytest.mark.parametrize(("plan", "setup", "trigger", "expected", "period_timer"), CASES)
def test_enforcement_case(
    plan: Plan, setup: list[Input], trigger: Input, expected: list[Row], period_timer: bool
) -> None:
    harness = Harness(plan, Enforcer(period_timer=period_timer))
    harness.run(setup)
    step = harness.apply(trigger)
    assert [row(event) for event in step.events] == expected
    assert not step.redelivered


# -- refused control messages ----------------------------------------------------------------


def refusal(
    case_id: str, plan: Plan, setup: list[Input], command: Command, reason: DeadLetterReason
) -> object:
    return pytest.param(plan, setup, command, reason, id=case_id)


REFUSALS = [
    refusal(
        "seat-tier-cap-on-team",
        T,
        [use("ann", 1, extra=False)],
        SetCap("SEAT_TIER", usd(5), seat_tier=STD),
        DeadLetterReason.PLAN_MISMATCH,
    ),
    refusal(
        "seat-tier-unlimited-on-team",
        T,
        [use("ann", 1, extra=False)],
        SetCap("SEAT_TIER", None, seat_tier=PRE),
        DeadLetterReason.PLAN_MISMATCH,
    ),
    refusal(
        "top-up-on-enterprise",
        E,
        [use("ann", 1)],
        TopUp("p1", usd(10) or 0),
        DeadLetterReason.PLAN_MISMATCH,
    ),
    refusal(
        "auto-reload-on-enterprise",
        E,
        [use("ann", 1)],
        SetAutoReload(True, usd(1), usd(10)),
        DeadLetterReason.PLAN_MISMATCH,
    ),
    refusal(
        "auto-reload-off-on-enterprise",
        E,
        [use("ann", 1)],
        SetAutoReload(False),
        DeadLetterReason.PLAN_MISMATCH,
    ),
    refusal(
        "negative-org-cap",
        E,
        [use("ann", 1)],
        SetCap("ORG", -1),
        DeadLetterReason.INVALID_FIELD,
    ),
    refusal(
        "negative-user-cap",
        T,
        [],
        SetCap("USER", -usd(1), user_id="ann"),
        DeadLetterReason.INVALID_FIELD,
    ),
    refusal(
        "negative-seat-tier-cap",
        E,
        [use("ann", 1)],
        SetCap("SEAT_TIER", -1, seat_tier=STD),
        DeadLetterReason.INVALID_FIELD,
    ),
    refusal(
        "seat-tier-cap-without-a-tier",
        E,
        [use("ann", 1)],
        SetCap("SEAT_TIER", usd(5)),
        DeadLetterReason.INVALID_FIELD,
    ),
    refusal(
        "user-cap-without-a-user",
        E,
        [],
        SetCap("USER", usd(5)),
        DeadLetterReason.INVALID_FIELD,
    ),
    refusal(
        "unknown-cap-scope",
        E,
        [],
        SetCap("TEAM", usd(5)),
        DeadLetterReason.INVALID_FIELD,
    ),
    refusal("zero-top-up", T, [], TopUp("p1", 0), DeadLetterReason.INVALID_FIELD),
    refusal(
        "auto-reload-without-a-threshold",
        T,
        [],
        SetAutoReload(True, None, usd(10)),
        DeadLetterReason.INVALID_FIELD,
    ),
    refusal(
        "auto-reload-with-zero-amount",
        T,
        [],
        SetAutoReload(True, usd(1), 0),
        DeadLetterReason.INVALID_FIELD,
    ),
]


@pytest.mark.parametrize(("plan", "setup", "command", "reason"), REFUSALS)
def test_refused_control_message_leaves_the_policy_as_it_was(
    plan: Plan, setup: list[Input], command: Command, reason: DeadLetterReason
) -> None:
    harness = Harness(plan)
    harness.run(setup)
    before = harness.snapshot()
    with pytest.raises(RejectedEvent) as refused:
        harness.apply(Control(command))
    assert refused.value.reason is reason
    assert harness.snapshot() == before


# -- what `caps show` reports: the precedence while several conditions hold ---------------------


def test_limit_source_precedence_while_several_conditions_hold() -> None:
    harness = Harness(TEAM)
    harness.run([org_cap(1), use("ann", 2)])  # balance exhausted and over the org cap
    assert describe(harness.policy, harness.spend)["org"]["limit_source"] == "BALANCE"
    assert harness.run([disable()]) == []  # already paused: no second PAUSE
    org = describe(harness.policy, harness.spend)["org"]
    assert (org["state"], org["limit_source"], org["limit_nano_usd"]) == ("PAUSED", "ORG", 0)
    assert harness.run([enable()]) == []
    assert describe(harness.policy, harness.spend)["org"]["limit_source"] == "BALANCE"
    assert harness.run([top_up("p1", 10)]) == []  # the org cap still blocks
    org = describe(harness.policy, harness.spend)["org"]
    assert (org["state"], org["limit_source"], org["limit_nano_usd"]) == ("PAUSED", "ORG", usd(1))
    events = harness.run([org_cap(None)])
    assert [row(e) for e in events] == [resume("CAP_REMOVED", None, None, 2, None)]


def test_member_limit_source_precedence() -> None:
    harness = Harness(ENTERPRISE)
    harness.run([tier_cap(STD, 5), user_cap("ann", 5), disable("ann"), use("ann", 6)])

    def ann() -> tuple[object, ...]:
        member = describe(harness.policy, harness.spend)["members"][0]
        return member["state"], member["limit_source"], member["limit_nano_usd"]

    assert ann() == ("PAUSED", "USER", 0)  # the disablement first
    assert harness.run([enable("ann")]) == []
    assert ann() == ("PAUSED", "USER", usd(5))  # USER wins the tie with SEAT_TIER
    assert harness.run([user_cap("ann", 6)]) == []
    assert ann() == ("PAUSED", "SEAT_TIER", usd(5))


# -- event identity, re-delivery, serialisation ----------------------------------------------

SCENARIO: list[Input] = [
    org_cap(5),
    user_cap("ann", 3),
    use("ann", 4),  # PAUSE ann
    use("bob", 2),  # PAUSE org
    user_cap("ann", 10),  # RESUME ann
    use("ann", 7),  # PAUSE ann again: same scope and action, another trigger
    tick(APRIL_AFTER_GRACE),  # RESUME org and ann
]


def test_event_ids_are_deterministic_and_unique_per_trigger() -> None:
    first = Harness(ENTERPRISE).run(SCENARIO)
    later = Harness(ENTERPRISE)
    later.now_ms += 86_400_000  # another wall clock: emitted_at differs, ids do not
    second = later.run(SCENARIO)
    assert [row(e) for e in first] == [row(e) for e in second]
    assert [e.event_id for e in first] == [e.event_id for e in second]
    assert len(first) == 6
    assert len({e.event_id for e in first}) == len(first)
    ann_pauses = [e for e in first if e.user_id == "ann" and e.action is Action.PAUSE]
    assert len(ann_pauses) == 2
    assert ann_pauses[0].trigger_id != ann_pauses[1].trigger_id
    other_org = Harness(ENTERPRISE, org_id="org-2").run(SCENARIO)
    assert not {e.event_id for e in first} & {e.event_id for e in other_org}


def test_events_name_their_trigger_and_period() -> None:
    harness = Harness(ENTERPRISE)
    harness.run([user_cap("ann", 3)])
    (paused,) = harness.apply(use("ann", 4)).events
    assert paused.trigger_id == f"usage:e{harness.sequence}"
    assert (paused.org_id, paused.period, paused.emitted_at) == (ORG, MARCH, harness.now_ms)
    (resumed,) = harness.apply(tick(APRIL_AFTER_GRACE)).events
    assert resumed.trigger_id == f"control:m{harness.sequence}"
    assert resumed.period == APRIL
    assert EnforcementEvent.from_record(json.loads(json.dumps(resumed.record()))) == resumed


def test_redelivered_usage_returns_the_recorded_events_and_decides_nothing() -> None:
    harness = Harness(ENTERPRISE)
    harness.run([user_cap("ann", 3)])
    first = harness.apply(use("ann", 4))
    offset = harness.offsets["usage"]
    before = harness.snapshot()
    harness.now_ms += 60_000
    again = harness.redeliver("usage", offset)
    assert again.redelivered
    assert again.events == first.events  # same ids, same emitted_at
    assert harness.snapshot() == before


def test_redelivered_control_message_does_not_undo_later_changes() -> None:
    harness = Harness(ENTERPRISE)
    harness.run([use("ann", 6)])
    lowered = harness.apply(user_cap("ann", 5))
    offset = harness.offsets["control"]
    raised = harness.apply(user_cap("ann", 10))
    assert [e.reason.value for e in lowered.events + raised.events] == ["CAP_LOWERED", "CAP_RAISED"]
    before = harness.snapshot()
    again = harness.redeliver("control", offset)
    assert (again.redelivered, again.events) == (True, lowered.events)
    assert harness.snapshot() == before
    assert harness.policy.members["ann"].cap_nano == usd(10)
    assert not harness.policy.members["ann"].paused


def test_redelivered_input_that_emitted_nothing_emits_nothing() -> None:
    harness = Harness(TEAM)
    harness.run([top_up("p1", 100), user_cap("ann", 5)])
    quiet = harness.apply(use("ann", 1))
    assert quiet.events == []
    offset = harness.offsets["usage"]
    harness.run([use("ann", 5), use("bob", 1)])  # ann paused since
    before = harness.snapshot()
    again = harness.redeliver("usage", offset)
    assert again.events == []
    assert harness.snapshot() == before


def test_redelivery_after_a_restart_from_the_stored_policy() -> None:
    harness = Harness(TEAM)
    harness.run([top_up("p1", 10), auto_reload(3, 20), use("ann", 5)])
    first = harness.apply(use("ann", 6))  # reload requested, then paused
    assert [e.action.value for e in first.events] == ["RELOAD_REQUESTED", "PAUSE"]
    offset = harness.offsets["usage"]
    harness.policy = OrgPolicy.from_json(json.loads(json.dumps(harness.policy.to_json())))
    again = harness.redeliver("usage", offset)
    assert again.redelivered
    assert again.events == first.events


ROUND_TRIPS = [
    pytest.param(
        TEAM,
        [
            top_up("p1", 10),
            auto_reload(3, 20),
            user_cap("ann", 2),
            disable("bob"),
            use("ann", 5),
            use("cat", 4, PRE),  # the reload is requested here
            top_up("p2", 1),
        ],
        [use("ann", 50), enable("bob"), top_up("p9", 100), tick("2026-04-02T00:00:00Z")],
        id="team",
    ),
    pytest.param(
        ENTERPRISE,
        [
            tier_cap(STD, 5),
            tier_cap(PRE, None),
            org_cap(100),
            disable(),
            use("ann", 6),
            use("bob", 1, PRE),
            user_cap("cat", 0),
        ],
        [use("bob", 50, STD), enable(), use("cat", 1, month=APRIL), tier_cap(STD, 100)],
        id="enterprise",
    ),
    pytest.param(ENTERPRISE, [], [user_cap("ann", 0), use("ann", 1)], id="empty"),
]


@pytest.mark.parametrize(("plan", "setup", "follow_up"), ROUND_TRIPS)
def test_policy_json_round_trip(plan: Plan, setup: list[Input], follow_up: list[Input]) -> None:
    original = Harness(plan)
    original.run(setup)
    text = json.dumps(original.policy.to_json())
    restored = OrgPolicy.from_json(json.loads(text))
    assert restored == original.policy
    assert json.dumps(restored.to_json()) == text
    # A worker restarted from the stored value decides what follows exactly like the original.
    twin = Harness(plan)
    twin.run(setup)
    twin.policy = restored
    expected = original.run(follow_up)
    assert expected  # the follow-up inputs do emit something
    assert twin.run(follow_up) == expected


def test_from_json_of_nothing_is_a_fresh_policy() -> None:
    assert OrgPolicy.from_json(None) == OrgPolicy()
    assert OrgPolicy.from_json({}) == OrgPolicy()
