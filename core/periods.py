"""Calendar periods: every total is kept per calendar month in UTC of ``occurred_at``."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_EPOCH_DAYS_CACHE: dict[int, str] = {}


def month_of(occurred_at_ms: int) -> str:
    """The ``YYYY-MM`` period of an instant given in epoch milliseconds (UTC)."""
    day = occurred_at_ms // 86_400_000
    period = _EPOCH_DAYS_CACHE.get(day)
    if period is None:
        moment = datetime.fromtimestamp(day * 86_400, tz=UTC)
        period = f"{moment.year:04d}-{moment.month:02d}"
        if len(_EPOCH_DAYS_CACHE) > 4096:  # bounded: events cluster around "now"
            _EPOCH_DAYS_CACHE.clear()
        _EPOCH_DAYS_CACHE[day] = period
    return period


def month_start(period: str) -> date:
    """First day of a ``YYYY-MM`` period (the ``month`` column of the ClickHouse views)."""
    year, month = parse_period(period)
    return date(year, month, 1)


def parse_period(period: str) -> tuple[int, int]:
    """``"2026-11"`` -> ``(2026, 11)``; raises ``ValueError`` with a one-line message."""
    try:
        year_text, month_text = period.split("-")
        year, month = int(year_text), int(month_text)
    except ValueError:
        raise ValueError(f"not a month: {period!r} (expected YYYY-MM)") from None
    if len(year_text) != 4 or len(month_text) != 2 or not 1 <= month <= 12:
        raise ValueError(f"not a month: {period!r} (expected YYYY-MM)")
    return year, month


def iso_to_ms(text: str) -> int:
    """An ISO-8601 instant with an explicit offset (``Z`` or ``+hh:mm``) -> epoch ms."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError(f"instant {text!r} has no UTC offset (add Z)")
    return (moment - _EPOCH) // timedelta(milliseconds=1)


def ms_to_iso(ms: int) -> str:
    """Epoch ms -> ``2026-11-28T18:17:29.123Z``."""
    moment = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"
