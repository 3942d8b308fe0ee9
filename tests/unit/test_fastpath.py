"""Direct delivery (streams/fastpath.py) on a real Faust consumer with scripted fetches.

The consumer is Faust's own (aiokafka driver, not started); only ``getmany`` is replaced by
a script, so the loop runs against the real acknowledgement and commit-offset bookkeeping
(``Consumer.ack``, ``Consumer._new_offset``) that decides what the worker commits. The
crash and rebalance tests (tests/integration/test_crash.py) cover it on a real broker.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import faust
from faust.types import TP
from faust.types.tuples import Message

from streams.fastpath import deliver_directly

USAGE, CONTROL, CHANGELOG = "usage", "control", "app-totals-changelog"


def record(topic: str, partition: int, offset: int) -> Message:
    return Message(topic, partition, offset, 0.0, 0, [], b"org", b"value", None)


class Fetcher:
    """What the consumer's drain loop is given: only its stop flag is read."""

    def __init__(self) -> None:
        self._stopped = asyncio.Event()


async def run(
    batches: list[list[Message]],
    *,
    on_process: Callable[[Message, Any], None] | None = None,
    pending: Callable[[], bool] = lambda: False,
    after: Callable[[Any], None] | None = None,
) -> tuple[Any, list[Message], list[Message]]:
    """Drive the replaced drain loop over ``batches``; returns the consumer, the records
    processed directly and those handed to Faust's conductor."""
    app = faust.App("fastpath-test", broker="kafka://127.0.0.1:1", autodiscover=False)
    app.topics.add(app.topic(USAGE, CONTROL, CHANGELOG))
    await app.topics._update_indices()  # acknowledgements count for these topics
    consumer = app.consumer
    fetcher = Fetcher()
    processed: list[Message] = []
    conducted: list[Message] = []
    script = iter(batches)

    async def getmany(timeout: float) -> AsyncIterator[tuple[TP, Message]]:
        batch = next(script, None)
        if batch is None:
            fetcher._stopped.set()
            return
        for message in batch:
            if not consumer.flow_active:  # as Faust's getmany
                break
            yield message.tp, message

    async def conductor(message: Message) -> None:
        conducted.append(message)

    def process(message: Message) -> None:
        processed.append(message)
        if on_process is not None:
            on_process(message, consumer)

    async def drained() -> None:
        if after is not None:
            after(consumer)

    consumer.getmany = getmany
    consumer.callback = conductor
    deliver_directly(consumer, (USAGE, CONTROL), process, pending, drained)
    await asyncio.wait_for(consumer._drain_messages(fetcher), timeout=10)
    return consumer, processed, conducted


def test_source_records_are_processed_in_order_and_acknowledged_for_the_commit() -> None:
    batches = [
        [record(USAGE, 0, 0), record(CONTROL, 0, 0), record(USAGE, 0, 1)],
        [record(USAGE, 1, 7), record(USAGE, 0, 2)],
    ]
    consumer, processed, conducted = asyncio.run(run(batches))
    assert [(m.topic, m.partition, m.offset) for m in processed] == [
        (USAGE, 0, 0),
        (CONTROL, 0, 0),
        (USAGE, 0, 1),
        (USAGE, 1, 7),
        (USAGE, 0, 2),
    ]
    assert conducted == []
    # What Faust would commit: the offset after the last acknowledged record.
    assert consumer._new_offset(TP(USAGE, 0)) == 3
    assert consumer._new_offset(TP(USAGE, 1)) == 8
    assert consumer._new_offset(TP(CONTROL, 0)) == 1


def test_records_of_other_topics_still_go_through_faust() -> None:
    batches = [[record(CHANGELOG, 0, 0), record(USAGE, 0, 0), record(CHANGELOG, 0, 1)]]
    _, processed, conducted = asyncio.run(run(batches))
    assert [m.offset for m in conducted] == [0, 1]
    assert [m.topic for m in processed] == [USAGE]


def test_a_rebalance_during_an_await_stops_delivery_before_the_next_record() -> None:
    """The worker drains its output after a record; if a revocation stops the flow there,
    the rest of the fetch is neither processed nor acknowledged (it is fetched again from
    the committed offset after the assignment)."""
    batches = [[record(USAGE, 0, 0), record(USAGE, 0, 1), record(USAGE, 0, 2)]]
    consumer, processed, _ = asyncio.run(
        run(batches, pending=lambda: True, after=lambda consumer: consumer.stop_flow())
    )
    assert [m.offset for m in processed] == [0]
    assert consumer._new_offset(TP(USAGE, 0)) == 1
    assert consumer._read_offset[TP(USAGE, 0)] == 0


def test_a_record_is_acknowledged_only_after_it_was_processed() -> None:
    seen: list[int | None] = []

    def check(message: Message, consumer: Any) -> None:
        seen.append(consumer._new_offset(message.tp))  # nothing of it committable yet
        assert not message.acked

    batches = [[record(USAGE, 0, 0), record(USAGE, 0, 1)]]
    _, processed, _ = asyncio.run(run(batches, on_process=check))
    assert seen == [None, 1]
    assert all(m.acked for m in processed)


def test_records_already_read_are_not_processed_twice() -> None:
    batches = [[record(USAGE, 0, 0), record(USAGE, 0, 1)], [record(USAGE, 0, 0)]]
    _, processed, _ = asyncio.run(run(batches))
    assert [m.offset for m in processed] == [0, 1]
