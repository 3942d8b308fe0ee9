"""The throughput benchmark: one command, one table, everything measured in one run.

Run: ``make bench`` or ``.venv/bin/python -m benchmarks.run [--events 30000]``

One Kafka broker (free ports, temporary data dir) and one set of pre-produced events (a
realistic mix, no bad records; ORG caps of $1 on a tenth of the orgs so PAUSE events are
emitted), then, in order:

a. **ceiling** — a raw confluent-kafka consumer that only reads and Avro-decodes the events;
b. **pipeline** — one ``metering worker`` and one ``metering sink`` process (the ClickHouse
   sink, chDB), from the worker's first commit until it has committed every event *and* the
   sink has committed every priced event it flushed (start-up is reported apart, excluded);
   (b') the same with the sink inside the worker process (one process, one GIL);
c. **Quix Streams** — ``benchmarks/quix`` (same decode, pricing and monthly totals, rows to
   the same ClickHouse tables), when its virtualenv exists (``make quix-venv``);
d. the ratios b/a and b/c;

then **scale-out**: one and two worker processes without the sink (each run a fresh
consumer group and fresh tables over the same events), and the resident memory (RSS) of the
workers with the number of distinct users they hold in state.

Machine noise is large on a shared 2-core box: compare ratios within one run, not figures
across runs. Numbers and their analysis live in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

from benchmarks.harness import (
    REPO,
    BenchDeployment,
    ceiling,
    free_port,
    process_memory_mb,
    start_deployment,
)

QUIX_PYTHON = REPO / ".venv-quix" / "bin" / "python"


@dataclass
class WorkerRun:
    label: str
    events: int
    startup_s: float
    seconds: float
    rate: float
    rss_mb: list[float]
    pauses: int = 0


def _end_offsets(settings: Any, topic: str) -> int:
    from jobs.progress import group_position

    return group_position(settings, uuid.uuid4().hex, topic).end


def run_workers(
    deployment: BenchDeployment,
    label: str,
    events: int,
    workers: int,
    sink: bool,
    sink_process: bool = False,
) -> WorkerRun:
    """Start ``workers`` worker processes of a fresh app id (with the in-process sink when
    ``sink``, or a standalone ``metering sink`` process when ``sink_process``); measure until
    every event and, with a sink, every priced event is committed."""
    from jobs.progress import group_position
    from streams.topics import PAUSES, PRICED, USAGE, ensure_topics

    app_id = f"bench-{uuid.uuid4().hex[:8]}"
    settings = deployment.settings.model_copy(update={"app_id": app_id})
    ensure_topics(settings)
    pauses_before = _end_offsets(settings, settings.topic(PAUSES))
    priced_before = _end_offsets(settings, settings.topic(PRICED))
    processes = []
    launched = time.perf_counter()
    for index in range(workers):
        env = {
            **deployment.process_env,
            "METERING_APP_ID": app_id,
            "METERING_WEB_PORT": str(free_port()),
        }
        command = [sys.executable, "-m", "jobs.cli", "worker"]
        if not sink or sink_process:
            command.append("--no-sink")
        log = (deployment.workdir / f"{app_id}-{index}.log").open("wb")
        processes.append(
            subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        )
    if sink_process:
        env = {
            **deployment.process_env,
            "METERING_APP_ID": app_id,
            "METERING_WEB_PORT": str(free_port()),
        }
        log = (deployment.workdir / f"{app_id}-sink.log").open("wb")
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "jobs.cli", "sink"],
                env=env,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    usage = settings.topic(USAGE)
    first: tuple[float, int] | None = None
    try:
        while True:
            position = group_position(settings, app_id, usage)
            now = time.perf_counter()
            if first is None and position.committed > 0:
                first = (now, position.committed)
            done = position.committed >= events
            if done and (sink or sink_process):
                priced = group_position(settings, f"{app_id}.sink", settings.topic(PRICED))
                done = priced.committed - priced_before >= priced.end - priced_before > 0
            if done:
                break
            for process in processes:
                if process.poll() is not None:
                    raise SystemExit(
                        f"worker exited {process.returncode}; logs in {deployment.workdir}"
                    )
            time.sleep(0.2)
        rss = [process_memory_mb(process.pid)["VmRSS"] for process in processes]
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
    assert first is not None
    seconds = max(now - first[0], 1e-9)
    return WorkerRun(
        label=label,
        events=events - first[1],
        startup_s=first[0] - launched,
        seconds=seconds,
        rate=(events - first[1]) / seconds,
        rss_mb=rss,
        pauses=_end_offsets(settings, settings.topic(PAUSES)) - pauses_before,
    )


def run_quix(deployment: BenchDeployment, events: int) -> dict[str, Any] | None:
    """The Quix Streams application of ``benchmarks/quix`` in its own virtualenv."""
    if not QUIX_PYTHON.exists():
        return None
    env = {**deployment.process_env, "METERING_APP_ID": f"bench-quix-{uuid.uuid4().hex[:6]}"}
    log = deployment.workdir / "quix.log"
    with log.open("wb") as stderr:
        result = subprocess.run(
            [str(QUIX_PYTHON), "-m", "benchmarks.quix.app", "--events", str(events)],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=stderr,
            timeout=3600,
            check=False,
        )
    lines = [line for line in result.stdout.decode().splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        raise SystemExit(f"the Quix app failed ({result.returncode}); see {log}")
    return json.loads(lines[-1])


def produce(deployment: BenchDeployment, events: int, users: int) -> int:
    """Pre-produce the events and $1 ORG caps on every tenth org; distinct users returned."""
    from jobs.control import ControlProducer
    from jobs.generate import GeneratorConfig, generate
    from jobs.producer import UsageProducer

    config = GeneratorConfig(
        events=events, orgs=200, users=users, bad_fraction=0.0, duplicate_fraction=0.0
    )
    producer = UsageProducer(deployment.settings)
    orgs: set[str] = set()
    members: set[tuple[str, str]] = set()
    for item in generate(config, int(time.time() * 1000)):
        event = item.event
        assert event is not None
        orgs.add(str(event["org_id"]))
        members.add((str(event["org_id"]), str(event["user_id"])))
        producer.send_event(event)
    producer.close()
    control = ControlProducer(deployment.settings)
    for org in sorted(orgs)[::10]:
        cap = {"scope": "ORG", "user_id": None, "seat_tier": None, "limit_nano_usd": 10**9}
        control.send(org, ("SetCap", cap))
    control.close()
    return len(members)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=30_000)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--no-scale-out", action="store_true")
    parser.add_argument(
        "--all",
        action="store_true",
        help="then run the memory (1M users), enforcement latency, replay and recovery "
        "benchmarks too (each on a broker of its own; ~12 more minutes) and print their figures",
    )
    args = parser.parse_args()

    deployment = start_deployment(args.partitions)
    try:
        members = produce(deployment, args.events, args.users)
        print(f"produced {args.events:,} events from {members:,} distinct users", flush=True)
        ceiling_rate = ceiling(deployment.settings, args.events)
        print(f"(a) ceiling: {ceiling_rate:,.0f} events/s", flush=True)
        pipeline = run_workers(
            deployment, "pipeline", args.events, workers=1, sink=False, sink_process=True
        )
        print(f"(b) pipeline: {pipeline.rate:,.0f} events/s", flush=True)
        in_process = run_workers(deployment, "in-process sink", args.events, workers=1, sink=True)
        print(f"(b') pipeline, in-process sink: {in_process.rate:,.0f} events/s", flush=True)
        quix = run_quix(deployment, args.events)
        if quix is not None:
            print(f"(c) Quix Streams: {quix['rate']:,.0f} events/s", flush=True)
        scale: list[WorkerRun] = []
        if not args.no_scale_out:
            for workers in (1, 2):
                label = f"{workers} worker(s), no sink"
                scale.append(
                    run_workers(deployment, label, args.events, workers=workers, sink=False)
                )
                print(f"scale-out {label}: {scale[-1].rate:,.0f} events/s", flush=True)
    finally:
        deployment.kafka.stop()

    rows = [
        ("(a) ceiling: confluent-kafka consumer + Avro decode", ceiling_rate, ""),
        (
            "(b) pipeline: worker + `metering sink` process (chDB)",
            pipeline.rate,
            f"start-up {pipeline.startup_s:.1f}s, {pipeline.pauses} PAUSE/RESUME events, "
            f"RSS worker {pipeline.rss_mb[0]:.0f} MB, sink {pipeline.rss_mb[1]:.0f} MB",
        ),
        (
            "(b') pipeline: worker with its in-process sink",
            in_process.rate,
            f"RSS {in_process.rss_mb[0]:.0f} MB",
        ),
    ]
    if quix is not None:
        rows.append(
            (f"(c) Quix Streams {quix.get('version', '')}: same job", quix["rate"], "no pauses")
        )
    for run in scale:
        rss = " + ".join(f"{mb:.0f}" for mb in run.rss_mb)
        rows.append((f"scale-out: {run.label}", run.rate, f"RSS {rss} MB"))
    print()
    print(
        f"machine: {os.cpu_count()} cores (shared with the broker), "
        f"{args.partitions} partitions, {args.events:,} events, {members:,} users"
    )
    print(f"{'measurement':58} {'events/s':>10}  notes")
    for name, rate, note in rows:
        print(f"{name:58} {rate:>10,.0f}  {note}")
    print(f"{'ratio b/a (pipeline / ceiling)':58} {pipeline.rate / ceiling_rate:>10.3f}")
    if quix is not None:
        print(f"{'ratio b/c (pipeline / Quix Streams)':58} {pipeline.rate / quix['rate']:>10.2f}")
    if len(scale) == 2:
        print(f"{'scale-out 2 workers / 1 worker':58} {scale[1].rate / scale[0].rate:>10.2f}")
    if args.all:
        run_others()


OTHERS = (
    (
        "worker RSS with 1,000,000 distinct users in state",
        ["benchmarks.memory", "--users", "1000000"],
    ),
    (
        "enforcement latency, usage -> PAUSE, at 1,000 events/s",
        ["benchmarks.enforcement_latency", "--rate", "1000", "--seconds", "60"],
    ),
    ("replay", ["benchmarks.replay", "--events", "200000", "--apply-events", "20000"]),
    ("recovery with 1,000,000 keys", ["benchmarks.recovery", "--keys", "1000000"]),
)
"""The other benchmarks issue #6 asks the table to come with (``--all``), as BENCHMARKS.md
runs them."""


def run_others() -> None:
    """Run each of :data:`OTHERS` in turn and print what it prints (librdkafka's own log
    lines left out); a benchmark that fails is reported with its exit status, not hidden."""
    for title, command in OTHERS:
        print(f"\n== {title} (python -m {' '.join(command)})", flush=True)
        done = subprocess.run(
            [sys.executable, "-m", *command], cwd=REPO, capture_output=True, text=True
        )
        for line in done.stdout.splitlines():
            if line.strip() and not line.startswith("%"):
                print(line)
        if done.returncode != 0:
            tail = [line for line in done.stderr.splitlines() if not line.startswith("%")]
            print(f"FAILED (exit {done.returncode}): {tail[-1] if tail else 'no output'}")


if __name__ == "__main__":
    main()
