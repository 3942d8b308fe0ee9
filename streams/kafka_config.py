"""Kafka connection settings for the asyncio clients (aiokafka and Faust) from Settings."""

from __future__ import annotations

import contextlib
import logging
import ssl
import time
from collections.abc import Iterator, Mapping
from typing import Any

from core.errors import MeteringError
from core.settings import Settings


def _ssl_context(settings: Settings) -> ssl.SSLContext | None:
    if settings.kafka_security_protocol not in ("SSL", "SASL_SSL"):
        return None
    cafile = str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None
    return ssl.create_default_context(cafile=cafile)


def aiokafka_config(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``AIOKafkaConsumer`` / ``AIOKafkaProducer``."""
    config: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap.split(","),
        "security_protocol": settings.kafka_security_protocol,
    }
    context = _ssl_context(settings)
    if context is not None:
        config["ssl_context"] = context
    if settings.kafka_sasl_mechanism:
        config["sasl_mechanism"] = settings.kafka_sasl_mechanism
        config["sasl_plain_username"] = settings.kafka_sasl_username
        if settings.kafka_sasl_password is not None:
            config["sasl_plain_password"] = settings.kafka_sasl_password.get_secret_value()
    return config


def faust_broker_config(settings: Settings) -> dict[str, Any]:
    """``faust.App`` keyword arguments for the broker and its credentials."""
    import faust

    config: dict[str, Any] = {
        "broker": [f"kafka://{server.strip()}" for server in settings.kafka_bootstrap.split(",")],
    }
    context = _ssl_context(settings)
    if settings.kafka_sasl_mechanism:
        password = (
            settings.kafka_sasl_password.get_secret_value()
            if settings.kafka_sasl_password is not None
            else ""
        )
        config["broker_credentials"] = faust.SASLCredentials(
            username=settings.kafka_sasl_username or "",
            password=password,
            mechanism=settings.kafka_sasl_mechanism,
            ssl_context=context,
        )
    elif context is not None:
        config["broker_credentials"] = faust.SSLCredentials(context)
    return config


_SILENT = logging.getLogger("metering.librdkafka.silent")
_SILENT.addHandler(logging.NullHandler())
_SILENT.propagate = False


_AUTH_FAILURES: list[str] = []


def _remember_auth_failure(error: Any) -> None:
    """librdkafka ``error_cb``: keep authentication failures for :func:`unreachable`."""
    from confluent_kafka import KafkaError

    if error.code() in (KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED):
        _AUTH_FAILURES[:] = [str(error.str())]  # the latest is the one to name


def quiet_client_config(settings: Settings) -> dict[str, Any]:
    """librdkafka settings for short-lived command-line clients (admin, offset probes).

    librdkafka logs every failed reconnect to stderr; the caller turns a failure into one
    clear line instead (:func:`unreachable`), so the client's own log is dropped, except
    authentication failures, which are remembered to name the cause.
    """
    return {
        **settings.kafka_client_config(),
        "logger": _SILENT,
        "error_cb": _remember_auth_failure,
    }


def unreachable(settings: Settings, detail: str, hint: str, client: Any = None) -> str:
    """One line for a Kafka request that failed: an authentication failure seen by a quiet
    client (``client`` is polled once so that librdkafka delivers its queued errors) is named
    as such, with the user and never the password; anything else gets ``hint``.
    """
    if client is not None:
        with contextlib.suppress(Exception):
            client.poll(0)
    if _AUTH_FAILURES:
        reason = _AUTH_FAILURES[-1]
        password = settings.kafka_sasl_password
        if password is not None and password.get_secret_value():
            reason = reason.replace(password.get_secret_value(), "***")
        return (
            f"Kafka at {settings.kafka_bootstrap} refused the credentials of user "
            f"{settings.kafka_sasl_username!r} ({reason}); check METERING_KAFKA_SASL_USERNAME, "
            "METERING_KAFKA_SASL_PASSWORD and METERING_KAFKA_SASL_MECHANISM"
        )
    return f"Kafka at {settings.kafka_bootstrap} did not answer ({detail}); {hint}"


class KafkaReadError(MeteringError):
    """Reading a range of a topic stalled or the broker refused it (one line)."""


def read_ranges(
    consumer: Any,
    topic: str,
    ranges: Mapping[int, tuple[int, int]],
    stall_seconds: float = 60.0,
) -> Iterator[Any]:
    """Every message of ``topic`` with an offset in ``[start, end)`` of its partition
    (``ranges``: partition -> (start, end)), as ``consumer`` delivers them in batches.

    The consumer must be created with ``enable.partition.eof``: a partition is done at ``end``
    or at the end of its log, whichever comes first (compaction may have removed the last
    offsets). Raises :class:`KafkaReadError` when nothing arrives for ``stall_seconds`` or the
    broker reports an error. The consumer is unassigned afterwards.
    """
    from confluent_kafka import KafkaError, TopicPartition

    remaining = {partition for partition, (start, end) in ranges.items() if end > start}
    if not remaining:
        return
    consumer.assign([TopicPartition(topic, p, ranges[p][0]) for p in sorted(remaining)])
    idle_since = time.monotonic()
    try:
        while remaining:
            batch = consumer.consume(num_messages=10_000, timeout=1.0)
            if not batch:
                if time.monotonic() - idle_since > stall_seconds:
                    raise KafkaReadError(
                        f"reading {topic} stalled for {stall_seconds:.0f} s with partitions "
                        f"{sorted(remaining)} unfinished; is Kafka up?"
                    )
                continue
            idle_since = time.monotonic()
            for message in batch:
                partition = message.partition()
                error = message.error()
                if error is not None:
                    if error.code() != KafkaError._PARTITION_EOF:
                        raise KafkaReadError(f"reading {topic}: {error.str()}")
                    remaining.discard(partition)
                    continue
                if partition not in remaining:
                    continue
                end = ranges[partition][1]
                offset = message.offset()
                if offset + 1 >= end:
                    remaining.discard(partition)
                if offset < end:
                    yield message
    finally:
        consumer.unassign()
