"""The pipeline end to end on a real broker and real chDB, checked against an independent oracle.

The oracle (``tests/oracle.py``) re-implements the SPEC pricing and totals without importing
the product's code; every ClickHouse view must equal it exactly, the bad records must be in
the dead-letter topic with the right reasons, and a worker stopped with SIGTERM mid-stream
and restarted must end with the same totals.
"""

from __future__ import annotations

import time
from collections import Counter
from decimal import Decimal
from typing import Any

import pytest

from jobs.generate import Generated, GeneratorConfig, generate
from tests.integration.harness import Deployment, wait_for
from tests.oracle import Expected, expected_views

pytestmark = pytest.mark.integration

MEASURES = (
    "events",
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "cost_usd",
    "extra_cost_usd",
)


def _records(events: int, seed: int) -> tuple[list[Generated], int]:
    now_ms = int(time.time() * 1000)
    config = GeneratorConfig(
        events=events, orgs=12, users=150, seed=seed, duplicate_fraction=0.03, bad_fraction=0.02
    )
    return list(generate(config, now_ms)), now_ms


def _view(deployment: Deployment, name: str, keys: tuple[str, ...]) -> dict[tuple, dict]:
    rows = deployment.view(name)
    table: dict[tuple, dict] = {}
    for row in rows:
        key = tuple(row[k] for k in keys)
        assert key not in table, f"{name}: two rows for {key}"
        table[key] = row
    return table


def _as_naive_utc(value: Any) -> Any:
    return value.replace(tzinfo=None) if hasattr(value, "tzinfo") and value.tzinfo else value


def assert_views_match(deployment: Deployment, expected: Expected) -> None:
    priced = _view(deployment, "priced_events", ("org_id", "event_id"))
    assert priced.keys() == expected.priced_events.keys()
    for key, want in expected.priced_events.items():
        got = priced[key]
        assert got["cost_usd"] == want["cost_usd"], key
        assert isinstance(got["cost_usd"], Decimal)
        assert got["model_family"] == want["model_family"], key
        assert got["long_context"] == want["long_context"], key
        assert got["extra_usage"] == want["extra_usage"], key
        assert _as_naive_utc(got["occurred_at"]) == _as_naive_utc(want["occurred_at"]), key
        assert got["pricing_version"] == "2025-01-01"
    for name, keys, want_rows in (
        ("org_month", ("month", "org_id"), expected.org_month),
        ("tier_month", ("month", "org_id", "seat_tier"), expected.tier_month),
        ("user_month", ("month", "org_id", "user_id"), expected.user_month),
        ("usage_hourly", ("hour", "org_id", "user_id", "model_family"), expected.usage_hourly),
    ):
        got_rows = _view(deployment, name, keys)
        got = {tuple(_as_naive_utc(k) for k in key): row for key, row in got_rows.items()}
        want = {tuple(_as_naive_utc(k) for k in key): row for key, row in want_rows.items()}
        assert got.keys() == want.keys(), name
        for key, want_row in want.items():
            assert {m: got[key][m] for m in MEASURES} == {m: want_row[m] for m in MEASURES}, (
                name,
                key,
            )


def dead_letters(deployment: Deployment, expected_count: int) -> list[dict[str, Any]]:
    """Read the dead-letter topic from the beginning until ``expected_count`` records."""
    from confluent_kafka import Consumer

    from streams.codec import Codecs
    from streams.topics import DEAD_LETTER

    settings = deployment.settings
    codecs = Codecs.from_settings(settings)
    consumer = Consumer(
        {
            **settings.kafka_client_config(),
            "group.id": f"{settings.app_id}.t",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([settings.topic(DEAD_LETTER)])
    records: list[dict[str, Any]] = []
    deadline = time.monotonic() + 60
    try:
        while len(records) < expected_count and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None or message.error():
                continue
            records.append(codecs.dead_letter.decode(message.value()))
        # Anything beyond the expected count would be a spurious dead letter.
        extra = consumer.poll(2.0)
        if extra is not None and not extra.error():
            records.append(codecs.dead_letter.decode(extra.value()))
    finally:
        consumer.close()
    return records


def test_worker_meters_generated_load_exactly(deployment: Deployment) -> None:
    records, now_ms = _records(3000, seed=7)
    expected = expected_views(records, now_ms)
    assert expected.duplicates > 0 and sum(expected.dead_letters.values()) > 0
    deployment.produce(records)
    worker = deployment.start_worker()
    deployment.wait_processed(timeout=300)

    assert_views_match(deployment, expected)

    assert deployment.metric("metering_duplicates_skipped_total") == expected.duplicates
    for reason, count in expected.dead_letters.items():
        assert deployment.metric("metering_dead_letters_total", f'reason="{reason}"') == count

    letters = dead_letters(deployment, sum(expected.dead_letters.values()))
    assert Counter(r["reason"] for r in letters) == expected.dead_letters
    for letter in letters:
        assert letter["source_topic"] == deployment.settings.topic("usage.events")
        assert letter["source_offset"] >= 0 and letter["detail"]
        assert len(letter["original_sha256"]) == 64

    assert_invoice_matches(deployment, expected)
    assert worker.terminate() == 0, worker.log()[-3000:]


def assert_invoice_matches(deployment: Deployment, expected: Expected) -> None:
    """The Enterprise statement equals the extra-usage line items to the nano-USD."""
    import json

    extra: dict[tuple[str, str], dict[str, Decimal]] = {}
    for row in expected.priced_events.values():
        if row["plan"] == "ENTERPRISE" and row["extra_usage"]:
            month = row["occurred_at"].strftime("%Y-%m")
            members = extra.setdefault((row["org_id"], month), {})
            members[row["user_id"]] = members.get(row["user_id"], Decimal(0)) + row["cost_usd"]
    org, month = max(extra, key=lambda k: sum(extra[k].values()))
    result = deployment.metering("invoice", "--org", org, "--month", month, "--format", "json")
    assert result.returncode == 0, result.stderr
    statement = json.loads(result.stdout)
    assert Decimal(statement["total"]["extra_cost_usd"]) == sum(extra[(org, month)].values())
    assert {m["user_id"]: Decimal(m["extra_cost_usd"]) for m in statement["members"]} == {
        user: cost for user, cost in extra[(org, month)].items()
    }
    by_model = sum(Decimal(m["extra_cost_usd"]) for m in statement["models"])
    assert by_model == Decimal(statement["total"]["extra_cost_usd"])
    csv = deployment.metering("invoice", "--org", org, "--month", month)
    assert csv.returncode == 0 and csv.stdout.count("\n") == 2 + len(statement["members"]) + len(
        statement["models"]
    ), csv.stdout


def test_events_keyed_to_the_wrong_partition_are_rerouted_not_lost(
    deployment: Deployment,
) -> None:
    from jobs.producer import UsageProducer
    from streams.topics import ensure_topics, partition_for

    records, now_ms = _records(400, seed=11)
    events = [r for r in records if r.kind == "event"]
    settings = deployment.settings
    ensure_topics(settings)
    producer = UsageProducer(settings)
    for item in events:
        assert item.event is not None
        home = partition_for(item.event["org_id"], settings.partitions)
        producer.send_raw(
            b"wrong-key",
            producer.codecs.usage.encode(item.event),
            partition=(home + 1) % settings.partitions,
        )
    producer.close()
    worker = deployment.start_worker()
    deployment.wait_processed(timeout=300)
    assert_views_match(deployment, expected_views(events, now_ms))
    assert deployment.metric("metering_rerouted_total") == len(events)
    assert deployment.metric("metering_events_priced_total") == len(
        {(e.event["org_id"], e.event["event_id"]) for e in events if e.event}
    )
    assert worker.terminate() == 0


def test_sigterm_mid_stream_and_restart_gives_the_same_totals(deployment: Deployment) -> None:
    records, now_ms = _records(6000, seed=23)
    expected = expected_views(records, now_ms)
    half = len(records) // 2
    deployment.produce(records[:half])
    first = deployment.start_worker()

    def some_progress() -> bool:
        from jobs.progress import group_position

        settings = deployment.settings
        position = group_position(settings, settings.app_id, settings.topic("usage.events"))
        return position.committed > 0

    wait_for(some_progress, 180, "the first worker to commit something")
    deployment.produce(records[half:])
    assert first.terminate() == 0, first.log()[-3000:]

    second = deployment.start_worker()
    deployment.wait_processed(timeout=300)
    assert_views_match(deployment, expected)
    assert second.terminate() == 0, second.log()[-3000:]
