"""Control messages: the operator's and billing system's commands to the worker (SPEC §5, §7).

A control message (``avro/control_message.avsc``) is produced to ``metering.control``, keyed by
``org_id`` with the murmur2 partitioner, so it lands on the same partition number as the org's
usage and the worker applies it in order with that usage. :class:`ControlProducer` sends one
message at a time and waits until Kafka acknowledged it (``acks=all``, idempotent): when
:meth:`ControlProducer.send` returns, the command is durable and the worker will apply it.

Money on the command line is a decimal USD string; :func:`usd_to_nano` converts it exactly to
integer nano-USD (the unit of every amount on the wire) and :func:`format_usd` converts back.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import TYPE_CHECKING, Any

from core.errors import MeteringError

if TYPE_CHECKING:
    from confluent_kafka import KafkaError, Message, Producer

    from core.settings import Settings
    from streams.codec import Codecs

NANO_PER_USD = 1_000_000_000
MAX_NANO_USD = 2**63 - 1
"""Amounts travel as Avro ``long`` nano-USD: about 9.2 billion USD at most."""

Command = tuple[str, dict[str, Any]]
"""A control command as the control codec takes it: ``(record name, fields)``, e.g.
``("SetCap", {"scope": "ORG", "user_id": None, "seat_tier": None, "limit_nano_usd": 5})``."""

# Plain decimal notation only: no exponent, no sign (negatives are refused with their own
# message), no thousands separators. An optional leading "$" is tolerated.
_USD_PATTERN = re.compile(r"\$?(?:\d+(?:\.\d*)?|\.\d+)", re.ASCII)


class ControlError(MeteringError):
    """A control message could not be delivered to Kafka (one line, names the topic)."""


def usd_to_nano(text: str) -> int:
    """An exact decimal USD string -> integer nano-USD (``"12.5"`` -> ``12_500_000_000``).

    Accepts plain decimal notation (``12``, ``12.50``, ``0.000000001``, ``$3``). Raises
    ``ValueError`` with one line naming the fix for anything else: a negative amount, an
    exponent (``1e3``), NaN or infinity, a value finer than one nano-USD (more than 9
    significant decimal places), a value beyond the wire's 64-bit range, or garbage.
    Never goes through a float.
    """
    stripped = text.strip()
    if stripped.startswith("-"):
        raise ValueError(f"USD amount {text!r} is negative; give an amount of 0 or more")
    if not _USD_PATTERN.fullmatch(stripped):
        raise ValueError(f"not a USD amount: {text!r} (write a plain decimal number such as 12.50)")
    # Integer arithmetic on the digits: exact for any length (Decimal would round products
    # to its context's 28 digits).
    whole, _, fraction = stripped.removeprefix("$").partition(".")
    fraction = fraction.rstrip("0")
    if len(fraction) > 9:
        raise ValueError(
            f"USD amount {text!r} has more than 9 decimal places; "
            "the smallest unit is 0.000000001 (one nano-USD)"
        )
    whole = whole.lstrip("0")
    result = (
        MAX_NANO_USD + 1  # more digits than any allowed amount: no need to convert them
        if len(whole) > 10
        else int(whole or "0") * NANO_PER_USD + int(fraction.ljust(9, "0"))
    )
    if result > MAX_NANO_USD:
        raise ValueError(f"USD amount {text!r} is too large (at most 9223372036.854775807)")
    return result


def format_usd(nano: int) -> str:
    """Integer nano-USD -> the exact ``Decimal(38, 9)`` string (``1`` -> ``"0.000000001"``,
    ``12_500_000_000`` -> ``"12.500000000"``); never scientific notation."""
    sign = "-" if nano < 0 else ""
    whole, fraction = divmod(abs(nano), NANO_PER_USD)
    return f"{sign}{whole}.{fraction:09d}"


def display_usd(nano: int | None, unlimited: str = "unlimited") -> str:
    """Integer nano-USD -> ``$12.50`` for people: exact, at least 2 decimals, no trailing zeros
    beyond them (``1`` -> ``$0.000000001``). ``None`` (no limit) -> ``unlimited``."""
    if nano is None:
        return unlimited
    text = format_usd(nano)
    whole, fraction = text.split(".")
    fraction = fraction.rstrip("0").ljust(2, "0")
    sign = "-" if whole.startswith("-") else ""
    return f"{sign}${int(whole.lstrip('-')):,}.{fraction}"


def control_record(
    org_id: str, command: Command, *, message_id: str, issued_at_ms: int
) -> dict[str, Any]:
    """The ``ControlMessage`` record for ``command`` (fields named as in the schema)."""
    return {
        "message_id": message_id,
        "org_id": org_id,
        "issued_at": issued_at_ms,
        "command": command,
    }


class ControlProducer:
    """Sends control messages to ``metering.control``, one at a time, confirmed.

    Build one per process; nothing touches Kafka until the first :meth:`send`, which first
    makes sure the pipeline's topics exist with ``METERING_PARTITIONS`` partitions (a control
    topic with another count would put commands on the wrong partition). :meth:`close`
    releases the producer. ``timeout`` bounds how long :meth:`send` waits for Kafka.
    """

    def __init__(
        self, settings: Settings, codecs: Codecs | None = None, *, timeout: float = 30.0
    ) -> None:
        from streams.codec import Codecs
        from streams.topics import CONTROL

        self.settings = settings
        self.codecs = codecs or Codecs.from_settings(settings)
        self.topic = settings.topic(CONTROL)
        self.timeout = timeout
        self._producer: Producer | None = None

    def _ready(self) -> Producer:
        if self._producer is None:
            from confluent_kafka import Producer

            from streams.kafka_config import quiet_client_config
            from streams.topics import ensure_topics

            ensure_topics(self.settings)
            self._producer = Producer(
                {
                    **quiet_client_config(self.settings),
                    # Same partition as the org's usage: murmur2 like the Java/Confluent clients.
                    "partitioner": "murmur2_random",
                    "enable.idempotence": True,
                    "acks": "all",
                    "linger.ms": 0,
                    # Give up (and report) rather than retry for librdkafka's default 5 minutes.
                    "message.timeout.ms": int(self.timeout * 1000),
                }
            )
        return self._producer

    def send(self, org_id: str, command: Command) -> str:
        """Encode and produce one command for ``org_id``; return its ``message_id``.

        Returns only after Kafka acknowledged the message. Raises ``ValueError`` for an empty
        ``org_id``, :class:`~streams.codec.EncodeError` for a command the schema cannot
        encode (naming the field), and :class:`ControlError` when the message was not
        delivered within the timeout (Kafka down, topic missing, not authorised).
        """
        if not org_id:
            raise ValueError("org_id must not be empty")
        producer = self._ready()
        message_id = uuid.uuid4().hex
        value = self.codecs.control.encode(
            control_record(
                org_id, command, message_id=message_id, issued_at_ms=int(time.time() * 1000)
            )
        )
        failures: list[str] = []
        delivered: list[bool] = []

        def on_delivery(error: KafkaError | None, _message: Message) -> None:
            if error is None:
                delivered.append(True)
            else:
                failures.append(error.str())

        producer.produce(self.topic, value, org_id.encode(), on_delivery=on_delivery)
        remaining = producer.flush(self.timeout + 5)
        if failures:
            raise ControlError(
                f"control message for {org_id} not delivered to {self.topic}: {failures[0]}"
            )
        if remaining or not delivered:
            raise ControlError(
                f"control message for {org_id} not acknowledged by Kafka within "
                f"{self.timeout:.0f}s (is Kafka running? see `metering kafka status`)"
            )
        return message_id

    def close(self) -> None:
        """Release the producer (anything unsent was already reported by :meth:`send`)."""
        if self._producer is not None:
            self._producer.flush(0)
            self._producer = None

    def __enter__(self) -> ControlProducer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
