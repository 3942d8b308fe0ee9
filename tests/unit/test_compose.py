"""docker-compose.yml is valid and wires the worker to the kafka and clickhouse services.

When the Docker Compose CLI is available, ``docker compose config -q`` validates the file
against the Compose specification. Either way the file is also read as YAML and checked for
what would break at run time without any error from Compose itself: a wildcard advertised
listener, a worker pointed at the wrong host, a missing replication-factor override, an
environment variable the settings object does not know (it would be silently ignored).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
_VARIABLE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def _interpolate(value: object) -> str:
    """Apply Compose's ``${NAME:-default}`` with an empty environment (defaults win)."""
    return _VARIABLE.sub(lambda m: m.group(2) or "", str(value))


def _compose_cli() -> bool:
    if shutil.which("docker") is None:
        return False
    probe = subprocess.run(
        ["docker", "compose", "version"], capture_output=True, text=True, check=False
    )
    return probe.returncode == 0


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: _interpolate(value) for key, value in env.items()}


def _listeners(text: str) -> dict[str, tuple[str, int]]:
    """``NAME://host:port,...`` -> {NAME: (host, port)}."""
    result = {}
    for item in text.split(","):
        name, _, hostport = item.strip().partition("://")
        host, _, port = hostport.rpartition(":")
        result[name] = (host, int(port))
    return result


def _published(service: dict[str, Any]) -> list[tuple[str, int, int]]:
    """Short-syntax port mappings as (host ip, host port, container port)."""
    mappings = []
    for entry in service.get("ports", []):
        parts = _interpolate(entry).split(":")
        assert len(parts) == 3, f"publish on an explicit host address: {entry!r}"
        mappings.append((parts[0], int(parts[1]), int(parts[2])))
    return mappings


@pytest.mark.skipif(not _compose_cli(), reason="docker compose CLI not available")
def test_docker_compose_accepts_the_file() -> None:
    result = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr


def test_the_three_services(services: dict[str, Any]) -> None:
    assert set(services) == {"kafka", "clickhouse", "worker"}
    assert services["kafka"]["image"] == "apache/kafka:4.1.1"
    assert services["clickhouse"]["image"].startswith("clickhouse/clickhouse-server:")
    assert ":latest" not in services["clickhouse"]["image"]


def test_kafka_is_a_single_node_kraft_broker(services: dict[str, Any]) -> None:
    env = _env(services["kafka"])
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["CLUSTER_ID"]
    node_id = env["KAFKA_NODE_ID"]
    listeners = _listeners(env["KAFKA_LISTENERS"])
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{node_id}@kafka:{listeners[controller][1]}"
    for key in (
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR",
        "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR",
        "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_MIN_ISR",
    ):
        assert env[key] == "1", key
    protocols = dict(
        item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
    )
    assert set(listeners) <= set(protocols)


def test_kafka_advertises_reachable_addresses_only(services: dict[str, Any]) -> None:
    env = _env(services["kafka"])
    listeners = _listeners(env["KAFKA_LISTENERS"])
    advertised = _listeners(env["KAFKA_ADVERTISED_LISTENERS"])
    for name, (host, _port) in advertised.items():
        assert host not in ("", "0.0.0.0", "::", "[::]"), f"{name} advertises a wildcard"
        assert name in listeners, f"{name} is advertised but not listened on"
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] not in advertised
    # Containers on the compose network reach the broker as kafka:9092.
    assert ("kafka", 9092) in advertised.values()
    # The published port leads to a listener advertised with the address the host dials.
    for host_ip, host_port, container_port in _published(services["kafka"]):
        (name,) = [n for n, (_, port) in listeners.items() if port == container_port]
        assert advertised[name] == (host_ip, host_port)
        assert host_ip == "127.0.0.1"


def test_worker_points_at_the_services(services: dict[str, Any]) -> None:
    worker = services["worker"]
    env = _env(worker)
    kafka_advertised = _listeners(_env(services["kafka"])["KAFKA_ADVERTISED_LISTENERS"])

    host, _, port = env["METERING_KAFKA_BOOTSTRAP"].rpartition(":")
    assert host == "kafka"
    assert (host, int(port)) in kafka_advertised.values()

    dsn = urlsplit(env["METERING_CLICKHOUSE_DSN"])
    assert dsn.scheme == "http"
    assert dsn.hostname == "clickhouse"
    assert dsn.port == 8123
    assert dsn.username is None and dsn.password is None  # credentials travel separately

    clickhouse = _env(services["clickhouse"])
    assert env["METERING_CLICKHOUSE_USER"] == clickhouse["CLICKHOUSE_USER"]
    assert env["METERING_CLICKHOUSE_PASSWORD"] == clickhouse["CLICKHOUSE_PASSWORD"]
    raw = worker["environment"]
    assert "${METERING_CLICKHOUSE_PASSWORD" in raw["METERING_CLICKHOUSE_PASSWORD"]

    command = worker["command"]
    command = " ".join(command) if isinstance(command, list) else command
    assert command == "metering worker"


def test_worker_environment_names_are_settings(services: dict[str, Any]) -> None:
    known = {f"METERING_{name.upper()}" for name in Settings.model_fields}
    unknown = {key for key in _env(services["worker"]) if key not in known}
    assert not unknown, f"not read by core.settings (typo?): {sorted(unknown)}"


def test_every_service_has_a_healthcheck(services: dict[str, Any]) -> None:
    for name, service in services.items():
        check = service.get("healthcheck")
        assert check and check.get("test"), f"{name} has no healthcheck"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name


def test_worker_waits_for_healthy_dependencies(services: dict[str, Any]) -> None:
    depends = services["worker"]["depends_on"]
    assert depends == {
        "kafka": {"condition": "service_healthy"},
        "clickhouse": {"condition": "service_healthy"},
    }


def test_published_ports_stay_on_loopback(services: dict[str, Any]) -> None:
    published = {name: _published(service) for name, service in services.items()}
    assert [m[2] for m in published["clickhouse"]] == [8123]
    for name, mappings in published.items():
        for host_ip, _, _ in mappings:
            assert host_ip == "127.0.0.1", name


def test_worker_image_recipe() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, re.MULTILINE)
    assert "-c constraints.txt" in dockerfile
    assert re.search(r"pip install .*-e \.", dockerfile)
    assert 'CMD ["metering", "worker"]' in dockerfile
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".data", ".git"} <= set(ignored)
