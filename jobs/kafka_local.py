"""A local single-node Apache Kafka broker (KRaft) for development: ``metering kafka ...``.

The broker is the real Apache Kafka, run from its Maven Central artifacts rather than a tarball
or a container: :meth:`KafkaLocal.ensure_jars` flattens ``org.apache.kafka:kafka_2.13`` and one
SLF4J binding (``jobs/kafka/pom.xml``) into a jar cache once, and :meth:`KafkaLocal.start` runs
``kafka.Kafka`` from that classpath as a detached process.

Everything the broker writes lives under ``<data_dir>/kafka/``::

    server.properties   generated at every start (edits are overwritten)
    cluster.id          the KRaft cluster id, chosen once
    broker.pid          pid of the running broker; absent when stopped
    data/               log.dirs (topic data and the KRaft metadata log)
    logs/broker.log     the broker's stdout and stderr

Contracts:

* :meth:`~KafkaLocal.start` returns only once the broker answers a metadata request from a real
  client, and is idempotent: a broker this data dir started that is still running is reported as
  already running, not started twice.
* :meth:`~KafkaLocal.stop` asks for a controlled shutdown (SIGTERM), escalates to SIGKILL after
  its timeout, and is harmless when nothing runs.
* Every expected failure (java or mvn missing, port taken, broker died on start, Maven could not
  fetch) raises :class:`KafkaLocalError` whose message is one line naming the fix.

This module reads no environment variables: the caller (the CLI, from ``core.settings``) passes
the bootstrap address, data dir and jar cache in. Creating topics is not its job.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import MeteringError

if TYPE_CHECKING:
    from confluent_kafka.admin import AdminClient

__all__ = [
    "BOOTSTRAP_ENV_VAR",
    "DEFAULT_PORT",
    "KAFKA_VERSION",
    "MIN_JAVA_MAJOR",
    "POM_TEMPLATE",
    "BrokerAddress",
    "KafkaLocal",
    "KafkaLocalError",
    "StartResult",
    "Status",
    "StopResult",
    "default_cache_dir",
    "free_port",
    "meaningful_log_lines",
    "new_cluster_id",
    "parse_bootstrap",
    "port_in_use",
    "read_properties",
    "render_server_properties",
]

log = logging.getLogger(__name__)

KAFKA_VERSION = "4.1.1"
"""The Apache Kafka release run locally; equals ``<kafka.version>`` in ``jobs/kafka/pom.xml``."""

MIN_JAVA_MAJOR = 17
"""Kafka 4.x brokers need Java 17 or newer."""

BOOTSTRAP_ENV_VAR = "METERING_KAFKA_BOOTSTRAP"
"""Named in error messages so the operator knows which knob moves the broker."""

DEFAULT_PORT = 9092

POM_TEMPLATE = Path(__file__).resolve().parent / "kafka" / "pom.xml"

_MARKER = "lib.complete"
_JAVA_INSTALL = f"a Java {MIN_JAVA_MAJOR}+ runtime (e.g. `apt-get install openjdk-17-jre-headless`)"
_MAX_LOG_BYTES = 50 * 1024 * 1024
_HEAP = re.compile(r"^[1-9][0-9]*[kKmMgG]?$")
_JAVA_VERSION = re.compile(r'version "(\d+)(?:\.(\d+))?')
_LOG_PREFIX = re.compile(r"^\d{4}-\d\d-\d\d[ T][0-9:,.]+\s+(\[[^\]]*\]\s+)?")
_MEANINGFUL = re.compile(r"\b(ERROR|FATAL)\b|Exception\b|Error\b|Caused by")

# Brokers this Python process spawned, kept so they can be reaped (no zombies, no
# "subprocess still running" warnings) when the same process later stops them.
_SPAWNED: dict[int, subprocess.Popen[bytes]] = {}

ProgressCallback = Callable[[str], None]


class KafkaLocalError(MeteringError):
    """The local broker could not be fetched, started, probed or stopped; the message is one
    line that names the cause and the fix."""


# -- pure helpers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerAddress:
    """One ``host:port`` the local broker listens on and advertises."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_bootstrap(text: str) -> BrokerAddress:
    """Parse a single ``host:port`` (``[v6]:port`` for IPv6; a missing port means 9092).

    A local broker has exactly one address, so a comma-separated list is refused, and so is a
    wildcard host (``0.0.0.0``, ``::``), which clients cannot connect to when advertised.
    Raises :class:`KafkaLocalError` naming ``METERING_KAFKA_BOOTSTRAP``.
    """
    raw = text.strip()
    for scheme in ("PLAINTEXT://", "plaintext://"):
        raw = raw.removeprefix(scheme)
    hint = f"set {BOOTSTRAP_ENV_VAR} to one host:port such as 127.0.0.1:9092"
    if not raw or "," in raw:
        raise KafkaLocalError(
            f"local Kafka needs exactly one bootstrap address, got {text!r}; {hint}"
        )
    if raw.startswith("["):
        host, sep, rest = raw[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise KafkaLocalError(f"bad bootstrap address {text!r}; {hint}")
        port_text = rest[1:] if rest else ""
    elif raw.count(":") > 1:
        raise KafkaLocalError(f"bad bootstrap address {text!r} (bracket IPv6 hosts); {hint}")
    else:
        host, _, port_text = raw.partition(":")
    if not host:
        raise KafkaLocalError(f"bad bootstrap address {text!r}: no host; {hint}")
    if host in ("0.0.0.0", "::"):
        raise KafkaLocalError(
            f"bootstrap host {host} is a wildcard that clients cannot connect to; {hint}"
        )
    if port_text == "":
        port = DEFAULT_PORT
    elif port_text.isdigit() and 1 <= int(port_text) <= 65535:
        port = int(port_text)
    else:
        raise KafkaLocalError(f"bad port in bootstrap address {text!r}; {hint}")
    return BrokerAddress(host, port)


def render_server_properties(
    broker: BrokerAddress,
    controller_port: int,
    log_dirs: Path,
    *,
    node_id: int = 1,
    sasl_users: Mapping[str, str] | None = None,
) -> str:
    """The single-node KRaft ``server.properties`` (combined broker + controller).

    The replication-factor and min-ISR lines are mandatory on one node: Kafka's defaults (3)
    would leave the consumer-offsets and transaction topics uncreatable. The controller uses a
    static voter set (``controller.quorum.voters``), so formatting needs no ``--standalone``.

    With ``sasl_users`` (user -> password) the client listener is ``SASL_PLAINTEXT`` with the
    PLAIN mechanism and exactly those users; the first one is the broker's own identity. It is
    for tests of authentication failures (PLAIN over plaintext is not for production).
    """
    controller = BrokerAddress(broker.host, controller_port)
    protocol = "SASL_PLAINTEXT" if sasl_users else "PLAINTEXT"
    lines = [
        "# Generated by `metering kafka start` at every start; edits are overwritten.",
        "process.roles=broker,controller",
        f"node.id={node_id}",
        f"controller.quorum.voters={node_id}@{controller}",
        f"listeners={protocol}://{broker},CONTROLLER://{controller}",
        f"advertised.listeners={protocol}://{broker}",
        f"inter.broker.listener.name={protocol}",
        "controller.listener.names=CONTROLLER",
        f"listener.security.protocol.map=CONTROLLER:PLAINTEXT,{protocol}:{protocol}",
        f"log.dirs={log_dirs.resolve()}",
        "offsets.topic.replication.factor=1",
        "offsets.topic.num.partitions=1",
        "transaction.state.log.replication.factor=1",
        "transaction.state.log.min.isr=1",
        "share.coordinator.state.topic.replication.factor=1",
        "share.coordinator.state.topic.min.isr=1",
        "group.initial.rebalance.delay.ms=0",
        # Topics are created by the pipeline with their partition count and retention; a
        # producer that runs first must fail rather than make a 1-partition usage topic.
        "auto.create.topics.enable=false",
    ]
    if sasl_users:
        broker_user, broker_password = next(iter(sasl_users.items()))
        users = " ".join(f'user_{name}="{secret}"' for name, secret in sasl_users.items())
        lines += [
            "sasl.enabled.mechanisms=PLAIN",
            "sasl.mechanism.inter.broker.protocol=PLAIN",
            "listener.name.sasl_plaintext.plain.sasl.jaas.config="
            "org.apache.kafka.common.security.plain.PlainLoginModule required "
            f'username="{broker_user}" password="{broker_password}" {users};',
        ]
    return "\n".join(lines) + "\n"


def read_properties(path: Path) -> dict[str, str]:
    """Minimal Java-properties reader for the files this module writes (``key=value`` lines)."""
    values: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "!")):
            continue
        key, _, value = stripped.partition("=")
        values[key.strip()] = value.strip()
    return values


def port_in_use(address: BrokerAddress) -> bool:
    """True when a listening socket on ``address`` would fail to bind (someone holds the port).

    Binds with ``SO_REUSEADDR`` like the JVM does, so connections lingering in TIME_WAIT after
    a stop do not count as "in use". Raises :class:`KafkaLocalError` when the host is not a
    local address at all.
    """
    try:
        infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise KafkaLocalError(
            f"cannot resolve bootstrap host {address.host!r} ({exc.strerror}); "
            f"set {BOOTSTRAP_ENV_VAR} to a local address such as 127.0.0.1:{address.port}"
        ) from exc
    family, socktype, proto, _, sockaddr = infos[0]
    with socket.socket(family, socktype, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(sockaddr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            if exc.errno == errno.EADDRNOTAVAIL:
                raise KafkaLocalError(
                    f"{address.host} is not an address of this machine, so a local broker "
                    f"cannot listen on it; set {BOOTSTRAP_ENV_VAR} to e.g. 127.0.0.1:{address.port}"
                ) from exc
            raise KafkaLocalError(f"cannot bind {address}: {exc.strerror}") from exc
    return False


def free_port(host: str) -> int:
    """An ephemeral port the OS reports free on ``host`` right now (racy by nature)."""
    family = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0][0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def new_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, URL-safe base64 without padding.

    Same shape as ``kafka.tools.StorageTool random-uuid`` (Kafka's ``Uuid.randomUuid``), which
    also never returns an id starting with ``-``; generated here to save a JVM start.
    """
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode("ascii").rstrip("=")
        if not text.startswith("-"):
            return text


def meaningful_log_lines(text: str, limit: int = 3) -> list[str]:
    """The last ``limit`` lines of a broker log that explain a failure (errors, exceptions),
    falling back to the last non-empty lines; stack frames and timestamps are dropped."""
    lines = [
        _LOG_PREFIX.sub("", line.strip())
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("at ")
    ]
    picked = [line for line in lines if _MEANINGFUL.search(line)] or lines
    unique: list[str] = []
    for line in picked:
        if line not in unique:
            unique.append(line)
    return [line[:300] for line in unique[-limit:]]


def default_cache_dir() -> Path:
    """``~/.cache/metering/kafka-<version>``: where the broker's jars are kept by default.

    Reads no environment; the caller applies ``METERING_KAFKA_CACHE`` when it is set.
    """
    return Path.home() / ".cache" / "metering" / f"kafka-{KAFKA_VERSION}"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock so two commands on one data dir / cache do not interleave."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# -- process helpers ------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (reaping it if it is our child)."""
    proc = _SPAWNED.get(pid)
    if proc is not None:
        if proc.poll() is None:
            return True
        _SPAWNED.pop(pid, None)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def _command_line(pid: int) -> list[str]:
    """The argv of ``pid`` (``/proc`` on Linux; elsewhere ``ps``, as one string); empty when
    unknown."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        return [part.decode(errors="replace") for part in raw.split(b"\0") if part]
    except FileNotFoundError:
        if Path("/proc/self").exists():
            return []
    except OSError:
        return []
    try:
        out = subprocess.run(
            ["ps", "-p", str(pid), "-o", "command="],
            capture_output=True,
            text=True,
            check=False,
            timeout=5,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [out.strip()] if out.strip() else []


# -- results --------------------------------------------------------------------------------


@dataclass(frozen=True)
class StartResult:
    """Outcome of :meth:`KafkaLocal.start`: the broker answers at ``bootstrap``."""

    already_running: bool
    pid: int
    bootstrap: str
    data_dir: Path
    log_file: Path
    seconds: float


@dataclass(frozen=True)
class StopResult:
    """Outcome of :meth:`KafkaLocal.stop`. ``forced`` means SIGKILL was needed."""

    was_running: bool
    pid: int | None
    forced: bool = False


@dataclass(frozen=True)
class Status:
    """What :meth:`KafkaLocal.status` found.

    ``running``: a broker started from this data dir is alive; ``answering``: it served a
    metadata request within the probe timeout; ``bootstrap``: where it listens (the running
    broker's address, else the configured one).
    """

    running: bool
    answering: bool
    pid: int | None
    bootstrap: str
    data_dir: Path
    log_file: Path


# -- the manager ----------------------------------------------------------------------------


@dataclass(frozen=True)
class KafkaLocal:
    """Manager of one local broker whose files live under ``<data_dir>/kafka``.

    ``bootstrap`` is ``METERING_KAFKA_BOOTSTRAP`` (one local ``host:port``); the controller
    listens on the next port when it is free, otherwise on an ephemeral one. ``cache_dir`` holds
    the jar classpath (``METERING_KAFKA_CACHE``, default :func:`default_cache_dir`). ``java`` and
    ``mvn`` are command names or paths, looked up on ``search_path`` (``None``: the process
    ``PATH``). ``heap`` bounds the JVM (``-Xms``/``-Xmx``). ``progress`` receives one-line
    progress messages (also logged at INFO).

    Construction validates the bootstrap address and heap, raising :class:`KafkaLocalError`.
    """

    data_dir: Path
    bootstrap: str = f"127.0.0.1:{DEFAULT_PORT}"
    cache_dir: Path = field(default_factory=default_cache_dir)
    heap: str = "512m"
    java: str = "java"
    mvn: str = "mvn"
    search_path: str | None = None
    progress: ProgressCallback | None = field(default=None, compare=False, repr=False)
    sasl_users: Mapping[str, str] | None = field(default=None, compare=False, repr=False)
    """SASL/PLAIN users (user -> password) for a broker that authenticates its clients (tests);
    the first user is also the one this manager's own probes log in as."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir).expanduser().resolve())
        object.__setattr__(self, "cache_dir", Path(self.cache_dir).expanduser().resolve())
        parse_bootstrap(self.bootstrap)
        if not _HEAP.match(self.heap):
            raise KafkaLocalError(f"bad JVM heap size {self.heap!r}; use e.g. 512m or 1g")

    # -- layout -----------------------------------------------------------------------------

    @property
    def address(self) -> BrokerAddress:
        """The configured broker address."""
        return parse_bootstrap(self.bootstrap)

    @property
    def home(self) -> Path:
        """``<data_dir>/kafka``: everything the broker owns."""
        return self.data_dir / "kafka"

    @property
    def log_dirs(self) -> Path:
        return self.home / "data"

    @property
    def log_file(self) -> Path:
        """The broker's stdout/stderr (its own logging goes there too)."""
        return self.home / "logs" / "broker.log"

    @property
    def pid_file(self) -> Path:
        return self.home / "broker.pid"

    @property
    def properties_file(self) -> Path:
        return self.home / "server.properties"

    @property
    def cluster_id_file(self) -> Path:
        return self.home / "cluster.id"

    @property
    def lib_dir(self) -> Path:
        """The flat runtime classpath filled by :meth:`ensure_jars`."""
        return self.cache_dir / "lib"

    # -- jars -------------------------------------------------------------------------------

    def jars_ready(self) -> bool:
        """True when the cache holds a complete classpath fetched from the current pom."""
        marker = self.cache_dir / _MARKER
        try:
            recorded = marker.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return False
        return recorded == self._pom_digest() and self.lib_dir.is_dir()

    def ensure_jars(self) -> Path:
        """Return the classpath directory, fetching it with Maven into the cache the first time.

        A fetch goes to ``lib.partial`` and is renamed to ``lib`` only after Maven succeeded,
        then a marker records the pom's SHA-256: an interrupted fetch, or a changed pom, is
        fetched again; a complete one is never touched (a second call downloads nothing).
        Maven's own repository (``~/.m2``) is used as usual. Raises :class:`KafkaLocalError`
        when ``mvn`` is missing or the fetch fails (with Maven's last error lines; the whole
        output is in ``<cache>/mvn.log``).
        """
        if self.jars_ready():
            return self.lib_dir
        with _file_lock(self.cache_dir / ".lock"):
            if self.jars_ready():  # another process finished the fetch while we waited
                return self.lib_dir
            mvn = self._tool(self.mvn, "Apache Maven 3.6+ (e.g. `apt-get install maven`)")
            self._say(
                f"fetching Kafka {KAFKA_VERSION} jars with Maven into {self.cache_dir} "
                "(first start only)"
            )
            pom = self.cache_dir / "pom.xml"
            pom.write_bytes(POM_TEMPLATE.read_bytes())
            partial = self.cache_dir / "lib.partial"
            shutil.rmtree(partial, ignore_errors=True)
            (self.cache_dir / _MARKER).unlink(missing_ok=True)
            mvn_log = self.cache_dir / "mvn.log"
            command = [
                mvn,
                "-q",
                "-B",
                "-Dstyle.color=never",
                "-f",
                str(pom),
                "dependency:copy-dependencies",
                "-DincludeScope=runtime",
                f"-DoutputDirectory={partial}",
            ]
            with mvn_log.open("wb") as out:
                code = subprocess.run(
                    command, stdout=out, stderr=subprocess.STDOUT, check=False
                ).returncode
            jars = list(partial.glob("*.jar")) if partial.is_dir() else []
            if code != 0 or not jars:
                detail = " | ".join(
                    meaningful_log_lines(mvn_log.read_text(encoding="utf-8", errors="replace"))
                )
                raise KafkaLocalError(
                    f"Maven could not fetch the Kafka jars (exit {code}): {detail or 'no output'}"
                    f"; check access to Maven Central (full output: {mvn_log})"
                )
            shutil.rmtree(self.lib_dir, ignore_errors=True)
            partial.rename(self.lib_dir)
            (self.cache_dir / _MARKER).write_text(self._pom_digest() + "\n", encoding="utf-8")
            self._say(f"cached {len(jars)} jars in {self.lib_dir}")
            return self.lib_dir

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> StartResult:
        """Start the broker (or find it running) and return once it answers a client.

        Order: reuse a live broker started from this data dir (waiting for it to answer);
        check the port, java and the jars (fetching them on first use); write
        ``server.properties``; format the log dir on first use (``-g``: harmless to repeat);
        launch detached (new session, output to :attr:`log_file`); then poll with an
        ``AdminClient`` metadata request until it answers. ``timeout`` bounds that wait, not a
        first-time jar fetch.

        Raises :class:`KafkaLocalError` when: java or mvn is missing or java is older than 17;
        the port is held by something else; a running broker from this data dir listens on a
        different address; the broker exits during start-up (with its last error lines); it
        does not answer within ``timeout`` seconds (it is then stopped).
        """
        began = time.monotonic()
        wanted = self.address
        with _file_lock(self.home / ".lock"):
            pid = self._running_pid()
            if pid is not None:
                running_at = self._running_address() or wanted
                if running_at != wanted:
                    raise KafkaLocalError(
                        f"a local broker from {self.home} already runs on {running_at} "
                        f"(pid {pid}); run `metering kafka stop` before changing "
                        f"{BOOTSTRAP_ENV_VAR} to {wanted}"
                    )
                self._wait_answering(pid, began + timeout, timeout)
                return StartResult(
                    True, pid, str(wanted), self.data_dir, self.log_file, time.monotonic() - began
                )
            self.pid_file.unlink(missing_ok=True)  # stale: its broker is gone

            # The port first: it is cheap, and a first-time jar fetch is not.
            if port_in_use(wanted):
                raise KafkaLocalError(self._port_taken_message(wanted))
            java = self._tool(self.java, _JAVA_INSTALL)
            self._check_java_version(java)
            lib = self.ensure_jars()
            controller_port = self._controller_port(wanted)

            self.log_dirs.mkdir(parents=True, exist_ok=True)
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            self.properties_file.write_text(
                render_server_properties(
                    wanted, controller_port, self.log_dirs, sasl_users=self.sasl_users
                ),
                encoding="utf-8",
            )
            self._format_once(java, lib)
            proc, log_offset = self._launch(java, lib, wanted)
            deadline = time.monotonic() + timeout
            try:
                self._wait_answering(proc.pid, deadline, timeout, proc=proc, since=log_offset)
            except BaseException:
                self._terminate(proc.pid, grace=10.0)
                self.pid_file.unlink(missing_ok=True)
                raise
            seconds = time.monotonic() - began
            self._say(
                f"Kafka {KAFKA_VERSION} answers on {wanted} (pid {proc.pid}, {seconds:.1f} s)"
            )
            return StartResult(False, proc.pid, str(wanted), self.data_dir, self.log_file, seconds)

    def stop(self, timeout: float = 30.0) -> StopResult:
        """Stop the broker started from this data dir; harmless when none is running.

        Sends SIGTERM (Kafka's shutdown hook does a controlled shutdown and closes its logs
        cleanly), waits up to ``timeout`` seconds, then SIGKILLs. The pid file is removed in
        every case, including a stale one.
        """
        if not self.home.exists():  # never started here: leave no trace either
            return StopResult(False, None)
        with _file_lock(self.home / ".lock"):
            pid = self._running_pid()
            if pid is None:
                self.pid_file.unlink(missing_ok=True)
                return StopResult(False, None)
            self._say(f"stopping Kafka broker (pid {pid})")
            forced = self._terminate(pid, grace=timeout)
            self.pid_file.unlink(missing_ok=True)
            return StopResult(True, pid, forced)

    def status(self, probe_timeout: float = 2.0) -> Status:
        """Whether a broker from this data dir runs, and whether it answers within the probe."""
        pid = self._running_pid()
        address = (self._running_address() if pid is not None else None) or self.address
        answering = pid is not None and _answers(address, probe_timeout, sasl=self.sasl_users)
        return Status(pid is not None, answering, pid, str(address), self.data_dir, self.log_file)

    # -- internals --------------------------------------------------------------------------

    def _say(self, message: str) -> None:
        log.info("%s", message)
        if self.progress is not None:
            self.progress(message)

    def _pom_digest(self) -> str:
        return hashlib.sha256(POM_TEMPLATE.read_bytes()).hexdigest()

    def _tool(self, name: str, install: str) -> str:
        found = shutil.which(name, path=self.search_path)
        if found is None:
            raise KafkaLocalError(f"{name} not found: install {install} or put it on PATH")
        return found

    def _check_java_version(self, java: str) -> None:
        try:
            probe = subprocess.run(
                [java, "-version"], capture_output=True, text=True, check=False, timeout=30
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise KafkaLocalError(f"cannot run {java} -version: {exc}") from exc
        match = _JAVA_VERSION.search(probe.stderr + probe.stdout)
        if match is None:
            log.warning("could not read the Java version from %s -version; trying anyway", java)
            return
        major = int(match.group(1))
        if major == 1 and match.group(2):  # "1.8.0_292" style
            major = int(match.group(2))
        if major < MIN_JAVA_MAJOR:
            raise KafkaLocalError(
                f"Kafka {KAFKA_VERSION} needs Java {MIN_JAVA_MAJOR}+, but {java} is Java {major}; "
                f"install e.g. openjdk-17-jre-headless"
            )

    def _port_taken_message(self, address: BrokerAddress) -> str:
        if _answers(address, 1.0, sasl=self.sasl_users):
            what = "a Kafka broker not started from this data dir (another data dir or Docker?)"
        else:
            what = "another process"
        return (
            f"port {address.port} on {address.host} is already in use by {what}; "
            f"stop it or set {BOOTSTRAP_ENV_VAR} to a free host:port"
        )

    def _controller_port(self, broker: BrokerAddress) -> int:
        nxt = broker.port + 1
        if nxt <= 65535 and not port_in_use(BrokerAddress(broker.host, nxt)):
            return nxt
        return free_port(broker.host)

    def _running_pid(self) -> int | None:
        """The pid in the pid file if that process is alive and is our broker."""
        try:
            pid = int(self.pid_file.read_text(encoding="utf-8").strip())
        except (FileNotFoundError, ValueError):
            return None
        if not _pid_alive(pid):
            return None
        command = " ".join(_command_line(pid))
        # Guard against pid reuse: the process must be kafka.Kafka on our properties file.
        if command and ("kafka.Kafka" not in command or str(self.properties_file) not in command):
            return None
        return pid

    def _running_address(self) -> BrokerAddress | None:
        try:
            advertised = read_properties(self.properties_file).get("advertised.listeners", "")
        except FileNotFoundError:
            return None
        for listener in advertised.split(","):
            _, sep, hostport = listener.partition("://")
            if sep:
                try:
                    return parse_bootstrap(hostport)
                except KafkaLocalError:
                    return None
        return None

    def _cluster_id(self) -> str:
        try:
            return self.cluster_id_file.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            pass
        meta = self.log_dirs / "meta.properties"
        cluster_id = (
            read_properties(meta).get("cluster.id") if meta.exists() else None
        ) or new_cluster_id()
        self.cluster_id_file.write_text(cluster_id + "\n", encoding="utf-8")
        return cluster_id

    def _format_once(self, java: str, lib: Path) -> None:
        """Format the log dir unless it already holds ``meta.properties``."""
        cluster_id = self._cluster_id()
        if (self.log_dirs / "meta.properties").exists():
            return
        self._say(f"formatting {self.log_dirs} (cluster id {cluster_id})")
        command = [
            java,
            *self._jvm_options(lib, heap="256m"),
            "kafka.tools.StorageTool",
            "format",
            "-t",
            cluster_id,
            "-c",
            str(self.properties_file),
            "-g",
        ]
        probe = subprocess.run(command, capture_output=True, text=True, check=False)
        if probe.returncode != 0:
            detail = " | ".join(meaningful_log_lines(probe.stdout + probe.stderr))
            raise KafkaLocalError(
                f"formatting {self.log_dirs} failed (exit {probe.returncode}): {detail}"
            )

    def _jvm_options(self, lib: Path, heap: str) -> list[str]:
        return [
            f"-Xms{heap}",
            f"-Xmx{heap}",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dkafka.logs.dir={self.log_file.parent}",
            "-Dorg.slf4j.simpleLogger.showDateTime=true",
            "-Dorg.slf4j.simpleLogger.dateTimeFormat=yyyy-MM-dd HH:mm:ss,SSS",
            "-cp",
            f"{lib}/*",  # expanded by the JVM itself, not a shell
        ]

    def _launch(
        self, java: str, lib: Path, address: BrokerAddress
    ) -> tuple[subprocess.Popen[bytes], int]:
        """Run the broker detached; returns it and the log offset where its output starts."""
        if self.log_file.exists() and self.log_file.stat().st_size > _MAX_LOG_BYTES:
            self.log_file.replace(self.log_file.with_suffix(".log.1"))
        self._say(f"starting Kafka {KAFKA_VERSION} on {address} (log: {self.log_file})")
        command = [
            java,
            *self._jvm_options(lib, heap=self.heap),
            "kafka.Kafka",
            str(self.properties_file),
        ]
        with self.log_file.open("ab") as out:
            offset = out.tell()
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.home,
                start_new_session=True,  # survives the CLI's exit and its Ctrl-C
            )
        _SPAWNED[proc.pid] = proc
        tmp = self.pid_file.with_suffix(".tmp")
        tmp.write_text(f"{proc.pid}\n", encoding="utf-8")
        tmp.replace(self.pid_file)
        return proc, offset

    def _log_tail(self, since: int = 0) -> str:
        try:
            with self.log_file.open("rb") as handle:
                handle.seek(since)
                return handle.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def _wait_answering(
        self,
        pid: int,
        deadline: float,
        timeout: float,
        proc: subprocess.Popen[bytes] | None = None,
        since: int = 0,
    ) -> None:
        """Poll until the broker serves metadata; fail fast if it exits.

        ``proc`` is given when this process launched the broker (exit code known); ``since``
        is the log offset where this launch's output begins, so old runs' errors are not quoted.
        """
        address = self._running_address() or self.address
        admin = _admin(address, self.sasl_users)
        while True:
            exited = proc.poll() is not None if proc is not None else not _pid_alive(pid)
            if exited:
                code = proc.returncode if proc is not None else None
                _SPAWNED.pop(pid, None)
                detail = " | ".join(meaningful_log_lines(self._log_tail(since))) or "no output"
                raise KafkaLocalError(
                    f"Kafka broker exited during start-up"
                    f"{f' (exit {code})' if code is not None else ''}: {detail} "
                    f"(full log: {self.log_file})"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise KafkaLocalError(
                    f"Kafka broker (pid {pid}) did not answer on {address} within "
                    f"{timeout:g} s; see {self.log_file}"
                )
            if _answers(address, min(1.0, max(remaining, 0.1)), admin=admin):
                return
            time.sleep(min(0.2, max(deadline - time.monotonic(), 0)))

    def _terminate(self, pid: int, grace: float) -> bool:
        """SIGTERM, wait ``grace`` seconds, then SIGKILL. Returns True when SIGKILL was needed."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if _wait_gone(pid, grace):
            _SPAWNED.pop(pid, None)
            return False
        log.warning("broker pid %s ignored SIGTERM for %.0f s; sending SIGKILL", pid, grace)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if not _wait_gone(pid, 10.0):
            raise KafkaLocalError(f"Kafka broker pid {pid} survived SIGKILL; check it with ps")
        _SPAWNED.pop(pid, None)
        return True


def _wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def _admin(address: BrokerAddress, sasl: Mapping[str, str] | None = None) -> AdminClient:
    # Imported lazily: confluent_kafka loads librdkafka, which `kafka stop` does not need.
    from confluent_kafka.admin import AdminClient

    config: dict[str, Any] = {
        "bootstrap.servers": str(address),
        "reconnect.backoff.ms": 100,
        "reconnect.backoff.max.ms": 500,
        # Route librdkafka's "connection refused" chatter during start-up to logging.
        "logger": logging.getLogger(f"{__name__}.rdkafka"),
    }
    if sasl:
        user, password = next(iter(sasl.items()))
        config.update(
            {
                "security.protocol": "SASL_PLAINTEXT",
                "sasl.mechanism": "PLAIN",
                "sasl.username": user,
                "sasl.password": password,
            }
        )
    return AdminClient(config)


def _answers(
    address: BrokerAddress,
    timeout: float,
    admin: AdminClient | None = None,
    *,
    sasl: Mapping[str, str] | None = None,
) -> bool:
    """True when the broker at ``address`` returns cluster metadata within ``timeout``."""
    from confluent_kafka import KafkaException

    client = admin if admin is not None else _admin(address, sasl)
    try:
        metadata = client.list_topics(timeout=timeout)
    except KafkaException as exc:
        log.debug("broker at %s not answering yet: %s", address, exc)
        return False
    return bool(metadata.brokers)
