"""Hostile input on the real broker (issue: exact under failure, point 5).

At least 100,000 malformed records (CI; ``METERING_HOSTILE_RECORDS`` for a local run)
interleaved with valid events: random bytes, truncated Avro, unknown schema ids, empty values,
token counts near 2^63, negative and missing counts, empty and very long strings,
far-future timestamps, unknown models, events before every price. The valid events carry
unicode and SQL-looking ids. The worker must never crash, dead-letter every bad record with
its reason, store the SQL-looking ids verbatim and count the valid events exactly.
"""

from __future__ import annotations

import os
import random
import struct
import time
from collections import Counter
from typing import Any

from jobs.producer import UsageProducer
from streams.codec import Codecs
from streams.topics import ensure_topics
from tests.integration.harness import Deployment, wait_for
from tests.integration.test_pipeline import assert_views_match, dead_letters
from tests.oracle import expected_views

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
BAD = int(os.environ.get("METERING_HOSTILE_RECORDS", "100000" if CI else "20000"))
VALID = max(BAD // 5, 2_000)

HOSTILE_IDS = (
    "'; DROP TABLE metering.priced_events_store; --",
    "1 OR 1=1",
    'x"); DELETE FROM metering.org_month WHERE ("1"="1',
    "Robert'); DROP TABLE students;--",
    "用户-é-🙂",
    "\u202eevil",  # right-to-left override
    "tab\there",
    "a" * 256,  # the longest id allowed
)


def _valid(rng: random.Random, index: int, now_ms: int) -> dict[str, Any]:
    hostile = rng.random() < 0.05
    org = rng.choice(HOSTILE_IDS) if hostile else f"org-{rng.randrange(30)}"
    return {
        "event_id": f"{rng.choice(HOSTILE_IDS[:-1])}#{index}" if hostile else f"ev-{index}",
        "occurred_at": now_ms - rng.randrange(20 * 86_400_000),
        "org_id": org,
        "plan": "ENTERPRISE",
        "user_id": rng.choice(HOSTILE_IDS) if hostile else f"u-{rng.randrange(500)}",
        "seat_tier": rng.choice(("STANDARD", "PREMIUM")),
        "product": rng.choice(("CLAUDE", "CLAUDE_CODE")),
        "model": rng.choice(("claude-sonnet-4-0", "claude-3-5-haiku-latest", "claude-opus-4-1")),
        "input_tokens": rng.randrange(20_000),
        "output_tokens": rng.randrange(2_000),
        "cache_creation_input_tokens": rng.randrange(1_000),
        "cache_read_input_tokens": rng.randrange(5_000),
        "extra_usage": rng.random() < 0.5,
    }


def _bad(
    rng: random.Random, kind: int, template: dict[str, Any], codecs: Codecs, now_ms: int
) -> tuple[bytes | dict[str, Any], str]:
    """One malformed record (bytes, or a usage dict the schema can encode) and its reason."""
    event = dict(template, event_id=f"bad-{rng.getrandbits(64):x}")
    body = codecs.usage.encode(event)
    if kind == 0:
        return bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 64))).replace(
            b"\x00", b"\x01", 1
        ), "UNDECODABLE"  # no magic byte
    if kind == 1:
        return body[: rng.randrange(5, len(body))], "UNDECODABLE"  # truncated Avro
    if kind == 2:
        return b"\x00" + struct.pack(">I", rng.choice((0, 99, 2**31 - 1))) + body[5:], (
            "UNKNOWN_SCHEMA"
        )
    if kind == 3:
        return b"", "UNDECODABLE"
    if kind == 4:
        return dict(event, input_tokens=2**63 - 1 - rng.randrange(1000)), "OUT_OF_RANGE"
    if kind == 5:
        return dict(event, output_tokens=-rng.randrange(1, 2**62)), "INVALID_FIELD"
    if kind == 6:
        return dict(event, cache_read_input_tokens=None), "INVALID_FIELD"
    if kind == 7:
        return dict(event, user_id=""), "INVALID_FIELD"
    if kind == 8:
        return dict(event, user_id="x" * rng.randrange(257, 5_000)), "INVALID_FIELD"
    if kind == 9:
        return dict(event, occurred_at=253_402_300_799_000), "FUTURE_TIMESTAMP"  # 9999-12-31
    if kind == 10:
        return dict(event, model="claude-9'; DROP TABLE x;--"), "UNKNOWN_MODEL"
    if kind == 11:
        return dict(event, occurred_at=now_ms - 3 * 365 * 86_400_000), "NO_PRICE"
    return dict(event, event_id="e" * 10_000), "INVALID_FIELD"  # a very long id


def test_hostile_input_is_dead_lettered_and_valid_events_are_exact(
    deployment: Deployment,
) -> None:
    rng = random.Random(29)
    now_ms = int(time.time() * 1000)
    codecs = Codecs.pinned()
    valid: list[dict[str, Any]] = []
    reasons: Counter[str] = Counter()
    ensure_topics(deployment.settings)
    producer = UsageProducer(deployment.settings)
    sent_bad = 0
    for index in range(VALID + BAD):
        if (rng.random() < VALID / (VALID + BAD) and len(valid) < VALID) or sent_bad >= BAD:
            event = _valid(rng, index, now_ms)
            valid.append(event)
            producer.send_event(event)
            continue
        template = valid[-1] if valid else _valid(rng, index, now_ms)
        record, reason = _bad(rng, sent_bad % 13, template, codecs, now_ms)
        key = str(template["org_id"]).encode()
        if isinstance(record, bytes):
            producer.send_raw(key, record)
        else:
            producer.send_raw(key, codecs.usage.encode(record))
        reasons[reason] += 1
        sent_bad += 1
    producer.close()
    assert sent_bad >= BAD and len(valid) >= VALID // 2

    worker = deployment.start_worker()
    deployment.wait_processed(timeout=1800)
    assert worker.process.poll() is None, worker.log()[-3000:]
    assert deployment.restarts == 0
    assert "CRITICAL" not in worker.log()

    # Metrics: the worker reports its lag per source partition and its table recovery.
    assert deployment.metric("metering_table_recovery_seconds_count") >= 1

    def lags() -> list[float]:
        return list(deployment.metrics("metering_consumer_lag{").values())

    wait_for(lambda: lags() and not any(lags()), 30, "the consumer lag gauges to read 0")
    assert len(lags()) == 2 * deployment.settings.partitions  # usage and control partitions

    expected = expected_views(valid, now_ms)
    assert expected.dead_letters == Counter()
    assert_views_match(deployment, expected)
    for reason, count in reasons.items():
        assert deployment.metric("metering_dead_letters_total", f'reason="{reason}"') == count
    letters = dead_letters(deployment, sum(reasons.values()))
    assert Counter(r["reason"] for r in letters) == reasons
    assert all(r["detail"] for r in letters), "every dead letter names its reason in words"

    stored = {
        (row["org_id"], row["event_id"], row["user_id"]) for row in deployment.view("priced_events")
    }
    hostile = {
        (e["org_id"], e["event_id"], e["user_id"])
        for e in valid
        if {e["org_id"], e["user_id"]} & set(HOSTILE_IDS) or "#" in e["event_id"]
    }
    assert hostile and hostile <= stored, "hostile ids are stored verbatim"
    assert worker.terminate() == 0, worker.log()[-3000:]
