"""The pure core of the metering pipeline.

Pricing, validation, calendar periods and monthly totals (and, later, the enforcement state
machine) live here as plain Python: values in, values out. Nothing in this package imports
faust, a Kafka client or a ClickHouse client; the adapters in ``streams``, ``sinks`` and
``jobs`` call into it.
"""
