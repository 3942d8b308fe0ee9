"""Members stored under keys of their own (streams.members), on real RocksDB.

What these pin: an organisation's policy no longer grows with its membership (with hashed
user ids, 30,000 members did not fit in one Kafka message), the enforcer sees exactly the
members that are stored and buffered, and a worker that restores from a changelog cut off
anywhere in a flush (a crash mid-send) reads back a policy and members that agree: the
policy is the commit point and its journal restores the member writes the cut lost.
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
    SetEnabled,
)
from core.errors import RejectedEvent
from core.pricing import PriceTable, default_price_table_path
from core.usage import Plan, PricedEvent, SeatTier
from streams.members import (
    PolicyStore,
    StoredPolicy,
    decode_value,
    encode_value,
    index_key,
    member_key,
    member_prefix,
    policies_first,
    policy_key,
)
from streams.output import BatchedOutput
from streams.state import TableState
from tests.unit.test_metering import event
from tests.unit.test_output_state import FakeTable, RecordingProducer

KAFKA_MESSAGE_LIMIT = 1_048_588  # the broker's default message.max.bytes
NOW_MS = 1_795_000_000_000  # 2026-11
USD = 1_000_000_000
PRICES = PriceTable.load(default_price_table_path())
CHANGELOG = "app-policies-changelog"


class Worker:
    """The worker's policy path on real RocksDB: the tables, the store, the enforcer."""

    def __init__(self, root: Path) -> None:
        self.producer = RecordingProducer()
        self.output = BatchedOutput(lambda: self.producer, lambda _: None)
        self.table = FakeTable(root / "policies", CHANGELOG)
        self.index_table = FakeTable(root / "index", "app-org_index-changelog")
        self.policies = TableState(
            self.table, self.output, encode_value, decode_value, order=policies_first
        )
        self.index = TableState(self.index_table, self.output, orjson.dumps, orjson.loads)
        self.store = PolicyStore(self.policies, self.index)
        self.enforcer = Enforcer()
        self.spend: dict[str | None, int] = {}

    def spend_of(self, period: str | None, user: str | None) -> int:
        if user is None:
            return sum(self.spend.values())
        return self.spend.get(user, 0)

    def use(
        self,
        org: str,
        user: str,
        tier: str,
        offset: int,
        spend_usd: float = 0,
        plan: str = "ENTERPRISE",
    ) -> Any:
        self.spend[user] = self.spend.get(user, 0) + round(spend_usd * USD)
        policy = self.store.load(org, 0)
        event = priced(org, user, tier, f"{org}-{offset}", plan)
        step = self.enforcer.on_usage(policy, event, offset, self.spend_of, NOW_MS)
        self.store.store(org, 0, step)
        return step

    def control(self, org: str, command: Any, offset: int) -> Any:
        policy = self.store.load(org, 0)
        before = self.store.snapshot(policy)
        message = ControlMessage(f"m{offset}", org, NOW_MS, command)
        try:
            step = self.enforcer.on_control(policy, message, offset, self.spend_of, NOW_MS)
        except RejectedEvent:
            self.store.rejected(org, 0, before)
            raise
        self.store.store(org, 0, step)
        return step

    def commit(self) -> list[tuple[bytes | None, bytes]]:
        """Flush as before an offset commit; the changelog messages this flush wrote."""
        before = len(self.producer.messages(CHANGELOG, 0))
        self.policies.flush()
        self.index.flush()
        self.store.flushed()
        asyncio.run(self.output.drain())
        return self.producer.messages(CHANGELOG, 0)[before:]

    def commit_with_input_meanwhile(self, during: Any) -> None:
        """Flush as the worker does, in two phases (streams.state.flush_outputs_first), with
        ``during()`` (an input) processed while the flush waits for its outputs."""
        self.policies.snapshot()
        self.index.snapshot()
        during()
        self.policies.write_snapshot()
        self.index.write_snapshot()
        self.store.flushed()
        asyncio.run(self.output.drain())

    def members(self, org: str) -> dict[str, Member]:
        return dict(self.store.load(org, 0).members.items())

    def close(self) -> None:
        self.table.data.close()
        self.index_table.data.close()


@pytest.fixture
def worker(tmp_path: Path) -> Any:
    made = Worker(tmp_path / "live")
    yield made
    made.close()


def restored(root: Path, messages: list[tuple[bytes | None, bytes]]) -> Worker:
    """A new owner whose store was rebuilt from ``messages`` (the changelog)."""
    fresh = Worker(root)
    db = fresh.table.data._db_for_partition(0)
    for key, value in messages:
        assert key is not None
        db.put(key, value)
    return fresh


def priced(org: str, user: str, tier: str, event_id: str, plan: str) -> PricedEvent:
    usage = event(
        event_id,
        occurred_at_ms=NOW_MS,
        org_id=org,
        plan=Plan(plan),
        user_id=user,
        seat_tier=SeatTier(tier),
    )
    return PricedEvent(usage, PRICES.price(usage.model, usage.usage, usage.occurred_at_ms))


def test_a_policy_does_not_grow_with_its_members(worker: Worker) -> None:
    users = [orjson.dumps(i).hex() * 8 for i in range(30_000)]
    legacy = OrgPolicy(members={user: Member("STANDARD") for user in users})
    assert len(orjson.dumps(legacy.to_json())) > KAFKA_MESSAGE_LIMIT  # the old form

    messages = []
    for offset, user in enumerate(users):
        worker.use("org-big", user, "STANDARD", offset)
        if offset % 2_000 == 1_999:  # a commit every 2,000 events (~1 s at full speed)
            messages += worker.commit()
    messages += worker.commit()
    assert len({key for key, _ in messages}) == 30_001  # one key per member, one policy
    assert max(len(value) for _, value in messages) < 300_000  # journal: one commit's members
    stored = decode_value(worker.table.data._dbs[0].get(policy_key("org-big").encode()))
    assert isinstance(stored, StoredPolicy) and stored.policy.members == {}
    members = worker.members("org-big")
    assert len(members) == 30_000 and members[users[12_345]] == Member("STANDARD")


def test_a_journal_does_not_grow_when_its_org_is_busy_during_every_flush(
    worker: Worker,
) -> None:
    """An org with an input in every flush's wait keeps its policy buffered across the
    flush: its journal must still drop the members that flush stored, or the policy value
    grows with the membership again (review finding)."""
    offset = 0
    for _ in range(15):
        for _ in range(200):  # 200 new members per commit
            worker.use("org-busy", f"user-{offset}", "STANDARD", offset)
            offset += 1
        worker.commit_with_input_meanwhile(
            lambda o=offset: worker.use("org-busy", f"user-{o}", "STANDARD", o)
        )
        offset += 1
    worker.commit()
    raw = worker.table.data._dbs[0].get(policy_key("org-busy").encode())
    stored = decode_value(raw)
    assert isinstance(stored, StoredPolicy) and len(stored.journal) <= 1
    assert len(raw) < 10_000
    members = worker.members("org-busy")
    assert len(members) == offset and all(m == Member("STANDARD") for m in members.values())


def test_a_tier_cap_reaches_stored_and_buffered_members(worker: Worker) -> None:
    worker.use("org-1", "ann", "PREMIUM", 0, spend_usd=5)
    worker.use("org-1", "bob", "PREMIUM", 1, spend_usd=1)
    worker.commit()  # ann and bob in RocksDB; cy only buffered
    worker.use("org-1", "cy", "PREMIUM", 2, spend_usd=7)

    step = worker.control("org-1", SetCap("SEAT_TIER", 4 * USD, seat_tier="PREMIUM"), 0)
    assert sorted(e.user_id for e in step.events if e.action is Action.PAUSE) == ["ann", "cy"]
    assert {u: m.paused for u, m in worker.members("org-1").items()} == {
        "ann": True,
        "bob": False,
        "cy": True,
    }
    again = worker.control("org-1", SetCap("SEAT_TIER", 4 * USD, seat_tier="PREMIUM"), 0)
    assert again.redelivered and [e.event_id for e in again.events] == [
        e.event_id for e in step.events
    ]


def test_a_changelog_cut_anywhere_in_a_flush_reads_back_consistent(
    worker: Worker, tmp_path: Path
) -> None:
    """A new owner restores from the changelog; the old owner crashed while sending a
    flush, so the changelog holds any prefix of it. Whatever the prefix, the policy and
    the members agree with one of the two commits (before or after the flush), and
    re-delivering the uncommitted inputs then emits exactly what the original run did."""
    worker.use("org-1", "ann", "STANDARD", 0)
    worker.use("org-1", "bob", "STANDARD", 1)
    worker.control("org-1", SetCap("ORG", 100 * USD), 0)
    first = worker.commit()
    window: list[tuple[str, Any, int]] = [
        ("control", SetCap("USER", 2 * USD, user_id="ann"), 1),
        ("use", ("ann", "PREMIUM", 2.5), 2),  # PAUSE ann; tier change
        ("use", ("cy", "STANDARD", 0.1), 3),  # a new member, nothing emitted
        ("control", SetEnabled(False, "bob"), 2),  # PAUSE bob
    ]
    emitted: list[str] = []
    for kind, args, offset in window:
        if kind == "use":
            step = worker.use("org-1", *args[:2], offset, spend_usd=args[2])
        else:
            step = worker.control("org-1", args, offset)
        emitted += [e.event_id for e in step.events]
    after = worker.members("org-1")
    second = worker.commit()
    assert len(emitted) == 2 and len(second) == 4  # the policy and ann, bob, cy
    assert second[0][0] == policy_key("org-1").encode()  # the policy leads its members

    before = {"ann": Member("STANDARD"), "bob": Member("STANDARD")}
    for cut in range(len(second) + 1):
        new_owner = restored(tmp_path / f"cut-{cut}", first + second[:cut])
        try:
            members = new_owner.members("org-1")
            assert members == (after if cut >= 1 else before), (cut, members)
            # The inputs after the last commit are delivered again: the same events.
            again: list[str] = []
            for kind, args, offset in window:
                if kind == "use":  # (totals as of the same cut: spend grows again)
                    step = new_owner.use("org-1", *args[:2], offset, spend_usd=args[2])
                else:
                    step = new_owner.control("org-1", args, offset)
                again += [e.event_id for e in step.events]
            assert again == emitted, cut
            assert new_owner.members("org-1") == after
        finally:
            new_owner.close()


def test_a_refused_control_message_changes_nothing(worker: Worker) -> None:
    worker.use("org-t", "ann", "STANDARD", 0, plan="TEAM")
    worker.commit()
    db = worker.table.data._dbs[0]
    stored_before = db.get(policy_key("org-t").encode())
    cached_before = worker.store.snapshot(worker.store.load("org-t", 0))
    with pytest.raises(RejectedEvent, match="TEAM"):
        worker.control("org-t", SetCap("SEAT_TIER", 0, seat_tier="STANDARD"), 0)
    assert worker.store.snapshot(worker.store.load("org-t", 0)) == cached_before
    assert worker.commit() == []  # nothing to write
    assert db.get(policy_key("org-t").encode()) == stored_before
    assert worker.members("org-t") == {"ann": Member("STANDARD")}


def test_policies_stored_in_the_old_format_are_read_and_moved(worker: Worker) -> None:
    old = OrgPolicy(plan="ENTERPRISE", members={"ann": Member("PREMIUM", cap_nano=5)})
    db = worker.table.data._db_for_partition(0)
    db.put(b"org-old", orjson.dumps(old.to_json()))
    worker.index_table.data._db_for_partition(0).put(b"0", orjson.dumps(["org-old", "org-x"]))

    assert worker.members("org-old") == {"ann": Member("PREMIUM", cap_nano=5)}
    worker.commit()
    stored = decode_value(db.get(b"org-old"))
    assert isinstance(stored, StoredPolicy) and stored.policy.members == {}
    assert decode_value(db.get(member_key("org-old", "ann").encode())) == Member(
        "PREMIUM", cap_nano=5
    )
    assert sorted(worker.store.orgs(0)) == ["org-old", "org-x"]


def test_no_org_id_reaches_another_orgs_keys(worker: Worker) -> None:
    tricky = ["a", "a,", 'a"', "[a", '["a","b"]', "a\\", "ä", '["a"]']
    for offset, org in enumerate(tricky):
        worker.use(org, "b", "STANDARD", offset)
    worker.commit()
    keys = [policy_key(org) for org in tricky] + [member_key(org, "b") for org in tricky]
    assert len(set(keys)) == len(keys)
    for org in tricky:
        assert list(worker.members(org)) == ["b"]
        assert sum(1 for _ in worker.policies.scan(member_prefix(org), 0)) == 1
    assert sorted(worker.store.orgs(0)) == sorted(tricky)
    assert worker.store.orgs(1) == []
    assert index_key(1, "a") != index_key(10, "a")


def test_a_rebalance_forgets_journals_of_policies_no_longer_held(worker: Worker) -> None:
    """Buffered keys of a partition that moved away are dropped; their journal must go with
    them, or a later policy of the org (the partition back here, its members written by
    another worker meanwhile) would carry the old member values and they would win."""
    worker.use("org-1", "ann", "STANDARD", 0)
    worker.commit()
    worker.use("org-1", "ann", "PREMIUM", 1)  # a tier change: ann in the journal
    worker.policies.assigned(set())  # partition 0 moved away before the flush
    worker.store.forget()
    worker.policies.assigned({0})  # and came back, after another worker wrote ann
    worker.store.forget()
    # The other worker wrote ann in one commit, then cy with the policy in a later one.
    theirs, cy = Member("PREMIUM", cap_nano=7), Member("STANDARD")
    db = worker.table.data._db_for_partition(0)
    ours = decode_value(db.get(policy_key("org-1").encode()))
    assert isinstance(ours, StoredPolicy)
    db.put(member_key("org-1", "ann").encode(), encode_value(theirs))
    db.put(member_key("org-1", "cy").encode(), encode_value(cy))
    db.put(policy_key("org-1").encode(), encode_value(StoredPolicy(ours.policy, {"cy": cy})))
    worker.use("org-1", "bob", "STANDARD", 2)
    worker.commit()
    stored = decode_value(worker.table.data._dbs[0].get(policy_key("org-1").encode()))
    assert isinstance(stored, StoredPolicy) and sorted(stored.journal) == ["bob", "cy"]
    assert worker.members("org-1")["ann"] == theirs
