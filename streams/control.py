"""Control messages on the wire (Avro dicts) <-> the core's commands."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from core.enforcement import (
    Command,
    ControlMessage,
    PeriodTick,
    Repriced,
    SetAutoReload,
    SetCap,
    SetEnabled,
    TopUp,
)
from core.errors import DeadLetterReason, MeteringError, RejectedEvent
from core.metering import Correction
from streams.codec import record_to_priced


@dataclass(frozen=True, slots=True)
class RepriceCommand:
    """A replay's correction message as the worker applies it: the corrections for
    :meth:`core.metering.Meter.reprice`, then the core command for the enforcer (whose
    ``extra_delta_nano`` the worker fills in from what :meth:`Meter.reprice` applied)."""

    replay_id: str
    final: bool
    corrections: list[Correction]


@dataclass(frozen=True, slots=True)
class RepriceMessage:
    """A ``metering.control`` message carrying a :class:`RepriceCommand`."""

    message_id: str
    org_id: str
    issued_at_ms: int
    command: RepriceCommand

    def with_command(self, command: Command) -> ControlMessage:
        """The same message with the core command the enforcer applies."""
        return ControlMessage(self.message_id, self.org_id, self.issued_at_ms, command)


def control_from_record(
    record: Mapping[str, Any],
    decode_priced: Callable[[bytes], Mapping[str, Any]] | None = None,
) -> ControlMessage | RepriceMessage:
    """A decoded ``metering.control`` record as a :class:`ControlMessage` (or, for a
    replay's corrections, a :class:`RepriceMessage`).

    ``decode_priced`` decodes the priced records a ``Reprice`` command carries (the priced
    codec); a ``Reprice`` command becomes a :class:`RepriceCommand`.

    Raises :class:`RejectedEvent` (``INVALID_FIELD``) for a message that cannot apply: no
    message id, no org (except the partition-wide period tick), an unknown command, a
    correction whose priced record is unreadable or of another org.
    """
    name, fields = record["command"]
    command: Command | RepriceCommand
    if name == "SetCap":
        command = SetCap(
            fields["scope"],
            fields.get("limit_nano_usd"),
            fields.get("user_id"),
            fields.get("seat_tier"),
        )
    elif name == "SetEnabled":
        command = SetEnabled(fields["enabled"], fields.get("user_id"))
    elif name == "TopUp":
        command = TopUp(fields["purchase_id"], fields["amount_nano_usd"])
    elif name == "SetAutoReload":
        command = SetAutoReload(
            fields["enabled"], fields.get("threshold_nano_usd"), fields.get("amount_nano_usd")
        )
    elif name == "PeriodTick":
        command = PeriodTick(fields["wall_clock_ms"])
    elif name == "Reprice":
        command = RepriceCommand(
            fields["replay_id"],
            fields["final"],
            _corrections(fields["corrections"], record.get("org_id"), decode_priced),
        )
    else:
        raise RejectedEvent(DeadLetterReason.INVALID_FIELD, f"unknown control command {name}")
    if not record.get("message_id"):
        raise RejectedEvent(DeadLetterReason.INVALID_FIELD, "message_id is empty")
    if not record.get("org_id") and not isinstance(command, PeriodTick):
        raise RejectedEvent(DeadLetterReason.INVALID_FIELD, "org_id is empty")
    if isinstance(command, RepriceCommand):
        return RepriceMessage(record["message_id"], record["org_id"], record["issued_at"], command)
    return ControlMessage(record["message_id"], record["org_id"], record["issued_at"], command)


def repriced(command: RepriceCommand, extra_delta_nano: int) -> Repriced:
    """The enforcer's command once the corrections are applied."""
    return Repriced(extra_delta_nano, command.final)


def _corrections(
    items: list[Mapping[str, Any]],
    org_id: str | None,
    decode_priced: Callable[[bytes], Mapping[str, Any]] | None,
) -> list[Correction]:
    if decode_priced is None:
        raise RejectedEvent(DeadLetterReason.INVALID_FIELD, "Reprice needs the priced codec")
    corrections = []
    for item in items:
        try:
            priced, partition, offset = record_to_priced(decode_priced(item["priced"]))
        except (MeteringError, KeyError, ValueError) as exc:
            raise RejectedEvent(
                DeadLetterReason.INVALID_FIELD, f"unreadable correction: {exc}"
            ) from None
        if priced.event.org_id != org_id:
            raise RejectedEvent(
                DeadLetterReason.INVALID_FIELD,
                f"a correction for org {priced.event.org_id!r} in a message of {org_id!r}",
            )
        corrections.append(
            Correction(
                priced, item["old_cost_nano"], item["old_pricing_version"], partition, offset
            )
        )
    return corrections
