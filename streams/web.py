"""HTTP endpoints of a worker or sink process (on ``METERING_WEB_PORT``).

* ``GET /metrics`` — Prometheus metrics.
* ``GET /metering/health`` — liveness and whether this process owns the store.
* ``POST /metering/query`` — ``{"sql", "parameters"}``: one read-only statement against the
  store this process owns (the CLI's read path while chDB is held by this process).

The handlers are plain coroutines over (method body) -> (status, bytes, content type), mounted
on Faust's web server in a worker and on a bare aiohttp server in ``metering sink``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from core.settings import Settings
from sinks.access import QUERY_PATH, encode_rows
from sinks.errors import SinkError
from streams.sink_service import active_sink

_READ_ONLY = re.compile(r"^\s*(SELECT|WITH|DESCRIBE|DESC|SHOW|EXISTS)\b", re.IGNORECASE)
Reply = tuple[int, bytes, str]
JSON = "application/json"


def _error(status: int, message: str) -> Reply:
    return status, json.dumps({"error": message}).encode(), JSON


async def metrics_reply() -> Reply:
    return 200, generate_latest(), CONTENT_TYPE_LATEST


async def health_reply() -> Reply:
    return 200, json.dumps({"ok": True, "owns_store": active_sink() is not None}).encode(), JSON


async def query_reply(body: bytes) -> Reply:
    """Run a read-only query on this process's store; 409 when it owns none."""
    sink = active_sink()
    if sink is None:
        return _error(409, "this process does not own the store")
    try:
        request: Any = json.loads(body or b"{}")
        sql = request["sql"]
        parameters = request.get("parameters") or {}
    except (ValueError, KeyError, TypeError):
        return _error(400, 'expected JSON {"sql": ..., "parameters": {...}}')
    if not isinstance(sql, str) or not _READ_ONLY.match(sql) or ";" in sql.strip().rstrip(";"):
        return _error(400, "only one SELECT, WITH, DESCRIBE, SHOW or EXISTS statement")
    try:
        columns, types, rows = await sink.query(sql, parameters)
    except SinkError as exc:
        return _error(400, str(exc))
    return 200, encode_rows(columns, types, rows), JSON


def register_pages(app: Any, settings: Settings) -> None:
    """Mount the endpoints on a Faust app's web server."""
    from faust.web import Request, Response, View

    def respond(view: View, reply: Reply) -> Response:
        status, body, content_type = reply
        # aiohttp refuses a charset inside content_type; Prometheus text is ASCII anyway.
        return view.bytes(body, content_type=content_type.split(";")[0], status=status)

    @app.page("/metrics")
    class Metrics(View):
        async def get(self, request: Request) -> Response:
            return respond(self, await metrics_reply())

    @app.page("/metering/health")
    class Health(View):
        async def get(self, request: Request) -> Response:
            return respond(self, await health_reply())

    @app.page(QUERY_PATH)
    class Query(View):
        async def post(self, request: Request) -> Response:
            return respond(self, await query_reply(await self.read_request_content(request)))


def standalone_web_app() -> Any:
    """The same endpoints on a bare aiohttp application (for ``metering sink``)."""
    from aiohttp import web

    def respond(reply: Reply) -> web.Response:
        status, body, content_type = reply
        return web.Response(body=body, status=status, content_type=content_type.split(";")[0])

    async def metrics(_: web.Request) -> web.Response:
        return respond(await metrics_reply())

    async def health(_: web.Request) -> web.Response:
        return respond(await health_reply())

    async def query(request: web.Request) -> web.Response:
        return respond(await query_reply(await request.read()))

    application = web.Application()
    application.router.add_get("/metrics", metrics)
    application.router.add_get("/metering/health", health)
    application.router.add_post(QUERY_PATH, query)
    return application
