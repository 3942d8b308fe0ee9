"""Running real worker processes against a test deployment, and reading what they made."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def wait_for(condition: Callable[[], Any], timeout: float, what: str, every: float = 0.5) -> Any:
    """Poll ``condition`` until it returns a truthy value; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


RESTARTABLE = (70, 75)  # the worker's "restart me" exit codes (unexpected failure, delivery)


@dataclass
class WorkerProcess:
    process: subprocess.Popen[bytes]
    log_path: Path
    args: tuple[str, ...] = ()
    command: str = "worker"
    env: dict[str, str] | None = None
    killed: bool = False  # by the test, on purpose: not restarted
    replaced: bool = False  # already restarted by the supervisor

    def terminate(self, timeout: float = 90.0) -> int:
        """SIGTERM and wait: the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(
                f"worker ignored SIGTERM for {timeout}s; log {self.log_path}"
            ) from None

    def kill(self) -> None:
        self.killed = True
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class Deployment:
    env: dict[str, str]
    root: Path
    workers: list[WorkerProcess] = field(default_factory=list)
    restarts: int = 0

    @property
    def settings(self) -> Settings:
        keys = {k.removeprefix("METERING_").lower(): v for k, v in self.env.items()}
        return Settings(**keys)  # type: ignore[arg-type]

    def process_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("METERING_")}
        env.update(self.env)
        env["PYTHONPATH"] = str(REPO)
        return env

    def start_worker(
        self, *args: str, command: str = "worker", env: dict[str, str] | None = None
    ) -> WorkerProcess:
        """Start ``metering <command>`` (a worker by default) as a real process."""
        log_path = self.root / f"{command}-{len(self.workers)}.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "jobs.cli", command, *args],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={**self.process_env(), **(env or {})},
                cwd=REPO,
            )
        worker = WorkerProcess(process, log_path, args, command, env)
        self.workers.append(worker)
        return worker

    def supervise(self) -> int:
        """Do what a supervisor (systemd, Kubernetes) does in production: restart every
        worker that exited with a restartable status. Returns the number restarted."""
        restarted = 0
        for worker in list(self.workers):
            code = worker.process.poll()
            if code in RESTARTABLE and not worker.killed and not worker.replaced:
                worker.replaced = True
                self.start_worker(*worker.args, command=worker.command, env=worker.env)
                restarted += 1
        self.restarts += restarted
        return restarted

    def metering(
        self, *args: str, input_text: str | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """Run the ``metering`` CLI in this deployment."""
        return subprocess.run(
            [sys.executable, "-m", "jobs.cli", *args],
            env=self.process_env(),
            cwd=REPO,
            input=input_text,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def stop_all(self) -> None:
        for worker in self.workers:
            worker.kill()

    def produce(self, items: Iterable[Any]) -> int:
        """Produce generated items (events as Avro, raw bytes as they are)."""
        from jobs.producer import UsageProducer
        from streams.topics import ensure_topics

        ensure_topics(self.settings)
        producer = UsageProducer(self.settings)
        for item in items:
            if item.raw is not None:
                producer.send_raw(item.key.encode(), item.raw)
            else:
                producer.send_event(item.event)
        return producer.close()

    def wait_processed(self, timeout: float = 300, supervise: bool = False) -> None:
        from jobs.progress import group_position
        from streams.topics import PRICED, USAGE

        settings = self.settings
        seen: list[str] = ["nothing read yet"]

        def caught_up() -> bool:
            if supervise:
                self.supervise()
            for worker in self.workers:
                code = worker.process.poll()
                if code is not None and code != 0 and worker is self.workers[-1]:
                    raise AssertionError(f"worker exited {code}:\n{worker.log()[-4000:]}")
            usage = group_position(settings, settings.app_id, settings.topic(USAGE))
            seen[0] = f"usage {usage.committed}/{usage.end}"
            if usage.end == 0 or usage.lag:
                return False
            priced = group_position(settings, settings.sink_group, settings.topic(PRICED))
            seen[0] += f", priced {priced.committed}/{priced.end}"
            return priced.end > 0 and priced.lag == 0

        try:
            wait_for(caught_up, timeout, "the worker and the sink to catch up")
        except AssertionError as error:
            tails = "\n".join(
                f"--- {worker.command} {' '.join(worker.args)} (pid {worker.process.pid}, "
                f"exit {worker.process.poll()}):\n{worker.log()[-2500:]}"
                for worker in self.workers
            )
            states = self._consumer_states() + self._stacks()
            raise AssertionError(f"{error}; last seen {seen[0]}\n{tails}{states}") from None

    def _consumer_states(self) -> str:
        """``GET /metering/consumer`` of every live worker (streams/diagnostics.py)."""
        import httpx

        states = []
        for worker in self.workers:
            if worker.command != "worker" or worker.process.poll() is not None:
                continue
            port = (worker.env or {}).get("METERING_WEB_PORT") or self.env["METERING_WEB_PORT"]
            try:
                reply = httpx.get(f"http://127.0.0.1:{port}/metering/consumer", timeout=10)
                text = reply.text
            except httpx.HTTPError as exc:
                text = f"unreadable: {exc!r}"
            states.append(f"--- consumer of worker pid {worker.process.pid}:\n{text}")
        return "\n" + "\n".join(states)

    def _stacks(self) -> str:
        """The Python stacks of the live workers, when py-spy is installed (a stall's only
        witness once the test has timed out); empty otherwise."""
        spy = shutil.which("py-spy") or shutil.which(
            "py-spy", path=str(Path(sys.executable).parent)
        )
        if spy is None:
            return ""
        dumps = []
        for worker in self.workers:
            if worker.process.poll() is None:
                dump = subprocess.run(
                    [spy, "dump", "-p", str(worker.process.pid)],
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                dumps.append(
                    f"--- stacks of {worker.command} (pid {worker.process.pid}):\n"
                    f"{dump.stdout}{dump.stderr}"
                )
        return "\n" + "\n".join(dumps)

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """The Prometheus samples whose name (with labels) starts with ``prefix``, from the
        ``/metrics`` of the process serving the deployment's web port."""
        import httpx

        text = httpx.get(f"http://127.0.0.1:{self.env['METERING_WEB_PORT']}/metrics").text
        samples = {}
        for line in text.splitlines():
            sample, _, value = line.rpartition(" ")
            if sample.startswith(prefix) and not line.startswith("#"):
                samples[sample] = float(value)
        return samples

    def metric(self, name: str, labels: str = "") -> float:
        """One Prometheus sample (0 when absent); see :meth:`metrics`."""
        wanted = f"{name}{{{labels}}}" if labels else name
        return self.metrics(wanted).get(wanted, 0.0)

    def view(self, name: str) -> list[dict[str, Any]]:
        """Every row of a SPEC §6 view, read through whichever process owns the store."""
        from sinks.access import open_reader

        reader = open_reader(self.settings)
        try:
            return reader.named("view_rows", view=name)
        finally:
            reader.close()
