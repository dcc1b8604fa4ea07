"""A multi-day backfill with several active runs under the real scheduler (LocalExecutor, SQLite).

Every task opens the DuckDB file, which allows one writer: the 1-slot pool serializes them, so
concurrent runs never fail on the file lock. `dag.test` ignores pools, hence a real scheduler.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path

import pytest
from dag_fixtures import (  # noqa: F401 (the *_fixture names are fixtures)
    PipelineEnv,
    airflow_db_fixture,
    midnight,
    pipeline_env_fixture,
)
from smtp_fixtures import free_port

pytestmark = pytest.mark.e2e

FIRST_DAY = date(2026, 1, 10)
DAYS = 3
FINISHED = {"success", "failed"}


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


@pytest.fixture
def airflow_services(pipeline_env: PipelineEnv, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """dag-processor, scheduler and the execution API server, stopped by PID at the end."""
    port = free_port()
    monkeypatch.setenv("AIRFLOW__API_AUTH__JWT_SECRET", secrets.token_hex(16))
    monkeypatch.setenv(
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL", f"http://127.0.0.1:{port}/execution/"
    )
    monkeypatch.setenv("AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE", "False")  # only the backfill runs
    monkeypatch.setenv("AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL", "600")  # parse once
    airflow = str(Path(sys.executable).parent / "airflow")
    commands = {
        "api-server": [
            airflow,
            "api-server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--apps",
            "execution",
        ],
        "dag-processor": [airflow, "dag-processor"],
        "scheduler": [airflow, "scheduler"],
    }
    logs = pipeline_env.tmp / "airflow-logs"
    logs.mkdir()
    started = []
    try:
        for name, argv in commands.items():
            with (logs / f"{name}.log").open("wb") as log:
                started.append(
                    subprocess.Popen(
                        argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                    )
                )
        yield logs
    finally:
        for process in started:
            _stop_group(process)


def _wait_for(condition, what: str, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(1)
    raise TimeoutError(f"{what} did not happen within {timeout:.0f} s")


def test_a_backfill_with_concurrent_runs_succeeds_for_every_day(
    pipeline_env: PipelineEnv, airflow_services: Path
):
    from airflow.models.backfill import _create_backfill
    from airflow.models.dag import DagModel
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select, update

    from event_pipeline import settings

    def dag_parsed() -> bool:
        with create_session() as session:
            model = session.get(DagModel, "event_stats")
            return model is not None and model.bundle_name is not None

    _wait_for(dag_parsed, "the dag-processor parsing dags/event_stats.py", 180)
    with create_session() as session:
        session.execute(
            update(DagModel).where(DagModel.dag_id == "event_stats").values(is_paused=False)
        )
    last_day = FIRST_DAY + timedelta(days=DAYS - 1)
    _create_backfill(
        dag_id="event_stats",
        from_date=midnight(FIRST_DAY),
        to_date=midnight(last_day),
        max_active_runs=DAYS,
        reverse=False,
        dag_run_conf=None,
        triggering_user_name="pytest",
    )

    def runs() -> list[DagRun]:
        with create_session() as session:
            found = session.scalars(
                select(DagRun).where(DagRun.dag_id == "event_stats", DagRun.run_type == "backfill")
            ).all()
            session.expunge_all()
            return found

    def all_finished():
        found = runs()
        return len(found) == DAYS and all(str(r.state) in FINISHED for r in found) and found

    finished = _wait_for(all_finished, f"{DAYS} backfill runs finishing", 420)

    logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in airflow_services.glob("*.log"))
    assert {str(r.state) for r in finished} == {"success"}, logs
    assert sorted(r.logical_date.date() for r in finished) == [
        FIRST_DAY + timedelta(days=i) for i in range(DAYS)
    ]
    # Several runs were active at the same time ...
    spans = [(r.start_date, r.end_date) for r in finished]
    assert any(a[0] < b[1] and b[0] < a[1] for a in spans for b in spans if a is not b), spans
    with create_session() as session:
        tis = session.scalars(
            select(TaskInstance).where(
                TaskInstance.dag_id == "event_stats",
                TaskInstance.run_id.in_([r.run_id for r in finished]),
            )
        ).all()
        rows = [(ti.task_id, ti.pool, ti.try_number, ti.start_date, ti.end_date) for ti in tis]
    # ... but their tasks ran one at a time, in the pool, each succeeding at the first try.
    assert {pool for _, pool, *_ in rows} == {settings.WAREHOUSE_POOL}
    assert {tries for _, _, tries, *_ in rows} == {1}, rows
    ordered = sorted(rows, key=lambda row: row[3])
    assert all(a[4] <= b[3] for a, b in zip(ordered, ordered[1:], strict=False)), ordered

    per_day = pipeline_env.query(
        "select event_date, count(*), sum(event_count) from analytics.event_stats "
        "group by 1 order by 1"
    )
    raw = pipeline_env.query("select event_date, count(*) from raw.events group by 1 order by 1")
    assert [(d, n) for d, _, n in per_day] == raw and len(raw) == DAYS
    assert len(pipeline_env.emails()) == DAYS
