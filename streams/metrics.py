"""Prometheus metrics of the worker and the sink (served at ``/metrics`` on the web port)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS_IN = Counter("metering_events_in_total", "Usage records read from usage.events")
EVENTS_PRICED = Counter("metering_events_priced_total", "Usage events priced and counted")
DUPLICATES = Counter("metering_duplicates_skipped_total", "Duplicate usage events skipped")
REDELIVERED = Counter(
    "metering_redelivered_total", "Events delivered again after a restart (re-sent, not recounted)"
)
REROUTED = Counter("metering_rerouted_total", "Events found on the wrong partition and re-routed")
DEAD_LETTERS = Counter(
    "metering_dead_letters_total", "Records sent to the dead-letter topic", ["reason"]
)
SINK_ROWS = Counter("metering_sink_rows_total", "Rows written to ClickHouse")
SINK_FLUSHES = Counter("metering_sink_flushes_total", "Successful ClickHouse batch writes")
SINK_FLUSH_FAILURES = Counter("metering_sink_flush_failures_total", "Failed ClickHouse writes")
SINK_UNREADABLE = Counter("metering_sink_unreadable_total", "Unreadable records on metering.priced")
SINK_FLUSH_SECONDS = Histogram("metering_sink_flush_seconds", "Duration of one ClickHouse write")
SINK_OWNER = Gauge("metering_sink_in_process", "1 when this process runs the ClickHouse sink")
ENFORCEMENT_EVENTS = Counter(
    "metering_enforcement_events_total",
    "PAUSE, RESUME and RELOAD_REQUESTED emitted",
    ["action", "reason"],
)
REPRICED = Counter(
    "metering_repriced_total", "Events whose price a replay's correction replaced in the totals"
)
REPRICE_STALE = Counter(
    "metering_reprice_stale_total",
    "Replay corrections skipped: the price on record was neither their old nor their new one",
)
CONSUMER_LAG = Gauge(
    "metering_consumer_lag",
    "Records of a source partition this worker has not processed yet (high watermark minus "
    "the next offset to process)",
    ["topic", "partition"],
)
TABLE_RECOVERY_SECONDS = Histogram(
    "metering_table_recovery_seconds",
    "From a partition assignment to the stream being ready: table recovery from the changelogs",
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30, 60, 120, 300),
)
