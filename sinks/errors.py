"""Every exception the ``sinks`` package raises.

A :class:`SinkError` is *infrastructure trouble* (STYLE: propagate, retry, never commit past it):
the store is unreachable, refused a statement, or lacks the schema. Its message is one line that
names the store without credentials, so the CLI may print it as is; the driver's exception is
chained as ``__cause__`` for the logs.
"""

from __future__ import annotations

from core.errors import MeteringError


class SinkError(MeteringError):
    """The analytics store could not be reached or refused a read or write.

    Raised by :func:`sinks.clickhouse.connect`, :func:`sinks.clickhouse.ensure_schema`,
    :func:`sinks.clickhouse.query_rows` and by ``flush()`` of every sink. After a failed
    ``flush()`` the sink still holds the rows, so calling ``flush()`` again retries them.
    """
