"""The read vocabulary of the store owner's endpoint: named queries only, values bound."""

from __future__ import annotations

import asyncio
import json
from datetime import date

import pytest

from sinks.queries import build, spend_by_member
from streams.web import query_reply

JSON = "application/json"


def test_named_query_binds_every_value() -> None:
    nasty = "x'); DROP TABLE metering.priced_events_store; --"
    sql, parameters = build("spend_by_member", {"org_id": nasty, "month": "2026-12-01"})
    assert nasty not in sql and parameters["org"] == nasty
    assert parameters["start"] == "2026-12-01 00:00:00"
    assert parameters["end"] == "2027-01-01 00:00:00"  # December rolls into the next year
    assert (sql, parameters) == spend_by_member(nasty, date(2026, 12, 1))


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("drop_everything", {}),
        ("view_rows", {"view": "priced_events_store"}),
        ("view_rows", {"view": "org_month; DROP TABLE x"}),
        ("top_orgs", {"month": "2026-11-01", "limit": 10**9}),
        ("spend_by_member", {"org_id": 7, "month": "2026-11-01"}),
        ("spend_by_member", {"org_id": "o"}),
        ("spend_by_member", {"org_id": "o", "month": "November"}),
    ],
)
def test_unknown_queries_and_bad_arguments_are_refused(name: str, args: dict) -> None:
    with pytest.raises(ValueError):
        build(name, args)


def _reply(body: object, content_type: str = JSON) -> tuple[int, dict]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, payload, _ = asyncio.run(query_reply(raw, content_type))
    return status, json.loads(payload)


def test_endpoint_refuses_sql_and_non_json_requests() -> None:
    assert _reply({"sql": "SELECT 1 INTO OUTFILE '/tmp/x'"})[0] == 400
    assert _reply({"query": "view_rows", "args": {"view": "org_month"}}, "text/plain")[0] == 415
    assert _reply(b"{not json")[0] == 400


def test_endpoint_answers_409_when_this_process_owns_no_store() -> None:
    status, body = _reply({"query": "view_rows", "args": {"view": "org_month"}})
    assert status == 409 and "does not own" in body["error"]
