"""What a worker's consumer is doing, for an operator facing a worker that has lag and makes
no progress (``GET /metering/consumer``, also printed by the integration harness when a test
stalls).

Read-only and best effort: it reads Faust's and aiokafka's internal state (pinned versions)
without locks, from the event loop's thread, so a value may be a moment old; a field that
cannot be read is reported as an error string instead of failing the page.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Mapping
from typing import Any


def consumer_state(
    app: Any, source_topics: Collection[str], next_offsets: Mapping[Any, int]
) -> dict[str, Any]:
    """The consumer's flow, partitions (Faust's view and aiokafka's) and the event loop's
    tasks with what each one awaits."""
    consumer = app.consumer
    state: dict[str, Any] = {
        "generation": _read(lambda: app.consumer_generation_id),
        "rebalancing": _read(lambda: app.rebalancing),
        "flow_active": _read(lambda: consumer.flow_active),
        "flow_control_active": _read(lambda: app.flow_control.is_active()),
        "recovery_completed": _read(lambda: app.tables.recovery.completed.is_set()),
        "fetcher": _read(lambda: _service(app._fetcher)),
        "partitions": _read(lambda: partition_states(consumer, source_topics, next_offsets)),
        "aiokafka": _read(lambda: _aiokafka(consumer, source_topics)),
        "tasks": _read(tasks),
        "consumer_thread_tasks": _read(lambda: tasks(consumer._thread.thread_loop)),
    }
    return state


def tasks(loop: asyncio.AbstractEventLoop | None = None) -> list[dict[str, Any]]:
    """Every task of ``loop`` (the running one by default): its name and the chain of
    coroutines it awaits."""
    return [
        {"name": task.get_name(), "awaiting": _awaiting(task.get_coro())}
        for task in sorted(asyncio.all_tasks(loop), key=lambda t: t.get_name())
    ]


def _read(get: Callable[[], Any]) -> Any:
    try:
        return get()
    except Exception as exc:  # a diagnostic page never fails on what it cannot read
        return f"unreadable: {type(exc).__name__}: {exc}"


def _service(service: Any) -> dict[str, Any]:
    return {
        "state": str(service.state),
        "started": bool(service._started.is_set()),
        "stopped": bool(service._stopped.is_set()),
        "crashed": bool(service._crashed.is_set()),
    }


def partition_states(
    consumer: Any, source_topics: Collection[str], next_offsets: Mapping[Any, int]
) -> list[dict[str, Any]]:
    """Each source partition of the assignment as Faust sees it: active or paused, read,
    committed and next offsets, acknowledgements pending, gaps, highwater."""
    active = consumer._active_partitions or set()
    rows = []
    for tp in sorted(consumer.assignment()):
        if tp.topic not in source_topics:
            continue
        rows.append(
            {
                "topic": tp.topic,
                "partition": tp.partition,
                "active": tp in active,
                "paused": tp in consumer._paused_partitions,
                "buffered": tp in consumer._buffered_partitions,
                "read_offset": consumer._read_offset.get(tp),
                "committed_offset": consumer._committed_offset.get(tp),
                "acked_pending": len(consumer._acked.get(tp) or ()),
                "acked_lowest": min(consumer._acked.get(tp) or [None], key=_low),
                "gaps": [[g.begin, g.end] for g in sorted(consumer._gap.get(tp) or ())][:10],
                "next_offset": next_offsets.get(tp),
                "highwater": consumer.highwater(tp),
            }
        )
    return rows


def _low(offset: int | None) -> float:
    return float("inf") if offset is None else offset


def _aiokafka(consumer: Any, source_topics: Collection[str]) -> dict[str, Any]:
    client = consumer._thread._ensure_consumer()
    fetcher = client._fetcher
    assignment = client._subscription.subscription.assignment
    partitions = []
    for tp in sorted(assignment.tps):
        if tp.topic not in source_topics:
            continue
        tp_state = assignment.state_value(tp)
        partitions.append(
            {
                "topic": tp.topic,
                "partition": tp.partition,
                "paused": tp_state.paused,
                "position": tp_state.position if tp_state.has_valid_position else None,
                "awaiting_reset": tp_state.awaiting_reset,
                "highwater": tp_state.highwater,
                "records_buffered": tp in fetcher._records,
            }
        )
    task = fetcher._fetch_task
    failed = task.done() and not task.cancelled() and task.exception() is not None
    return {
        "fetch_task_done": task.done(),
        "fetch_task_error": repr(task.exception()) if failed else None,
        "fetches_in_flight_to_nodes": sorted(fetcher._in_flight),
        "pending_fetch_tasks": len(fetcher._pending_tasks),
        "buffered_partitions": len(fetcher._records),
        "fetch_max_wait_ms": fetcher._fetch_max_wait_ms,
        "partitions": partitions,
    }


def _awaiting(coro: Any, depth: int = 12) -> list[str]:
    chain = []
    while coro is not None and len(chain) < depth:
        frame = (
            getattr(coro, "cr_frame", None)
            or getattr(coro, "ag_frame", None)
            or getattr(coro, "gi_frame", None)
        )
        name = getattr(coro, "__qualname__", type(coro).__name__)
        if frame is not None:
            path = "/".join(frame.f_code.co_filename.split("/")[-2:])
            chain.append(f"{name} ({path}:{frame.f_lineno})")
        else:
            chain.append(repr(coro)[:200])
        coro = (
            getattr(coro, "cr_await", None)
            or getattr(coro, "ag_await", None)
            or getattr(coro, "gi_yieldfrom", None)
        )
    return chain
