"""The metering job written as a Quix Streams application, for a throughput comparison.

Run (in its own venv, see ``benchmarks/quix/README.md``)::

    PYTHONPATH=$PWD .venv-quix/bin/python -m benchmarks.quix.app --events N

configured by the same ``METERING_*`` variables as ``metering worker`` (``core.settings``).

Topology, one ``StreamingDataFrame`` over ``<prefix>usage.events`` (key = org_id bytes,
value = Confluent-wire Avro)::

    usage.events ─► apply(meter, stateful=True) ─► filter(priced) ─► sink(ClickHouseQuixSink)
                          │
                          └── Quix State (RocksDB per partition, changelog topic on)

Only the streaming framework differs from the Faust worker; the job is the same code:

* decode with ``streams.codec.Codecs.from_settings(settings).usage`` and validate with
  ``core.validation.validate_usage``;
* dedupe by (org_id, event_id), price with ``core.pricing.PriceTable`` and add to the
  calendar-month totals per org, seat tier and user with the very same
  ``core.metering.Meter`` the worker uses. Meter needs two stores with ``get`` and
  ``__setitem__``; here both are thin adapters over Quix's ``State`` (``state.get`` /
  ``state.set``), with distinct key prefixes so dedupe and totals keys never collide. Quix
  state is scoped to the message key (the org), which fits: every key of both tables starts
  with the org;
* the priced rows (``sinks.port.PricedRow``, what ``sinks/runner.py`` builds from a decoded
  ``metering.priced`` record) go through a Quix ``BatchingSink`` subclass that writes them with
  our ``sinks.clickhouse.ClickHouseSink`` into ``metering.priced_events_store`` (schema by
  ``sinks.clickhouse.ensure_schema``), flushed on every Quix checkpoint before the offsets
  are committed.

Deliberately left out (see the README): enforcement (caps, pauses, top-ups: no
``metering.control`` input, no ``metering.pauses``/``metering.billing`` output), the dead-letter
topic (rejected and duplicate events are counted and skipped), re-routing of events whose key
is not their org (Quix state is per message key; producers here key by org), the period timer,
metrics and the web endpoint, and the ``metering.priced`` topic: the Faust worker publishes
priced events to Kafka and its sink consumes them back, this app hands rows to its sink in
process, as a Quix sink does.

Isolation from a Faust worker of the same deployment: consumer group ``<app id>.quix`` (its
changelogs are named after it), state under ``<data dir>/quix/state``, and its own ClickHouse
store, ``chdb://<data dir>/quix/clickhouse`` unless ``METERING_QUIX_CLICKHOUSE_DSN`` names
another (chDB allows one process per data path; the app takes the same owner lock as our
sink). ``METERING_CLICKHOUSE_DSN`` is ignored on purpose.

Stops after ``--events`` priced events (Quix's ``app.run(count=...)``; the benchmark input has
no duplicates or bad records), once the final checkpoint has flushed the sink, and prints one
JSON line on stdout::

    {"framework": "quixstreams", "version": "3.28.1", "events": N, "seconds": S, "rate": R}

``seconds`` runs from the first message metered to the end of the last sink flush. Exits 1
(after printing the line with what it did) when ``--idle-timeout`` stopped it earlier.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import quixstreams
from quixstreams import Application, State, message_context
from quixstreams.kafka.configuration import ConnectionConfig
from quixstreams.sinks import BatchingSink, SinkBackpressureError, SinkBatch

from core.errors import RejectedEvent
from core.metering import Meter, Status
from core.pricing import PriceTable, default_price_table_path
from core.settings import Settings, load_settings
from core.validation import validate_usage
from sinks.errors import SinkError
from sinks.owner import StoreLock
from sinks.port import PricedRow
from streams.codec import Codecs
from streams.topics import USAGE

log = logging.getLogger("benchmarks.quix")

QUIX_DSN_VARIABLE = "METERING_QUIX_CLICKHOUSE_DSN"


def quix_group(settings: Settings) -> str:
    """The Quix app's consumer group: never the worker's (``<app id>``) or the sink's."""
    return f"{settings.app_id}.quix"


def quix_dir(settings: Settings) -> Path:
    return settings.data_path / "quix"


def quix_clickhouse_dsn(settings: Settings) -> str:
    """``METERING_QUIX_CLICKHOUSE_DSN`` or an embedded store of the Quix app's own."""
    return os.environ.get(QUIX_DSN_VARIABLE) or f"chdb://{quix_dir(settings) / 'clickhouse'}"


class StateStore:
    """``core.metering.Store`` over the Quix ``State`` of the message being processed.

    ``prefix`` keeps the dedupe and totals keys apart inside one key's state (a seen key
    ``["org","e"]`` and an org total ``["org","2026-11"]`` have the same shape).
    """

    __slots__ = ("prefix", "state")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.state: State | None = None

    def get(self, key: str, default: list | None = None, /) -> list | None:
        return self.state.get(self.prefix + key, default)  # type: ignore[union-attr]

    def __setitem__(self, key: str, value: list, /) -> None:
        self.state.set(self.prefix + key, value)  # type: ignore[union-attr]


class ClickHouseQuixSink(BatchingSink):
    """A Quix batching sink writing priced rows with our ``ClickHouseSink``.

    Quix calls :meth:`write` once per topic-partition batch on every checkpoint and commits
    the offsets only after every write returned. A failed write drops the rows and raises
    ``SinkBackpressureError``: Quix pauses the partitions, seeks back to the checkpoint and
    re-processes them (rows are idempotent in the store).
    """

    def __init__(self, dsn: str, user: str | None, password: str | None) -> None:
        super().__init__()
        self.dsn, self.user, self.password = dsn, user, password
        self.store: Any = None
        self.rows_written = 0
        self.last_flush_end: float | None = None

    def setup(self) -> None:
        from sinks.clickhouse import ClickHouseSink, connect, ensure_schema

        client = connect(self.dsn, self.user, self.password)
        ensure_schema(client)
        self.store = ClickHouseSink(client)

    def write(self, batch: SinkBatch) -> None:
        self.store.add([item.value for item in batch])
        try:
            written = self.store.flush()
        except SinkError as exc:
            self.store.drop_pending()
            log.warning("ClickHouse write failed, pausing for 5 s: %s", exc)
            raise SinkBackpressureError(retry_after=5.0) from exc
        self.rows_written += written
        self.last_flush_end = time.perf_counter()

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


class Counters:
    __slots__ = ("duplicates", "first_message", "rejected")

    def __init__(self) -> None:
        self.first_message: float | None = None
        self.rejected = 0
        self.duplicates = 0


def build(
    settings: Settings,
    sink: ClickHouseQuixSink,
    counters: Counters,
    *,
    commit_interval: float,
    commit_every: int,
    loglevel: str,
) -> Application:
    """The Quix application and its dataframe, wired to ``sink``."""
    app = Application(
        broker_address=ConnectionConfig.from_librdkafka_dict(settings.kafka_client_config()),
        consumer_group=quix_group(settings),
        auto_offset_reset="earliest",
        commit_interval=commit_interval,
        commit_every=commit_every,
        state_dir=quix_dir(settings) / "state",
        loglevel=loglevel,  # type: ignore[arg-type]
    )
    usage = app.topic(settings.topic(USAGE), key_deserializer="bytes", value_deserializer="bytes")
    codec = Codecs.from_settings(settings).usage
    prices = PriceTable.load(settings.price_table or default_price_table_path())
    seen, totals = StateStore("s"), StateStore("t")
    meter = Meter(prices, seen, totals)

    def meter_event(value: bytes, state: State) -> PricedRow | None:
        if counters.first_message is None:
            counters.first_message = time.perf_counter()
        try:
            event = validate_usage(codec.decode(value), int(time.time() * 1000))
            seen.state = totals.state = state
            context = message_context()
            outcome = meter.process(event, context.offset)
        except RejectedEvent:
            counters.rejected += 1  # the worker dead-letters it; out of scope here
            return None
        if outcome.status is Status.DUPLICATE:
            counters.duplicates += 1
            return None
        assert outcome.priced is not None
        return PricedRow(outcome.priced, context.partition, context.offset)

    sdf = app.dataframe(usage)
    sdf = sdf.apply(meter_event, stateful=True)
    sdf = sdf.filter(lambda row: row is not None)
    sdf.sink(sink)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, required=True, help="stop after N priced events")
    parser.add_argument(
        "--commit-interval",
        type=float,
        default=1.0,
        help="Quix checkpoint interval in seconds (sink flush + commit) [1.0, as the worker's "
        "broker_commit_interval and the sink's batch age; Quix's default is 5.0]",
    )
    parser.add_argument(
        "--commit-every", type=int, default=0, help="also checkpoint every N messages [0: off]"
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=60.0,
        help="give up after this many seconds without a new message [60]",
    )
    parser.add_argument("--loglevel", default="WARNING", help="Quix log level (stderr)")
    args = parser.parse_args(argv)

    settings = load_settings()
    dsn = quix_clickhouse_dsn(settings)
    lock = None
    if dsn.startswith("chdb:"):
        store_path = Path(dsn.removeprefix("chdb://"))
        lock = StoreLock(store_path)
        if not lock.acquire(None):
            print(f"the embedded store {store_path} is in use by another process", file=sys.stderr)
            return 2
    password = settings.clickhouse_password
    sink = ClickHouseQuixSink(
        dsn, settings.clickhouse_user, password.get_secret_value() if password else None
    )
    counters = Counters()
    try:
        app = build(
            settings,
            sink,
            counters,
            commit_interval=args.commit_interval,
            commit_every=args.commit_every,
            loglevel=args.loglevel,
        )
        app.run(count=args.events, timeout=args.idle_timeout, collect=False)
    finally:
        sink.close()
        if lock is not None:
            lock.release()

    events = sink.rows_written
    started, ended = counters.first_message, sink.last_flush_end
    seconds = (ended - started) if started is not None and ended is not None else 0.0
    result = {
        "framework": "quixstreams",
        "version": quixstreams.__version__,
        "events": events,
        "seconds": round(seconds, 3),
        "rate": round(events / seconds, 1) if seconds > 0 else 0.0,
    }
    print(json.dumps(result), flush=True)
    if counters.rejected or counters.duplicates:
        print(
            f"skipped {counters.rejected} rejected and {counters.duplicates} duplicate events",
            file=sys.stderr,
        )
    return 0 if events >= args.events else 1


if __name__ == "__main__":
    raise SystemExit(main())
