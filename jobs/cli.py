"""``metering``: the operator's command line (SPEC §7).

Expected mistakes (bad arguments, Kafka not running, a busy store) end with one line on
stderr and exit status 2; a traceback means a bug.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from core.errors import MeteringError
from core.periods import iso_to_ms, parse_period
from core.settings import Settings, load_settings

cli = typer.Typer(
    name="metering",
    help="Usage metering for LLM extra usage: Kafka -> Faust -> ClickHouse.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
kafka_cli = typer.Typer(
    help="A local single-node Apache Kafka (KRaft) for development.", no_args_is_help=True
)
cli.add_typer(kafka_cli, name="kafka")

out = Console()
err = Console(stderr=True, soft_wrap=True)


class UsageError(MeteringError):
    """A command-line argument that cannot be used as given."""


def _settings(**overrides: Any) -> Settings:
    return load_settings(**overrides)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    )


# -- kafka -------------------------------------------------------------------------------


def _kafka_local(settings: Settings) -> Any:
    from jobs.kafka_local import KafkaLocal, default_cache_dir

    return KafkaLocal(
        data_dir=settings.data_path,
        bootstrap=settings.kafka_bootstrap,
        cache_dir=settings.kafka_cache or default_cache_dir(),
        progress=lambda line: err.print(f"[dim]{line}[/dim]"),
    )


@kafka_cli.command("start")
def kafka_start(
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the broker.")] = 120.0,
) -> None:
    """Fetch the Kafka jars once (Maven Central), then start the broker and wait for it."""
    from streams.topics import ensure_topics

    settings = _settings()
    result = _kafka_local(settings).start(timeout=timeout)
    if result.already_running:
        out.print(f"Kafka already running (pid {result.pid}) at {result.bootstrap}")
    else:
        out.print(
            f"Kafka started (pid {result.pid}) at {result.bootstrap} in {result.seconds:.1f}s; "
            f"log: {result.log_file}"
        )
    created = ensure_topics(settings)
    if created:
        out.print(f"created topics: {', '.join(created)}")


@kafka_cli.command("stop")
def kafka_stop() -> None:
    """Stop the local broker (controlled shutdown)."""
    result = _kafka_local(_settings()).stop()
    out.print("Kafka stopped" if result.was_running else "Kafka was not running")


@kafka_cli.command("status")
def kafka_status() -> None:
    """Whether the local broker runs and answers."""
    status = _kafka_local(_settings()).status()
    if status.running:
        state = "answering" if status.answering else "NOT answering"
        out.print(f"Kafka running (pid {status.pid}) at {status.bootstrap}, {state}")
    else:
        out.print(f"Kafka not running (data dir {status.data_dir})")
        raise typer.Exit(1)


# -- worker and sink ---------------------------------------------------------------------


@cli.command()
def worker(
    sink: Annotated[
        bool, typer.Option("--sink/--no-sink", help="Run the ClickHouse sink in-process.")
    ] = True,
    loglevel: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Run the Faust worker (same as `faust -A streams.app worker`)."""
    import faust
    import mode.loop

    mode.loop.use("uvloop")  # before the app exists: Faust binds to the loop it finds
    from streams.app import create_app

    app = create_app(_settings(worker_sink=sink))
    faust.Worker(app, loglevel=loglevel).execute_from_commandline()


@cli.command()
def sink(
    loglevel: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Run the ClickHouse sink alone (group `<app id>.sink`), serving reads on the web port."""
    from mode import Worker

    from jobs.sink_process import StandaloneSink
    from streams.topics import ensure_topics

    settings = _settings()
    ensure_topics(settings)
    Worker(StandaloneSink(settings), loglevel=loglevel).execute_from_commandline()


# -- producing ---------------------------------------------------------------------------


def _json_lines(source: str) -> Iterator[tuple[int, str]]:
    if source == "-":
        yield from enumerate(sys.stdin, start=1)
        return
    path = Path(source)
    if not path.is_file():
        raise UsageError(f"no such file: {source} (give a JSON-lines file or - for stdin)")
    with path.open(encoding="utf-8") as handle:
        yield from enumerate(handle, start=1)


def _event_from_json(line: str) -> dict[str, Any]:
    record = json.loads(line)
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    occurred = record.get("occurred_at")
    if isinstance(occurred, str):
        record["occurred_at"] = iso_to_ms(occurred)
    return record


@cli.command()
def produce(
    jsonl: Annotated[str, typer.Option("--jsonl", help="JSON-lines file, or - for stdin.")],
) -> None:
    """Encode usage events given as JSON lines and produce them to usage.events."""
    from jobs.producer import UsageProducer
    from streams.codec import EncodeError
    from streams.topics import ensure_topics

    settings = _settings()
    ensure_topics(settings)
    producer = UsageProducer(settings)
    skipped = 0
    for number, line in _json_lines(jsonl):
        if not line.strip():
            continue
        try:
            producer.send_event(_event_from_json(line))
        except (ValueError, EncodeError) as exc:
            skipped += 1
            err.print(f"line {number}: not sent: {exc}", markup=False, highlight=False)
    delivered = producer.close()
    out.print(f"produced {delivered} events" + (f", skipped {skipped} lines" if skipped else ""))
    if skipped:
        raise typer.Exit(1)


def _produce_generated(
    settings: Settings,
    events: int,
    rate: float | None,
    orgs: int,
    users: int,
    seed: int,
    bad_fraction: float,
    duplicate_fraction: float,
) -> tuple[int, float]:
    from jobs.generate import GeneratorConfig, generate
    from jobs.producer import UsageProducer

    config = GeneratorConfig(
        events=events,
        orgs=orgs,
        users=users,
        seed=seed,
        bad_fraction=bad_fraction,
        duplicate_fraction=duplicate_fraction,
    )
    producer = UsageProducer(settings)
    started = time.monotonic()
    with _progress() as progress:
        task = progress.add_task("producing", total=events, rate="")
        for index, item in enumerate(generate(config, int(time.time() * 1000)), start=1):
            if item.raw is not None:
                producer.send_raw(item.key.encode(), item.raw)
            else:
                assert item.event is not None
                producer.send_event(item.event)
            if rate:
                ahead = index / rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
            if index % 1000 == 0 or index == events:
                elapsed = max(time.monotonic() - started, 1e-9)
                progress.update(task, completed=index, rate=f"{index / elapsed:,.0f} ev/s")
        delivered = producer.close()
    return delivered, time.monotonic() - started


@cli.command()
def generate(
    events: Annotated[int, typer.Option("--events", help="How many records to produce.")],
    rate: Annotated[float | None, typer.Option(help="Records per second (default: max).")] = None,
    orgs: Annotated[int, typer.Option(help="Organisations.")] = 50,
    users: Annotated[int, typer.Option(help="Members across all organisations.")] = 2000,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same stream).")] = 1,
    bad_fraction: Annotated[float, typer.Option(help="Share of malformed records.")] = 0.005,
    duplicate_fraction: Annotated[float, typer.Option(help="Share of re-sent events.")] = 0.01,
) -> None:
    """Produce realistic synthetic usage (both plans and tiers, all models, some bad records)."""
    from streams.topics import ensure_topics

    if rate is not None and rate <= 0:
        raise UsageError("--rate must be positive")
    settings = _settings()
    ensure_topics(settings)
    delivered, seconds = _produce_generated(
        settings, events, rate, orgs, users, seed, bad_fraction, duplicate_fraction
    )
    out.print(f"produced {delivered} records in {seconds:.1f}s ({delivered / seconds:,.0f}/s)")


# -- reports -----------------------------------------------------------------------------


def _month(text: str) -> date:
    try:
        year, month = parse_period(text)
    except ValueError as exc:
        raise UsageError(f"--month: {exc}") from None
    return date(year, month, 1)


def _usd(value: Decimal | None, places: int = 2) -> str:
    amount = value if value is not None else Decimal(0)
    return f"${amount.quantize(Decimal(1).scaleb(-places)):,}"


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, date | datetime):
        return value.isoformat()
    raise TypeError(type(value).__name__)


def spend_report(settings: Settings, org: str, month: date) -> dict[str, Any]:
    """The month-to-date report of one organisation, read from the store."""
    from sinks.access import open_reader

    reader = open_reader(settings)
    try:
        totals = reader.named("org_month_total", org_id=org, month=month)
        return {
            "org_id": org,
            "month": month.isoformat()[:7],
            "total": totals[0] if totals else None,
            "members": reader.named("spend_by_member", org_id=org, month=month),
            "tiers": reader.named("spend_by_tier", org_id=org, month=month),
            "models": reader.named("spend_by_model", org_id=org, month=month),
        }
    finally:
        reader.close()


def _print_report(report: dict[str, Any], member_limit: int | None = None) -> None:
    total = report["total"]
    title = f"{report['org_id']} — {report['month']}"
    if total is None:
        out.print(f"{title}: no usage")
        return
    out.print(
        f"[bold]{title}[/bold]: {total['events']:,} requests, cost {_usd(total['cost_usd'])}, "
        f"extra usage (billable) {_usd(total['extra_cost_usd'])}"
    )
    members = Table("Member", "Tier", "Requests", "Cost", "MTD Spend", title="By member")
    rows = report["members"]
    for row in rows[:member_limit] if member_limit else rows:
        members.add_row(
            row["user_id"],
            row["seat_tier"],
            f"{row['events']:,}",
            _usd(row["cost_usd"]),
            _usd(row["extra_cost_usd"]),
        )
    if member_limit and len(rows) > member_limit:
        members.caption = f"{len(rows) - member_limit} more members (see --json)"
    out.print(members)
    tiers = Table("Seat tier", "Requests", "Cost", "Extra cost", title="By seat tier")
    for row in report["tiers"]:
        tiers.add_row(
            row["seat_tier"],
            f"{row['events']:,}",
            _usd(row["cost_usd"]),
            _usd(row["extra_cost_usd"]),
        )
    out.print(tiers)
    models = Table(
        "Model", "Requests", "Input tok", "Output tok", "Cost", "Extra cost", title="By model"
    )
    for row in report["models"]:
        models.add_row(
            row["model_family"],
            f"{row['events']:,}",
            f"{row['input_tokens']:,}",
            f"{row['output_tokens']:,}",
            _usd(row["cost_usd"]),
            _usd(row["extra_cost_usd"]),
        )
    out.print(models)


@cli.command()
def report(
    org: Annotated[str, typer.Option("--org", help="Organisation id.")],
    month: Annotated[str, typer.Option("--month", help="YYYY-MM (UTC calendar month).")],
    as_json: Annotated[bool, typer.Option("--json", help="Exact JSON instead of tables.")] = False,
) -> None:
    """Month-to-date cost and extra cost by member (MTD Spend), seat tier and model."""
    result = spend_report(_settings(), org, _month(month))
    if as_json:
        out.print_json(json.dumps(result, default=_json_default))
    else:
        _print_report(result)


# -- replay ------------------------------------------------------------------------------


def _instant(option: str, text: str) -> int:
    try:
        return int(text) if text.lstrip("-").isdigit() else iso_to_ms(text)
    except ValueError as exc:
        raise UsageError(f"{option}: {exc} (e.g. 2026-10-01T00:00:00Z or epoch ms)") from None


@cli.command()
def replay(
    since: Annotated[str, typer.Option("--since", help="Start of occurred_at, inclusive.")],
    until: Annotated[
        str | None, typer.Option("--until", help="End of occurred_at, exclusive (default: no end).")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the diff; write nothing.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="The diff as exact JSON.")] = False,
    margin_hours: Annotated[
        float, typer.Option(help="Seek the ledger this long before --since.")
    ] = 2.0,
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for the worker to commit and apply.")
    ] = 600.0,
) -> None:
    """Re-price history after a price-table fix, with a per-org, per-month diff.

    Restart the workers with the new price table first (it prices new events); the replay
    corrects the events already billed, through the running worker.
    """
    from jobs.control import format_usd
    from jobs.replay import run_replay

    since_ms = _instant("--since", since)
    until_ms = _instant("--until", until) if until else None
    settings = _settings()
    labels = {
        "scan": "reading the priced ledger",
        "worker": "waiting for the worker's commits",
        "apply": "worker applying the corrections",
    }
    with _progress() as bar:
        tasks: dict[str, Any] = {}
        started: dict[str, float] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(labels[stage], total=max(total, 1), rate="")
                started[stage] = time.monotonic()
            elapsed = time.monotonic() - started[stage]
            rate = f"{done / elapsed:,.0f}/s" if stage == "scan" and elapsed > 0 else ""
            bar.update(tasks[stage], completed=done, total=max(total, 1), rate=rate)

        result = run_replay(
            settings,
            since_ms,
            until_ms,
            dry_run=dry_run,
            margin_ms=int(margin_hours * 3_600_000),
            timeout=timeout,
            progress=progress,
        )
    rows = [
        {
            "org_id": row.org_id,
            "month": row.month,
            "events": row.events,
            "old_cost_usd": format_usd(row.old_cost_nano),
            "new_cost_usd": format_usd(row.new_cost_nano),
            "delta_usd": format_usd(row.delta_nano),
            "old_extra_cost_usd": format_usd(row.old_extra_nano),
            "new_extra_cost_usd": format_usd(row.new_extra_nano),
            "extra_delta_usd": format_usd(row.extra_delta_nano),
        }
        for row in result.months
    ]
    summary = {
        "replay_id": None if dry_run else result.replay_id,
        "dry_run": dry_run,
        "records_scanned": result.scanned,
        "events_in_range": result.plan.in_range,
        "events_repriced": len(result.plan.corrections),
        "events_applied": None if dry_run else result.applied,
        "events_unchanged": result.plan.unchanged,
        "events_unpriceable": len(result.plan.unpriceable),
        "scan_events_per_second": round(result.events_per_second),
        "correction_messages": result.messages,
    }
    if as_json:
        out.print_json(json.dumps({**summary, "diff": rows}))
    else:
        table = Table(title="Re-priced events by organisation and month (USD)")
        for column in ("org", "month", "events", "old cost", "new cost", "delta", "extra delta"):
            table.add_column(column, justify="left" if column in ("org", "month") else "right")
        for row in rows:
            table.add_row(
                row["org_id"],
                row["month"],
                f"{row['events']:,}",
                row["old_cost_usd"],
                row["new_cost_usd"],
                row["delta_usd"],
                row["extra_delta_usd"],
            )
        out.print(table)
        verb = "would correct" if dry_run else "corrected"
        out.print(
            f"{verb} {len(result.plan.corrections):,} of {result.plan.in_range:,} events in "
            f"range ({result.scanned:,} ledger records read at "
            f"{result.events_per_second:,.0f}/s)"
            + ("" if dry_run else f"; replay {result.replay_id}")
        )
    skipped = len(result.plan.corrections) - result.applied
    if not dry_run and skipped:
        err.print(
            f"warning: the worker skipped {skipped:,} correction(s) whose old price was no "
            "longer on record (see its log and metering_reprice_stale_total); run the replay "
            "again to plan them from the current ledger",
            markup=False,
            highlight=False,
        )
    for entry, reason in result.plan.unpriceable[:10]:
        err.print(
            f"warning: event {entry.priced.event.event_id} of {entry.priced.event.org_id} "
            f"cannot be re-priced ({reason}); left as billed",
            markup=False,
            highlight=False,
        )


# -- demo --------------------------------------------------------------------------------


def wait_until_processed(
    settings: Settings,
    timeout: float,
    what: str = "metering",
    worker: subprocess.Popen[bytes] | None = None,
) -> None:
    """Block until the worker and the sink groups have committed up to the topics' ends.

    With ``worker`` given, fail at once if that process exits meanwhile.
    """
    from jobs.progress import group_position
    from streams.topics import PRICED, USAGE

    deadline = time.monotonic() + timeout
    with _progress() as progress:
        task = progress.add_task(what, total=None, rate="")
        while True:
            worker_pos = group_position(settings, settings.app_id, settings.topic(USAGE))
            sink_pos = group_position(settings, settings.sink_group, settings.topic(PRICED))
            progress.update(
                task,
                total=worker_pos.end + sink_pos.end,
                completed=worker_pos.committed + sink_pos.committed,
                rate=f"worker lag {worker_pos.lag}, sink lag {sink_pos.lag}",
            )
            if worker_pos.end and worker_pos.lag == 0 and sink_pos.lag == 0:
                # The sink's end offsets were read after the worker caught up only if we
                # look once more: re-check the sink against a fresh end.
                again = group_position(settings, settings.sink_group, settings.topic(PRICED))
                if again.lag == 0:
                    return
            if worker is not None and worker.poll() is not None:
                raise MeteringError(f"the worker exited with status {worker.returncode}")
            if time.monotonic() > deadline:
                raise MeteringError(
                    f"not caught up after {timeout:.0f}s (worker lag {worker_pos.lag}, "
                    f"sink lag {sink_pos.lag}); see the worker log"
                )
            time.sleep(0.5)


def _print_worker_counts(settings: Settings) -> None:
    """What the worker did, from its Prometheus endpoint."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(f"http://127.0.0.1:{settings.web_port}/metrics", timeout=10).text
    except httpx.HTTPError:
        return
    counts: dict[str, float] = {}
    letters: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "metering_dead_letters_total":
                letters[sample.labels["reason"]] = sample.value
            elif sample.name.endswith("_total"):
                counts[sample.name] = sample.value
    reasons = ", ".join(f"{reason} {count:.0f}" for reason, count in sorted(letters.items()))
    out.print(
        f"metered {counts.get('metering_events_priced_total', 0):,.0f} events, skipped "
        f"{counts.get('metering_duplicates_skipped_total', 0):,.0f} duplicates, dead-lettered "
        f"{sum(letters.values()):,.0f} records ({reasons or 'none'}), "
        f"wrote {counts.get('metering_sink_rows_total', 0):,.0f} rows to ClickHouse"
    )


@cli.command()
def demo(
    events: Annotated[int, typer.Option(help="Records to generate.")] = 5000,
    orgs: Annotated[int, typer.Option(help="Organisations.")] = 20,
    users: Annotated[int, typer.Option(help="Members across all organisations.")] = 400,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for processing.")] = 600.0,
) -> None:
    """The whole pipeline end to end on the embedded defaults, ending with a spend report."""
    from sinks.access import open_reader
    from streams.topics import ensure_topics

    started = time.monotonic()
    settings = _settings()
    kafka = _kafka_local(settings)
    out.print("[bold]1/5[/bold] starting Kafka (the first run fetches the jars from Maven Central)")
    kafka_result = kafka.start(timeout=180)
    ensure_topics(settings)
    log_path = settings.data_path / "demo-worker.log"
    out.print(f"[bold]2/5[/bold] starting a worker (log: {log_path})")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "jobs.cli", "worker"],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=os.environ.copy(),
        )
    try:
        out.print(f"[bold]3/5[/bold] generating {events:,} records (with duplicates and bad ones)")
        _produce_generated(settings, events, None, orgs, users, int(time.time()), 0.005, 0.01)
        out.print("[bold]4/5[/bold] waiting until every record is metered and in ClickHouse")
        try:
            wait_until_processed(settings, timeout, worker=process)
        except MeteringError as exc:
            raise MeteringError(f"{exc}; see {log_path}") from None
        _print_worker_counts(settings)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        if not kafka_result.already_running:
            kafka.stop()
    if code != 0:
        raise MeteringError(f"the worker exited with status {code}; see {log_path}")
    out.print("[bold]5/5[/bold] spend report")
    month = datetime.now(tz=UTC).date().replace(day=1)
    reader = open_reader(settings)
    try:
        leaders = reader.named("top_orgs", month=month, limit=10)
    finally:
        reader.close()
    overview = Table(
        "Organisation",
        "Requests",
        "Cost",
        "Extra cost (billable)",
        title=f"Top organisations, {month.isoformat()[:7]}",
    )
    for row in leaders:
        overview.add_row(
            row["org_id"], f"{row['events']:,}", _usd(row["cost_usd"]), _usd(row["extra_cost_usd"])
        )
    out.print(overview)
    if leaders:
        _print_report(spend_report(settings, leaders[0]["org_id"], month), member_limit=10)
    out.print(f"demo finished in {time.monotonic() - started:.1f}s")


def _register_enforcement_commands() -> None:
    from jobs.enforcement_cli import register

    register(cli)


_register_enforcement_commands()


def main() -> None:
    """Console-script entry point: one line for expected errors, tracebacks only for bugs."""
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
    from typer._click.exceptions import UsageError as ClickUsageError

    try:
        status = cli(standalone_mode=False)
    except NoArgsIsHelpError as exc:
        exc.show()
        sys.exit(2)
    except ClickUsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "metering"
        err.print(
            f"error: {exc.format_message()} (see: {where} --help)", markup=False, highlight=False
        )
        sys.exit(2)
    except ClickException as exc:
        err.print(f"error: {exc.format_message()}", markup=False, highlight=False)
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(130)
    except MeteringError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False)
        sys.exit(2)
    sys.exit(status if isinstance(status, int) else 0)


if __name__ == "__main__":
    main()
