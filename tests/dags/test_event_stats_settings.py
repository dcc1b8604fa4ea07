"""The event_stats DAG keeps its declared shape: schedule, date rule, params, task order, the pool,
failure notifications and the deadline alert."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from airflow.dag_processing.dagbag import DagBag
from dag_fixtures import load_dag

from event_pipeline import alerts, settings
from event_pipeline.airflow_support import run_day
from event_pipeline.run_window import run_window


@pytest.fixture(scope="module")
def dag(airflow_db: None):
    return load_dag(retries=2)


def test_daily_at_midnight_utc_with_a_day_long_data_interval(dag):
    from airflow.timetables.interval import CronDataIntervalTimetable

    assert isinstance(dag.timetable, CronDataIntervalTimetable)
    assert dag.timetable.summary == "0 0 * * *"
    interval = dag.timetable.infer_manual_data_interval(run_after=datetime(2026, 1, 6, tzinfo=UTC))
    assert (interval.start, interval.end) == (
        datetime(2026, 1, 5, tzinfo=UTC),
        datetime(2026, 1, 6, tzinfo=UTC),
    )
    # No date a run can name is before the start_date (Airflow would create no task for it).
    assert dag.start_date == datetime(1970, 1, 1, tzinfo=UTC)
    assert dag.catchup is False  # the start_date schedules nothing in the past
    assert dag.max_active_runs >= 2


def test_load_then_dbt_then_email_every_task_in_the_warehouse_pool(dag):
    tasks = dag.task_dict
    dbt_tasks = {task_id for task_id in tasks if task_id.startswith("dbt.")}
    assert dbt_tasks, "the Cosmos task group rendered no tasks"
    assert tasks["load_raw_events"].downstream_task_ids <= dbt_tasks
    # send_stats runs only after every dbt task (and so every dbt test) succeeded.
    assert dbt_tasks <= tasks["send_stats"].get_flat_relative_ids(upstream=True)
    assert tasks["send_stats"].trigger_rule == "all_success"
    assert {task.pool for task in dag.tasks} == {settings.WAREHOUSE_POOL}
    assert all(task.retries >= 1 for task in dag.tasks)


def test_dbt_gets_the_run_window_as_vars(dag):
    [model] = [t for t in dag.tasks if t.task_id.startswith("dbt.event_stats")]
    assert model.vars == {
        "start_date": "{{ run_window(dag_run, params).start }}",
        "end_date": "{{ run_window(dag_run, params).end }}",
        "audit_key": "{{ run_id }}",
    }
    assert dag.user_defined_macros["run_window"] is run_window
    assert dag.user_defined_macros["run_day"] is run_day


def test_start_date_and_end_date_are_optional_date_params(dag):
    params = dag.params.dump()
    assert params == {"start_date": None, "end_date": None}
    for name in params:
        schema = dag.params.get_param(name).schema
        assert schema["type"] == ["null", "string"] and schema["format"] == "date"


def test_run_day_is_the_first_day_of_the_run_window():
    day = datetime(2026, 1, 5, tzinfo=UTC)
    run = SimpleNamespace(run_id="r", logical_date=day, run_after=day + timedelta(days=1), conf={})
    assert run_day(run) == "2026-01-05"
    assert run_day(run, 1) == "2026-01-06"
    assert run_day(run, 0, {"start_date": "2026-01-02", "end_date": "2026-01-04"}) == "2026-01-02"


def test_every_task_notifies_its_failure_and_the_day_has_a_deadline(dag):
    from airflow.sdk.definitions.callback import AsyncCallback
    from airflow.sdk.definitions.deadline import DagRunLogicalDateDeadline

    assert all(task.on_failure_callback == [alerts.notify_failure] for task in dag.tasks)
    [deadline] = dag.deadline
    # Due EVENT_STATS_DEADLINE (default 06:00) after the processed day ends.
    assert isinstance(deadline.reference, DagRunLogicalDateDeadline)
    assert deadline.interval == timedelta(days=1, hours=6)
    assert deadline.callback == AsyncCallback(alerts.deadline_missed)


def test_a_broken_dag_file_is_reported_as_an_import_error(tmp_path: Path):
    broken = tmp_path / "broken_dag.py"
    broken.write_text("from airflow.sdk import dag\nraise RuntimeError('broken on purpose')\n")
    bag = DagBag(dag_folder=str(tmp_path))
    assert list(bag.import_errors) == [str(broken)]
    assert "broken on purpose" in bag.import_errors[str(broken)]


def test_refusals_a_retry_would_meet_again_fail_the_task_without_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from airflow.sdk.exceptions import AirflowFailException

    from event_pipeline.airflow_support import load_events, send_emails

    monkeypatch.setenv("WAREHOUSE_PATH", str(tmp_path / "warehouse.duckdb"))
    monkeypatch.setenv("EMAIL_OUTBOX_DIR", str(tmp_path / "outbox"))
    now = datetime.now(UTC)
    today = SimpleNamespace(
        run_id="today",
        logical_date=now.replace(hour=0, minute=0, second=0, microsecond=0),
        run_after=now,
        conf={},
    )
    for task in (load_events, send_emails):
        with pytest.raises(AirflowFailException, match="is not complete"):
            task(today)
    # A date whose stats were never built (an empty warehouse), and an invalid recipient.
    past = SimpleNamespace(
        run_id="past", logical_date=datetime(2026, 1, 5, tzinfo=UTC), run_after=now, conf={}
    )
    with pytest.raises(AirflowFailException, match="2026-01-05"):
        send_emails(past)
    monkeypatch.setenv("EMAIL_TO", "not-an-address")
    with pytest.raises(AirflowFailException, match="not-an-address"):
        send_emails(past)
    assert not (tmp_path / "outbox").exists()
