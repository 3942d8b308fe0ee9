"""Direct delivery of the worker's source records to its handler.

Faust hands every fetched record to its streams one at a time: ``Consumer._drain_messages``
awaits ``wait_first(conductor.on_message(message), suspend_flow.wait())`` (four tasks and an
``asyncio.wait`` per record), the conductor wraps the record in an ``Event`` and queues it on
the agent's channel, and the agent's stream iterator takes it off again and acknowledges it
on the next turn. At a few thousand records per second that hand-off cost more CPU than
metering the record (BENCHMARKS.md).

:func:`deliver_directly` replaces the consumer's drain loop by the same loop with one
difference: a record of one of the ``direct`` topics is given to ``process`` right where it
was fetched (synchronously, no await in between) and acknowledged with Faust's own
``Consumer.ack``. Everything else stays Faust's: the fetcher, the round-robin over
partitions, the read-offset and gap bookkeeping, flow control around rebalances, offset
commits (computed from the same acknowledgements), and records of every other topic (table
changelogs and standbys), which still go through the conductor as before.

Contract (what the worker relies on):

* ``process(message)`` is called once per fetched record of a direct topic, in offset order
  per partition, and only while the consumer's flow is active: a rebalance that starts
  while the loop awaits (a commit, an output drain, a yield) stops delivery before the next
  record, which is fetched again from the committed offset after the assignment, exactly
  as Faust drops the records of an interrupted hand-off.
* A record is acknowledged only after ``process`` returned, so no commit covers a record
  whose outputs were not queued. ``process`` must not raise: the worker exits on a bug.
* After each record ``after()`` is awaited when ``pending()`` is true (the worker drains a
  full output batch there).

It relies on Faust internals (``Consumer._drain_messages``, ``_read_offset``,
``_commit_every``, ``_n_acked``, ``_add_gap``), pinned with faust-streaming in
``pyproject.toml``; ``tests/unit/test_fastpath.py`` checks the loop against those names.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any

YIELD_EVERY = 100  # records between yields to the event loop (as Faust's own loop)


def deliver_directly(
    consumer: Any,
    direct: Collection[str],
    process: Callable[[Any], None],
    pending: Callable[[], bool],
    after: Callable[[], Awaitable[None]],
) -> None:
    """Make ``consumer`` (Faust's, before it starts) hand records of the ``direct`` topics
    to ``process`` itself; see the module docstring."""
    direct = frozenset(direct)

    async def drain_messages(fetcher: Any) -> None:
        try:
            await _drain(fetcher)
        except consumer.consumer_stopped_errors:
            if consumer.transport.app.should_stop:
                return  # the broker stopped us while we stop anyway (as Faust's loop)
            raise
        except asyncio.CancelledError:
            if consumer.transport.app.should_stop:
                return
            raise

    async def _drain(fetcher: Any) -> None:
        callback = consumer.callback
        getmany = consumer.getmany
        consumer_stopped = consumer._stopped.is_set
        fetcher_stopped = fetcher._stopped.is_set
        read_offsets = consumer._read_offset
        acks_enabled_for = consumer.app.topics.acks_enabled_for
        commit_every = consumer._commit_every
        ack = consumer.ack
        monitor = consumer.app.monitor
        inbound = monitor.stream_inbound_time if monitor is not None else {}
        sleep = asyncio.sleep
        since_yield = 0
        while not (consumer_stopped() or fetcher_stopped()):
            batch = getmany(timeout=1.0)
            await sleep(0)  # getmany can return at once, again and again
            if consumer.should_stop:
                continue
            async for tp, message in batch:
                since_yield += 1
                if since_yield > YIELD_EVERY:
                    await sleep(0)
                    since_yield = 0
                offset = message.offset
                read = read_offsets[tp]
                if read is not None and offset < read:
                    continue  # already read (Faust drops it the same way)
                if read and offset - read > 1 and acks_enabled_for(message.topic):
                    await consumer._add_gap(tp, read + 1, offset)
                if commit_every is not None and consumer._n_acked >= commit_every:
                    consumer._n_acked = 0
                    await consumer.commit()
                if message.topic in direct:
                    if not consumer.flow_active:
                        break  # a rebalance began while we awaited: refetched afterwards
                    process(message)
                    ack(message)
                    inbound[tp] = time.monotonic()  # Faust's stalled-stream detector
                    read_offsets[tp] = offset
                    if pending():
                        await after()
                else:
                    await consumer.wait_first(callback(message), consumer.suspend_flow.wait())
                    read_offsets[tp] = offset

    consumer._drain_messages = drain_messages
