"""Where the worker keeps an organisation's enforcement state: one key for the policy, one
key per member, and one org-index key per org, so no value grows with an org's membership.

An org's policy used to carry its members inside: with 25,000 members the value outgrew a
Kafka message (1 MB) and the worker could not write its changelog at all (it exited and
restarted on the same record for ever), and every new member's first event rewrote the
whole value. Now the ``policies`` table holds:

* the policy (``core.enforcement.OrgPolicy`` without members) under :func:`policy_key`;
* each member (``core.enforcement.Member``) under :func:`member_key`.

Crash safety. The policy is the commit point, its *journal* the bridge:

* every input that touches a member changes the policy too (its offsets), and whenever
  members are written, their org's policy is written with them, carrying in its journal the
  value of every member written since the last commit (:class:`StoredPolicy`);
* the flush writes policies before members (one RocksDB write batch per partition, and in
  that order on the changelog partition), so a crash half-way through a flush, seen by a
  worker that restores from the changelog, can leave members older than their policy but
  never newer;
* a policy read from the store puts its journal's members back (they win over the member
  keys), which repairs exactly the member writes a crash lost, locally or on the changelog.

The ``org_index`` table holds one key per org and partition (:func:`index_key`) for the
wall-clock period tick.

Keys are JSON arrays (as every totals key, ``core.totals``), except the policy key, which
stays the org id itself for ids that do not start with ``[`` (the format stored before
members moved out); an id that does start with ``[`` is stored as a one-element array, so no
org id can collide with another org's member key. (A policy stored under such an id before
this format is not read back.)
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from core.enforcement import Member, OrgPolicy, Step
from streams.state import TableState


def policy_key(org_id: str) -> str:
    """Key of an org's policy in the ``policies`` table."""
    return orjson.dumps([org_id]).decode() if org_id.startswith("[") else org_id


def member_key(org_id: str, user_id: str) -> str:
    """Key of one member of an org in the ``policies`` table."""
    return orjson.dumps([org_id, user_id]).decode()


def member_prefix(org_id: str) -> str:
    """The prefix every member key of ``org_id`` starts with (and no other key)."""
    return orjson.dumps([org_id]).decode()[:-1] + ","


def index_key(partition: int, org_id: str) -> str:
    """Key of one org in the ``org_index`` table."""
    return orjson.dumps([partition, org_id]).decode()


def index_prefix(partition: int) -> str:
    return f"[{partition},"


@dataclass(slots=True)
class StoredPolicy:
    """A policy as the ``policies`` table holds it: with the members written since the last
    commit (``journal``, by user id), which win over their own keys when read back."""

    policy: OrgPolicy
    journal: dict[str, Member] = field(default_factory=dict)


def encode_value(value: StoredPolicy | Member) -> bytes:
    """A ``policies`` table value: a policy (a JSON object) or a member (a JSON array)."""
    if isinstance(value, Member):
        return orjson.dumps(value.to_list())
    data = value.policy.to_json(include_members=False)
    if value.journal:
        data["journal"] = {user: member.to_list() for user, member in value.journal.items()}
    return orjson.dumps(data)


def decode_value(raw: bytes) -> StoredPolicy | Member:
    data = orjson.loads(raw)
    if isinstance(data, list):
        return Member.from_list(data)
    journal = {user: Member.from_list(v) for user, v in (data.get("journal") or {}).items()}
    return StoredPolicy(OrgPolicy.from_json(data), journal)


def policies_first(value: StoredPolicy | Member) -> int:
    """Flush order of the ``policies`` table: every policy before any member."""
    return 1 if isinstance(value, Member) else 0


class TableMembers:
    """The members of one org for one input (:class:`core.enforcement.MemberMap`).

    Reads go to the table state (buffered writes first, then the store); each member is
    read once and then kept, so the core's changes to a member object stick for the rest of
    the input. Nothing is written here: the adapter stores the members a step names as
    touched (:meth:`store`). Objects are copies, so a refused input changes nothing.
    ``buffered`` names this org's members written since the last flush (the journal), so
    :meth:`items` need not search the whole write buffer.
    """

    __slots__ = ("_buffered", "_loaded", "_org_id", "_partition", "_peek", "_state")

    def __init__(
        self,
        state: TableState[Any],
        org_id: str,
        partition: int,
        *,
        peek: bool = False,
        buffered: Iterable[str] | None = None,
        known: dict[str, Member] | None = None,
    ) -> None:
        """``known`` members win over what the state holds (a stored policy's journal)."""
        self._state = state
        self._org_id = org_id
        self._partition = partition
        self._peek = peek
        self._buffered = buffered
        self._loaded: dict[str, Member] = {u: m.copy() for u, m in (known or {}).items()}

    def get(self, user_id: str, /) -> Member | None:
        member = self._loaded.get(user_id)
        if member is not None:
            return member
        key = member_key(self._org_id, user_id)
        read = self._state.peek if self._peek else self._state.get
        stored = read(key, self._partition)
        if not isinstance(stored, Member):
            return None
        member = self._loaded[user_id] = stored.copy()
        return member

    def __setitem__(self, user_id: str, member: Member, /) -> None:
        self._loaded[user_id] = member

    def items(self) -> Iterator[tuple[str, Member]]:
        """Every member of the org (stored, then created during this input)."""
        prefix = member_prefix(self._org_id)
        seen: set[str] = set()
        buffered = (
            None
            if self._buffered is None
            else [member_key(self._org_id, user) for user in self._buffered]
        )
        scan = self._state.scan(prefix, self._partition, peek=self._peek, buffered=buffered)
        for key, stored in scan:
            if not isinstance(stored, Member):
                continue
            user_id = orjson.loads(key)[1]
            seen.add(user_id)
            member = self._loaded.get(user_id)
            if member is None:
                member = self._loaded[user_id] = stored.copy()
            yield user_id, member
        for user_id, member in list(self._loaded.items()):
            if user_id not in seen:
                yield user_id, member

    def store(self, touched: dict[str, Member]) -> None:
        """Buffer the members a step touched (durable with the next flush)."""
        for user_id, member in touched.items():
            self._state.put(member_key(self._org_id, user_id), self._partition, member)


class PolicyStore:
    """The worker's enforcement state over its ``policies`` and ``org_index`` tables: the
    policy of an org bound to its members for one input (:meth:`load`), what a step changed
    (:meth:`store`), and the journal bookkeeping (:meth:`flushed`, after every flush).

    Decoded policies are cached (the agent is the only writer of the table, so the cache is
    exact while the partitions stay here; :meth:`forget` empties it on any rebalance).
    """

    def __init__(
        self, policies: TableState[Any], org_index: TableState[Any], cache_size: int = 10_000
    ) -> None:
        self.policies = policies
        self.org_index = org_index
        self.cache_size = cache_size
        self._cache: dict[str, OrgPolicy] = {}
        # Per org, the members written since the last flush: the journal its policy carries.
        self._journals: dict[str, dict[str, Member]] = {}

    def load(self, org_id: str, partition: int) -> OrgPolicy:
        """The org's policy (a new one for an org never seen), its members bound to the
        table for this one input. A policy read from the store puts its journal's members
        back first (see the module docstring)."""
        policy = self._cache.get(org_id)
        if policy is None:
            stored = self._stored(org_id, partition, self.policies.get)
            if stored is None:
                policy = OrgPolicy()
                self.org_index.put(index_key(partition, org_id), partition, 1)
            else:
                policy = stored.policy
                restore = dict(stored.journal)
                if isinstance(policy.members, dict) and policy.members:
                    # Stored before members had keys of their own: move them out, once.
                    restore = {**policy.members, **restore}
                    policy.members = {}
                if restore:
                    self._store_members(org_id, partition, policy, restore)
            if len(self._cache) >= self.cache_size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[org_id] = policy
        journal = self._journals.get(org_id)
        policy.members = TableMembers(self.policies, org_id, partition, buffered=journal or ())
        return policy

    def store(self, org_id: str, partition: int, step: Step) -> None:
        """Buffer what ``step`` changed: its touched members with the policy, or the policy
        alone (durable with the next flush)."""
        if step.touched:
            self._store_members(org_id, partition, step.policy, step.touched)
        elif step.changed:
            journal = self._journals.get(org_id) or {}
            self.policies.put(policy_key(org_id), partition, StoredPolicy(step.policy, journal))

    def snapshot(self, policy: OrgPolicy) -> bytes:
        """The policy as stored (members apart), for :meth:`rejected`."""
        return encode_value(StoredPolicy(policy))

    def rejected(self, org_id: str, partition: int, snapshot: bytes) -> None:
        """The core refused an input after changing the policy: put back the ``snapshot``
        taken before it (members are copies until stored, so they need nothing)."""
        restored = decode_value(snapshot)
        assert isinstance(restored, StoredPolicy)
        self._cache[org_id] = restored.policy
        key = policy_key(org_id)
        if self.policies.buffered(key):  # the buffered value is the object the core changed
            restored.journal = self._journals.get(org_id) or {}
            self.policies.put(key, partition, restored)

    def flushed(self) -> None:
        """After a flush: journals of policies written are done with (a policy held back,
        for a partition not owned right now, keeps its journal). A policy buffered again
        while the flush waited for its outputs (streams.state) keeps in its journal only
        the members buffered since: the others were just stored, and their changelog
        writes precede the policy's next one on the same partition."""
        for org_id, journal in list(self._journals.items()):
            if not self.policies.buffered(policy_key(org_id)):
                del self._journals[org_id]
                continue
            for user_id in [
                u for u in journal if not self.policies.buffered(member_key(org_id, u))
            ]:
                del journal[user_id]

    def forget(self) -> None:
        """A rebalance: decoded policies may be stale once partitions move, and so may the
        journal of a policy the state no longer holds (another worker may have written its
        members since)."""
        self._cache.clear()
        self.flushed()

    def view(self, org_id: str, partition: int) -> OrgPolicy | None:
        """The org's policy with its members, for readers outside the agent (web pages):
        a copy, reading without opening a store this worker does not hold."""
        stored = self._stored(org_id, partition, self.policies.peek)
        if stored is None:
            return None
        policy = copy.copy(stored.policy)  # the agent binds the cached object per input
        if not (isinstance(policy.members, dict) and policy.members):  # (stored with them)
            policy.members = TableMembers(
                self.policies, org_id, partition, peek=True, known=stored.journal
            )
        return policy

    def orgs(self, partition: int) -> list[str]:
        """The orgs with a policy on ``partition`` (a list under the partition's number is
        the index format stored before one key per org)."""
        keys = self.org_index.scan(index_prefix(partition), partition)
        orgs = [orjson.loads(key)[1] for key, _ in keys]
        legacy = self.org_index.get(str(partition), partition)
        if isinstance(legacy, list):
            known = set(orgs)
            orgs.extend(org for org in legacy if org not in known)
        return orgs

    def _stored(
        self, org_id: str, partition: int, read: Callable[[str, int], Any]
    ) -> StoredPolicy | None:
        stored = read(policy_key(org_id), partition)
        return stored if isinstance(stored, StoredPolicy) else None

    def _store_members(
        self, org_id: str, partition: int, policy: OrgPolicy, members: dict[str, Member]
    ) -> None:
        journal = self._journals.setdefault(org_id, {})
        journal.update(members)
        TableMembers(self.policies, org_id, partition).store(members)
        self.policies.put(policy_key(org_id), partition, StoredPolicy(policy, journal))
