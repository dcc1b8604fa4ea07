"""`event-stats run` (the `make run` job) as a user runs it: a subprocess on temp settings."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
from smtp_fixtures import free_port

pytestmark = pytest.mark.e2e


def _port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def run_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)  # the session's temp AIRFLOW_HOME (tests/conftest.py)
    env.update(
        WAREHOUSE_PATH=str(tmp_path / "data" / "warehouse.duckdb"),
        EMAIL_OUTBOX_DIR=str(tmp_path / "data" / "outbox"),
    )
    return env


def _run(env: dict[str, str], port: int, *args: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "event_pipeline.cli", "run", "--port", str(port), *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)


def _tables(path: str) -> list[list[tuple]]:
    with duckdb.connect(path, read_only=True) as connection:
        return [
            connection.execute(sql).fetchall()
            for sql in (
                "select * from raw.events order by event_id",
                "select * from analytics.event_stats order by all",
                "select * exclude (sent_at) from ops.email_log order by all",
            )
        ]


def test_run_prints_a_summary_per_date_and_a_second_run_changes_nothing(run_env):
    port = free_port()
    first = _run(run_env, port, "--start", "2026-02-01", "--end", "2026-02-03")

    assert first.returncode == 0, first.stdout + first.stderr
    lines = first.stdout.splitlines()
    for day in ("2026-02-01", "2026-02-02"):
        [row] = [line for line in lines if line.startswith(day) and "success" in line]
        assert "sent (revision 1)" in row
    assert "2026-02-03" not in first.stdout.split("date")[-1]  # end is exclusive
    assert "uv run event-stats sql" in first.stdout and "analytics.event_stats" in first.stdout
    assert not _port_in_use(port), "the events API it started is still running"
    emails = sorted(Path(run_env["EMAIL_OUTBOX_DIR"]).glob("*.eml"))
    assert len(emails) == 2
    before = _tables(run_env["WAREHOUSE_PATH"])

    second = _run(run_env, port, "--start", "2026-02-01", "--end", "2026-02-03")

    assert second.returncode == 0, second.stdout + second.stderr
    assert second.stdout.count("unchanged, not sent again") == 2
    assert _tables(run_env["WAREHOUSE_PATH"]) == before
    assert sorted(Path(run_env["EMAIL_OUTBOX_DIR"]).glob("*.eml")) == emails


def test_run_stops_the_events_api_when_it_is_interrupted(run_env):
    port = free_port()
    argv = [sys.executable, "-m", "event_pipeline.cli", "run", "--port", str(port)]
    process = subprocess.Popen(argv, env=run_env, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not _port_in_use(port):
            assert time.monotonic() < deadline and process.poll() is None, "API never started"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
    assert process.returncode != 0
    assert not _port_in_use(port), "the events API outlived an interrupted run"
