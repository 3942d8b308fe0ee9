"""Read access to the ClickHouse store for operator commands (reports, invoices, tests).

With a ClickHouse server (an ``http(s)://`` DSN) every reader connects directly. With the
embedded chDB store only one process may open the data path, so :func:`open_reader` asks the
owner's web endpoint when a worker or sink runs, and opens the store itself otherwise.
Both readers return the same typed values (``Decimal`` money, ``date``/``datetime``), so
callers cannot tell them apart.
"""

from __future__ import annotations

import json
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Protocol

import httpx

from core.settings import Settings
from sinks.errors import SinkError
from sinks.owner import StoreLock, current_owner

QUERY_PATH = "/metering/query"


class Reader(Protocol):
    def named(self, name: str, **args: Any) -> list[dict[str, Any]]:
        """Run one query of :data:`sinks.queries.NAMED_QUERIES`; rows as dicts by column."""
        ...

    def close(self) -> None: ...


def _json_args(args: dict[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if isinstance(v, date) else v for k, v in args.items()}


def encode_rows(columns: list[str], types: list[str], rows: list[tuple]) -> bytes:
    """Serialise a result for the web endpoint without losing exactness."""

    def plain(value: Any) -> Any:
        if isinstance(value, Decimal):
            return str(value)
        if isinstance(value, datetime | date):
            return value.isoformat()
        if isinstance(value, bytes):
            return value.decode("utf-8", "replace")
        return value

    body = {"columns": columns, "types": types, "rows": [[plain(v) for v in r] for r in rows]}
    return json.dumps(body).encode()


def _typed(type_name: str, value: Any) -> Any:
    if value is None:
        return None
    inner = type_name.removeprefix("Nullable(").removesuffix(")")
    inner = inner.removeprefix("LowCardinality(").removesuffix(")")
    if inner.startswith("Decimal"):
        return Decimal(value)
    if inner.startswith("DateTime"):
        return datetime.fromisoformat(value)
    if inner == "Date" or inner == "Date32":
        return date.fromisoformat(value)
    return value


def decode_rows(payload: dict[str, Any]) -> list[dict[str, Any]]:
    columns, types = payload["columns"], payload["types"]
    return [
        {c: _typed(t, v) for c, t, v in zip(columns, types, row, strict=True)}
        for row in payload["rows"]
    ]


class RemoteReader:
    """Reads through the store owner's ``/metering/query`` endpoint."""

    def __init__(self, url: str, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/") + QUERY_PATH
        self._client = httpx.Client(timeout=timeout)

    def named(self, name: str, **args: Any) -> list[dict[str, Any]]:
        try:
            response = self._client.post(self.url, json={"query": name, "args": _json_args(args)})
        except httpx.HTTPError as exc:
            raise SinkError(f"the store owner at {self.url} did not answer: {exc}") from None
        if response.status_code != 200:
            raise SinkError(f"the store owner refused the query: {response.text[:300]}")
        return decode_rows(response.json())

    def close(self) -> None:
        self._client.close()


class DirectReader:
    """Opens the store (embedded path or server DSN) in this process.

    For the embedded store it holds the ownership lock while open (without a URL, so a worker
    starting meanwhile waits for it rather than giving up its sink).
    """

    def __init__(self, settings: Settings, lock: StoreLock | None = None) -> None:
        from sinks.clickhouse import connect, ensure_schema

        self._lock = lock

        self._client = connect(
            settings.effective_clickhouse_dsn,
            settings.clickhouse_user,
            settings.clickhouse_password.get_secret_value()
            if settings.clickhouse_password
            else None,
        )
        ensure_schema(self._client)

    def named(self, name: str, **args: Any) -> list[dict[str, Any]]:
        from sinks.clickhouse import query_rows
        from sinks.queries import build

        return query_rows(self._client, *build(name, _json_args(args)))

    def close(self) -> None:
        close = getattr(self._client, "close", None)
        if close is not None:
            close()
        if self._lock is not None:
            self._lock.release()


def open_reader(settings: Settings) -> Reader:
    """The right reader for this deployment (see the module docstring)."""
    if not settings.embedded_store:
        return DirectReader(settings)
    lock = StoreLock(settings.chdb_path)
    if lock.acquire(url=None):
        try:
            return DirectReader(settings, lock)
        except BaseException:
            lock.release()
            raise
    owner = current_owner(settings.chdb_path)
    if owner is None or not owner.url:
        raise SinkError(
            "the embedded store is busy (another command is reading it); try again"
            if owner is None or owner.pid != 0
            else "the embedded store is busy; try again"
        )
    return RemoteReader(owner.url)
