"""The worker's consumer hooks around a rebalance, on the real app and a real Faust consumer
(not started: the seek underneath is scripted).

What they pin: after an assignment, resuming the source partitions (Faust does it when table
recovery completes, *before* it seeks them) leaves them paused until the seek to their
committed offsets is done; changelog partitions resume at once; a seek that a newer
rebalance overtook releases nothing. tests/integration/test_crash.py runs the same on a
real broker with a worker killed mid-stream.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from faust.types import TP

from core.settings import load_settings
from streams.app import create_app
from streams.topics import CONTROL, USAGE


@pytest.fixture
def worker(tmp_path: Path) -> Any:
    settings = load_settings(data_dir=str(tmp_path), app_id="hold-test", partitions=2)
    app = create_app(settings)
    consumer = app.consumer
    seeks: list[int] = []

    async def seek_to_committed() -> dict[TP, int]:
        seeks.append(app.consumer_generation_id)
        await asyncio.sleep(0)
        if app.metering_test_gate is not None:  # a slow seek: finishes when the test says
            await app.metering_test_gate.wait()
        return {TP(settings.topic(USAGE), p): 10 for p in range(2)}

    app.metering_test_gate = None

    consumer.seek_to_committed = seek_to_committed  # what the hooks wrap
    for hook in app.metering_consumer_hooks:
        if hook.__name__ in ("seek_fresh_partitions_to_beginning", "hold_sources_until_seeked"):
            hook(consumer)
    return app, settings, seeks


def active(app: Any) -> set[TP]:
    return set(app.consumer._active_partitions or ())


def assignment(app: Any, settings: Any, generation: int = 1) -> set[TP]:
    """Generation ``generation`` assigned, nothing fetched yet; its usage partitions."""
    app.consumer_generation_id = generation
    app.consumer._set_active_tps(set())
    return {TP(settings.topic(USAGE), p) for p in range(2)}


def test_source_partitions_resume_only_after_their_seek(worker: Any) -> None:
    app, settings, seeks = worker
    consumer = app.consumer
    usage = {TP(settings.topic(USAGE), p) for p in range(2)}
    control = {TP(settings.topic(CONTROL), p) for p in range(2)}
    changelog = {TP("hold-test-totals-changelog", p) for p in range(2)}
    app.consumer_generation_id = 1
    consumer._set_active_tps(set())

    consumer.resume_partitions(changelog)  # recovery reads the changelogs
    assert active(app) == changelog
    consumer.resume_partitions(usage | control)  # recovery done, before the seek
    assert active(app) == changelog
    assert asyncio.run(consumer.seek_to_committed()) == {tp: 10 for tp in usage}
    assert active(app) == changelog | usage | control
    assert seeks == [1]

    # Once seeked, the same generation resumes at once (a pause for a full buffer, say).
    consumer.pause_partitions(usage)
    consumer.resume_partitions(usage)
    assert usage <= active(app)


def test_the_next_assignment_is_held_again(worker: Any) -> None:
    app, settings, _ = worker
    consumer = app.consumer
    usage = assignment(app, settings)
    consumer.resume_partitions(usage)
    asyncio.run(consumer.seek_to_committed())
    assert active(app) == usage

    consumer.pause_partitions(usage)  # a rebalance: generation 2
    app.consumer_generation_id = 2
    consumer.resume_partitions(usage)
    assert active(app) == set()
    asyncio.run(consumer.seek_to_committed())
    assert active(app) == usage


def test_a_seek_overtaken_by_a_newer_rebalance_releases_nothing(worker: Any) -> None:
    app, settings, _ = worker
    consumer = app.consumer
    usage = assignment(app, settings)
    consumer.resume_partitions(usage)

    async def seek_while_rebalancing() -> None:
        seeking = asyncio.ensure_future(consumer.seek_to_committed())
        await asyncio.sleep(0)
        app.consumer_generation_id = 2  # generation 2 assigned while generation 1 seeks
        await seeking

    asyncio.run(seek_while_rebalancing())
    assert active(app) == set()
    asyncio.run(consumer.seek_to_committed())  # generation 2's own seek
    assert active(app) == usage


def test_a_seek_begun_before_the_hold_releases_nothing(worker: Any) -> None:
    """Faust's fetch loop seeks too when it finds the flow stopped, early in an assignment;
    that seek read its offsets before the partitions were resumed and must not release
    them: the seek that table recovery makes after resuming them does."""
    app, settings, seeks = worker
    consumer = app.consumer
    usage = assignment(app, settings)

    async def early_seek_then_resume() -> None:
        early = asyncio.ensure_future(consumer.seek_to_committed())
        await asyncio.sleep(0)  # the early seek has begun
        consumer.resume_partitions(usage)  # recovery completes: resume, then seek
        await early
        assert active(app) == set()
        await consumer.seek_to_committed()  # recovery's own seek, after the early one
        assert active(app) == usage

    asyncio.run(early_seek_then_resume())
    assert seeks == [1, 1]


def test_a_seek_asked_for_before_a_rebalance_releases_nothing_after_it(worker: Any) -> None:
    """Recovery of generation 1 asks for its seek while the fetch loop's seek holds the
    turn; generation 2 is assigned before that turn comes: the seek belongs to generation
    1 and must not release partitions for generation 2, which has its own recovery ahead."""
    app, settings, _ = worker
    consumer = app.consumer
    usage = assignment(app, settings)

    async def scenario() -> None:
        app.metering_test_gate = gate = asyncio.Event()
        early = asyncio.ensure_future(consumer.seek_to_committed())  # holds the turn
        await asyncio.sleep(0.01)
        consumer.resume_partitions(usage)
        recovery = asyncio.ensure_future(consumer.seek_to_committed())  # waits its turn
        await asyncio.sleep(0.01)
        app.consumer_generation_id = 2
        gate.set()
        await asyncio.gather(early, recovery)
        assert active(app) == set()

    asyncio.run(scenario())
