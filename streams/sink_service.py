"""The ClickHouse sink as a service: ownership, schema, the consume loop, and reads.

Started inside ``metering worker`` (``optional=True``: when another process owns the embedded
store, the worker runs without a sink) or by ``metering sink`` (``optional=False``: not
owning the store is an error). The service owns the process's only ClickHouse client and
serves read queries for the CLI on the same dedicated thread.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from mode import Service

from core.settings import Settings
from sinks.errors import SinkError
from sinks.owner import StoreLock, current_owner
from sinks.runner import SinkRunner, StoreThread
from streams import metrics
from streams.codec import Codecs

log = logging.getLogger(__name__)

_ACTIVE: list[SinkService] = []
LOCK_WAIT_SECONDS = 30.0


def active_sink() -> SinkService | None:
    """The running sink service of this process, if any (the web endpoint reads through it)."""
    return _ACTIVE[0] if _ACTIVE else None


class SinkService(Service):
    """Owns the store (embedded) or a client (server) and runs :class:`SinkRunner`."""

    def __init__(
        self, settings: Settings, codecs: Codecs, *, optional: bool, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.codecs = codecs
        self.optional = optional
        self.store = StoreThread()
        self.lock = StoreLock(settings.chdb_path) if settings.embedded_store else None
        self.client: Any = None
        self.runner: SinkRunner | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.settings.web_bind}:{self.settings.web_port}"

    async def _claim_store(self) -> bool:
        assert self.lock is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LOCK_WAIT_SECONDS
        while True:
            if self.lock.acquire(self.url):
                return True
            owner = current_owner(self.settings.chdb_path)
            if owner is not None and owner.url:
                message = (
                    f"the embedded store {self.settings.chdb_path} is owned by process "
                    f"{owner.pid} ({owner.url})"
                )
                if self.optional:
                    log.warning("%s: this worker runs without the sink", message)
                    return False
                raise SinkError(message)
            if loop.time() > deadline:  # a reader that never lets go
                raise SinkError(f"the embedded store {self.settings.chdb_path} stays locked")
            await asyncio.sleep(0.5)

    async def on_start(self) -> None:
        if self.lock is not None and not await self._claim_store():
            return
        from sinks.clickhouse import ClickHouseSink, connect, ensure_schema

        settings = self.settings
        password = settings.clickhouse_password
        try:
            self.client = await self.store.run(
                connect,
                settings.effective_clickhouse_dsn,
                settings.clickhouse_user,
                password.get_secret_value() if password else None,
            )
            await self.store.run(ensure_schema, self.client)
        except RuntimeError:
            if self.should_stop:  # SIGTERM during start-up: the store thread is already gone
                return
            raise
        self.runner = SinkRunner(settings, ClickHouseSink(self.client), self.store, self.codecs)
        self._task = asyncio.ensure_future(self._run())
        _ACTIVE.append(self)
        metrics.SINK_OWNER.set(1)
        log.info("sink: writing to %s", "the embedded store" if self.lock else "ClickHouse")

    async def _run(self) -> None:
        assert self.runner is not None
        try:
            await self.runner.run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.critical("sink stopped: %s", exc, exc_info=True)
            await self.crash(exc)

    async def on_stop(self) -> None:
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        if self.runner is not None and self._task is not None:
            self.runner.stopping.set()  # the runner flushes and commits before returning
            try:
                await asyncio.wait_for(self._task, timeout=60)
            except Exception as exc:
                log.error("sink: final flush did not complete: %s", exc)
        if self.client is not None:
            close = getattr(self.client, "close", None)
            if close is not None:
                await self.store.run(close)
        self.store.shutdown()
        if self.lock is not None:
            self.lock.release()
        metrics.SINK_OWNER.set(0)

    async def query(self, sql: str, parameters: dict[str, Any] | None) -> tuple:
        """Run a read-only query on the store thread: ``(columns, types, rows)``."""
        if self.client is None:
            raise SinkError("this process does not own the store")
        from sinks.clickhouse import query_typed

        return await self.store.run(query_typed, self.client, sql, parameters or {})
