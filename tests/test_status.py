"""`event-stats status`: per date loaded, built, emailed; gaps and stale dates named; exit codes.

The end-to-end tests build the warehouse with the real steps (tests/status_pipeline.py): the
events API in replay mode, `event-stats load`, dbt with vars, `event-stats send-stats`.
"""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta
from pathlib import Path

import duckdb
import pytest
from status_pipeline import TO, StatusPipeline, start_pipeline

from event_pipeline import status, warehouse
from event_pipeline.warehouse import status as status_queries
from event_pipeline.warehouse.email_log import SENDING, SENT, ensure_email_log
from event_pipeline.warehouse.stats import BuildRecord
from event_pipeline.warehouse.status import EmailRecord, Ledgers, LoadSummary

D1, D2, D3, D4 = (date(2026, 3, day) for day in (1, 2, 3, 4))
T = datetime(2026, 3, 10, 12, 0)


@pytest.fixture
def pipeline(tmp_path: Path, events_api, monkeypatch: pytest.MonkeyPatch) -> StatusPipeline:
    pipeline = start_pipeline(tmp_path, events_api, monkeypatch)
    pipeline.write_events(D1, {"u1": 3, "u2": 1})
    pipeline.write_events(D2, {"u1": 2, "u3": 4})
    pipeline.write_events(D3, {"u2": 5})
    pipeline.write_events(D4, {"u4": 1})
    return pipeline


def problems_of(report: dict) -> list[tuple[str, str, str]]:
    return [(p["date"], p["kind"], p["category"]) for p in report["problems"]]


def date_line(text: str, day: date) -> str:
    [line] = [line for line in text.splitlines() if line.startswith(str(day))]
    return line


# --- End to end: the real pipeline, then `event-stats status` ---------------------------------


@pytest.mark.e2e
def test_all_well_exits_0_and_shows_each_dates_load_build_and_email(pipeline: StatusPipeline):
    pipeline.load(D1, D4)
    pipeline.build(D1, D4)
    pipeline.send(D1, D2, D3)

    done = pipeline.status("--start", str(D1), "--end", str(D4))

    assert done.returncode == 0, done.stdout + done.stderr
    assert "All well: 3 date(s) loaded, built and emailed." in done.stdout
    line = date_line(done.stdout, D2)
    # rows, source host, users and events, email revision and recipients, no problem
    assert re.search(r"^2026-03-02\s+6\s+\S+ \S+\s+127\.0\.0\.1:\d+\s+manual-", line), line
    assert re.search(r"\s2\s+6\s+\S+ \S+\s+1\s+1\s+\S+ \S+\s+ok$", line), line

    code, report = pipeline.status_json("--start", str(D1), "--end", str(D4))
    assert code == 0 and report["ok"] is True and report["problems"] == []
    assert report["range"] == {"start": str(D1), "end": str(D4)}
    [d2] = [entry for entry in report["dates"] if entry["date"] == str(D2)]
    assert d2["raw"]["rows"] == 6 and d2["raw"]["source_url"].startswith(pipeline.api_url)
    assert d2["stats"]["users"] == 2 and d2["stats"]["events"] == 6
    assert d2["email"]["recipients"] == [TO] and d2["email"]["revision"] == 1


@pytest.mark.e2e
def test_gaps_are_named_and_exit_1(pipeline: StatusPipeline):
    pipeline.load(D1)
    pipeline.load(D3)  # D2 never loaded
    pipeline.build(D1, D2)  # D3 loaded, never built
    pipeline.send(D1)

    done = pipeline.status("--start", str(D1), "--end", str(D4))

    assert done.returncode == 1, done.stdout + done.stderr
    assert date_line(done.stdout, D1).endswith("ok")
    assert date_line(done.stdout, D2).endswith("not_loaded")
    assert date_line(done.stdout, D3).endswith("not_built")
    assert "2 problem(s) on 2 date(s): 2 gap(s), 0 stale:" in done.stdout
    assert f"- {D2}  not_loaded: never loaded into raw.events" in done.stdout
    assert f"- {D3}  not_built: loaded, but its stats were never built" in done.stdout
    assert f"--vars '{{start_date: {D3}, end_date: {D4}}}'" in done.stdout  # the fix
    code, report = pipeline.status_json("--start", str(D1), "--end", str(D4))
    assert code == 1 and report["ok"] is False and (report["gaps"], report["stale"]) == (2, 0)
    assert problems_of(report) == [(str(D2), "not_loaded", "gap"), (str(D3), "not_built", "gap")]


@pytest.mark.e2e
def test_stale_dates_are_named_and_the_email_is_compared_by_content(pipeline: StatusPipeline):
    pipeline.load(D1, D4 + timedelta(days=1))
    pipeline.build(D1, D4 + timedelta(days=1))
    pipeline.send(D1, D2, D3)  # D4 built, never sent
    pipeline.write_events(D1, {"u1": 3, "u2": 2})
    pipeline.write_events(D2, {"u1": 2, "u3": 5})
    pipeline.load(D1, D3)  # both changed after the build
    pipeline.build(D2, D4)  # D2 rebuilt with other stats, D3 rebuilt with the same stats

    code, report = pipeline.status_json("--start", str(D1), "--end", str(D4 + timedelta(days=1)))

    assert code == 1
    assert problems_of(report) == [
        (str(D1), "raw_changed", "stale"),
        (str(D2), "email_outdated", "stale"),
        (str(D4), "email_not_sent", "stale"),
    ]
    [d2] = [entry for entry in report["dates"] if entry["date"] == str(D2)]
    assert d2["email"]["outdated"] == [TO] and d2["stats"]["events"] == 7

    pipeline.send(D2)  # the update: revision 2, with the stats built now
    code, report = pipeline.status_json("--start", str(D2), "--end", str(D4))
    assert code == 0, report["problems"]
    assert report["dates"][0]["email"]["revision"] == 2


@pytest.mark.e2e
def test_the_default_range_runs_from_the_first_loaded_date_through_yesterday(
    pipeline: StatusPipeline,
):
    pipeline.load(D2, D4)
    pipeline.build(D2, D4)
    pipeline.send(D2, D3)

    report = status.read_report(warehouse_path=pipeline.warehouse, today=D4 + timedelta(days=2))
    alone = status.read_report(D3, warehouse_path=pipeline.warehouse)

    assert (report.start, report.end) == (D2, D4 + timedelta(days=2))
    assert [(p.event_date, p.kind) for p in report.problems] == [
        (D4, "not_loaded"),
        (D4 + timedelta(days=1), "not_loaded"),
    ]
    assert (alone.start, alone.end, alone.problems) == (D3, D4, [])


@pytest.mark.e2e
def test_missing_ledgers_mean_nothing_of_that_kind_yet(pipeline: StatusPipeline, tmp_path: Path):
    empty = pipeline.status()  # no warehouse file at all
    assert empty.returncode == status.EXIT_UNAVAILABLE
    assert f"status: No warehouse at {pipeline.warehouse}" in empty.stderr
    assert "Traceback" not in empty.stderr

    with warehouse.connect(pipeline.warehouse):  # a warehouse with no table at all
        pass
    nothing = pipeline.status()
    assert nothing.returncode == 0, nothing.stderr
    assert "no dates to report (nothing loaded before " in nothing.stdout

    pipeline.load(D1)  # raw only: no ops schema
    code, report = pipeline.status_json("--start", str(D1))
    assert code == 1 and problems_of(report) == [(str(D1), "not_built", "gap")]


def test_bad_arguments_exit_2(pipeline: StatusPipeline):
    with warehouse.connect(pipeline.warehouse):
        pass
    done = pipeline.status("--start", str(D2), "--end", str(D1))
    assert done.returncode == status.EXIT_UNAVAILABLE
    assert f"--end ({D1}) must be after --start ({D2})" in done.stderr


# --- The ledger reads --------------------------------------------------------------------------


class CountingConnection:
    """Counts the statements a read sends to DuckDB."""

    def __init__(self, connection: duckdb.DuckDBPyConnection) -> None:
        self.connection = connection
        self.statements = 0

    def execute(self, *args, **kwargs):
        self.statements += 1
        return self.connection.execute(*args, **kwargs)


def ledgers_of_days(path: Path, days: int, users: int = 50, *, rebuilt: bool = True) -> None:
    """Every ledger filled for `days` dates from D1, as the pipeline fills them (same tables):
    loaded, built, emailed, and with `rebuilt` built again after the email."""
    with warehouse.connect(path) as connection:
        warehouse.ensure_raw_schema(connection)
        ensure_email_log(connection)
        connection.execute("create schema analytics")
        connection.execute(
            "create table analytics.event_stats as "
            "select d::date as event_date, 'u' || u as user_id, 1 + u as event_count "
            "from range(?::date, ?::date + ?::integer, interval 1 day) dates(d), range(?) users(u)",
            [D1, D1, days, users],
        )
        connection.execute(
            "create table ops.build_log as "
            "select event_date, 'b' as invocation_id, count(*) as users, "
            "sum(event_count) as events, ?::timestamp as built_at "
            "from analytics.event_stats group by all",
            [T + timedelta(hours=2 if rebuilt else 0)],
        )
        connection.execute(
            "insert into raw.load_log select 'l' || event_date, 'run', event_date, events, 'c', "
            "true, 0, 0, 'http://x', ?::timestamp - interval 1 hour from ops.build_log",
            [T],
        )
        connection.execute(
            "insert into ops.email_log (event_date, recipient, revision, content_hash, "
            "message_id, total_events, users, backend, sent_at, status) "
            "select event_date, ?, 1, 'h', 'm', events, users, 'b', ?, 'sent' from ops.build_log",
            [TO, T + timedelta(hours=1)],
        )


def test_a_year_is_read_with_as_many_statements_as_a_day(tmp_path: Path):
    counts = {}
    for days in (1, 365):
        path = tmp_path / f"{days}-days"
        ledgers_of_days(path, days)
        with warehouse.connect(path, read_only=True) as connection:
            counting = CountingConnection(connection)
            ledgers = status_queries.read_ledgers(counting, None, None)
        assert len(ledgers.loads) == len(ledgers.builds) == len(ledgers.emails) == days
        assert len(ledgers.stats_hashes) == days
        counts[days] = counting.statements
    assert counts[365] == counts[1]


def test_the_stats_are_read_only_for_dates_built_again_after_their_email(tmp_path: Path):
    path = tmp_path / "w"
    ledgers_of_days(path, 3, rebuilt=False)

    with warehouse.connect(path, read_only=True) as connection:
        ledgers = status_queries.read_ledgers(connection, None, None)

    assert len(ledgers.emails) == 3 and ledgers.stats_hashes == {}
    report = status.build_report(D1, D4, ledgers)
    assert report.problems == []  # their emails hold the stats built before them


def test_the_stats_hash_is_the_one_send_stats_stores(tmp_path: Path):
    from event_pipeline.warehouse.stats import read_day_stats

    path = tmp_path / "w"
    ledgers_of_days(path, 2)
    with warehouse.connect(path, read_only=True) as connection:
        ledgers = status_queries.read_ledgers(connection, D2, D3)
        expected = read_day_stats(connection, D2).content_hash()
    assert ledgers.stats_hashes == {D2: expected}
    assert [row.event_date for row in ledgers.loads] == [D2]


def test_an_email_ledger_from_before_intent_rows_reads_as_sent(tmp_path: Path):
    path = tmp_path / "w.duckdb"
    with duckdb.connect(str(path)) as connection:
        connection.execute(
            """
            create schema ops;
            create table ops.email_log (
                event_date date not null, recipient varchar not null, revision integer not null,
                content_hash varchar not null, message_id varchar not null, supersedes varchar,
                total_events bigint not null, users bigint not null, backend varchar not null,
                sent_at timestamp not null, primary key (event_date, recipient, revision));
            insert into ops.email_log values
                ('2026-03-01', 'Team <Team@Example.com>', 1, 'h', 'm', null, 1, 1, 'b', now());
            """
        )
    with warehouse.connect(path, read_only=True) as connection:
        ledgers = status_queries.read_ledgers(connection, None, None)
    [row] = ledgers.emails
    assert row.status == SENT
    assert row.composed_at == row.sent_at is not None
    state = status.email_state(ledgers.emails, None)
    assert state is not None and state.recipients == ("team@example.com",)


# --- The report logic (pure functions) ----------------------------------------------------------


def load_of(day: date, at: datetime = T, changed_at: datetime | None = T) -> LoadSummary:
    return LoadSummary(day, 5, at, "http://api/events", "run-1", changed_at, 1)


def build_of(day: date, at: datetime = T + timedelta(hours=1)) -> BuildRecord:
    return BuildRecord(day, "inv", 2, 5, at)


def email_of(
    day: date, recipient: str = TO, revision: int = 1, content_hash: str = "h", state: str = SENT
) -> EmailRecord:
    sent_at = T + timedelta(hours=2) if state == SENT else None
    message_id = f"<m{revision}>"
    return EmailRecord(day, recipient, revision, state, content_hash, message_id, sent_at, T)


def test_the_email_state_takes_each_recipients_latest_email():
    rows = [
        email_of(D1, "a@x", 1, "old"),
        email_of(D1, "a@x", 2, "h"),
        email_of(D1, "b@x", 1, "old"),
        email_of(D1, "c@x", 1, "h", SENDING),
    ]

    state = status.email_state(rows, "h")
    not_rebuilt = status.email_state(rows, None)

    assert state is not None and not_rebuilt is not None
    assert not_rebuilt.outdated == ()
    assert state.revision == 2
    assert state.recipients == ("a@x", "b@x")
    assert state.outdated == ("b@x",)
    assert state.unconfirmed == ("c@x",)
    assert status.email_state([], "h") is None


def test_each_kind_of_problem_and_a_gap_hides_the_ones_after_it():
    def kinds(load, build, email) -> list[str]:
        return [p.kind for p in status.date_problems(D1, load, build, email)]

    fine = status.email_state([email_of(D1)], "h")
    assert kinds(load_of(D1), build_of(D1), fine) == []
    assert kinds(None, build_of(D1), fine) == ["not_loaded"]
    assert kinds(load_of(D1), None, None) == ["not_built"]
    assert kinds(load_of(D1), build_of(D1), None) == ["email_not_sent"]
    changed_later = load_of(D1, T + timedelta(hours=3), T + timedelta(hours=3))
    assert kinds(changed_later, build_of(D1), fine) == ["raw_changed"]
    unchanged_later = load_of(D1, T + timedelta(hours=3), T)  # reloaded, raw untouched
    assert kinds(unchanged_later, build_of(D1), fine) == []
    outdated = status.email_state([email_of(D1, content_hash="old")], "h")
    assert kinds(load_of(D1), build_of(D1), outdated) == ["email_outdated"]
    sending = status.email_state([email_of(D1, state=SENDING)], "h")
    assert kinds(load_of(D1), build_of(D1), sending) == ["email_unconfirmed"]


def test_the_default_range():
    ledgers = Ledgers([load_of(D2)], [build_of(D3)], [], {})
    today = D4 + timedelta(days=10)

    assert status.report_range(None, None, ledgers, today) == (D2, today)
    assert status.report_range(None, None, ledgers, D1) == (D2, D4)  # a date after today
    assert status.report_range(None, D3, ledgers, today) == (D2, D3)
    assert status.report_range(None, None, Ledgers([], [], [], {}), today) == (today, today)
    assert status.requested_bounds(D3, None) == (D3, D4)
    with pytest.raises(status.StatusUnavailableError, match="must be after --start"):
        status.requested_bounds(D3, D3)


def test_the_summary_groups_consecutive_dates_of_a_kind():
    days = [D1 + timedelta(days=n) for n in range(10)]
    ledgers = Ledgers(
        [load_of(day) for day in days[:6]], [build_of(day) for day in days[:5]], [], {}
    )

    report = status.build_report(D1, days[-1] + timedelta(days=1), ledgers)
    text = status.render_text(report)

    assert report.exit_code == status.EXIT_PROBLEMS
    assert len(report.problems) == 10  # 5 not sent, 1 not built, 4 not loaded
    summary = text[text.index("problem(s)") :].splitlines()
    assert summary[1] == f"- {D1} to {days[4]} (5 dates)  email_not_sent: built, but no email " + (
        "was ever sent"
    )
    assert "for each date D from 2026-03-01 to 2026-03-05" in summary[2]
    assert summary[3].startswith(f"- {days[5]}  not_built: ")
    assert summary[5] == f"- {days[6]} to {days[9]} (4 dates)  not_loaded: never loaded into " + (
        "raw.events"
    )
    assert "--from-date 2026-03-07 --to-date 2026-03-10" in summary[6]
