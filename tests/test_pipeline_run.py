"""`event-stats run` (the `make run` job) as a user runs it: a subprocess on temp settings."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import date, datetime, timedelta
from pathlib import Path

import psutil
import pytest
from smtp_fixtures import free_port

from event_pipeline import pipeline, warehouse
from event_pipeline.events.generator import generate_day
from event_pipeline.warehouse.email_log import SENDING, SENT
from event_pipeline.warehouse.stats import BuildRecord
from event_pipeline.warehouse.status import EmailRecord, Ledgers, LoadSummary


def _port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def run_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)  # the session's temp AIRFLOW_HOME (tests/conftest.py)
    env.update(
        WAREHOUSE_PATH=str(tmp_path / "data" / "warehouse"),
        EMAIL_OUTBOX_DIR=str(tmp_path / "data" / "outbox"),
    )
    return env


def _run(env: dict[str, str], port: int, *args: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "event_pipeline.cli", "run", "--port", str(port), *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)


def _tables(path: str) -> list[list[tuple]]:
    with warehouse.connect(Path(path), read_only=True) as connection:
        return [
            connection.execute(sql).fetchall()
            for sql in (
                "select * from raw.events order by event_id",
                "select * from analytics.event_stats order by all",
                "select * exclude (sent_at) from ops.email_log order by all",
            )
        ]


@pytest.mark.e2e
def test_run_prints_a_summary_per_date_and_a_second_run_changes_nothing(run_env):
    port = free_port()
    first = _run(run_env, port, "--start", "2026-02-01", "--end", "2026-02-03")

    assert first.returncode == 0, first.stdout + first.stderr
    lines = first.stdout.splitlines()
    for day in ("2026-02-01", "2026-02-02"):
        [row] = [line for line in lines if line.startswith(day) and "success" in line]
        assert "sent (revision 1)" in row
    assert not [line for line in lines if line.startswith("2026-02-03")]  # end is exclusive
    assert "uv run event-stats sql" in first.stdout and "analytics.event_stats" in first.stdout
    assert "uv run event-stats status" in first.stdout and "--start 2026-02-01" in first.stdout
    assert "problem(s)" not in first.stdout  # the status of the run's dates: all well
    assert not _port_in_use(port), "the events API it started is still running"
    emails = sorted(Path(run_env["EMAIL_OUTBOX_DIR"]).glob("*.eml"))
    assert len(emails) == 2
    before = _tables(run_env["WAREHOUSE_PATH"])

    second = _run(run_env, port, "--start", "2026-02-01", "--end", "2026-02-03")

    assert second.returncode == 0, second.stdout + second.stderr
    assert second.stdout.count("unchanged, not sent again") == 2
    assert _tables(run_env["WAREHOUSE_PATH"]) == before
    assert sorted(Path(run_env["EMAIL_OUTBOX_DIR"]).glob("*.eml")) == emails


@pytest.mark.e2e
def test_run_stops_the_events_api_when_it_is_interrupted(run_env):
    port = free_port()
    argv = [sys.executable, "-m", "event_pipeline.cli", "run", "--port", str(port)]
    process = subprocess.Popen(argv, env=run_env, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not _port_in_use(port):
            assert time.monotonic() < deadline and process.poll() is None, "API never started"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
    assert process.returncode != 0
    assert not _port_in_use(port), "the events API outlived an interrupted run"


class _Output:
    """Collects a subprocess's stdout in a thread (progress lines end only when a date ends)."""

    def __init__(self, process: subprocess.Popen) -> None:
        self._chunks: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(process.stdout,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for chunk in iter(lambda: stream.read1(4096), b""):
            self._chunks.append(chunk.decode(errors="replace"))

    @property
    def text(self) -> str:
        return "".join(self._chunks)

    def finish(self) -> str:
        self._thread.join(timeout=10)
        return self.text


def _wait_for(condition, what: str, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"`event-stats run` exited before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _dbt_task_started(run_log: Path, offset: int) -> bool:
    """A dbt task of the event_stats DAG started after `offset` in Airflow's log."""
    if not run_log.exists():
        return False
    with run_log.open("rb") as log:
        log.seek(offset)
        return b"[DAG TEST] running task <TaskInstance: event_stats.dbt." in log.read()


def _events_api_children(pid: int) -> list[psutil.Process]:
    return [
        child
        for child in psutil.Process(pid).children(recursive=True)
        if "serve-events" in child.cmdline()
    ]


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _partitions(path: str) -> dict[str, dict]:
    """Per date: raw.events rows, analytics.event_stats rows, and the stats raw.events gives."""
    with warehouse.connect(Path(path), read_only=True) as connection:

        def per_date(sql: str) -> dict[date, dict[str, int]]:
            found: dict[date, dict[str, int]] = {}
            for day, user, count in connection.execute(sql).fetchall():
                found.setdefault(day, {})[user] = count
            return found

        return {
            "raw": dict(
                connection.execute(
                    "select event_date, count(*) from raw.events group by all"
                ).fetchall()
            ),
            "stats": per_date("select event_date, user_id, event_count from analytics.event_stats"),
            "stats_of_raw": per_date(
                "select event_date, user_id, count(*) from raw.events group by all"
            ),
        }


@pytest.mark.e2e
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_run_stops_promptly_on_a_signal_during_a_later_dates_task(run_env, tmp_path, signum):
    """Airflow's task runner replaces the SIGTERM handler for every task and turns a task's
    KeyboardInterrupt into a failure to retry: the run's own handling must survive both."""
    port = free_port()
    days = [date(2026, 3, 1) + timedelta(days=i) for i in range(4)]
    run_log = tmp_path / "data" / "run.log"
    argv = [sys.executable, "-m", "event_pipeline.cli", "run", "--port", str(port)]
    argv += ["--start", str(days[0]), "--end", str(days[-1] + timedelta(days=1))]
    process = subprocess.Popen(argv, env=run_env, stdout=subprocess.PIPE)
    output = _Output(process)
    api: list[psutil.Process] = []
    try:
        _wait_for(lambda: f"{days[1]}: running" in output.text, f"{days[1]} to start", process)
        offset = run_log.stat().st_size
        _wait_for(lambda: _dbt_task_started(run_log, offset), f"a dbt task of {days[1]}", process)
        time.sleep(0.3)
        api = _events_api_children(process.pid)
        assert len(api) == 1, "the events API child process was not found"
        signalled = time.monotonic()
        process.send_signal(signum)
        process.wait(timeout=60)
        stopped_in = time.monotonic() - signalled
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for child in api:  # only if the run left it behind
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
    text = output.finish()

    assert process.returncode == 128 + signum, text
    assert stopped_in < 15, f"took {stopped_in:.0f} s to stop"
    name = signal.Signals(signum).name
    assert f"Interrupted by {name} while {days[1]} was running" in text, text
    assert f"event-stats run --start {days[0]} --end {days[-1] + timedelta(days=1)}" in text
    assert not _running(api[0]), "the events API outlived the run"
    assert not _port_in_use(port)
    # Every date is complete: not there at all, or all its events and the stats they give.
    tables = _partitions(run_env["WAREHOUSE_PATH"])
    for day in days:
        raw = tables["raw"].get(day)
        assert raw in (None, sum(1 for _ in generate_day(day))), f"{day}: partial raw ({raw})"
        stats = tables["stats"].get(day)
        assert stats in (None, tables["stats_of_raw"].get(day)), f"{day}: stats not of raw"
    assert tables["stats"].get(days[0]), f"{days[0]} ran before the signal: its stats are missing"
    assert days[2] not in tables["raw"] and days[3] not in tables["raw"]


def _email(day: date, revision: int, state: str, recipient: str = "team@example.com"):
    at = datetime(2026, 3, 10, 12)
    sent_at = at if state == SENT else None
    return EmailRecord(day, recipient, revision, state, "h", f"<m{revision}>", sent_at, at)


def test_the_summary_tells_emails_sent_now_earlier_and_unconfirmed_apart(warehouse, capsys):
    """A 'sending' row is an email whose send was cut off: it must not read as sent."""
    days = [date(2026, 3, 1) + timedelta(days=i) for i in range(5)]
    unchanged, sent, cut_off, update_cut_off, never = days
    loaded, built = datetime(2026, 3, 10, 10), datetime(2026, 3, 10, 11)
    loads = [LoadSummary(day, 5, loaded, "http://api/events", "run", loaded, 1) for day in days]
    builds = [BuildRecord(day, "inv", 2, 5, built) for day in days]
    before = [_email(unchanged, 1, SENT), _email(update_cut_off, 1, SENT)]
    after = [
        *before,
        _email(sent, 1, SENT),
        _email(cut_off, 1, SENDING),
        _email(update_cut_off, 2, SENDING),
    ]

    summaries, report = pipeline.day_summaries(
        days,
        dict.fromkeys(days, "success"),
        Ledgers(loads, builds, before, {}),
        Ledgers(loads, builds, after, {}),
    )

    assert {s.event_date: s.email for s in summaries} == {
        unchanged: "unchanged, not sent again (revision 1 sent earlier)",
        sent: "sent (revision 1)",
        cut_off: "unconfirmed (sending, revision 1)",
        update_cut_off: "unconfirmed (sending, revision 2)",
        never: "not sent",
    }
    assert [(s.raw_rows, s.stats_rows) for s in summaries] == [(5, 2)] * 5
    pipeline.print_summary(summaries, report)
    printed = capsys.readouterr().out
    assert f"{cut_off} to {update_cut_off} (2 dates)  email_unconfirmed" in printed
    assert f"{never}  email_not_sent" in printed
    assert f"event-stats status --warehouse {warehouse} --start {days[0]} --end" in printed


# One statement, so one snapshot: every date's rows against its latest ledger row, for raw.events
# (raw.load_log) and analytics.event_stats (ops.build_log). A partial partition shows as torn.
CONSISTENCY = """
with
    events as (select event_date, count(*) as n from raw.events group by all),
    loads as (select event_date, arg_max(rows, loaded_at) as n from raw.load_log group by all),
    stats as (select event_date, sum(event_count) as n from analytics.event_stats group by all),
    builds as (select event_date, arg_max(events, built_at) as n from ops.build_log group by all)
select
    (select count(*) from loads) as dates,
    (select count(*) from loads full join events using (event_date)
        where coalesce(loads.n, 0) <> coalesce(events.n, 0)) as torn_raw,
    (select count(*) from builds full join stats using (event_date)
        where coalesce(builds.n, 0) <> coalesce(stats.n, 0)) as torn_stats;
"""


class _ReaderSession:
    """`event-stats sql --format json` reading statements from a pipe, asked CONSISTENCY again
    and again (a pause of `pause` s between answers) until stopped."""

    def __init__(self, env: dict[str, str], pause: float = 0.2) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "event_pipeline.cli", "sql", "--format", "json"],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.answers: list[dict] = []
        self.pause = pause
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._ask, daemon=True)
        self._thread.start()

    def _ask(self) -> None:
        query = " ".join(CONSISTENCY.split()) + "\n"
        while not self._stop.is_set():
            self.process.stdin.write(query)
            self.process.stdin.flush()
            line = self.process.stdout.readline()
            if not line:
                return
            self.answers.extend(json.loads(line))
            time.sleep(self.pause)

    def stop(self) -> str:
        self._stop.set()
        self._thread.join(timeout=60)
        self.process.stdin.close()
        self.process.wait(timeout=60)
        return self.process.stderr.read()


@pytest.mark.e2e
def test_a_sql_session_querying_through_a_run_neither_blocks_it_nor_sees_a_partial_date(run_env):
    """The issue's first wall: a SQL session open on the warehouse. On the DuckLake, a session
    kept open and querying throughout `event-stats run` (load, dbt, email through Airflow) does
    not fail or noticeably slow the run, and every answer holds whole partitions only."""
    port = free_port()
    started = time.monotonic()
    alone = _run(run_env, port, "--start", "2026-03-01", "--end", "2026-03-03")
    alone_seconds = time.monotonic() - started
    assert alone.returncode == 0, alone.stdout + alone.stderr

    reader = _ReaderSession(run_env)
    try:
        started = time.monotonic()
        read = _run(run_env, port, "--start", "2026-03-03", "--end", "2026-03-05")
        with_reader_seconds = time.monotonic() - started
    finally:
        errors = reader.stop()
    assert read.returncode == 0, read.stdout + read.stderr
    assert reader.process.returncode == 0, errors
    print(
        f"`event-stats run` of 2 dates: alone {alone_seconds:.0f} s, with a SQL session "
        f"querying {len(reader.answers)} times through it {with_reader_seconds:.0f} s"
    )
    assert len(reader.answers) >= 20
    assert [a for a in reader.answers if a["torn_raw"] or a["torn_stats"]] == []
    assert reader.answers[0]["dates"] == 2 and reader.answers[-1]["dates"] == 4
    assert with_reader_seconds < 2 * alone_seconds + 60
