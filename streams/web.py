"""HTTP endpoints of a worker or sink process (on ``METERING_WEB_PORT``).

* ``GET /metrics`` — Prometheus metrics.
* ``GET /metering/health`` — liveness and whether this process owns the store.
* ``GET /metering/caps?org=ORG`` — (worker) enforcement state of one org as this worker sees
  it: :func:`core.enforcement.describe` (404 when it has none).
* ``GET /metering/consumer`` — (worker) what its consumer is doing: flow, partitions with
  their offsets as Faust and aiokafka see them, and the event loop's tasks
  (:mod:`streams.diagnostics`), for a worker that has lag and makes no progress.
* ``POST /metering/query`` — ``{"query", "args"}``: one named read query
  (:mod:`sinks.queries`) against the store this process owns — the CLI's read path while chDB
  is held by this process. No SQL is accepted.

The handlers are plain coroutines over (method body) -> (status, bytes, content type), mounted
on Faust's web server in a worker and on a bare aiohttp server in ``metering sink``.
"""

from __future__ import annotations

import json
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from core.settings import Settings
from sinks.access import QUERY_PATH, encode_rows
from sinks.errors import SinkError
from sinks.queries import build
from streams.sink_service import active_sink

Reply = tuple[int, bytes, str]
JSON = "application/json"


def _error(status: int, message: str) -> Reply:
    return status, json.dumps({"error": message}).encode(), JSON


async def metrics_reply() -> Reply:
    return 200, generate_latest(), CONTENT_TYPE_LATEST


async def health_reply() -> Reply:
    return 200, json.dumps({"ok": True, "owns_store": active_sink() is not None}).encode(), JSON


async def query_reply(body: bytes, content_type: str) -> Reply:
    """Run a named read query on this process's store; 409 when it owns none.

    The body is ``{"query": name, "args": {...}}`` naming one of
    :data:`sinks.queries.NAMED_QUERIES`; no SQL is accepted. ``application/json`` is required,
    so a web page cannot trigger the endpoint with a simple cross-site form post.
    """
    if content_type.split(";")[0].strip().lower() != "application/json":
        return _error(415, "send application/json")
    try:
        request: Any = json.loads(body or b"{}")
        sql, parameters = build(request["query"], request.get("args") or {})
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return _error(400, f'expected {{"query": name, "args": {{...}}}}: {exc}')
    sink = active_sink()
    if sink is None:
        return _error(409, "this process does not own the store")
    try:
        columns, types, rows = await sink.query(sql, parameters)
    except SinkError as exc:
        return _error(500, str(exc))
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

    @app.page("/metering/caps")
    class Caps(View):
        async def get(self, request: Request) -> Response:
            org_id = request.query.get("org", "")
            if not org_id:
                return respond(self, _error(400, "give ?org=ORG"))
            caps = app.metering_caps(org_id)
            if caps is None:
                return respond(
                    self,
                    _error(404, f"this worker has no enforcement state for org {org_id!r}"),
                )
            return respond(self, (200, json.dumps(caps).encode(), JSON))

    @app.page("/metering/consumer")
    class ConsumerState(View):
        async def get(self, request: Request) -> Response:
            state = app.metering_consumer_state()
            return respond(self, (200, json.dumps(state, default=str).encode(), JSON))

    @app.page(QUERY_PATH)
    class Query(View):
        async def post(self, request: Request) -> Response:
            body = await self.read_request_content(request)
            return respond(self, await query_reply(body, request.headers.get("Content-Type", "")))


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
        body = await request.read()
        return respond(await query_reply(body, request.headers.get("Content-Type", "")))

    application = web.Application()
    application.router.add_get("/metrics", metrics)
    application.router.add_get("/metering/health", health)
    application.router.add_post(QUERY_PATH, query)
    return application
