"""Fixtures and helpers for running the event_stats DAG (test modules import them).

The session's Airflow database, a pipeline environment (temp warehouse and outbox, the real
events API), parsing the DAG, and a copy of the dbt project that a test may change.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

import duckdb
import pytest

from event_pipeline import settings

DAG_FILE = settings.REPO_ROOT / "dags" / "event_stats.py"


@pytest.fixture(name="airflow_db", scope="session")
def airflow_db_fixture() -> None:
    """The session's metadata database (temp AIRFLOW_HOME, see tests/conftest.py) and pool."""
    from event_pipeline import airflow_support

    airflow_support.ensure_airflow()


@dataclass
class PipelineEnv:
    warehouse: Path
    outbox: Path
    api_url: str
    tmp: Path

    def emails(self) -> list[Path]:
        return sorted(self.outbox.glob("*.eml")) if self.outbox.exists() else []

    def query(self, sql: str, params: list | None = None) -> list[tuple]:
        with duckdb.connect(str(self.warehouse), read_only=True) as connection:
            return connection.execute(sql, params or []).fetchall()

    def tables(self) -> dict[str, list[tuple]]:
        """The content of the tables a rerun must leave identical."""
        return {
            "raw.events": self.query("select * from raw.events order by event_id"),
            "analytics.event_stats": self.query(
                "select * from analytics.event_stats order by event_date, user_id"
            ),
            "ops.email_log": self.query(
                "select event_date, recipient, revision, content_hash, message_id "
                "from ops.email_log order by all"
            ),
        }


@pytest.fixture(name="pipeline_env")
def pipeline_env_fixture(
    airflow_db: None, events_api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> PipelineEnv:
    """Settings for one DAG run: a temp DuckDB file and outbox, the real events API."""
    env = PipelineEnv(
        warehouse=tmp_path / "warehouse.duckdb",
        outbox=tmp_path / "outbox",
        api_url=events_api(),
        tmp=tmp_path,
    )
    monkeypatch.setenv("WAREHOUSE_PATH", str(env.warehouse))
    monkeypatch.setenv("EMAIL_OUTBOX_DIR", str(env.outbox))
    monkeypatch.setenv("EVENTS_API_URL", env.api_url)
    monkeypatch.setenv("EMAIL_TO", "team@example.com")
    return env


def load_dag(retries: int = 0):
    """Parse dags/event_stats.py now (settings such as WAREHOUSE_PATH are read at parse).

    retries=0 makes a failing task fail at once instead of waiting for its retry delay.
    """
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAG_FILE))
    assert bag.import_errors == {}, bag.import_errors
    dag = bag.get_dag("event_stats")
    for task in dag.tasks:
        task.retries = retries
    return dag


def midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def task_states(dag_run) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}


@pytest.fixture(name="dbt_project_copy")
def dbt_project_copy_fixture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A copy of dbt_project/ (seeds resolved) used through DBT_PROJECT_DIR, to change safely."""
    copy = tmp_path / "dbt_project"
    shutil.copytree(
        settings.REPO_ROOT / "dbt_project",
        copy,
        symlinks=False,
        ignore=shutil.ignore_patterns("target", "logs", "dbt_packages"),
    )
    monkeypatch.setenv("DBT_PROJECT_DIR", str(copy))
    yield copy
