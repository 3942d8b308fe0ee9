"""Write-behind state over Faust tables: one changelog write per key per commit, not per event.

A Faust table sends a changelog message for every assignment; an event touches five to
seven keys (dedupe record, org / tier / user totals, policy), and an org's totals key is
rewritten by every event of the org. :class:`TableState` keeps the values written since the
last commit in memory (the *overlay*), serves reads from it, and at :meth:`flush` — which
the worker calls before every offset commit (``DeliveryGuard.before_flush``) — writes each
changed key once: to the partition's RocksDB store (one write batch) and to the table's
changelog through :class:`streams.output.BatchedOutput`.

The Faust table is still what creates the changelog topic, recovers the store from it at
start-up and on rebalance, and owns the RocksDB files; this class only replaces the
per-assignment write path. Bytes are the table's wire format: keys are the UTF-8 text of
the key, values are ``encode(value)``, so a store recovered by Faust from the changelog
reads back exactly what :meth:`flush` wrote.

At-least-once contract: the overlay is flushed before the commit that covers the events
which wrote it (Faust computes the offsets to commit, then flushes the producer, then
commits). A crash loses the overlay and the uncommitted offsets together, so the events are
processed again from the last commit; values written to RocksDB but not to the changelog are
repaired by the offsets the values carry (:mod:`core.metering`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

import rocksdict
from faust.types import TP

from streams.output import BatchedOutput

V = TypeVar("V")


class TableState(Generic[V]):
    """Reads and buffered writes of one Faust table (RocksDB store, one db per partition)."""

    def __init__(
        self,
        table: Any,
        output: BatchedOutput,
        encode: Callable[[V], bytes],
        decode: Callable[[bytes], V],
        order: Callable[[V], int] | None = None,
    ) -> None:
        """``order`` (optional) sorts each flush: keys whose values rank lower are written
        first, to RocksDB and to the changelog (where a partition keeps that order)."""
        self.table = table
        self.output = output
        self.encode = encode
        self.decode = decode
        self.order = order
        self._dirty: dict[str, tuple[int, V]] = {}
        self._registered: set[int] = set()
        self.keys_flushed = 0
        # Partitions this worker actively owns (None: all, for tests without a consumer).
        self.owned: set[int] | None = None

    @property
    def changelog(self) -> str:
        return str(self.table.changelog_topic.get_topic_name())

    @property
    def dirty(self) -> int:
        """Keys written since the last flush."""
        return len(self._dirty)

    def get(self, key: str, partition: int) -> V | None:
        """The current value of ``key`` (which lives on ``partition``), or None."""
        hit = self._dirty.get(key)
        if hit is not None:
            return hit[1]
        raw = self.table.data._db_for_partition(partition).get(key.encode())
        return None if raw is None else self.decode(raw)

    def peek(self, key: str, partition: int) -> V | None:
        """Like :meth:`get`, for readers outside the agent (web pages): None when the
        partition's store is not open on this worker instead of opening it."""
        hit = self._dirty.get(key)
        if hit is not None:
            return hit[1]
        db = self.table.data._dbs.get(partition)
        raw = None if db is None else db.get(key.encode())
        return None if raw is None else self.decode(raw)

    def scan(
        self,
        prefix: str,
        partition: int,
        *,
        peek: bool = False,
        buffered: Iterable[str] | None = None,
    ) -> Iterator[tuple[str, V]]:
        """Every ``(key, value)`` whose key starts with ``prefix`` on ``partition``: the
        store's keys in key order, with buffered values in their place, then the buffered
        keys the store does not hold yet. Reads every matching key: for rare inputs (a new
        month, a SEAT_TIER cap) and reports, not per event. ``peek`` as in :meth:`peek`.
        ``buffered``, when the caller knows them, are the only buffered keys that can match
        (otherwise the whole write buffer is searched)."""
        candidates = (
            self._dirty.items()
            if buffered is None
            else ((key, self._dirty[key]) for key in buffered if key in self._dirty)
        )
        dirty = {
            key: value
            for key, (part, value) in candidates
            if part == partition and key.startswith(prefix)
        }
        db = (
            self.table.data._dbs.get(partition)
            if peek
            else self.table.data._db_for_partition(partition)
        )
        if db is not None:
            raw_prefix = prefix.encode()
            iterator = db.iter()
            iterator.seek(raw_prefix)
            while iterator.valid():
                raw_key = iterator.key()
                if not raw_key.startswith(raw_prefix):
                    break
                key = raw_key.decode()
                hit = self._dirty.get(key)
                dirty.pop(key, None)
                if hit is not None and hit[0] == partition:
                    yield key, hit[1]
                else:
                    yield key, self.decode(iterator.value())
                iterator.next()
        yield from dirty.items()

    def buffered(self, key: str) -> bool:
        """True while ``key`` has a value not yet flushed."""
        return key in self._dirty

    def put(self, key: str, partition: int, value: V) -> None:
        """Set ``key`` (stored on ``partition``); durable after the next :meth:`flush`."""
        self._dirty[key] = (partition, value)

    def view(self) -> PartitionView[V]:
        """A mapping-like view bound to one partition at a time (for the pure core)."""
        return PartitionView(self)

    def flush(self) -> int:
        """Write every changed key of an owned partition to its RocksDB store and queue it
        on the changelog; keys of partitions this worker does not own right now (between a
        revocation and the next assignment) stay in the overlay: writing them could overwrite
        the new owner's changelog. Synchronous, so no event is processed half-way through.
        Returns the keys written."""
        if not self._dirty:
            return 0
        owned = self.owned
        if owned is None:
            dirty, self._dirty = self._dirty, {}
        else:
            dirty = {k: v for k, v in self._dirty.items() if v[0] in owned}
            self._dirty = {k: v for k, v in self._dirty.items() if v[0] not in owned}
        items = list(dirty.items())
        if self.order is not None:
            order = self.order
            items.sort(key=lambda item: order(item[1][1]))
        by_partition: dict[int, list[tuple[bytes, bytes]]] = defaultdict(list)
        for key, (partition, value) in items:
            by_partition[partition].append((key.encode(), self.encode(value)))
        store = self.table.data
        topic = self.changelog
        for partition, items in by_partition.items():
            batch = rocksdict.WriteBatch(raw_mode=True)
            for key_bytes, value_bytes in items:
                batch.put(key_bytes, value_bytes)
            store._db_for_partition(partition).write(batch)
            if partition not in self._registered:
                self.output.on_sent(topic, partition, self._persisted)
                self._registered.add(partition)
            for key_bytes, value_bytes in items:
                self.output.add(topic, partition, key_bytes, value_bytes)
        self.keys_flushed += len(dirty)
        return len(dirty)

    def assigned(self, partitions: set[int]) -> None:
        """A new assignment: own ``partitions``; forget buffered keys of any other partition
        (their events were not committed here and will be processed by the new owner)."""
        self.owned = set(partitions)
        self._dirty = {k: v for k, v in self._dirty.items() if v[0] in partitions}

    def revoked(self) -> None:
        """A revocation finished (its flush included): own nothing until the next assignment."""
        self.owned = set()

    def _persisted(self, topic: str, partition: int, last_offset: int) -> None:
        """The changelog holds everything up to ``last_offset``: remember it in the store,
        so recovery reads only what came later (Faust's ``_on_changelog_sent``). Only while
        this worker owns the partition: otherwise another worker writes the changelog too and
        the local store does not hold everything up to that offset."""
        store = self.table.data
        owned = self.owned
        if partition in store._dbs and (owned is None or partition in owned):
            store.set_persisted_offset(TP(topic, partition), last_offset)


class PartitionView(Generic[V]):
    """``get`` / ``[key] = value`` on the partition currently set in :attr:`partition`."""

    __slots__ = ("_state", "partition")

    def __init__(self, state: TableState[V]) -> None:
        self._state = state
        self.partition = 0

    def get(self, key: str, default: V | None = None) -> V | None:
        value = self._state.get(key, self.partition)
        return default if value is None else value

    def __setitem__(self, key: str, value: V) -> None:
        self._state.put(key, self.partition, value)
