"""`event-stats sql` as tools and people run it: the real console script on a real DuckLake (the
default storage), and on a DuckDB file where its lock matters."""

from __future__ import annotations

import csv
import io
import json
import os
import pty
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import date
from decimal import Decimal
from pathlib import Path

import duckdb
import httpx
import pytest

from event_pipeline import warehouse as wh

EVENT_STATS = str(Path(sys.executable).with_name("event-stats"))
D = date(2026, 1, 1)

STATS_ROWS = [
    (date(2026, 1, 1), "alice", 12),
    (date(2026, 1, 1), "bob", 3),
    (date(2026, 1, 2), "carol", 1045),
]


def sql(*args: str, stdin: str | None = None, env: dict[str, str] | None = None):
    """Run `event-stats sql ARGS` to completion; returns the CompletedProcess (text)."""
    return subprocess.run(
        [EVENT_STATS, "sql", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


class _LineReader:
    """Lines of a child's stdout, read in a thread so a test can wait with a timeout."""

    def __init__(self, stream: io.TextIOBase) -> None:
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: io.TextIOBase) -> None:
        for line in stream:
            self._lines.put(line)

    def next(self, timeout: float = 30.0) -> str:
        return self._lines.get(timeout=timeout)


def _write_stats(path: Path) -> Path:
    with wh.connect(path) as connection:
        connection.execute(
            "create schema analytics; create table analytics.event_stats "
            "(event_date date, user_id varchar, event_count bigint)"
        )
        connection.executemany("insert into analytics.event_stats values (?, ?, ?)", STATS_ROWS)
    return path


@pytest.fixture
def stats_warehouse(warehouse: Path) -> Path:
    """$WAREHOUSE_PATH (a DuckLake) holding analytics.event_stats with STATS_ROWS, closed again."""
    return _write_stats(warehouse)


@pytest.fixture
def stats_file(duckdb_file_warehouse: Path) -> Path:
    """The same in a DuckDB file ($WAREHOUSE_PATH ending in .duckdb): one process holds it."""
    return _write_stats(duckdb_file_warehouse)


# --- formats -----------------------------------------------------------------------------------


def test_table_is_aligned_under_a_header_with_numbers_right_aligned(stats_warehouse):
    result = sql("select * from analytics.event_stats order by event_date, user_id")

    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        "event_date  user_id  event_count\n"
        "----------  -------  -----------\n"
        "2026-01-01  alice             12\n"
        "2026-01-01  bob                3\n"
        "2026-01-02  carol           1045\n"
    )
    assert result.stderr == ""


def test_table_shows_null_and_keeps_a_row_on_one_line(stats_warehouse):
    result = sql("select null::varchar as nothing, 'two' || chr(10) || 'lines' as text")

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "nothing  text",
        "-------  ----------",
        "NULL     two\\nlines",
    ]


def test_csv_has_a_header_and_quotes_as_rfc_4180(stats_warehouse):
    result = sql(
        "--format",
        "csv",
        "select user_id, event_count, 'comma, \"quote\" and' || chr(10) || 'newline' as note "
        "from analytics.event_stats where user_id = 'alice'",
    )

    assert result.returncode == 0, result.stderr
    assert list(csv.reader(io.StringIO(result.stdout))) == [
        ["user_id", "event_count", "note"],
        ["alice", "12", 'comma, "quote" and\nnewline'],
    ]
    assert '"comma, ""quote"" and\nnewline"' in result.stdout


def test_json_is_an_array_of_objects_one_per_row(stats_warehouse):
    result = sql("--format", "json", "select * from analytics.event_stats order by 1, 2")

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [
        {"event_date": "2026-01-01", "user_id": "alice", "event_count": 12},
        {"event_date": "2026-01-01", "user_id": "bob", "event_count": 3},
        {"event_date": "2026-01-02", "user_id": "carol", "event_count": 1045},
    ]


def test_json_types_iso_dates_exact_numbers_and_null(stats_warehouse):
    result = sql(
        "--format",
        "json",
        "select date '2026-01-03' as d, timestamp '2026-01-03 04:05:06.5' as ts, "
        "timestamptz '2026-01-03 04:05:06+02' as tstz, time '23:59:01' as t, "
        "123456789012345678.125::decimal(38, 3) as dec, 9007199254740993::bigint as big, "
        "170141183460469231731687303715884105727::hugeint as huge, 0.1::double as dbl, "
        "null::varchar as n, true as flag, [1, 2] as list, {'k': 'v'} as struct, "
        "'NaN'::double as nan",
        env={"TZ": "UTC"},
    )

    assert result.returncode == 0, result.stderr
    [row] = json.loads(result.stdout, parse_float=Decimal)
    assert row == {
        "d": "2026-01-03",
        "ts": "2026-01-03T04:05:06.500000",
        "tstz": "2026-01-03T02:05:06+00:00",
        "t": "23:59:01",
        "dec": Decimal("123456789012345678.125"),
        "big": 9007199254740993,
        "huge": 170141183460469231731687303715884105727,
        "dbl": Decimal("0.1"),
        "n": None,
        "flag": True,
        "list": [1, 2],
        "struct": {"k": "v"},
        "nan": None,
    }


@pytest.mark.parametrize(
    ("output_format", "expected"),
    [
        ("table", "event_date  user_id  event_count\n----------  -------  -----------\n"),
        ("csv", "event_date,user_id,event_count\n"),
        ("json", "[]\n"),
    ],
)
def test_an_empty_result_prints_its_header(stats_warehouse, output_format, expected):
    result = sql("--format", output_format, "select * from analytics.event_stats where false")

    assert result.returncode == 0, result.stderr
    assert result.stdout == expected


def test_statements_that_return_nothing_print_nothing(stats_warehouse):
    result = sql("set threads = 1; begin; commit")

    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_several_statements_in_one_argument_print_one_json_document_each(stats_warehouse):
    result = sql(
        "--format", "json", "set variable n = 2; select getvariable('n') as n; select 'x' as x"
    )

    assert result.returncode == 0, result.stderr
    assert [json.loads(line) for line in result.stdout.splitlines()] == [[{"n": 2}], [{"x": "x"}]]


def test_warehouse_option_overrides_the_environment(stats_warehouse, tmp_path):
    other = tmp_path / "other.duckdb"
    with duckdb.connect(str(other)) as connection:
        connection.execute("create table marker as select 'other' as name")

    result = sql("--warehouse", str(other), "--format", "csv", "select name from marker")

    assert (result.returncode, result.stdout) == (0, "name\nother\n"), result.stderr


# --- stdin -------------------------------------------------------------------------------------


def test_piped_statements_run_in_order_each_printed(stats_warehouse):
    script = (
        "select count(*) as users\n"
        "from analytics.event_stats;\n"
        "-- a comment; not a statement\n"
        "select 'a;b' as text; /* ; */ select 1 as one;\n"
        "set variable day = date '2026-01-02';\n"
        "select user_id from analytics.event_stats where event_date = getvariable('day');\n"
        "select 'last, without a semicolon' as end"
    )

    result = sql("--format", "json", stdin=script)

    assert result.returncode == 0, result.stderr
    assert [json.loads(line) for line in result.stdout.splitlines()] == [
        [{"users": 3}],
        [{"text": "a;b"}],
        [{"one": 1}],
        [{"user_id": "carol"}],
        [{"end": "last, without a semicolon"}],
    ]
    assert result.stderr == ""  # no prompt when stdin is not a terminal


def test_piped_table_results_are_separated_by_a_blank_line(stats_warehouse):
    result = sql(stdin="select 1 as a;\nselect 2 as b;\n")

    assert result.returncode == 0, result.stderr
    assert result.stdout == "a\n-\n1\n\nb\n-\n2\n"


def test_a_failing_piped_statement_is_reported_and_the_next_ones_run(stats_warehouse):
    result = sql("--format", "json", stdin="select 1 as a;\nselec 2;\nselect 3 as c;\n")

    assert result.returncode == 1
    assert [json.loads(line) for line in result.stdout.splitlines()] == [[{"a": 1}], [{"c": 3}]]
    [error] = result.stderr.strip().splitlines()
    assert "syntax error" in error and "selec" in error


def test_quit_ends_the_session(stats_warehouse):
    result = sql("--format", "csv", stdin="select 1 as a;\n.quit\nselect 2 as b;\n")

    assert (result.returncode, result.stdout, result.stderr) == (0, "a\n1\n", "")


def test_a_terminal_gets_a_prompt_on_stderr_and_results_only_on_stdout(stats_warehouse):
    controller, terminal = pty.openpty()
    session = subprocess.Popen(
        [EVENT_STATS, "sql", "--format", "csv"],
        stdin=terminal,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    os.close(terminal)
    try:
        os.write(controller, b"select 41 + 1\n")
        os.write(controller, b"  as answer;\n")
        os.write(controller, b"\x04")  # Ctrl-D at the start of a line: end of input
        stdout, stderr = session.communicate(timeout=30)
    finally:
        os.close(controller)
    assert session.returncode == 0, stderr
    assert stdout == b"answer\n42\n"
    assert stderr.count(b"event-stats> ") == 2 and b"...> " in stderr


def test_ctrl_c_cancels_a_running_statement_and_the_session_goes_on(stats_warehouse):
    session = subprocess.Popen(
        [EVENT_STATS, "sql", "--format", "csv"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    reader = _LineReader(session.stdout)
    try:
        session.stdin.write("select 'ready' as state;\n")
        session.stdin.write("select count(*) from range(100000000000) t(i) where i % 7 = 0;\n")
        session.stdin.flush()
        assert [reader.next(), reader.next()] == ["state\n", "ready\n"]
        time.sleep(0.5)  # the endless statement is running now
        session.send_signal(signal.SIGINT)
        session.stdin.write("select 'after' as state;\n")
        session.stdin.close()
        assert session.wait(timeout=60) == 1  # a statement failed: it was interrupted
    finally:
        if session.poll() is None:
            session.kill()
            session.wait()
    assert [reader.next(), reader.next(), reader.next()] == ["\n", "state\n", "after\n"]
    assert "sql: interrupted" in session.stderr.read()


# --- errors ------------------------------------------------------------------------------------


def test_bad_sql_fails_with_duckdbs_message(stats_warehouse):
    error = one_line_error(sql("select from where"))

    assert error.startswith("sql: Parser Error: syntax error")


def test_a_missing_table_says_the_warehouse_may_not_be_built(stats_warehouse):
    error = one_line_error(sql("select * from raw.events"))

    assert "raw.events" in error and "not be built yet" in error
    assert str(stats_warehouse) in error and "$WAREHOUSE_PATH" in error


def test_a_missing_warehouse_says_where_it_was_looked_for(tmp_path):
    missing = tmp_path / "nowhere" / "warehouse.duckdb"

    error = one_line_error(sql("select 1", env={"WAREHOUSE_PATH": str(missing)}))

    assert str(missing) in error and "not be built yet" in error
    assert not missing.parent.exists()  # reading creates nothing


def test_writes_are_refused_and_change_nothing(stats_warehouse):
    for statement in (
        "delete from analytics.event_stats",
        "insert into analytics.event_stats values (date '2026-01-09', 'x', 1)",
        "drop table analytics.event_stats",
        "create table analytics.other (a int)",
    ):
        error = one_line_error(sql(statement))
        assert "read-only" in error and "only reads" in error, statement
    with wh.connect(stats_warehouse, read_only=True) as connection:
        rows = connection.execute("select * from analytics.event_stats order by 1, 2").fetchall()
    assert rows == STATS_ROWS


def test_the_statements_before_an_error_are_printed(stats_warehouse):
    result = sql("--format", "json", "select 1 as a; select * from nope")

    assert result.returncode == 1
    assert json.loads(result.stdout) == [{"a": 1}]
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_writer_holding_the_file_past_the_lock_timeout_is_named(stats_file):
    with duckdb.connect(str(stats_file)):
        result = sql("select 1", env={"WAREHOUSE_LOCK_TIMEOUT": "0.3"})

    assert result.returncode == 1 and result.stdout == ""
    error = result.stderr.strip().splitlines()[-1]  # after the "waiting" log lines
    assert error.startswith("sql: The warehouse") and "locked by" in error
    assert f"PID {os.getpid()}" in error


def test_a_statement_waits_for_a_writer_then_answers(stats_file):
    writer = duckdb.connect(str(stats_file))
    try:
        reader = subprocess.Popen(
            [
                EVENT_STATS,
                "sql",
                "--format",
                "csv",
                "select count(*) as n from analytics.event_stats",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(1.0)
        assert reader.poll() is None, reader.communicate()
    finally:
        writer.close()
    stdout, stderr = reader.communicate(timeout=30)
    assert (reader.returncode, stdout) == (0, "n\n3\n"), stderr


# --- with the real loader ----------------------------------------------------------------------


def load(api_url: str, day: date, env: dict[str, str] | None = None):
    return subprocess.run(
        [EVENT_STATS, "load", "--start", day.isoformat(), "--api-url", api_url],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_a_result_holds_the_rows_the_loader_wrote(warehouse, events_api):
    api_url = events_api(events_per_day=40)
    loaded = load(api_url, D)
    assert loaded.returncode == 0, loaded.stderr
    served = httpx.get(
        f"{api_url}/events", params={"start_date": "2026-01-01", "end_date": "2026-01-02"}
    ).json()

    result = sql(
        "--format",
        "json",
        "select event_id, user_id, event_type, event_at, event_date from raw.events order by 1",
    )

    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [row["event_id"] for row in rows] == sorted({event["event_id"] for event in served})
    assert {row["event_date"] for row in rows} == {"2026-01-01"}
    assert all(row["event_at"].startswith("2026-01-01T") for row in rows)


@pytest.fixture
def open_session(warehouse: Path) -> Iterator[tuple[subprocess.Popen, _LineReader]]:
    """An interactive `event-stats sql --format json` fed through a pipe, left open."""
    session = subprocess.Popen(
        [EVENT_STATS, "sql", "--format", "json"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    yield session, _LineReader(session.stdout)
    if session.poll() is None:
        session.kill()
        session.wait()


def ask(session: subprocess.Popen, reader: _LineReader, statement: str) -> object:
    session.stdin.write(statement + "\n")
    session.stdin.flush()
    return json.loads(reader.next())


def test_an_open_session_does_not_block_a_load(warehouse, events_api, open_session):
    api_url = events_api(events_per_day=30)
    assert load(api_url, D).returncode == 0
    session, reader = open_session
    [before] = ask(session, reader, "select count(*) as n from raw.events;")

    # The session stays open, idle between statements; a writer must not wait for it.
    second = load(api_url, date(2026, 1, 2), env={"WAREHOUSE_LOCK_TIMEOUT": "2"})

    assert second.returncode == 0, second.stderr
    [after] = ask(
        session,
        reader,
        "select count(*) as n, count(distinct event_date) as days\nfrom raw.events;",
    )
    assert after["days"] == 2 and after["n"] > before["n"]
    session.stdin.close()
    assert session.wait(timeout=30) == 0, session.stderr.read()
