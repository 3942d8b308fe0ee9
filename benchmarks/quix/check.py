"""Run the Quix app once on a real broker and check what it wrote to ClickHouse.

Run from the main venv: ``.venv/bin/python -m benchmarks.quix.check [--events 20000]``
(needs ``.venv-quix``: ``make quix-venv``).

Starts a broker with :func:`benchmarks.harness.start_deployment`, pre-produces ``--events``
generated usage events as ``benchmarks.run`` does (no duplicates, no bad records),
runs ``.venv-quix/bin/python -m benchmarks.quix.app --events N`` with the deployment's
environment, then, after it exited, reads its ClickHouse store from the Quix venv and compares
the event count, the total cost and every org's monthly cost with an independent sum of
``PriceTable.price`` over the generated events, and that Quix created its state changelog.
Prints the app's JSON line and the checks; exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from decimal import Decimal

from benchmarks.harness import REPO, start_deployment

QUIX_PYTHON = REPO / ".venv-quix" / "bin" / "python"

QUERY = """
import json, sys
from benchmarks.quix.app import quix_clickhouse_dsn
from core.settings import load_settings
from sinks.clickhouse import connect, query_rows
client = connect(quix_clickhouse_dsn(load_settings()))
rows = query_rows(client, "SELECT count() AS n, toString(sum(cost_usd)) AS cost "
                          "FROM metering.priced_events")
orgs = query_rows(client, "SELECT org_id, toString(month) AS month, toString(cost_usd) AS cost "
                          "FROM metering.org_month")
client.close()
print(json.dumps({"rows": rows[0]["n"], "cost": rows[0]["cost"], "orgs": orgs}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--commit-interval", type=float, default=1.0)
    args = parser.parse_args()
    if not QUIX_PYTHON.exists():
        raise SystemExit(f"{QUIX_PYTHON} is missing: run `make quix-venv` first")

    from confluent_kafka.admin import AdminClient

    from core.periods import month_of
    from core.pricing import PriceTable, default_price_table_path
    from core.usage import TokenUsage
    from jobs.generate import GeneratorConfig, generate
    from jobs.producer import UsageProducer

    prices = PriceTable.load(default_price_table_path())
    deployment = start_deployment(args.partitions)
    try:
        producer = UsageProducer(deployment.settings)
        config = GeneratorConfig(
            events=args.events, orgs=200, users=20_000, bad_fraction=0.0, duplicate_fraction=0.0
        )
        expected_nano = 0
        expected_org: Counter[tuple[str, str]] = Counter()
        for item in generate(config, int(time.time() * 1000)):
            event = item.event
            assert event is not None
            usage = TokenUsage(
                event["input_tokens"],
                event["output_tokens"],
                event["cache_creation_input_tokens"],
                event["cache_read_input_tokens"],
            )
            cost = prices.price(event["model"], usage, event["occurred_at"]).cost_nano
            expected_nano += cost
            expected_org[(event["org_id"], month_of(event["occurred_at"]))] += cost
            producer.send_event(event)
        producer.close()
        del producer  # no client left reconnecting once the broker stops
        print(f"produced {args.events:,} events", flush=True)

        env = deployment.process_env
        command = [str(QUIX_PYTHON), "-m", "benchmarks.quix.app", "--events", str(args.events)]
        command += ["--commit-interval", str(args.commit_interval)]
        log_path = deployment.workdir / "quix.log"
        with log_path.open("wb") as log:
            done = subprocess.run(
                command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=log, timeout=1800
            )
        lines = done.stdout.decode().splitlines()
        print("\n".join(lines), flush=True)
        if done.returncode != 0 or len(lines) != 1:
            print(f"quix app exited {done.returncode}; log {log_path}", file=sys.stderr)
            return 1
        result = json.loads(lines[0])

        query = subprocess.run(
            [str(QUIX_PYTHON), "-c", QUERY], env=env, cwd=REPO, capture_output=True, check=True
        )
        stored = json.loads(query.stdout)
        changelogs = sorted(
            name
            for name in AdminClient(deployment.settings.kafka_client_config())
            .list_topics(timeout=10)
            .topics
            if name.startswith("changelog__")
        )
        print(f"changelog topics: {', '.join(changelogs) or 'none'}")
    finally:
        deployment.kafka.stop()

    expected_usd = Decimal(expected_nano).scaleb(-9)
    stored_org = {(row["org_id"], row["month"][:7]): Decimal(row["cost"]) for row in stored["orgs"]}
    expected_org_usd = {key: Decimal(nano).scaleb(-9) for key, nano in expected_org.items()}
    checks = {
        "json line has a rate": result.get("rate", 0) > 0 and result["events"] == args.events,
        f"rows = {args.events}": stored["rows"] == args.events,
        f"total cost = {expected_usd} USD": Decimal(stored["cost"]) == expected_usd,
        "cost per org and month": stored_org == expected_org_usd,
        "state changelog topic": bool(changelogs),
    }
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    if not all(checks.values()):
        print(f"stored: rows {stored['rows']}, cost {stored['cost']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
