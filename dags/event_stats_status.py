"""event_stats_status: `event-stats status` over the warehouse every day; red on problems.

One task, report_status, logs the status report of every date from the first one the ledgers
know through the run's date D, and fails when any date has a gap (not loaded, not built) or is
stale (raw changed after the build, email missing, outdated or unconfirmed): the run shows red in
the grid, the log says which dates and what to do, and the failure is emailed like any failed
task of event_stats (alerts.notify_failure): that is how a day the scheduler never ran is
noticed. Clearing the task checks again.

- Scheduled at 06:00 UTC for the day that ended six hours before: event_stats runs at 00:00 for
  the same day, and six hours leave room for its retries. A check that ran before event_stats
  finished reports the day as not loaded; the next day's check covers it again.
- It reads the warehouse in one brief read-only connection, in the pool of the event_stats
  tasks: on a DuckLake (the default) a reader blocks nothing; on a DuckDB file a reader blocks
  writers too, and the pool's one slot makes it wait for a slot instead of for the file lock.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from airflow.sdk import dag, task
from airflow.timetables.interval import CronDataIntervalTimetable

from event_pipeline import alerts, settings
from event_pipeline.airflow_support import run_date


@dag(
    dag_id="event_stats_status",
    schedule=CronDataIntervalTimetable("0 6 * * *", timezone="UTC"),
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,  # each run checks every date up to its own: older runs add nothing
    max_active_runs=1,
    default_args={
        "owner": "event-stats",
        "retries": 2,  # a warehouse locked for too long; problems found fail at once
        "retry_delay": timedelta(minutes=5),
        "pool": settings.WAREHOUSE_POOL,
        # Problems found (a day the scheduler never ran included) reach someone by email.
        "on_failure_callback": alerts.notify_failure,
    },
    tags=["event-stats", "duckdb", "status"],
    doc_md=__doc__,
)
def event_stats_status() -> None:
    @task
    def report_status(dag_run=None) -> dict:
        """Log the status report through the run's date; fail when there are problems."""
        from event_pipeline.airflow_support import check_status

        return check_status(run_date(dag_run))

    report_status()


event_stats_status()
