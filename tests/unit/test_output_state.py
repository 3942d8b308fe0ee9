"""The worker's batched output and write-behind table state, without a broker.

The producer is a recording stand-in built on aiokafka's own ``BatchBuilder`` (the bytes a
real producer would send), the store is real RocksDB (rocksdict, raw mode, as Faust opens it).
What these tests pin: every message reaches the producer exactly once and in order per
partition, nothing stays queued after a drain, each changed key is written once per flush
to both the store and the changelog, and the changelog offset is remembered only once the
batch is acknowledged.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import rocksdict
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.default_records import DefaultRecordBatch

from streams.output import BatchedOutput
from streams.state import TableState, flush_outputs_first

OFFSET_KEY = b"__faust\x00offset__"


class RecordingProducer:
    """``create_batch`` / ``send_batch`` of AIOKafkaProducer; the test settles the futures."""

    def __init__(self, batch_size: int = 16_384) -> None:
        self.batch_size = batch_size
        self.sent: list[tuple[str, int, list[tuple[bytes | None, bytes]], asyncio.Future[Any]]] = []
        self.next_offset: dict[tuple[str, int], int] = {}

    def create_batch(self) -> BatchBuilder:
        return BatchBuilder(self.batch_size, 0, is_transactional=False)

    async def send_batch(self, batch: BatchBuilder, topic: str, *, partition: int) -> Any:
        records = [(r.key, r.value) for r in DefaultRecordBatch(bytes(batch._build()))]
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.sent.append((topic, partition, records, future))
        return future

    def acknowledge_all(self) -> None:
        """Settle every future with the base offset a broker would give the batch."""
        for topic, partition, records, future in self.sent:
            if future.done():
                continue
            base = self.next_offset.get((topic, partition), 0)
            self.next_offset[(topic, partition)] = base + len(records)
            future.set_result(_Metadata(base))

    def messages(self, topic: str, partition: int) -> list[tuple[bytes | None, bytes]]:
        return [
            record
            for t, p, records, _ in self.sent
            if (t, p) == (topic, partition)
            for record in records
        ]


class _Metadata:
    def __init__(self, offset: int) -> None:
        self.offset = offset


class FakeStore:
    """The part of Faust's RocksDB ``Store`` that TableState uses, on real RocksDB."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._dbs: dict[int, rocksdict.Rdict] = {}

    def _db_for_partition(self, partition: int) -> rocksdict.Rdict:
        if partition not in self._dbs:
            options = rocksdict.Options(raw_mode=True)
            self._dbs[partition] = rocksdict.Rdict(str(self.root / f"p{partition}"), options)
        return self._dbs[partition]

    def set_persisted_offset(self, tp: Any, offset: int) -> None:
        self._db_for_partition(tp.partition).put(OFFSET_KEY, str(offset).encode())

    def close(self) -> None:
        for db in self._dbs.values():
            db.close()


class FakeTable:
    def __init__(self, root: Path, changelog: str) -> None:
        self.data = FakeStore(root)
        self.changelog_topic = type("T", (), {"get_topic_name": lambda _self: changelog})()


@pytest.fixture
def table(tmp_path: Path) -> Any:
    fake = FakeTable(tmp_path, "app-totals-changelog")
    yield fake
    fake.data.close()


def json_state(table: Any) -> tuple[RecordingProducer, BatchedOutput, TableState[list[int]]]:
    """A recording producer, the output it feeds and a JSON-valued state over ``table``."""
    producer = RecordingProducer()
    output = BatchedOutput(lambda: producer, lambda _: None)
    return producer, output, TableState(table, output, orjson.dumps, orjson.loads)


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def test_every_message_is_sent_once_in_order_per_partition() -> None:
    async def scenario() -> RecordingProducer:
        producer = RecordingProducer(batch_size=256)  # small: forces many full builders
        tracked: list[asyncio.Future[Any]] = []
        output = BatchedOutput(lambda: producer, tracked.append)
        for i in range(500):
            output.add("priced", i % 3, f"org-{i % 3}".encode(), f"value-{i}".encode())
            if output.needs_drain:
                await output.drain()
        await output.drain()
        assert output.queued == 0 and not output.needs_drain
        assert len(tracked) == len(producer.sent) == output.batches_sent
        assert output.messages_sent == 500
        return producer

    producer = run(scenario())
    for partition in range(3):
        values = [value for _, value in producer.messages("priced", partition)]
        assert values == [f"value-{i}".encode() for i in range(partition, 500, 3)]


def test_a_message_bigger_than_a_batch_travels_alone_not_dropped() -> None:
    async def scenario() -> RecordingProducer:
        producer = RecordingProducer(batch_size=64)
        output = BatchedOutput(lambda: producer, lambda _: None)
        output.add("t", 0, None, b"x" * 10)
        output.add("t", 0, None, b"y" * 10_000)
        output.add("t", 0, None, b"z" * 10)
        await output.drain()
        return producer

    producer = run(scenario())
    assert [len(records) for _, _, records, _ in producer.sent] == [1, 1, 1]
    assert [value[:1] for _, value in producer.messages("t", 0)] == [b"x", b"y", b"z"]


class SlowProducer(RecordingProducer):
    """A producer that makes the caller wait before taking each batch (aiokafka's
    ``send_batch`` waits so while the partition's previous batch is still queued)."""

    async def send_batch(self, batch: BatchBuilder, topic: str, *, partition: int) -> Any:
        await asyncio.sleep(0.05)
        return await super().send_batch(batch, topic, partition=partition)


def test_a_drain_cancelled_midway_keeps_what_it_had_not_handed_over() -> None:
    """The worker stopping while a drain waits on the producer (SIGTERM cancels the task
    that drains) must not lose the batches not yet handed over: the events behind them may
    already be acknowledged, and the commit's own drain has to send them, in order."""

    async def scenario() -> SlowProducer:
        producer = SlowProducer(batch_size=128)
        output = BatchedOutput(lambda: producer, lambda _: None)
        for i in range(40):
            output.add("priced", i % 2, b"org", f"value-{i}".encode())
        draining = asyncio.ensure_future(output.drain())
        await asyncio.sleep(0.07)  # the first batch is handed over, the second is waiting
        draining.cancel()
        with pytest.raises(asyncio.CancelledError):
            await draining
        assert producer.sent and output.queued > 0
        output.add("priced", 0, b"org", b"after")
        await output.drain()  # the commit's drain
        assert output.queued == 0
        return producer

    producer = run(scenario())
    assert [v for _, v in producer.messages("priced", 0)] == [
        *(f"value-{i}".encode() for i in range(0, 40, 2)),
        b"after",
    ]
    assert [v for _, v in producer.messages("priced", 1)] == [
        f"value-{i}".encode() for i in range(1, 40, 2)
    ]


def test_background_drainer_sends_soon_after_an_add() -> None:
    async def scenario() -> None:
        producer = RecordingProducer()
        output = BatchedOutput(lambda: producer, lambda _: None)
        output.start(delay=0.001)
        output.add("pauses", 0, b"org", b"PAUSE")
        for _ in range(100):
            if producer.sent:
                break
            await asyncio.sleep(0.005)
        assert producer.messages("pauses", 0) == [(b"org", b"PAUSE")]
        await output.stop()

    run(scenario())


def test_state_reads_its_own_writes_and_flushes_each_key_once(table: Any) -> None:
    async def scenario() -> None:
        producer, output, state = json_state(table)
        for i in range(100):
            current = state.get("org-a|2026-11", 1) or [0]
            state.put("org-a|2026-11", 1, [current[0] + i])
        state.put("org-b|2026-11", 2, [7])
        assert state.get("org-a|2026-11", 1) == [sum(range(100))]
        assert table.data._dbs.get(1) is None or table.data._dbs[1].get(b"org-a|2026-11") is None

        assert state.flush() == 2 and state.dirty == 0
        await output.drain()
        changelog = "app-totals-changelog"
        assert producer.messages(changelog, 1) == [(b"org-a|2026-11", b"[4950]")]
        assert producer.messages(changelog, 2) == [(b"org-b|2026-11", b"[7]")]
        # the store holds exactly the changelog's bytes (what Faust's recovery would write)
        assert table.data._dbs[1].get(b"org-a|2026-11") == b"[4950]"
        assert state.get("org-a|2026-11", 1) == [4950]  # read back from RocksDB
        assert state.flush() == 0  # nothing changed since

    run(scenario())


def test_changelog_offset_is_remembered_only_when_acknowledged(table: Any) -> None:
    async def scenario() -> None:
        producer, output, state = json_state(table)
        for key in ("a", "b", "c"):
            state.put(key, 0, [1])
        state.flush()
        await output.drain()
        assert table.data._dbs[0].get(OFFSET_KEY) is None  # sent, not acknowledged
        producer.acknowledge_all()
        await asyncio.sleep(0)  # done-callbacks run on the loop
        assert table.data._dbs[0].get(OFFSET_KEY) == b"2"  # offsets 0, 1, 2: the last is 2
        state.put("a", 0, [2])
        state.flush()
        await output.drain()
        producer.acknowledge_all()
        await asyncio.sleep(0)
        assert table.data._dbs[0].get(OFFSET_KEY) == b"3"

    run(scenario())


def test_peek_does_not_open_a_partition_this_worker_does_not_hold(table: Any) -> None:
    output = BatchedOutput(lambda: RecordingProducer(), lambda _: None)
    state: TableState[list[int]] = TableState(table, output, orjson.dumps, orjson.loads)
    assert state.peek("org", 3) is None
    assert 3 not in table.data._dbs


def test_keys_of_partitions_not_owned_are_held_back_then_forgotten(table: Any) -> None:
    async def scenario() -> RecordingProducer:
        producer, output, state = json_state(table)
        state.assigned({0, 1})
        state.put("kept", 0, [1])
        assert state.flush() == 1  # the revocation's own flush, while still the owner
        state.revoked()  # between a revocation and the next assignment: own nothing
        state.put("late", 1, [2])  # events processed after the revocation
        state.put("again", 0, [3])
        assert state.flush() == 0  # nothing is written while nothing is owned
        state.assigned({0})  # partition 1 went to another worker
        assert state.dirty == 1 and state.get("late", 1) is None
        assert state.flush() == 1
        await output.drain()
        return producer

    producer = run(scenario())
    keys = [key for _, _, records, _ in producer.sent for key, _ in records]
    assert keys == [b"kept", b"again"]  # never "late": partition 1 is someone else's now


def test_changelog_offset_is_not_remembered_for_a_partition_not_owned(table: Any) -> None:
    async def scenario() -> None:
        producer, output, state = json_state(table)
        state.assigned({0})
        state.put("a", 0, [1])
        state.flush()
        await output.drain()
        state.revoked()  # acknowledged only after the partition left
        producer.acknowledge_all()
        await asyncio.sleep(0)
        assert table.data._dbs[0].get(OFFSET_KEY) is None

    run(scenario())


def test_a_snapshot_is_read_but_not_stored_until_written(table: Any) -> None:
    async def scenario() -> RecordingProducer:
        producer, output, state = json_state(table)
        state.put("org-a", 0, [1])
        state.put("org-b", 0, [2])
        assert state.snapshot() == 2 and state.dirty == 0
        assert state.get("org-a", 0) == [1] and state.buffered("org-a")
        assert dict(state.scan("org-", 0)) == {"org-a": [1], "org-b": [2]}
        state.put("org-a", 0, [10])  # an event processed while the flush waits
        assert state.get("org-a", 0) == [10]
        assert dict(state.scan("org-", 0)) == {"org-a": [10], "org-b": [2]}
        assert table.data._db_for_partition(0).get(b"org-a") is None  # nothing stored yet
        assert state.write_snapshot() == 2
        assert table.data._dbs[0].get(b"org-a") == b"[1]"  # the snapshot's value
        assert state.get("org-a", 0) == [10]  # the newer one still wins
        assert state.flush() == 1
        await output.drain()
        return producer

    producer = run(scenario())
    assert producer.messages("app-totals-changelog", 0) == [
        (b"org-a", b"[1]"),
        (b"org-b", b"[2]"),
        (b"org-a", b"[10]"),
    ]
    assert table.data._dbs[0].get(b"org-a") == b"[10]"


def test_a_snapshot_abandoned_or_revoked_goes_back_to_the_buffer(table: Any) -> None:
    _, _, state = json_state(table)
    state.assigned({0, 1})
    state.put("a", 0, [1])
    state.put("b", 1, [1])
    state.snapshot()
    state.put("a", 0, [2])
    state.abandon_snapshot()  # a cancelled flush: the newer value stays
    assert state.dirty == 2 and state.get("a", 0) == [2] and state.get("b", 1) == [1]
    state.snapshot()
    state.revoked()  # the partitions left while the flush waited
    assert state.write_snapshot() == 0 and state.dirty == 2
    state.assigned({0})
    assert state.flush() == 1 and table.data._dbs[0].get(b"a") == b"[2]"
    assert 1 not in table.data._dbs  # partition 1's key was forgotten, never written


def settle_all(producer: RecordingProducer) -> Callable[[], Awaitable[None]]:
    """``DeliveryGuard.settle`` for the recording producer: wait for every batch sent."""

    async def settle() -> None:
        waiting = [future for _, _, _, future in producer.sent]
        if waiting:
            await asyncio.wait(waiting)

    return settle


async def flush_behind_a_pause(
    table: Any, written: Callable[[], None] = lambda: None
) -> tuple[RecordingProducer, TableState[list[int]], asyncio.Task[None]]:
    """A PAUSE queued, the state its input left, and a flush started and now waiting for the
    PAUSE's acknowledgement (nothing acknowledges it until the test says so)."""
    producer, output, state = json_state(table)
    output.add("pauses", 0, b"org-a", b"PAUSE")  # an input's output...
    state.put("org-a", 0, [1])  # ... and the state it left
    flush = asyncio.create_task(flush_outputs_first([state], output, settle_all(producer), written))
    for _ in range(5):
        await asyncio.sleep(0)
    return producer, state, flush


def test_state_is_stored_only_after_the_outputs_before_it_are_acknowledged(
    table: Any,
) -> None:
    """A stored policy says its inputs were applied: were it stored before their PAUSE
    events were acknowledged, a crash in between could lose those events for good."""

    async def scenario() -> RecordingProducer:
        written: list[bool] = []
        producer, state, flush = await flush_behind_a_pause(table, lambda: written.append(True))
        assert producer.messages("pauses", 0) == [(b"org-a", b"PAUSE")]  # sent
        assert not flush.done() and not written
        assert table.data._dbs.get(0) is None  # not stored: PAUSE not acknowledged
        assert state.get("org-a", 0) == [1]
        producer.acknowledge_all()
        await flush
        assert written and table.data._dbs[0].get(b"org-a") == b"[1]"
        assert producer.messages("app-totals-changelog", 0) == [(b"org-a", b"[1]")]
        return producer

    run(scenario())


def test_a_flush_cancelled_while_waiting_keeps_its_snapshot_for_the_next(table: Any) -> None:
    async def scenario() -> None:
        producer, state, flush = await flush_behind_a_pause(table)
        flush.cancel()
        with pytest.raises(asyncio.CancelledError):
            await flush
        assert state.dirty == 1 and table.data._dbs.get(0) is None
        producer.acknowledge_all()
        await flush_outputs_first([state], state.output, settle_all(producer))
        assert table.data._dbs[0].get(b"org-a") == b"[1]"

    run(scenario())


def test_a_snapshot_stores_its_values_as_they_were_when_taken(table: Any) -> None:
    """The worker changes cached values in place (an org's policy): what a flush stores
    must be the value at the snapshot, not one that includes inputs processed during the
    wait, whose outputs are not acknowledged yet."""
    _, _, state = json_state(table)
    value = [1]
    state.put("policy", 0, value)
    state.put("other", 0, [5])
    state.snapshot()
    value.append(2)  # an input processed during the wait changes the cached object
    state.put("policy", 0, value)
    assert state.peek("other", 0) == [5]  # web pages see the snapshot too
    state.write_snapshot()
    assert table.data._dbs[0].get(b"policy") == b"[1]"
    state.flush()
    assert table.data._dbs[0].get(b"policy") == b"[1,2]"


def test_a_failed_state_write_ends_the_worker_before_any_commit(tmp_path: Path) -> None:
    """A flush that fails half-way (RocksDB refusing a write, say) must not let the worker
    go on: a graceful stop would commit later totals over the lost ones. The commit hook
    ends the process with status 70 instead (review finding)."""
    script = (
        "import asyncio, logging\n"
        "from streams.app import store_or_exit\n"
        "logging.basicConfig()\n"
        "async def failing():\n"
        "    raise OSError('No space left on device')\n"
        "asyncio.run(store_or_exit(failing))\n"
        "print('carried on')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 70, done.stderr[-2000:]
    assert "carried on" not in done.stdout
    assert "could not store the worker's state before a commit" in done.stderr
