"""A backfill of 14 days with 3 active runs under the real scheduler (LocalExecutor, SQLite).

On the DuckLake, the warehouse pool has 3 slots: tasks of different runs write at once, and a
transaction that loses a commit race runs again (the load and the email themselves, a dbt task
by its retries). The tables must be those of the same dates processed serially. `dag.test`
ignores pools, hence a real scheduler. The days straddle 2026-01-01, the DAG's start_date until
it moved to 1970-01-01: a backfill of days before the start_date processes them too.
"""

from __future__ import annotations

import time
from datetime import date, timedelta

import pytest
from dag_fixtures import AirflowServices, PipelineEnv, airflow_cli

from event_pipeline import warehouse

pytestmark = pytest.mark.e2e

FIRST_DAY = date(2025, 12, 25)
DAYS = 14
ACTIVE_RUNS = 3


def tables(path) -> dict[str, list[tuple]]:
    """What a backfill must leave, whatever the order of its runs (ledgers' ids and times aside)."""
    queries = {
        "raw.events": "select * exclude (load_id) from raw.events order by event_id",
        "analytics.event_stats": "select * from analytics.event_stats order by all",
        "ops.email_log": "select event_date, recipient, revision, content_hash, message_id, "
        "total_events, users, status from ops.email_log order by all",
    }
    with warehouse.connect(path, read_only=True) as connection:
        return {name: connection.execute(sql).fetchall() for name, sql in queries.items()}


def serial_run(pipeline_env: PipelineEnv) -> tuple[dict[str, list[tuple]], float]:
    """The same dates processed serially in this process, into a warehouse of their own: one
    load, one dbt build, then each date's email. Returns its tables and its seconds."""
    from event_pipeline import dbt_config, loader, report

    path = pipeline_env.tmp / "serial"
    end = FIRST_DAY + timedelta(days=DAYS)
    started = time.monotonic()
    loader.load_range(FIRST_DAY, end, api_url=pipeline_env.api_url, warehouse_path=path)
    dbt_config.run_dbt(
        ["build", "--quiet", "--target-path", str(pipeline_env.tmp / "serial-target")],
        dbt_vars=dbt_config.date_vars(FIRST_DAY, end),
        warehouse_path=path,
    )
    for offset in range(DAYS):
        report.send_stats(
            FIRST_DAY + timedelta(days=offset),
            warehouse_path=path,
            outbox_dir=pipeline_env.tmp / "serial-outbox",
        )
    return tables(path), time.monotonic() - started


def test_a_backfill_with_concurrent_runs_gives_the_tables_of_a_serial_run(
    pipeline_env: PipelineEnv, airflow_services: AirflowServices
):
    from airflow.models.taskinstance import TaskInstance
    from sqlalchemy import select

    from event_pipeline import settings

    airflow_services.wait_until_parsed()
    airflow_services.unpause()
    last_day = FIRST_DAY + timedelta(days=DAYS - 1)
    started = time.monotonic()
    created = airflow_cli(
        "backfill", "create", "--dag-id", "event_stats", "--from-date", FIRST_DAY.isoformat(),
        "--to-date", last_day.isoformat(), "--max-active-runs", str(ACTIVE_RUNS),
    )  # fmt: skip
    assert created.returncode == 0, created.stdout + created.stderr

    finished = airflow_services.wait_for_finished_runs(DAYS, 3600, run_type="backfill")
    backfill_seconds = time.monotonic() - started

    assert {str(r.state) for r in finished} == {"success"}, airflow_services.log_tail()
    assert sorted(r.logical_date.date() for r in finished) == [
        FIRST_DAY + timedelta(days=i) for i in range(DAYS)
    ]
    # Each run loaded its own day (days before the old start_date too).
    assert sorted(pipeline_env.loads()) == sorted(
        (r.run_id, r.logical_date.date()) for r in finished
    )
    with airflow_services.session() as session:
        tis = session.scalars(
            select(TaskInstance).where(
                TaskInstance.dag_id == "event_stats",
                TaskInstance.run_id.in_([r.run_id for r in finished]),
            )
        ).all()
        rows = [(ti.task_id, ti.pool, ti.try_number, ti.start_date, ti.end_date) for ti in tis]
    # Tasks ran in the pool, up to its 3 slots at once, and some did run at the same time.
    assert {pool for _, pool, *_ in rows} == {settings.WAREHOUSE_POOL}
    moments = sorted([(row[3], 1) for row in rows] + [(row[4], -1) for row in rows])
    running, most = 0, 0
    for _, change in sorted(moments, key=lambda moment: (moment[0], moment[1])):
        running += change
        most = max(most, running)
    assert 1 < most <= settings.warehouse_pool_slots() == 3, most
    retried = sorted(task for task, _, tries, *_ in rows if tries > 1)

    serial, serial_seconds = serial_run(pipeline_env)
    print(
        f"backfill of {DAYS} days, {ACTIVE_RUNS} active runs, pool of 3: {backfill_seconds:.0f} s "
        f"(at most {most} tasks at once; tasks retried: {retried or 'none'}); the same dates "
        f"serially in one process: {serial_seconds:.0f} s"
    )
    assert tables(pipeline_env.warehouse) == serial
    assert len(serial["ops.email_log"]) == DAYS
    assert len(pipeline_env.emails()) == DAYS
