"""Runs made by `event-stats run` and `event-stats backfill` as Airflow's UI shows them.

Read back through the api-server's public REST API (what the UI itself reads): real start
times and durations, and a run id, note and trigger that say what each run is.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta

import httpx
import pytest
from dag_fixtures import AirflowServices, PipelineEnv, wait_for
from servers import free_port

pytestmark = pytest.mark.e2e

DAY = date(2026, 5, 1)


def _api_up(services: AirflowServices) -> bool:
    try:
        return services.rest("GET", "/version").status_code == 200
    except httpx.HTTPError:
        return False


def _event_stats(*args: str) -> tuple[datetime, datetime]:
    """Run `event-stats ARGS` on this test's Airflow and warehouse; its start and end (UTC)."""
    argv = [sys.executable, "-m", "event_pipeline.cli", *args, "--port", str(free_port())]
    began = datetime.now(UTC)
    done = subprocess.run(argv, env=dict(os.environ), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    return began, datetime.now(UTC)


def _moment(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_runs_show_real_times_and_say_what_they_are(pipeline_env: PipelineEnv, start_airflow):
    services = start_airflow(rest=True, api_only=True)
    wait_for(lambda: _api_up(services), "the api-server answering", 120)

    run_began, run_ended = _event_stats("run", "--start", str(DAY), "--end", "2026-05-02")
    end = DAY + timedelta(days=3)
    backfill_began, backfill_ended = _event_stats(
        "backfill", "--start", str(DAY), "--end", str(end)
    )

    answer = services.rest("GET", "/dags/event_stats/dagRuns", params={"order_by": "start_date"})
    assert answer.status_code == 200, answer.text
    per_date, ranged = answer.json()["dag_runs"]

    assert per_date["dag_run_id"].startswith("event-stats-run_2026-05-01__")
    assert _moment(per_date["logical_date"]) == datetime(2026, 5, 1, tzinfo=UTC)
    assert per_date["note"] == "`event-stats run` of 2026-05-01"
    assert ranged["dag_run_id"].startswith("event-stats-backfill_2026-05-01_to_2026-05-04__")
    assert ranged["note"].startswith("backfill 2026-05-01 to 2026-05-04 (end exclusive): 3 dates")
    assert ranged["conf"] == {"start_date": "2026-05-01", "end_date": "2026-05-04"}
    for run, command, (began, ended) in (
        (per_date, "event-stats run", (run_began, run_ended)),
        (ranged, "event-stats backfill", (backfill_began, backfill_ended)),
    ):
        assert run["state"] == "success"
        assert run["run_type"] == "manual"
        assert run["triggered_by"] == "cli" and run["triggering_user_name"] == command
        # Started and ended while the command ran; the duration is the real one.
        start, finish = _moment(run["start_date"]), _moment(run["end_date"])
        assert began <= start <= finish <= ended, run
        assert run["duration"] == pytest.approx((finish - start).total_seconds(), abs=1)
        assert 0 < run["duration"] < (ended - began).total_seconds()
