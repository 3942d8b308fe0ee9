"""Control messages on the wire (Avro dicts) <-> the core's commands."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from core.enforcement import (
    Command,
    ControlMessage,
    PeriodTick,
    SetAutoReload,
    SetCap,
    SetEnabled,
    TopUp,
)
from core.errors import DeadLetterReason, RejectedEvent


def control_from_record(record: Mapping[str, Any]) -> ControlMessage:
    """A decoded ``metering.control`` record as a :class:`ControlMessage`.

    Raises :class:`RejectedEvent` (``INVALID_FIELD``) for a message that cannot apply: no
    message id, no org (except the partition-wide period tick), an unknown command.
    """
    name, fields = record["command"]
    command: Command
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
    else:
        raise RejectedEvent(DeadLetterReason.INVALID_FIELD, f"unknown control command {name}")
    if not record.get("message_id"):
        raise RejectedEvent(DeadLetterReason.INVALID_FIELD, "message_id is empty")
    if not record.get("org_id") and not isinstance(command, PeriodTick):
        raise RejectedEvent(DeadLetterReason.INVALID_FIELD, "org_id is empty")
    return ControlMessage(record["message_id"], record["org_id"], record["issued_at"], command)
