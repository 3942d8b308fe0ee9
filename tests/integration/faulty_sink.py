"""``metering sink`` whose ClickHouse client fails: a fault injected beneath the client.

Run as a process by tests/integration/test_sink_outage.py: every ``insert`` of the real
clickhouse-connect client raises ``ConnectionRefusedError`` for
``METERING_TEST_OUTAGE_SECONDS`` from the first insert on, then the real client writes again.
Everything above the client (``ClickHouseSink``, ``SinkRunner``, the consumer, the web
endpoints) is the production code path of ``metering sink``.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import sinks.clickhouse as clickhouse

OUTAGE_SECONDS = float(os.environ.get("METERING_TEST_OUTAGE_SECONDS", "60"))


class FailingClient:
    """A clickhouse-connect client whose inserts fail during the outage window."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._until: float | None = None

    def insert(self, *args: Any, **kwargs: Any) -> Any:
        if self._until is None:
            self._until = time.monotonic() + OUTAGE_SECONDS
        if time.monotonic() < self._until:
            raise ConnectionRefusedError(111, "injected outage: Connection refused")
        return self._client.insert(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


_real_connect = clickhouse.connect


def _failing_connect(*args: Any, **kwargs: Any) -> Any:
    return FailingClient(_real_connect(*args, **kwargs))


if __name__ == "__main__":
    clickhouse.connect = _failing_connect  # type: ignore[assignment]
    sys.argv = ["metering", "sink"]
    from jobs.cli import main

    main()
