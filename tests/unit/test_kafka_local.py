"""Fast tests of the local Kafka manager: no JVM, no Maven, no broker.

Java and Maven are replaced by small shell scripts found through ``search_path``; "running
brokers" are Python processes whose command line looks like ``kafka.Kafka <properties>``.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from core.errors import MeteringError
from jobs.kafka_local import (
    KAFKA_VERSION,
    POM_TEMPLATE,
    BrokerAddress,
    KafkaLocal,
    KafkaLocalError,
    default_cache_dir,
    free_port,
    meaningful_log_lines,
    new_cluster_id,
    parse_bootstrap,
    port_in_use,
    read_properties,
    render_server_properties,
)

FAKE_JAVA = """#!/bin/sh
case "$*" in
  *-version*) echo 'openjdk version "{version}" 2025-04-15' >&2; exit 0 ;;
  *kafka.tools.StorageTool*) echo "Formatting metadata directory"; exit 0 ;;
esac
echo "2026-01-01 00:00:00,000 [main] INFO kafka.Kafka$ - starting"
echo "2026-01-01 00:00:01,000 [main] ERROR kafka.Kafka$ - Exiting Kafka due to fatal exception"
echo "java.lang.RuntimeException: boom: the broker cannot start"
echo "	at kafka.Kafka.main(Kafka.scala:1)"
exit 1
"""

FAKE_MVN = """#!/bin/sh
echo run >> "{counter}"
for arg in "$@"; do
  case "$arg" in -DoutputDirectory=*) out="${{arg#-DoutputDirectory=}}" ;; esac
done
if [ -e "{fail_flag}" ]; then
  echo "[ERROR] Failed to execute goal: Could not resolve dependencies"
  exit 1
fi
mkdir -p "$out" && touch "$out/kafka_2.13-{version}.jar" "$out/slf4j-simple-1.7.36.jar"
"""


FakeBroker = Callable[..., subprocess.Popen[bytes]]


def _script(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _one_line(exc: pytest.ExceptionInfo[KafkaLocalError]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    assert isinstance(exc.value, MeteringError)
    return message


@pytest.fixture
def tools(tmp_path: Path) -> Path:
    """A directory holding a fake Java 17 and a fake Maven, to use as ``search_path``."""
    bin_dir = tmp_path / "bin"
    _script(bin_dir / "java", FAKE_JAVA.format(version="17.0.15"))
    _script(
        bin_dir / "mvn",
        FAKE_MVN.format(
            counter=tmp_path / "mvn-runs",
            fail_flag=tmp_path / "mvn-fails",
            version=KAFKA_VERSION,
        ),
    )
    return bin_dir


def _mvn_runs(tmp_path: Path) -> int:
    counter = tmp_path / "mvn-runs"
    return len(counter.read_text().splitlines()) if counter.exists() else 0


def _local(tmp_path: Path, tools: Path | None = None, **kwargs: object) -> KafkaLocal:
    defaults: dict[str, object] = {
        "data_dir": tmp_path / "data",
        "bootstrap": f"127.0.0.1:{free_port('127.0.0.1')}",
        "cache_dir": tmp_path / "cache",
        "search_path": str(tools) if tools is not None else str(tmp_path / "empty-bin"),
    }
    defaults.update(kwargs)
    return KafkaLocal(**defaults)  # type: ignore[arg-type]


@pytest.fixture
def fake_broker(tmp_path: Path) -> Iterator[FakeBroker]:
    """Spawn processes that look like our broker (``kafka.Kafka <properties>`` in argv)."""
    spawned: list[subprocess.Popen[bytes]] = []

    def spawn(local: KafkaLocal, *, ignore_sigterm: bool = False) -> subprocess.Popen[bytes]:
        ready = tmp_path / f"ready-{len(spawned)}"
        code = (
            "import signal, sys, time, pathlib\n"
            + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if ignore_sigterm else "")
            + f"pathlib.Path({str(ready)!r}).touch()\n"
            + "time.sleep(120)\n"
        )
        local.home.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(
            [sys.executable, "-c", code, "kafka.Kafka", str(local.properties_file)]
        )
        spawned.append(proc)
        deadline = time.monotonic() + 10
        while not ready.exists():
            assert time.monotonic() < deadline, "fake broker did not start"
            time.sleep(0.02)
        local.pid_file.write_text(f"{proc.pid}\n")
        return proc

    yield spawn
    for proc in spawned:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


# -- bootstrap parsing ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:9092", "127.0.0.1", 9092),
        (" localhost:19092 ", "localhost", 19092),
        ("[::1]:9095", "::1", 9095),
        ("127.0.0.1", "127.0.0.1", 9092),
        ("PLAINTEXT://127.0.0.1:9093", "127.0.0.1", 9093),
    ],
)
def test_parse_bootstrap_accepts_one_local_address(text: str, host: str, port: int) -> None:
    assert parse_bootstrap(text) == BrokerAddress(host, port)


@pytest.mark.parametrize(
    "text",
    ["", "a:9092,b:9092", "0.0.0.0:9092", "[::]:9092", "host:abc", "host:0", "host:70000", ":9092"],
)
def test_parse_bootstrap_rejects_with_the_env_var_named(text: str) -> None:
    with pytest.raises(KafkaLocalError) as exc:
        parse_bootstrap(text)
    assert "METERING_KAFKA_BOOTSTRAP" in _one_line(exc)


def test_ipv6_addresses_are_bracketed() -> None:
    assert str(BrokerAddress("::1", 9092)) == "[::1]:9092"
    assert str(BrokerAddress("127.0.0.1", 9092)) == "127.0.0.1:9092"


# -- server.properties ----------------------------------------------------------------------


def test_server_properties_are_a_single_node_kraft_config(tmp_path: Path) -> None:
    text = render_server_properties(BrokerAddress("127.0.0.1", 19092), 19093, tmp_path / "logs")
    path = tmp_path / "server.properties"
    path.write_text(text)
    props = read_properties(path)

    assert props["process.roles"] == "broker,controller"
    assert props["controller.quorum.voters"] == f"{props['node.id']}@127.0.0.1:19093"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:19092"
    assert props["controller.listener.names"] == "CONTROLLER"
    assert props["inter.broker.listener.name"] == "PLAINTEXT"
    assert Path(props["log.dirs"]).is_absolute()
    assert Path(props["log.dirs"]) == (tmp_path / "logs").resolve()
    # One node cannot host three replicas: every internal topic must say 1.
    for key in (
        "offsets.topic.replication.factor",
        "transaction.state.log.replication.factor",
        "transaction.state.log.min.isr",
        "share.coordinator.state.topic.replication.factor",
        "share.coordinator.state.topic.min.isr",
    ):
        assert props[key] == "1", key
    # 4.1.1+ refuses mixing a static voter set with bootstrap servers.
    assert "controller.quorum.bootstrap.servers" not in props


def test_server_properties_bracket_ipv6(tmp_path: Path) -> None:
    text = render_server_properties(BrokerAddress("::1", 9092), 9093, tmp_path)
    assert "listeners=PLAINTEXT://[::1]:9092,CONTROLLER://[::1]:9093" in text
    assert "controller.quorum.voters=1@[::1]:9093" in text


# -- the manager's configuration ------------------------------------------------------------


def test_paths_live_under_data_dir_kafka(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    local = KafkaLocal(data_dir=Path(".data"), cache_dir=tmp_path / "cache")
    assert local.data_dir == (tmp_path / ".data").resolve()
    assert local.home == local.data_dir / "kafka"
    for path in (local.log_dirs, local.log_file, local.pid_file, local.properties_file):
        assert local.home in path.parents
    assert local.address == BrokerAddress("127.0.0.1", 9092)


@pytest.mark.parametrize("heap", ["", "512mb", "-1g", "lots"])
def test_bad_heap_is_refused(tmp_path: Path, heap: str) -> None:
    with pytest.raises(KafkaLocalError) as exc:
        KafkaLocal(data_dir=tmp_path, heap=heap)
    assert "heap" in _one_line(exc)


def test_bad_bootstrap_is_refused_at_construction(tmp_path: Path) -> None:
    with pytest.raises(KafkaLocalError) as exc:
        KafkaLocal(data_dir=tmp_path, bootstrap="0.0.0.0:9092")
    assert "METERING_KAFKA_BOOTSTRAP" in _one_line(exc)


def test_default_cache_dir_is_home_based_and_versioned() -> None:
    path = default_cache_dir()
    assert path == Path.home() / ".cache" / "metering" / f"kafka-{KAFKA_VERSION}"


def test_cluster_ids_look_like_kafka_uuids() -> None:
    ids = {new_cluster_id() for _ in range(200)}
    assert len(ids) == 200
    for cluster_id in ids:
        assert len(cluster_id) == 22
        assert not cluster_id.startswith("-")
        assert set(cluster_id) <= set(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        )


def test_pom_pins_the_module_kafka_version_and_one_slf4j_binding() -> None:
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    root = ET.parse(POM_TEMPLATE).getroot()
    assert root.findtext("m:properties/m:kafka.version", namespaces=ns) == KAFKA_VERSION
    artifacts = [
        d.findtext("m:artifactId", namespaces=ns) for d in root.iterfind(".//m:dependency", ns)
    ]
    assert "kafka_2.13" in artifacts
    bindings = [
        a
        for a in artifacts
        if a and ("slf4j-simple" in a or "slf4j-impl" in a or "slf4j2-impl" in a)
    ]
    assert len(bindings) == 1


def test_meaningful_log_lines_quote_errors_not_stack_frames() -> None:
    log = "\n".join(
        [
            "2026-01-01 00:00:00,000 [main] INFO kafka.Kafka$ - hello",
            "2026-01-01 00:00:01,000 [main] ERROR kafka.Kafka$ - Exiting Kafka",
            "java.lang.RuntimeException: boom",
            "\tat kafka.Kafka.main(Kafka.scala:1)",
            "",
        ]
    )
    assert meaningful_log_lines(log) == [
        "ERROR kafka.Kafka$ - Exiting Kafka",
        "java.lang.RuntimeException: boom",
    ]
    assert meaningful_log_lines("just\nsome\nlines\nhere") == ["some", "lines", "here"]


# -- ports ----------------------------------------------------------------------------------


def test_port_in_use_sees_a_listener() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        address = BrokerAddress("127.0.0.1", sock.getsockname()[1])
        assert port_in_use(address)
    assert not port_in_use(address)


def test_port_in_use_refuses_a_foreign_address() -> None:
    with pytest.raises(KafkaLocalError) as exc:
        port_in_use(BrokerAddress("192.0.2.1", 9092))  # TEST-NET-1: never local
    assert "METERING_KAFKA_BOOTSTRAP" in _one_line(exc)


def test_start_refuses_a_taken_port_naming_it_and_the_env_var(tmp_path: Path, tools: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        local = _local(tmp_path, tools, bootstrap=f"127.0.0.1:{port}")
        with pytest.raises(KafkaLocalError) as exc:
            local.start(timeout=5)
    message = _one_line(exc)
    assert str(port) in message
    assert "METERING_KAFKA_BOOTSTRAP" in message
    assert _mvn_runs(tmp_path) == 0  # refused before any jar fetch
    assert not local.pid_file.exists()


# -- tools ----------------------------------------------------------------------------------


def test_missing_java_names_what_to_install(tmp_path: Path) -> None:
    local = _local(tmp_path)  # search_path is an empty directory
    with pytest.raises(KafkaLocalError) as exc:
        local.start(timeout=5)
    message = _one_line(exc)
    assert "java not found" in message
    assert "Java 17" in message


def test_java_path_that_does_not_exist(tmp_path: Path) -> None:
    local = _local(tmp_path, java=str(tmp_path / "no" / "java"))
    with pytest.raises(KafkaLocalError) as exc:
        local.start(timeout=5)
    assert "not found" in _one_line(exc)


@pytest.mark.parametrize(("version", "shown"), [("11.0.22", "Java 11"), ("1.8.0_392", "Java 8")])
def test_old_java_is_refused(tmp_path: Path, version: str, shown: str) -> None:
    bin_dir = tmp_path / "old-bin"
    _script(bin_dir / "java", FAKE_JAVA.format(version=version))
    local = _local(tmp_path, bin_dir)
    with pytest.raises(KafkaLocalError) as exc:
        local.start(timeout=5)
    message = _one_line(exc)
    assert shown in message
    assert "17" in message


def test_missing_maven_names_what_to_install(tmp_path: Path, tools: Path) -> None:
    (tools / "mvn").unlink()
    local = _local(tmp_path, tools)
    with pytest.raises(KafkaLocalError) as exc:
        local.start(timeout=5)
    message = _one_line(exc)
    assert "mvn not found" in message
    assert "Maven" in message


# -- the jar cache --------------------------------------------------------------------------


def test_jars_are_fetched_once(tmp_path: Path, tools: Path) -> None:
    messages: list[str] = []
    local = _local(tmp_path, tools, progress=messages.append)
    lib = local.ensure_jars()
    assert lib == local.lib_dir
    assert sorted(p.name for p in lib.glob("*.jar")) == [
        f"kafka_2.13-{KAFKA_VERSION}.jar",
        "slf4j-simple-1.7.36.jar",
    ]
    assert (local.cache_dir / "pom.xml").read_bytes() == POM_TEMPLATE.read_bytes()
    assert any("fetching" in m for m in messages)
    assert local.jars_ready()

    assert local.ensure_jars() == lib
    assert _local(tmp_path, tools).ensure_jars() == lib
    assert _mvn_runs(tmp_path) == 1


def test_failed_fetch_is_reported_and_retried(tmp_path: Path, tools: Path) -> None:
    (tmp_path / "mvn-fails").touch()
    local = _local(tmp_path, tools)
    with pytest.raises(KafkaLocalError) as exc:
        local.ensure_jars()
    message = _one_line(exc)
    assert "Could not resolve dependencies" in message
    assert "Maven Central" in message
    assert not local.jars_ready()

    (tmp_path / "mvn-fails").unlink()
    assert list(local.ensure_jars().glob("*.jar"))
    assert _mvn_runs(tmp_path) == 2


def test_a_half_finished_cache_is_fetched_again(tmp_path: Path, tools: Path) -> None:
    local = _local(tmp_path, tools)
    local.lib_dir.mkdir(parents=True)
    (local.lib_dir / "partial.jar").touch()  # no completion marker: an interrupted fetch
    assert not local.jars_ready()
    local.ensure_jars()
    assert _mvn_runs(tmp_path) == 1
    assert not (local.lib_dir / "partial.jar").exists()


# -- start / stop / status without a JVM ----------------------------------------------------


def test_a_broker_that_exits_early_is_reported_with_its_log(tmp_path: Path, tools: Path) -> None:
    local = _local(tmp_path, tools)
    with pytest.raises(KafkaLocalError) as exc:
        local.start(timeout=30)
    message = _one_line(exc)
    assert "exited during start-up" in message
    assert "exit 1" in message
    assert "boom: the broker cannot start" in message
    assert "at kafka.Kafka.main" not in message
    assert str(local.log_file) in message
    assert not local.pid_file.exists()
    status = local.status()
    assert not status.running
    assert not status.answering
    # The generated config and cluster id stay for the next attempt.
    assert read_properties(local.properties_file)["advertised.listeners"].endswith(local.bootstrap)
    assert local.cluster_id_file.read_text().strip()


def test_stop_is_harmless_when_nothing_runs(tmp_path: Path) -> None:
    local = _local(tmp_path)
    result = local.stop()
    assert not result.was_running
    assert result.pid is None
    status = local.status()
    assert (status.running, status.answering, status.pid) == (False, False, None)
    assert status.bootstrap == local.bootstrap
    assert status.data_dir == local.data_dir
    assert not local.home.exists()  # stop and status leave no trace in a fresh data dir


def test_a_stale_pid_file_is_not_a_running_broker(tmp_path: Path) -> None:
    local = _local(tmp_path)
    local.home.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    local.pid_file.write_text(f"{dead.pid}\n")
    assert not local.status().running
    assert not local.stop().was_running
    assert not local.pid_file.exists()


def test_a_reused_pid_of_another_program_is_never_signalled(tmp_path: Path) -> None:
    local = _local(tmp_path)
    local.home.mkdir(parents=True)
    local.pid_file.write_text(f"{os.getpid()}\n")  # this pytest process: alive, not Kafka
    assert not local.status().running
    assert not local.stop().was_running  # and we are still here to assert it


def test_stop_terminates_our_broker(tmp_path: Path, fake_broker: FakeBroker) -> None:
    local = _local(tmp_path)
    proc = fake_broker(local)
    status = local.status(probe_timeout=0.5)
    assert status.running
    assert status.pid == proc.pid
    assert not status.answering  # nothing listens: running but not answering

    result = local.stop(timeout=10)
    assert (result.was_running, result.pid, result.forced) == (True, proc.pid, False)
    assert proc.wait(timeout=5) == -signal.SIGTERM
    assert not local.pid_file.exists()
    assert not local.status().running


def test_stop_escalates_to_sigkill(tmp_path: Path, fake_broker: FakeBroker) -> None:
    local = _local(tmp_path)
    proc = fake_broker(local, ignore_sigterm=True)
    result = local.stop(timeout=0.5)
    assert result.was_running
    assert result.forced
    assert proc.wait(timeout=5) == -signal.SIGKILL
    assert not local.pid_file.exists()


def test_start_refuses_to_move_a_running_broker(tmp_path: Path, fake_broker: FakeBroker) -> None:
    running = _local(tmp_path)
    running.home.mkdir(parents=True)
    running.properties_file.write_text(
        render_server_properties(running.address, running.address.port + 1, running.log_dirs)
    )
    fake_broker(running)
    other_port = free_port("127.0.0.1")
    moved = _local(tmp_path, bootstrap=f"127.0.0.1:{other_port}")
    with pytest.raises(KafkaLocalError) as exc:
        moved.start(timeout=5)
    message = _one_line(exc)
    assert running.bootstrap in message
    assert "metering kafka stop" in message
    assert "METERING_KAFKA_BOOTSTRAP" in message
    # status reports where the running broker actually listens
    assert moved.status(probe_timeout=0.2).bootstrap == running.bootstrap
