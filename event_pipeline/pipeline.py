"""`event-stats run` (the job behind `make run`): the event_stats DAG over a week of dates.

It starts the events API on localhost, sets Airflow up (metadata database, warehouse pool), runs
the DAG through Airflow once per date, prints a summary per date and how to query the result,
and stops the events API it started, also on an error. SIGTERM or Ctrl-C stops the run at any
moment, also inside a task (RunInterrupts): every table keeps each date complete, old or new.

Each date runs with `dag.test()` in this process: a real Airflow DAG run (recorded in the metadata
database, visible in the UI, tasks in dependency order, retries), without the start-up of a
scheduler, a DAG processor and an API server, and without a new process (that imports dbt and
parses the project) per task. Runs are sequential, so only one task at a time opens the DuckDB
file. The tests also run a backfill under the real scheduler (tests/dags/).

The summary is read from the ledgers (warehouse.status), the same rows `event-stats status`
reports on: raw rows per the load ledger, stats rows per the build ledger, and what this run did
about each date's email, from the email ledger before and after it.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import pluggy

from event_pipeline import airflow_support, settings, status, warehouse
from event_pipeline.events import process as events_process
from event_pipeline.warehouse import status as ledger_reads
from event_pipeline.warehouse.email_log import SENDING, SENT
from event_pipeline.warehouse.status import EmailRecord, Ledgers

log = logging.getLogger(__name__)

# A fixed week, so `make run` gives the same tables on every machine and every day.
DEFAULT_START = date(2026, 1, 1)
DEFAULT_DAYS = 7

# Marks a method as an Airflow listener hook: the marker of airflow.listeners.hookimpl, made here
# because importing airflow reads its configuration, which `run` sets up first.
_listener_hook = pluggy.HookimplMarker("airflow")


@dataclass(frozen=True)
class DaySummary:
    event_date: date
    state: str  # of the date's DAG run, or "not run"
    raw_rows: int | None  # rows after the latest load (raw.load_log); None: never loaded
    stats_rows: int | None  # rows (users) after the latest build (ops.build_log); None: never built
    email: str  # what this run did about the date's email


@contextmanager
def events_api(port: int | None = None, log_file: Path | None = None) -> Iterator[str]:
    """Start the events API on localhost (port 5000 when free); yield its URL; stop it by PID."""
    if port is None:
        port = 5000 if events_process.port_is_free(5000) else events_process.free_port()
    with events_process.running(port, log_file=log_file) as server:
        log.info("Events API (PID %s) serving on %s", server.process.pid, server.url)
        yield server.url


# The summary


def read_ledgers(start: date, end: date) -> Ledgers:
    """The ledgers' rows for [start, end).

    Opened read-write, as the DAG's tasks open the file in this same process: DuckDB refuses a
    connection with another configuration while one is open in the process.
    """
    with warehouse.connect() as connection:
        return ledger_reads.read_ledgers(connection, start, end)


def summarize(
    days: list[date], states: dict[date, str], before: Ledgers
) -> tuple[list[DaySummary], status.StatusReport]:
    """A summary per date, and the status report of the run's dates (for its problems)."""
    after = read_ledgers(days[0], days[-1] + timedelta(days=1))
    return day_summaries(days, states, before, after)


def day_summaries(
    days: list[date], states: dict[date, str], before: Ledgers, after: Ledgers
) -> tuple[list[DaySummary], status.StatusReport]:
    """`summarize` from the ledgers' rows before and after the run."""
    start, end = days[0], days[-1] + timedelta(days=1)
    report = status.build_report(start, end, after, warehouse=str(settings.warehouse_path()))
    summaries = [
        DaySummary(
            day.event_date,
            states.get(day.event_date, "not run"),
            day.load.rows if day.load else None,
            day.build.users if day.build else None,
            email_outcome(
                [row for row in before.emails if row.event_date == day.event_date],
                [row for row in after.emails if row.event_date == day.event_date],
            ),
        )
        for day in report.dates
    ]
    return summaries, report


def email_outcome(before: Sequence[EmailRecord], after: Sequence[EmailRecord]) -> str:
    """What a run did about one date's email, from its ledger rows before and after the run.

    "sent" only for an email the ledger confirms ('sent') that it did not confirm before;
    "unconfirmed (sending)" when a recipient's latest email is still 'sending' (its send was
    cut off: whether it went out is unknown).
    """
    latest: dict[str, EmailRecord] = {}
    for row in sorted(after, key=lambda row: row.revision):
        latest[row.recipient] = row
    if not latest:
        return "not sent"
    confirmed_before = {(row.recipient, row.revision) for row in before if row.status == SENT}
    sent = [
        row.revision
        for row in latest.values()
        if row.status == SENT and (row.recipient, row.revision) not in confirmed_before
    ]
    unconfirmed = [row.revision for row in latest.values() if row.status == SENDING]
    outcome = []
    if sent:
        outcome.append(f"sent (revision {max(sent)})")
    if unconfirmed:
        outcome.append(f"unconfirmed (sending, revision {max(unconfirmed)})")
    if not outcome:
        revision = max(row.revision for row in latest.values())
        outcome.append(f"unchanged, not sent again (revision {revision} sent earlier)")
    return "; ".join(outcome)


def print_summary(summaries: list[DaySummary], report: status.StatusReport) -> None:
    def show(value: int | None) -> str:
        return "-" if value is None else f"{value:,}"

    print()
    print(f"{'date':<12}{'run':<10}{'raw rows':>10}{'stats rows':>12}  email")
    for s in summaries:
        print(
            f"{s.event_date.isoformat():<12}{s.state:<10}{show(s.raw_rows):>10}"
            f"{show(s.stats_rows):>12}  {s.email}"
        )
    if report.problems:
        print()
        print("\n".join(status.summary_lines(report)))
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
    print("What was loaded, built and emailed per date, and what to fix:")
    print(f"  {_status_command(report.start, report.end)}")


def _status_command(start: date, end: date) -> str:
    return f"uv run event-stats status{_warehouse_option()} --start {start} --end {end}"


def _warehouse_option() -> str:
    """` --warehouse PATH` when $WAREHOUSE_PATH moved the warehouse, so the hint works anywhere."""
    if not os.environ.get("WAREHOUSE_PATH"):
        return ""
    path = settings.warehouse_path()
    try:
        return f" --warehouse {path.relative_to(Path.cwd())}"
    except ValueError:
        return f" --warehouse {path}"


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


def run_dates(
    days: list[date],
    states: dict[date, str],
    interrupts: RunInterrupts | None = None,
    console: TextIO = sys.stdout,
) -> None:
    """Run the event_stats DAG once per date (sequentially, in this process).

    Fills `states` (date -> state of its DAG run) as each date ends, so an interrupted run knows
    how far it got.
    """
    dag = _load_dag()
    if interrupts:
        interrupts.follow_tasks()
    for day in days:
        logical_date = datetime(day.year, day.month, day.day, tzinfo=UTC)
        started = time.monotonic()
        print(f"  {day}: running the event_stats DAG ...", end="", file=console, flush=True)
        named = airflow_support.named_test_runs(
            run_id=lambda day=day: f"event-stats-run_{day}__{_stamp()}",
            note=f"`event-stats run` of {day}",
            user="event-stats run",
        )
        with named:
            dag_run = dag.test(logical_date=logical_date)
        if interrupts:
            interrupts.check()  # a signal Airflow's handler took after the last task's hooks
        states[day] = _run_state(dag_run)
        print(f" {states[day]} ({time.monotonic() - started:.0f} s)", file=console, flush=True)


def run_range(
    days: list[date],
    states: dict[date, str],
    interrupts: RunInterrupts | None = None,
    console: TextIO = sys.stdout,
) -> None:
    """Run the event_stats DAG once for all `days` (consecutive): params start_date/end_date.

    One load of the range, one dbt build over it, one email per date. The run's logical date is
    the moment it starts (like the UI's Trigger button), so it replaces no per-date run of
    `event-stats run` and shows where it ran in the grid. Prints a line per task as it ends;
    fills `states` with the run's state for every date.
    """
    dag = _load_dag()
    progress = TaskProgress(console)
    if interrupts:
        interrupts.follow_tasks()
    end = days[-1] + timedelta(days=1)
    span = f"{days[0]} to {end}"
    print(
        f"  {_span(days)} ({len(days)} dates): one event_stats DAG run, params start_date="
        f"{days[0]} end_date={end}",
        file=console,
        flush=True,
    )
    from airflow.sdk.listener import get_listener_manager

    listeners = get_listener_manager()
    listeners.add_listener(progress)
    named = airflow_support.named_test_runs(
        run_id=lambda: f"event-stats-backfill_{days[0]}_to_{end}__{_stamp()}",
        note=f"backfill {span} (end exclusive): {len(days)} dates in one run, by "
        "`event-stats backfill`",
        user="event-stats backfill",
    )
    try:
        with named:
            now = datetime.now(UTC)
            dag_run = dag.test(
                logical_date=now,
                run_after=now,
                run_conf={"start_date": days[0].isoformat(), "end_date": end.isoformat()},
            )
        if interrupts:
            interrupts.check()
    finally:
        listeners.pm.unregister(progress)
    state = _run_state(dag_run)
    states.update(dict.fromkeys(days, state))
    print(f"  {_span(days)}: {state} ({progress.elapsed():.0f} s)", file=console, flush=True)


def _run_state(dag_run: Any) -> str:
    """A DAG run's state as text ("success", "failed"), whether Airflow gave an enum or a str."""
    return str(getattr(dag_run.state, "value", dag_run.state))


def _stamp() -> str:
    """Now (UTC) for a run id: 20260101T120000.123456Z (no two runs of a process share it)."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")


class TaskProgress:
    """A Task SDK listener printing a line per task of a run as it ends: state and duration."""

    def __init__(self, console: TextIO) -> None:
        self._console = console
        self._began = time.monotonic()
        self._started: dict[str, float] = {}

    def elapsed(self) -> float:
        return time.monotonic() - self._began

    def _ended(self, task_instance: Any, state: str) -> None:
        task_id = getattr(task_instance, "task_id", "?")
        took = time.monotonic() - self._started.pop(task_id, self._began)
        print(f"    {task_id}: {state} ({took:.1f} s)", file=self._console, flush=True)

    @_listener_hook
    def on_task_instance_running(self, previous_state: object, task_instance: Any) -> None:
        self._started[getattr(task_instance, "task_id", "?")] = time.monotonic()

    @_listener_hook
    def on_task_instance_success(self, previous_state: object, task_instance: Any) -> None:
        self._ended(task_instance, "success")

    @_listener_hook
    def on_task_instance_failed(
        self, previous_state: object, task_instance: Any, error: object = None
    ) -> None:
        self._ended(task_instance, "failed")


# Interrupts

_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class RunInterrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT stopped `event-stats run`."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        super().__init__(f"interrupted by {self.signal_name}")


class RunInterrupts:
    """Makes SIGTERM and SIGINT stop `event-stats run`, also while Airflow runs a task.

    Airflow 3.3's task runner (airflow/sdk/execution_time/task_runner.py,
    _run_task_and_map_outcome) defeats a handler installed once: it installs its own SIGTERM
    handler for every task (it calls the task's on_kill() and returns) and never restores the
    previous one, and it turns any exception a task raises, KeyboardInterrupt included, into a
    task failure that dag.test() retries. So this object is also a Task SDK listener:
    - as each task starts (on_task_instance_running) it installs the run's handler again, which
      calls Airflow's first (so on_kill() still runs);
    - every signal also lands on a wakeup fd, read by the hooks: one that came while Airflow's
      handler was in force (before the task's hook) is not lost;
    - once a signal came, the hooks raise RunInterrupted: before_stopping, called when the task
      has ended and outside the runner's exception handling, carries it out of dag.test().
    Only the first signal raises: a second one must not cut short the stop of the events API.
    Outside the main thread (where signals cannot be handled) it does nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, _Handler] = {}
        self._chained: dict[int, _Handler] = {}  # Airflow's handlers for the running task
        self._wakeup: tuple[socket.socket, socket.socket] | None = None
        self._previous_wakeup = -1
        self._listening = False

    def __enter__(self) -> RunInterrupts:
        if threading.current_thread() is not threading.main_thread():
            return self
        self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        self._wakeup = socket.socketpair()
        for end in self._wakeup:
            end.setblocking(False)
        self._previous_wakeup = signal.set_wakeup_fd(
            self._wakeup[1].fileno(), warn_on_full_buffer=False
        )
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._wakeup is None:
            return
        if self._listening:
            from airflow.sdk.listener import get_listener_manager

            get_listener_manager().pm.unregister(self)
        signal.set_wakeup_fd(self._previous_wakeup)
        for end in self._wakeup:
            end.close()
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)

    def follow_tasks(self) -> None:
        """Start listening to the tasks Airflow runs in this process (Airflow is configured)."""
        if self._wakeup is None or self._listening:
            return
        from airflow.sdk.listener import get_listener_manager

        get_listener_manager().add_listener(self)
        self._listening = True

    def _install(self) -> None:
        """Put the run's handler in force, chained to whatever displaced it."""
        for signum in self.SIGNALS:
            current = signal.getsignal(signum)
            if current == self._handle:
                continue
            if callable(current) and current is not signal.default_int_handler:
                self._chained[signum] = current
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            return
        self.received = signum
        chained = self._chained.get(signum)
        try:
            if callable(chained):
                chained(signum, frame)  # Airflow's: the running task's on_kill()
        finally:
            raise RunInterrupted(signum)

    def check(self) -> None:
        """Raise RunInterrupted if a signal came, also one that another handler took."""
        if self._wakeup is not None:
            for signum in _drain(self._wakeup[0]):
                if signum in self.SIGNALS and self.received is None:
                    self.received = signum
        if self.received is not None:
            raise RunInterrupted(self.received)

    # Task SDK listener hooks

    @_listener_hook
    def on_task_instance_running(self, previous_state: object, task_instance: object) -> None:
        self._install()
        self.check()

    @_listener_hook
    def before_stopping(self, component: object) -> None:
        self._install()
        self._chained.clear()  # the task ended: its on_kill() no longer applies
        self.check()


def _drain(reader: socket.socket) -> bytes:
    """Everything written to the (non-blocking) socket so far."""
    data = b""
    while True:
        try:
            chunk = reader.recv(512)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


def run(start: date | None = None, end: date | None = None, port: int | None = None) -> int:
    """The `make run` job: one DAG run per date; returns the exit code (0 when every date's run
    succeeded, 128 + the signal's number when SIGTERM or SIGINT stopped it). The last thing its
    process does: it freezes the garbage collector's objects."""
    start = start or DEFAULT_START
    end = end or start + timedelta(days=DEFAULT_DAYS)
    return _execute("run", start, end, port, run_dates)


def backfill(start: date, end: date, port: int | None = None) -> int:
    """`event-stats backfill`: [start, end) as one DAG run (run_range); exit code as `run`."""
    last_possible = datetime.now(UTC).date()
    if end - timedelta(days=1) > last_possible:
        raise ValueError(
            f"--end {end}: no events after {last_possible} (UTC) exist yet; end the range at "
            f"--end {last_possible + timedelta(days=1)} at the latest"
        )
    return _execute("backfill", start, end, port, run_range)


Runner = Callable[[list[date], dict[date, str], RunInterrupts, TextIO], None]


def _execute(command: str, start: date, end: date, port: int | None, runner: Runner) -> int:
    if end <= start:
        raise ValueError(f"--end {end} must be after --start {start}")
    days = [start + timedelta(days=i) for i in range((end - start).days)]
    states: dict[date, str] = {}
    began = time.monotonic()
    interrupts = RunInterrupts()
    try:
        with interrupts:
            summaries, report = _run_with_events_api(days, states, interrupts, port, runner)
    except KeyboardInterrupt:
        signum = interrupts.received or signal.SIGINT
        print(interrupted_message(signum, days, states, command))
        return 128 + signum
    finally:
        # The command ends here. Python's garbage collections while it shuts down would walk
        # every object Airflow and dbt made, for seconds; objects frozen now are left out.
        gc.freeze()
    print_summary(summaries, report)
    print(f"\nDone in {time.monotonic() - began:.0f} s.")
    failed = [s for s in summaries if s.state != "success"]
    if failed:
        print(f"Failed dates: {', '.join(str(s.event_date) for s in failed)}; see the Airflow UI.")
        return 1
    return 0


def _run_with_events_api(
    days: list[date],
    states: dict[date, str],
    interrupts: RunInterrupts,
    port: int | None,
    runner: Runner,
) -> tuple[list[DaySummary], status.StatusReport]:
    """Set Airflow up, start the events API, run the DAG over the dates (`runner`), stop the
    API, and summarize; Airflow's and dbt's output goes to run.log beside the warehouse."""
    data_dir = settings.warehouse_path().parent
    data_dir.mkdir(parents=True, exist_ok=True)
    log_file = data_dir / "run.log"
    print(f"Setting up Airflow in {settings.airflow_home()} (log: {log_file}) ...", flush=True)
    end = days[-1] + timedelta(days=1)
    with output_to(log_file) as console:
        airflow_support.ensure_airflow()
        with events_api(port, log_file=data_dir / "events-api.log") as url:
            os.environ["EVENTS_API_URL"] = url
            print(f"Events API on {url}; dates {days[0]} to {days[-1]}:", file=console)
            before = read_ledgers(days[0], end)
            runner(days, states, interrupts, console)
    return summarize(days, states, before)


def interrupted_message(
    signum: int, days: list[date], states: dict[date, str], command: str = "run"
) -> str:
    """What an interrupted run did, and the commands that finish the job and show each date."""
    end = days[-1] + timedelta(days=1)
    finished = [day for day in days if day in states]
    rest = [day for day in days if day not in states]
    running = f" while {rest[0]} was running" if rest else ""
    progress = [f"Finished: {_span(finished)}."] if finished else []
    progress += [f"Not finished: {_span(rest)}."] if rest else []
    return "\n".join(
        [
            "",
            f"Interrupted by {signal.Signals(signum).name}{running}; the events API was stopped.",
            " ".join(progress),
            "Every table holds each date complete, as it was or as rewritten: none is "
            "half-written.",
            "Finish the job (dates already done change nothing and are not emailed again):",
            f"  uv run event-stats {command} --start {days[0]} --end {end}",
            "What each date holds:",
            f"  {_status_command(days[0], end)}",
        ]
    )


def _span(days: list[date]) -> str:
    return str(days[0]) if len(days) == 1 else f"{days[0]} to {days[-1]}"
