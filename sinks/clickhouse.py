"""The ClickHouse side: connecting, creating the schema, the sink, and a small read helper.

Works with an embedded chDB store (``chdb:///abs/path``) or any ClickHouse server over HTTP(S)
(``http(s)://host:port``), both through clickhouse-connect. Everything here is **blocking**;
the stream side runs it off the event loop.

chDB allows one data path per process at a time (opening a second path while a client of the
first is open raises); several clients on the same path share the engine. See SPEC §6 for who
opens the embedded store.

Every error from the driver is re-raised as :class:`~sinks.errors.SinkError` with a one-line
message that names the store without user, password or query string.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from decimal import Context, Decimal, Inexact, Rounded
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import clickhouse_connect
from clickhouse_connect.driver.client import Client

from sinks.ddl import (
    DEFAULT_DATABASE,
    ENFORCEMENT_COLUMN_TYPES,
    ENFORCEMENT_COLUMNS,
    ENFORCEMENT_STORE,
    PRICED_COLUMN_TYPES,
    PRICED_COLUMNS,
    PRICED_STORE,
    REPLAY_COLUMN_TYPES,
    REPLAY_COLUMNS,
    REPLAY_STORE,
    quote_identifier,
    schema_statements,
)
from sinks.errors import SinkError
from sinks.port import BatchingSink, EnforcementRecord, PricedRow

logger = logging.getLogger(__name__)

# Scaling nano-USD to USD must never round: a context wide enough for any Decimal(38, 9) value,
# trapping the slightest rounding instead of hiding it.
_EXACT = Context(prec=80, traps=[Inexact, Rounded])

_MAX_MESSAGE = 300


def nano_to_usd(nano: int) -> Decimal:
    """Integer nano-USD as an exact USD ``Decimal`` with 9 decimal places (for Decimal(38, 9))."""
    return Decimal(nano).scaleb(-9, _EXACT)


def redact_dsn(dsn: str) -> str:
    """The DSN without credentials or query string: safe for logs and error messages."""
    try:
        parts = urlsplit(dsn)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        return "<unparsable DSN>"
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _one_line(error: BaseException, secrets: Sequence[str]) -> str:
    """The first line of ``error``, shortened, with every secret masked."""
    lines = str(error).strip().splitlines()
    message = lines[0] if lines else ""
    for secret in secrets:
        if secret:
            message = message.replace(secret, "***")
    if len(message) > _MAX_MESSAGE:
        message = message[: _MAX_MESSAGE - 3] + "..."
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def _dsn_secrets(dsn: str) -> list[str]:
    """Every spelling of a password the DSN carries (userinfo or ``?password=``)."""
    try:
        parts = urlsplit(dsn)
        found = [parts.password or ""]
    except ValueError:
        return []
    found.append(unquote(found[0]))
    found.extend(parse_qs(parts.query).get("password", []))
    return [secret for secret in found if secret]


def connect(
    dsn: str,
    user: str | None = None,
    password: str | None = None,
    *,
    connect_timeout: float = 10.0,
) -> Client:
    """Open a client for ``dsn`` and check that the store answers.

    ``chdb:///abs/path`` opens (creating if needed) the embedded store at that directory;
    ``user`` and ``password`` are ignored there (chDB has no authentication).
    ``http://`` and ``https://`` reach a server; ``user``/``password`` override credentials in
    the DSN. Raises ``SinkError`` for an unsupported scheme or when the store cannot be opened
    or reached; the message never contains the password.
    """
    scheme = dsn.partition(":")[0].lower()
    safe = redact_dsn(dsn)
    secrets = [s for s in (password, *_dsn_secrets(dsn)) if s]
    try:
        if scheme == "chdb":
            return clickhouse_connect.get_client(dsn=dsn)
        if scheme in ("http", "https"):
            credentials: dict[str, str] = {}
            if user is not None:
                credentials["username"] = user
            if password is not None:
                credentials["password"] = password
            return clickhouse_connect.get_client(
                dsn=dsn, connect_timeout=connect_timeout, **credentials
            )
    except Exception as error:
        raise SinkError(f"cannot open ClickHouse at {safe}: {_one_line(error, secrets)}") from error
    raise SinkError(
        f"unsupported ClickHouse DSN {safe!r}: use chdb:///absolute/path or http(s)://host:port"
    )


def ensure_schema(client: Client, database: str = DEFAULT_DATABASE) -> None:
    """Create the database, storage tables and SPEC §6 views if missing; replace the views.

    Idempotent: safe on every start and from several processes of one server. Raises
    ``SinkError`` naming the statement that failed, ``ValueError`` for an invalid name.
    """
    for statement in schema_statements(database):
        try:
            client.command(statement)
        except Exception as error:
            head = statement.splitlines()[0]
            raise SinkError(f"schema statement failed ({head}): {_one_line(error, ())}") from error


def query_rows(
    client: Client, sql: str, parameters: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Run a read query and return its rows as dicts keyed by column name.

    Values are bound server-side: write placeholders as ``{name:Type}`` in ``sql`` (e.g.
    ``WHERE org_id = {org:String}``) and pass ``parameters={"org": ...}``; never format values
    into ``sql``. ``DateTime`` values come back as timezone-aware UTC datetimes, ``Decimal``
    columns as ``decimal.Decimal``. Raises ``SinkError`` when the store fails the query.
    """
    columns, _, rows = query_typed(client, sql, parameters)
    return [dict(zip(columns, row, strict=True)) for row in rows]


def query_typed(
    client: Client, sql: str, parameters: Mapping[str, Any] | None = None
) -> tuple[tuple[str, ...], tuple[str, ...], list[tuple[Any, ...]]]:
    """Like :func:`query_rows`, but returns ``(column names, ClickHouse type names, rows)``.

    For callers that pass results on (e.g. over HTTP to another process) and need the types
    to decode them again.
    """
    try:
        result = client.query(
            sql, parameters=dict(parameters or {}), query_tz="UTC", tz_mode="aware"
        )
        columns = tuple(result.column_names)
        types = tuple(column_type.name for column_type in result.column_types)
        return columns, types, [tuple(row) for row in result.result_rows]
    except Exception as error:
        raise SinkError(f"query failed: {_one_line(error, ())}") from error


def priced_row_values(row: PricedRow) -> tuple[Any, ...]:
    """The insert tuple of one priced row, in :data:`sinks.ddl.PRICED_COLUMNS` order."""
    event = row.priced.event
    price = row.priced.price
    usage = event.usage
    return (
        event.event_id,
        event.occurred_at_ms,  # DateTime64(3) takes epoch milliseconds as an integer, exactly
        event.org_id,
        event.plan.value,
        event.user_id,
        event.seat_tier.value,
        event.product.value,
        event.model,
        price.model_family,
        usage.input_tokens,
        usage.output_tokens,
        usage.cache_creation_input_tokens,
        usage.cache_read_input_tokens,
        int(price.long_context),
        int(event.extra_usage),
        nano_to_usd(price.cost_nano),
        price.pricing_version,
        row.priced.revision,
        row.source_partition,
        row.source_offset,
    )


def _optional_usd(nano: int | None) -> Decimal | None:
    return None if nano is None else nano_to_usd(nano)


def enforcement_row_values(record: EnforcementRecord) -> tuple[Any, ...]:
    """The insert tuple of one enforcement record, in :data:`ENFORCEMENT_COLUMNS` order."""
    return (
        record.event_id,
        record.action,
        record.scope,
        record.reason,
        record.org_id,
        record.user_id,
        record.period,
        nano_to_usd(record.spend_nano_usd),
        _optional_usd(record.limit_nano_usd),
        record.limit_source,
        record.trigger_id,
        record.emitted_at_ms,
        _optional_usd(record.amount_nano_usd),
        _optional_usd(record.balance_nano_usd),
    )


def replay_row_values(record: Mapping[str, Any]) -> tuple[Any, ...]:
    """The insert tuple of one ``metering.replays`` record, in ``REPLAY_COLUMNS`` order."""
    return (
        record["replay_id"],
        record["finished_at"],
        record["since"],
        record["until"],
        list(record["price_versions"]),
        list(record["versions_used"]),
        record["records_scanned"],
        record["events_in_range"],
        record["events_repriced"],
        record["events_unpriceable"],
        record["orgs"],
        nano_to_usd(record["old_cost_nano"]),
        nano_to_usd(record["new_cost_nano"]),
    )


class ClickHouseSink(BatchingSink):
    """The :class:`~sinks.port.Sink` writing to ``<database>.priced_events_store`` and
    ``<database>.enforcement_log_store`` (run :func:`ensure_schema` first).

    Each flush is at most one INSERT per table. ``close()`` closes ``client`` unless
    ``close_client`` is false (when the client is shared, e.g. with report queries).
    """

    def __init__(
        self, client: Client, database: str = DEFAULT_DATABASE, *, close_client: bool = True
    ) -> None:
        super().__init__()
        quote_identifier(database)  # reject a bad name now, not at the first flush
        self.client = client
        self.database = database
        self._close_client = close_client

    def _insert(
        self,
        table: str,
        rows: list[tuple[Any, ...]],
        columns: Sequence[str],
        types: Sequence[str],
    ) -> None:
        started = time.perf_counter()
        try:
            self.client.insert(
                table,
                rows,
                column_names=list(columns),
                column_type_names=list(types),
                database=self.database,
            )
        except Exception as error:
            raise SinkError(
                f"insert of {len(rows)} rows into {self.database}.{table} failed: "
                f"{_one_line(error, ())}"
            ) from error
        logger.debug(
            "inserted %d rows into %s.%s in %.3f s",
            len(rows),
            self.database,
            table,
            time.perf_counter() - started,
        )

    def _write_priced(self, rows: Sequence[PricedRow]) -> None:
        values = [priced_row_values(row) for row in rows]
        self._insert(PRICED_STORE, values, PRICED_COLUMNS, PRICED_COLUMN_TYPES)

    def _write_enforcement(self, records: Sequence[EnforcementRecord]) -> None:
        values = [enforcement_row_values(record) for record in records]
        self._insert(ENFORCEMENT_STORE, values, ENFORCEMENT_COLUMNS, ENFORCEMENT_COLUMN_TYPES)

    def write_replays(self, records: Sequence[Mapping[str, Any]]) -> None:
        values = [replay_row_values(record) for record in records]
        self._insert(REPLAY_STORE, values, REPLAY_COLUMNS, REPLAY_COLUMN_TYPES)

    def _close(self) -> None:
        if self._close_client:
            self.client.close()
