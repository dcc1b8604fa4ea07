"""event_stats_docs: the dbt docs and lineage of event_stats, served inside Airflow's UI.

One task, generate_dbt_docs, runs `dbt docs generate` (event_pipeline.dbt_docs) into
DBT_DOCS_DIR, which Cosmos' plugin serves at /cosmos/event_stats/dbt_docs_index.html (Browse >
dbt docs (event_stats) in the UI). The docs show every model, column and test, the exposure
daily_stats_email, and the lineage raw.events -> stg_events__events -> int_event_stats__audit ->
event_stats -> the email.

- Daily at 01:00 UTC, after event_stats' run of the day, so the catalog's row counts are recent;
  trigger it after changing the dbt project. Each run replaces the docs whole (a new folder
  swapped in by one rename): the UI shows the old docs or the new, never half.
- The catalog reads the warehouse, so the task runs in the warehouse's pool (on a DuckDB file,
  whose one slot makes it wait for the writers).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from airflow.sdk import dag, task
from airflow.timetables.trigger import CronTriggerTimetable

from event_pipeline import settings


@dag(
    dag_id="event_stats_docs",
    schedule=CronTriggerTimetable("0 1 * * *", timezone="UTC"),
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,  # the latest docs are the only ones worth having
    max_active_runs=1,
    default_args={
        "owner": "event-stats",
        "retries": 2,  # a warehouse locked for too long
        "retry_delay": timedelta(minutes=5),
        "pool": settings.WAREHOUSE_POOL,
    },
    tags=["event-stats", "dbt", "docs"],
    doc_md=__doc__,
)
def event_stats_docs() -> None:
    @task
    def generate_dbt_docs() -> str:
        """Generate the dbt docs into DBT_DOCS_DIR; returns where they are."""
        from event_pipeline import dbt_docs

        return str(dbt_docs.generate_docs())

    generate_dbt_docs()


event_stats_docs()
