"""The event_stats DAG against the events API in login mode, credentials from an Airflow connection.

The load task logs in and fetches in one unit: its token must show up nowhere outside it (no task
log, no captured output, no XCom or other metadata, no warehouse table), nor the password.
"""

from __future__ import annotations

import json
import os
from datetime import date, timedelta
from pathlib import Path

import pytest
from dag_fixtures import PipelineEnv, airflow_cli, load_dag, midnight, task_states
from leaks import assert_absent, warehouse_text

pytestmark = pytest.mark.e2e

DAY = date(2026, 1, 5)


def connect_events_api(monkeypatch: pytest.MonkeyPatch, api, password: str | None = None) -> None:
    """The Airflow connection `events_api` (from the environment, as a secrets backend would)."""
    host, port = api.url.removeprefix("http://").split(":")
    connection = {
        "conn_type": "http",
        "host": host,
        "port": int(port),
        "login": api.user,
        "password": password or api.password,
    }
    monkeypatch.setenv("AIRFLOW_CONN_EVENTS_API", json.dumps(connection))


def metadata_bytes() -> bytes:
    """The Airflow metadata database's files (SQLite, with its journal): XComs, Variables,
    task instances, rendered fields, logs kept in the database."""
    url = os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    path = Path(url.removeprefix("sqlite:///"))
    files = [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-journal")]
    return b"".join(file.read_bytes() for file in files if file.exists())


def task_log_text() -> str:
    """Every file under AIRFLOW_HOME/logs: the task logs of runs under the scheduler (dag.test
    runs tasks in this process, whose log records caplog and capfd hold)."""
    logs = Path(os.environ["AIRFLOW_HOME"]) / "logs"
    files = [p for p in logs.rglob("*") if p.is_file()] if logs.exists() else []
    return "\n".join(p.read_text(errors="replace") for p in files)


def test_the_events_api_connection_gives_the_url_and_credentials_or_defers_to_the_settings(
    monkeypatch: pytest.MonkeyPatch,
):
    from event_pipeline.airflow_support import EventsApiAccess, events_api_access
    from event_pipeline.sources import Credentials

    monkeypatch.delenv("AIRFLOW_CONN_EVENTS_API", raising=False)
    assert events_api_access() == EventsApiAccess(None, None)  # EVENTS_API_* settings apply

    monkeypatch.setenv("AIRFLOW_CONN_EVENTS_API", "http://loader:s%40cret@127.0.0.1:5123")
    access = events_api_access()
    assert access == EventsApiAccess("http://127.0.0.1:5123", Credentials("loader", "s@cret"))
    assert "s@cret" not in repr(access)

    as_url = {"conn_type": "http", "host": "https://events.example.com/api", "login": "loader"}
    monkeypatch.setenv("AIRFLOW_CONN_EVENTS_API", json.dumps({**as_url, "password": "p"}))
    assert events_api_access().api_url == "https://events.example.com/api"
    monkeypatch.setenv("AIRFLOW_CONN_EVENTS_API", json.dumps(as_url))
    with pytest.raises(ValueError, match="set both login and password"):
        events_api_access()


def test_a_dag_run_logs_in_with_the_airflow_connection_and_the_token_stays_in_the_task(
    pipeline_env: PipelineEnv,
    login_api,
    monkeypatch: pytest.MonkeyPatch,
    caplog,
    capfd,
):
    api = login_api(events_per_day=40)
    # EVENTS_API_URL (pipeline_env) points at an open events API: the connection's host wins.
    connect_events_api(monkeypatch, api)
    dag = load_dag()

    run = dag.test(logical_date=midnight(DAY))

    assert str(run.state) == "success", task_states(run)
    assert pipeline_env.query("select event_date, count(*) from raw.events group by 1") == [
        (DAY, 40)
    ]
    [(source_url,)] = pipeline_env.query("select source_url from raw.load_log")
    assert source_url.startswith(f"{api.url}/events?")
    [eml] = pipeline_env.emails()
    assert "40 events" in eml.read_text()
    assert api.requests("POST", "/login", 200) == 1 == len(api.tokens())
    assert api.requests("GET", "/events", 200) == 1
    [load] = [ti for ti in run.get_task_instances() if ti.task_id == "load_raw_events"]
    assert load.xcom_pull(task_ids="load_raw_events") == [
        {"event_date": DAY.isoformat(), "rows": 40}
    ]
    captured = capfd.readouterr()
    texts = [caplog.text, captured.out, captured.err, task_log_text()]
    texts.append(warehouse_text(pipeline_env.warehouse))
    assert_absent([*api.tokens(), api.password], texts, [metadata_bytes()])


def test_wrong_credentials_fail_the_run_at_once_without_retries_and_write_nothing(
    pipeline_env: PipelineEnv, login_api, monkeypatch: pytest.MonkeyPatch, caplog, capfd
):
    api = login_api()
    wrong = api.password + "-wrong"
    connect_events_api(monkeypatch, api, password=wrong)
    dag = load_dag(retries=2)  # the DAG's own retries: refused credentials must not use them
    for task in dag.tasks:
        task.retry_delay = timedelta(seconds=1)

    run = dag.test(logical_date=midnight(DAY))

    states = task_states(run)
    assert str(run.state) == "failed"
    assert states["load_raw_events"] == "failed", states
    assert states["send_stats"] == "upstream_failed", states
    assert api.requests("POST", "/login", 401) == 1  # one login attempt in all: no retry
    assert api.requests("POST", "/login", 200) == api.requests("GET", "/events") == 0
    assert pipeline_env.loads() == [] and pipeline_env.emails() == []
    [alert] = pipeline_env.alerts()
    body = alert.get_body().get_content()
    assert f"refused the login of user 'loader' at {api.url}/login" in body
    captured = capfd.readouterr()
    texts = [caplog.text, captured.out, captured.err, task_log_text(), body]
    texts.append(warehouse_text(pipeline_env.warehouse))
    assert_absent([wrong, api.password], texts, [metadata_bytes()])


def test_under_the_scheduler_the_task_logs_and_metadata_hold_no_token_or_password(
    pipeline_env: PipelineEnv, login_api, start_airflow, monkeypatch: pytest.MonkeyPatch
):
    api = login_api(events_per_day=30)
    connect_events_api(monkeypatch, api)
    services = start_airflow()  # the task runs in its own process and logs to AIRFLOW_HOME/logs
    services.wait_until_parsed()
    services.unpause()
    day = DAY.isoformat()
    created = airflow_cli(
        "backfill", "create", "--dag-id", "event_stats", "--from-date", day, "--to-date", day
    )
    assert created.returncode == 0, created.stdout + created.stderr

    [run] = services.wait_for_finished_runs(1, 420, run_type="backfill")

    assert str(run.state) == "success", services.log_tail()
    assert pipeline_env.query("select count(*) from raw.events") == [(30,)]
    assert api.requests("POST", "/login", 200) == 1 == len(api.tokens())
    logs = task_log_text()
    assert "Logged in to the events API as 'loader'" in logs  # the load task's log is here
    services_logs = "\n".join(p.read_text(errors="replace") for p in services.logs.glob("*.log"))
    texts = [logs, services_logs, warehouse_text(pipeline_env.warehouse)]
    assert_absent([*api.tokens(), api.password], texts, [metadata_bytes()])
