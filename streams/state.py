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

A flush has two phases so that state is never stored before the outputs of the events that
made it: :meth:`snapshot` takes the buffer (reads still see it), the worker then waits until
every output queued so far is acknowledged (priced events, PAUSE / RESUME, reload requests),
and only then :meth:`write_snapshot` stores it. A stored policy says which inputs it has
applied, and a re-delivered input it has applied re-sends only what its small outbox kept:
were the policy stored first, a crash before the acknowledgements could lose a PAUSE.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
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
        # The snapshot between the two phases of a flush (key -> partition, value, bytes),
        # in write order; reads see it under the write buffer.
        self._flushing: dict[str, tuple[int, V, bytes]] = {}
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
        if self._flushing:
            flushing = self._flushing.get(key)
            if flushing is not None:
                return flushing[1]
        raw = self.table.data._db_for_partition(partition).get(key.encode())
        return None if raw is None else self.decode(raw)

    def peek(self, key: str, partition: int) -> V | None:
        """Like :meth:`get`, for readers outside the agent (web pages): None when the
        partition's store is not open on this worker instead of opening it."""
        hit = self._dirty.get(key)
        if hit is None and self._flushing:
            hit = self._flushing.get(key)
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
        dirty: dict[str, V] = {}
        for layer in (self._flushing, self._dirty):  # the write buffer wins
            candidates = (
                layer.items()
                if buffered is None
                else ((key, layer[key]) for key in buffered if key in layer)
            )
            for key, hit in candidates:
                if hit[0] == partition and key.startswith(prefix):
                    dirty[key] = hit[1]
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
                if key in dirty:
                    yield key, dirty.pop(key)
                else:
                    yield key, self.decode(iterator.value())
                iterator.next()
        yield from dirty.items()

    def buffered(self, key: str) -> bool:
        """True while ``key`` has a value not yet flushed."""
        return key in self._dirty or key in self._flushing

    def put(self, key: str, partition: int, value: V) -> None:
        """Set ``key`` (stored on ``partition``); durable after the next :meth:`flush`."""
        self._dirty[key] = (partition, value)

    def view(self) -> PartitionView[V]:
        """A mapping-like view bound to one partition at a time (for the pure core)."""
        return PartitionView(self)

    def flush(self) -> int:
        """:meth:`snapshot` then :meth:`write_snapshot` at once; returns the keys written."""
        self.snapshot()
        return self.write_snapshot()

    def snapshot(self) -> int:
        """Phase one of a flush: take every changed key of an owned partition out of the
        write buffer and encode it (keys of partitions this worker does not own right now,
        between a revocation and the next assignment, stay buffered: writing them could
        overwrite the new owner's changelog). Reads see the snapshot until
        :meth:`write_snapshot` writes it or :meth:`abandon_snapshot` puts it back; writes go
        to a fresh buffer. Synchronous, so no event is processed half-way through. Returns
        the keys taken."""
        if self._flushing:
            raise RuntimeError("a snapshot is already being flushed (flushes must not overlap)")
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
        encode = self.encode
        self._flushing = {
            key: (partition, value, encode(value)) for key, (partition, value) in items
        }
        return len(self._flushing)

    def write_snapshot(self) -> int:
        """Phase two: write the snapshot to the RocksDB stores (one write batch per
        partition) and queue it on the changelog, in snapshot order. Keys of a partition
        revoked since :meth:`snapshot` go back to the write buffer (unless written again
        meanwhile): the worker's flush lock keeps a revocation from falling between the two
        phases today, and this keeps a partition it does not own unwritten should that
        change. Returns the keys written."""
        flushing, self._flushing = self._flushing, {}
        owned = self.owned
        by_partition: dict[int, list[tuple[bytes, bytes]]] = defaultdict(list)
        for key, (partition, value, raw) in flushing.items():
            if owned is not None and partition not in owned:
                self._dirty.setdefault(key, (partition, value))
                continue
            by_partition[partition].append((key.encode(), raw))
        store = self.table.data
        topic = self.changelog
        written = 0
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
            written += len(items)
        self.keys_flushed += written
        return written

    def abandon_snapshot(self) -> None:
        """Put an unwritten snapshot back into the write buffer (a flush cancelled between
        its phases); values written since win."""
        flushing, self._flushing = self._flushing, {}
        for key, (partition, value, _) in flushing.items():
            self._dirty.setdefault(key, (partition, value))

    def assigned(self, partitions: set[int]) -> None:
        """A new assignment: own ``partitions``; forget buffered keys of any other partition
        (their events were not committed here and will be processed by the new owner)."""
        self.owned = set(partitions)
        self._dirty = {k: v for k, v in self._dirty.items() if v[0] in partitions}
        self._flushing = {k: v for k, v in self._flushing.items() if v[0] in partitions}

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


async def flush_outputs_first(
    states: Sequence[TableState[Any]],
    output: BatchedOutput,
    settle: Callable[[], Awaitable[None]],
    written: Callable[[], None] = lambda: None,
) -> None:
    """One flush of ``states``, outputs first: snapshot every state, send every queued
    output and wait (``settle``) until all of them are acknowledged, then store the
    snapshots and queue their changelog writes (sent before returning; the caller's commit
    waits for them). ``written`` runs right after the snapshots are stored. Cancelled
    before they are, the snapshots go back to the write buffers. Flushes must not overlap:
    the caller serialises them."""
    for state in states:
        state.snapshot()
    try:
        await output.drain()
        await settle()
    except BaseException:
        for state in states:
            state.abandon_snapshot()
        raise
    for state in states:
        state.write_snapshot()
    written()
    await output.drain()


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
