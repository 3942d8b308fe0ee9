"""Batched output of the worker: every produced message, appended to Kafka record batches.

Faust's ``Topic.send`` (and the table changelog path behind it) creates several futures,
callbacks and a task per message; at a few thousand events/s that overhead, not Kafka, was
the worker's ceiling (BENCHMARKS.md). :class:`BatchedOutput` appends each message to an
aiokafka ``BatchBuilder`` of its topic-partition instead and hands whole batches to the
producer (``send_batch``): one future per batch.

Contract:

* :meth:`add` is synchronous and never loses a message: it only appends to a builder in
  memory. The handler of an event therefore queues *all* of the event's outputs with no
  await in between, so cancelling the worker can never leave an event half-sent.
* :meth:`drain` hands every builder filled so far to the producer and registers each batch
  future with ``track`` (the :class:`streams.delivery.DeliveryGuard`): a failed batch ends
  the process before any commit. It runs when a builder is full, shortly after any add (a
  background task, so outputs such as PAUSE events leave within milliseconds), and before
  every offset commit (the guard's flush), so no commit overtakes a queued message. A drain
  cancelled part-way (the worker stopping while the producer makes room) keeps the batches
  it had not handed over, in order, for the next drain: their events may be acknowledged.
* Messages of one topic-partition keep the order of :meth:`add` (batches of a partition are
  sent one after the other, aiokafka allows one in flight per partition).
* ``on_sent(topic, partition, last_offset)`` callbacks run when a batch is acknowledged;
  table state uses them to record the changelog offset its local store has reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

EXIT_OUTPUT_FAILED = 75  # EX_TEMPFAIL, as a failed delivery (streams.delivery)

Builder = Any  # aiokafka.producer.message_accumulator.BatchBuilder
SentCallback = Callable[[str, int, int], None]


class BatchedOutput:
    """Per topic-partition record batches, sent through an aiokafka producer."""

    def __init__(
        self,
        producer: Callable[[], Any],
        track: Callable[[asyncio.Future[Any]], None],
    ) -> None:
        """``producer`` returns the started ``AIOKafkaProducer`` (resolved lazily: Faust
        creates it when the app starts); ``track`` watches each batch's delivery future."""
        self._producer = producer
        self._track = track
        self._open: dict[tuple[str, int], Builder] = {}
        self._full: list[tuple[str, int, Builder, SentCallback | None]] = []
        self._callbacks: dict[tuple[str, int], SentCallback] = {}
        self._queued = 0
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._drainer: asyncio.Task[None] | None = None
        self.batches_sent = 0
        self.messages_sent = 0

    @property
    def queued(self) -> int:
        """Messages added and not yet handed to the producer."""
        return self._queued

    @property
    def needs_drain(self) -> bool:
        """True when a builder filled up: the caller should ``await drain()`` soon."""
        return bool(self._full)

    def on_sent(self, topic: str, partition: int, callback: SentCallback) -> None:
        """Call ``callback(topic, partition, last_offset)`` for every acknowledged batch of
        this topic-partition (one callback per topic-partition; a later one replaces it)."""
        self._callbacks[(topic, partition)] = callback

    def add(self, topic: str, partition: int, key: bytes | None, value: bytes) -> None:
        """Queue one message (synchronous: nothing can interrupt it half-way)."""
        tp = (topic, partition)
        builder = self._open.get(tp)
        if builder is None:
            builder = self._open[tp] = self._producer().create_batch()
        if builder.append(key=key, value=value, timestamp=None) is None:
            # Full: queue it and start a new one. An empty builder takes any one message,
            # even one larger than the batch size (it then travels alone).
            self._full.append((topic, partition, builder, self._callbacks.get(tp)))
            builder = self._open[tp] = self._producer().create_batch()
            builder.append(key=key, value=value, timestamp=None)
        self._queued += 1
        self._wake.set()

    async def drain(self) -> None:
        """Hand every queued message to the producer, tracking each batch's delivery."""
        async with self._lock:  # keeps batches of one partition in add() order
            batches, self._full = self._full, []
            for tp, builder in self._open.items():
                batches.append((tp[0], tp[1], builder, self._callbacks.get(tp)))
            self._open = {}
            self._queued = 0
            producer = self._producer()
            for index, (topic, partition, builder, callback) in enumerate(batches):
                count = builder.record_count()
                if count == 0:
                    continue
                try:
                    future = await producer.send_batch(builder, topic, partition=partition)
                except asyncio.CancelledError:
                    # Cancelled while the producer made room (stopping, or a commit task
                    # cancelled): this batch and the later ones were not handed over, and
                    # the offsets of their events may already be acknowledged. Put them
                    # back, first in line and in order, for the next drain (the commit's).
                    self._full[:0] = batches[index:]
                    self._queued += sum(batch[2].record_count() for batch in batches[index:])
                    self._wake.set()
                    raise
                except Exception:
                    # The batch (and those after it) would be lost while their source
                    # offsets may still be committed: end the process before any commit.
                    log.critical(
                        "could not hand a batch of %d message(s) for %s[%d] to the producer; "
                        "exiting without committing so the events are processed again",
                        count,
                        topic,
                        partition,
                        exc_info=True,
                    )
                    logging.shutdown()
                    os._exit(EXIT_OUTPUT_FAILED)
                self._track(future)
                if callback is not None:
                    future.add_done_callback(_after_send(topic, partition, count, callback))
                self.batches_sent += 1
                self.messages_sent += count

    def start(self, delay: float = 0.02) -> None:
        """Start the background drainer: it sends queued messages ``delay`` seconds after
        the first one was added. The linger lets a burst share batches: at 2 ms the broker
        spent twice the CPU on small produce requests for the same throughput."""
        if self._drainer is None:
            self._drainer = asyncio.get_running_loop().create_task(self._drain_forever(delay))

    async def stop(self) -> None:
        """Send what is queued and stop the background drainer."""
        if self._drainer is not None:
            self._drainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drainer
            self._drainer = None
        await self.drain()

    async def _drain_forever(self, delay: float) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(delay)
            self._wake.clear()
            await self.drain()


def _after_send(
    topic: str, partition: int, count: int, callback: SentCallback
) -> Callable[[asyncio.Future[Any]], None]:
    def done(future: asyncio.Future[Any]) -> None:
        if future.cancelled() or future.exception() is not None:
            return  # the DeliveryGuard ends the process
        callback(topic, partition, future.result().offset + count - 1)

    return done
