"""Fixtures and helpers for running the event_stats DAG (test modules import them).

The session's Airflow database, a pipeline environment (temp warehouse and outbox, the real
events API), parsing the DAG, a copy of the dbt project that a test may change, and Airflow's
services (scheduler, dag-processor, api-server) really running, stopped by PID.
"""

from __future__ import annotations

import email
import email.policy
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import duckdb
import httpx
import pytest
from cryptography.fernet import Fernet
from servers import free_port
from sqlalchemy import create_engine, select, update
from sqlalchemy.orm import Session

from event_pipeline import settings, warehouse

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
        """The stats emails in the outbox (alerts have their own folder, see alerts())."""
        return sorted(self.outbox.glob("*.eml")) if self.outbox.exists() else []

    def alerts(self) -> list[EmailMessage]:
        """Failure notifications and deadline alerts written to the outbox's alerts/ folder."""
        folder = self.outbox / "alerts"
        files = sorted(folder.glob("*.eml")) if folder.exists() else []
        return [
            email.message_from_bytes(f.read_bytes(), policy=email.policy.default) for f in files
        ]

    def loads(self) -> list[tuple[str, date]]:
        """(run_id, event_date) of every load in raw.load_log, in load order."""
        if not self.warehouse.exists():
            return []
        try:
            return [
                (run_id, day)
                for run_id, day in self.query(
                    "select run_id, event_date from raw.load_log order by loaded_at, event_date"
                )
            ]
        except duckdb.CatalogException:
            return []

    def query(self, sql: str, params: list | None = None) -> list[tuple]:
        with warehouse.connect(self.warehouse, read_only=True) as connection:
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
    """Settings for one DAG run: a temp warehouse (a DuckLake) and outbox, the real events API."""
    env = PipelineEnv(
        warehouse=tmp_path / "warehouse",
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


def wait_for(
    condition: Callable[[], Any],
    what: str,
    timeout: float,
    every: float = 1.0,
    explain: Callable[[], str] | None = None,
) -> Any:
    """Poll `condition` until it returns something truthy (returned); TimeoutError after, with
    `explain()` (e.g. the services' logs) in its message."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(every)
    details = f"\n{explain()}" if explain else ""
    raise TimeoutError(f"{what} did not happen within {timeout:.0f} s{details}")


def _stop_group(process: subprocess.Popen) -> None:
    """Stop a process we started and its children (its own process group), by PID."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


AIRFLOW = str(Path(sys.executable).parent / "airflow")
EVENT_STATS = str(Path(sys.executable).parent / "event-stats")


def airflow_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`event-stats airflow ARGS...`: Airflow on this project's configuration, as a user runs it."""
    return subprocess.run(
        [EVENT_STATS, "airflow", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@dataclass
class AirflowServices:
    """dag-processor, scheduler and api-server of one test, on a metadata database of its own
    (earlier tests' runs in the session's database would run into this test's warehouse, and
    their DAG versions and deadlines would be this test's too), with helpers to drive them."""

    port: int
    home: Path  # this test's AIRFLOW_HOME, holding its SQLite metadata database
    logs: Path
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def database_url(self) -> str:
        return f"sqlite:///{self.home / 'airflow.db'}"

    @contextmanager
    def session(self) -> Iterator[Session]:
        """An ORM session on this test's metadata database (committed at the end)."""
        engine = create_engine(self.database_url)
        try:
            with Session(engine, expire_on_commit=False) as session, session.begin():
                yield session
        finally:
            engine.dispose()

    def log_tail(self, chars: int = 3000) -> str:
        """The end of each service's log, and of every task and callback log."""
        files = sorted(self.logs.glob("*.log")) + sorted((self.home / "logs").rglob("*.log"))
        return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-chars:]}" for p in files)

    def wait_until_parsed(self, timeout: float = 180) -> None:
        from airflow.models.dag import DagModel

        def parsed() -> bool:
            with self.session() as session:
                model = session.get(DagModel, "event_stats")
                return model is not None and model.bundle_name is not None

        wait_for(parsed, "the dag-processor parsing dags/event_stats.py", timeout)

    def unpause(self) -> None:
        from airflow.models.dag import DagModel

        with self.session() as session:
            session.execute(
                update(DagModel).where(DagModel.dag_id == "event_stats").values(is_paused=False)
            )

    def runs(self, run_type: str | None = None) -> list:
        """Every DagRun of event_stats (detached from the session)."""
        from airflow.models.dagrun import DagRun

        query = select(DagRun).where(DagRun.dag_id == "event_stats")
        if run_type:
            query = query.where(DagRun.run_type == run_type)
        with self.session() as session:
            return list(session.scalars(query).all())

    def wait_for_finished_runs(self, count: int, timeout: float, run_type: str | None = None):
        def finished():
            found = self.runs(run_type)
            done = [r for r in found if str(r.state) in {"success", "failed"}]
            return len(found) >= count and len(done) == len(found) and found

        what = f"{count} runs of event_stats finishing"
        return wait_for(finished, what, timeout, every=2, explain=self.log_tail)

    def rest(self, method: str, path: str, **kwargs) -> httpx.Response:
        """The public REST API (auth is off for the test's api-server: all users are admins)."""
        return httpx.request(method, f"{self.api_url}/api/v2{path}", timeout=30, **kwargs)


@pytest.fixture(name="start_airflow")
def start_airflow_fixture(
    pipeline_env: PipelineEnv, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., AirflowServices]]:
    """Start Airflow's services for one test: `start_airflow(schedule=False, rest=False)`.

    schedule=False: the scheduler creates no scheduled runs (only backfills and triggers run).
    rest=True: the api-server also serves the public REST API and UI, with auth off.
    triggerer=True: also a triggerer (it runs the deadline alert's callback).
    api_only=True: the api-server alone (to read what runs made elsewhere look like).
    Environment variables set (monkeypatch) before the call reach every service, task and
    `airflow_cli` call; those go to this test's own metadata database.
    """
    started: list[subprocess.Popen] = []

    def start(
        *,
        schedule: bool = False,
        rest: bool = False,
        triggerer: bool = False,
        api_only: bool = False,
    ) -> AirflowServices:
        services = AirflowServices(
            port=free_port(),
            home=pipeline_env.tmp / "airflow-home",
            logs=pipeline_env.tmp / "airflow-logs",
        )
        services.home.mkdir()
        services.logs.mkdir()
        monkeypatch.setenv("AIRFLOW_HOME", str(services.home))
        monkeypatch.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", services.database_url)
        monkeypatch.setenv("AIRFLOW__API_AUTH__JWT_SECRET", secrets.token_hex(16))
        # One key for every service (each would otherwise make its own): the scheduler encrypts
        # what the triggerer decrypts (the deadline callback's arguments).
        monkeypatch.setenv("AIRFLOW__CORE__FERNET_KEY", Fernet.generate_key().decode())
        monkeypatch.setenv("AIRFLOW__API__PORT", str(services.port))
        monkeypatch.setenv("AIRFLOW__API__BASE_URL", services.api_url)
        monkeypatch.setenv(
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL", f"{services.api_url}/execution/"
        )
        monkeypatch.setenv("AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE", str(schedule))
        monkeypatch.setenv("AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL", "600")  # parse once
        if rest:
            monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "True")
        # The database and the warehouse pool, as `event-stats airflow` sets them up.
        setup = airflow_cli("pools", "list")
        assert setup.returncode == 0, setup.stdout + setup.stderr
        apps = "core,execution" if rest else "execution"
        commands = {
            "api-server": [
                AIRFLOW,
                "api-server",
                "--host",
                "127.0.0.1",
                "--port",
                str(services.port),
                "--workers",
                "1",
                "--apps",
                apps,
            ],
            "dag-processor": [AIRFLOW, "dag-processor"],
            "scheduler": [AIRFLOW, "scheduler"],
        }
        if triggerer:
            commands["triggerer"] = [AIRFLOW, "triggerer"]
        if api_only:
            commands = {"api-server": commands["api-server"]}
        for name, argv in commands.items():
            with (services.logs / f"{name}.log").open("wb") as log:
                process = subprocess.Popen(
                    argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            started.append(process)
            services.processes.append(process)
        return services

    try:
        yield start
    finally:
        for process in started:
            _stop_group(process)


@pytest.fixture(name="airflow_services")
def airflow_services_fixture(start_airflow) -> AirflowServices:
    """dag-processor, scheduler and the execution API server; only backfills and triggers run."""
    return start_airflow()
