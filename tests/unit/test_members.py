"""Members stored under keys of their own (streams.members), on real RocksDB.

What these pin: an organisation's policy no longer grows with its membership (25,000
members did not fit in one Kafka message), the enforcer sees exactly the members that are
stored and buffered, a refused input changes no member, a re-delivery names the members to
store again, and no org id can read or overwrite another org's keys.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest

from core.enforcement import (
    Action,
    ControlMessage,
    Enforcer,
    Member,
    OrgPolicy,
    SetCap,
    Step,
)
from core.errors import RejectedEvent
from core.pricing import PriceTable, default_price_table_path
from core.usage import PricedEvent
from core.validation import validate_usage
from streams.members import (
    TableMembers,
    decode_value,
    encode_value,
    index_key,
    index_prefix,
    member_key,
    member_prefix,
    policy_key,
)
from streams.output import BatchedOutput
from streams.state import TableState
from tests.unit.test_output_state import FakeTable, RecordingProducer

KAFKA_MESSAGE_LIMIT = 1_048_588  # the broker's default message.max.bytes
NOW_MS = 1_795_000_000_000  # 2026-11
USD = 1_000_000_000
PRICES = PriceTable.load(default_price_table_path())


@pytest.fixture
def table(tmp_path: Path) -> Any:
    fake = FakeTable(tmp_path / "policies", "app-policies-changelog")
    yield fake
    fake.data.close()


def policy_state(table: Any) -> tuple[RecordingProducer, BatchedOutput, TableState[Any]]:
    producer = RecordingProducer()
    output = BatchedOutput(lambda: producer, lambda _: None)
    return producer, output, TableState(table, output, encode_value, decode_value)


def priced(org: str, user: str, tier: str, event_id: str, tokens: int = 1000) -> PricedEvent:
    event = validate_usage(
        {
            "event_id": event_id,
            "occurred_at": NOW_MS,
            "org_id": org,
            "plan": "ENTERPRISE",
            "user_id": user,
            "seat_tier": tier,
            "product": "CLAUDE",
            "model": "claude-sonnet-4-20250514",
            "input_tokens": tokens,
            "output_tokens": 0,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "extra_usage": True,
        },
        NOW_MS,
    )
    price = PRICES.price(event.model, event.usage, event.occurred_at_ms)
    return PricedEvent(event, price)


def store_step(state: TableState[Any], org: str, step: Step) -> None:
    """What the worker does with a step (streams.app.store_step)."""
    members = step.policy.members
    assert isinstance(members, TableMembers)
    members.store(step.touched)
    if step.changed:
        state.put(policy_key(org), 0, step.policy)


def test_a_policy_does_not_grow_with_its_members(table: Any) -> None:
    async def scenario() -> None:
        producer, output, state = policy_state(table)
        enforcer = Enforcer()
        policy = OrgPolicy()
        spend_nothing = lambda period, user: 0  # noqa: E731
        for i in range(30_000):
            policy.members = TableMembers(state, "org-big", 0)
            event = priced("org-big", f"user-{i:05d}", "STANDARD", f"e{i}")
            store_step(state, "org-big", enforcer.on_usage(policy, event, i, spend_nothing, NOW_MS))
        # The old form (members inside the policy) would not fit in one Kafka message.
        legacy = OrgPolicy(members={f"user-{i:05d}": Member("STANDARD") for i in range(30_000)})
        assert len(orjson.dumps(legacy.to_json())) > KAFKA_MESSAGE_LIMIT

        assert state.flush() == 30_001  # the policy and one key per member
        await output.drain()
        messages = producer.messages("app-policies-changelog", 0)
        assert len(messages) == 30_001
        assert max(len(value) for _, value in messages) < 1_000
        stored = decode_value(table.data._dbs[0].get(policy_key("org-big").encode()))
        assert isinstance(stored, OrgPolicy) and stored.members == {}
        stored.members = TableMembers(state, "org-big", 0)
        assert sum(1 for _ in stored.members.items()) == 30_000
        assert stored.members.get("user-12345") == Member("STANDARD", usage_offset=12345)

    asyncio.run(scenario())


def test_a_tier_cap_reaches_stored_and_buffered_members_and_a_repeat_changes_nothing(
    table: Any,
) -> None:
    _, _, state = policy_state(table)
    enforcer = Enforcer()
    policy = OrgPolicy()
    spend = {"ann": 5 * USD, "bob": 1 * USD, "cy": 7 * USD}

    def spend_of(period: str | None, user: str | None) -> int:
        return sum(spend.values()) if user is None else spend[user]

    for offset, (user, tier) in enumerate([("ann", "PREMIUM"), ("bob", "PREMIUM")]):
        policy.members = TableMembers(state, "org-1", 0)
        store_step(
            state,
            "org-1",
            enforcer.on_usage(
                policy, priced("org-1", user, tier, f"e{offset}"), offset, spend_of, NOW_MS
            ),
        )
    state.flush()  # ann and bob in RocksDB; cy only buffered
    policy.members = TableMembers(state, "org-1", 0)
    store_step(
        state,
        "org-1",
        enforcer.on_usage(policy, priced("org-1", "cy", "PREMIUM", "e2"), 2, spend_of, NOW_MS),
    )

    cap = ControlMessage("m1", "org-1", NOW_MS, SetCap("SEAT_TIER", 4 * USD, seat_tier="PREMIUM"))
    policy.members = TableMembers(state, "org-1", 0)
    step = enforcer.on_control(policy, cap, 0, spend_of, NOW_MS)
    store_step(state, "org-1", step)
    paused = sorted(e.user_id for e in step.events if e.action is Action.PAUSE)
    assert paused == ["ann", "cy"]
    assert sorted(step.touched) == ["ann", "cy"]

    fresh = TableMembers(state, "org-1", 0)
    assert {user: m.paused for user, m in fresh.items()} == {"ann": True, "bob": False, "cy": True}

    # The same control message again: the recorded events, the touched members named for a
    # repair write, and no member changed.
    policy.members = TableMembers(state, "org-1", 0)
    again = enforcer.on_control(policy, cap, 0, spend_of, NOW_MS)
    assert again.redelivered and [e.event_id for e in again.events] == [
        e.event_id for e in step.events
    ]
    assert sorted(again.touched) == ["ann", "cy"]
    assert {user: m.paused for user, m in TableMembers(state, "org-1", 0).items()} == {
        "ann": True,
        "bob": False,
        "cy": True,
    }


def test_a_first_event_applied_again_changes_nothing() -> None:
    """A member's first event leaves the policy as it was; the member's own offset is what
    recognises the re-delivery (after a later tier change, it must not bring back the old
    tier)."""
    enforcer = Enforcer()
    policy = OrgPolicy(plan="ENTERPRISE", period="2026-11")
    nothing = lambda period, user: 0  # noqa: E731
    enforcer.on_usage(policy, priced("org-1", "ann", "STANDARD", "e1"), 10, nothing, NOW_MS)
    step = enforcer.on_usage(policy, priced("org-1", "ann", "PREMIUM", "e2"), 11, nothing, NOW_MS)
    assert not step.changed and list(step.touched) == ["ann"]
    again = enforcer.on_usage(policy, priced("org-1", "ann", "STANDARD", "e1"), 10, nothing, NOW_MS)
    assert again.redelivered and policy.members["ann"].tier == "PREMIUM"


def test_members_change_only_when_stored(table: Any) -> None:
    """The core changes member objects in place; until the adapter stores the step's
    touched members, neither the buffer nor the store sees the change (a refused input
    leaves nothing behind)."""
    _, _, state = policy_state(table)
    TableMembers(state, "org-t", 0).store({"ann": Member("STANDARD"), "bob": Member("PREMIUM")})
    state.flush()
    TableMembers(state, "org-t", 0).store({"bob": Member("PREMIUM", cap_nano=5)})  # buffered
    members = TableMembers(state, "org-t", 0)
    for _, member in members.items():
        member.paused = True
    assert members.get("ann") is members.get("ann") and members.get("ann").paused  # type: ignore[union-attr]
    fresh = TableMembers(state, "org-t", 0)
    assert dict(fresh.items()) == {
        "ann": Member("STANDARD"),
        "bob": Member("PREMIUM", cap_nano=5),
    }
    with pytest.raises(RejectedEvent):
        policy = OrgPolicy(plan="TEAM", members=TableMembers(state, "org-t", 0))
        cap = ControlMessage("m", "org-t", NOW_MS, SetCap("SEAT_TIER", 0, seat_tier="STANDARD"))
        Enforcer().on_control(policy, cap, 0, lambda p, u: 0, NOW_MS)
    assert TableMembers(state, "org-t", 0).get("ann") == Member("STANDARD")


def test_no_org_id_reaches_another_orgs_keys(table: Any, tmp_path: Path) -> None:
    _, output, state = policy_state(table)
    index_table = FakeTable(tmp_path / "index", "app-org_index-changelog")
    index = TableState(index_table, output, orjson.dumps, orjson.loads)
    tricky = ["a", "a,", 'a"', "[a", '["a","b"]', "a\\", "ä"]
    for org in tricky:
        TableMembers(state, org, 0).store({"b": Member(org)})
        state.put(policy_key(org), 0, OrgPolicy(plan=org))
        index.put(index_key(0, org), 0, 1)
    state.flush()
    index.flush()
    keys = [policy_key(org) for org in tricky] + [member_key(org, "b") for org in tricky]
    assert len(set(keys)) == len(keys)
    for org in tricky:
        members = list(TableMembers(state, org, 0).items())
        assert members == [("b", Member(org))]
        assert sum(1 for key, _ in state.scan(member_prefix(org), 0)) == 1
        stored = state.get(policy_key(org), 0)
        assert isinstance(stored, OrgPolicy) and stored.plan == org
    indexed = [orjson.loads(key)[1] for key, _ in index.scan(index_prefix(0), 0)]
    assert sorted(indexed) == sorted(tricky)
    assert list(index.scan(index_prefix(1), 0)) == []
    index_table.data.close()
