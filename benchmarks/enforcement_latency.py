"""Usage-event-to-pause-event latency under a steady background load (issue: enforcement).

Run: ``.venv/bin/python -m benchmarks.enforcement_latency [--rate 500] [--seconds 60]``

It starts its own Kafka broker (the project's jars, free ports, a temporary data dir) and a
real worker process (``metering worker --no-sink``), produces background usage at ``--rate``
events/s, and every ``--probe-interval`` seconds produces one *probe*: the first event of a
new member of an Enterprise org whose PREMIUM seat-tier cap is $0.000001, so the probe must
cause exactly one PAUSE. Latency = time the PAUSE is read from ``metering.pauses`` minus the
time the probe was handed to the producer. The same run measures a **baseline**: the time for
a message to go producer -> broker -> consumer with no worker in between, so the figures can be
compared across machines as a ratio. Prints p50/p90/p99/max of both and the achieved
background rate (the worker must keep up, or latency only measures its backlog).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

from benchmarks.harness import REPO, start_deployment


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _summary(name: str, seconds: list[float]) -> str:
    ms = [s * 1000 for s in seconds]
    if not ms:
        return f"{name:<28} no samples"
    return (
        f"{name:<28} n={len(ms):<5} p50={_percentile(ms, 0.5):8.1f} ms  "
        f"p90={_percentile(ms, 0.9):8.1f} ms  p99={_percentile(ms, 0.99):8.1f} ms  "
        f"max={max(ms):8.1f} ms  mean={statistics.fmean(ms):8.1f} ms"
    )


def _usage(org: str, user: str, tier: str, plan: str, now_ms: int) -> dict[str, Any]:
    return {
        "event_id": uuid.uuid4().hex,
        "occurred_at": now_ms,
        "org_id": org,
        "plan": plan,
        "user_id": user,
        "seat_tier": tier,
        "product": "CLAUDE",
        "model": "claude-sonnet-4-20250514",
        "input_tokens": 2000,
        "output_tokens": 300,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 4000,
        "extra_usage": True,
    }


def baseline(settings: Any, samples: int) -> list[float]:
    """Producer -> broker -> consumer latency of one small message, no worker involved."""
    from confluent_kafka import Consumer, Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    topic = settings.topic("bench.baseline")
    admin = AdminClient(settings.kafka_client_config())
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)
    producer = Producer({**settings.kafka_client_config(), "linger.ms": 0, "acks": "all"})
    consumer = Consumer(
        {
            **settings.kafka_client_config(),
            "group.id": uuid.uuid4().hex,
            "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": 10,
        }
    )
    consumer.subscribe([topic])
    while not consumer.assignment():
        consumer.poll(0.1)
    results = []
    for _ in range(samples):
        sent = time.perf_counter()
        producer.produce(topic, b"x")
        producer.poll(0)
        deadline = sent + 10
        while time.perf_counter() < deadline:
            message = consumer.poll(0.5)
            if message is not None and not message.error():
                results.append(time.perf_counter() - sent)
                break
        time.sleep(0.02)
    consumer.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=300.0, help="background events/s")
    parser.add_argument("--seconds", type=float, default=60.0, help="measurement duration")
    parser.add_argument("--probe-interval", type=float, default=0.5)
    parser.add_argument("--partitions", type=int, default=4)
    args = parser.parse_args()

    from jobs.control import ControlProducer
    from jobs.producer import UsageProducer
    from streams.codec import Codecs
    from streams.topics import PAUSES

    deployment = start_deployment(args.partitions)
    workdir, kafka, settings = deployment.workdir, deployment.kafka, deployment.settings
    env = deployment.process_env
    log = (workdir / "worker.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "worker", "--no-sink"],
        env=env,
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        base = baseline(settings, 200)
        control = ControlProducer(settings)
        probe_org = "bench-probe-org"
        control.send(
            probe_org,
            (
                "SetCap",
                {
                    "scope": "SEAT_TIER",
                    "user_id": None,
                    "seat_tier": "PREMIUM",
                    "limit_nano_usd": 1000,
                },
            ),
        )
        codecs = Codecs.from_settings(settings)
        from confluent_kafka import Consumer

        consumer = Consumer(
            {
                **settings.kafka_client_config(),
                "group.id": uuid.uuid4().hex,
                "auto.offset.reset": "earliest",
                "fetch.wait.max.ms": 10,
            }
        )
        consumer.subscribe([settings.topic(PAUSES)])
        sent_at: dict[str, float] = {}
        latencies: list[float] = []
        stop = threading.Event()
        produced = [0]

        def background() -> None:
            producer = UsageProducer(settings)
            started = time.perf_counter()
            index = 0
            while not stop.is_set():
                now_ms = int(time.time() * 1000)
                org = f"bench-org-{index % 200}"
                producer.send_event(_usage(org, f"u{index % 5000}", "STANDARD", "TEAM", now_ms))
                index += 1
                produced[0] = index
                ahead = index / args.rate - (time.perf_counter() - started)
                if ahead > 0:
                    time.sleep(ahead)
            producer.close()

        def probes() -> None:
            producer = UsageProducer(settings)
            while not stop.is_set():
                event = _usage(
                    probe_org,
                    f"probe-{uuid.uuid4().hex[:8]}",
                    "PREMIUM",
                    "ENTERPRISE",
                    int(time.time() * 1000),
                )
                sent_at[f"usage:{event['event_id']}"] = time.perf_counter()
                producer.send_event(event)
                producer._producer.flush(5)
                stop.wait(args.probe_interval)
            producer.close()

        print(f"warming up: background load at {args.rate:,.0f} events/s ...", flush=True)
        threads = [threading.Thread(target=background), threading.Thread(target=probes)]
        for thread in threads:
            thread.start()
        deadline = time.perf_counter() + args.seconds + 10
        measure_from = time.perf_counter() + 10  # ignore the first 10 s (worker warm-up)
        while time.perf_counter() < deadline:
            message = consumer.poll(0.2)
            if message is None or message.error():
                continue
            received = time.perf_counter()
            record = codecs.pause.decode(message.value())
            sent = sent_at.get(record["trigger_id"])
            if sent is not None and sent >= measure_from and record["action"] == "PAUSE":
                latencies.append(received - sent)
        stop.set()
        for thread in threads:
            thread.join()
        consumer.close()
        achieved = produced[0] / (args.seconds + 10)
        print()
        print(
            f"machine: {os.cpu_count()} cores; partitions {args.partitions}; "
            f"background target {args.rate:,.0f}/s, achieved {achieved:,.0f}/s"
        )
        print(_summary("baseline (Kafka round trip)", base))
        print(_summary("usage -> PAUSE", latencies))
        if base and latencies:
            ratio = _percentile(latencies, 0.99) / _percentile(base, 0.99)
            print(
                f"p99 ratio usage->PAUSE / baseline: {ratio:,.1f}x; goal: p99 < 500 ms "
                "at 20,000 events/s"
            )
        probes = sum(1 for t in sent_at.values() if t >= measure_from)
        print(f"probes sent after warm-up: {probes}, their PAUSEs seen: {len(latencies)}")
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            worker.kill()
        kafka.stop()


if __name__ == "__main__":
    main()
