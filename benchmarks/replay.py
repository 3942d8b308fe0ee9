"""Replay throughput (issue: replay after a price-table fix; goal 100k events/s).

Run: ``.venv/bin/python -m benchmarks.replay [--events 200000] [--apply-events 20000]``

It starts its own Kafka broker and measures, in one run:

1. **Baseline**: a plain confluent-kafka consumer that reads and decodes the priced ledger
   (``metering.priced``), nothing else: the ceiling of any replay on this machine.
2. **Replay scan and plan** (``metering replay --dry-run`` without the CLI): read the ledger
   seeked by time, keep the latest revision per event, re-price every event in range with the
   corrected table, build the per-org diff. The ledger is produced directly (``--events``
   priced records, 20 orgs, half of them Haiku/Opus 4.1 after the fix), so this figure does
   not wait for a worker to meter them first.
3. **Corrections applied by a live worker**: a worker meters ``--apply-events`` usage events
   with the shipped table, restarts with the corrected one, and a real replay sends its
   corrections; the figure is corrections applied per second, from the first message sent to
   the worker's commit past the last one.

Prints events/s of each and the ratios to the baseline.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import REPO, BenchDeployment, decode_rate, spawn_worker, start_deployment

MODELS = (
    "claude-3-5-haiku-20241022",
    "claude-opus-4-1",
    "claude-sonnet-4-20250514",
    "claude-3-7-sonnet-latest",
)


def _events(count: int, seed: int = 7) -> list[dict[str, Any]]:
    from core.periods import iso_to_ms

    rng = random.Random(seed)
    start, end = iso_to_ms("2026-09-01T00:00:00Z"), iso_to_ms("2026-11-28T00:00:00Z")
    out = []
    for index in range(count):
        org = f"org-{rng.randrange(20)}"
        out.append(
            {
                "event_id": f"ev-{index}",
                "occurred_at": rng.randrange(start, end),
                "org_id": org,
                "plan": "ENTERPRISE",
                "user_id": f"{org}-u{rng.randrange(50)}",
                "seat_tier": rng.choice(("STANDARD", "PREMIUM")),
                "product": "CLAUDE",
                "model": rng.choice(MODELS),
                "input_tokens": rng.randrange(50_000),
                "output_tokens": rng.randrange(4_000),
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": rng.randrange(10_000),
                "extra_usage": rng.random() < 0.5,
            }
        )
    return out


def produce_ledger(deployment: BenchDeployment, events: list[dict[str, Any]]) -> None:
    """Priced records as the worker writes them, priced with the shipped table."""
    from confluent_kafka import Producer

    from core.pricing import PriceTable, default_price_table_path
    from core.usage import PricedEvent
    from core.validation import validate_usage
    from streams.codec import Codecs, priced_to_record
    from streams.kafka_config import quiet_client_config
    from streams.topics import PRICED, partition_for

    settings = deployment.settings
    codecs = Codecs.from_settings(settings)
    prices = PriceTable.load(default_price_table_path())
    producer = Producer({**quiet_client_config(settings), "linger.ms": 50})
    topic = settings.topic(PRICED)
    now_ms = int(time.time() * 1000)
    for offset, raw in enumerate(events):
        event = validate_usage(raw, now_ms)
        priced = PricedEvent(event, prices.price(event.model, event.usage, event.occurred_at_ms))
        partition = partition_for(event.org_id, settings.partitions)
        value = codecs.priced.encode_trusted(priced_to_record(priced, partition, offset))
        while True:
            try:
                producer.produce(topic, value, event.org_id.encode(), partition=partition)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    producer.flush(60)


def baseline(deployment: BenchDeployment, count: int) -> float:
    """Records/s of a consumer that only decodes the ledger."""
    from streams.topics import PRICED

    return decode_rate(deployment.settings, PRICED, "priced", count)


def scan_and_plan(deployment: BenchDeployment, fixed: Path) -> tuple[float, int, int]:
    """(events/s, records read, corrections) of a dry-run replay of the whole ledger."""
    from core.periods import iso_to_ms
    from core.pricing import PriceTable
    from jobs.replay import run_replay

    started = time.perf_counter()
    result = run_replay(
        deployment.settings,
        iso_to_ms("2026-10-01T00:00:00Z"),
        None,
        dry_run=True,
        prices=PriceTable.load(fixed),
        margin_ms=10**13,  # the synthetic ledger was written now: read all of it
    )
    elapsed = time.perf_counter() - started
    return result.scanned / elapsed, result.scanned, len(result.plan.corrections)


def apply_by_worker(count: int, fixed: Path) -> tuple[float, int]:
    """(corrections/s, corrections) applied by a live worker after a real replay."""
    from jobs.producer import UsageProducer
    from jobs.progress import group_position
    from streams.topics import USAGE

    deployment = start_deployment(partitions=4)
    try:
        settings = deployment.settings
        producer = UsageProducer(settings)
        for event in _events(count, seed=11):
            producer.send_event(event)
        producer.close()

        first = spawn_worker(deployment)
        while group_position(settings, settings.app_id, settings.topic(USAGE)).lag > 0 or (
            group_position(settings, settings.app_id, settings.topic(USAGE)).end == 0
        ):
            time.sleep(1)
        first.terminate()
        first.wait(120)
        second = spawn_worker(deployment, env={"METERING_PRICE_TABLE": str(fixed)})
        try:
            started = time.perf_counter()
            result = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "jobs.cli",
                    "replay",
                    "--since",
                    "2026-10-01T00:00:00Z",
                    "--json",
                ],
                env={**deployment.process_env, "METERING_PRICE_TABLE": str(fixed)},
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=3600,
            )
            elapsed = time.perf_counter() - started
            if result.returncode != 0:
                raise SystemExit(f"replay failed: {result.stderr[-2000:]}")
        finally:
            second.terminate()
            second.wait(120)
        corrected = int(json.loads(result.stdout)["events_applied"])
        return corrected / elapsed, corrected
    finally:
        deployment.kafka.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000, help="priced records in the ledger")
    parser.add_argument(
        "--apply-events",
        type=int,
        default=20_000,
        help="events a live worker meters, then corrects",
    )
    args = parser.parse_args()
    from tests.price_fix import corrected_table

    fixed = corrected_table(Path(tempfile.mkdtemp(prefix="metering-bench-prices-")))
    deployment = start_deployment(partitions=4)
    try:
        produce_ledger(deployment, _events(args.events))
        base = baseline(deployment, args.events)
        rate, scanned, corrections = scan_and_plan(deployment, fixed)
    finally:
        deployment.kafka.stop()
    applied_rate, applied = (
        apply_by_worker(args.apply_events, fixed) if args.apply_events else (0.0, 0)
    )
    print(f"{'measurement':<52} {'events/s':>12} {'vs baseline':>12}")
    print(f"{'(a) baseline: read + decode the priced ledger':<52} {base:>12,.0f} {1:>12.2f}")
    print(
        f"{'(b) replay scan + plan (dry run), ' + format(scanned, ',') + ' records':<52} "
        f"{rate:>12,.0f} {rate / base:>12.2f}"
    )
    print(f"    {corrections:,} corrections planned")
    if applied:
        print(
            f"{'(c) corrections applied by a live worker, ' + format(applied, ','):<52} "
            f"{applied_rate:>12,.0f} {applied_rate / base:>12.2f}"
        )
    print("goal: 100,000 events/s")


if __name__ == "__main__":
    main()
