"""``metering replay`` on the real broker, with a live worker (issue: replay after a price fix).

The story of the issue: Haiku 3.5 input was billed at $0.80 instead of $1.00 since 1 October.
The operator adds a price-table version effective 2026-10-01, restarts the worker with it and
runs ``metering replay --since 2026-10-01T00:00:00Z``. The fixed version here also *lowers* a
rate (Opus 4.1 output 75 -> 60), so corrections go both ways.

* Every view except ``enforcement_log`` must then equal what a **second, fresh pipeline**
  fed the same records with the corrected table holds: the comparison the issue asks for,
  built literally.
* ``--dry-run`` prints the per-org, per-month diff, which must equal the difference of the
  two pipelines' ``org_month`` costs, and writes nothing.
* A second run corrects nothing and emits nothing; the replay log grows.
* Caps: a correction that pushes one org over its cap pauses it once with ``REPRICED``, one
  that brings another under resumes it once with ``REPRICED``; history is never re-emitted.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from jobs.pauses import read_pauses
from jobs.producer import UsageProducer
from jobs.progress import group_position
from streams.topics import CONTROL, PRICED, ensure_topics
from tests.integration.conftest import new_deployment
from tests.integration.harness import Deployment, wait_for
from tests.price_fix import FIX_INSTANT, corrected_table

SINCE = FIX_INSTANT
VIEWS = ("priced_events", "org_month", "tier_month", "user_month", "usage_hourly")
MODELS = (
    "claude-3-5-haiku-20241022",
    "claude-3-5-haiku-latest",
    "claude-opus-4-1-20250805",
    "claude-sonnet-4-20250514",
    "claude-3-7-sonnet-latest",
)


def _event(rng: random.Random, index: int, org: str, plan: str, when_ms: int) -> dict[str, Any]:
    model = rng.choice(MODELS)
    return {
        "event_id": f"ev-{index:05d}",
        "occurred_at": when_ms,
        "org_id": org,
        "plan": plan,
        "user_id": f"{org}-u{rng.randrange(4)}",
        "seat_tier": rng.choice(("STANDARD", "PREMIUM")),
        "product": rng.choice(("CLAUDE", "CLAUDE_CODE")),
        "model": model,
        "input_tokens": rng.randrange(0, 260_000),
        "output_tokens": rng.randrange(0, 20_000),
        "cache_creation_input_tokens": rng.randrange(0, 5_000),
        "cache_read_input_tokens": rng.randrange(0, 30_000),
        "extra_usage": rng.random() < 0.7,
    }


def history(count: int = 360) -> list[dict[str, Any]]:
    """Events from mid-September to late November, with re-sent duplicates (some of events
    from before the fix, re-sent after it)."""
    rng = random.Random(11)
    orgs = [(f"org-{i}", "TEAM" if i % 2 else "ENTERPRISE") for i in range(6)]
    start = int(datetime(2026, 9, 15, tzinfo=UTC).timestamp() * 1000)
    end = int(datetime(2026, 11, 28, tzinfo=UTC).timestamp() * 1000)
    events = []
    for index in range(count):
        org, plan = rng.choice(orgs)
        events.append(_event(rng, index, org, plan, rng.randrange(start, end)))
    events.sort(key=lambda e: e["occurred_at"])
    for original in rng.sample(events, 25):
        events.insert(rng.randrange(len(events) // 2, len(events)), dict(original))
    return events


def produce(deployment: Deployment, events: list[dict[str, Any]]) -> None:
    ensure_topics(deployment.settings)
    producer = UsageProducer(deployment.settings)
    for event in events:
        producer.send_event(event)
    producer.close()


def rows(deployment: Deployment, view: str) -> list[tuple]:
    return sorted(tuple(sorted(row.items())) for row in deployment.view(view))


def views(deployment: Deployment) -> dict[str, list[tuple]]:
    return {view: rows(deployment, view) for view in VIEWS}


def end_offsets(deployment: Deployment, topic: str) -> int:
    settings = deployment.settings
    return group_position(settings, settings.app_id, settings.topic(topic)).end


def replay(deployment: Deployment, *args: str) -> dict[str, Any]:
    result = deployment.metering("replay", "--since", SINCE, "--json", *args, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def pause_events(deployment: Deployment) -> list[dict[str, Any]]:
    return list(read_pauses(deployment.settings, follow=False))


@pytest.fixture
def fresh_deployment(kafka_bootstrap: str, tmp_path: Path) -> Iterator[Deployment]:
    """A second, independent pipeline on the same broker."""
    deployment = new_deployment(kafka_bootstrap, tmp_path / "fresh")
    try:
        yield deployment
    finally:
        deployment.stop_all()


@pytest.mark.timeout(1200)
def test_replay_equals_a_fresh_pipeline_with_the_corrected_table(
    deployment: Deployment, fresh_deployment: Deployment, tmp_path: Path
) -> None:
    fixed = str(corrected_table(tmp_path))
    events = history()
    cut = len(events) * 3 // 4

    # The live pipeline: the wrong table until the fix is deployed, then the corrected one.
    worker = deployment.start_worker()
    produce(deployment, events[:cut])
    deployment.wait_processed()
    assert worker.terminate() == 0, worker.log()[-3000:]
    deployment.env["METERING_PRICE_TABLE"] = fixed
    deployment.start_worker()
    produce(deployment, events[cut:])
    deployment.wait_processed()
    before = views(deployment)

    # The reference: a fresh pipeline that had the corrected table from the start.
    fresh_deployment.env["METERING_PRICE_TABLE"] = fixed
    fresh_deployment.start_worker()
    produce(fresh_deployment, events)
    fresh_deployment.wait_processed()
    want = views(fresh_deployment)
    assert before != want, "the fix must change some billed events"

    # --dry-run: the diff equals the two pipelines' difference, and nothing is written.
    ends = (end_offsets(deployment, PRICED), end_offsets(deployment, CONTROL))
    dry = replay(deployment, "--dry-run")
    assert (end_offsets(deployment, PRICED), end_offsets(deployment, CONTROL)) == ends
    assert dry["events_repriced"] > 0 and dry["replay_id"] is None

    def month_costs(table: list[tuple]) -> dict[tuple[str, str], Decimal]:
        out = {}
        for row in table:
            values = dict(row)
            out[(values["org_id"], values["month"].strftime("%Y-%m"))] = values["cost_usd"]
        return out

    old, new = month_costs(before["org_month"]), month_costs(want["org_month"])
    diff = {(r["org_id"], r["month"]): Decimal(r["delta_usd"]) for r in dry["diff"]}
    # Every re-priced month is listed with exactly the two pipelines' difference (a month of
    # events whose rate did not change is listed with 0: their price version changed).
    assert diff == {key: new[key] - old[key] for key in diff}
    assert {key for key in new if new[key] != old[key]} <= diff.keys()
    assert any(delta > 0 for delta in diff.values()) and any(d < 0 for d in diff.values())
    assert all(month >= "2026-10" for _, month in diff)

    # The real run, with the live worker running and its embedded store.
    pauses_before = pause_events(deployment)
    first = replay(deployment)
    assert first["events_repriced"] == first["events_applied"] == dry["events_repriced"]
    deployment.wait_processed()
    assert views(deployment) == want

    # Again: nothing to correct, no event, no row changed; only the replay log grows.
    second = replay(deployment)
    assert second["events_repriced"] == 0
    deployment.wait_processed()
    assert views(deployment) == want
    assert pause_events(deployment)[: len(pauses_before)] == pauses_before

    def logged() -> list[dict[str, Any]]:
        return deployment.view("replay_log")

    wait_for(lambda: len(logged()) == 2, 60, "both replays in metering.replay_log")
    by_id = {row["replay_id"]: row for row in logged()}
    assert by_id[first["replay_id"]]["events_repriced"] == first["events_repriced"]
    assert by_id[first["replay_id"]]["price_versions"] == ["2025-01-01", "2026-10-01"]
    assert by_id[second["replay_id"]]["events_repriced"] == 0


def _cap_event(org: str, event_id: str, model: str, **tokens: int) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "occurred_at": int(datetime(2026, 11, 10, 12, tzinfo=UTC).timestamp() * 1000),
        "org_id": org,
        "plan": "ENTERPRISE",
        "user_id": f"{org}-alice",
        "seat_tier": "STANDARD",
        "product": "CLAUDE",
        "model": model,
        "input_tokens": 0,
        "output_tokens": 0,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "extra_usage": True,
        **tokens,
    }


@pytest.mark.timeout(900)
def test_replay_pauses_and_resumes_with_reason_repriced(
    deployment: Deployment, tmp_path: Path
) -> None:
    fixed = str(corrected_table(tmp_path))
    worker = deployment.start_worker()  # the sink runs in it, on the embedded store
    for org in ("org-up", "org-down"):
        result = deployment.metering("caps", "set", "--org", org, "--usd", "1.00")
        assert result.returncode == 0, result.stderr
    settings = deployment.settings
    wait_for(
        lambda: group_position(settings, settings.app_id, settings.topic(CONTROL)).lag == 0,
        120,
        "the worker to apply the caps",
    )
    produce(
        deployment,
        [
            # Haiku input: $0.88 billed, $1.10 after the fix -> over the $1 cap.
            _cap_event("org-up", "up-1", "claude-3-5-haiku-latest", input_tokens=550_000),
            _cap_event("org-up", "up-2", "claude-3-5-haiku-latest", input_tokens=550_000),
            # Opus 4.1 output: $1.05 billed (paused), $0.84 after the fix -> under the cap.
            _cap_event("org-down", "down-1", "claude-opus-4-1", output_tokens=14_000),
        ],
    )
    deployment.wait_processed()
    history_events = pause_events(deployment)
    assert [(e["org_id"], e["action"], e["reason"]) for e in history_events] == [
        ("org-down", "PAUSE", "CAP_REACHED")
    ]

    assert worker.terminate() == 0, worker.log()[-3000:]
    deployment.env["METERING_PRICE_TABLE"] = fixed
    deployment.start_worker()
    replay(deployment)
    deployment.wait_processed()
    wait_for(lambda: len(pause_events(deployment)) >= 3, 60, "the REPRICED events")
    time.sleep(2)  # anything more would arrive now
    events = pause_events(deployment)
    assert events[:1] == history_events, "history is never re-emitted"
    new = sorted((e["org_id"], e["scope"], e["action"], e["reason"]) for e in events[1:])
    assert new == [
        ("org-down", "ORG", "RESUME", "REPRICED"),
        ("org-up", "ORG", "PAUSE", "REPRICED"),
    ]
    spends = {e["org_id"]: e["spend_nano_usd"] for e in events[1:]}
    assert spends == {"org-up": 1_100_000_000, "org-down": 840_000_000}

    # Running it again changes nothing and emits nothing.
    assert replay(deployment)["events_repriced"] == 0
    deployment.wait_processed()
    time.sleep(2)
    assert pause_events(deployment) == events
