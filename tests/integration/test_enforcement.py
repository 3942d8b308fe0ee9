"""Caps and enforcement end to end on the real broker (SPEC §5).

Every step waits until the worker has consumed everything before the next one, so the order
of usage and control messages is the order written here. Costs are exact: one Claude Haiku
3.5 input token is 800 nano-USD, so 1,250,000 input tokens cost exactly $1.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from jobs.pauses import read_pauses
from tests.integration.harness import Deployment, wait_for
from tests.integration.test_pipeline import dead_letters

pytestmark = pytest.mark.integration

NANO = 1_000_000_000
TOKENS_PER_USD = 1_250_000  # Haiku 3.5 input: $0.80 / MTok


def usd(amount: float) -> int:
    return round(amount * NANO)


class Scenario:
    """Drives one deployment step by step and collects what enforcement emitted."""

    def __init__(self, deployment: Deployment) -> None:
        from jobs.control import ControlProducer
        from jobs.producer import UsageProducer
        from streams.topics import ensure_topics

        self.deployment = deployment
        self.settings = deployment.settings
        ensure_topics(self.settings)
        self.usage = UsageProducer(self.settings)
        self.control = ControlProducer(self.settings)
        self.sequence = 0

    def use(
        self,
        org: str,
        plan: str,
        user: str,
        tier: str,
        dollars: float,
        occurred_at: datetime | None = None,
        extra: bool = True,
    ) -> None:
        self.sequence += 1
        moment = occurred_at or datetime.now(tz=UTC)
        self.usage.send_event(
            {
                "event_id": f"{org}-{self.sequence}",
                "occurred_at": int(moment.timestamp() * 1000),
                "org_id": org,
                "plan": plan,
                "user_id": user,
                "seat_tier": tier,
                "product": "CLAUDE",
                "model": "claude-3-5-haiku-20241022",
                "input_tokens": round(dollars * TOKENS_PER_USD),
                "output_tokens": 0,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "extra_usage": extra,
            }
        )
        self.usage.close()
        self.settle()

    def command(self, org: str, name: str, **fields: Any) -> None:
        self.control.send(org, (name, fields))
        self.settle()

    def cap(
        self,
        org: str,
        scope: str,
        limit: int | None,
        user: str | None = None,
        tier: str | None = None,
    ) -> None:
        self.command(org, "SetCap", scope=scope, user_id=user, seat_tier=tier, limit_nano_usd=limit)

    def settle(self) -> None:
        """Wait until the worker consumed both of its input topics to the end."""
        from jobs.progress import group_position
        from streams.topics import CONTROL, USAGE

        def caught_up() -> bool:
            for topic in (USAGE, CONTROL):
                position = group_position(
                    self.settings, self.settings.app_id, self.settings.topic(topic)
                )
                if position.end and position.lag:
                    return False
            return True

        wait_for(caught_up, 120, "the worker to consume usage and control messages", 0.2)

    def events(self, expected: int) -> list[dict[str, Any]]:
        def enough() -> list[dict[str, Any]] | None:
            got = list(read_pauses(self.settings, follow=False, include_billing=True))
            return got if len(got) >= expected else None

        return wait_for(enough, 60, f"{expected} enforcement events")


def by_scope(events: list[dict[str, Any]]) -> dict[tuple, list[tuple]]:
    scopes: dict[tuple, list[tuple]] = defaultdict(list)
    for event in events:
        key = (event["org_id"], event["scope"], event["user_id"])
        scopes[key].append(
            (
                event["action"],
                event["reason"],
                event["limit_source"],
                event["spend_nano_usd"],
                event["limit_nano_usd"],
            )
        )
    return dict(scopes)


def test_caps_balances_and_rollover_emit_exactly_the_expected_events(
    deployment: Deployment,
) -> None:
    worker = deployment.start_worker()
    s = Scenario(deployment)
    E, T, R = "org-ent", "org-team", "org-roll"
    ent, team = "ENTERPRISE", "TEAM"

    # Enterprise: caps set before any usage (no usage yet: nothing is blocked).
    s.cap(E, "ORG", usd(10))
    s.cap(E, "SEAT_TIER", usd(3), tier="PREMIUM")
    s.cap(E, "USER", usd(2), user="alice")
    s.cap(E, "USER", None, user="bob")  # unlimited: the tier cap stays in force
    s.use(E, ent, "alice", "STANDARD", 1)
    s.use(E, ent, "alice", "STANDARD", 1.5)  # 2.5 >= 2: PAUSE alice (USER cap)
    s.use(E, ent, "bob", "PREMIUM", 2)
    s.use(E, ent, "bob", "PREMIUM", 0.5)  # 2.5 < 3: bob stays active
    s.use(E, ent, "carol", "PREMIUM", 3.5)  # PAUSE carol (SEAT_TIER cap)
    s.use(E, ent, "dave", "STANDARD", 2)  # org 10.5 >= 10: PAUSE org
    s.cap(E, "ORG", usd(20))  # RESUME org, no new usage needed
    s.cap(E, "SEAT_TIER", usd(2), tier="PREMIUM")  # PAUSE bob (2.5 >= 2), carol unchanged
    s.cap(E, "USER", None, user="alice")  # RESUME alice: no cap left for STANDARD
    s.command(E, "SetEnabled", enabled=False, user_id="dave")
    s.command(E, "SetEnabled", enabled=True, user_id="dave")
    s.command(E, "SetEnabled", enabled=False, user_id=None)
    s.command(E, "SetEnabled", enabled=True, user_id=None)

    # Team: prepaid balance, auto-reload, exhaustion, top-up (a repeated purchase counts once).
    s.use(T, team, "tom", "STANDARD", 1, extra=False)  # included usage: no balance effect
    s.command(T, "TopUp", purchase_id="p1", amount_nano_usd=usd(5))
    s.command(T, "SetAutoReload", enabled=True, threshold_nano_usd=usd(2), amount_nano_usd=usd(5))
    s.use(T, team, "tom", "STANDARD", 2)  # balance 3
    s.use(T, team, "tom", "STANDARD", 1.5)  # balance 1.5 <= 2: RELOAD_REQUESTED once
    s.use(T, team, "tom", "STANDARD", 1.5)  # balance 0: PAUSE org (BALANCE)
    s.command(T, "TopUp", purchase_id="p2", amount_nano_usd=usd(5))  # RESUME
    s.command(T, "TopUp", purchase_id="p2", amount_nano_usd=usd(5))  # repeated: ignored
    s.cap(T, "SEAT_TIER", usd(1), tier="PREMIUM")  # refused: PLAN_MISMATCH dead letter

    # Rollover: last month's spend paused the org; this month's first event resumes it.
    this_month = datetime.now(tz=UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    last_month = this_month - timedelta(days=3)
    s.cap(R, "ORG", usd(1))
    s.use(R, ent, "rita", "STANDARD", 1.5, occurred_at=last_month)  # PAUSE (CAP_REACHED)
    s.use(R, ent, "rita", "STANDARD", 0.1)  # new month: RESUME (PERIOD_RESET)
    s.use(R, ent, "rita", "STANDARD", 5, occurred_at=last_month)  # late: nothing

    events = s.events(15)
    scopes = by_scope(events)
    cap_src, tier_src, user_src = "ORG", "SEAT_TIER", "USER"
    assert scopes == {
        (E, "USER", "alice"): [
            ("PAUSE", "CAP_REACHED", user_src, usd(2.5), usd(2)),
            ("RESUME", "CAP_REMOVED", None, usd(2.5), None),
        ],
        (E, "USER", "carol"): [("PAUSE", "CAP_REACHED", tier_src, usd(3.5), usd(3))],
        (E, "ORG", None): [
            ("PAUSE", "CAP_REACHED", cap_src, usd(10.5), usd(10)),
            ("RESUME", "CAP_RAISED", cap_src, usd(10.5), usd(20)),
            ("PAUSE", "DISABLED", cap_src, usd(10.5), 0),
            ("RESUME", "ENABLED", cap_src, usd(10.5), usd(20)),
        ],
        (E, "USER", "bob"): [("PAUSE", "CAP_LOWERED", tier_src, usd(2.5), usd(2))],
        (E, "USER", "dave"): [
            ("PAUSE", "DISABLED", user_src, usd(2), 0),
            ("RESUME", "ENABLED", None, usd(2), None),
        ],
        (T, "ORG", None): [
            ("RELOAD_REQUESTED", "BALANCE_LOW", "BALANCE", usd(3.5), usd(5)),
            ("PAUSE", "BALANCE_EXHAUSTED", "BALANCE", usd(5), usd(5)),
            ("RESUME", "BALANCE_TOPPED_UP", None, usd(5), None),
        ],
        (R, "ORG", None): [
            ("PAUSE", "CAP_REACHED", cap_src, usd(1.5), usd(1)),
            # The reset comes before the event that starts the month counts: spend 0.
            ("RESUME", "PERIOD_RESET", cap_src, 0, usd(1)),
        ],
    }
    letters = dead_letters(deployment, 1)
    assert [(d["reason"], d["source_topic"]) for d in letters] == [
        ("PLAN_MISMATCH", deployment.settings.topic("metering.control"))
    ]
    reload = next(e for e in events if e["action"] == "RELOAD_REQUESTED")
    assert (reload["amount_nano_usd"], reload["balance_nano_usd"]) == (usd(5), usd(1.5))
    periods = {e["period"] for e in events if e["org_id"] == R}
    assert periods == {last_month.strftime("%Y-%m"), this_month.strftime("%Y-%m")}

    # caps show reports what the worker sees.
    shown = deployment.metering("caps", "show", "--org", E, "--json")
    assert shown.returncode == 0, shown.stderr
    view = json.loads(shown.stdout)
    members = {m["user_id"]: m for m in view["members"]}
    assert members["bob"]["state"] == "PAUSED" and members["alice"]["state"] == "ACTIVE"
    assert view["org"]["state"] == "ACTIVE"

    # Every emitted event is in ClickHouse's enforcement log.
    def logged() -> bool:
        rows = deployment.view("enforcement_log")
        return {r["event_id"] for r in rows} == {e["event_id"] for e in events}

    wait_for(logged, 60, "the enforcement log to hold every emitted event")

    # A restarted worker re-reads everything and emits no new ids.
    ids = {e["event_id"] for e in events}
    assert worker.terminate() == 0, worker.log()[-3000:]
    again = deployment.start_worker()
    s.use(E, ent, "erin", "STANDARD", 0.1)  # settles: the new worker consumed everything
    after = read_pauses(deployment.settings, follow=False, include_billing=True)
    assert {e["event_id"] for e in after} == ids
    assert again.terminate() == 0


def test_an_org_of_thirty_thousand_members_is_metered_and_enforced(
    deployment: Deployment,
) -> None:
    """Members used to live inside their org's policy: with hashed user ids, below 30,000
    members the value outgrew a Kafka message even compressed, and the worker stopped on it
    for ever. 30,000 members, one event each; a SEAT_TIER cap then pauses exactly the 30 who
    spent more than it, and a restart emits nothing new."""
    from jobs.producer import UsageProducer

    worker = deployment.start_worker()
    s = Scenario(deployment)
    org, members = "org-large", 30_000
    producer = UsageProducer(deployment.settings)
    now_ms = int(datetime.now(tz=UTC).timestamp() * 1000)
    user_ids = [hashlib.sha256(f"member {i}".encode()).hexdigest() for i in range(members)]
    big = set(user_ids[::1000])
    for i, user in enumerate(user_ids):
        producer.send_event(
            {
                "event_id": f"large-{i}",
                "occurred_at": now_ms,
                "org_id": org,
                "plan": "ENTERPRISE",
                "user_id": user,
                "seat_tier": "STANDARD",
                "product": "CLAUDE",
                "model": "claude-3-5-haiku-20241022",
                "input_tokens": TOKENS_PER_USD if user in big else TOKENS_PER_USD // 1000,
                "output_tokens": 0,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "extra_usage": True,
            }
        )
    producer.close()
    s.settle()
    s.cap(org, "SEAT_TIER", usd(0.5), tier="STANDARD")

    events = s.events(len(big))
    assert sorted(e["user_id"] for e in events) == sorted(big)
    assert {(e["action"], e["reason"], e["limit_source"], e["spend_nano_usd"]) for e in events} == {
        ("PAUSE", "CAP_LOWERED", "SEAT_TIER", usd(1))
    }
    assert worker.process.poll() is None and not worker.replaced, worker.log()[-3000:]

    shown = deployment.metering("caps", "show", "--org", org, "--json")
    assert shown.returncode == 0, shown.stderr
    view = json.loads(shown.stdout)
    assert len(view["members"]) == members
    assert {m["user_id"] for m in view["members"] if m["state"] == "PAUSED"} == big

    ids = {e["event_id"] for e in events}
    assert worker.terminate() == 0, worker.log()[-3000:]
    again = deployment.start_worker()
    s.cap(org, "SEAT_TIER", usd(0.5), tier="STANDARD")  # the same cap again: nothing new
    s.use(org, "ENTERPRISE", user_ids[1], "STANDARD", 0.001)
    after = read_pauses(deployment.settings, follow=False, include_billing=True)
    assert {e["event_id"] for e in after} == ids
    assert again.terminate() == 0
