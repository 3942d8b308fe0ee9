"""Where the worker keeps an organisation's enforcement state: one key for the policy, one
key per member, and one org-index key per org, so no value grows with an org's membership.

An org's policy used to carry its members inside: with 25,000 members the value outgrew a
Kafka message (1 MB) and the worker could not write its changelog at all (it exited and
restarted on the same record for ever), and every new member's first event rewrote the
whole value. Now the ``policies`` table holds:

* the policy (``core.enforcement.OrgPolicy`` without members) under :func:`policy_key`;
* each member (``core.enforcement.Member``) under :func:`member_key`.

Both live in one table and so on one partition's store: the write-behind flush writes a
partition's keys in one RocksDB write batch, so an org's policy and its members are stored
together or not at all (``streams.state``). The ``org_index`` table holds one key per org
and partition (:func:`index_key`) for the wall-clock period tick.

Keys are JSON arrays (as every totals key, ``core.totals``), except the policy key, which
stays the org id itself for ids that do not start with ``[`` (the format stored before
members moved out); an id that does start with ``[`` is stored as a one-element array, so no
org id can collide with another org's member key.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson

from core.enforcement import Member, OrgPolicy
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


def encode_value(value: OrgPolicy | Member) -> bytes:
    """A ``policies`` table value: a policy (a JSON object) or a member (a JSON array)."""
    if isinstance(value, Member):
        return orjson.dumps(value.to_list())
    return orjson.dumps(value.to_json(include_members=False))


def decode_value(raw: bytes) -> OrgPolicy | Member:
    data = orjson.loads(raw)
    if isinstance(data, list):
        return Member.from_list(data)
    return OrgPolicy.from_json(data)


class TableMembers:
    """The members of one org for one input (:class:`core.enforcement.MemberMap`).

    Reads go to the table state (buffered writes first, then the store); each member is
    read once and then kept, so the core's changes to a member object stick for the rest of
    the input. Nothing is written here: the adapter stores the members a step names as
    touched (:meth:`store`). Objects are copies, so a refused input changes nothing.
    """

    __slots__ = ("_loaded", "_org_id", "_partition", "_peek", "_state")

    def __init__(
        self, state: TableState[Any], org_id: str, partition: int, *, peek: bool = False
    ) -> None:
        self._state = state
        self._org_id = org_id
        self._partition = partition
        self._peek = peek
        self._loaded: dict[str, Member] = {}

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
        for key, stored in self._state.scan(prefix, self._partition, peek=self._peek):
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
