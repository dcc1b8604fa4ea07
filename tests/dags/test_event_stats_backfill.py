"""A multi-day backfill with several active runs under the real scheduler (LocalExecutor, SQLite).

Every task opens the DuckDB file, which allows one writer: the 1-slot pool serializes them, so
concurrent runs never fail on the file lock. `dag.test` ignores pools, hence a real scheduler.
The days straddle 2026-01-01, the DAG's start_date until it moved to 1970-01-01: a backfill of
days before the start_date processes them too.
"""

from __future__ import annotations

from datetime import date, timedelta

import pytest
from dag_fixtures import (  # noqa: F401 (the *_fixture names are fixtures)
    AirflowServices,
    PipelineEnv,
    airflow_cli,
    airflow_db_fixture,
    airflow_services_fixture,
    pipeline_env_fixture,
    start_airflow_fixture,
)

pytestmark = pytest.mark.e2e

FIRST_DAY = date(2025, 12, 30)
DAYS = 3


def test_a_backfill_with_concurrent_runs_succeeds_for_every_day(
    pipeline_env: PipelineEnv, airflow_services: AirflowServices
):
    from airflow.models.taskinstance import TaskInstance
    from sqlalchemy import select

    from event_pipeline import settings

    airflow_services.wait_until_parsed()
    airflow_services.unpause()
    last_day = FIRST_DAY + timedelta(days=DAYS - 1)
    created = airflow_cli(
        "backfill", "create", "--dag-id", "event_stats", "--from-date", FIRST_DAY.isoformat(),
        "--to-date", last_day.isoformat(), "--max-active-runs", str(DAYS),
    )  # fmt: skip
    assert created.returncode == 0, created.stdout + created.stderr

    finished = airflow_services.wait_for_finished_runs(DAYS, 900, run_type="backfill")

    assert {str(r.state) for r in finished} == {"success"}, airflow_services.log_tail()
    assert sorted(r.logical_date.date() for r in finished) == [
        FIRST_DAY + timedelta(days=i) for i in range(DAYS)
    ]
    # Each run loaded its own day (days before the old start_date too).
    assert sorted(pipeline_env.loads()) == sorted(
        (r.run_id, r.logical_date.date()) for r in finished
    )
    # Several runs were active at the same time ...
    spans = [(r.start_date, r.end_date) for r in finished]
    assert any(a[0] < b[1] and b[0] < a[1] for a in spans for b in spans if a is not b), spans
    with airflow_services.session() as session:
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
