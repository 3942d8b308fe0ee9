"""Kafka connection settings for the asyncio clients (aiokafka and Faust) from Settings."""

from __future__ import annotations

import logging
import ssl
from typing import Any

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


def quiet_client_config(settings: Settings) -> dict[str, Any]:
    """librdkafka settings for short-lived command-line clients (admin, offset probes).

    librdkafka logs every failed reconnect to stderr; the caller turns a failure into one
    clear line instead, so the client's own log is dropped.
    """
    return {**settings.kafka_client_config(), "logger": _SILENT}
