"""Manual triggers and the deadline alert under the real scheduler, api-server and dag-processor.

A trigger without a logical date (CLI, REST with logical_date null) and the UI's default
(logical date = now) process the last complete UTC day; a trigger naming a day at 00:00 UTC
processes that day; no run touches today's incomplete day; runs of the same day at once all
succeed and email the day once. A scheduled day whose run has not
succeeded by EVENT_STATS_DEADLINE raises one deadline alert; an on-time scheduled run and
manual runs raise none.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import httpx
import pytest
from dag_fixtures import AirflowServices, PipelineEnv, airflow_cli, midnight, wait_for
from servers import free_port

pytestmark = pytest.mark.e2e

NAMED_DAY = date(2026, 1, 5)
DAG_RUNS = "/dags/event_stats/dagRuns"


def _api_up(services: AirflowServices) -> bool:
    try:
        return services.rest("GET", "/dags/event_stats").status_code == 200
    except httpx.HTTPError:
        return False


def _deadlines(services: AirflowServices) -> dict[str, tuple[datetime, bool, str]]:
    """run_id -> (deadline_time, missed, its callback's state) of every deadline recorded."""
    from airflow.models.callback import Callback
    from airflow.models.dagrun import DagRun
    from airflow.models.deadline import Deadline
    from sqlalchemy import select

    query = (
        select(DagRun.run_id, Deadline.deadline_time, Deadline.missed, Callback.state)
        .join(Deadline.dagrun)
        .join(Deadline.callback)
    )
    with services.session() as session:
        rows = session.execute(query).all()
    return {run_id: (time, missed, str(state)) for run_id, time, missed, state in rows}


def _clock(offset: timedelta) -> str:
    """EVENT_STATS_DEADLINE's HH:MM:SS for `offset` after the end of a day."""
    seconds = int(offset.total_seconds())
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def test_manual_triggers_process_the_last_complete_day_or_the_day_they_name(
    pipeline_env: PipelineEnv, start_airflow, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("EVENT_STATS_DEADLINE", "47:00")  # the scheduled run is on time
    services = start_airflow(schedule=True, rest=True)
    services.wait_until_parsed()
    wait_for(lambda: _api_up(services), "the api-server answering", 120)

    # The public REST API refuses a bad param before any run exists, naming the value.
    refused = services.rest(
        "POST", DAG_RUNS, json={"logical_date": None, "conf": {"start_date": "2026-13-01"}}
    )
    assert refused.status_code == 400 and "2026-13-01" in refused.text, refused.text

    services.unpause()  # the scheduler creates yesterday's scheduled run now

    def trigger(run_id: str, *logical_date: str) -> None:
        done = airflow_cli("dags", "trigger", "event_stats", "--run-id", run_id, *logical_date)
        assert done.returncode == 0, done.stdout + done.stderr

    def post(run_id: str, logical_date: str | None) -> None:
        body = {"dag_run_id": run_id, "logical_date": logical_date}
        answer = services.rest("POST", DAG_RUNS, json=body)
        assert answer.status_code == 200, answer.text

    now = datetime.now(UTC).replace(microsecond=0)  # what the UI's Trigger button sends
    steps = [
        lambda: trigger("cli_no_date"),
        lambda: trigger("cli_named", "--logical-date", midnight(NAMED_DAY).isoformat()),
        lambda: post("rest_null", None),
        lambda: post("rest_now", now.isoformat()),
    ]
    # All at once: four of the five runs process the same day (yesterday). Each audits its
    # stats in its own dbt audit table, so no run consumes another's.
    for step in steps:
        step()
    finished = services.wait_for_finished_runs(1 + len(steps), 900)

    assert {r.run_id: str(r.state) for r in finished} == {r.run_id: "success" for r in finished}, (
        services.log_tail()
    )
    by_id = {r.run_id: r for r in finished}
    [scheduled] = [r for r in finished if str(r.run_type) == "scheduled"]

    def last_complete_day(moment: datetime) -> date:
        return moment.astimezone(UTC).date() - timedelta(days=1)

    expected = {
        "cli_no_date": last_complete_day(by_id["cli_no_date"].run_after),
        "cli_named": NAMED_DAY,
        "rest_null": last_complete_day(by_id["rest_null"].run_after),
        "rest_now": last_complete_day(now),
        scheduled.run_id: scheduled.logical_date.date(),
    }
    assert dict(pipeline_env.loads()) == expected
    # No run touched the day it was triggered on (today, incomplete).
    todays = {r.run_after.astimezone(UTC).date() for r in finished}
    written = {d for (d,) in pipeline_env.query("select distinct event_date from raw.events")}
    built = {
        d for (d,) in pipeline_env.query("select distinct event_date from analytics.event_stats")
    }
    emailed = {d for (d,) in pipeline_env.query("select event_date from ops.email_log")}
    assert written == built == emailed == set(expected.values())
    assert not todays & written
    assert len(pipeline_env.emails()) == len(emailed)  # each day emailed once
    # The scheduled run succeeded before its deadline: Airflow dropped the deadline. (Manual
    # runs alert never: see the next test.)
    assert scheduled.run_id not in _deadlines(services)
    assert pipeline_env.alerts() == []


def test_a_scheduled_day_not_done_by_its_deadline_raises_one_alert(
    pipeline_env: PipelineEnv, start_airflow, monkeypatch: pytest.MonkeyPatch
):
    now = datetime.now(UTC)
    today = now.date()
    due = now.replace(microsecond=0) + timedelta(seconds=150)
    # The scheduled run of yesterday is due EVENT_STATS_DEADLINE after yesterday ended.
    monkeypatch.setenv("EVENT_STATS_DEADLINE", _clock(due - midnight(today)))
    monkeypatch.setenv("EVENTS_API_URL", f"http://127.0.0.1:{free_port()}")  # down: runs fail
    monkeypatch.setenv("EVENTS_API_ATTEMPTS", "1")
    services = start_airflow(schedule=True, triggerer=True)
    services.wait_until_parsed()
    yesterday = midnight(today - timedelta(days=1))
    # A manual run of the day before: its deadline passed long ago, but only the schedule
    # promises. (A manual run of yesterday itself would stop the scheduler from creating the
    # scheduled run: a logical date has one run.)
    earlier = yesterday - timedelta(days=1)
    manual = airflow_cli(
        "dags", "trigger", "event_stats", "--run-id", "manual_earlier",
        "--logical-date", earlier.isoformat(),
    )  # fmt: skip
    assert manual.returncode == 0, manual.stderr
    services.unpause()

    def deadline_alerts():
        return [a for a in pipeline_env.alerts() if a["X-Event-Stats-Alert"] == "deadline"]

    def explain() -> str:
        return f"deadlines {_deadlines(services)}\n{services.log_tail()}"

    [alert] = wait_for(deadline_alerts, "the deadline alert", 420, every=2, explain=explain)
    arrived = datetime.now(UTC)

    def both_callbacks_done():
        return [state for *_, state in _deadlines(services).values()] == ["success"] * 2

    wait_for(both_callbacks_done, "both deadline callbacks succeeding", 120, explain=explain)

    assert arrived >= due
    [scheduled] = services.runs(run_type="scheduled")
    assert scheduled.logical_date == yesterday
    deadlines = _deadlines(services)
    assert deadlines == {
        scheduled.run_id: (due, True, "success"),
        "manual_earlier": (earlier + timedelta(days=1) + (due - midnight(today)), True, "success"),
    }, deadlines
    assert len(deadline_alerts()) == 1  # none for the manual run
    assert alert["To"] == "team@example.com"
    day = yesterday.date().isoformat()
    shown_due = due.strftime("%Y-%m-%d %H:%M:%S UTC")
    # (Python's email folds this subject's line before its first word: hence strip.)
    assert alert["Subject"].strip() == f"event-stats LATE: stats of {day} not sent by {shown_due}"
    body = alert.get_body().get_content()
    assert f"Run:        {scheduled.run_id}" in body
    assert f"{services.api_url}/dags/event_stats/runs/{scheduled.run_id}" in body
