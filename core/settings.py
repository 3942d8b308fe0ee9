"""The one settings object of a process (SPEC §8).

Only this module reads the environment. Every variable is ``METERING_<NAME>``; secrets are
``SecretStr`` so they never print. ``load_settings`` validates everything at once and raises
:class:`core.errors.ConfigError` with one line per problem, so a mistyped deployment fails at
start with all its mistakes listed rather than one at a time.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.errors import ConfigError

_DURATION = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(text: str) -> float:
    """``"90s"``, ``"15m"``, ``"1h"``, ``"2d"``, ``"500ms"`` or bare seconds -> seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30s, 15m, 1h, 2d)")
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


class Settings(BaseSettings):
    """Frozen configuration; field ``x`` is read from ``METERING_X``."""

    model_config = SettingsConfigDict(env_prefix="METERING_", frozen=True, extra="ignore")

    kafka_bootstrap: str = "127.0.0.1:9092"
    clickhouse_dsn: str | None = None
    data_dir: Path = Path(".data")
    app_id: str = "metering"
    topic_prefix: str = ""
    partitions: int = Field(default=8, ge=1, le=10_000)
    replication_factor: int = Field(default=1, ge=1, le=10)
    """Replicas of every topic the pipeline creates, changelogs included (3 in production)."""
    schema_registry_url: str | None = None
    period_timer: Literal["on", "off"] = "on"
    period_grace: str = "1h"
    web_port: int = Field(default=6066, ge=0, le=65535)
    web_bind: str = "127.0.0.1"

    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: str | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None

    clickhouse_user: str | None = None
    clickhouse_password: SecretStr | None = None

    price_table: Path | None = None
    """The price table file [data/price_table.toml in the repository]."""
    worker_sink: bool = True
    """Whether ``metering worker`` runs the ClickHouse sink in-process (``--no-sink``)."""

    kafka_cache: Path | None = None
    """Where ``metering kafka start`` caches the Kafka jars [~/.cache/metering/kafka-4.1.1]."""

    @field_validator("app_id")
    @classmethod
    def _app_id(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", value):
            raise ValueError("use letters, digits, '.', '_' or '-'")
        return value

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if value and not re.fullmatch(r"[A-Za-z0-9._-]+", value):
            raise ValueError("use letters, digits, '.', '_' or '-'")
        return value

    @field_validator("period_grace")
    @classmethod
    def _grace(cls, value: str) -> str:
        parse_duration(value)
        return value

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap(cls, value: str) -> str:
        for server in value.split(","):
            host, _, port = server.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"expected host:port[,host:port...], got {value!r}")
        return value

    # -- derived values -------------------------------------------------------------------

    @property
    def data_path(self) -> Path:
        """The data dir as an absolute path."""
        return self.data_dir.expanduser().resolve()

    @property
    def chdb_path(self) -> Path:
        """Where the embedded ClickHouse store lives when no DSN is set."""
        return self.data_path / "clickhouse"

    @property
    def effective_clickhouse_dsn(self) -> str:
        """``METERING_CLICKHOUSE_DSN`` or the embedded chDB store under the data dir."""
        return self.clickhouse_dsn or f"chdb://{self.chdb_path}"

    @property
    def embedded_store(self) -> bool:
        """True when ClickHouse is the in-process chDB engine (one owner process at a time)."""
        return self.effective_clickhouse_dsn.startswith("chdb:")

    @property
    def period_grace_seconds(self) -> float:
        return parse_duration(self.period_grace)

    @property
    def sink_group(self) -> str:
        """The ClickHouse sink's consumer group (SPEC §8)."""
        return f"{self.app_id}.sink"

    def topic(self, name: str) -> str:
        """The deployed name of a logical topic (``usage.events`` -> prefix + name)."""
        return f"{self.topic_prefix}{name}"

    def kafka_client_config(self) -> dict[str, str]:
        """librdkafka-style connection settings (confluent-kafka clients)."""
        config = {
            "bootstrap.servers": self.kafka_bootstrap,
            "security.protocol": self.kafka_security_protocol,
        }
        if self.kafka_sasl_mechanism:
            config["sasl.mechanism"] = self.kafka_sasl_mechanism
        if self.kafka_sasl_username:
            config["sasl.username"] = self.kafka_sasl_username
        if self.kafka_sasl_password:
            config["sasl.password"] = self.kafka_sasl_password.get_secret_value()
        if self.kafka_ssl_cafile:
            config["ssl.ca.location"] = str(self.kafka_ssl_cafile)
        return config


def load_settings(**overrides: object) -> Settings:
    """Read the environment (plus explicit overrides) once, reporting every problem together."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = "METERING_" + "_".join(str(part) for part in error["loc"]).upper()
            problems.append(f"{name}: {error['msg']}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
