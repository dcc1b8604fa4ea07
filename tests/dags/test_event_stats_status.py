"""The event_stats_status DAG: it logs the status report; its run fails when there are problems."""

from __future__ import annotations

import logging
from datetime import date, timedelta
from pathlib import Path

import pytest
from dag_fixtures import midnight, task_states
from status_pipeline import StatusPipeline, start_pipeline

from event_pipeline import settings

pytestmark = pytest.mark.e2e

DAG_FILE = settings.REPO_ROOT / "dags" / "event_stats_status.py"
DAY = date(2026, 3, 1)


def load_status_dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAG_FILE))
    assert bag.import_errors == {}, bag.import_errors
    return bag.dags["event_stats_status"]


@pytest.fixture
def pipeline(tmp_path: Path, events_api, monkeypatch: pytest.MonkeyPatch) -> StatusPipeline:
    """DAY loaded, built and emailed; the day after it not loaded."""
    pipeline = start_pipeline(tmp_path, events_api, monkeypatch)
    pipeline.write_events(DAY, {"u1": 3, "u2": 1})
    pipeline.load(DAY)
    pipeline.build(DAY, DAY + timedelta(days=1))
    pipeline.send(DAY)
    return pipeline


def test_the_dag_reads_like_its_configuration():
    dag = load_status_dag()

    assert dag.task_ids == ["report_status"]
    assert dag.get_task("report_status").pool == settings.WAREHOUSE_POOL
    assert dag.timetable.summary == "0 6 * * *"


def test_a_run_logs_the_report_and_fails_when_a_date_has_a_problem(
    airflow_db: None, pipeline: StatusPipeline, caplog: pytest.LogCaptureFixture
):
    dag = load_status_dag()
    dag.get_task("report_status").retry_delay = timedelta(seconds=1)  # retries kept

    with caplog.at_level(logging.INFO):
        well = dag.test(logical_date=midnight(DAY))
    problem = dag.test(logical_date=midnight(DAY + timedelta(days=1)))  # that day: not loaded

    assert str(well.state) == "success", task_states(well)
    assert "All well: 1 date(s) loaded, built and emailed." in caplog.text
    assert str(problem.state) == "failed", task_states(problem)
    [check] = problem.get_task_instances()
    assert (str(check.state), check.try_number) == ("failed", 1)  # problems are not retried
    # The failure is emailed (a day the scheduler never ran is noticed by someone).
    [alert] = (pipeline.outbox / "alerts").glob("*.eml")
    text = alert.read_text()
    assert "event_stats_status" in text and "report_status" in text
    assert str(DAY + timedelta(days=1)) in text
