"""The Enterprise monthly statement (jobs/invoice.py) and its named queries (sinks/queries.py),
without a database: statement assembly, exact money, CSV/JSON shape, totals equal to the sum
of the lines, the invoice command over a canned reader, and bound query values.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections import defaultdict
from datetime import date
from decimal import Decimal
from typing import Any

import pytest
import typer
from hypothesis import given
from hypothesis import strategies as st

import jobs.cli
from jobs import enforcement_cli
from jobs.invoice import (
    CSV_COLUMNS,
    InconsistentStatement,
    build_statement,
    to_csv,
    to_dict,
    to_json,
    usd_to_nano_exact,
)
from sinks.queries import (
    NAMED_QUERIES,
    build,
    invoice_by_member,
    invoice_by_model,
    invoice_total,
    org_plan,
)

MEMBER_ROWS = [
    {"user_id": "u-1", "seat_tier": "PREMIUM", "requests": 2, "extra_cost_usd": Decimal("2.5")},
    {"user_id": "u-2", "seat_tier": "STANDARD", "requests": 1, "extra_cost_usd": Decimal("5E-9")},
]
MODEL_ROWS = [
    {
        "model_family": "Opus 4",
        "requests": 1,
        "input_tokens": 10,
        "output_tokens": 20,
        "cache_creation_input_tokens": 30,
        "cache_read_input_tokens": 40,
        "extra_cost_usd": Decimal("2.499999999"),
    },
    {
        "model_family": "Sonnet 4",
        "requests": 2,
        "input_tokens": 1,
        "output_tokens": 2,
        "cache_creation_input_tokens": 3,
        "cache_read_input_tokens": 4,
        "extra_cost_usd": Decimal("6E-9"),
    },
]
TOTAL_ROWS = [{"requests": 3, "extra_cost_usd": Decimal("2.500000005")}]


def _statement():
    return build_statement("org-1", "2026-11", MEMBER_ROWS, MODEL_ROWS, TOTAL_ROWS)


# -- money ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "nano"),
    [
        (Decimal("5E-9"), 5),
        (Decimal("0E-9"), 0),
        (Decimal("2.500000001"), 2_500_000_001),
        (Decimal("12.5"), 12_500_000_000),
        (Decimal("1E+3"), 1_000_000_000_000),
        (Decimal("-0.000000001"), -1),
        # Decimal(38, 9) at its widest: beyond the default 28-digit context, still exact.
        (Decimal("99999999999999999999999999999.999999999"), 10**38 - 1),
        ("3.000000000", 3_000_000_000),
        (7, 7_000_000_000),
    ],
)
def test_store_amounts_convert_to_nano_exactly(value: Any, nano: int) -> None:
    assert usd_to_nano_exact(value) == nano


@pytest.mark.parametrize("value", [Decimal("0.0000000001"), Decimal("NaN"), Decimal("Infinity")])
def test_store_amounts_finer_than_nano_or_not_finite_are_refused(value: Decimal) -> None:
    with pytest.raises(ValueError):
        usd_to_nano_exact(value)


# -- assembly ------------------------------------------------------------------------------


def test_statement_keeps_lines_and_totals_in_nano() -> None:
    statement = _statement()
    assert [(m.user_id, m.seat_tier, m.requests, m.extra_cost_nano) for m in statement.members] == [
        ("u-1", "PREMIUM", 2, 2_500_000_000),
        ("u-2", "STANDARD", 1, 5),
    ]
    assert [(m.model_family, m.extra_cost_nano) for m in statement.models] == [
        ("Opus 4", 2_499_999_999),
        ("Sonnet 4", 6),
    ]
    assert (statement.requests, statement.extra_cost_nano) == (3, 2_500_000_005)
    assert statement.token_total("cache_read_input_tokens") == 44


@pytest.mark.parametrize(
    ("members", "models", "total"),
    [
        (MEMBER_ROWS, MODEL_ROWS, [{"requests": 3, "extra_cost_usd": Decimal("2.500000006")}]),
        (MEMBER_ROWS, MODEL_ROWS, [{"requests": 4, "extra_cost_usd": Decimal("2.500000005")}]),
        (MEMBER_ROWS[:1], MODEL_ROWS, TOTAL_ROWS),
        (MEMBER_ROWS, MODEL_ROWS[:1], TOTAL_ROWS),
    ],
)
def test_rows_that_do_not_add_up_are_refused(members, models, total) -> None:
    with pytest.raises(InconsistentStatement, match=r"does not add up.*run it again"):
        build_statement("org-1", "2026-11", members, models, total)


def test_a_month_without_extra_usage_is_an_empty_statement() -> None:
    zero = [{"requests": 0, "extra_cost_usd": Decimal("0E-9")}]
    for total in (zero, []):
        statement = build_statement("org-1", "2026-11", [], [], total)
        assert (statement.members, statement.models, statement.extra_cost_nano) == ((), (), 0)
    assert to_csv(statement).splitlines()[1:] == ["total,org-1,2026-11,,,,0,0,0,0,0,0.000000000"]


# -- rendering -----------------------------------------------------------------------------


def test_csv_has_one_header_member_model_and_total_rows() -> None:
    text = to_csv(_statement())
    assert "\r" not in text and text.endswith("\n")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [row["section"] for row in rows] == ["member", "member", "model", "model", "total"]
    assert rows[0] | {} == {
        "section": "member",
        "org_id": "org-1",
        "month": "2026-11",
        "user_id": "u-1",
        "seat_tier": "PREMIUM",
        "model_family": "",
        "requests": "2",
        "input_tokens": "",
        "output_tokens": "",
        "cache_creation_input_tokens": "",
        "cache_read_input_tokens": "",
        "extra_cost_usd": "2.500000000",
    }
    assert rows[3]["model_family"] == "Sonnet 4" and rows[3]["extra_cost_usd"] == "0.000000006"
    assert rows[4]["input_tokens"] == "11" and rows[4]["extra_cost_usd"] == "2.500000005"


def test_json_has_exact_decimal_strings() -> None:
    document = json.loads(to_json(_statement()))
    assert document == to_dict(_statement())
    assert document["currency"] == "USD" and document["month"] == "2026-11"
    assert document["members"][1] == {
        "user_id": "u-2",
        "seat_tier": "STANDARD",
        "requests": 1,
        "extra_cost_usd": "0.000000005",
    }
    assert document["models"][0]["cache_creation_input_tokens"] == 30
    assert document["total"] == {
        "requests": 3,
        "input_tokens": 11,
        "output_tokens": 22,
        "cache_creation_input_tokens": 33,
        "cache_read_input_tokens": 44,
        "extra_cost_usd": "2.500000005",
    }


EXTRA_EVENTS = st.lists(
    st.tuples(
        st.sampled_from(["u-1", "u-2", "u-3", "u-4"]),
        st.sampled_from(["STANDARD", "PREMIUM"]),
        st.sampled_from(["Opus 4", "Sonnet 4", "Haiku 3.5"]),
        st.integers(min_value=0, max_value=10_000 * 10**9),  # nano-USD per request
        st.integers(min_value=0, max_value=10**8),
    ),
    max_size=60,
)


def _usd(nano: int) -> Decimal:
    return Decimal(nano).scaleb(-9)


@given(EXTRA_EVENTS)
def test_totals_equal_the_sum_of_the_lines_to_the_nano(events) -> None:
    """Group events the way the three queries do; the rendered statement adds up exactly."""
    members: dict[str, list[Any]] = defaultdict(lambda: ["", 0, 0])
    models: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for user, tier, family, cost, tokens in events:
        members[user][0] = tier
        members[user][1] += 1
        members[user][2] += cost
        models[family][0] += 1
        models[family][1] += tokens
        models[family][2] += cost
    statement = build_statement(
        "o",
        "2026-11",
        [
            {"user_id": u, "seat_tier": t, "requests": n, "extra_cost_usd": _usd(c)}
            for u, (t, n, c) in members.items()
        ],
        [
            {
                "model_family": f,
                "requests": n,
                "input_tokens": k,
                "output_tokens": 0,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "extra_cost_usd": _usd(c),
            }
            for f, (n, k, c) in models.items()
        ],
        [{"requests": len(events), "extra_cost_usd": _usd(sum(e[3] for e in events))}],
    )
    rows = list(csv.DictReader(io.StringIO(to_csv(statement))))
    total = rows[-1]
    for section in ("member", "model"):
        lines = [row for row in rows if row["section"] == section]
        assert sum(Decimal(row["extra_cost_usd"]) for row in lines) == Decimal(
            total["extra_cost_usd"]
        )
        assert sum(int(row["requests"]) for row in lines) == int(total["requests"])
    assert Decimal(total["extra_cost_usd"]) == _usd(sum(e[3] for e in events))


# -- named queries -------------------------------------------------------------------------

NASTY = "x'); DROP TABLE metering.priced_events_store; --"


@pytest.mark.parametrize("name", ["invoice_by_member", "invoice_by_model", "invoice_total"])
def test_invoice_queries_bind_every_value_and_read_extra_usage_only(name: str) -> None:
    sql, parameters = build(name, {"org_id": NASTY, "month": "2026-12-01"})
    assert NASTY not in sql and "2026" not in sql
    assert parameters == {
        "org": NASTY,
        "start": "2026-12-01 00:00:00",
        "end": "2027-01-01 00:00:00",
    }
    assert "e.extra_usage = 1" in sql and "FROM metering.priced_events AS e" in sql
    assert "sum(e.cost_usd) AS extra_cost_usd" in sql  # source column via the alias
    assert NAMED_QUERIES[name](NASTY, date(2026, 12, 1)) == (sql, parameters)


def test_invoice_queries_group_as_the_statement_needs() -> None:
    member_sql, _ = invoice_by_member("o", date(2026, 11, 1))
    assert "GROUP BY e.user_id" in member_sql
    assert "argMax(e.seat_tier, e.occurred_at) AS seat_tier" in member_sql
    assert "count() AS requests" in member_sql
    model_sql, _ = invoice_by_model("o", date(2026, 11, 1))
    assert "GROUP BY e.model_family" in model_sql
    for field in ("input_tokens", "output_tokens", "cache_creation_input_tokens"):
        assert f"sum(e.{field}) AS {field}" in model_sql
    total_sql, _ = invoice_total("o", date(2026, 11, 1))
    assert "GROUP BY" not in total_sql  # always exactly one row


def test_org_plan_binds_the_org_and_reads_the_newest_event() -> None:
    sql, parameters = build("org_plan", {"org_id": NASTY})
    assert NASTY not in sql and parameters == {"org": NASTY}
    assert "ORDER BY e.occurred_at DESC" in sql and sql.endswith("LIMIT 1")
    assert (sql, parameters) == org_plan(NASTY)


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("invoice_by_member", {"org_id": "o"}),
        ("invoice_by_model", {"org_id": "o", "month": "2026-11"}),
        ("invoice_total", {"org_id": 5, "month": "2026-11-01"}),
        ("org_plan", {"org_id": "o", "month": "2026-11-01"}),
    ],
)
def test_invoice_queries_refuse_arguments_that_do_not_fit(name: str, args: dict) -> None:
    with pytest.raises(ValueError):
        build(name, args)


# -- the invoice command over a canned reader ---------------------------------------------


class CannedReader:
    def __init__(self, plan: str | None) -> None:
        self.plan = plan
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.closed = False

    def named(self, name: str, **args: Any) -> list[dict[str, Any]]:
        self.calls.append((name, args))
        return {
            "org_plan": [{"plan": self.plan}] if self.plan else [],
            "invoice_by_member": MEMBER_ROWS,
            "invoice_by_model": MODEL_ROWS,
            "invoice_total": TOTAL_ROWS,
        }[name]

    def close(self) -> None:
        self.closed = True


def _invoice(monkeypatch, capsys, reader: CannedReader, *args: str) -> tuple[int, str, str]:
    app = typer.Typer(name="metering", pretty_exceptions_enable=False, add_completion=False)
    enforcement_cli.register(app)
    monkeypatch.setattr(jobs.cli, "cli", app)
    monkeypatch.setattr("sinks.access.open_reader", lambda settings: reader)
    monkeypatch.setattr(sys, "argv", ["metering", "invoice", *args])
    with pytest.raises(SystemExit) as exited:
        jobs.cli.main()
    captured = capsys.readouterr()
    return int(exited.value.code or 0), captured.out, captured.err


def test_invoice_prints_the_statement_as_csv(monkeypatch, capsys) -> None:
    reader = CannedReader("ENTERPRISE")
    code, out, err = _invoice(monkeypatch, capsys, reader, "--org", "org-1", "--month", "2026-11")
    assert (code, err) == (0, "")
    assert out == to_csv(_statement())
    assert reader.closed
    assert ("invoice_total", {"org_id": "org-1", "month": date(2026, 11, 1)}) in reader.calls


def test_invoice_prints_json_on_request(monkeypatch, capsys) -> None:
    reader = CannedReader("ENTERPRISE")
    code, out, _ = _invoice(
        monkeypatch, capsys, reader, "--org", "org-1", "--month", "2026-11", "--format", "JSON"
    )
    assert code == 0 and json.loads(out) == to_dict(_statement())


def test_invoice_refuses_a_team_org(monkeypatch, capsys) -> None:
    reader = CannedReader("TEAM")
    code, out, err = _invoice(monkeypatch, capsys, reader, "--org", "t", "--month", "2026-11")
    assert code == 2 and out == "" and reader.closed
    [line] = err.strip().splitlines()
    assert "TEAM plan" in line and "Enterprise" in line
    assert [name for name, _ in reader.calls] == ["org_plan"]


def test_invoice_of_an_org_the_store_never_saw_warns(monkeypatch, capsys) -> None:
    reader = CannedReader(None)
    code, out, err = _invoice(monkeypatch, capsys, reader, "--org", "nobody", "--month", "2026-11")
    assert code == 0 and "no usage of org nobody" in err and out.startswith("section,")
