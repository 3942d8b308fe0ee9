"""Operator commands for caps, balances and enforcement (jobs/enforcement_cli.py, jobs/control.py,
jobs/pauses.py), without Kafka or a worker: the control message each command would produce,
one-line refusals of bad arguments, ``caps show`` from a canned worker answer, and the pause
reader's merge over a fake consumer.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import typer
from hypothesis import given
from hypothesis import strategies as st

import jobs.cli
from core.settings import Settings
from jobs import enforcement_cli
from jobs.control import (
    ControlProducer,
    control_record,
    display_usd,
    format_usd,
    usd_to_nano,
)
from jobs.pauses import PauseReadError, _PauseReader
from streams.codec import Codecs

CODECS = Codecs.pinned()


# -- money --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "nano"),
    [
        ("0.000000001", 1),
        ("12.5", 12_500_000_000),
        ("12.50", 12_500_000_000),
        ("12", 12_000_000_000),
        ("0", 0),
        (".5", 500_000_000),
        ("7.", 7_000_000_000),
        ("$3.25", 3_250_000_000),
        (" 1.100000000000 ", 1_100_000_000),  # trailing zeros are not precision
        ("9223372036.854775807", 2**63 - 1),
    ],
)
def test_usd_to_nano_is_exact(text: str, nano: int) -> None:
    assert usd_to_nano(text) == nano


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("1e3", "plain decimal"),
        ("-1", "negative"),
        ("-0.5", "negative"),
        ("0.0000000001", "more than 9 decimal places"),
        ("1.0000000000000000000000000000001", "more than 9 decimal places"),
        ("NaN", "plain decimal"),
        ("inf", "plain decimal"),
        ("Infinity", "plain decimal"),
        ("", "plain decimal"),
        ("12,50", "plain decimal"),
        ("1_000", "plain decimal"),
        ("twelve", "plain decimal"),
        ("١٢", "plain decimal"),  # non-ASCII digits
        ("9223372036.854775808", "too large"),
        ("1" * 5000, "too large"),
    ],
)
def test_usd_to_nano_refuses_with_one_line_naming_the_fix(text: str, says: str) -> None:
    with pytest.raises(ValueError) as caught:
        usd_to_nano(text)
    message = str(caught.value)
    assert says in message and "\n" not in message


@given(st.integers(min_value=0, max_value=2**63 - 1))
def test_format_usd_round_trips_every_amount(nano: int) -> None:
    text = format_usd(nano)
    assert "E" not in text and len(text.split(".")[1]) == 9
    assert usd_to_nano(text) == nano
    assert usd_to_nano(display_usd(nano).replace(",", "")) == nano


def test_money_for_people_is_exact_with_two_decimals_at_least() -> None:
    assert format_usd(1) == "0.000000001"
    assert format_usd(0) == "0.000000000"
    assert format_usd(-12_500_000_000) == "-12.500000000"
    assert display_usd(12_500_000_000) == "$12.50"
    assert display_usd(1) == "$0.000000001"
    assert display_usd(1_234_567_000_000_000) == "$1,234,567.00"
    assert display_usd(None) == "unlimited"


# -- the CLI ------------------------------------------------------------------------------


@dataclass
class Run:
    code: int
    out: str
    err: str
    sent: list[tuple[str, tuple[str, dict[str, Any]]]] = field(default_factory=list)


@dataclass
class FakeWorker:
    """What ``httpx.get`` answers for ``/metering/caps``: unreachable unless ``caps`` set."""

    caps: dict[str, Any] | None = None
    status: int = 200
    requests: list[str] = field(default_factory=list)

    def get(self, url: str, params: dict[str, str], timeout: float) -> httpx.Response:
        self.requests.append(f"{url}?org={params['org']}")
        if self.caps is None and self.status == 200:
            raise httpx.ConnectError("connection refused")
        request = httpx.Request("GET", url, params=params)
        return httpx.Response(self.status, json=self.caps, request=request)


@pytest.fixture
def worker(monkeypatch: pytest.MonkeyPatch) -> FakeWorker:
    fake = FakeWorker()
    monkeypatch.setattr(httpx, "get", fake.get)
    return fake


@pytest.fixture
def metering(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], worker: FakeWorker
) -> Any:
    """Run ``metering ARGS`` through ``jobs.cli.main`` on an app where only :func:`register`
    added commands; control messages are captured instead of produced."""
    app = typer.Typer(
        name="metering", no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False
    )
    enforcement_cli.register(app)
    monkeypatch.setattr(jobs.cli, "cli", app)

    def run(*args: str) -> Run:
        sent: list[tuple[str, tuple[str, dict[str, Any]]]] = []

        def send(self: ControlProducer, org_id: str, command: Any) -> str:
            # Whatever the CLI builds must be encodable on the wire.
            CODECS.control.encode(control_record(org_id, command, message_id="m", issued_at_ms=0))
            sent.append((org_id, command))
            return f"m{len(sent)}"

        monkeypatch.setattr(ControlProducer, "send", send)
        monkeypatch.setattr(sys, "argv", ["metering", *args])
        with pytest.raises(SystemExit) as exited:
            jobs.cli.main()
        captured = capsys.readouterr()
        return Run(int(exited.value.code or 0), captured.out, captured.err, sent)

    return run


def _set_cap(scope: str, limit: int | None, user: str | None = None, tier: str | None = None):
    return ("SetCap", {"scope": scope, "user_id": user, "seat_tier": tier, "limit_nano_usd": limit})


@pytest.mark.parametrize(
    ("args", "command"),
    [
        (["caps", "set", "--org", "o", "--usd", "5"], _set_cap("ORG", 5_000_000_000)),
        (["caps", "set", "--org", "o", "--unlimited"], _set_cap("ORG", None)),
        (
            ["caps", "set", "--org", "o", "--tier", "PREMIUM", "--usd", "12.50"],
            _set_cap("SEAT_TIER", 12_500_000_000, tier="PREMIUM"),
        ),
        (
            ["caps", "set", "--org", "o", "--tier", "standard", "--unlimited"],
            _set_cap("SEAT_TIER", None, tier="STANDARD"),
        ),
        (
            ["caps", "set", "--org", "o", "--user", "u-1", "--usd", "0"],
            _set_cap("USER", 0, user="u-1"),
        ),
        (
            ["caps", "set", "--org", "o", "--user", "u-1", "--unlimited"],
            _set_cap("USER", None, user="u-1"),
        ),
        (["caps", "disable", "--org", "o"], ("SetEnabled", {"user_id": None, "enabled": False})),
        (
            ["caps", "disable", "--org", "o", "--user", "u-1"],
            ("SetEnabled", {"user_id": "u-1", "enabled": False}),
        ),
        (["caps", "enable", "--org", "o"], ("SetEnabled", {"user_id": None, "enabled": True})),
        (
            ["topup", "--org", "o", "--usd", "100", "--purchase-id", "p-1"],
            ("TopUp", {"purchase_id": "p-1", "amount_nano_usd": 100_000_000_000}),
        ),
        (
            ["autoreload", "--org", "o", "--threshold-usd", "10", "--amount-usd", "50.5"],
            (
                "SetAutoReload",
                {
                    "enabled": True,
                    "threshold_nano_usd": 10_000_000_000,
                    "amount_nano_usd": 50_500_000_000,
                },
            ),
        ),
        (
            ["autoreload", "--org", "o", "--off"],
            (
                "SetAutoReload",
                {"enabled": False, "threshold_nano_usd": None, "amount_nano_usd": None},
            ),
        ),
    ],
)
def test_each_command_sends_its_control_message(
    metering: Any, worker: FakeWorker, args: list[str], command
) -> None:
    worker.status, worker.caps = 404, {"error": "unknown org"}  # plan checks: nothing known
    result = metering(*args)
    assert (result.code, result.err) == (0, "")
    assert result.sent == [("o", command)]
    assert "(control message m1)" in result.out


def test_topup_without_purchase_id_prints_the_new_one(metering: Any) -> None:
    result = metering("topup", "--org", "o", "--usd", "0.000000001")
    assert result.code == 0
    [(_, (name, fields))] = result.sent
    assert name == "TopUp" and fields["amount_nano_usd"] == 1
    assert f"purchase id {fields['purchase_id']}" in result.out
    again = metering("topup", "--org", "o", "--usd", "1")
    assert again.sent[0][1][1]["purchase_id"] != fields["purchase_id"]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["caps", "set", "--usd", "1"], "Missing option '--org'"),
        (["caps", "set", "--org", "o"], "--usd AMOUNT, or --unlimited"),
        (["caps", "set", "--org", "o", "--usd", "1", "--unlimited"], "not both"),
        (["caps", "set", "--org", "o", "--user", "u", "--tier", "PREMIUM", "--usd", "1"], "--tier"),
        (["caps", "set", "--org", "o", "--tier", "GOLD", "--usd", "1"], "GOLD"),
        (["caps", "set", "--org", "o", "--usd", "1e3"], "--usd: not a USD amount: '1e3'"),
        (["caps", "set", "--org", "o", "--usd", "-1"], "--usd: USD amount '-1' is negative"),
        (["caps", "set", "--org", " ", "--usd", "1"], "--org must not be empty"),
        (["caps", "set", "--org", "o", "--user", "", "--usd", "1"], "--user must not be empty"),
        (["caps", "disable"], "Missing option '--org'"),
        (["topup", "--org", "o"], "Missing option '--usd'"),
        (["topup", "--org", "o", "--usd", "0"], "more than 0"),
        (["topup", "--org", "o", "--usd", "1", "--purchase-id", ""], "--purchase-id"),
        (["autoreload", "--org", "o"], "--threshold-usd X and --amount-usd Y, or --off"),
        (["autoreload", "--org", "o", "--threshold-usd", "1"], "--amount-usd"),
        (["autoreload", "--org", "o", "--off", "--amount-usd", "1"], "--off takes no"),
        (
            ["autoreload", "--org", "o", "--threshold-usd", "1", "--amount-usd", "0"],
            "a reload must be more than 0",
        ),
        (
            ["autoreload", "--org", "o", "--threshold-usd", "x", "--amount-usd", "1"],
            "--threshold-usd: not a USD amount",
        ),
        (["invoice", "--org", "o", "--month", "2026-13"], "--month: not a month"),
        (["invoice", "--org", "o", "--month", "2026-11", "--format", "xml"], "xml"),
    ],
)
def test_bad_arguments_get_one_line_and_status_2(metering: Any, args: list[str], says: str) -> None:
    result = metering(*args)
    assert result.code == 2
    assert result.sent == [] and result.out == ""
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert says in lines[0]


# -- asking the worker ------------------------------------------------------------------------

DESCRIBED: dict[str, Any] = {
    "plan": "ENTERPRISE",
    "period": "2026-11",
    "org": {
        "state": "ACTIVE",
        "disabled": False,
        "spend_nano_usd": 12_500_000_001,
        "limit_nano_usd": None,
        "limit_source": None,
        "org_cap_nano_usd": None,
    },
    "seat_tier_caps_nano_usd": {"PREMIUM": 40_000_000_000, "STANDARD": None},
    "balance": {
        "tracked": False,
        "balance_nano_usd": 0,
        "topups_nano_usd": 0,
        "extra_cost_nano_usd": 12_500_000_001,
    },
    "auto_reload": None,
    "members": [
        {
            "user_id": "u-1",
            "seat_tier": "PREMIUM",
            "state": "PAUSED",
            "disabled": False,
            "spend_nano_usd": 40_000_000_001,
            "limit_nano_usd": 40_000_000_000,
            "limit_source": "SEAT_TIER",
            "user_cap_nano_usd": None,
        },
        {
            "user_id": "u-2",
            "seat_tier": None,
            "state": "PAUSED",
            "disabled": True,
            "spend_nano_usd": 0,
            "limit_nano_usd": 0,
            "limit_source": "USER",
            "user_cap_nano_usd": 1,
        },
    ],
}


def test_caps_show_prints_every_scope_with_exact_usd(
    metering: Any, worker: FakeWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "160")  # one table row per line
    worker.caps = DESCRIBED
    result = metering("caps", "show", "--org", "o")
    assert result.code == 0, result.err
    assert worker.requests == ["http://127.0.0.1:6066/metering/caps?org=o"]
    assert "o: ENTERPRISE, current month 2026-11" in result.out
    org_row = next(line for line in result.out.splitlines() if "ORG (all members)" in line)
    assert "$12.500000001" in org_row and "unlimited" in org_row and "ACTIVE" in org_row
    member = next(line for line in result.out.splitlines() if "u-1" in line)
    assert "$40.000000001" in member and "$40.00 (SEAT_TIER)" in member and "PAUSED" in member
    disabled = next(line for line in result.out.splitlines() if "u-2" in line)
    assert "PAUSED, disabled" in disabled and "$0.000000001" in disabled
    assert "seat-tier caps: STANDARD unlimited, PREMIUM $40.00" in result.out


def test_caps_show_json_has_exact_decimal_strings(metering: Any, worker: FakeWorker) -> None:
    worker.caps = DESCRIBED
    result = metering("caps", "show", "--org", "o", "--json", "--worker-url", "http://w:1/")
    assert result.code == 0, result.err
    assert worker.requests == ["http://w:1/metering/caps?org=o"]
    shown = json.loads(result.out)
    assert shown["org_id"] == "o" and shown["plan"] == "ENTERPRISE"
    assert shown["org"] == {
        "state": "ACTIVE",
        "disabled": False,
        "spend_usd": "12.500000001",
        "limit_usd": None,
        "limit_source": None,
        "org_cap_usd": None,
    }
    assert shown["seat_tier_caps_usd"] == {"PREMIUM": "40.000000000", "STANDARD": None}
    assert shown["balance"]["extra_cost_usd"] == "12.500000001"
    assert shown["members"][1]["user_cap_usd"] == "0.000000001"
    assert shown["members"][1]["limit_usd"] == "0.000000000"
    assert "nano" not in result.out


def test_caps_show_team_balance_and_auto_reload(metering: Any, worker: FakeWorker) -> None:
    worker.caps = {
        **DESCRIBED,
        "plan": "TEAM",
        "members": [],
        "balance": {
            "tracked": True,
            "balance_nano_usd": -5,
            "topups_nano_usd": 10_000_000_000,
            "extra_cost_nano_usd": 10_000_000_005,
        },
        "auto_reload": {"threshold_nano_usd": 1_000_000_000, "amount_nano_usd": 20_000_000_000},
    }
    result = metering("caps", "show", "--org", "o")
    assert result.code == 0, result.err
    assert "prepaid balance: -$0.000000005 = top-ups $10.00 - extra cost $10.000000005" in (
        result.out
    )
    assert "auto-reload: $20.00 when the balance falls to $1.00 or below" in result.out
    assert "seat-tier caps" not in result.out


def test_caps_show_of_an_unknown_org_says_so(metering: Any, worker: FakeWorker) -> None:
    worker.status, worker.caps = 404, {"error": "no such org"}
    result = metering("caps", "show", "--org", "nobody")
    assert result.code == 1 and result.out == ""
    assert "knows nothing of org nobody" in result.err


def test_caps_show_without_a_worker_names_the_fix(metering: Any) -> None:
    result = metering("caps", "show", "--org", "o")
    assert result.code == 2
    [line] = result.err.strip().splitlines()
    assert "metering worker" in line and "--worker-url" in line


def test_seat_tier_cap_for_a_team_org_is_refused(metering: Any, worker: FakeWorker) -> None:
    worker.caps = {**DESCRIBED, "plan": "TEAM"}
    result = metering("caps", "set", "--org", "o", "--tier", "PREMIUM", "--usd", "1")
    assert result.code == 2 and result.sent == []
    [line] = result.err.strip().splitlines()
    assert "PLAN_MISMATCH: seat-tier caps are for Enterprise" in line


@pytest.mark.parametrize("plan", ["ENTERPRISE", None])
def test_seat_tier_cap_is_sent_unless_the_worker_says_team(
    metering: Any, worker: FakeWorker, plan: str | None
) -> None:
    worker.caps = {**DESCRIBED, "plan": plan}
    result = metering("caps", "set", "--org", "o", "--tier", "PREMIUM", "--usd", "1")
    assert result.code == 0 and len(result.sent) == 1


def test_seat_tier_cap_is_sent_when_the_worker_is_unreachable(metering: Any) -> None:
    result = metering("caps", "set", "--org", "o", "--tier", "STANDARD", "--usd", "1")
    assert result.code == 0 and len(result.sent) == 1
    assert "could not check the org's plan" in result.err  # the worker will judge it


def test_topup_for_an_enterprise_org_is_refused(metering: Any, worker: FakeWorker) -> None:
    worker.caps = DESCRIBED
    result = metering("topup", "--org", "o", "--usd", "5")
    assert result.code == 2 and result.sent == [] and result.out == ""
    assert "PLAN_MISMATCH" in result.err


def test_a_404_that_is_not_the_worker_is_not_an_unknown_org(metering: Any, monkeypatch) -> None:
    def plain_404(url: str, params: dict[str, str], timeout: float) -> httpx.Response:
        return httpx.Response(404, text="404: Not Found", request=httpx.Request("GET", url))

    monkeypatch.setattr(httpx, "get", plain_404)
    result = metering("caps", "show", "--org", "o")
    assert result.code == 2 and "has no /metering/caps endpoint" in result.err


# -- pauses ---------------------------------------------------------------------------------

PAUSE = {
    "event_id": "e1",
    "action": "PAUSE",
    "scope": "USER",
    "reason": "CAP_REACHED",
    "org_id": "o",
    "user_id": "u-1",
    "period": "2026-11",
    "spend_nano_usd": 10_000_000_001,
    "limit_nano_usd": 10_000_000_000,
    "limit_source": "USER",
    "trigger_id": "usage-1",
    "emitted_at": 1_795_900_000_000,
    "amount_nano_usd": None,
    "balance_nano_usd": None,
}
RELOAD = {
    **PAUSE,
    "event_id": "e2",
    "action": "RELOAD_REQUESTED",
    "scope": "ORG",
    "reason": "BALANCE_LOW",
    "user_id": None,
    "limit_source": "BALANCE",
    "amount_nano_usd": 50_000_000_000,
    "balance_nano_usd": 2,
    "emitted_at": 1_795_900_000_001,
}


@pytest.fixture
def canned_pauses(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bool, bool]]:
    calls: list[tuple[bool, bool]] = []

    def read(settings, follow, include_billing, stop=None, **_: Any) -> Iterator[dict]:
        calls.append((follow, include_billing))
        yield PAUSE
        if include_billing:
            yield RELOAD

    monkeypatch.setattr("jobs.pauses.read_pauses", read)
    return calls


def test_pauses_json_prints_one_avro_record_per_line(metering: Any, canned_pauses) -> None:
    result = metering("pauses", "--json", "--billing")
    assert result.code == 0 and canned_pauses == [(False, True)]
    assert [json.loads(line) for line in result.out.splitlines()] == [PAUSE, RELOAD]


def test_pauses_table_prints_one_line_per_event(metering: Any, canned_pauses) -> None:
    result = metering("pauses", "--billing")
    header, pause, reload = result.out.splitlines()
    assert header.startswith("emitted_at")
    assert pause.startswith("2026-11-28T21:06:40.000Z PAUSE")
    assert "o / u-1, $10.000000001 / $10.00 (USER), usage-1" in pause
    assert "RELOAD_REQUESTED" in reload and "reload $50.00, balance $0.000000002" in reload


def test_pauses_on_an_empty_topic_says_so(metering: Any, monkeypatch) -> None:
    monkeypatch.setattr("jobs.pauses.read_pauses", lambda *a, **k: iter(()))
    result = metering("pauses")
    assert result.code == 0 and result.out == "" and "no enforcement events yet" in result.err


# -- the pause reader over a fake consumer ----------------------------------------------------


class FakeError:
    def __init__(self, code: int) -> None:
        self._code = code

    def code(self) -> int:
        return self._code

    def retriable(self) -> bool:
        return False

    def fatal(self) -> bool:
        return False

    def str(self) -> str:
        return f"error {self._code}"


class FakeMessage:
    def __init__(self, topic: str, partition: int, offset: int, value: bytes | None, error=None):
        self._where = (topic, partition, offset)
        self._value = value
        self._error = error

    def topic(self) -> str:
        return self._where[0]

    def partition(self) -> int:
        return self._where[1]

    def offset(self) -> int:
        return self._where[2]

    def value(self) -> bytes | None:
        return self._value

    def error(self) -> FakeError | None:
        return self._error


class FakeConsumer:
    """Partitions as lists of encoded records; each consume() hands out at most ``batch``
    messages of ONE partition, round robin, so the reader must merge."""

    def __init__(self, topic: str, logs: dict[int, list[bytes]], batch: int = 2) -> None:
        self.topic = topic
        self.logs = logs
        self.batch = batch
        self.positions = dict.fromkeys(logs, 0)
        self.turn = 0
        self.assigned: list[Any] = []

    def list_topics(self, timeout: float) -> Any:
        partitions = {p: None for p in self.logs}
        topic = type("T", (), {"partitions": partitions, "error": None})()
        return type("M", (), {"topics": {self.topic: topic}})()

    def get_watermark_offsets(self, tp: Any, timeout: float) -> tuple[int, int]:
        return 0, len(self.logs[tp.partition])

    def assign(self, partitions: list[Any]) -> None:
        self.assigned = partitions

    def consume(self, num: int, timeout: float) -> list[FakeMessage]:
        from confluent_kafka import KafkaError

        for _ in range(len(self.logs)):
            partition = sorted(self.logs)[self.turn % len(self.logs)]
            self.turn += 1
            log, start = self.logs[partition], self.positions[partition]
            if start < len(log):
                end = min(start + self.batch, len(log))
                self.positions[partition] = end
                return [
                    FakeMessage(self.topic, partition, offset, log[offset])
                    for offset in range(start, end)
                ]
            if start == len(log):
                self.positions[partition] += 1  # one EOF notice per partition
                return [
                    FakeMessage(
                        self.topic, partition, start, None, FakeError(KafkaError._PARTITION_EOF)
                    )
                ]
        return []


def _pause(org: str, emitted_at: int) -> bytes:
    return CODECS.pause.encode({**PAUSE, "org_id": org, "emitted_at": emitted_at})


def _reader(consumer: FakeConsumer, **options: Any) -> _PauseReader:
    defaults: dict[str, Any] = {
        "follow": False,
        "stop": threading.Event(),
        "on_undecodable": None,
        "timeout": 1.0,
        "stall_timeout": 1.0,
        "poll_interval": 0.0,
    }
    return _PauseReader(Settings(), consumer, {"p": CODECS.pause}, **{**defaults, **options})


def test_reader_merges_partitions_by_emitted_at_and_stops_at_the_end() -> None:
    logs = {
        0: [_pause("a", 1), _pause("a", 4), _pause("a", 5), _pause("a", 9)],
        1: [_pause("b", 2), _pause("b", 3), _pause("b", 8)],
        2: [],
        3: [_pause("c", 6), _pause("c", 7)],
    }
    events = list(_reader(FakeConsumer("p", logs)).events())
    assert [event["emitted_at"] for event in events] == [1, 2, 3, 4, 5, 6, 7, 8, 9]


def test_reader_keeps_each_partitions_own_order() -> None:
    # A re-sent event after a crash carries its original (older) emitted_at: it stays where
    # the log has it rather than jumping back in time.
    logs = {0: [_pause("a", 5), _pause("a", 1)], 1: [_pause("b", 3)]}
    events = list(_reader(FakeConsumer("p", logs, batch=1)).events())
    assert [(event["org_id"], event["emitted_at"]) for event in events] == [
        ("b", 3),
        ("a", 5),
        ("a", 1),
    ]


def test_reader_reports_or_raises_on_records_that_are_not_pause_events() -> None:
    logs = {0: [_pause("a", 1), b"garbage", _pause("a", 2)]}
    skipped: list[str] = []
    events = list(_reader(FakeConsumer("p", logs), on_undecodable=skipped.append).events())
    assert [event["emitted_at"] for event in events] == [1, 2]
    assert len(skipped) == 1 and skipped[0].startswith("p[0]@1 skipped, not a pause event")
    with pytest.raises(PauseReadError, match=r"p\[0\]@1 is not a pause event"):
        list(_reader(FakeConsumer("p", logs)).events())


def test_reader_gives_up_when_catching_up_stalls() -> None:
    consumer = FakeConsumer("p", {0: [_pause("a", 1)]})
    consumer.consume = lambda num, timeout: []  # type: ignore[method-assign]
    with pytest.raises(PauseReadError, match="no progress reading p\\[0\\]"):
        list(_reader(consumer, stall_timeout=0.05).events())


def test_reader_stops_following_when_told() -> None:
    stop = threading.Event()
    reader = _reader(FakeConsumer("p", {0: [_pause("a", 1)]}), follow=True, stop=stop)
    events = reader.events()
    assert next(events)["emitted_at"] == 1
    stop.set()
    assert list(events) == []
