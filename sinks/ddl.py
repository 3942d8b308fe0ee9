"""ClickHouse schema: pure builders returning SQL text, and the column lists the sink inserts.

Layout. Priced events live in ONE storage table, ``<db>.priced_events_store``. Every name of the
SPEC §6 contract (``priced_events``, ``org_month``, ``tier_month``, ``user_month``,
``usage_hourly``, ``enforcement_log``) is a plain VIEW over a storage table read with ``FINAL``,
so analysts always see the deduplicated, final state, and the monthly and hourly aggregates are
computed from exactly the line items ``priced_events`` shows: a replay rewrites one table and
every view agrees with it at once. There are no materialized aggregates that could drift.

Every statement is idempotent (``IF NOT EXISTS`` for storage, ``CREATE OR REPLACE VIEW`` for
views, so a changed view definition takes effect on the next start). Nothing here touches a
database; :func:`sinks.clickhouse.ensure_schema` runs :func:`schema_statements`.

Identifiers (database names) cannot be bound as query parameters, so they are validated against
a strict pattern and quoted; every *value* is bound by the callers, never formatted into SQL.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from core.usage import TOKEN_FIELDS

DEFAULT_DATABASE = "metering"

PRICED_STORE = "priced_events_store"
PRICED_EVENTS = "priced_events"
ORG_MONTH = "org_month"
TIER_MONTH = "tier_month"
USER_MONTH = "user_month"
USAGE_HOURLY = "usage_hourly"
ENFORCEMENT_STORE = "enforcement_log_store"
ENFORCEMENT_LOG = "enforcement_log"
REPLAY_STORE = "replay_log_store"
REPLAY_LOG = "replay_log"

MONEY = "Decimal(38, 9)"
"""SPEC §6: money is USD as Decimal(38, 9), i.e. exactly integer nano-USD scaled by 1e-9."""


class Column(NamedTuple):
    """One column: its name and ClickHouse type."""

    name: str
    type: str


def _names(columns: tuple[Column, ...]) -> tuple[str, ...]:
    return tuple(column.name for column in columns)


def _types(columns: tuple[Column, ...]) -> tuple[str, ...]:
    return tuple(column.type for column in columns)


# --- priced events -------------------------------------------------------------------------------

_TOKEN_COLUMNS: tuple[Column, ...] = tuple(Column(name, "UInt64") for name in TOKEN_FIELDS)

# The SPEC §6 columns of ``priced_events``, in contract order. Enumerations and model names are
# LowCardinality: a handful of distinct values per column, dictionary-encoded on disk.
PRICED_EVENT_CONTRACT: tuple[Column, ...] = (
    Column("event_id", "String"),
    Column("occurred_at", "DateTime64(3, 'UTC')"),
    Column("org_id", "String"),
    Column("plan", "LowCardinality(String)"),
    Column("user_id", "String"),
    Column("seat_tier", "LowCardinality(String)"),
    Column("product", "LowCardinality(String)"),
    Column("model", "LowCardinality(String)"),
    Column("model_family", "LowCardinality(String)"),
    *_TOKEN_COLUMNS,
    Column("long_context", "UInt8"),
    Column("extra_usage", "UInt8"),
    Column("cost_usd", MONEY),
    Column("pricing_version", "String"),
)

# What the sink writes, in insert order: the contract columns plus the bookkeeping that makes
# rewrites safe (``revision``, the ReplacingMergeTree version) and traceable (the Kafka position
# the row came from). ``inserted_at`` is filled by the server and is not part of an insert.
PRICED_STORE_INSERT: tuple[Column, ...] = (
    *PRICED_EVENT_CONTRACT,
    Column("revision", "UInt64"),
    Column("source_partition", "Int32"),
    Column("source_offset", "Int64"),
)
PRICED_COLUMNS: tuple[str, ...] = _names(PRICED_STORE_INSERT)
"""Column names of ``priced_events_store`` in the order the sink's insert rows use."""
PRICED_COLUMN_TYPES: tuple[str, ...] = _types(PRICED_STORE_INSERT)
"""ClickHouse types parallel to :data:`PRICED_COLUMNS` (lets the driver skip a DESCRIBE)."""

# --- aggregates ----------------------------------------------------------------------------------

# sum() of UInt64 is UInt64 and sum()/sumIf() of Decimal(38, 9) stay Decimal(38, 9) (ClickHouse
# keeps Decimal128's scale), so no cast is needed; the integration test checks this with DESCRIBE.
MEASURES: tuple[Column, ...] = (
    Column("events", "UInt64"),
    *_TOKEN_COLUMNS,
    Column("cost_usd", MONEY),
    Column("extra_cost_usd", MONEY),
)

# Source columns are qualified with the table alias ``e``: an alias such as ``cost_usd`` for
# ``sum(cost_usd)`` would otherwise be substituted into ``sumIf(cost_usd, ...)`` and ClickHouse
# rejects the nested aggregate (ILLEGAL_AGGREGATION). Qualified names never resolve to aliases.
_MEASURE_EXPRESSIONS: tuple[str, ...] = (
    "count() AS events",
    *(f"sum(e.{name}) AS {name}" for name in TOKEN_FIELDS),
    "sum(e.cost_usd) AS cost_usd",
    "sumIf(e.cost_usd, e.extra_usage = 1) AS extra_cost_usd",
)

_MONTH = Column("month", "Date")
_HOUR = Column("hour", "DateTime('UTC')")
_ORG = Column("org_id", "String")

# Grouping columns of each aggregate view (in contract order) and the expression of each.
_GROUP_EXPRESSIONS: dict[str, str] = {
    # Period = calendar month in UTC (SPEC §4); occurred_at is stored in UTC, so the start of
    # its month is the period's first day.
    "month": "toStartOfMonth(e.occurred_at)",
    "hour": "toDateTime(toStartOfHour(e.occurred_at), 'UTC')",
}

_ROLLUPS: dict[str, tuple[Column, ...]] = {
    ORG_MONTH: (_MONTH, _ORG),
    TIER_MONTH: (_MONTH, _ORG, Column("seat_tier", "LowCardinality(String)")),
    USER_MONTH: (_MONTH, _ORG, Column("user_id", "String")),
    USAGE_HOURLY: (
        _HOUR,
        _ORG,
        Column("user_id", "String"),
        Column("model_family", "LowCardinality(String)"),
    ),
}

# --- enforcement log -----------------------------------------------------------------------------

# Every PAUSE, RESUME and RELOAD_REQUESTED emitted (SPEC §5), in insert order. Amounts are USD.
ENFORCEMENT_CONTRACT: tuple[Column, ...] = (
    Column("event_id", "String"),
    Column("action", "LowCardinality(String)"),
    Column("scope", "LowCardinality(String)"),
    Column("reason", "LowCardinality(String)"),
    Column("org_id", "String"),
    Column("user_id", "Nullable(String)"),
    Column("period", "String"),
    Column("spend_usd", MONEY),
    Column("limit_usd", f"Nullable({MONEY})"),
    Column("limit_source", "Nullable(String)"),
    Column("trigger_id", "String"),
    Column("emitted_at", "DateTime64(3, 'UTC')"),
    Column("amount_usd", f"Nullable({MONEY})"),
    Column("balance_usd", f"Nullable({MONEY})"),
)
ENFORCEMENT_COLUMNS: tuple[str, ...] = _names(ENFORCEMENT_CONTRACT)
"""Column names of ``enforcement_log_store`` in the order the sink's insert rows use."""
ENFORCEMENT_COLUMN_TYPES: tuple[str, ...] = _types(ENFORCEMENT_CONTRACT)
"""ClickHouse types parallel to :data:`ENFORCEMENT_COLUMNS`."""

# --- replay log ----------------------------------------------------------------------------------

# One row per finished replay (``metering replay``), from the ``metering.replays`` topic.
REPLAY_CONTRACT: tuple[Column, ...] = (
    Column("replay_id", "String"),
    Column("finished_at", "DateTime64(3, 'UTC')"),
    Column("since", "DateTime64(3, 'UTC')"),
    Column("until", "Nullable(DateTime64(3, 'UTC'))"),  # NULL: no end
    Column("price_versions", "Array(String)"),
    Column("versions_used", "Array(String)"),
    Column("records_scanned", "UInt64"),
    Column("events_in_range", "UInt64"),
    Column("events_repriced", "UInt64"),
    Column("events_unpriceable", "UInt64"),
    Column("orgs", "UInt64"),
    Column("old_cost_usd", MONEY),
    Column("new_cost_usd", MONEY),
)
REPLAY_COLUMNS: tuple[str, ...] = _names(REPLAY_CONTRACT)
REPLAY_COLUMN_TYPES: tuple[str, ...] = _types(REPLAY_CONTRACT)

CONTRACT_VIEWS: dict[str, tuple[Column, ...]] = {
    PRICED_EVENTS: PRICED_EVENT_CONTRACT,
    **{name: (*groups, *MEASURES) for name, groups in _ROLLUPS.items()},
    ENFORCEMENT_LOG: ENFORCEMENT_CONTRACT,
    REPLAY_LOG: REPLAY_CONTRACT,
}
"""Every SPEC §6 view and the exact (name, type) columns ``DESCRIBE`` must report for it."""

# --- builders ------------------------------------------------------------------------------------

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def quote_identifier(name: str) -> str:
    """Return ``name`` back-quoted for SQL; raise ``ValueError`` unless it is a plain identifier.

    Only ``[A-Za-z_][A-Za-z0-9_]*`` (at most 64 characters) is accepted, so a configured
    database name can never change the meaning of a statement.
    """
    if not _IDENTIFIER.fullmatch(name):
        raise ValueError(
            f"invalid ClickHouse identifier {name!r}: use letters, digits and underscores, "
            "not starting with a digit"
        )
    return f"`{name}`"


def qualified(database: str, table: str) -> str:
    """``database.table``, both quoted (see :func:`quote_identifier`)."""
    return f"{quote_identifier(database)}.{quote_identifier(table)}"


def _column_list(columns: tuple[Column, ...], indent: str = "    ") -> str:
    return ",\n".join(f"{indent}{column.name} {column.type}" for column in columns)


def create_database(database: str = DEFAULT_DATABASE) -> str:
    """``CREATE DATABASE IF NOT EXISTS``."""
    return f"CREATE DATABASE IF NOT EXISTS {quote_identifier(database)}"


def create_priced_store(database: str = DEFAULT_DATABASE) -> str:
    """The storage table behind ``priced_events``: one row per (org_id, event_id) after merges."""
    columns = _column_list(
        (*PRICED_STORE_INSERT, Column("inserted_at", "DateTime64(3, 'UTC') DEFAULT now64(3)"))
    )
    return f"""CREATE TABLE IF NOT EXISTS {qualified(database, PRICED_STORE)}
(
{columns}
)
-- ReplacingMergeTree(revision): rows with the same sorting key collapse to the one with the
-- highest revision (the latest inserted on a tie). A re-delivered event rewrites an identical
-- row; a replay writes revision > 0 and its price wins. Readers use FINAL (see the views), so
-- the collapse is visible before background merges happen.
ENGINE = ReplacingMergeTree(revision)
-- Monthly partitions match the billing period (SPEC §4: calendar month in UTC), so the reports'
-- "one org, one month" queries prune to one partition, and replaying a month rewrites parts of
-- that month only. An event's occurred_at never changes between deliveries or revisions, so all
-- versions of one event land in the same partition and can be merged.
PARTITION BY toYYYYMM(occurred_at)
-- The sorting key is the event identity of SPEC §3, (org_id, event_id): it is what
-- ReplacingMergeTree deduplicates on. org_id first also keeps each org's rows together, and
-- every analyst and report query filters on one org.
ORDER BY (org_id, event_id)"""


def create_priced_events_view(database: str = DEFAULT_DATABASE) -> str:
    """``priced_events``: the SPEC §6 columns of the store, deduplicated with FINAL."""
    columns = ",\n".join(f"    {name}" for name in _names(PRICED_EVENT_CONTRACT))
    return f"""CREATE OR REPLACE VIEW {qualified(database, PRICED_EVENTS)} AS
SELECT
{columns}
-- FINAL merges every version of an event at read time, keeping the highest revision, so
-- analysts never see a duplicate or a superseded price, even before background merges run.
FROM {qualified(database, PRICED_STORE)} FINAL"""


def create_rollup_view(name: str, database: str = DEFAULT_DATABASE) -> str:
    """One of ``org_month``, ``tier_month``, ``user_month``, ``usage_hourly``.

    Aggregates ``priced_events`` (already FINAL), so totals always equal the sum of the line
    items analysts can see. Raises ``KeyError`` for any other name.
    """
    groups = _ROLLUPS[name]
    group_expressions = [
        f"{_GROUP_EXPRESSIONS.get(column.name, 'e.' + column.name)} AS {column.name}"
        for column in groups
    ]
    select = ",\n".join(
        f"    {expression}" for expression in (*group_expressions, *_MEASURE_EXPRESSIONS)
    )
    group_by = ", ".join(column.name for column in groups)
    return f"""CREATE OR REPLACE VIEW {qualified(database, name)} AS
SELECT
{select}
FROM {qualified(database, PRICED_EVENTS)} AS e
GROUP BY {group_by}"""


def create_enforcement_store(database: str = DEFAULT_DATABASE) -> str:
    """The storage table behind ``enforcement_log``: one row per emitted event_id after merges."""
    columns = _column_list(
        (*ENFORCEMENT_CONTRACT, Column("inserted_at", "DateTime64(3, 'UTC') DEFAULT now64(3)"))
    )
    return f"""CREATE TABLE IF NOT EXISTS {qualified(database, ENFORCEMENT_STORE)}
(
{columns}
)
-- Pause, resume and reload events carry a deterministic event_id; a consumer that restarts may
-- see one again (SPEC §5), and ReplacingMergeTree collapses such repeats to one row.
ENGINE = ReplacingMergeTree
-- No partitioning: a few rows per org per month at most, far below the size where partitions
-- pay off. A repeat may carry a different emitted_at, so partitioning by it could also split
-- one event across partitions.
-- The sorting key is the identity the enforcement services rely on: event_id alone.
ORDER BY event_id"""


def _final_view(database: str, view: str, store: str, names: tuple[str, ...]) -> str:
    """``view``: the ``names`` columns of ``store`` read with FINAL (one row per key)."""
    columns = ",\n".join(f"    {name}" for name in names)
    return f"""CREATE OR REPLACE VIEW {qualified(database, view)} AS
SELECT
{columns}
FROM {qualified(database, store)} FINAL"""


def create_enforcement_log_view(database: str = DEFAULT_DATABASE) -> str:
    """``enforcement_log``: every PAUSE, RESUME and RELOAD_REQUESTED once, deduplicated."""
    return _final_view(database, ENFORCEMENT_LOG, ENFORCEMENT_STORE, ENFORCEMENT_COLUMNS)


def create_replay_store(database: str = DEFAULT_DATABASE) -> str:
    """The storage table behind ``replay_log``: one row per replay after merges."""
    columns = _column_list(
        (*REPLAY_CONTRACT, Column("inserted_at", "DateTime64(3, 'UTC') DEFAULT now64(3)"))
    )
    return f"""CREATE TABLE IF NOT EXISTS {qualified(database, REPLAY_STORE)}
(
{columns}
)
-- A sink that restarts may write a replay's record again; ReplacingMergeTree keeps one.
ENGINE = ReplacingMergeTree
ORDER BY replay_id"""


def create_replay_log_view(database: str = DEFAULT_DATABASE) -> str:
    """``replay_log``: every finished replay once, deduplicated."""
    return _final_view(database, REPLAY_LOG, REPLAY_STORE, REPLAY_COLUMNS)


def schema_statements(database: str = DEFAULT_DATABASE) -> list[str]:
    """Every statement of the schema, in dependency order; safe to run on every start.

    Storage tables are created only if missing (their data is never touched); views are
    replaced, so an upgraded view definition applies after a restart. Raises ``ValueError`` for
    an invalid database name.
    """
    return [
        create_database(database),
        create_priced_store(database),
        create_priced_events_view(database),
        *(create_rollup_view(name, database) for name in _ROLLUPS),
        create_enforcement_store(database),
        create_enforcement_log_view(database),
        create_replay_store(database),
        create_replay_log_view(database),
    ]
