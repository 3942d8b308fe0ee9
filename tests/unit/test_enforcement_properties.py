"""Properties of the enforcement state machine (SPEC §5) over random input sequences.

Hypothesis draws a sequence of usage events (three members, two seat tiers, extra and included
usage, now and then a newer month or a late event) interleaved with control messages (caps at
every scope, enablement, top-ups with repeated purchase ids, auto-reload, wall-clock ticks) and
re-deliveries of earlier inputs, for an Enterprise and for a Team organisation. A small model
written here from the SPEC — not from ``core.enforcement`` — says after every input which scopes
must be PAUSED, and with which limit. Checked after every input:

(a) per scope, PAUSE and RESUME strictly alternate, starting with PAUSE, and the last one
    matches the stored state;
(b) each scope is PAUSED exactly while one of its blocking conditions holds (the one lag the
    SPEC allows: a late event never pauses, so an org whose Team balance a late event exhausted
    pauses at the next input that concerns the ORG scope);
(c) a late event emits no PAUSE or RESUME and changes no scope's state;
(d) event ids are unique across the run, re-deliveries aside;
(e) re-delivering inputs at their original offsets returns the events recorded the first time
    and changes no state — for a random earlier input during the run, and for a whole suffix
    of the run at the end.
Also: reasons name the trigger, limit fields follow the SPEC's precedence, and RELOAD_REQUESTED
is emitted once per downward crossing of the threshold (or on enabling at or below it, or
when a new threshold of a reload already on passes the balance), never twice for one dip
because the setting was sent again.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.enforcement import (
    OUTBOX_SIZE,
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
)
from core.errors import DeadLetterReason, RejectedEvent
from core.usage import Plan, Price, PricedEvent, Product, SeatTier, TokenUsage, UsageEvent

UNIT = 1_000_000_000  # $1 in nano-USD: every amount below is a few dollars
USERS = ("u1", "u2", "u3")
TIERS = ("STANDARD", "PREMIUM")
FIRST_MONTH = (2026, 1)
GRACE_MS = 3_600_000
ORG_ID = "org-p"
Scope = tuple[str, str | None]  # ("ORG", None) or ("USER", user_id)
ORG: Scope = ("ORG", None)

# -- inputs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    user: str
    tier: str
    cost: int
    extra: bool
    when: str  # "now", "newer" (the month after the current one) or "late" (the one before)


@dataclass(frozen=True)
class Control:
    command: Command


@dataclass(frozen=True)
class Tick:
    where: str  # "same" month, next month "before" or "after" the grace


@dataclass(frozen=True)
class Redeliver:
    back: int  # re-deliver the input this many inputs back


Input = Usage | Control | Tick | Redeliver


def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """Pick among strategies with integer weights (``st.one_of`` has none)."""
    table = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(table) - 1).flatmap(lambda index: table[index])


money = st.integers(0, 6).map(lambda n: n * UNIT)
cap_limit = weighted((1, st.none()), (4, money))

usages = st.builds(
    Usage,
    user=st.sampled_from(USERS),
    tier=weighted((3, st.just("STANDARD")), (1, st.just("PREMIUM"))),
    cost=st.sampled_from([0, UNIT // 2, UNIT, 2 * UNIT, 3 * UNIT]),
    extra=weighted((4, st.just(True)), (1, st.just(False))),
    when=weighted((12, st.just("now")), (1, st.just("newer")), (3, st.just("late"))),
)
set_caps = st.one_of(
    st.builds(lambda limit: SetCap("ORG", limit), cap_limit),
    st.builds(
        lambda limit, tier: SetCap("SEAT_TIER", limit, seat_tier=tier),
        cap_limit,
        st.sampled_from(TIERS),
    ),
    st.builds(
        lambda limit, user: SetCap("USER", limit, user_id=user), cap_limit, st.sampled_from(USERS)
    ),
)
set_enabled = st.builds(SetEnabled, st.booleans(), st.sampled_from([None, *USERS]))
top_ups = st.builds(
    TopUp, st.sampled_from(["p0", "p1", "p2", "p3"]), st.integers(1, 8).map(lambda n: n * UNIT)
)
auto_reloads = weighted(
    (1, st.just(SetAutoReload(False))),
    (
        3,
        st.builds(
            lambda threshold, amount: SetAutoReload(True, threshold * UNIT, amount * UNIT),
            st.integers(0, 4),
            st.integers(1, 8),
        ),
    ),
)
inputs = st.lists(
    weighted(
        (10, usages),
        (4, st.builds(Control, set_caps)),
        (3, st.builds(Control, set_enabled)),
        (2, st.builds(Control, top_ups)),
        (1, st.builds(Control, auto_reloads)),
        (1, st.builds(Tick, st.sampled_from(["same", "before", "after"]))),
        (2, st.builds(Redeliver, st.integers(1, 6))),
    ),
    min_size=20,
    max_size=80,
)

# -- months, independently of core.periods -----------------------------------------------------


def month_text(month: tuple[int, int]) -> str:
    return f"{month[0]:04d}-{month[1]:02d}"


def shift(month: tuple[int, int], by: int) -> tuple[int, int]:
    index = month[0] * 12 + month[1] - 1 + by
    return index // 12, index % 12 + 1


def instant_ms(month: tuple[int, int], day: int = 1) -> int:
    moment = datetime(month[0], month[1], day, tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def month_at(ms: int) -> tuple[int, int]:
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
    return moment.year, moment.month


# -- the model: SPEC §5 in a few lines ---------------------------------------------------------


@dataclass(frozen=True)
class View:
    """A scope as the SPEC sees it: blocked or not, and the limit fields an event reports."""

    blocked: bool
    source: str | None
    spend: int
    limit: int | None


@dataclass
class Model:
    plan: str  # the plan the org's usage events carry
    known_plan: str | None = None  # known from the org's usage events, once there are some
    period: tuple[int, int] | None = None
    org_cap: int | None = None
    tier_caps: dict[str, int | None] = field(default_factory=dict)
    user_caps: dict[str, int | None] = field(default_factory=dict)
    org_disabled: bool = False
    disabled: set[str] = field(default_factory=set)
    tiers: dict[str, str] = field(default_factory=dict)
    purchases: set[str] = field(default_factory=set)
    topups: int = 0
    team_extra: int = 0  # cumulative extra cost of a Team org, every month, late ones too
    reload: tuple[int, int] | None = None
    # A RELOAD_REQUESTED was sent and the balance has not been above the threshold since:
    # re-sending the setting must not ask again for the same dip.
    reload_pending: bool = False
    # extra cost per (YYYY-MM, user), and per (YYYY-MM, None) for the whole org
    totals: dict[tuple[str, str | None], int] = field(default_factory=dict)

    @property
    def balance(self) -> int:
        return self.topups - self.team_extra

    def spend(self, user: str | None) -> int:
        if self.period is None:
            return 0
        return self.totals.get((month_text(self.period), user), 0)

    def org_view(self) -> View:
        spend = self.spend(None)
        if self.org_disabled:
            return View(True, "ORG", spend, 0)
        tracked = self.plan == "TEAM" and (self.topups > 0 or self.team_extra > 0)
        if tracked and self.balance <= 0:
            return View(True, "BALANCE", self.team_extra, self.topups)
        if self.org_cap is None:
            return View(False, None, spend, None)
        return View(spend >= self.org_cap, "ORG", spend, self.org_cap)

    def user_view(self, user: str) -> View:
        spend = self.spend(user)
        if user in self.disabled:
            return View(True, "USER", spend, 0)
        caps: list[tuple[int, int, str]] = []  # (limit, USER before SEAT_TIER on a tie, source)
        user_cap = self.user_caps.get(user)
        if user_cap is not None:
            caps.append((user_cap, 0, "USER"))
        tier = self.tiers.get(user)  # the current tier; only Enterprise orgs have tier caps
        tier_cap = self.tier_caps.get(tier) if tier and self.plan == "ENTERPRISE" else None
        if tier_cap is not None:
            caps.append((tier_cap, 1, "SEAT_TIER"))
        if not caps:
            return View(False, None, spend, None)
        limit, _, source = min(caps)
        return View(spend >= limit, source, spend, limit)

    def view(self, scope: Scope) -> View:
        return self.org_view() if scope[1] is None else self.user_view(scope[1])

    def copy(self) -> Model:
        return copy.deepcopy(self)


def state_of(policy: OrgPolicy, scope: Scope) -> bool:
    if scope[1] is None:
        return policy.paused
    member = policy.members.get(scope[1])
    return member.paused if member else False


def snapshot(policy: OrgPolicy) -> str:
    return json.dumps(policy.to_json(), sort_keys=True)


SCOPES: tuple[Scope, ...] = (ORG, *(("USER", user) for user in USERS))

# -- the run ----------------------------------------------------------------------------------


@dataclass
class Sent:
    """An original input: where it was delivered and what it returned."""

    topic: str
    offset: int
    payload: PricedEvent | ControlMessage
    events: list[EnforcementEvent] | None  # None: refused (dead-lettered)
    refusal: DeadLetterReason | None = None


class Run:
    def __init__(self, plan: str, period_timer: bool) -> None:
        self.enforcer = Enforcer(grace_ms=GRACE_MS, period_timer=period_timer)
        self.period_timer = period_timer
        self.policy = OrgPolicy()
        self.model = Model(plan)
        self.offsets = {"usage": -1, "control": -1}
        self.sequence = 0
        self.now_ms = instant_ms(FIRST_MONTH, 3)
        self.sent: list[Sent] = []
        self.ids: set[str] = set()
        self.simulated = dict.fromkeys(SCOPES, False)  # state as the emitted events tell it
        self.org_lagging = False  # a late event changed the Team balance since the last check

    # -- spend, as the worker's totals give it --------------------------------------------

    def spend(self, period: str | None, user: str | None) -> int:
        return self.model.totals.get((period, user), 0) if period else 0

    def next_offset(self, topic: str) -> int:
        self.offsets[topic] += 1 + self.sequence % 3  # other orgs share the partition
        return self.offsets[topic]

    # -- one input --------------------------------------------------------------------------

    def apply(self, item: Input) -> None:
        self.sequence += 1
        self.now_ms += 60_000
        if isinstance(item, Redeliver):
            if len(self.sent) >= item.back:
                self.redeliver(len(self.sent) - item.back)
            return
        before = snapshot(self.policy)
        prior = {scope: state_of(self.policy, scope) for scope in SCOPES}
        if isinstance(item, Usage):
            self.usage(item, prior)
        else:
            self.control(item, before, prior)

    def usage(self, item: Usage, prior: dict[Scope, bool]) -> None:
        model = self.model
        month = model.period or FIRST_MONTH
        if model.period is not None and item.when != "now":
            month = shift(model.period, 1 if item.when == "newer" else -1)
        late = model.period is not None and month < model.period
        rollover = not late and (model.period is None or month > model.period)
        event = UsageEvent(
            event_id=f"e{self.sequence}",
            occurred_at_ms=instant_ms(month, 10),
            org_id=ORG_ID,
            plan=Plan(model.plan),
            user_id=item.user,
            seat_tier=SeatTier(item.tier),
            product=Product.CLAUDE,
            model="claude-3-5-haiku-20241022",
            usage=TokenUsage(10, 10, 0, 0),
            extra_usage=item.extra,
        )
        priced = PricedEvent(event, Price("Haiku 3.5", "v1", False, item.cost))
        extra = item.cost if item.extra else 0
        # Before: the view a PERIOD_RESET reports (the new month, this event not yet counted).
        pre = model.copy()
        if rollover:
            pre.period = month
        balance_before = model.balance
        for user in (None, item.user):  # the worker counts the event before enforcement
            key = (month_text(month), user)
            model.totals[key] = model.totals.get(key, 0) + extra
        if model.plan == "TEAM":
            model.team_extra += extra
        model.known_plan = model.plan
        if not late:
            model.period = month
            model.tiers[item.user] = item.tier
        offset = self.next_offset("usage")
        step = self.enforcer.on_usage(self.policy, priced, offset, self.spend, self.now_ms)
        self.sent.append(Sent("usage", offset, priced, step.events))
        assert not step.redelivered

        threshold = model.reload[0] if model.reload else None
        crossing = threshold is not None and balance_before > threshold >= model.balance
        if crossing:
            model.reload_pending = True
        self.check_reloads(step.events, 1 if crossing else 0)
        if late:
            # (c) late events never pause or resume anyone
            assert not [e for e in step.events if e.action.value != "RELOAD_REQUESTED"]
            assert {s: state_of(self.policy, s) for s in SCOPES} == prior
            if extra and model.plan == "TEAM":
                self.org_lagging = True
            self.check_ids(step.events)
            return
        pause = {"CAP_REACHED", "BALANCE_EXHAUSTED"}
        resume = {"CAP_RAISED", "PERIOD_RESET"} if rollover else {"CAP_RAISED"}
        scopes = set(SCOPES) if rollover else {ORG, ("USER", item.user)}
        self.check_step(
            step, prior, scopes, pause, resume, org_concerned=True, pre=pre if rollover else None
        )

    def control(self, item: Control | Tick, before: str, prior: dict[Scope, bool]) -> None:
        model = self.model
        if isinstance(item, Tick):
            base = model.period or FIRST_MONTH
            wall = {
                "same": instant_ms(base, 20),
                "before": instant_ms(shift(base, 1)) + GRACE_MS - 1,
                "after": instant_ms(shift(base, 1)) + GRACE_MS,
            }[item.where]
            command: Command = PeriodTick(wall)
        else:
            command = item.command
        message = ControlMessage(f"m{self.sequence}", ORG_ID, self.now_ms, command)
        offset = self.next_offset("control")
        expected_refusal = self.refusal_of(command)
        try:
            step = self.enforcer.on_control(self.policy, message, offset, self.spend, self.now_ms)
        except RejectedEvent as refused:
            assert refused.reason is expected_refusal, (command, model.known_plan)
            assert snapshot(self.policy) == before
            self.sent.append(Sent("control", offset, message, None, refused.reason))
            return
        assert expected_refusal is None, (command, model.known_plan)
        self.sent.append(Sent("control", offset, message, step.events))
        assert not step.redelivered

        reloads = 0
        org_concerned = False
        pause: set[str] = set()
        resume: set[str] = set()
        scopes: set[Scope] = set()
        if isinstance(command, SetCap):
            if command.scope == "ORG":
                model.org_cap = command.limit_nano
                scopes, org_concerned = {ORG}, True
            elif command.scope == "SEAT_TIER":
                model.tier_caps[str(command.seat_tier)] = command.limit_nano
                scopes = {("USER", u) for u, t in model.tiers.items() if t == command.seat_tier}
            else:
                model.user_caps[str(command.user_id)] = command.limit_nano
                scopes = {("USER", command.user_id)}
            pause = {"CAP_LOWERED"}
            resume = {"CAP_REMOVED"} if command.limit_nano is None else {"CAP_RAISED"}
        elif isinstance(command, SetEnabled):
            if command.user_id is None:
                model.org_disabled = not command.enabled
                scopes, org_concerned = {ORG}, True
            else:
                (model.disabled.discard if command.enabled else model.disabled.add)(command.user_id)
                scopes = {("USER", command.user_id)}
            pause, resume = ({"DISABLED"}, set()) if not command.enabled else (set(), {"ENABLED"})
        elif isinstance(command, TopUp):
            if command.purchase_id not in model.purchases:
                model.purchases.add(command.purchase_id)
                model.topups += command.amount_nano
                if model.reload is not None and model.balance > model.reload[0]:
                    model.reload_pending = False
                scopes, org_concerned = {ORG}, True
                resume = {"BALANCE_TOPPED_UP"}
        elif isinstance(command, SetAutoReload):
            enabling = model.reload is None
            model.reload = (
                (command.threshold_nano or 0, command.amount_nano or 0) if command.enabled else None
            )
            if model.reload is not None:
                if enabling or model.balance > model.reload[0]:
                    model.reload_pending = False
                if model.balance <= model.reload[0] and not model.reload_pending:
                    reloads = 1  # enabling at or below, or a raised threshold over the balance
                    model.reload_pending = True
        elif isinstance(command, PeriodTick):
            wall_month = month_at(command.wall_clock_ms - GRACE_MS)
            if self.period_timer and model.period is not None and wall_month > model.period:
                model.period = wall_month
                scopes, org_concerned = set(SCOPES), True
                resume = {"PERIOD_RESET"}
        self.check_reloads(step.events, reloads)
        self.check_step(step, prior, scopes, pause, resume, org_concerned=org_concerned)

    def refusal_of(self, command: Command) -> DeadLetterReason | None:
        """SPEC §3/§5: a control message the org's (known) plan does not allow."""
        plan = self.model.known_plan
        if isinstance(command, SetCap) and command.scope == "SEAT_TIER" and plan == "TEAM":
            return DeadLetterReason.PLAN_MISMATCH
        if isinstance(command, TopUp | SetAutoReload) and plan == "ENTERPRISE":
            return DeadLetterReason.PLAN_MISMATCH
        return None

    # -- checks -----------------------------------------------------------------------------

    def check_reloads(self, events: list[EnforcementEvent], expected: int) -> None:
        reloads = [e for e in events if e.action.value == "RELOAD_REQUESTED"]
        assert len(reloads) == expected, (reloads, self.model.balance, self.model.reload)
        for reload in reloads:
            assert self.model.reload is not None
            assert (reload.amount_nano_usd, reload.balance_nano_usd) == (
                self.model.reload[1],
                self.model.balance,
            )
            assert (reload.spend_nano_usd, reload.limit_nano_usd) == (
                self.model.team_extra,
                self.model.topups,
            )

    def check_ids(self, events: list[EnforcementEvent]) -> None:
        for event in events:
            assert event.event_id not in self.ids, event  # (d)
            self.ids.add(event.event_id)

    def check_step(
        self,
        step: Step,
        prior: dict[Scope, bool],
        scopes: set[Scope],
        pause: set[str],
        resume: set[str],
        *,
        org_concerned: bool,
        pre: Model | None = None,
    ) -> None:
        """``scopes``: what the input concerns; ``pause``/``resume``: the reasons naming its
        trigger; ``pre``: for a usage event of a newer month, the model of the new month
        before the event counts (what a PERIOD_RESET reports)."""
        self.check_ids(step.events)
        model = self.model
        was_lagging = self.org_lagging
        if org_concerned:
            self.org_lagging = False
        for event in step.events:
            if event.action.value == "RELOAD_REQUESTED":
                continue
            scope = (event.scope.value, event.user_id)
            assert scope in scopes, (event, scopes)  # only the scopes the input concerns
            if event.action.value == "PAUSE":
                assert not self.simulated[scope], f"two PAUSEs in a row for {scope}"  # (a)
                lag = {"BALANCE_EXHAUSTED"} if scope == ORG and was_lagging else set()
                assert event.reason.value in pause | lag, event
            else:
                assert self.simulated[scope], f"RESUME before any PAUSE for {scope}"  # (a)
                assert event.reason.value in resume, event
            self.simulated[scope] = event.action.value == "PAUSE"
            if model.period is not None:
                assert event.period == month_text(model.period), event
            # limit fields, in the SPEC's precedence: after the input, or (newer month) before
            # the event itself counts
            reported = (
                event.limit_source.value if event.limit_source else None,
                event.spend_nano_usd,
                event.limit_nano_usd,
            )
            views = [model.view(scope)] + ([pre.view(scope)] if pre is not None else [])
            assert reported in [(v.source, v.spend, v.limit) for v in views], (event, views)
        for scope in SCOPES:
            paused = state_of(self.policy, scope)
            assert paused == self.simulated[scope], scope  # (a) the events tell the state
            if scope not in scopes:
                assert paused == prior[scope], scope  # an input changes only its scopes
            if scope == ORG and self.org_lagging:
                continue  # the lag a late event leaves until the next input of the ORG scope
            assert paused == model.view(scope).blocked, (scope, model.view(scope))  # (b)

    # -- re-delivery -----------------------------------------------------------------------

    def deliver_again(self, sent: Sent) -> Step | None:
        """Deliver ``sent`` again at its offset; None if refused again."""
        try:
            if isinstance(sent.payload, PricedEvent):
                return self.enforcer.on_usage(
                    self.policy, sent.payload, sent.offset, self.spend, self.now_ms + 1
                )
            return self.enforcer.on_control(
                self.policy, sent.payload, sent.offset, self.spend, self.now_ms + 1
            )
        except RejectedEvent as refused:
            assert refused.reason is sent.refusal
            return None

    def redeliver(self, index: int) -> None:
        sent = self.sent[index]
        before = snapshot(self.policy)
        step = self.deliver_again(sent)
        assert snapshot(self.policy) == before  # (e) changes no state
        if step is None:
            return
        assert step.redelivered or not step.changed
        emitting_since = sum(1 for later in self.sent[index:] if later.events)
        if sent.events is None or emitting_since <= OUTBOX_SIZE:
            assert step.events == (sent.events or [])  # (e) the recorded events, same ids
        else:
            assert step.events in ([], sent.events)  # older than the outbox keeps

    def replay_suffix(self, start: int) -> None:
        """(e) a restart re-delivers every input from ``start`` on, in order."""
        emitting = [i for i, sent in enumerate(self.sent) if sent.events]
        if len(emitting) > OUTBOX_SIZE:
            start = max(start, emitting[-OUTBOX_SIZE])
        for index in range(start, len(self.sent)):
            self.redeliver(index)


@pytest.mark.parametrize("plan", ["ENTERPRISE", "TEAM"])
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    items=inputs, period_timer=st.sampled_from([True, True, True, False]), start=st.integers(0, 50)
)
def test_random_sequences_keep_the_enforcement_contract(
    plan: str, items: list[Input], period_timer: bool, start: int
) -> None:
    run = Run(plan, period_timer)
    for item in items:
        run.apply(item)
    run.replay_suffix(min(start, len(run.sent)))
