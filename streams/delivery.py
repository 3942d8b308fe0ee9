"""Fail-closed delivery for the worker's outputs (review finding: Faust drops send errors).

Faust commits source offsets after ``producer.flush()``, but (faust-streaming 0.15):

* a message whose delivery fails is only logged (``Topic._on_published``), so its source offset
  is committed anyway and the output — a priced event, a dead letter, a re-routed event or a
  table changelog write — is lost for good;
* ``ProducerBuffer.flush`` (the queue behind every table changelog write) gives up after 0.1 s
  without progress, so the commit can overtake changelog writes still queued; and under
  sustained load it waits for a buffer that never empties, starving commits.

:class:`DeliveryGuard` closes both gaps without forking Faust. It tracks every future the
worker produces (agent sends and changelog writes), makes the producer's ``flush`` wait until
every message produced before the flush began has been handed to the Kafka client and
acknowledged, and ends the process
(exit status 75, no commit) the moment any delivery fails. After the restart the uncommitted
events are processed again; the at-least-once rules of :mod:`core.metering` make that exact.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

EXIT_DELIVERY_FAILED = 75  # EX_TEMPFAIL: a supervisor restarts the worker


class DeliveryGuard:
    """Tracks produced messages of one app and refuses to let a commit pass a lost one."""

    def __init__(self) -> None:
        self._pending: set[asyncio.Future[Any]] = set()
        self._enqueued = 0  # changelog writes put in Faust's buffer
        self._handed = 0  # ... of which handed to the Kafka client
        self._progress = asyncio.Event()
        self._before_flush: list[Callable[[], Awaitable[None]]] = []
        self._producer: Any = None  # Faust's producer, once installed

    @property
    def pending(self) -> int:
        return len(self._pending)

    def track(self, future: asyncio.Future[Any]) -> None:
        """Watch one produced message until it is acknowledged by the broker."""
        self._pending.add(future)
        future.add_done_callback(self._settled)

    def _settled(self, future: asyncio.Future[Any]) -> None:
        self._pending.discard(future)
        failure = asyncio.CancelledError() if future.cancelled() else future.exception()
        if failure is not None:
            log.critical(
                "a produced message was not delivered (%r); exiting without committing so "
                "the events are processed again",
                failure,
            )
            logging.shutdown()
            os._exit(EXIT_DELIVERY_FAILED)

    async def settle(self) -> None:
        """Wait until everything produced *before* this call is acknowledged; later sends
        are not waited for, so a commit under sustained load is never starved (Faust's own
        flush loops until its buffer is empty, which under load may be never). A failed
        delivery ends the process (:meth:`_settled`)."""
        target = self._enqueued
        waiting = list(self._pending)
        while self._handed < target:
            self._progress.clear()
            await self._progress.wait()
        client = getattr(self._producer, "_producer", None)
        if client is not None:
            await client.flush()  # the Kafka client's batches, not Faust's buffer
        if waiting:
            await asyncio.wait(waiting)

    def before_flush(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Run ``hook`` at the start of every producer flush, that is before every offset
        commit: the worker hands its buffered state and outputs to the producer there, so
        the flush then waits for them too."""
        self._before_flush.append(hook)

    def install(self, app: Any) -> None:
        """Wrap ``app.producer`` (before the app starts)."""
        producer = self._producer = app.producer
        buffer = producer.buffer
        original_send_soon = producer.send_soon
        original_send_pending = buffer._send_pending

        def send_soon(future: Any) -> None:
            self.track(future)
            self._enqueued += 1
            original_send_soon(future)

        async def send_pending(future: Any) -> None:
            try:
                await original_send_pending(future)
            finally:
                self._handed += 1
                self._progress.set()

        async def flush() -> None:
            """Run the hooks, then :meth:`settle`."""
            for hook in self._before_flush:
                await hook()
            await self.settle()

        producer.send_soon = send_soon
        buffer._send_pending = send_pending
        producer.flush = flush
