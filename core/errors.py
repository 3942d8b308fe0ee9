"""Every exception the pure core raises.

Two families: :class:`ConfigError` for operator mistakes found at start-up (a bad price table,
bad settings) and :class:`RejectedEvent` for poison input, which always carries one of the
dead-letter reasons of SPEC §3 so the adapter can route it without guessing.
"""

from __future__ import annotations

from enum import StrEnum


class MeteringError(Exception):
    """Base of every error raised by this project's own code."""


class ConfigError(MeteringError):
    """Configuration or reference data is unusable; the process must not start with it."""


class PriceTableError(ConfigError):
    """The price table file is malformed, inexact or inconsistent."""


class DeadLetterReason(StrEnum):
    """Why a record went to ``metering.dead-letter`` (SPEC §3). The names are the contract."""

    UNDECODABLE = "UNDECODABLE"
    UNKNOWN_SCHEMA = "UNKNOWN_SCHEMA"
    UNKNOWN_MODEL = "UNKNOWN_MODEL"
    NO_PRICE = "NO_PRICE"
    INVALID_FIELD = "INVALID_FIELD"
    OUT_OF_RANGE = "OUT_OF_RANGE"
    FUTURE_TIMESTAMP = "FUTURE_TIMESTAMP"
    PLAN_MISMATCH = "PLAN_MISMATCH"


class RejectedEvent(MeteringError):
    """A record that can never be metered as it stands: dead-letter it with ``reason``.

    ``detail`` is one human-readable line naming the offending field or value.
    """

    def __init__(self, reason: DeadLetterReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


class UnknownModelError(RejectedEvent):
    """The model id resolves to no family in the price version that applies."""

    def __init__(self, model: str, version_id: str) -> None:
        super().__init__(
            DeadLetterReason.UNKNOWN_MODEL,
            f"model {model!r} is not in price table version {version_id}",
        )
        self.model = model


class NoPriceError(RejectedEvent):
    """The event is older than every price-table version."""

    def __init__(self, occurred_at_ms: int, first_effective_ms: int) -> None:
        super().__init__(
            DeadLetterReason.NO_PRICE,
            f"occurred_at {occurred_at_ms} ms precedes the first price version "
            f"(effective from {first_effective_ms} ms)",
        )
