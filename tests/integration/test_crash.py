"""Exact under SIGKILL: the worker (with its in-process ClickHouse sink) is killed at random
points and restarted; the outcome must be the same as if nothing had happened (issue #5).

Size: ``METERING_CRASH_EVENTS`` records and ``METERING_CRASH_KILLS`` kills; in CI (``CI``
set) at least 200,000 records and 5 kills, otherwise 30,000 and 3 for a quick local run.
The documented long run::

    METERING_CRASH_EVENTS=1000000 METERING_CRASH_KILLS=8 \\
        .venv/bin/pytest tests/integration/test_crash.py

Ground truth:

* the ClickHouse views must equal :mod:`tests.oracle` (independent of the product's code);
* the enforcement events, deduplicated by ``event_id``, must equal a *reference run* of the
  pure core (``core.metering.Meter`` and ``core.enforcement.Enforcer`` over plain dicts, in
  partition order, no Kafka, no Faust, no crash): this isolates what the crash machinery could
  break — a missed, extra or different event — from the business rules, which the table
  tests of ``tests/unit/test_enforcement.py`` pin independently. A repeated ``event_id`` must
  carry the same content, and no scope may see two PAUSEs (or RESUMEs) in a row.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from jobs.generate import Generated, GeneratorConfig, generate
from jobs.pauses import read_pauses
from tests.integration.conftest import _free_port
from tests.integration.harness import Deployment, WorkerProcess, wait_for
from tests.integration.test_pipeline import assert_views_match
from tests.oracle import expected_views

pytestmark = pytest.mark.integration

IN_CI = bool(os.environ.get("CI"))
EVENTS = int(os.environ.get("METERING_CRASH_EVENTS", 200_000 if IN_CI else 30_000))
KILLS = int(os.environ.get("METERING_CRASH_KILLS", 5 if IN_CI else 3))
# Every field of an enforcement event except when it was emitted (wall clock).
COMPARED = tuple(
    field["name"]
    for field in json.loads((Path(__file__).parents[2] / "avro" / "pause_event.avsc").read_text())[
        "fields"
    ]
    if field["name"] != "emitted_at"
)


def _caps(records: list[Generated]) -> list[tuple[str, tuple[str, dict[str, Any]]]]:
    """$1 ORG caps on every third org and 5-cent USER caps on a few members of the others."""
    orgs: dict[str, list[str]] = defaultdict(list)
    for item in records:
        if item.event is not None and item.expected_reason is None:
            members = orgs[str(item.event["org_id"])]
            user = str(item.event["user_id"])
            if user not in members:
                members.append(user)
    commands: list[tuple[str, tuple[str, dict[str, Any]]]] = []
    for index, org in enumerate(sorted(orgs)):
        if index % 3 == 0:
            cap = {"scope": "ORG", "user_id": None, "seat_tier": None, "limit_nano_usd": 10**9}
            commands.append((org, ("SetCap", cap)))
        else:
            for user in orgs[org][:3]:
                cap = {"scope": "USER", "user_id": user, "seat_tier": None}
                commands.append((org, ("SetCap", {**cap, "limit_nano_usd": 5 * 10**7})))
    return commands


def _reference_events(
    records: list[Generated],
    commands: list[tuple[str, tuple[str, dict[str, Any]]]],
    message_ids: list[str],
    now_ms: int,
) -> dict[str, dict[str, Any]]:
    """Enforcement events of the pure core fed the same inputs in the same per-org order."""
    from core.enforcement import ControlMessage, Enforcer, OrgPolicy
    from core.errors import RejectedEvent
    from core.metering import Meter, Status
    from core.pricing import PriceTable, default_price_table_path
    from core.totals import MonthTotals, org_key, user_key
    from core.validation import validate_usage
    from streams.codec import Codecs
    from streams.control import control_from_record

    codecs = Codecs.pinned()
    seen: dict[str, list] = {}
    totals: dict[str, list] = {}
    meter = Meter(PriceTable.load(default_price_table_path()), seen, totals)
    enforcer = Enforcer(grace_ms=0, period_timer=False)
    policies: dict[str, OrgPolicy] = defaultdict(OrgPolicy)
    emitted: dict[str, dict[str, Any]] = {}

    def spend_of(org: str) -> Any:
        def spend(period: str | None, user: str | None) -> int:
            if period is None:
                return 0
            key = org_key(org, period) if user is None else user_key(org, period, user)
            return MonthTotals.of(totals.get(key)).extra_cost_nano

        return spend

    offsets: dict[str, int] = defaultdict(int)  # per org: only the order matters
    for message_id, (org, command) in zip(message_ids, commands, strict=True):
        record = codecs.control.decode(
            codecs.control.encode(
                {
                    "message_id": message_id,
                    "org_id": org,
                    "issued_at": now_ms,
                    "command": command,
                }
            )
        )
        control: ControlMessage = control_from_record(record)
        offsets[org + "/c"] += 1
        step = enforcer.on_control(
            policies[org], control, offsets[org + "/c"], spend_of(org), now_ms
        )
        for event in step.events:
            emitted[event.event_id] = event.record()
    for item in records:
        if item.event is None:
            continue
        try:
            event = validate_usage(codecs.usage.decode(codecs.usage.encode(item.event)), now_ms)
            org = event.org_id
            offsets[org] += 1
            outcome = meter.process(event, offsets[org])
        except RejectedEvent:
            continue
        if outcome.status is Status.DUPLICATE:
            continue
        assert outcome.priced is not None
        step = enforcer.on_usage(policies[org], outcome.priced, offsets[org], spend_of(org), now_ms)
        for emitted_event in step.events:
            emitted[emitted_event.event_id] = emitted_event.record()
    return emitted


def _committed(deployment: Deployment) -> int:
    from jobs.progress import group_position

    settings = deployment.settings
    return group_position(settings, settings.app_id, settings.topic("usage.events")).committed


class Scenario:
    """Records with caps, their ground truth, and the checks every failure test ends with."""

    def __init__(self, events: int, seed: int = 41) -> None:
        self.now_ms = int(time.time() * 1000)
        config = GeneratorConfig(
            events=events,
            orgs=60,
            users=3000,
            seed=seed,
            duplicate_fraction=0.02,
            bad_fraction=0.005,
        )
        self.records = list(generate(config, self.now_ms))
        self.commands = _caps(self.records)
        self.expected = expected_views(self.records, self.now_ms)
        self.reference: dict[str, dict[str, Any]] = {}

    def start(self, deployment: Deployment) -> None:
        """Send the caps, wait until a running worker consumed them, then produce the usage
        (so the order of caps and usage is the reference's order)."""
        from jobs.control import ControlProducer

        control = ControlProducer(deployment.settings)
        message_ids = [control.send(org, command) for org, command in self.commands]
        control.close()
        self.reference = _reference_events(self.records, self.commands, message_ids, self.now_ms)
        wait_for(
            lambda: _control_consumed(deployment), 180, "the worker to consume the cap commands"
        )
        deployment.produce(self.records)

    def verify(self, deployment: Deployment, timeout: float = 1800) -> None:
        """Views equal the oracle; enforcement events equal the reference run. Workers that
        exit asking for a restart (70, 75: fail closed) are restarted, as in production."""
        deployment.wait_processed(timeout=timeout, supervise=True)
        assert_views_match(deployment, self.expected)

        got = list(read_pauses(deployment.settings, follow=False, include_billing=True))
        by_id: dict[str, dict[str, Any]] = {}
        for event in got:
            content = {name: event[name] for name in COMPARED}
            earlier = by_id.setdefault(content["event_id"], content)
            assert earlier == content, f"event id {content['event_id']} repeated, other content"
        want = {
            event_id: {name: e[name] for name in COMPARED} for event_id, e in self.reference.items()
        }
        assert len(want) > 20, "the scenario should pause a fair number of scopes"
        missing = want.keys() - by_id.keys()
        extra = by_id.keys() - want.keys()
        assert not missing and not extra, (sorted(missing)[:5], sorted(extra)[:5])
        assert by_id == want

        # Per scope, in emission order, the first copy of each id: PAUSE and RESUME alternate.
        last_action: dict[tuple, str] = {}
        first_copies: set[str] = set()
        for event in got:
            if event["action"] not in ("PAUSE", "RESUME") or event["event_id"] in first_copies:
                continue
            first_copies.add(event["event_id"])
            scope = (event["org_id"], event["scope"], event["user_id"])
            assert last_action.get(scope) != event["action"], (scope, event["action"])
            last_action[scope] = event["action"]


def _wait_committed(deployment: Deployment, point: float, worker: WorkerProcess) -> None:
    wait_for(
        lambda: _committed(deployment) >= point or worker.process.poll() is not None,
        900,
        f"the worker to pass {point:,.0f} committed events",
        0.1,
    )
    assert worker.process.poll() is None, worker.log()[-3000:]


@pytest.mark.timeout(2400)  # 200k records in CI: generation, oracle and five restarts
def test_sigkill_at_random_points_changes_nothing(deployment: Deployment) -> None:
    rng = random.Random(5)
    scenario = Scenario(EVENTS)
    worker = deployment.start_worker()
    scenario.start(deployment)
    for point in sorted(rng.uniform(0.1, 0.9) * EVENTS for _ in range(KILLS)):
        _wait_committed(deployment, point, worker)
        time.sleep(rng.uniform(0.0, 1.5))  # anywhere between commits and sink flushes
        worker.kill()
        worker = deployment.start_worker()
    scenario.verify(deployment)
    assert worker.terminate() == 0, worker.log()[-3000:]


def test_two_workers_one_killed_mid_stream(deployment: Deployment) -> None:
    """Rebalance: two workers share the partitions, one is SIGKILLed, the other takes over.

    This test found the skipped-records bug of a rebalance (streams/app.py,
    ``seek_fresh_partitions_to_beginning``): a worker that got a never-committed partition
    lost the records Faust dropped while it recovered its tables (the caps, or a whole
    backlog of usage).

    The sink runs as its own process (``metering sink``) so that it outlives either worker.
    """
    events = min(EVENTS, 60_000)
    scenario = Scenario(events, seed=43)
    sink = deployment.start_worker(command="sink")
    first = deployment.start_worker("--no-sink", env={"METERING_WEB_PORT": str(_free_port())})
    second = deployment.start_worker("--no-sink", env={"METERING_WEB_PORT": str(_free_port())})
    scenario.start(deployment)
    _wait_committed(deployment, events * 0.4, first)
    assert second.process.poll() is None, second.log()[-3000:]
    first.kill()
    # Well inside the test's own timeout, so that a stall fails with the lags and the logs.
    scenario.verify(deployment, timeout=420)  # complete and exact although one is gone
    for process in (second, sink):
        assert process.terminate() == 0, process.log()[-3000:]


def test_broker_restart_mid_stream(tmp_path: Path) -> None:
    """Kafka stops (controlled shutdown) and starts again while the worker meters."""
    from jobs.kafka_local import KafkaLocal, default_cache_dir

    port = _free_port()
    kafka = KafkaLocal(
        data_dir=tmp_path / "kafka", bootstrap=f"127.0.0.1:{port}", cache_dir=default_cache_dir()
    )
    kafka.start(timeout=180)
    tag = f"br{port}"
    deployment = Deployment(
        env={
            "METERING_KAFKA_BOOTSTRAP": kafka.bootstrap,
            "METERING_APP_ID": tag,
            "METERING_TOPIC_PREFIX": f"{tag}.",
            "METERING_DATA_DIR": str(tmp_path / "data"),
            "METERING_WEB_PORT": str(_free_port()),
            "METERING_PARTITIONS": "4",
        },
        root=tmp_path,
    )
    try:
        events = min(EVENTS, 40_000)
        scenario = Scenario(events, seed=47)
        worker = deployment.start_worker()
        scenario.start(deployment)
        _wait_committed(deployment, events * 0.3, worker)
        kafka.stop()
        time.sleep(8)
        kafka.start(timeout=180)
        # The worker either rides the outage out or exits with its documented status for a
        # supervisor to restart it (75: a delivery failed, 70: unexpected failure); never 0,
        # never another status, and the restarted worker finishes the job exactly.
        scenario.verify(deployment, timeout=900)
        codes = [w.process.poll() for w in deployment.workers]
        assert all(code in (None, 70, 75) for code in codes), codes
        worker = deployment.workers[-1]
        assert worker.terminate() == 0, worker.log()[-3000:]
    finally:
        deployment.stop_all()
        kafka.stop()


def _control_consumed(deployment: Deployment) -> bool:
    from jobs.progress import group_position

    settings = deployment.settings
    position = group_position(settings, settings.app_id, settings.topic("metering.control"))
    return position.end > 0 and position.lag == 0
