"""Every run processes the dates it names or fails loudly, and a failed run tells someone.

Through `airflow dags test` (the CLI a user types, and dag.test): a day before the DAG's old
start_date, today's incomplete day, a range given as params; the failure notification of a run
whose load fails, in the outbox and by SMTP. Triggers under the scheduler:
test_event_stats_triggers.py.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest
from dag_fixtures import PipelineEnv, airflow_cli, load_dag, midnight, task_states
from servers import free_port
from smtp_fixtures import airflow_connection

pytestmark = pytest.mark.e2e

# Before 2026-01-01, the start_date that made `airflow dags test` of it a silent no-op.
EARLY_DAY = date(2025, 6, 1)


def _stats_dates(env: PipelineEnv) -> list[date]:
    return [
        d for (d,) in env.query("select distinct event_date from analytics.event_stats order by 1")
    ]


def test_airflow_dags_test_of_a_day_before_the_old_start_date_processes_it(
    pipeline_env: PipelineEnv,
):
    tested = airflow_cli("dags", "test", "event_stats", EARLY_DAY.isoformat())

    assert tested.returncode == 0, tested.stdout[-3000:] + tested.stderr[-3000:]
    assert [day for _, day in pipeline_env.loads()] == [EARLY_DAY]
    assert _stats_dates(pipeline_env) == [EARLY_DAY]
    [eml] = pipeline_env.emails()
    assert f"Event stats for {EARLY_DAY}" in eml.read_text()


def test_todays_incomplete_day_is_refused_and_the_failure_is_notified_by_smtp(
    pipeline_env: PipelineEnv, smtp_server, monkeypatch: pytest.MonkeyPatch
):
    recorder, smtp = smtp_server
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", airflow_connection(smtp))
    today = datetime.now(UTC).date()

    run = load_dag().test(logical_date=midnight(today))

    states = task_states(run)
    assert str(run.state) == "failed" and states["load_raw_events"] == "failed", states
    assert pipeline_env.loads() == [] and pipeline_env.emails() == []
    # The failure notification went by SMTP (the connection exists), not to the outbox.
    [alert] = recorder.messages
    assert pipeline_env.alerts() == []
    assert alert["To"] == "team@example.com"
    assert "FAILED" in alert["Subject"] and "load_raw_events" in alert["Subject"]
    body = alert.get_body().get_content()
    assert f"{today} is not complete" in body
    assert f"params start_date={today}" in body  # what to do


def test_params_process_a_range_and_email_each_date(pipeline_env: PipelineEnv):
    first, end = date(2026, 1, 5), date(2026, 1, 7)

    run = load_dag().test(
        logical_date=None, run_conf={"start_date": first.isoformat(), "end_date": end.isoformat()}
    )

    assert str(run.state) == "success", task_states(run)
    days = [first, first + timedelta(days=1)]
    assert sorted(day for _, day in pipeline_env.loads()) == days
    assert _stats_dates(pipeline_env) == days
    sent = sorted(
        d for (d,) in pipeline_env.query("select event_date from ops.email_log order by 1")
    )
    assert sent == days and len(pipeline_env.emails()) == 2


def test_a_run_whose_load_fails_sends_a_failure_notification_to_the_outbox(
    pipeline_env: PipelineEnv, monkeypatch: pytest.MonkeyPatch
):
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there: the events API is down
    monkeypatch.setenv("EVENTS_API_URL", down)
    monkeypatch.setenv("EVENTS_API_ATTEMPTS", "1")
    day = date(2026, 1, 5)

    run = load_dag().test(logical_date=midnight(day))

    states = task_states(run)
    assert states["load_raw_events"] == "failed" and states["send_stats"] == "upstream_failed"
    assert pipeline_env.emails() == []
    [alert] = pipeline_env.alerts()
    assert alert["To"] == "team@example.com"
    subject, body = alert["Subject"], alert.get_body().get_content()
    assert f"FAILED: event_stats {day}, task load_raw_events" in subject
    assert f"Run:      {run.run_id}" in body
    assert f"Date(s):  {day}" in body
    assert "Task:     load_raw_events (try 1)" in body
    assert down.removeprefix("http://") in body  # the loader's error names the URL
    assert "/dags/event_stats/runs/" in body and "/tasks/load_raw_events" in body  # log URL
