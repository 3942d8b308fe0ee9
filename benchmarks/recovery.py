"""Recovery time with 1M keys in the worker's state (issue: exact under failure; goal < 15 s).

Run: ``.venv/bin/python -m benchmarks.recovery [--keys 1000000]``

It starts its own Kafka broker and writes ``--keys`` dedupe records (the ``seen`` table, one
per billed event, the largest table by far) to the worker's changelog exactly as the worker
writes them, spread over 1,000 orgs and the partitions. Then:

1. **Cold start**: a worker with an empty data dir recovers every key from the changelog.
2. **After a SIGKILL**: the worker is killed and started again on the same data dir; it
   reads only what its local RocksDB does not have yet.

For each it prints the table recovery time the worker reports
(``metering_table_recovery_seconds``: Faust's recovery, from the assignment to the stream
being ready) and the wall time from starting the process to that point: Python start-up,
topic checks, the bulk restore of the tables (``streams.restore``, before the group join)
and the group join included. A baseline in the same run: the time a plain consumer takes to
read the same changelog.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import time
import uuid

import httpx
import orjson

from benchmarks.harness import BenchDeployment, spawn_worker, start_deployment


def write_changelog(deployment: BenchDeployment, keys: int) -> str:
    """``keys`` dedupe records on the ``seen`` changelog; returns the topic."""
    from confluent_kafka import Producer

    from core.metering import seen_key
    from streams.kafka_config import quiet_client_config
    from streams.topics import changelog_topic, partition_for

    settings = deployment.settings
    topic = changelog_topic(settings, "seen")
    producer = Producer(
        {**quiet_client_config(settings), "linger.ms": 50, "compression.type": "lz4"}
    )
    partitions = [partition_for(f"org-{n}", settings.partitions) for n in range(1000)]
    for index in range(keys):
        org = index % 1000
        key = seen_key(f"org-{org}", f"ev-{index}").encode()
        value = orjson.dumps([index, 1_790_000_000_000, "sonnet-4", "2025-01-01", 0, 12_345])
        while True:
            try:
                producer.produce(topic, value, key, partition=partitions[org])
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    producer.flush(120)
    return topic


def read_baseline(deployment: BenchDeployment, topic: str, keys: int) -> float:
    """Seconds for a plain consumer to read the whole changelog."""
    from confluent_kafka import Consumer

    from streams.kafka_config import quiet_client_config

    consumer = Consumer(
        {
            **quiet_client_config(deployment.settings),
            "group.id": uuid.uuid4().hex,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    seen, started = 0, time.perf_counter()
    while seen < keys:
        seen += sum(1 for m in consumer.consume(10_000, 1.0) if not m.error())
    elapsed = time.perf_counter() - started
    consumer.close()
    return elapsed


def _recovery(port: str) -> tuple[float, float] | None:
    """(count, sum) of ``metering_table_recovery_seconds`` on the worker, None if not up."""
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except httpx.HTTPError:
        return None
    values = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name in ("metering_table_recovery_seconds_count", "metering_table_recovery_seconds_sum"):
            values[name] = float(value)
    if not values.get("metering_table_recovery_seconds_count"):
        return None
    return values["metering_table_recovery_seconds_count"], values[
        "metering_table_recovery_seconds_sum"
    ]


def start_worker(deployment: BenchDeployment) -> tuple[subprocess.Popen[bytes], float, float]:
    """Start a worker; returns it, its reported recovery seconds and the wall seconds."""
    port = deployment.env_settings["METERING_WEB_PORT"]
    started = time.perf_counter()
    process = spawn_worker(deployment)
    while True:
        if process.poll() is not None:
            raise SystemExit(f"the worker exited {process.returncode}; see {deployment.workdir}")
        reported = _recovery(port)
        if reported is not None:
            wall = time.perf_counter() - started
            return process, reported[1] / reported[0], wall
        time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=1_000_000, help="dedupe records in state")
    args = parser.parse_args()
    deployment = start_deployment(partitions=4)
    try:
        topic = write_changelog(deployment, args.keys)
        baseline = read_baseline(deployment, topic, args.keys)
        worker, cold, cold_wall = start_worker(deployment)
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
        worker, warm, warm_wall = start_worker(deployment)
        worker.terminate()
        worker.wait(120)
    finally:
        deployment.kafka.stop()
    print(f"{args.keys:,} keys in the seen table, {deployment.settings.partitions} partitions")
    print(f"{'measurement':<46} {'recovery s':>11} {'wall s':>8}")
    print(f"{'(a) baseline: a consumer reads the changelog':<46} {baseline:>11.2f}")
    print(f"{'(b) cold start: empty data dir':<46} {cold:>11.2f} {cold_wall:>8.2f}")
    print(f"{'(c) restart after SIGKILL':<46} {warm:>11.2f} {warm_wall:>8.2f}")
    print("goal: under 15 s after a SIGKILL")


if __name__ == "__main__":
    main()
