"""The Enterprise monthly statement of extra usage (``metering invoice``, SPEC §5, §7).

Enterprise organisations are invoiced after the month for their **extra** usage: a statement
per org lists it by member (seat tier, requests, extra cost) and by model family (requests,
token sums, extra cost), with the total. This module is pure: :func:`build_statement` turns
the rows of the named queries ``invoice_by_member``, ``invoice_by_model`` and
``invoice_total`` (``sinks/queries.py``) into a :class:`Statement`, and :func:`to_csv` /
:func:`to_json` render it. Money is integer nano-USD inside and exact ``Decimal(38, 9)``
strings (``"12.500000000"``) outside; nothing goes through a float.

The total always equals the sum of the member lines and the sum of the model lines, to the
nano-USD: :func:`build_statement` refuses rows that disagree (:class:`InconsistentStatement`,
which happens only when events arrive between the three reads; read again).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from core.errors import MeteringError
from jobs.control import format_usd

TOKEN_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)

CSV_COLUMNS = (
    "section",
    "org_id",
    "month",
    "user_id",
    "seat_tier",
    "model_family",
    "requests",
    *TOKEN_FIELDS,
    "extra_cost_usd",
)
"""The CSV header. One row per member (``section`` = ``member``), per model family
(``model``) and one ``total`` row; columns that do not apply to a section are empty."""


class InconsistentStatement(MeteringError):
    """The line items and the total read from the store disagree (the store changed between
    the reads); reading again gives a consistent statement."""


@dataclass(frozen=True, slots=True)
class MemberLine:
    """A member's extra usage in the month; ``seat_tier`` is their newest tier in it."""

    user_id: str
    seat_tier: str
    requests: int
    extra_cost_nano: int


@dataclass(frozen=True, slots=True)
class ModelLine:
    """A model family's extra usage in the month."""

    model_family: str
    requests: int
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int
    extra_cost_nano: int


@dataclass(frozen=True, slots=True)
class Statement:
    """One organisation's statement for one month (``YYYY-MM``). The totals are the sums of
    the line items (checked on construction by :func:`build_statement`)."""

    org_id: str
    month: str
    members: tuple[MemberLine, ...]
    models: tuple[ModelLine, ...]
    requests: int
    extra_cost_nano: int

    def token_total(self, field: str) -> int:
        """Sum of one token field over the model lines."""
        return sum(getattr(line, field) for line in self.models)


def usd_to_nano_exact(value: Decimal | int | str) -> int:
    """A USD amount as the store returns it (``Decimal('2.500000001')``, ``Decimal('5E-9')``)
    -> integer nano-USD, exactly for any ``Decimal(38, 9)``. Raises ``ValueError`` for a value
    that is not a whole number of nano-USD."""
    amount = value if isinstance(value, Decimal) else Decimal(str(value))
    if not amount.is_finite():
        raise ValueError(f"not a USD amount: {value!r}")
    sign, digits, exponent = amount.as_tuple()
    assert isinstance(exponent, int)  # finite
    coefficient = int("".join(map(str, digits)) or "0")
    shift = exponent + 9
    if shift >= 0:
        nano = coefficient * 10**shift
    else:
        nano, remainder = divmod(coefficient, 10**-shift)
        if remainder:
            raise ValueError(f"USD amount {value} is finer than one nano-USD")
    return -nano if sign else nano


def build_statement(
    org_id: str,
    month: str,
    member_rows: Sequence[Mapping[str, Any]],
    model_rows: Sequence[Mapping[str, Any]],
    total_rows: Sequence[Mapping[str, Any]],
) -> Statement:
    """Assemble a statement from the rows of ``invoice_by_member``, ``invoice_by_model`` and
    ``invoice_total`` (column names as those queries return them; money as ``Decimal`` USD).

    Line order is kept as given (the queries order by extra cost, biggest first). Raises
    :class:`InconsistentStatement` when the requests or extra cost of the member lines, the
    model lines and the total row are not all equal; an empty ``total_rows`` means zero.
    """
    members = tuple(
        MemberLine(
            user_id=str(row["user_id"]),
            seat_tier=str(row["seat_tier"]),
            requests=int(row["requests"]),
            extra_cost_nano=usd_to_nano_exact(row["extra_cost_usd"]),
        )
        for row in member_rows
    )
    models = tuple(
        ModelLine(
            model_family=str(row["model_family"]),
            requests=int(row["requests"]),
            input_tokens=int(row["input_tokens"]),
            output_tokens=int(row["output_tokens"]),
            cache_creation_input_tokens=int(row["cache_creation_input_tokens"]),
            cache_read_input_tokens=int(row["cache_read_input_tokens"]),
            extra_cost_nano=usd_to_nano_exact(row["extra_cost_usd"]),
        )
        for row in model_rows
    )
    total = total_rows[0] if total_rows else {"requests": 0, "extra_cost_usd": Decimal(0)}
    requests = int(total["requests"])
    extra_cost = usd_to_nano_exact(total["extra_cost_usd"])
    sums = {
        "total": (requests, extra_cost),
        "members": (
            sum(line.requests for line in members),
            sum(line.extra_cost_nano for line in members),
        ),
        "models": (
            sum(line.requests for line in models),
            sum(line.extra_cost_nano for line in models),
        ),
    }
    if len(set(sums.values())) != 1:
        detail = ", ".join(
            f"{name} {count} requests / {format_usd(nano)} USD"
            for name, (count, nano) in sums.items()
        )
        raise InconsistentStatement(
            f"statement of {org_id} for {month} does not add up ({detail}); "
            "events were arriving while it was read, run it again"
        )
    return Statement(
        org_id=org_id,
        month=month,
        members=members,
        models=models,
        requests=requests,
        extra_cost_nano=extra_cost,
    )


def to_csv(statement: Statement) -> str:
    """The statement as CSV (header :data:`CSV_COLUMNS`, ``\\n`` line ends for shell tools):
    member rows, then model rows, then one total row with the token sums of the model rows."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, restval="", lineterminator="\n")
    writer.writeheader()
    base = {"org_id": statement.org_id, "month": statement.month}
    for member in statement.members:
        writer.writerow(
            {
                **base,
                "section": "member",
                "user_id": member.user_id,
                "seat_tier": member.seat_tier,
                "requests": member.requests,
                "extra_cost_usd": format_usd(member.extra_cost_nano),
            }
        )
    for model in statement.models:
        writer.writerow(
            {
                **base,
                "section": "model",
                "model_family": model.model_family,
                "requests": model.requests,
                **{field: getattr(model, field) for field in TOKEN_FIELDS},
                "extra_cost_usd": format_usd(model.extra_cost_nano),
            }
        )
    writer.writerow(
        {
            **base,
            "section": "total",
            "requests": statement.requests,
            **{field: statement.token_total(field) for field in TOKEN_FIELDS},
            "extra_cost_usd": format_usd(statement.extra_cost_nano),
        }
    )
    return buffer.getvalue()


def to_dict(statement: Statement) -> dict[str, Any]:
    """The statement as JSON-ready data; amounts are exact decimal strings in USD."""
    return {
        "org_id": statement.org_id,
        "month": statement.month,
        "currency": "USD",
        "members": [
            {
                "user_id": member.user_id,
                "seat_tier": member.seat_tier,
                "requests": member.requests,
                "extra_cost_usd": format_usd(member.extra_cost_nano),
            }
            for member in statement.members
        ],
        "models": [
            {
                "model_family": model.model_family,
                "requests": model.requests,
                **{field: getattr(model, field) for field in TOKEN_FIELDS},
                "extra_cost_usd": format_usd(model.extra_cost_nano),
            }
            for model in statement.models
        ],
        "total": {
            "requests": statement.requests,
            **{field: statement.token_total(field) for field in TOKEN_FIELDS},
            "extra_cost_usd": format_usd(statement.extra_cost_nano),
        },
    }


def to_json(statement: Statement) -> str:
    """:func:`to_dict` as indented JSON text (ending with a newline)."""
    return json.dumps(to_dict(statement), indent=2) + "\n"
