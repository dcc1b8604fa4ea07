"""event_stats_housekeeping: keep a DuckLake warehouse small after months of daily runs.

One task, housekeep, runs event_pipeline.warehouse.maintenance.housekeep every Sunday at 03:00
UTC: it merges small Parquet files, expires the snapshots older than
$WAREHOUSE_SNAPSHOT_RETENTION_DAYS (time travel reaches back that far), deletes the files only
they used, and the orphaned files of killed writers older than a day. Its log gives the file
count, snapshots and catalog size before and after. On a DuckDB file there is nothing to do: the
task says so and succeeds.

- Each step is its own DuckLake transaction: a concurrent daily run keeps working (a conflict
  fails one of the two commits, which its retry repeats), and a killed run is finished by the
  next one.
- It runs in the warehouse pool, like every task that opens the warehouse.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from airflow.sdk import dag, task
from airflow.timetables.interval import CronDataIntervalTimetable

from event_pipeline import settings


@dag(
    dag_id="event_stats_housekeeping",
    schedule=CronDataIntervalTimetable("0 3 * * 0", timezone="UTC"),
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,  # each run does all the work there is: older runs add nothing
    max_active_runs=1,
    default_args={
        "owner": "event-stats",
        "retries": 2,  # a commit that met a concurrent writer's
        "retry_delay": timedelta(minutes=5),
        "pool": settings.WAREHOUSE_POOL,
    },
    tags=["event-stats", "ducklake", "housekeeping"],
    doc_md=__doc__,
)
def event_stats_housekeeping() -> None:
    @task
    def housekeep() -> dict:
        """Compact, expire old snapshots, delete unreferenced files; log the sizes."""
        from event_pipeline.warehouse import lake, maintenance

        if not lake.is_lake(settings.warehouse_path()):
            print(f"{settings.warehouse_path()} is a DuckDB file: no housekeeping to do")
            return {}
        before, after = maintenance.housekeep()
        print(f"before: {before.describe()}\nafter:  {after.describe()}")
        return {"before": before.__dict__, "after": after.__dict__}

    housekeep()


event_stats_housekeeping()
