"""TEST DOUBLE: a tiny in-process Confluent Schema Registry, for tests only.

It serves the few REST endpoints that ``confluent_kafka``'s ``SchemaRegistryClient``,
``AvroSerializer`` and ``AvroDeserializer`` use, on ``127.0.0.1`` and an ephemeral port:

* ``POST /subjects/{subject}/versions`` registers a schema (idempotent; the same schema gets
  the same id in every subject, as in the real registry),
* ``POST /subjects/{subject}`` looks a schema up in a subject,
* ``GET /schemas/ids/{id}`` fetches a schema by id,
* ``GET /subjects/{subject}/versions/latest`` fetches a subject's newest version.

It does not check compatibility, and compares schemas by their JSON (keys sorted), not by
the registry's canonicalisation. Set :attr:`RegistryDouble.failure_status` to make every
request fail with that HTTP status (a registry outage).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlsplit

_CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"


class RegistryDouble:
    """An in-memory schema registry served over HTTP; use as a context manager.

    ``first_id`` lets a test keep the double's ids apart from the pinned ones.
    """

    def __init__(self, first_id: int = 100) -> None:
        self._lock = threading.Lock()
        self._next_id = first_id
        self._ids_by_schema: dict[tuple[str, str], int] = {}
        self._schemas: dict[int, tuple[str, str]] = {}  # id -> (schema text, schema type)
        self._subjects: dict[str, list[int]] = {}  # subject -> ids by version
        self.failure_status: int | None = None
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> RegistryDouble:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def register(self, subject: str, schema: str, schema_type: str = "AVRO") -> int:
        """Register ``schema`` under ``subject`` (what the POST endpoint does); returns its id."""
        key = (_normalise(schema), schema_type)
        with self._lock:
            schema_id = self._ids_by_schema.get(key)
            if schema_id is None:
                schema_id = self._next_id
                self._next_id += 1
                self._ids_by_schema[key] = schema_id
                self._schemas[schema_id] = (schema, schema_type)
            versions = self._subjects.setdefault(subject, [])
            if schema_id not in versions:
                versions.append(schema_id)
            return schema_id

    # -- request handling (called on the server's threads) -------------------------------

    def _handle(self, method: str, path: str, body: dict[str, Any] | None) -> tuple[int, Any]:
        if self.failure_status is not None:
            return self.failure_status, _error(50001, "registry double is failing on purpose")
        parts = [unquote(part) for part in path.strip("/").split("/")]
        with self._lock:
            if method == "GET" and len(parts) == 3 and parts[:2] == ["schemas", "ids"]:
                return self._get_by_id(parts[2])
            if method == "GET" and len(parts) == 4 and parts[2:] == ["versions", "latest"]:
                return self._latest(parts[1])
        if method == "POST" and parts[0] == "subjects" and body is not None:
            schema = body.get("schema")
            if not isinstance(schema, str):
                return 422, _error(42201, "missing schema")
            schema_type = body.get("schemaType") or "AVRO"
            if len(parts) == 3 and parts[2] == "versions":
                return 200, {"id": self.register(parts[1], schema, schema_type)}
            if len(parts) == 2:
                return self._lookup(parts[1], schema, schema_type)
        return 404, _error(404, f"no such endpoint: {method} {path}")

    def _get_by_id(self, raw_id: str) -> tuple[int, Any]:
        found = self._schemas.get(int(raw_id)) if raw_id.isdigit() else None
        if found is None:
            return 404, _error(40403, f"Schema {raw_id} not found")
        schema, schema_type = found
        payload: dict[str, Any] = {"schema": schema}
        if schema_type != "AVRO":
            payload["schemaType"] = schema_type
        return 200, payload

    def _latest(self, subject: str) -> tuple[int, Any]:
        versions = self._subjects.get(subject)
        if not versions:
            return 404, _error(40401, f"Subject '{subject}' not found.")
        return 200, self._version_payload(subject, len(versions))

    def _lookup(self, subject: str, schema: str, schema_type: str) -> tuple[int, Any]:
        with self._lock:
            versions = self._subjects.get(subject)
            if not versions:
                return 404, _error(40401, f"Subject '{subject}' not found.")
            schema_id = self._ids_by_schema.get((_normalise(schema), schema_type))
            if schema_id not in versions:
                return 404, _error(40403, "Schema not found")
            return 200, self._version_payload(subject, versions.index(schema_id) + 1)

    def _version_payload(self, subject: str, version: int) -> dict[str, Any]:
        schema_id = self._subjects[subject][version - 1]
        schema, schema_type = self._schemas[schema_id]
        payload: dict[str, Any] = {
            "subject": subject,
            "version": version,
            "id": schema_id,
            "schema": schema,
        }
        if schema_type != "AVRO":
            payload["schemaType"] = schema_type
        return payload


def _normalise(schema: str) -> str:
    try:
        return json.dumps(json.loads(schema), sort_keys=True, separators=(",", ":"))
    except ValueError:
        return schema


def _error(code: int, message: str) -> dict[str, Any]:
    return {"error_code": code, "message": message}


def _handler_for(registry: RegistryDouble) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._reply(*registry._handle("GET", urlsplit(self.path).path, None))

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else {}
            except ValueError:
                self._reply(422, _error(42201, "body is not JSON"))
                return
            self._reply(*registry._handle("POST", urlsplit(self.path).path, body))

        def _reply(self, status: int, payload: Any) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", _CONTENT_TYPE)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            """Silence per-request logging."""

    return Handler
