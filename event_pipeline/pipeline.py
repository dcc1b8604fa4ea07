"""`event-stats run` (the job behind `make run`): the event_stats DAG over a week of dates.

It starts the events API on localhost, sets Airflow up (metadata database, warehouse pool), runs
the DAG through Airflow once per date, prints a summary per date and how to query the result,
and stops the events API it started, also on an error or Ctrl-C.

Each date runs with `dag.test()` in this process: a real Airflow DAG run (recorded in the metadata
database, visible in the UI, tasks in dependency order, retries), without starting a scheduler,
a DAG processor and an API server. Measured on 2 cores: a week in about 65 s (6-7 s per date,
plus set-up); under the real scheduler each task is a new process that imports dbt and parses
the project (5-10 s per task, 5 tasks per date) after about 25 s of start-up. Runs are sequential,
so only one task at a time opens the DuckDB file. The tests also run a backfill under the real
scheduler (tests/dags/test_event_stats_backfill.py).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TextIO

from event_pipeline import airflow_support, settings, warehouse
from event_pipeline.events import process as events_process

log = logging.getLogger(__name__)

# A fixed week, so `make run` gives the same tables on every machine and every day.
DEFAULT_START = date(2026, 1, 1)
DEFAULT_DAYS = 7


@dataclass(frozen=True)
class DaySummary:
    event_date: date
    state: str
    raw_rows: int | None
    stats_rows: int | None
    email: str


@contextmanager
def events_api(port: int | None = None, log_file: Path | None = None) -> Iterator[str]:
    """Start the events API on localhost (port 5000 when free); yield its URL; stop it by PID."""
    if port is None:
        port = 5000 if events_process.port_is_free(5000) else events_process.free_port()
    with events_process.running(port, log_file=log_file) as server:
        log.info("Events API (PID %s) serving on %s", server.process.pid, server.url)
        yield server.url


def _table_count(connection, sql: str, day: date) -> int | None:
    import duckdb

    try:
        return connection.execute(sql, [day]).fetchall()[0][0]
    except duckdb.CatalogException:
        return None


def _ledger(connection) -> dict[date, tuple[int, str]]:
    """Latest (revision, message_id) per date in ops.email_log."""
    import duckdb

    try:
        rows = connection.execute(
            "select event_date, max(revision), arg_max(message_id, revision) "
            "from ops.email_log group by event_date"
        ).fetchall()
    except duckdb.CatalogException:
        return {}
    return {day: (revision, message) for day, revision, message in rows}


def summarize(
    days: list[date], states: dict[date, str], sent_before: dict[date, tuple[int, str]]
) -> list[DaySummary]:
    with warehouse.connect(read_only=False) as connection:
        sent_after = _ledger(connection)
        summaries = []
        for day in days:
            before, after = sent_before.get(day), sent_after.get(day)
            if after is None:
                email = "not sent"
            elif after != before:
                email = f"sent (revision {after[0]})"
            else:
                email = f"unchanged, not sent again (revision {after[0]} sent earlier)"
            summaries.append(
                DaySummary(
                    day,
                    states.get(day, "not run"),
                    _table_count(
                        connection, "select count(*) from raw.events where event_date = ?", day
                    ),
                    _table_count(
                        connection,
                        "select count(*) from analytics.event_stats where event_date = ?",
                        day,
                    ),
                    email,
                )
            )
    return summaries


def _load_dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(settings.REPO_ROOT / "dags" / "event_stats.py"))
    if bag.import_errors:
        raise RuntimeError(f"dags/event_stats.py does not import: {bag.import_errors}")
    return bag.get_dag("event_stats")


@contextmanager
def output_to(log_file: Path) -> Iterator[TextIO]:
    """Send this process's stdout and stderr (Airflow's and dbt's logs) to `log_file`.

    Yields a stream to the original stdout, for the progress lines.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    console = os.fdopen(os.dup(saved[0]), "w", buffering=1)
    with log_file.open("ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    try:
        yield console
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        console.close()


def run_dates(days: list[date], console: TextIO = sys.stdout) -> dict[date, str]:
    """Run the event_stats DAG once per date (sequentially, in this process); state per date."""
    dag = _load_dag()
    states: dict[date, str] = {}
    for day in days:
        logical_date = datetime(day.year, day.month, day.day, tzinfo=UTC)
        started = time.monotonic()
        print(f"  {day}: running the event_stats DAG ...", end="", file=console, flush=True)
        dag_run = dag.test(logical_date=logical_date)
        states[day] = str(getattr(dag_run.state, "value", dag_run.state))
        print(f" {states[day]} ({time.monotonic() - started:.0f} s)", file=console, flush=True)
    return states


def _sigterm_as_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def print_summary(summaries: list[DaySummary]) -> None:
    def show(value: int | None) -> str:
        return "-" if value is None else f"{value:,}"

    print()
    print(f"{'date':<12}{'run':<10}{'raw rows':>10}{'stats rows':>12}  email")
    for s in summaries:
        print(
            f"{s.event_date.isoformat():<12}{s.state:<10}{show(s.raw_rows):>10}"
            f"{show(s.stats_rows):>12}  {s.email}"
        )
    print()
    print(f"Emails: {settings.email_outbox_dir()} (or SMTP when the Airflow connection exists)")
    print("Query the result with SQL, for example:")
    sql = f"uv run event-stats sql{_warehouse_option()}"
    print(
        f'  {sql} "select event_date, count(*) as users, '
        'sum(event_count) as events from analytics.event_stats group by all order by 1"'
    )
    print(
        f'  {sql} "select * from analytics.event_stats '
        "where event_date = '"
        + summaries[0].event_date.isoformat()
        + "' order by event_count desc limit 10\""
    )


def _warehouse_option() -> str:
    """` --warehouse PATH` when $WAREHOUSE_PATH moved the warehouse, so the hint works anywhere."""
    if not os.environ.get("WAREHOUSE_PATH"):
        return ""
    path = settings.warehouse_path()
    try:
        return f" --warehouse {path.relative_to(Path.cwd())}"
    except ValueError:
        return f" --warehouse {path}"


def run(start: date | None = None, end: date | None = None, port: int | None = None) -> int:
    """The `make run` job; returns the exit code (0 when every date's run succeeded)."""
    start = start or DEFAULT_START
    end = end or start + timedelta(days=DEFAULT_DAYS)
    if end <= start:
        raise ValueError(f"--end {end} must be after --start {start}")
    days = [start + timedelta(days=i) for i in range((end - start).days)]
    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    began = time.monotonic()
    try:
        data_dir = settings.warehouse_path().parent
        data_dir.mkdir(parents=True, exist_ok=True)
        log_file = data_dir / "run.log"
        print(f"Setting up Airflow in {settings.airflow_home()} (log: {log_file}) ...", flush=True)
        with output_to(log_file) as console:
            airflow_support.ensure_airflow()
            with events_api(port, log_file=data_dir / "events-api.log") as url:
                os.environ["EVENTS_API_URL"] = url
                print(f"Events API on {url}; dates {start} to {days[-1]}:", file=console)
                with warehouse.connect() as connection:
                    sent_before = _ledger(connection)
                states = run_dates(days, console)
        summaries = summarize(days, states, sent_before)
    except KeyboardInterrupt:
        print("\nInterrupted; the events API was stopped. `make run` again finishes the job.")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print_summary(summaries)
    print(f"\nDone in {time.monotonic() - began:.0f} s.")
    failed = [s for s in summaries if s.state != "success"]
    if failed:
        print(f"Failed dates: {', '.join(str(s.event_date) for s in failed)}; see the Airflow UI.")
        return 1
    return 0
