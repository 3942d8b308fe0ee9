"""``metering sink``: the ClickHouse sink alone, with the read endpoints on the web port."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from mode import Service

from core.settings import Settings
from streams.codec import Codecs
from streams.sink_service import SinkService
from streams.web import standalone_web_app


class StandaloneSink(Service):
    """Runs :class:`SinkService` (required to own the store) and an aiohttp server."""

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.sink = SinkService(settings, Codecs.from_settings(settings), optional=False)
        self._runner: web.AppRunner | None = None

    def on_init_dependencies(self) -> list[Service]:
        return [self.sink]

    async def on_started(self) -> None:
        self._runner = web.AppRunner(standalone_web_app())
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.web_bind, self.settings.web_port)
        await site.start()
        self.log.info("serving reads at %s", self.sink.url)

    async def on_stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
