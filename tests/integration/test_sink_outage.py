"""ClickHouse writes fail for 60 s under a running pipeline (issue: exact under failure, 4).

The sink process is ``metering sink`` with a fault beneath its ClickHouse client
(``faulty_sink.py``: every insert raises for 60 s). During the outage the worker keeps
metering, the sink commits nothing past unwritten rows and says so in its log and metrics;
after it the rows are written, and the views are exactly the oracle's: nothing lost, nothing
doubled. A plain ``metering sink`` started afterwards resumes from what the faulty one
committed and serves the reads.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from jobs.progress import group_position
from streams.topics import PRICED, USAGE
from tests.integration.conftest import _free_port
from tests.integration.harness import REPO, Deployment, wait_for
from tests.integration.test_pipeline import _records, assert_views_match
from tests.oracle import expected_views

OUTAGE_SECONDS = 60


def test_a_60_second_clickhouse_outage_loses_and_doubles_nothing(
    deployment: Deployment,
) -> None:
    records, now_ms = _records(8_000, seed=61)
    expected = expected_views(records, now_ms)
    settings = deployment.settings
    worker = deployment.start_worker("--no-sink", env={"METERING_WEB_PORT": str(_free_port())})
    deployment.produce(records)

    log_path = deployment.root / "faulty-sink.log"
    with log_path.open("wb") as log:
        sink = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.faulty_sink"],
            env={
                **deployment.process_env(),
                "METERING_TEST_OUTAGE_SECONDS": str(OUTAGE_SECONDS),
            },
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(
            lambda: "ClickHouse write failed" in log_path.read_text(errors="replace"),
            60,
            "the first failed write",
        )
        started = time.monotonic()
        # The worker meters on; the sink commits nothing while nothing is written.
        wait_for(
            lambda: group_position(settings, settings.app_id, settings.topic(USAGE)).lag == 0,
            OUTAGE_SECONDS - 15,
            "the worker to meter everything during the outage",
        )
        while time.monotonic() - started < OUTAGE_SECONDS - 10:
            priced = group_position(settings, settings.sink_group, settings.topic(PRICED))
            assert priced.end > 0 and priced.committed == 0, priced
            assert sink.poll() is None, log_path.read_text()[-3000:]
            time.sleep(2)
        assert deployment.metric("metering_sink_flush_failures_total") >= 3

        # After the outage: everything written and committed.
        wait_for(
            lambda: group_position(settings, settings.sink_group, settings.topic(PRICED)).lag == 0,
            120,
            "the sink to catch up after the outage",
        )
        text = log_path.read_text(errors="replace")
        assert "ClickHouse writes recovered" in text
        failures = deployment.metric("metering_sink_flush_failures_total")
        assert text.count("ClickHouse write failed") == failures
        assert "Traceback" not in text
    finally:
        sink.send_signal(signal.SIGTERM)
        code = sink.wait(90)
    assert code == 0, log_path.read_text()[-3000:]

    # A plain sink takes over the store and serves the reads.
    deployment.start_worker(command="sink")
    deployment.wait_processed()
    assert_views_match(deployment, expected)
    assert worker.process.poll() is None
