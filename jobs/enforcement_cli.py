"""Operator commands for caps, balances and enforcement (SPEC §5, §7).

:func:`register` adds to the ``metering`` app:

* ``caps set|disable|enable`` and ``topup`` / ``autoreload``: build one control message and
  produce it to ``metering.control`` (:class:`jobs.control.ControlProducer`); the worker
  applies it on the org's partition, immediately;
* ``caps show``: the worker's view of an organisation, from its web endpoint
  ``GET /metering/caps?org=ORG`` (the JSON of :func:`core.enforcement.describe`, or 404 with
  ``{"error": ...}`` for an org it knows nothing of);
* ``pauses``: the enforcement events from the beginning (:func:`jobs.pauses.read_pauses`);
* ``invoice``: the Enterprise monthly statement of extra cost (:mod:`jobs.invoice`).

Mistakes in the arguments end with one line (``jobs.cli.UsageError``, exit status 2 through
``jobs.cli.main``), never a traceback. ``jobs.cli`` is imported inside the commands, because
``jobs.cli`` imports this module to call :func:`register`.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from core.errors import MeteringError
from core.usage import SeatTier
from jobs.control import Command, display_usd, format_usd, usd_to_nano

if TYPE_CHECKING:
    from types import ModuleType

    from core.settings import Settings

CAPS_PATH = "/metering/caps"
WORKER_TIMEOUT = 10.0
NANO_SUFFIX = "_nano_usd"

OrgOption = Annotated[str, typer.Option("--org", help="Organisation id.")]
WorkerUrlOption = Annotated[
    str | None,
    typer.Option(
        "--worker-url",
        help="The worker's web server (default: http://127.0.0.1:<METERING_WEB_PORT>).",
    ),
]


class WorkerUnavailable(MeteringError):
    """The worker's web endpoint did not answer (not running, wrong URL)."""


class WorkerError(MeteringError):
    """The worker answered, but not with the caps of the org (an error status, not JSON)."""


class InvoiceFormat(StrEnum):
    CSV = "csv"
    JSON = "json"


# -- helpers --------------------------------------------------------------------------------


def _cli() -> ModuleType:
    import jobs.cli

    return jobs.cli


def _refuse(message: str) -> NoReturn:
    raise _cli().UsageError(message)


def _say(text: str) -> None:
    _cli().out.print(text, markup=False, highlight=False, soft_wrap=True)


def _note(text: str) -> None:
    _cli().err.print(text, markup=False, highlight=False)


def _org(org: str) -> str:
    org = org.strip()
    if not org:
        _refuse("--org must not be empty (give the organisation id)")
    return org


def _user(user: str | None) -> str | None:
    if user is None:
        return None
    user = user.strip()
    if not user:
        _refuse("--user must not be empty (give the member's user id, or leave --user out)")
    return user


def _amount(option: str, text: str) -> int:
    """A USD option -> nano-USD, or one line naming the option and the fix."""
    try:
        return usd_to_nano(text)
    except ValueError as exc:
        _refuse(f"{option}: {exc}")


def _worker_url(settings: Settings, url: str | None) -> str:
    return (url or f"http://127.0.0.1:{settings.web_port}").rstrip("/")


def send_control(settings: Settings, org: str, command: Command) -> str:
    """Produce one control message and wait for Kafka's acknowledgement; its message id."""
    from jobs.control import ControlProducer

    with ControlProducer(settings) as producer:
        return producer.send(org, command)


def _send(org: str, command: Command, what: str) -> str:
    message_id = send_control(_cli()._settings(), org, command)
    _say(f"org {org}: {what} (control message {message_id})")
    return message_id


# -- the worker's view ----------------------------------------------------------------------


def fetch_caps(url: str, org: str, timeout: float = WORKER_TIMEOUT) -> dict[str, Any] | None:
    """The worker's enforcement view of ``org`` (``GET {url}/metering/caps?org=ORG``), shaped
    like :func:`core.enforcement.describe`; ``None`` when the worker knows nothing of the org
    (404). Raises :class:`WorkerUnavailable` when nothing answers at ``url`` and
    :class:`WorkerError` for any other status or a body that is not a JSON object."""
    import httpx

    try:
        response = httpx.get(f"{url}{CAPS_PATH}", params={"org": org}, timeout=timeout)
    except httpx.HTTPError as exc:
        raise WorkerUnavailable(
            f"the metering worker at {url} did not answer ({type(exc).__name__}); "
            "start it with `metering worker`, or point --worker-url at it"
        ) from None
    if response.status_code == 404:
        if _json_error(response) is not None:
            return None  # the worker's own answer: it has no state for this org
        raise WorkerError(
            f"the process at {url} has no {CAPS_PATH} endpoint (an older worker, or another "
            "program on that port?); point --worker-url at a current `metering worker`"
        )
    if response.status_code != 200:
        raise WorkerError(
            f"the metering worker at {url} answered {response.status_code}: {_error_text(response)}"
        )
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise WorkerError(f"the metering worker at {url} did not answer with a JSON object")
    return body


def _json_error(response: Any) -> str | None:
    """The ``error`` text of a JSON error body, else ``None``."""
    try:
        body = response.json()
    except ValueError:
        return None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return body["error"]
    return None


def _error_text(response: Any) -> str:
    text = _json_error(response)
    if text is not None:
        return text
    return " ".join(response.text.split())[:200] or "(no detail)"


def worker_plan(url: str, org: str) -> str | None:
    """The org's plan as the worker knows it, or ``None`` when unknown or the worker cannot
    be asked (the worker then judges the command itself and dead-letters it if refused)."""
    try:
        caps = fetch_caps(url, org)
    except (WorkerUnavailable, WorkerError) as exc:
        _note(
            f"note: could not check the org's plan ({exc}); sending anyway, the worker "
            "refuses a command the plan does not allow"
        )
        return None
    plan = caps.get("plan") if caps else None
    return plan if isinstance(plan, str) else None


def caps_json(org: str, caps: Mapping[str, Any]) -> dict[str, Any]:
    """``caps show --json``: the worker's JSON with every ``*_nano_usd`` amount turned into an
    exact USD decimal string under ``*_usd`` (``null`` stays ``null``: unlimited / none)."""
    return {"org_id": org, **_usd_amounts(caps)}


def _usd_amounts(value: Any) -> Any:
    if isinstance(value, Mapping):
        converted: dict[str, Any] = {}
        for key, item in value.items():
            if isinstance(key, str) and key.endswith(NANO_SUFFIX):
                converted[key.removesuffix(NANO_SUFFIX) + "_usd"] = _as_usd(item)
            else:
                converted[key] = _usd_amounts(item)
        return converted
    if isinstance(value, list):
        return [_usd_amounts(item) for item in value]
    return value


def _as_usd(value: Any) -> Any:
    if isinstance(value, Mapping):  # e.g. seat_tier_caps_nano_usd: {tier: amount}
        return {key: _as_usd(item) for key, item in value.items()}
    if isinstance(value, int) and not isinstance(value, bool):
        return format_usd(value)
    return value


def _state(scope: Mapping[str, Any]) -> str:
    state = str(scope.get("state", ""))
    return f"{state}, disabled" if scope.get("disabled") else state


def _limit(scope: Mapping[str, Any]) -> str:
    source = scope.get("limit_source")
    return display_usd(scope.get("limit_nano_usd")) + (f" ({source})" if source else "")


def print_caps(org: str, caps: Mapping[str, Any]) -> None:
    """``caps show`` as tables: one row per scope (the org, then each member)."""
    from rich import box
    from rich.table import Table

    out = _cli().out
    plan = caps.get("plan") or "plan unknown"
    period = caps.get("period") or "none yet (no usage)"
    _say(f"{org}: {plan}, current month {period}")
    block = caps.get("org") or {}
    scopes = Table(box=box.SIMPLE_HEAD, title="Extra usage this month")
    for name in ("Scope", "Tier", "State", "Spend", "Limit (source)", "Own cap"):
        # Wrap rather than cut: an amount is folded on a narrow terminal, never shortened.
        scopes.add_column(name, overflow="fold")
    scopes.add_row(
        "ORG (all members)",
        "",
        _state(block),
        display_usd(block.get("spend_nano_usd") or 0),
        _limit(block),
        display_usd(block.get("org_cap_nano_usd")),
    )
    for member in caps.get("members") or []:
        scopes.add_row(
            str(member.get("user_id")),
            member.get("seat_tier") or "",
            _state(member),
            display_usd(member.get("spend_nano_usd") or 0),
            _limit(member),
            display_usd(member.get("user_cap_nano_usd")),
        )
    out.print(scopes, markup=False, highlight=False)
    if caps.get("plan") != "TEAM":
        tiers = caps.get("seat_tier_caps_nano_usd") or {}
        text = ", ".join(f"{tier.value} {display_usd(tiers.get(tier.value))}" for tier in SeatTier)
        _say(f"seat-tier caps: {text}")
    balance = caps.get("balance") or {}
    if caps.get("plan") == "TEAM" or balance.get("tracked"):
        state = "" if balance.get("tracked") else " (not tracked until the first top-up or spend)"
        _say(
            f"prepaid balance: {display_usd(balance.get('balance_nano_usd') or 0)}"
            f" = top-ups {display_usd(balance.get('topups_nano_usd') or 0)}"
            f" - extra cost {display_usd(balance.get('extra_cost_nano_usd') or 0)}{state}"
        )
        reload = caps.get("auto_reload")
        if reload:
            _say(
                f"auto-reload: {display_usd(reload.get('amount_nano_usd'))} when the balance "
                f"falls to {display_usd(reload.get('threshold_nano_usd'))} or below"
            )
        else:
            _say("auto-reload: off")


# -- caps -----------------------------------------------------------------------------------


def caps_set(
    org: OrgOption,
    user: Annotated[str | None, typer.Option("--user", help="A member's USER cap.")] = None,
    tier: Annotated[
        SeatTier | None,
        typer.Option("--tier", case_sensitive=False, help="A SEAT_TIER cap (Enterprise)."),
    ] = None,
    usd: Annotated[
        str | None, typer.Option("--usd", help="The monthly cap in USD, e.g. 12.50.")
    ] = None,
    unlimited: Annotated[bool, typer.Option("--unlimited", help="Remove the cap.")] = False,
    worker_url: WorkerUrlOption = None,
) -> None:
    """Set a monthly extra-usage cap: the org's (default), a seat tier's or one member's."""
    org, user = _org(org), _user(user)
    if user is not None and tier is not None:
        _refuse(
            "--user and --tier are exclusive: a cap is for the org, one seat tier or one member"
        )
    if usd is not None and unlimited:
        _refuse("give either --usd AMOUNT or --unlimited, not both")
    if usd is None and not unlimited:
        _refuse("give the cap: --usd AMOUNT, or --unlimited to remove it")
    limit = None if usd is None else _amount("--usd", usd)
    scope = "USER" if user is not None else "SEAT_TIER" if tier is not None else "ORG"
    if tier is not None:
        url = _worker_url(_cli()._settings(), worker_url)
        if worker_plan(url, org) == "TEAM":
            _refuse(
                f"PLAN_MISMATCH: seat-tier caps are for Enterprise; org {org} is on TEAM "
                "(set an ORG cap, or a USER cap with --user)"
            )
    command = (
        "SetCap",
        {
            "scope": scope,
            "user_id": user,
            "seat_tier": tier.value if tier is not None else None,
            "limit_nano_usd": limit,
        },
    )
    target = {"ORG": "ORG cap", "USER": f"USER cap of {user}", "SEAT_TIER": f"{tier} seat-tier cap"}
    _send(org, command, f"{target[scope]} set to {display_usd(limit)}")


def _set_enabled(org: str, user: str | None, enabled: bool) -> None:
    org, user = _org(org), _user(user)
    command = ("SetEnabled", {"user_id": user, "enabled": enabled})
    who = f"member {user}" if user is not None else "the whole organisation"
    _send(org, command, f"extra usage {'enabled' if enabled else 'disabled'} for {who}")


def caps_disable(
    org: OrgOption,
    user: Annotated[str | None, typer.Option("--user", help="One member only.")] = None,
) -> None:
    """Turn extra usage off for the org or one member (blocks like a cap of zero)."""
    _set_enabled(org, user, enabled=False)


def caps_enable(
    org: OrgOption,
    user: Annotated[str | None, typer.Option("--user", help="One member only.")] = None,
) -> None:
    """Turn extra usage back on for the org or one member."""
    _set_enabled(org, user, enabled=True)


def caps_show(
    org: OrgOption,
    as_json: Annotated[bool, typer.Option("--json", help="Exact JSON instead of tables.")] = False,
    worker_url: WorkerUrlOption = None,
) -> None:
    """State per scope, spend, effective limit and its source, as the worker sees them."""
    org = _org(org)
    url = _worker_url(_cli()._settings(), worker_url)
    caps = fetch_caps(url, org)
    if caps is None:
        _note(f"the worker at {url} knows nothing of org {org} (no usage or command seen yet)")
        raise typer.Exit(1)
    if as_json:
        typer.echo(json.dumps(caps_json(org, caps), indent=2))
    else:
        print_caps(org, caps)


# -- Team balance ---------------------------------------------------------------------------


def _refuse_enterprise(org: str, worker_url: str | None, what: str) -> None:
    url = _worker_url(_cli()._settings(), worker_url)
    if worker_plan(url, org) == "ENTERPRISE":
        _refuse(
            f"PLAN_MISMATCH: {what} are for Team organisations; org {org} is on ENTERPRISE "
            "(Enterprise extra usage is invoiced: `metering invoice`)"
        )


def topup(
    org: OrgOption,
    usd: Annotated[str, typer.Option("--usd", help="Amount added to the prepaid balance.")],
    purchase_id: Annotated[
        str | None,
        typer.Option("--purchase-id", help="Idempotency key (default: a new id, printed)."),
    ] = None,
    worker_url: WorkerUrlOption = None,
) -> None:
    """Add to a Team organisation's prepaid balance (a repeated purchase id applies once)."""
    org = _org(org)
    amount = _amount("--usd", usd)
    if amount <= 0:
        _refuse("--usd: a top-up must be more than 0")
    if purchase_id is not None and not purchase_id.strip():
        _refuse("--purchase-id must not be empty (leave it out for a new one)")
    _refuse_enterprise(org, worker_url, "prepaid top-ups")
    if purchase_id is None:
        import uuid

        purchase_id = str(uuid.uuid4())
        _say(f"purchase id {purchase_id} (repeat with --purchase-id {purchase_id} to retry)")
    command = ("TopUp", {"purchase_id": purchase_id.strip(), "amount_nano_usd": amount})
    _send(org, command, f"top-up of {display_usd(amount)} (purchase {purchase_id.strip()})")


def autoreload(
    org: OrgOption,
    threshold_usd: Annotated[
        str | None,
        typer.Option("--threshold-usd", help="Reload when the balance falls to this or below."),
    ] = None,
    amount_usd: Annotated[
        str | None, typer.Option("--amount-usd", help="Amount of each reload.")
    ] = None,
    off: Annotated[bool, typer.Option("--off", help="Turn auto-reload off.")] = False,
    worker_url: WorkerUrlOption = None,
) -> None:
    """Configure Team auto-reload: (--threshold-usd X --amount-usd Y) or --off."""
    org = _org(org)
    if off:
        if threshold_usd is not None or amount_usd is not None:
            _refuse("--off takes no --threshold-usd or --amount-usd")
        command = (
            "SetAutoReload",
            {"enabled": False, "threshold_nano_usd": None, "amount_nano_usd": None},
        )
        what = "auto-reload off"
    else:
        if threshold_usd is None or amount_usd is None:
            _refuse("give both --threshold-usd X and --amount-usd Y, or --off")
        threshold = _amount("--threshold-usd", threshold_usd)
        amount = _amount("--amount-usd", amount_usd)
        if amount <= 0:
            _refuse("--amount-usd: a reload must be more than 0")
        command = (
            "SetAutoReload",
            {"enabled": True, "threshold_nano_usd": threshold, "amount_nano_usd": amount},
        )
        what = f"auto-reload of {display_usd(amount)} at {display_usd(threshold)} or below"
    _refuse_enterprise(org, worker_url, "auto-reloads")
    _send(org, command, what)


# -- enforcement events ---------------------------------------------------------------------

PAUSE_HEADER = (
    f"{'emitted_at':<24} {'action':<16} {'scope':<5} {'reason':<17} {'period':<7} "
    "org / user, spend / limit (source), trigger"
)


def pause_line(record: Mapping[str, Any]) -> str:
    """One enforcement event as one line for people (amounts in exact USD)."""
    from core.periods import ms_to_iso

    who = record["org_id"] + (f" / {record['user_id']}" if record.get("user_id") else "")
    if record["action"] == "RELOAD_REQUESTED":
        money = (
            f"reload {display_usd(record.get('amount_nano_usd') or 0)}, "
            f"balance {display_usd(record.get('balance_nano_usd') or 0)}"
        )
    else:
        source = record.get("limit_source")
        money = (
            f"{display_usd(record['spend_nano_usd'])} / {display_usd(record.get('limit_nano_usd'))}"
            + (f" ({source})" if source else "")
        )
    return (
        f"{ms_to_iso(record['emitted_at']):<24} {record['action']:<16} {record['scope']:<5} "
        f"{record['reason']:<17} {record['period']:<7} {who}, {money}, {record['trigger_id']}"
    )


def pauses(
    follow: Annotated[
        bool, typer.Option("--follow", help="Keep printing new events until Ctrl-C.")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per line (Avro field names).")
    ] = False,
    billing: Annotated[
        bool, typer.Option("--billing", help="Also read metering.billing (RELOAD_REQUESTED).")
    ] = False,
) -> None:
    """Pause and resume events from the beginning; without --follow, exit when caught up."""
    import sys

    from jobs.pauses import read_pauses

    settings = _cli()._settings()
    stop = threading.Event()
    printed = 0
    try:
        for record in read_pauses(settings, follow, billing, stop, on_undecodable=_note):
            if not as_json and printed == 0:
                typer.echo(PAUSE_HEADER)
            typer.echo(json.dumps(record) if as_json else pause_line(record))
            printed += 1
            if follow:
                sys.stdout.flush()
    except KeyboardInterrupt:  # the way to end --follow
        stop.set()
    if printed == 0 and not as_json:
        _note("no enforcement events yet")


# -- Enterprise statement -------------------------------------------------------------------


def _month_arg(text: str) -> tuple[str, Any]:
    from datetime import date

    from core.periods import parse_period

    try:
        year, month = parse_period(text)
    except ValueError as exc:
        _refuse(f"--month: {exc}")
    return f"{year:04d}-{month:02d}", date(year, month, 1)


def invoice(
    org: OrgOption,
    month: Annotated[str, typer.Option("--month", help="YYYY-MM (UTC calendar month).")],
    output_format: Annotated[
        InvoiceFormat, typer.Option("--format", case_sensitive=False, help="csv or json.")
    ] = InvoiceFormat.CSV,
) -> None:
    """The Enterprise monthly statement of extra cost: by member, by model, and the total."""
    from jobs.invoice import InconsistentStatement, build_statement, to_csv, to_json
    from sinks.access import open_reader

    org = _org(org)
    period, first_day = _month_arg(month)
    reader = open_reader(_cli()._settings())
    try:
        newest = reader.named("org_plan", org_id=org)
        if newest and newest[0]["plan"] == "TEAM":
            _refuse(
                f"org {org} is on the TEAM plan: Team extra usage is prepaid (`metering topup`); "
                "statements are for Enterprise organisations"
            )
        for attempt in range(3):  # the three reads disagree only while events arrive
            try:
                statement = build_statement(
                    org,
                    period,
                    reader.named("invoice_by_member", org_id=org, month=first_day),
                    reader.named("invoice_by_model", org_id=org, month=first_day),
                    reader.named("invoice_total", org_id=org, month=first_day),
                )
                break
            except InconsistentStatement:
                if attempt == 2:
                    raise
    finally:
        reader.close()
    if not newest:
        _note(f"note: the store has no usage of org {org} at all (check the org id)")
    typer.echo(
        to_json(statement) if output_format is InvoiceFormat.JSON else to_csv(statement), nl=False
    )


# -- registration ---------------------------------------------------------------------------


def register(cli: typer.Typer) -> None:
    """Add ``caps``, ``topup``, ``autoreload``, ``pauses`` and ``invoice`` to ``cli``."""
    caps_cli = typer.Typer(
        help="Monthly extra-usage caps and enablement (SPEC §5).", no_args_is_help=True
    )
    caps_cli.command("set")(caps_set)
    caps_cli.command("disable")(caps_disable)
    caps_cli.command("enable")(caps_enable)
    caps_cli.command("show")(caps_show)
    cli.add_typer(caps_cli, name="caps")
    cli.command("topup")(topup)
    cli.command("autoreload")(autoreload)
    cli.command("pauses")(pauses)
    cli.command("invoice")(invoice)
