"""event_stats: each day's events, loaded into DuckDB, counted per user by dbt, then emailed.

load_raw_events >> dbt (Cosmos task group: one `dbt build` task per node, the model then its
tests) >> send_stats

- The processed date D is the run's logical date (airflow_support.run_day): a scheduled run
  covers the day that just ended (CronDataIntervalTimetable: logical date = start of the day),
  `airflow dags test event_stats D` and `airflow backfill create` process D, and a rerun of a run
  processes the same D again; a manual run without a logical date processes its data interval
  start (the last complete day). dbt gets vars start_date=D and end_date=D+1.
- Every task is atomic and idempotent: the load replaces partition D in one transaction, dbt
  replaces D's stats in one transaction, and the email is sent once per (date, recipient,
  content) through the ledger ops.email_log.
- dbt tests are the quality gate: when one fails, send_stats does not run. send_stats only reads
  the stats, so it can be retried alone without touching them.
- The dbt task group is rendered from a manifest.json (dbt_config.dbt_manifest) that `dbt parse`
  remakes only when a file of dbt_project/ changed: importing this file runs no dbt otherwise,
  opens no warehouse and needs no Airflow metadata database.
- Every task opens the DuckDB file, which allows one writer: all tasks run in the 1-slot pool
  settings.WAREHOUSE_POOL (default_args), created by airflow_support.ensure_airflow, which
  `event-stats run` and `event-stats airflow ...` call first.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from airflow.sdk import dag, task
from airflow.timetables.interval import CronDataIntervalTimetable
from cosmos import DbtTaskGroup

from event_pipeline import dbt_config, settings
from event_pipeline.airflow_support import run_date, run_day

DBT_VARS = {
    "start_date": "{{ run_day(dag_run) }}",
    "end_date": "{{ run_day(dag_run, 1) }}",
}


@dag(
    dag_id="event_stats",
    schedule=CronDataIntervalTimetable("0 0 * * *", timezone="UTC"),
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,  # past days run through `airflow backfill create` (or `event-stats run`)
    max_active_runs=3,
    default_args={
        "owner": "event-stats",
        "retries": 2,
        "retry_delay": timedelta(minutes=1),
        "pool": settings.WAREHOUSE_POOL,  # every task of this DAG opens the DuckDB file
    },
    user_defined_macros={"run_day": run_day},
    tags=["event-stats", "duckdb", "dbt"],
    doc_md=__doc__,
)
def event_stats() -> None:
    @task
    def load_raw_events(dag_run=None) -> dict:
        """Replace raw.events partition D with the events API's answer for D."""
        from event_pipeline import loader

        [result] = loader.load_range(run_date(dag_run), run_id=dag_run.run_id)
        return {"event_date": result.event_date.isoformat(), "rows": result.rows}

    dbt = DbtTaskGroup(
        group_id="dbt",
        project_config=dbt_config.project_config(),
        profile_config=dbt_config.profile_config(),
        execution_config=dbt_config.execution_config(),  # in-process dbt, "buildable" tests
        render_config=dbt_config.render_config(),  # one `dbt build` task per node, from a manifest
        operator_args={"vars": DBT_VARS},
    )

    @task
    def send_stats(dag_run=None) -> list[dict]:
        """Email D's stats once; by SMTP when the Airflow connection exists, else to the outbox."""
        from event_pipeline import report
        from event_pipeline.airflow_support import smtp_settings

        results = report.send_stats(run_date(dag_run), smtp=smtp_settings())
        return [{"recipient": r.recipient, "status": r.status} for r in results]

    load_raw_events() >> dbt >> send_stats()


event_stats()
