"""Operator commands against a real broker: produce from JSON lines, report, standalone sink."""

from __future__ import annotations

import json
import socket
import time
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from tests.integration.harness import Deployment, wait_for

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _usage(event_id: str, occurred_at: object, **changes: object) -> dict[str, object]:
    event: dict[str, object] = {
        "event_id": event_id,
        "occurred_at": occurred_at,
        "org_id": "org-cli",
        "plan": "ENTERPRISE",
        "user_id": "ada",
        "seat_tier": "PREMIUM",
        "product": "CLAUDE",
        "model": "claude-sonnet-4-20250514",
        "input_tokens": 1_000_000,
        "output_tokens": 0,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "extra_usage": True,
    }
    event.update(changes)
    return event


def test_produce_json_lines_then_report_through_the_worker(deployment: Deployment) -> None:
    now = datetime.now(tz=UTC)
    month = now.strftime("%Y-%m")
    lines = [
        # 1M Sonnet 4 input tokens: the prompt is over 200K, so the long-context rate of
        # $6/MTok applies -> $6, billed as extra usage.
        json.dumps(_usage("e1", now.isoformat().replace("+00:00", "Z"))),
        # Same id again: a duplicate, counted once.
        json.dumps(_usage("e1", now.isoformat().replace("+00:00", "Z"))),
        # 150K input at the standard $3/MTok = $0.45, included usage (not extra).
        json.dumps(
            _usage(
                "e2",
                int(now.timestamp() * 1000),
                input_tokens=150_000,
                extra_usage=False,
                user_id="bob",
                seat_tier="STANDARD",
            )
        ),
        json.dumps(_usage("e3", int(now.timestamp() * 1000), plan="FREE")),  # not encodable
        "{not json",
    ]
    result = deployment.metering("produce", "--jsonl", "-", input_text="\n".join(lines) + "\n")
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("line ")]
    assert [e.split(":")[0] for e in errors] == ["line 4", "line 5"], result.stderr
    assert "produced 3 events, skipped 2 lines" in result.stdout

    worker = deployment.start_worker()
    deployment.wait_processed()
    report = deployment.metering("report", "--org", "org-cli", "--month", month, "--json")
    assert report.returncode == 0, report.stderr
    body = json.loads(report.stdout)
    assert Decimal(body["total"]["cost_usd"]) == Decimal("6.45")
    assert Decimal(body["total"]["extra_cost_usd"]) == Decimal("6")
    assert body["total"]["events"] == 2
    members = {m["user_id"]: m for m in body["members"]}
    assert Decimal(members["ada"]["extra_cost_usd"]) == Decimal("6")
    assert Decimal(members["bob"]["extra_cost_usd"]) == Decimal("0")
    assert {t["seat_tier"] for t in body["tiers"]} == {"PREMIUM", "STANDARD"}
    assert [m["model_family"] for m in body["models"]] == ["sonnet-4"]
    table = deployment.metering("report", "--org", "org-cli", "--month", month)
    assert table.returncode == 0 and "MTD Spend" in table.stdout and "$6.45" in table.stdout
    assert worker.terminate() == 0


def test_standalone_sink_owns_the_store_and_serves_reads(deployment: Deployment) -> None:
    from jobs.generate import GeneratorConfig, generate
    from tests.oracle import expected_views

    now_ms = int(time.time() * 1000)
    records = list(generate(GeneratorConfig(events=800, orgs=5, users=40, seed=3), now_ms))
    sink_port = str(_free_port())
    sink = deployment.start_worker(command="sink", env={"METERING_WEB_PORT": sink_port})
    wait_for(
        lambda: (deployment.root / "data" / "clickhouse.lock").exists(),
        60,
        "the sink to claim the store",
    )
    worker = deployment.start_worker()  # --sink by default, but the store is taken
    deployment.produce(records)
    deployment.wait_processed()
    assert "runs without the sink" in worker.log()

    expected = expected_views(records, now_ms)
    rows = deployment.view("org_month")
    got: dict[str, Decimal] = {}
    for row in rows:
        got[row["org_id"]] = got.get(row["org_id"], Decimal(0)) + row["cost_usd"]
    want: dict[str, Decimal] = {}
    for (_, org), measures in expected.org_month.items():
        want[org] = want.get(org, Decimal(0)) + measures["cost_usd"]
    assert got == want
    assert worker.terminate() == 0
    assert sink.terminate() == 0, sink.log()[-3000:]
