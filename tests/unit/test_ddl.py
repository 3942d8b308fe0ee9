"""The ClickHouse schema builders, checked as SQL text (no database)."""

from __future__ import annotations

import re

import pytest

from core.usage import TOKEN_FIELDS
from sinks import ddl

SPEC_PRICED_EVENTS = (
    "event_id",
    "occurred_at",
    "org_id",
    "plan",
    "user_id",
    "seat_tier",
    "product",
    "model",
    "model_family",
    *TOKEN_FIELDS,
    "long_context",
    "extra_usage",
    "cost_usd",
    "pricing_version",
)
SPEC_MEASURES = ("events", *TOKEN_FIELDS, "cost_usd", "extra_cost_usd")
SPEC_ROLLUPS = {
    "org_month": ("month", "org_id", *SPEC_MEASURES),
    "tier_month": ("month", "org_id", "seat_tier", *SPEC_MEASURES),
    "user_month": ("month", "org_id", "user_id", *SPEC_MEASURES),
    "usage_hourly": ("hour", "org_id", "user_id", "model_family", *SPEC_MEASURES),
}


def flat(sql: str) -> str:
    """The SQL without comments and with whitespace collapsed."""
    without_comments = re.sub(r"--[^\n]*", "", sql)
    return " ".join(without_comments.split())


def statement(prefix: str, database: str = "metering") -> str:
    matches = [flat(s) for s in ddl.schema_statements(database) if flat(s).startswith(prefix)]
    assert len(matches) == 1, f"expected one statement starting with {prefix!r}"
    return matches[0]


def test_statements_are_idempotent_and_in_dependency_order() -> None:
    statements = [flat(s) for s in ddl.schema_statements()]
    assert statements[0] == "CREATE DATABASE IF NOT EXISTS `metering`"
    for sql in statements[1:]:
        assert sql.startswith(("CREATE TABLE IF NOT EXISTS", "CREATE OR REPLACE VIEW"))
    created = [re.search(r"`metering`\.`(\w+)`", sql).group(1) for sql in statements[1:]]
    assert created == [
        "priced_events_store",
        "priced_events",
        "org_month",
        "tier_month",
        "user_month",
        "usage_hourly",
        "enforcement_log_store",
        "enforcement_log",
        "replay_log_store",
        "replay_log",
    ]
    # Every object read by a view exists before the view is created.
    for index, sql in enumerate(statements[1:]):
        for source in re.findall(r"FROM `metering`\.`(\w+)`", sql):
            assert source in created[:index]


def test_priced_store_engine_partitioning_and_sorting_key() -> None:
    sql = statement("CREATE TABLE IF NOT EXISTS `metering`.`priced_events_store`")
    assert "ENGINE = ReplacingMergeTree(revision)" in sql
    assert "PARTITION BY toYYYYMM(occurred_at)" in sql
    assert sql.endswith("ORDER BY (org_id, event_id)")
    for column in (
        "event_id String",
        "occurred_at DateTime64(3, 'UTC')",
        "plan LowCardinality(String)",
        "input_tokens UInt64",
        "output_tokens UInt64",
        "cache_creation_input_tokens UInt64",
        "cache_read_input_tokens UInt64",
        "long_context UInt8",
        "extra_usage UInt8",
        "cost_usd Decimal(38, 9)",
        "pricing_version String",
        "revision UInt64",
        "source_partition Int32",
        "source_offset Int64",
        "inserted_at DateTime64(3, 'UTC') DEFAULT now64(3)",
    ):
        assert column in sql


def test_priced_store_comments_explain_the_keys() -> None:
    sql = ddl.create_priced_store()
    comments = " ".join(re.findall(r"--([^\n]*)", sql))
    assert "identity" in comments and "revision" in comments and "month" in comments


def test_insert_columns_match_the_store_definition() -> None:
    assert ddl.PRICED_COLUMNS[: len(SPEC_PRICED_EVENTS)] == SPEC_PRICED_EVENTS
    assert ddl.PRICED_COLUMNS[len(SPEC_PRICED_EVENTS) :] == (
        "revision",
        "source_partition",
        "source_offset",
    )
    assert len(ddl.PRICED_COLUMN_TYPES) == len(ddl.PRICED_COLUMNS)
    store = statement("CREATE TABLE IF NOT EXISTS `metering`.`priced_events_store`")
    for name, type_ in zip(ddl.PRICED_COLUMNS, ddl.PRICED_COLUMN_TYPES, strict=True):
        assert f"{name} {type_}," in store
    enforcement = statement("CREATE TABLE IF NOT EXISTS `metering`.`enforcement_log_store`")
    for name, type_ in zip(ddl.ENFORCEMENT_COLUMNS, ddl.ENFORCEMENT_COLUMN_TYPES, strict=True):
        assert f"{name} {type_}," in enforcement


def test_priced_events_view_selects_the_contract_columns_from_final() -> None:
    sql = statement("CREATE OR REPLACE VIEW `metering`.`priced_events`")
    assert sql == (
        "CREATE OR REPLACE VIEW `metering`.`priced_events` AS SELECT "
        + ", ".join(SPEC_PRICED_EVENTS)
        + " FROM `metering`.`priced_events_store` FINAL"
    )


@pytest.mark.parametrize("view", sorted(SPEC_ROLLUPS))
def test_rollup_views_name_every_contract_column(view: str) -> None:
    sql = statement(f"CREATE OR REPLACE VIEW `metering`.`{view}`")
    aliases = re.findall(r"AS (\w+)(?:,| FROM)", sql)
    assert tuple(aliases) == SPEC_ROLLUPS[view]
    assert "FROM `metering`.`priced_events` AS e" in sql
    groups = [name for name in SPEC_ROLLUPS[view] if name not in SPEC_MEASURES]
    assert sql.endswith("GROUP BY " + ", ".join(groups))
    assert tuple(c.name for c in ddl.CONTRACT_VIEWS[view]) == SPEC_ROLLUPS[view]


def test_rollup_measures_and_periods() -> None:
    sql = statement("CREATE OR REPLACE VIEW `metering`.`usage_hourly`")
    assert "toDateTime(toStartOfHour(e.occurred_at), 'UTC') AS hour" in sql
    assert "count() AS events" in sql
    assert "sum(e.cost_usd) AS cost_usd" in sql
    assert "sumIf(e.cost_usd, e.extra_usage = 1) AS extra_cost_usd" in sql
    for name in TOKEN_FIELDS:
        assert f"sum(e.{name}) AS {name}" in sql
    month = statement("CREATE OR REPLACE VIEW `metering`.`org_month`")
    assert "toStartOfMonth(e.occurred_at) AS month" in month


def test_contract_types() -> None:
    types = {name: dict(columns) for name, columns in ddl.CONTRACT_VIEWS.items()}
    assert types["priced_events"]["occurred_at"] == "DateTime64(3, 'UTC')"
    assert types["priced_events"]["cost_usd"] == "Decimal(38, 9)"
    assert types["priced_events"]["long_context"] == "UInt8"
    for view in SPEC_ROLLUPS:
        assert types[view]["cost_usd"] == types[view]["extra_cost_usd"] == "Decimal(38, 9)"
        assert types[view]["events"] == "UInt64"
        assert all(types[view][name] == "UInt64" for name in TOKEN_FIELDS)
    assert types["org_month"]["month"] == "Date"
    assert types["usage_hourly"]["hour"] == "DateTime('UTC')"


def test_enforcement_log() -> None:
    store = statement("CREATE TABLE IF NOT EXISTS `metering`.`enforcement_log_store`")
    assert "ENGINE = ReplacingMergeTree ORDER BY event_id" in store
    for column in (
        "user_id Nullable(String)",
        "spend_usd Decimal(38, 9)",
        "limit_usd Nullable(Decimal(38, 9))",
        "limit_source Nullable(String)",
        "emitted_at DateTime64(3, 'UTC')",
        "amount_usd Nullable(Decimal(38, 9))",
        "balance_usd Nullable(Decimal(38, 9))",
    ):
        assert column in store
    view = statement("CREATE OR REPLACE VIEW `metering`.`enforcement_log`")
    assert view.endswith("FROM `metering`.`enforcement_log_store` FINAL")
    for name in ("event_id", "action", "scope", "reason", "org_id", "period", "trigger_id"):
        assert name in view


def test_database_name_is_configurable() -> None:
    statements = ddl.schema_statements("metering_test_1")
    assert all("`metering_test_1`." in s for s in statements[1:])
    assert not any("`metering`" in s for s in statements)


@pytest.mark.parametrize(
    "name", ["", "1abc", "metering; DROP TABLE x", "a`b", "a.b", "métering", "x" * 65]
)
def test_unsafe_database_names_are_rejected(name: str) -> None:
    with pytest.raises(ValueError, match="invalid ClickHouse identifier"):
        ddl.schema_statements(name)
