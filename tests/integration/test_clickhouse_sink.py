"""The ClickHouse sink, schema and read helper against the real engine (embedded chDB).

What chDB allows (found with chdb 4.4.0 / clickhouse-connect 1.12.0, engine 26.9):

* One data path per **process** at a time. While a client of path A is open, connecting to path
  B raises ``ProgrammingError`` ("EmbeddedServer already initialized with path A"); after every
  client of A is closed, B opens fine. Several clients on the same path share one engine.
* One **process** per data path: a second process gets ``ProgrammingError`` ("Error
  initializing EmbeddedServer"; the engine logs "Cannot lock file <path>/status").

So this module opens ONE store (module-scoped, in a temporary directory) and isolates each test
in its own database, which the schema builders take as a parameter. Any other test module that
keeps a chDB client open across modules (session scope) would make this one fail to connect.
"""

from __future__ import annotations

import os
import random
import socket
import time
import traceback
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, date, datetime
from decimal import Decimal
from itertools import count
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client

from core.usage import (
    NANO_PER_USD,
    TOKEN_FIELDS,
    Plan,
    Price,
    PricedEvent,
    Product,
    SeatTier,
    TokenUsage,
    UsageEvent,
)
from sinks.clickhouse import ClickHouseSink, connect, ensure_schema, query_rows
from sinks.ddl import CONTRACT_VIEWS, PRICED_STORE
from sinks.errors import SinkError
from sinks.port import PricedRow

pytestmark = pytest.mark.integration

JAN_1_2025_MS = 1_735_689_600_000
HOUR_MS = 3_600_000
_database_numbers = count(1)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    path = tmp_path_factory.mktemp("chdb") / "store"
    client = connect(f"chdb://{path}")
    yield client
    client.close()


@pytest.fixture
def database(client: Client) -> Iterator[str]:
    name = f"metering_t{next(_database_numbers)}"
    ensure_schema(client, name)
    yield name
    client.command(f"DROP DATABASE IF EXISTS `{name}`")


@pytest.fixture
def sink(client: Client, database: str) -> ClickHouseSink:
    return ClickHouseSink(client, database, close_client=False)


def priced_row(
    event_id: str,
    *,
    org_id: str = "org-1",
    user_id: str = "user-1",
    plan: Plan = Plan.ENTERPRISE,
    seat_tier: SeatTier = SeatTier.STANDARD,
    family: str = "Sonnet 4",
    occurred_at_ms: int = JAN_1_2025_MS,
    tokens: tuple[int, int, int, int] = (10, 20, 30, 40),
    extra_usage: bool = False,
    cost_nano: int = 1_000,
    revision: int = 0,
    offset: int = 0,
) -> PricedRow:
    event = UsageEvent(
        event_id=event_id,
        occurred_at_ms=occurred_at_ms,
        org_id=org_id,
        plan=plan,
        user_id=user_id,
        seat_tier=seat_tier,
        product=Product.CLAUDE,
        model="claude-sonnet-4-20250514",
        usage=TokenUsage(*tokens),
        extra_usage=extra_usage,
    )
    price = Price(family, "2025-01-01", sum(tokens[::2]) > 200_000, cost_nano)
    return PricedRow(PricedEvent(event, price, revision), 3, offset)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def full_text(error: BaseException) -> str:
    """The error as a log would show it: message, chained causes and traceback."""
    return "".join(traceback.format_exception(error))


# --- schema -------------------------------------------------------------------------------------


def test_ensure_schema_twice_is_harmless(client: Client, database: str, sink: ClickHouseSink):
    sink.add([priced_row("e1")])
    sink.flush()
    ensure_schema(client, database)
    ensure_schema(client, database)
    tables = query_rows(
        client,
        "SELECT name, engine FROM system.tables WHERE database = {db:String} ORDER BY name",
        {"db": database},
    )
    assert {row["name"]: row["engine"] for row in tables} == {
        "enforcement_log": "View",
        "enforcement_log_store": "ReplacingMergeTree",
        "org_month": "View",
        "priced_events": "View",
        "priced_events_store": "ReplacingMergeTree",
        "replay_log": "View",
        "replay_log_store": "ReplacingMergeTree",
        "tier_month": "View",
        "usage_hourly": "View",
        "user_month": "View",
    }
    rows = query_rows(client, f"SELECT event_id FROM {database}.priced_events")
    assert rows == [{"event_id": "e1"}]


SPEC_TYPES = {
    "priced_events": {
        "event_id": "String",
        "occurred_at": "DateTime64(3, 'UTC')",
        "org_id": "String",
        "user_id": "String",
        **dict.fromkeys(TOKEN_FIELDS, "UInt64"),
        "long_context": "UInt8",
        "extra_usage": "UInt8",
        "cost_usd": "Decimal(38, 9)",
    },
    **{
        view: {
            first: first_type,
            "org_id": "String",
            "events": "UInt64",
            **dict.fromkeys(TOKEN_FIELDS, "UInt64"),
            "cost_usd": "Decimal(38, 9)",
            "extra_cost_usd": "Decimal(38, 9)",
        }
        for view, (first, first_type) in {
            "org_month": ("month", "Date"),
            "tier_month": ("month", "Date"),
            "user_month": ("month", "Date"),
            "usage_hourly": ("hour", "DateTime('UTC')"),
        }.items()
    },
}


@pytest.mark.parametrize("view", sorted(CONTRACT_VIEWS))
def test_view_columns_are_exactly_the_contract(client: Client, database: str, view: str):
    described = query_rows(client, f"DESCRIBE TABLE {database}.{view}")
    actual = [(row["name"], row["type"]) for row in described]
    assert actual == [tuple(column) for column in CONTRACT_VIEWS[view]]
    # And, independently of the constants, the SPEC §6 types.
    for name, spec_type in SPEC_TYPES.get(view, {}).items():
        assert dict(actual)[name] == spec_type, name


# --- deduplication ------------------------------------------------------------------------------


def test_redelivery_counts_once_and_a_replay_rewrites_the_price(
    client: Client, database: str, sink: ClickHouseSink
):
    sink.add([priced_row("e1", cost_nano=1_000, offset=10)])
    assert sink.flush() == 1
    sink.add([priced_row("e1", cost_nano=1_000, offset=10)])  # re-delivery: an identical row
    assert sink.flush() == 1
    sink.add([priced_row("e1", cost_nano=2_500, revision=7, offset=10)])  # replay
    sink.flush()
    sink.add([priced_row("e1", cost_nano=1_000, offset=10)])  # a late copy of the original
    sink.flush()

    stored = query_rows(client, f"SELECT count() AS n FROM {database}.{PRICED_STORE}")
    assert stored[0]["n"] >= 2  # several physical rows (unless merged) ...
    rows = query_rows(
        client, f"SELECT event_id, cost_usd, pricing_version FROM {database}.priced_events"
    )
    assert rows == [  # ... but one event, at the replayed price
        {"event_id": "e1", "cost_usd": Decimal("0.0000025"), "pricing_version": "2025-01-01"}
    ]
    month = query_rows(client, f"SELECT events, cost_usd FROM {database}.org_month")
    assert month == [{"events": 1, "cost_usd": Decimal("0.0000025")}]


def test_same_event_id_in_two_orgs_is_two_events(
    client: Client, database: str, sink: ClickHouseSink
):
    sink.add([priced_row("e1", org_id="a"), priced_row("e1", org_id="b")])
    sink.flush()
    rows = query_rows(client, f"SELECT org_id FROM {database}.priced_events ORDER BY org_id")
    assert [row["org_id"] for row in rows] == ["a", "b"]


# --- aggregates equal the line items ------------------------------------------------------------


def generated_rows(seed: int = 7) -> list[PricedRow]:
    """Line items over two months, several orgs, users, tiers and families, with duplicates and
    replays mixed in (each list entry is written in its own flush below)."""
    rng = random.Random(seed)
    rows = []
    for number in range(300):
        rows.append(
            priced_row(
                f"ev-{number}",
                org_id=rng.choice(["org-a", "org-b", "org-ü"]),
                user_id=rng.choice(["u1", "u2", "u3", "u4"]),
                seat_tier=rng.choice(list(SeatTier)),
                family=rng.choice(["Sonnet 4", "Opus 4.1", "Haiku 3.5"]),
                # Jan 1 .. Feb 29 2025: both months, many hours, incl. the month boundary
                occurred_at_ms=JAN_1_2025_MS
                + rng.randrange(59 * 24) * HOUR_MS
                + rng.randrange(HOUR_MS),
                tokens=tuple(rng.randrange(0, 300_000) for _ in range(4)),  # type: ignore[arg-type]
                extra_usage=rng.random() < 0.4,
                cost_nano=rng.randrange(0, 50 * NANO_PER_USD),
                offset=number,
            )
        )
    # the month boundary exactly: last millisecond of January, first of February
    feb_1_ms = JAN_1_2025_MS + 31 * 24 * HOUR_MS
    rows.append(priced_row("edge-jan", org_id="org-a", occurred_at_ms=feb_1_ms - 1))
    rows.append(priced_row("edge-feb", org_id="org-a", occurred_at_ms=feb_1_ms))
    duplicates = rng.sample(rows, 40)
    replays = [
        PricedRow(
            PricedEvent(
                row.priced.event,
                Price(
                    row.priced.price.model_family,
                    "2025-02-fix",
                    row.priced.price.long_context,
                    row.priced.price.cost_nano + rng.randrange(1, 10**6),
                ),
                revision=5,
            ),
            row.source_partition,
            row.source_offset,
        )
        for row in rng.sample(rows, 30)
    ]
    return rows + duplicates + replays


def final_state(rows: list[PricedRow]) -> list[PricedRow]:
    latest: dict[tuple[str, str], PricedRow] = {}
    for row in rows:
        current = latest.get(row.key)
        if current is None or row.priced.revision >= current.priced.revision:
            latest[row.key] = row
    return list(latest.values())


def month_of(ms: int) -> date:
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    return date(moment.year, moment.month, 1)


def hour_of(ms: int) -> datetime:
    return datetime.fromtimestamp(ms // HOUR_MS * HOUR_MS / 1000, UTC)


def expected_totals(rows: list[PricedRow], key_of: Any) -> dict[tuple, dict[str, Any]]:
    totals: dict[tuple, dict[str, Any]] = defaultdict(
        lambda: {"events": 0, **dict.fromkeys(TOKEN_FIELDS, 0), "cost": 0, "extra": 0}
    )
    for row in rows:
        total = totals[key_of(row)]
        total["events"] += 1
        for name in TOKEN_FIELDS:
            total[name] += getattr(row.priced.event.usage, name)
        total["cost"] += row.priced.price.cost_nano
        total["extra"] += row.priced.extra_cost_nano
    return {
        key: {
            "events": t["events"],
            **{name: t[name] for name in TOKEN_FIELDS},
            "cost_usd": Decimal(t["cost"]).scaleb(-9),
            "extra_cost_usd": Decimal(t["extra"]).scaleb(-9),
        }
        for key, t in totals.items()
    }


ROLLUP_KEYS = {
    "org_month": (
        ("month", "org_id"),
        lambda r: (month_of(r.priced.event.occurred_at_ms), r.priced.event.org_id),
    ),
    "tier_month": (
        ("month", "org_id", "seat_tier"),
        lambda r: (
            month_of(r.priced.event.occurred_at_ms),
            r.priced.event.org_id,
            r.priced.event.seat_tier.value,
        ),
    ),
    "user_month": (
        ("month", "org_id", "user_id"),
        lambda r: (
            month_of(r.priced.event.occurred_at_ms),
            r.priced.event.org_id,
            r.priced.event.user_id,
        ),
    ),
    "usage_hourly": (
        ("hour", "org_id", "user_id", "model_family"),
        lambda r: (
            hour_of(r.priced.event.occurred_at_ms),
            r.priced.event.org_id,
            r.priced.event.user_id,
            r.priced.price.model_family,
        ),
    ),
}


def test_every_view_equals_the_line_items(client: Client, database: str, sink: ClickHouseSink):
    written = generated_rows()
    for start in range(0, len(written), 50):  # several inserts, so dedupe spans parts
        sink.add(written[start : start + 50])
        sink.flush()
    final = final_state(written)

    line_items = query_rows(
        client,
        f"SELECT org_id, event_id, cost_usd, pricing_version FROM {database}.priced_events",
    )
    assert len(line_items) == len(final) == 302
    assert {(r["org_id"], r["event_id"]): r["cost_usd"] for r in line_items} == {
        row.key: Decimal(row.priced.price.cost_nano).scaleb(-9) for row in final
    }

    for view, (key_columns, key_of) in ROLLUP_KEYS.items():
        actual = {
            tuple(row[name] for name in key_columns): {
                name: value for name, value in row.items() if name not in key_columns
            }
            for row in query_rows(client, f"SELECT * FROM {database}.{view}")
        }
        assert actual == expected_totals(final, key_of), view

    edges = query_rows(
        client,
        f"SELECT month, events FROM {database}.org_month "
        "WHERE org_id = {org:String} ORDER BY month",
        {"org": "org-a"},
    )
    assert [row["month"] for row in edges] == [date(2025, 1, 1), date(2025, 2, 1)]


def test_timestamps_round_trip_to_the_millisecond_in_utc(
    client: Client, database: str, sink: ClickHouseSink
):
    sink.add([priced_row("t", occurred_at_ms=JAN_1_2025_MS + 123)])
    sink.flush()
    row = query_rows(client, f"SELECT occurred_at FROM {database}.priced_events")[0]
    assert row["occurred_at"] == datetime(2025, 1, 1, 0, 0, 0, 123_000, tzinfo=UTC)
    assert row["occurred_at"].utcoffset() is not None
    hour = query_rows(client, f"SELECT hour FROM {database}.usage_hourly")[0]["hour"]
    assert hour == datetime(2025, 1, 1, tzinfo=UTC) and hour.utcoffset() is not None


# --- hostile and unicode values -----------------------------------------------------------------


def test_sql_looking_and_unicode_values_are_stored_verbatim(
    client: Client, database: str, sink: ClickHouseSink
):
    hostile = f"x'); DROP TABLE {database}.{PRICED_STORE}; --"
    org = "組織-Ωμέγα-😀"
    user = "o'brien\\\"\n\t{user:String}"
    sink.add([priced_row(hostile, org_id=org, user_id=user)])
    sink.flush()
    rows = query_rows(
        client,
        f"SELECT event_id, org_id, user_id FROM {database}.priced_events "
        "WHERE event_id = {id:String} AND org_id = {org:String}",
        {"id": hostile, "org": org},
    )
    assert rows == [{"event_id": hostile, "org_id": org, "user_id": user}]
    per_user = query_rows(
        client,
        f"SELECT user_id, events FROM {database}.user_month WHERE user_id = {{u:String}}",
        {"u": user},
    )
    assert per_user == [{"user_id": user, "events": 1}]


# --- enforcement log ----------------------------------------------------------------------------


def test_enforcement_log_stores_each_event_once(
    client: Client, database: str, sink: ClickHouseSink
):
    pause = {
        "event_id": "pause-1",
        "action": "PAUSE",
        "scope": "USER",
        "reason": "CAP_REACHED",
        "org_id": "org-1",
        "user_id": "user-1",
        "period": "2025-01",
        "spend_nano_usd": 5_000_000_001,
        "limit_nano_usd": 5_000_000_000,
        "limit_source": "SEAT_TIER",
        "trigger_id": "e9",
        "emitted_at": datetime(2025, 1, 2, 3, 4, 5, 678_000, tzinfo=UTC),
    }
    reload = {
        "event_id": "reload-1",
        "action": "RELOAD_REQUESTED",
        "scope": "ORG",
        "reason": "BALANCE_LOW",
        "org_id": "org-1",
        "user_id": None,
        "period": "2025-01",
        "spend_nano_usd": 0,
        "limit_nano_usd": None,
        "limit_source": "BALANCE",
        "trigger_id": "e10",
        "emitted_at": JAN_1_2025_MS,
        "amount_nano_usd": 50 * NANO_PER_USD,
        "balance_nano_usd": -3,
    }
    sink.add_enforcement([pause, reload])
    assert sink.flush() == 2
    sink.add_enforcement([pause])  # a consumer restarted and saw it again
    sink.flush()
    rows = query_rows(client, f"SELECT * FROM {database}.enforcement_log ORDER BY event_id")
    assert [row["event_id"] for row in rows] == ["pause-1", "reload-1"]
    paused, reloaded = rows
    assert paused["spend_usd"] == Decimal("5.000000001")
    assert paused["limit_usd"] == Decimal(5)
    assert paused["emitted_at"] == datetime(2025, 1, 2, 3, 4, 5, 678_000, tzinfo=UTC)
    assert paused["amount_usd"] is None and paused["balance_usd"] is None
    assert reloaded["user_id"] is None and reloaded["limit_usd"] is None
    assert reloaded["amount_usd"] == Decimal(50)
    assert reloaded["balance_usd"] == Decimal("-0.000000003")


# --- failures -----------------------------------------------------------------------------------


def test_failed_flush_keeps_the_buffer_and_the_retry_writes_it(client: Client):
    database = f"metering_t{next(_database_numbers)}"  # schema not created yet
    sink = ClickHouseSink(client, database, close_client=False)
    sink.add([priced_row("e1"), priced_row("e2")])
    with pytest.raises(SinkError) as raised:
        sink.flush()
    assert "\n" not in str(raised.value)
    assert f"{database}.{PRICED_STORE}" in str(raised.value)
    assert sink.pending() == 2

    ensure_schema(client, database)  # the store comes back
    try:
        assert sink.flush() == 2
        rows = query_rows(client, f"SELECT count() AS n FROM {database}.priced_events")
        assert rows == [{"n": 2}]
    finally:
        client.command(f"DROP DATABASE IF EXISTS `{database}`")


class UnreachableServer:
    """A client whose insert fails as a real HTTP client's does when the server is down."""

    def __init__(self, dsn: str, password: str) -> None:
        self.dsn = dsn
        self.password = password

    def insert(self, *args: Any, **kwargs: Any) -> None:
        import clickhouse_connect

        clickhouse_connect.get_client(dsn=self.dsn, password=self.password, connect_timeout=2)


def test_failed_flush_on_a_down_server_hides_the_password():
    password = "pw-S3cr3t-do-not-log"
    dsn = f"http://alice:{password}@127.0.0.1:{closed_port()}/"
    sink = ClickHouseSink(UnreachableServer(dsn, password), close_client=False)  # type: ignore[arg-type]
    sink.add([priced_row("e1")])
    with pytest.raises(SinkError) as raised:
        sink.flush()
    assert "\n" not in str(raised.value)
    assert "OperationalError" in str(raised.value)  # the driver's own connection error
    assert password not in full_text(raised.value)
    assert sink.pending() == 1


def test_connect_to_a_closed_port_fails_in_one_line_without_the_password():
    password = "pw-S3cr3t-do-not-log"
    dsn_password = "dsn-pw-also-secret"
    port = closed_port()
    dsn = f"http://bob:{dsn_password}@127.0.0.1:{port}/"
    with pytest.raises(SinkError) as raised:
        connect(dsn, "alice", password, connect_timeout=2)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"cannot open ClickHouse at http://127.0.0.1:{port}/: ")
    assert "OperationalError" in message  # the connection itself failed
    text = full_text(raised.value)
    assert password not in text and dsn_password not in text


class _RefusingServer:
    """An HTTP endpoint answering every request as a ClickHouse server answers a wrong
    password (HTTP 516, ``Code: 516 ... AUTHENTICATION_FAILED``). No ClickHouse server runs
    on this machine (chDB has no authentication), and what is under test is our handling of
    the driver's error, not the server."""

    def __enter__(self) -> str:
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def _refuse(self) -> None:
                body = (
                    b"Code: 516. DB::Exception: alice: Authentication failed: password is "
                    b"incorrect, or there is no user with such name. (AUTHENTICATION_FAILED)"
                )
                self.send_response(516)
                self.send_header("X-ClickHouse-Exception-Code", "516")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _refuse

            def log_message(self, *args: Any) -> None:
                return None

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}/"

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_wrong_clickhouse_password_fails_in_one_line_without_the_password():
    password = "pw-Wr0ng-do-not-log"
    with _RefusingServer() as url, pytest.raises(SinkError) as raised:
        connect(url, "alice", password, connect_timeout=2)
    message = str(raised.value)
    assert "\n" not in message
    assert "Authentication failed" in message or "516" in message, message
    assert password not in full_text(raised.value)


def test_the_cli_with_a_wrong_clickhouse_password_prints_one_line_without_it(tmp_path):
    import subprocess
    import sys

    password = "pw-Wr0ng-cli-do-not-log"
    with _RefusingServer() as url:
        result = subprocess.run(
            [sys.executable, "-m", "jobs.cli", "report", "--org", "o", "--month", "2026-11"],
            env={
                **{k: v for k, v in os.environ.items() if not k.startswith("METERING_")},
                "METERING_CLICKHOUSE_DSN": url,
                "METERING_CLICKHOUSE_USER": "alice",
                "METERING_CLICKHOUSE_PASSWORD": password,
                "METERING_DATA_DIR": str(tmp_path),
            },
            capture_output=True,
            text=True,
            timeout=60,
        )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert output.count("\n") == 1 and output.startswith("error: "), output
    assert "516" in output or "Authentication failed" in output, output
    assert password not in output


def test_connect_refuses_an_unknown_scheme():
    with pytest.raises(SinkError, match="unsupported ClickHouse DSN"):
        connect("clickhouse://user:pw@host:9000", "user", "pw")


def test_a_second_chdb_path_in_this_process_is_refused(client: Client, tmp_path):
    with pytest.raises(SinkError, match="cannot open ClickHouse at chdb://") as raised:
        connect(f"chdb://{tmp_path / 'other'}")
    assert "already initialized" in str(raised.value)
    assert query_rows(client, "SELECT 1 AS one") == [{"one": 1}]  # the open store is unharmed


def test_a_batch_of_10k_rows_is_one_insert(client: Client, database: str, sink: ClickHouseSink):
    sink.add([priced_row(f"bulk-{n}", offset=n) for n in range(10_000)])
    started = time.perf_counter()
    assert sink.flush() == 10_000
    elapsed = time.perf_counter() - started
    rows = query_rows(client, f"SELECT count() AS n FROM {database}.priced_events")
    assert rows == [{"n": 10_000}]
    assert elapsed < 30, f"10k-row flush took {elapsed:.1f} s"
