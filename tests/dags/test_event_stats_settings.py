"""The event_stats DAG keeps its declared shape: schedule, date rule, task order, the pool."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest
from airflow.dag_processing.dagbag import DagBag
from dag_fixtures import airflow_db_fixture, load_dag  # noqa: F401 (the airflow_db fixture)

from event_pipeline import settings
from event_pipeline.airflow_support import run_day


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
    assert dag.start_date == datetime(2026, 1, 1, tzinfo=UTC)
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


def test_dbt_gets_the_run_date_as_vars(dag):
    [model] = [t for t in dag.tasks if t.task_id.startswith("dbt.event_stats")]
    assert model.vars == {
        "start_date": "{{ run_day(dag_run) }}",
        "end_date": "{{ run_day(dag_run, 1) }}",
    }
    assert dag.user_defined_macros["run_day"] is run_day


def _run(logical_date, interval_start=None):
    return SimpleNamespace(
        run_id="r", logical_date=logical_date, data_interval_start=interval_start
    )


def test_run_day_is_the_logical_date_or_else_the_data_interval_start():
    day = datetime(2026, 1, 5, tzinfo=UTC)
    assert run_day(_run(day, day - timedelta(days=1))) == "2026-01-05"  # `airflow dags test D`
    assert run_day(_run(day, day), 1) == "2026-01-06"
    assert run_day(_run(None, day)) == "2026-01-05"  # a manual run without a logical date
    # Converted to UTC before taking the date.
    east = timezone(timedelta(hours=5))
    assert run_day(_run(datetime(2026, 1, 6, 2, tzinfo=east))) == "2026-01-05"
    with pytest.raises(ValueError, match="neither a logical date nor a data interval"):
        run_day(_run(None, None))


def test_a_broken_dag_file_is_reported_as_an_import_error(tmp_path: Path):
    broken = tmp_path / "broken_dag.py"
    broken.write_text("from airflow.sdk import dag\nraise RuntimeError('broken on purpose')\n")
    bag = DagBag(dag_folder=str(tmp_path))
    assert list(bag.import_errors) == [str(broken)]
    assert "broken on purpose" in bag.import_errors[str(broken)]
