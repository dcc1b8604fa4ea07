"""event_stats: each day's events, loaded into DuckDB, counted per user by dbt, then emailed.

load_raw_events >> dbt (Cosmos task group: one `dbt build` task per model, the model then its
data tests; unit tests and the seed are left to CI) >> send_stats

- What a run processes (run_window.run_window, the one rule every task uses): the UTC dates
  [start_date, end_date) given as params (end_date default start_date + 1 day; the only way to
  process today's incomplete day); else the logical date's day for a scheduled run, a backfill,
  or a manual run at 00:00 UTC (`airflow dags test event_stats D`); else the UTC day of the
  logical date once it has ended, or the last complete UTC day before it (the UI's Trigger:
  now), or, without a logical date (`airflow dags trigger`), before the trigger. A day that
  had not ended when the run was triggered is refused, never half-loaded. start_date is
  1970-01-01 so that no date is silently skipped (Airflow creates no task for a logical date
  before it).
- load_raw_events logs in to the events API and fetches the events in one task, because a
  token fetched by a separate task could have expired, or belong to another run, by the time
  the load used it (and would pass through XCom); the credentials come from the Airflow
  connection settings.events_api_conn_id() (`events_api`) when it exists.
- Every task is atomic and idempotent: the load replaces each date's partition in one
  transaction, dbt replaces the window's stats (vars start_date/end_date), and send_stats emails
  each date once per (date, recipient, content) through the ledger ops.email_log.
- dbt tests are the quality gate: when one fails, send_stats does not run. send_stats only reads
  the stats, so it can be retried alone without touching them.
- A task that fails after its last try emails a failure notification, and a scheduled day whose
  run has not succeeded by settings.stats_deadline() after the day ends raises a deadline alert
  (event_pipeline.alerts; outbox or SMTP, like the stats; the triggerer sends the alert).
- The dbt task group is rendered from a manifest.json (dbt_config.dbt_manifest) that `dbt parse`
  remakes only when a file of dbt_project/ changed: importing this file runs no dbt otherwise,
  opens no warehouse and needs no Airflow metadata database.
- The models, tests and lineage (raw.events -> analytics.event_stats -> the email) are in the
  UI: [dbt docs: lineage of event_stats][lineage] (also Browse > dbt docs (event_stats); made by
  the event_stats_docs DAG).
- Every task writes the warehouse: all run in the pool settings.WAREHOUSE_POOL (default_args),
  created by airflow_support.ensure_airflow (which `event-stats run` and `event-stats airflow
  ...` call first) with 3 slots on a DuckLake, 1 on a DuckDB file (one writer at a time). On a
  lake, a transaction that loses a commit race to another task is rolled back whole: the load
  and the email run it again themselves (warehouse.commits), a dbt task by its task retries.

[lineage]: /cosmos/event_stats/dbt_docs_index.html#!/model/model.event_stats.event_stats?g_v=1
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from airflow.sdk import AsyncCallback, DeadlineAlert, DeadlineReference, Param, dag, task
from airflow.timetables.interval import CronDataIntervalTimetable
from cosmos import DbtTaskGroup

from event_pipeline import alerts, dbt_config, settings
from event_pipeline.airflow_support import let_dag_test_finish_with_deadlines, run_day
from event_pipeline.run_window import EARLIEST_DATE, run_window

DBT_VARS = {
    "start_date": "{{ run_window(dag_run, params).start }}",
    "end_date": "{{ run_window(dag_run, params).end }}",
    # Each run audits in its own table, so two runs of the same date never share one.
    "audit_key": "{{ run_id }}",
}


def _date_param(description: str) -> Param:
    return Param(None, type=["null", "string"], format="date", description=description)


@dag(
    dag_id="event_stats",
    schedule=CronDataIntervalTimetable("0 0 * * *", timezone="UTC"),
    start_date=datetime.combine(EARLIEST_DATE, datetime.min.time(), UTC),
    catchup=False,  # past days run through `airflow backfill create` (or `event-stats run`)
    max_active_runs=3,
    default_args={
        "owner": "event-stats",
        "retries": 2,
        "retry_delay": timedelta(minutes=1),
        "pool": settings.WAREHOUSE_POOL,  # every task of this DAG writes the warehouse
        "on_failure_callback": alerts.notify_failure,
    },
    params={
        "start_date": _date_param("First UTC date to process (YYYY-MM-DD); empty: the run's day"),
        "end_date": _date_param("Day after the last date (exclusive); empty: start_date + 1"),
    },
    # The day's stats are due settings.stats_deadline() after the day ends (logical date + 1 day).
    deadline=DeadlineAlert(
        reference=DeadlineReference.DAGRUN_LOGICAL_DATE,
        interval=timedelta(days=1) + settings.stats_deadline(),
        callback=AsyncCallback(alerts.deadline_missed),  # run by the triggerer
        name="stats_sent",
    ),
    user_defined_macros={"run_window": run_window, "run_day": run_day},
    tags=["event-stats", "duckdb", "dbt"],
    doc_md=__doc__,
)
def event_stats() -> None:
    @task
    def load_raw_events(dag_run=None, params=None) -> list[dict]:
        """Log in to the events API (when it requires it) and replace raw.events' partitions of
        the window with its answer: one unit, the token never leaves the task."""
        from event_pipeline.airflow_support import load_events

        return load_events(dag_run, params)

    dbt = DbtTaskGroup(
        group_id="dbt",
        project_config=dbt_config.project_config(),
        profile_config=dbt_config.profile_config(),
        execution_config=dbt_config.execution_config(),  # in-process dbt, "buildable" tests
        render_config=dbt_config.render_config(),  # a `dbt build` task per model, from a manifest
        operator_args={
            "vars": DBT_VARS,
            # No unit tests in the daily builds: CI runs them (dbt_config.daily_build_flags).
            "dbt_cmd_flags": dbt_config.daily_build_flags(),
            # A dbt node that lost a commit race on the lake changed nothing: soon run it again.
            "retries": 4,
            "retry_delay": timedelta(seconds=10),
            # No Airflow assets per dbt node: concurrent runs registering the same new asset
            # race in Airflow's metadata (a UNIQUE error that fails a task whose dbt succeeded).
            "emit_datasets": False,
        },
    )

    @task
    def send_stats(dag_run=None, params=None) -> list[dict]:
        """Email each date's stats once; by SMTP when the Airflow connection exists, else to the
        outbox."""
        from event_pipeline.airflow_support import send_emails

        return send_emails(dag_run, params)

    load_raw_events() >> dbt >> send_stats()


let_dag_test_finish_with_deadlines(event_stats())
