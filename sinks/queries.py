"""Read queries over the SPEC §6 views: pure builders returning (sql, parameters).

They are also the whole vocabulary of the store owner's ``/metering/query`` endpoint
(:func:`build`): remote readers name a query and pass arguments, never SQL.

Every value is bound as a query parameter; nothing the user typed is formatted into SQL.
Month filters use a half-open ``occurred_at`` range so ClickHouse prunes the monthly
partitions of the store.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from datetime import date
from typing import Any

Query = tuple[str, dict[str, object]]


def _month_range(month: date) -> dict[str, object]:
    following = date(month.year + (month.month == 12), month.month % 12 + 1, 1)
    return {"start": month.isoformat() + " 00:00:00", "end": following.isoformat() + " 00:00:00"}


# Source columns are referenced through the alias ``e``: ClickHouse's analyzer would otherwise
# substitute the result alias ``cost_usd`` inside ``sumIf(cost_usd, ...)`` (ILLEGAL_AGGREGATION).
_PE_FILTER = (
    "e.org_id = {org:String} AND e.occurred_at >= toDateTime64({start:String}, 3, 'UTC') "
    "AND e.occurred_at < toDateTime64({end:String}, 3, 'UTC')"
)
_MEASURES = (
    "count() AS events, sum(e.input_tokens) AS input_tokens, "
    "sum(e.output_tokens) AS output_tokens, sum(e.cost_usd) AS cost_usd, "
    "sumIf(e.cost_usd, e.extra_usage = 1) AS extra_cost_usd"
)


def org_month_total(org_id: str, month: date) -> Query:
    """One row: the organisation's month (``metering.org_month``)."""
    sql = (
        "SELECT month, org_id, events, input_tokens, output_tokens, cache_creation_input_tokens,"
        " cache_read_input_tokens, cost_usd, extra_cost_usd FROM metering.org_month"
        " WHERE org_id = {org:String} AND month = toDate({month:String})"
    )
    return sql, {"org": org_id, "month": month.isoformat()}


def spend_by_member(org_id: str, month: date) -> Query:
    """Month-to-date spend per member, biggest extra cost first (the MTD Spend column)."""
    sql = (
        f"SELECT e.user_id AS user_id, argMax(e.seat_tier, e.occurred_at) AS seat_tier,"
        f" {_MEASURES} FROM metering.priced_events AS e WHERE {_PE_FILTER}"
        " GROUP BY e.user_id ORDER BY extra_cost_usd DESC, cost_usd DESC, user_id"
    )
    return sql, {"org": org_id, **_month_range(month)}


def spend_by_tier(org_id: str, month: date) -> Query:
    sql = (
        "SELECT seat_tier, events, input_tokens, output_tokens, cost_usd, extra_cost_usd"
        " FROM metering.tier_month WHERE org_id = {org:String} AND month = toDate({month:String})"
        " ORDER BY seat_tier"
    )
    return sql, {"org": org_id, "month": month.isoformat()}


def spend_by_model(org_id: str, month: date) -> Query:
    sql = (
        f"SELECT e.model_family AS model_family, {_MEASURES}"
        f" FROM metering.priced_events AS e WHERE {_PE_FILTER}"
        " GROUP BY e.model_family ORDER BY cost_usd DESC, model_family"
    )
    return sql, {"org": org_id, **_month_range(month)}


def top_orgs(month: date, limit: int = 10) -> Query:
    """The organisations with the most spend in a month (the demo's overview)."""
    sql = (
        "SELECT org_id, events, cost_usd, extra_cost_usd FROM metering.org_month"
        " WHERE month = toDate({month:String}) ORDER BY cost_usd DESC, org_id LIMIT {limit:UInt32}"
    )
    return sql, {"month": month.isoformat(), "limit": limit}


CONTRACT_VIEWS = (
    "priced_events",
    "org_month",
    "tier_month",
    "user_month",
    "usage_hourly",
    "enforcement_log",
    "replay_log",
)


def view_rows(view: str) -> Query:
    """Every row of one SPEC §6 view or of ``replay_log`` (tests and small exports; analysts
    use ClickHouse)."""
    if view not in CONTRACT_VIEWS:
        raise ValueError(f"unknown view {view!r}; one of {', '.join(CONTRACT_VIEWS)}")
    return f"SELECT * FROM metering.{view}", {}


NAMED_QUERIES: dict[str, Callable[..., Query]] = {
    "org_month_total": org_month_total,
    "spend_by_member": spend_by_member,
    "spend_by_tier": spend_by_tier,
    "spend_by_model": spend_by_model,
    "top_orgs": top_orgs,
    "view_rows": view_rows,
}


def build(name: str, args: Mapping[str, Any]) -> Query:
    """A named query with JSON arguments (``month`` as ``YYYY-MM-DD``) -> (sql, parameters).

    This is the only way the store owner's web endpoint runs SQL: callers choose among these
    builders and bind values, they never send SQL. Raises ``ValueError`` for an unknown name or
    arguments that do not fit.
    """
    builder = NAMED_QUERIES.get(name)
    if builder is None:
        raise ValueError(f"unknown query {name!r}")
    converted: dict[str, Any] = {}
    for key, value in args.items():
        if key == "month":
            if not isinstance(value, str):
                raise ValueError("month must be a YYYY-MM-DD string")
            converted[key] = date.fromisoformat(value)
        elif key == "limit":
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= 10_000:
                raise ValueError("limit must be an integer from 1 to 10000")
            converted[key] = value
        elif isinstance(value, str):
            converted[key] = value
        else:
            raise ValueError(f"argument {key!r} must be a string")
    try:
        inspect.signature(builder).bind(**converted)
    except TypeError as exc:
        raise ValueError(f"{name}: {exc}") from None
    return builder(**converted)


# -- Enterprise monthly statement (``metering invoice``) -------------------------------------
# Only extra-usage events are billed after the month (SPEC §5); the three queries read the same
# rows, so the statement's total equals the sum of its lines (``jobs/invoice.py`` checks that).

_EXTRA_FILTER = f"{_PE_FILTER} AND e.extra_usage = 1"


def invoice_by_member(org_id: str, month: date) -> Query:
    """Extra usage per member in a month: requests and extra cost, biggest first. The tier is
    the member's tier on their newest extra-usage request of the month."""
    sql = (
        "SELECT e.user_id AS user_id, argMax(e.seat_tier, e.occurred_at) AS seat_tier,"
        " count() AS requests, sum(e.cost_usd) AS extra_cost_usd"
        f" FROM metering.priced_events AS e WHERE {_EXTRA_FILTER}"
        " GROUP BY e.user_id ORDER BY extra_cost_usd DESC, user_id"
    )
    return sql, {"org": org_id, **_month_range(month)}


def invoice_by_model(org_id: str, month: date) -> Query:
    """Extra usage per model family in a month: requests, the four token sums, extra cost."""
    sql = (
        "SELECT e.model_family AS model_family, count() AS requests,"
        " sum(e.input_tokens) AS input_tokens, sum(e.output_tokens) AS output_tokens,"
        " sum(e.cache_creation_input_tokens) AS cache_creation_input_tokens,"
        " sum(e.cache_read_input_tokens) AS cache_read_input_tokens,"
        " sum(e.cost_usd) AS extra_cost_usd"
        f" FROM metering.priced_events AS e WHERE {_EXTRA_FILTER}"
        " GROUP BY e.model_family ORDER BY extra_cost_usd DESC, model_family"
    )
    return sql, {"org": org_id, **_month_range(month)}


def invoice_total(org_id: str, month: date) -> Query:
    """One row (zeros when there is no extra usage): requests and extra cost of the month."""
    sql = (
        "SELECT count() AS requests, sum(e.cost_usd) AS extra_cost_usd"
        f" FROM metering.priced_events AS e WHERE {_EXTRA_FILTER}"
    )
    return sql, {"org": org_id, **_month_range(month)}


def org_plan(org_id: str) -> Query:
    """The plan of the organisation's newest priced event: one row, or none for an org the
    store has never seen."""
    sql = (
        "SELECT e.plan AS plan, e.occurred_at AS occurred_at"
        " FROM metering.priced_events AS e WHERE e.org_id = {org:String}"
        " ORDER BY e.occurred_at DESC, e.event_id DESC LIMIT 1"
    )
    return sql, {"org": org_id}


NAMED_QUERIES["invoice_by_member"] = invoice_by_member
NAMED_QUERIES["invoice_by_model"] = invoice_by_model
NAMED_QUERIES["invoice_total"] = invoice_total
NAMED_QUERIES["org_plan"] = org_plan
