"""Caps, Team balances and enforcement (SPEC §5): the state machine, pure.

One :class:`OrgPolicy` holds everything enforcement knows about an organisation: its plan and
current month, the caps (ORG, SEAT_TIER, USER), disablements, the Team prepaid balance and
auto-reload, and the ACTIVE/PAUSED state of the ORG scope and of every member's USER scope.
:class:`Enforcer` applies one input (a priced usage event or a control message) to a policy
and returns the new policy and the events to emit. Nothing here does I/O.

Decision rules (SPEC §5):

* A scope is PAUSED exactly while one of its blocking conditions holds. ORG scope: the org is
  disabled; (Team) prepaid balance <= 0 after the first top-up or extra spend; the org's
  current-month extra cost >= the ORG cap. USER scope: the member is disabled; the member's
  current-month extra cost >= min(USER cap, SEAT_TIER cap of the member's current tier).
* A PAUSE is emitted on each ACTIVE->PAUSED transition and a RESUME on each PAUSED->ACTIVE
  transition, never otherwise; the reason names what caused the transition (the trigger), the
  ``limit_source`` names the condition: disablement first, then BALANCE, then the smallest
  cap (USER wins a tie with SEAT_TIER).
* The current month is the month of the newest ``occurred_at`` seen; a newer month resets
  every monthly condition (PERIOD_RESET) before the event itself counts. Late events add to
  the Team balance but never pause or resume.

At-least-once: every policy remembers the last source offset it applied per input topic and,
in a small outbox, the events recent inputs emitted. An input at or below the remembered
offset is a re-delivery: nothing is re-decided, the recorded events are returned again (same
deterministic ids), so a crash between the state write and the sends loses nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from core.errors import DeadLetterReason, RejectedEvent
from core.periods import month_of
from core.usage import Plan, PricedEvent, SeatTier

OUTBOX_SIZE = 16
REPRICING_WINDOW_MS = 15 * 60 * 1000
"""How long after an org's last non-final correction message usage transitions are still
reported as ``REPRICED``: a replay that died before its final message must not label the
org's transitions for ever (its re-run sends nothing for an org with nothing left to
correct)."""
USAGE_SOURCE = "usage"
CONTROL_SOURCE = "control"


class Action(StrEnum):
    PAUSE = "PAUSE"
    RESUME = "RESUME"
    RELOAD_REQUESTED = "RELOAD_REQUESTED"


class Scope(StrEnum):
    ORG = "ORG"
    USER = "USER"


class Reason(StrEnum):
    CAP_REACHED = "CAP_REACHED"
    CAP_LOWERED = "CAP_LOWERED"
    DISABLED = "DISABLED"
    BALANCE_EXHAUSTED = "BALANCE_EXHAUSTED"
    REPRICED = "REPRICED"
    CAP_RAISED = "CAP_RAISED"
    CAP_REMOVED = "CAP_REMOVED"
    ENABLED = "ENABLED"
    PERIOD_RESET = "PERIOD_RESET"
    BALANCE_TOPPED_UP = "BALANCE_TOPPED_UP"
    BALANCE_LOW = "BALANCE_LOW"


class LimitSource(StrEnum):
    ORG = "ORG"
    SEAT_TIER = "SEAT_TIER"
    USER = "USER"
    BALANCE = "BALANCE"


class Trigger(StrEnum):
    """What kind of input caused a transition; it decides the reason."""

    USAGE = "USAGE"
    CAP_CHANGE = "CAP_CHANGE"
    CAP_REMOVAL = "CAP_REMOVAL"
    ENABLEMENT = "ENABLEMENT"
    TOP_UP = "TOP_UP"
    PERIOD = "PERIOD"
    REPRICE = "REPRICE"


# -- control commands -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SetCap:
    """``scope`` ORG, SEAT_TIER (with ``seat_tier``) or USER (with ``user_id``);
    ``limit_nano`` None means unlimited."""

    scope: str
    limit_nano: int | None
    user_id: str | None = None
    seat_tier: str | None = None


@dataclass(frozen=True, slots=True)
class SetEnabled:
    """Extra usage on (``enabled``) or off, for the org (``user_id`` None) or one member."""

    enabled: bool
    user_id: str | None = None


@dataclass(frozen=True, slots=True)
class TopUp:
    purchase_id: str
    amount_nano: int


@dataclass(frozen=True, slots=True)
class SetAutoReload:
    enabled: bool
    threshold_nano: int | None = None
    amount_nano: int | None = None


@dataclass(frozen=True, slots=True)
class PeriodTick:
    """The wall clock, delivered as a message (Faust timers cannot write tables)."""

    wall_clock_ms: int


@dataclass(frozen=True, slots=True)
class Repriced:
    """A replay's correction message was applied to the totals (``metering replay``).

    ``extra_delta_nano`` is its change of the org's extra cost (moves a Team balance);
    ``final`` marks the org's last correction message of the replay: only then is every scope
    re-decided, so a replay that moves spend both ways emits at most one transition per
    scope, with reason ``REPRICED``; a transition that usage causes between the org's first
    and final message is reported as ``REPRICED`` too (``OrgPolicy.repricing``; for at most
    :data:`REPRICING_WINDOW_MS` after the last message, should the final never come). Late months
    count for the balance only, as late usage.
    """

    extra_delta_nano: int
    final: bool


Command = SetCap | SetEnabled | TopUp | SetAutoReload | PeriodTick | Repriced


@dataclass(frozen=True, slots=True)
class ControlMessage:
    message_id: str
    org_id: str
    issued_at_ms: int
    command: Command


# -- emitted events ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EnforcementEvent:
    """A PAUSE, RESUME or RELOAD_REQUESTED; :meth:`record` is its Avro/JSON form."""

    event_id: str
    action: Action
    scope: Scope
    reason: Reason
    org_id: str
    user_id: str | None
    period: str
    spend_nano_usd: int
    limit_nano_usd: int | None
    limit_source: LimitSource | None
    trigger_id: str
    emitted_at: int
    amount_nano_usd: int | None = None
    balance_nano_usd: int | None = None

    def record(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "action": self.action.value,
            "scope": self.scope.value,
            "reason": self.reason.value,
            "org_id": self.org_id,
            "user_id": self.user_id,
            "period": self.period,
            "spend_nano_usd": self.spend_nano_usd,
            "limit_nano_usd": self.limit_nano_usd,
            "limit_source": self.limit_source.value if self.limit_source else None,
            "trigger_id": self.trigger_id,
            "emitted_at": self.emitted_at,
            "amount_nano_usd": self.amount_nano_usd,
            "balance_nano_usd": self.balance_nano_usd,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> EnforcementEvent:
        source = record.get("limit_source")
        return cls(
            event_id=record["event_id"],
            action=Action(record["action"]),
            scope=Scope(record["scope"]),
            reason=Reason(record["reason"]),
            org_id=record["org_id"],
            user_id=record.get("user_id"),
            period=record["period"],
            spend_nano_usd=record["spend_nano_usd"],
            limit_nano_usd=record.get("limit_nano_usd"),
            limit_source=LimitSource(source) if source else None,
            trigger_id=record["trigger_id"],
            emitted_at=record["emitted_at"],
            amount_nano_usd=record.get("amount_nano_usd"),
            balance_nano_usd=record.get("balance_nano_usd"),
        )


def event_id(
    org_id: str, trigger_id: str, action: Action, scope: Scope, user_id: str | None
) -> str:
    """Deterministic id: the same input always emits the same ids (repeats are harmless)."""
    text = "\x1f".join((org_id, trigger_id, action.value, scope.value, user_id or ""))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# -- state ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Member:
    """A member's USER scope. ``tier`` is None until the member's first usage event."""

    tier: str | None = None
    cap_nano: int | None = None
    disabled: bool = False
    paused: bool = False

    def to_list(self) -> list[Any]:
        """Compact form: ``[tier, cap_nano, disabled, paused]``."""
        return [self.tier, self.cap_nano, int(self.disabled), int(self.paused)]

    @classmethod
    def from_list(cls, value: list[Any]) -> Member:
        return cls(value[0], value[1], bool(value[2]), bool(value[3]))

    def copy(self) -> Member:
        return Member(self.tier, self.cap_nano, self.disabled, self.paused)


class MemberMap(Protocol):
    """Where an organisation's members live: a plain ``dict`` in memory, or the worker's
    view of its state store, where every member is a key of its own so that an org's policy
    does not grow with its membership (an org of 25,000 members would not fit in one Kafka
    message). ``items`` may be slow (it reads every member): the core calls it only for
    inputs that concern every member (a SEAT_TIER cap, a new month, a replay's end) and
    for ``describe``."""

    def get(self, user_id: str, /) -> Member | None: ...

    def __setitem__(self, user_id: str, member: Member, /) -> None: ...

    def items(self) -> Iterable[tuple[str, Member]]: ...


@dataclass(slots=True)
class OrgPolicy:
    """Everything enforcement knows of one organisation (one Faust table value)."""

    plan: str | None = None
    period: str | None = None
    org_cap_nano: int | None = None
    tier_caps_nano: dict[str, int | None] = field(default_factory=dict)
    disabled: bool = False
    topups_nano: int = 0
    purchases: list[str] = field(default_factory=list)
    extra_total_nano: int = 0
    reload: tuple[int, int] | None = None
    reload_armed: bool = True
    paused: bool = False
    members: MemberMap = field(default_factory=dict)
    offsets: dict[str, int] = field(default_factory=dict)
    outbox: list[list[Any]] = field(default_factory=list)
    # True between a replay's first and final correction message for this org: a transition
    # that usage causes meanwhile is reported as REPRICED (the totals are being corrected).
    repricing: bool = False
    repriced_at_ms: int = 0  # wall clock of the last non-final correction message
    # True once the org has had a top-up or extra spend: its balance blocks from then on,
    # even if a replay corrects every extra cost back to zero (SPEC: "after the org's first
    # top-up or extra spend").
    balance_started: bool = False

    # -- serialisation (compact JSON for the Faust table) ----------------------------------

    def to_json(self, include_members: bool = True) -> dict[str, Any]:
        """The policy as JSON-ready values; ``include_members`` False leaves the members out
        (the worker stores each member under a key of its own)."""
        data = {
            "plan": self.plan,
            "period": self.period,
            "org_cap": self.org_cap_nano,
            "tier_caps": self.tier_caps_nano,
            "disabled": self.disabled,
            "topups": self.topups_nano,
            "purchases": self.purchases,
            "extra_total": self.extra_total_nano,
            "reload": list(self.reload) if self.reload else None,
            "reload_armed": self.reload_armed,
            "paused": self.paused,
            "offsets": self.offsets,
            "outbox": self.outbox,
            **({"repricing": True, "repriced_at": self.repriced_at_ms} if self.repricing else {}),
            **({"balance_started": True} if self.balance_started else {}),
        }
        if include_members:
            data["members"] = {user: m.to_list() for user, m in self.members.items()}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> OrgPolicy:
        if not data:
            return cls()
        reload = data.get("reload")
        return cls(
            plan=data.get("plan"),
            period=data.get("period"),
            org_cap_nano=data.get("org_cap"),
            tier_caps_nano=dict(data.get("tier_caps") or {}),
            disabled=bool(data.get("disabled")),
            topups_nano=data.get("topups", 0),
            purchases=list(data.get("purchases") or []),
            extra_total_nano=data.get("extra_total", 0),
            reload=(reload[0], reload[1]) if reload else None,
            reload_armed=bool(data.get("reload_armed", True)),
            paused=bool(data.get("paused")),
            members={user: Member.from_list(v) for user, v in (data.get("members") or {}).items()},
            offsets=dict(data.get("offsets") or {}),
            outbox=list(data.get("outbox") or []),
            repricing=bool(data.get("repricing")),
            repriced_at_ms=data.get("repriced_at", 0),
            balance_started=bool(data.get("balance_started")),
        )

    # -- derived values --------------------------------------------------------------------

    @property
    def is_team(self) -> bool:
        return self.plan == Plan.TEAM.value

    @property
    def balance_nano(self) -> int:
        """Team prepaid balance: cumulative top-ups minus cumulative extra cost."""
        return self.topups_nano - self.extra_total_nano

    @property
    def balance_tracked(self) -> bool:
        """The balance blocks only for Team orgs, after the first top-up or extra spend."""
        return self.is_team and (
            self.balance_started or self.topups_nano > 0 or self.extra_total_nano > 0
        )


SpendLookup = Callable[[str, str | None], int]
"""``spend(period, user_id)`` -> extra cost (nano-USD) of the org (user None) or a member."""


@dataclass(frozen=True, slots=True)
class Block:
    """Why a scope is blocked (or, with ``blocked`` False, its current effective limit)."""

    blocked: bool
    kind: str  # "DISABLED", "BALANCE", "CAP" or "NONE"
    source: LimitSource | None
    spend_nano: int
    limit_nano: int | None


def org_block(policy: OrgPolicy, spend: SpendLookup) -> Block:
    """The ORG scope's condition, in the SPEC's precedence order."""
    org_spend = spend(policy.period, None) if policy.period else 0
    if policy.disabled:
        return Block(True, "DISABLED", LimitSource.ORG, org_spend, 0)
    if policy.balance_tracked and policy.balance_nano <= 0:
        return Block(
            True, "BALANCE", LimitSource.BALANCE, policy.extra_total_nano, policy.topups_nano
        )
    cap = policy.org_cap_nano
    if cap is not None:
        return Block(
            org_spend >= cap, "CAP" if org_spend >= cap else "NONE", LimitSource.ORG, org_spend, cap
        )
    return Block(False, "NONE", None, org_spend, None)


def effective_cap(policy: OrgPolicy, member: Member) -> tuple[int | None, LimitSource | None]:
    """min(USER cap, SEAT_TIER cap of the current tier); USER wins a tie. None: unlimited."""
    candidates: list[tuple[int, int, LimitSource]] = []
    if member.cap_nano is not None:
        candidates.append((member.cap_nano, 0, LimitSource.USER))
    if member.tier is not None and not policy.is_team:
        tier_cap = policy.tier_caps_nano.get(member.tier)
        if tier_cap is not None:
            candidates.append((tier_cap, 1, LimitSource.SEAT_TIER))
    if not candidates:
        return None, None
    cap, _, source = min(candidates)
    return cap, source


def _org_unlimited(policy: OrgPolicy) -> bool:
    """True when :func:`org_block` cannot block the ORG scope, whatever the spend: no cap,
    not disabled, no exhausted Team balance. Lets usage skip the spend lookup."""
    return (
        policy.org_cap_nano is None
        and not policy.disabled
        and not (policy.balance_tracked and policy.balance_nano <= 0)
    )


def _user_unlimited(policy: OrgPolicy, member: Member) -> bool:
    """True when :func:`user_block` cannot block the member, whatever the spend: not
    disabled and no effective cap (:func:`effective_cap` is None)."""
    if member.disabled or member.cap_nano is not None:
        return False
    return member.tier is None or policy.is_team or policy.tier_caps_nano.get(member.tier) is None


def user_block(policy: OrgPolicy, user_id: str, member: Member, spend: SpendLookup) -> Block:
    """A member's USER scope condition."""
    user_spend = spend(policy.period, user_id) if policy.period else 0
    if member.disabled:
        return Block(True, "DISABLED", LimitSource.USER, user_spend, 0)
    cap, source = effective_cap(policy, member)
    if cap is None:
        return Block(False, "NONE", None, user_spend, None)
    blocked = user_spend >= cap
    return Block(blocked, "CAP" if blocked else "NONE", source, user_spend, cap)


# -- the state machine ---------------------------------------------------------------------


@dataclass
class Step:
    """The result of one input: the policy, the events to send, and whether to store it.

    ``changed`` is False when the input left the policy as it was (most usage events of an
    org without a Team balance): the adapter then skips the table write. That is safe because
    such an input emitted nothing and touched no member, so a re-delivery has nothing to
    re-send. Members may be stored apart from the policy: ``touched`` names those to write
    (always with the policy, whose offsets record the input).
    """

    policy: OrgPolicy
    events: list[EnforcementEvent]
    redelivered: bool = False
    changed: bool = True
    # Members this input created or changed: the adapter stores them with the policy.
    touched: dict[str, Member] = field(default_factory=dict)


class _Emitter:
    def __init__(self, org_id: str, trigger_id: str, now_ms: int, period: str) -> None:
        self.org_id = org_id
        self.trigger_id = trigger_id
        self.now_ms = now_ms
        self.period = period
        self.events: list[EnforcementEvent] = []
        self.touched: dict[str, Member] = {}

    def emit(
        self,
        action: Action,
        scope: Scope,
        reason: Reason,
        user_id: str | None,
        block: Block,
        **extra: int | None,
    ) -> None:
        self.events.append(
            EnforcementEvent(
                event_id=event_id(self.org_id, self.trigger_id, action, scope, user_id),
                action=action,
                scope=scope,
                reason=reason,
                org_id=self.org_id,
                user_id=user_id,
                period=self.period,
                spend_nano_usd=block.spend_nano,
                limit_nano_usd=block.limit_nano,
                limit_source=block.source,
                trigger_id=self.trigger_id,
                emitted_at=self.now_ms,
                **extra,
            )
        )


_PAUSE_REASON = {"DISABLED": Reason.DISABLED, "BALANCE": Reason.BALANCE_EXHAUSTED}
_CAP_PAUSE_REASON = {
    Trigger.USAGE: Reason.CAP_REACHED,
    Trigger.CAP_CHANGE: Reason.CAP_LOWERED,
    Trigger.CAP_REMOVAL: Reason.CAP_LOWERED,
}
_RESUME_REASON = {
    Trigger.USAGE: Reason.CAP_RAISED,  # a tier change carried by usage
    Trigger.CAP_CHANGE: Reason.CAP_RAISED,
    Trigger.CAP_REMOVAL: Reason.CAP_REMOVED,
    Trigger.ENABLEMENT: Reason.ENABLED,
    Trigger.TOP_UP: Reason.BALANCE_TOPPED_UP,
    Trigger.PERIOD: Reason.PERIOD_RESET,
    Trigger.REPRICE: Reason.REPRICED,
}


class Enforcer:
    """Applies inputs to :class:`OrgPolicy` values. ``grace_ms`` delays the wall-clock
    rollover of idle orgs; ``period_timer`` False ignores :class:`PeriodTick` entirely."""

    def __init__(self, *, grace_ms: int = 3_600_000, period_timer: bool = True) -> None:
        self.grace_ms = grace_ms
        self.period_timer = period_timer

    # -- inputs ----------------------------------------------------------------------------

    def on_usage(
        self,
        policy: OrgPolicy,
        priced: PricedEvent,
        offset: int,
        spend: SpendLookup,
        now_ms: int,
    ) -> Step:
        """A priced usage event (already added to the monthly totals ``spend`` reads)."""
        redelivery = self._redelivery(policy, USAGE_SOURCE, offset)
        if redelivery is not None:
            return redelivery
        event = priced.event
        period = month_of(event.occurred_at_ms)
        extra = priced.extra_cost_nano
        emitter = _Emitter(event.org_id, f"usage:{event.event_id}", now_ms, period)
        changed = policy.plan != event.plan.value or (extra > 0 and event.plan is Plan.TEAM)
        policy.plan = event.plan.value
        if policy.period is not None and period < policy.period:
            # Late: counted (totals, Team balance) but never pauses or resumes anyone.
            self._spend_balance(policy, extra, emitter)
            return self._done(policy, USAGE_SOURCE, offset, emitter, changed)
        if policy.period is None or period > policy.period:
            # The new month starts before this event counts: resume what was monthly.
            def before_event(p: str | None, user: str | None) -> int:
                own = extra if user in (None, event.user_id) and p == period else 0
                return spend(p, user) - own if p else 0

            policy.period = period
            changed = True
            self._reevaluate_all(policy, before_event, Trigger.PERIOD, emitter)
        member = _member(policy, event.user_id, emitter)
        if member.tier != event.seat_tier.value:
            member.tier = event.seat_tier.value  # a tier change carried by usage: re-decided
            emitter.touched[event.user_id] = member
        self._spend_balance(policy, extra, emitter)
        repricing = policy.repricing and now_ms - policy.repriced_at_ms <= REPRICING_WINDOW_MS
        trigger = Trigger.REPRICE if repricing else Trigger.USAGE
        self._reevaluate_org(policy, spend, trigger, emitter)
        self._reevaluate_user(policy, event.user_id, member, spend, trigger, emitter)
        return self._done(policy, USAGE_SOURCE, offset, emitter, changed)

    def on_control(
        self,
        policy: OrgPolicy,
        message: ControlMessage,
        offset: int,
        spend: SpendLookup,
        now_ms: int,
    ) -> Step:
        """A control message of this org. Raises :class:`RejectedEvent` (``PLAN_MISMATCH`` or
        ``INVALID_FIELD``) for a command the org's plan does not allow or that cannot apply."""
        redelivery = self._redelivery(policy, CONTROL_SOURCE, offset)
        if redelivery is not None:
            return redelivery
        command = message.command
        period = policy.period or month_of(message.issued_at_ms)
        emitter = _Emitter(message.org_id, f"control:{message.message_id}", now_ms, period)
        if isinstance(command, SetCap):
            self._set_cap(policy, command, spend, emitter)
        elif isinstance(command, SetEnabled):
            self._set_enabled(policy, command, spend, emitter)
        elif isinstance(command, TopUp):
            self._top_up(policy, command, spend, emitter)
        elif isinstance(command, SetAutoReload):
            self._set_auto_reload(policy, command, emitter)
        elif isinstance(command, PeriodTick):
            self._tick(policy, command, spend, emitter)
        elif isinstance(command, Repriced):
            self._repriced(policy, command, spend, emitter, now_ms)
        return self._done(policy, CONTROL_SOURCE, offset, emitter)

    # -- commands --------------------------------------------------------------------------

    def _set_cap(
        self, policy: OrgPolicy, command: SetCap, spend: SpendLookup, emitter: _Emitter
    ) -> None:
        limit = command.limit_nano
        if limit is not None and limit < 0:
            raise RejectedEvent(DeadLetterReason.INVALID_FIELD, "a cap cannot be negative")
        trigger = Trigger.CAP_REMOVAL if limit is None else Trigger.CAP_CHANGE
        if command.scope == "ORG":
            policy.org_cap_nano = limit
            self._reevaluate_org(policy, spend, trigger, emitter)
        elif command.scope == "SEAT_TIER":
            if policy.is_team:
                raise RejectedEvent(
                    DeadLetterReason.PLAN_MISMATCH,
                    "SEAT_TIER caps are for Enterprise organisations; this one is on TEAM",
                )
            if command.seat_tier not in (SeatTier.STANDARD.value, SeatTier.PREMIUM.value):
                raise RejectedEvent(DeadLetterReason.INVALID_FIELD, "SEAT_TIER cap needs a tier")
            policy.tier_caps_nano[command.seat_tier] = limit
            for user_id, member in policy.members.items():
                if member.tier == command.seat_tier:
                    self._reevaluate_user(policy, user_id, member, spend, trigger, emitter)
        elif command.scope == "USER":
            if not command.user_id:
                raise RejectedEvent(DeadLetterReason.INVALID_FIELD, "USER cap needs a user id")
            member = _member(policy, command.user_id, emitter)
            member.cap_nano = limit
            emitter.touched[command.user_id] = member
            self._reevaluate_user(policy, command.user_id, member, spend, trigger, emitter)
        else:
            raise RejectedEvent(DeadLetterReason.INVALID_FIELD, f"unknown scope {command.scope}")

    def _set_enabled(
        self, policy: OrgPolicy, command: SetEnabled, spend: SpendLookup, emitter: _Emitter
    ) -> None:
        if command.user_id is None:
            policy.disabled = not command.enabled
            self._reevaluate_org(policy, spend, Trigger.ENABLEMENT, emitter)
        else:
            member = _member(policy, command.user_id, emitter)
            member.disabled = not command.enabled
            emitter.touched[command.user_id] = member
            self._reevaluate_user(
                policy, command.user_id, member, spend, Trigger.ENABLEMENT, emitter
            )

    def _top_up(
        self, policy: OrgPolicy, command: TopUp, spend: SpendLookup, emitter: _Emitter
    ) -> None:
        if policy.plan == Plan.ENTERPRISE.value:
            raise RejectedEvent(
                DeadLetterReason.PLAN_MISMATCH, "prepaid top-ups are for Team organisations"
            )
        if command.amount_nano <= 0:
            raise RejectedEvent(DeadLetterReason.INVALID_FIELD, "a top-up must be positive")
        if command.purchase_id in policy.purchases:
            return  # a repeated purchase id is applied once
        policy.purchases.append(command.purchase_id)
        policy.topups_nano += command.amount_nano
        if policy.reload is not None and policy.balance_nano > policy.reload[0]:
            policy.reload_armed = True
        self._reevaluate_org(policy, spend, Trigger.TOP_UP, emitter)

    def _set_auto_reload(
        self, policy: OrgPolicy, command: SetAutoReload, emitter: _Emitter
    ) -> None:
        if policy.plan == Plan.ENTERPRISE.value:
            raise RejectedEvent(
                DeadLetterReason.PLAN_MISMATCH, "auto-reload is for Team organisations"
            )
        if not command.enabled:
            policy.reload = None
            return
        threshold, amount = command.threshold_nano, command.amount_nano
        if threshold is None or amount is None or threshold < 0 or amount <= 0:
            raise RejectedEvent(
                DeadLetterReason.INVALID_FIELD,
                "auto-reload needs a threshold >= 0 and an amount > 0",
            )
        # Enabling arms the reload (SPEC: "enabling it while already at or below" emits one).
        # A new setting of a reload already on is no new dip: it arms only above the new
        # threshold, so a re-sent command (a CLI retry has a new message id) never asks
        # billing twice for one dip, while raising the threshold over the balance asks once.
        enabling = policy.reload is None
        policy.reload = (threshold, amount)
        if enabling or policy.balance_nano > threshold:
            policy.reload_armed = True
        self._maybe_reload(policy, emitter)

    def _tick(
        self, policy: OrgPolicy, command: PeriodTick, spend: SpendLookup, emitter: _Emitter
    ) -> None:
        if not self.period_timer or policy.period is None:
            return
        wall_period = month_of(command.wall_clock_ms - self.grace_ms)
        if wall_period > policy.period:
            policy.period = wall_period
            emitter.period = wall_period
            self._reevaluate_all(policy, spend, Trigger.PERIOD, emitter)

    def _repriced(
        self,
        policy: OrgPolicy,
        command: Repriced,
        spend: SpendLookup,
        emitter: _Emitter,
        now_ms: int,
    ) -> None:
        delta = command.extra_delta_nano
        if delta and policy.is_team:
            policy.balance_started = policy.balance_tracked  # a correction to 0 keeps it
            policy.extra_total_nano += delta
            if delta > 0:
                self._maybe_reload(policy, emitter)
            elif policy.reload is not None and policy.balance_nano > policy.reload[0]:
                policy.reload_armed = True  # back above the threshold: the next crossing counts
        policy.repricing = not command.final
        policy.repriced_at_ms = 0 if command.final else now_ms
        if command.final and policy.period is not None:
            self._reevaluate_all(policy, spend, Trigger.REPRICE, emitter)

    # -- evaluation ------------------------------------------------------------------------

    def _spend_balance(self, policy: OrgPolicy, extra: int, emitter: _Emitter) -> None:
        if extra and policy.is_team:
            policy.extra_total_nano += extra
            self._maybe_reload(policy, emitter)

    def _maybe_reload(self, policy: OrgPolicy, emitter: _Emitter) -> None:
        """One RELOAD_REQUESTED per downward crossing to <= threshold (or on enabling)."""
        if policy.reload is None or not policy.reload_armed:
            return
        threshold, amount = policy.reload
        balance = policy.balance_nano
        if balance <= threshold:
            policy.reload_armed = False
            emitter.emit(
                Action.RELOAD_REQUESTED,
                Scope.ORG,
                Reason.BALANCE_LOW,
                None,
                Block(
                    True,
                    "BALANCE",
                    LimitSource.BALANCE,
                    policy.extra_total_nano,
                    policy.topups_nano,
                ),
                amount_nano_usd=amount,
                balance_nano_usd=balance,
            )

    def _reevaluate_all(
        self, policy: OrgPolicy, spend: SpendLookup, trigger: Trigger, emitter: _Emitter
    ) -> None:
        self._reevaluate_org(policy, spend, trigger, emitter)
        for user_id, member in policy.members.items():
            self._reevaluate_user(policy, user_id, member, spend, trigger, emitter)

    def _reevaluate_org(
        self, policy: OrgPolicy, spend: SpendLookup, trigger: Trigger, emitter: _Emitter
    ) -> None:
        if not policy.paused and _org_unlimited(policy):
            return  # nothing can block it, and it is not paused: no transition
        block = org_block(policy, spend)
        if block.blocked != policy.paused:
            policy.paused = block.blocked
            self._transition(emitter, Scope.ORG, None, block, trigger)

    def _reevaluate_user(
        self,
        policy: OrgPolicy,
        user_id: str,
        member: Member,
        spend: SpendLookup,
        trigger: Trigger,
        emitter: _Emitter,
    ) -> None:
        if not member.paused and _user_unlimited(policy, member):
            return  # nothing can block it, and it is not paused: no transition
        block = user_block(policy, user_id, member, spend)
        if block.blocked == member.paused:
            return
        member.paused = block.blocked
        emitter.touched[user_id] = member
        self._transition(emitter, Scope.USER, user_id, block, trigger)

    def _transition(
        self, emitter: _Emitter, scope: Scope, user_id: str | None, block: Block, trigger: Trigger
    ) -> None:
        if block.blocked:
            if trigger is Trigger.REPRICE:
                reason = Reason.REPRICED
            elif block.kind == "CAP":
                reason = _CAP_PAUSE_REASON.get(trigger, Reason.CAP_REACHED)
            else:
                reason = _PAUSE_REASON[block.kind]
            emitter.emit(Action.PAUSE, scope, reason, user_id, block)
        else:
            emitter.emit(Action.RESUME, scope, _RESUME_REASON[trigger], user_id, block)

    # -- at-least-once bookkeeping ---------------------------------------------------------

    @staticmethod
    def _redelivery(policy: OrgPolicy, source: str, offset: int) -> Step | None:
        if policy.offsets.get(source, -1) < offset:
            return None
        for entry_source, entry_offset, records in policy.outbox:
            if entry_source == source and entry_offset == offset:
                events = [EnforcementEvent.from_record(r) for r in records]
                return Step(policy, events, redelivered=True)
        return Step(policy, [], redelivered=True)

    @staticmethod
    def _done(
        policy: OrgPolicy, source: str, offset: int, emitter: _Emitter, changed: bool = True
    ) -> Step:
        """Record the input as applied: an input that touched a member changed the policy
        too (its offsets), so a re-delivery is recognised by the policy alone."""
        if not changed and not emitter.events and not emitter.touched:
            return Step(policy, [], changed=False)
        policy.offsets[source] = offset
        if emitter.events:
            policy.outbox.append([source, offset, [e.record() for e in emitter.events]])
            del policy.outbox[:-OUTBOX_SIZE]
        return Step(policy, emitter.events, touched=emitter.touched)


def _member(policy: OrgPolicy, user_id: str, emitter: _Emitter) -> Member:
    """The member ``user_id`` of ``policy``, created (and marked touched) if new."""
    member = policy.members.get(user_id)
    if member is None:
        member = policy.members[user_id] = Member()
        emitter.touched[user_id] = member
    return member


def describe(policy: OrgPolicy, spend: SpendLookup) -> dict[str, Any]:
    """What ``metering caps show`` prints: state per scope, spend, effective limit, source."""
    org = org_block(policy, spend)
    members = []
    for user_id, member in sorted(policy.members.items()):
        block = user_block(policy, user_id, member, spend)
        cap, source = effective_cap(policy, member)
        members.append(
            {
                "user_id": user_id,
                "seat_tier": member.tier,
                "state": "PAUSED" if member.paused else "ACTIVE",
                "disabled": member.disabled,
                "spend_nano_usd": block.spend_nano,
                "limit_nano_usd": 0 if member.disabled else cap,
                "limit_source": LimitSource.USER.value
                if member.disabled
                else (source.value if source else None),
                "user_cap_nano_usd": member.cap_nano,
            }
        )
    return {
        "plan": policy.plan,
        "period": policy.period,
        "org": {
            "state": "PAUSED" if policy.paused else "ACTIVE",
            "disabled": policy.disabled,
            "spend_nano_usd": org.spend_nano,
            "limit_nano_usd": org.limit_nano,
            "limit_source": org.source.value if org.source else None,
            "org_cap_nano_usd": policy.org_cap_nano,
        },
        "seat_tier_caps_nano_usd": dict(policy.tier_caps_nano),
        "balance": {
            "tracked": policy.balance_tracked,
            "balance_nano_usd": policy.balance_nano,
            "topups_nano_usd": policy.topups_nano,
            "extra_cost_nano_usd": policy.extra_total_nano,
        },
        "auto_reload": (
            {"threshold_nano_usd": policy.reload[0], "amount_nano_usd": policy.reload[1]}
            if policy.reload
            else None
        ),
        "members": members,
    }
