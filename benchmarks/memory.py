"""Worker memory with many distinct users in state (issue #6: RSS with 1M users).

Run: ``.venv/bin/python -m benchmarks.memory [--users 1000000]``

Produces one event per distinct user (``--users`` events over 2,000 orgs), runs one
``metering worker --no-sink`` until it has committed them all, and prints its resident
memory (current and peak), the size of its RocksDB state on disk and the keys it holds:
per event a dedupe record, and per user a monthly user total (plus the org and tier totals
and the org's policy with its member map).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import time
from pathlib import Path

from benchmarks.harness import process_memory_mb, spawn_worker, start_deployment


def _du_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--partitions", type=int, default=4)
    args = parser.parse_args()

    from jobs.generate import GeneratorConfig, generate
    from jobs.producer import UsageProducer
    from jobs.progress import group_position
    from streams.topics import USAGE

    deployment = start_deployment(args.partitions)
    settings = deployment.settings
    worker = None
    try:
        producer = UsageProducer(settings)
        config = GeneratorConfig(
            events=args.users,
            orgs=2000,
            users=args.users,
            bad_fraction=0.0,
            duplicate_fraction=0.0,
        )
        users: set[str] = set()
        for index, item in enumerate(generate(config, int(time.time() * 1000))):
            assert item.event is not None
            # The generator draws members at random (1M draws hit ~490k of them): suffix
            # the index so every event is a member of its own and the count is exact.
            item.event["user_id"] = f"{item.event['user_id']}-{index}"
            users.add(f"{item.event['org_id']}/{item.event['user_id']}")
            producer.send_event(item.event)
        producer.close()
        del producer  # its client would log reconnect attempts once the broker stops
        print(f"produced {args.users:,} events of {len(users):,} distinct users", flush=True)
        started = time.perf_counter()
        worker = spawn_worker(deployment)
        while group_position(settings, settings.app_id, settings.topic(USAGE)).committed < (
            args.users
        ):
            if worker.poll() is not None:
                raise SystemExit(f"worker exited {worker.returncode}; see {deployment.workdir}")
            time.sleep(1.0)
        elapsed = time.perf_counter() - started
        memory = process_memory_mb(worker.pid)
        state = _du_mb(settings.data_path / "worker")
        print(
            f"{len(users):,} users in state after {elapsed:,.0f}s: worker RSS "
            f"{memory['VmRSS']:,.0f} MB (peak {memory['VmHWM']:,.0f} MB), "
            f"RocksDB on disk {state:,.0f} MB"
        )
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(120)
            except subprocess.TimeoutExpired:
                worker.kill()
        deployment.kafka.stop()


if __name__ == "__main__":
    main()
