"""Credentials never appear in logs or error output (issue: exact under failure, point 7).

A real broker that authenticates its clients (SASL/PLAIN, ``KafkaLocal(sasl_users=...)``):
with a wrong password every command and the worker fail with one line that names the
authentication failure and the user, never a password; with the right one the pipeline runs
and its logs hold no password either.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from jobs.kafka_local import KafkaLocal, default_cache_dir
from tests.integration.conftest import _free_port
from tests.integration.harness import Deployment, wait_for

RIGHT = "right-Pw-9c2e51"
WRONG = "wrong-Pw-77d1aa"
BROKER_PASSWORD = "broker-Pw-4a7f03"
SECRETS = (RIGHT, WRONG, BROKER_PASSWORD)

EVENT = {
    "event_id": "e-1",
    "occurred_at": "2026-11-20T10:00:00Z",
    "org_id": "org-1",
    "plan": "ENTERPRISE",
    "user_id": "u-1",
    "seat_tier": "STANDARD",
    "product": "CLAUDE",
    "model": "claude-sonnet-4-0",
    "input_tokens": 1200,
    "output_tokens": 300,
    "cache_creation_input_tokens": 0,
    "cache_read_input_tokens": 5000,
    "extra_usage": True,
}


def _clean(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, "a password was printed"


@pytest.mark.timeout(900)
def test_kafka_credentials_never_print_even_when_authentication_fails(tmp_path: Path) -> None:
    kafka = KafkaLocal(
        data_dir=tmp_path / "kafka",
        bootstrap=f"127.0.0.1:{_free_port()}",
        cache_dir=default_cache_dir(),
        sasl_users={"admin": BROKER_PASSWORD, "metering": RIGHT},
    )
    kafka.start(timeout=180)
    env = {
        "METERING_KAFKA_BOOTSTRAP": kafka.bootstrap,
        "METERING_APP_ID": "secrets",
        "METERING_TOPIC_PREFIX": "secrets.",
        "METERING_DATA_DIR": str(tmp_path / "data"),
        "METERING_WEB_PORT": str(_free_port()),
        "METERING_PARTITIONS": "2",
        "METERING_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "METERING_KAFKA_SASL_MECHANISM": "PLAIN",
        "METERING_KAFKA_SASL_USERNAME": "metering",
        "METERING_KAFKA_SASL_PASSWORD": WRONG,
    }
    deployment = Deployment(env=env, root=tmp_path)
    line = json.dumps(EVENT) + "\n"
    try:
        # A wrong password: one line naming the refused user, exit 2, no traceback.
        for args in (
            ("caps", "set", "--org", "org-1", "--usd", "5"),
            ("pauses",),
            ("produce", "--jsonl", "-"),
        ):
            result = deployment.metering(*args, input_text=line, timeout=120)
            output = result.stdout + result.stderr
            assert result.returncode != 0, output
            assert "refused the credentials of user 'metering'" in output, output
            assert "Traceback" not in output, output
            _clean(output)

        worker = deployment.start_worker()
        wait_for(lambda: worker.process.poll() is not None, 120, "the worker to give up")
        log = worker.log()
        assert worker.process.returncode != 0
        assert "refused the credentials of user 'metering'" in log, log[-3000:]
        _clean(log)

        # The right password: the pipeline runs, and still prints no password.
        deployment.env["METERING_KAFKA_SASL_PASSWORD"] = RIGHT
        worker = deployment.start_worker()
        produced = deployment.metering("produce", "--jsonl", "-", input_text=line)
        assert produced.returncode == 0, produced.stderr
        deployment.wait_processed()
        report = deployment.metering("report", "--org", "org-1", "--month", "2026-11", "--json")
        assert report.returncode == 0, report.stderr
        assert json.loads(report.stdout)["total"]["events"] == 1
        time.sleep(1)
        assert worker.terminate() == 0
        for process in deployment.workers:
            _clean(process.log())
        _clean(produced.stdout + produced.stderr + report.stdout + report.stderr)
    finally:
        deployment.stop_all()
        kafka.stop()
