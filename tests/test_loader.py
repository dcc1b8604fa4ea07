"""The loader against the real events API (serve-events) and a real DuckDB file.

A few tests need a source that misbehaves in ways our events API never does (events outside the
requested window, broken JSON, invalid records). For those, Python's own static file server
serves a fixed file named `events`; it ignores the query string, like a careless API would.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path

import httpx
import pytest
from raw_http_server import Answer
from servers import free_port, stop_process, wait_for_http

from event_pipeline import warehouse as wh
from event_pipeline.loader import load_range
from event_pipeline.sources import EventSourceError
from event_pipeline.warehouse.raw import partition_checksum

D = date(2019, 1, 1)
D1 = D + timedelta(days=1)
EVENT_COLUMNS = "event_id, user_id, event_type, event_at, event_date, load_id"


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTS_API_ATTEMPTS", "3")
    monkeypatch.setenv("EVENTS_API_BACKOFF", "0.05")
    monkeypatch.setenv("EVENTS_API_TIMEOUT", "10")


@pytest.fixture
def static_source(tmp_path: Path):
    """Serve a fixed body for every GET /events...: returns (write_body, base_url)."""
    root = tmp_path / "static"
    root.mkdir()
    (root / "events").write_text("[]")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/events", process)

        def write(body: str | list) -> None:
            text = body if isinstance(body, str) else json.dumps(body)
            (root / "events").write_text(text)

        yield write, url
    finally:
        stop_process(process)


def event(event_id: str, at: str, user: str = "10.0.0.1", kind: str = "click") -> dict:
    return {"event_id": event_id, "user": user, "timestamp": at, "event_type": kind}


def write_replay(directory: Path, records: list[dict], name: str = "events.json") -> None:
    directory.mkdir(exist_ok=True)
    for old in directory.glob("*.json"):
        old.unlink()
    (directory / name).write_text(json.dumps(records))


def stored(path: Path, day: date | None = None) -> list[tuple]:
    where = "where event_date = ?" if day else ""
    with wh.connect(path, read_only=True) as connection:
        return connection.execute(
            f"select {EVENT_COLUMNS} from raw.events {where} order by event_id",
            [day] if day else [],
        ).fetchall()


def ledger(path: Path) -> list[dict]:
    with wh.connect(path, read_only=True) as connection:
        cursor = connection.execute("select * from raw.load_log order by loaded_at")
        names = [column[0] for column in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def api_records(url: str, start: date, end: date) -> list[dict]:
    response = httpx.get(f"{url}/events", params={"start_date": start, "end_date": end})
    response.raise_for_status()
    return response.json()


# --- idempotent, exact ---------------------------------------------------------------------


def test_reload_of_an_unchanged_source_leaves_raw_events_identical(events_api, warehouse):
    url = events_api()
    first = load_range(D, D + timedelta(days=3), api_url=url, warehouse_path=warehouse)
    before = stored(warehouse)
    expected_ids = sorted(r["event_id"] for r in api_records(url, D, D + timedelta(days=3)))
    assert [row[0] for row in before] == expected_ids
    assert [r.changed for r in first] == [True, True, True]
    assert all(row[4] == row[3].date() for row in before)  # event_date = UTC date of event_at

    second = load_range(D, D + timedelta(days=3), api_url=url, warehouse_path=warehouse)
    assert stored(warehouse) == before  # same rows, values and load_ids: nothing rewritten
    assert [r.changed for r in second] == [False, False, False]
    assert [r.checksum for r in second] == [r.checksum for r in first]
    log = ledger(warehouse)
    assert len(log) == 6
    assert [row["changed"] for row in log[3:]] == [False, False, False]
    assert all(row["rows"] > 0 and row["source_url"].startswith(url) for row in log)


def test_the_checksum_is_the_one_earlier_ledgers_were_written_with(events_api, warehouse):
    """Ledger rows of earlier versions stay comparable: the checksum is still the sums of
    md5_number_upper and md5_number_lower of each row's key (now computed from one md5)."""
    (result,) = load_range(D, api_url=events_api(), warehouse_path=warehouse)
    with wh.connect(warehouse, read_only=True) as connection:
        ((rows, upper, lower),) = connection.execute(
            "select count(*), sum(md5_number_upper(row_key)), sum(md5_number_lower(row_key)) "
            "from (select concat_ws(chr(31), event_id, user_id, coalesce(event_type, chr(0)), "
            "strftime(event_at, '%Y-%m-%dT%H:%M:%S.%f')) as row_key from raw.events)"
        ).fetchall()
        assert partition_checksum(connection, D) == (rows, f"{rows}-{upper:x}-{lower:x}")
    assert result.checksum == f"{rows}-{upper:x}-{lower:x}" and rows > 0


def test_changed_source_is_reflected_exactly(events_api, warehouse, tmp_path):
    data = tmp_path / "replay"
    write_replay(
        data,
        [
            event("a", "2019-01-01T08:00:00+00:00"),
            event("b", "2019-01-01T09:00:00+00:00"),
            event("c", "2019-01-01T23:30:00-05:00"),  # 04:30 UTC on Jan 2: the next partition
            event("d", "2019-01-02T10:00:00+00:00"),
        ],
    )
    url = events_api(data_dir=data)
    load_range(D, D + timedelta(days=2), api_url=url, warehouse_path=warehouse)
    assert [row[0] for row in stored(warehouse, D)] == ["a", "b"]
    assert [row[0] for row in stored(warehouse, D1)] == ["c", "d"]
    day_two = stored(warehouse, D1)

    # b deleted, a changed, e arrives late; Jan 2 is not reloaded and must not move.
    write_replay(
        data,
        [
            event("a", "2019-01-01T08:00:00+00:00", user="10.0.0.9"),
            event("e", "2019-01-01T12:00:00+01:00"),
            event("c", "2019-01-01T23:30:00-05:00"),
            event("d", "2019-01-02T10:00:00+00:00"),
        ],
    )
    (result,) = load_range(D, api_url=url, warehouse_path=warehouse)
    rows = stored(warehouse, D)
    assert [(r[0], r[1], r[3]) for r in rows] == [
        ("a", "10.0.0.9", datetime(2019, 1, 1, 8)),
        ("e", "10.0.0.1", datetime(2019, 1, 1, 11)),
    ]
    assert {r[5] for r in rows} == {result.load_id}
    assert result.changed and result.rows == 2
    assert stored(warehouse, D1) == day_two

    # The source now has nothing for Jan 1: the partition becomes empty, the ledger says so.
    write_replay(
        data,
        [event("c", "2019-01-01T23:30:00-05:00"), event("d", "2019-01-02T10:00:00+00:00")],
    )
    (result,) = load_range(D, api_url=url, warehouse_path=warehouse)
    assert stored(warehouse, D) == []
    assert (result.rows, result.changed) == (0, True)
    assert ledger(warehouse)[-1]["rows"] == 0
    (again,) = load_range(D, api_url=url, warehouse_path=warehouse)
    assert (again.rows, again.changed) == (0, False)


def test_same_event_id_twice_is_stored_once(events_api, warehouse, tmp_path):
    data = tmp_path / "replay"
    write_replay(
        data,
        [
            event("x", "2019-01-01T08:00:00Z"),
            event("x", "2019-01-01T08:00:00Z"),
            event("y", "2019-01-01T09:00:00Z"),
        ],
    )
    (result,) = load_range(D, api_url=events_api(data_dir=data), warehouse_path=warehouse)
    assert [row[0] for row in stored(warehouse)] == ["x", "y"]
    assert (result.rows, result.duplicates) == (2, 1)
    assert ledger(warehouse)[-1]["duplicates"] == 1


def test_a_copy_outside_the_window_does_not_hide_the_copy_inside(raw_source, warehouse):
    """An event_id delivered twice, once dated in the day and once outside, is stored once."""
    raw_source.script(
        Answer(
            body=json.dumps(
                [
                    event("x", "2018-12-31T23:00:00Z"),  # earlier, outside the window
                    event("x", "2019-01-01T08:00:00+05:00"),  # 03:00 UTC: inside
                    event("y", "2019-01-01T09:00:00Z"),
                    event("y", "2019-01-02T00:00:00Z"),  # later, outside
                    event("z", "2019-01-02T01:00:00Z"),  # only outside
                    event("z", "2018-12-31T01:00:00Z"),
                ]
            ).encode()
        )
    )
    (result,) = load_range(D, api_url=raw_source.url, warehouse_path=warehouse)
    assert [(row[0], row[3]) for row in stored(warehouse)] == [
        ("x", datetime(2019, 1, 1, 3)),
        ("y", datetime(2019, 1, 1, 9)),
    ]
    assert (result.rows, result.duplicates, result.out_of_window) == (2, 3, 1)
    assert ledger(warehouse)[-1]["rows"] == 2


def run_advice(message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the `event-stats load ...` commands quoted in an error message, as a user would."""
    (quoted,) = re.findall(r"`(event-stats load [^`]*)`", message)
    monkeypatch.delenv("EVENTS_API_URL", raising=False)
    for command in quoted.split(" && "):
        words = shlex.split(command)
        assert words[:2] == ["event-stats", "load"]
        done = subprocess.run(
            [sys.executable, "-m", "event_pipeline.cli", *words[1:]],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("stored_on", "moved_to"),
    [(D, D1), (D1, D)],
    ids=["moved-forwards", "moved-backwards"],
)
def test_a_redated_event_is_refused_with_a_command_that_fixes_it(
    events_api, warehouse, tmp_path, monkeypatch, stored_on, moved_to
):
    data = tmp_path / "replay"
    others = [event("a", "2019-01-01T01:00:00Z"), event("b", "2019-01-02T01:00:00Z")]
    write_replay(data, [*others, event("m", f"{stored_on}T08:00:00Z")])
    url = events_api(data_dir=data)
    load_range(D, D + timedelta(days=2), api_url=url, warehouse_path=warehouse)
    write_replay(data, [*others, event("m", f"{moved_to}T08:00:00Z")])  # the source corrected it
    with pytest.raises(EventSourceError) as error:
        load_range(moved_to, api_url=url, warehouse_path=warehouse)
    message = str(error.value)
    assert f"m (stored under {stored_on})" in message and "nothing was written" in message
    assert [(row[0], row[4]) for row in stored(warehouse)] == [
        ("a", D),
        ("b", D1),
        ("m", stored_on),
    ]
    run_advice(message, monkeypatch)
    assert [(row[0], row[4]) for row in stored(warehouse)] == [
        ("a", D),
        ("b", D1),
        ("m", moved_to),
    ]


def test_events_swapped_between_two_dates_are_fixed_by_the_command_the_error_gives(
    events_api, warehouse, tmp_path, monkeypatch
):
    # m moves from D to D1 and n from D1 to D: reloading either date alone refuses in turn.
    data = tmp_path / "replay"
    write_replay(data, [event("m", "2019-01-01T08:00:00Z"), event("n", "2019-01-02T08:00:00Z")])
    url = events_api(data_dir=data)
    load_range(D, D + timedelta(days=2), api_url=url, warehouse_path=warehouse)
    write_replay(data, [event("m", "2019-01-02T08:00:00Z"), event("n", "2019-01-01T08:00:00Z")])
    with pytest.raises(EventSourceError) as error:
        load_range(D1, api_url=url, warehouse_path=warehouse)
    assert [(row[0], row[4]) for row in stored(warehouse)] == [("m", D), ("n", D1)]
    run_advice(str(error.value), monkeypatch)
    assert [(row[0], row[4]) for row in stored(warehouse)] == [("m", D1), ("n", D)]


def test_events_outside_the_window_are_counted_not_written(
    events_api, static_source, warehouse, tmp_path, caplog
):
    data = tmp_path / "replay"
    write_replay(data, [event("next-day", "2019-01-02T10:00:00Z")])
    load_range(D1, api_url=events_api(data_dir=data), warehouse_path=warehouse)
    day_two = stored(warehouse, D1)

    write, url = static_source
    write(
        [
            event("in", "2019-01-01T10:00:00Z"),
            event("late", "2019-01-02T00:00:00Z"),
            event("early", "2018-12-31T23:59:59.999+00:00"),
            event("early2", "2019-01-01T00:30:00+01:00"),
        ]
    )
    with caplog.at_level(logging.WARNING):
        (result,) = load_range(D, api_url=url, warehouse_path=warehouse)
    assert [row[0] for row in stored(warehouse, D)] == ["in"]
    assert stored(warehouse, D1) == day_two
    assert stored(warehouse, date(2018, 12, 31)) == []
    assert result.out_of_window == 3
    assert ledger(warehouse)[-1]["out_of_window"] == 3
    assert "2018-12-31: 2, 2019-01-02: 1" in caplog.text


# --- a range: one request per window of at most 366 days --------------------------------------


def ledger_by_date(path: Path) -> dict[date, tuple]:
    """The latest raw.load_log row of each date: (rows, checksum, out_of_window, duplicates)."""
    with wh.connect(path, read_only=True) as connection:
        rows = connection.execute(
            "select event_date, rows, checksum, out_of_window, duplicates from raw.load_log "
            "qualify row_number() over (partition by event_date order by loaded_at desc) = 1"
        ).fetchall()
    return {row[0]: row[1:] for row in rows}


def content(path: Path) -> list[tuple]:
    """raw.events without load_id (which names the load, not the content)."""
    return [row[:5] for row in stored(path)]


def edge_records() -> list[dict]:
    """Three days of records with offsets across midnight, a same-day duplicate id, identical
    book-shaped records (synthesized ids) and an empty middle-of-range day (Jan 3)."""
    return [
        event("a", "2019-01-01T00:00:00Z"),
        event("b", "2019-01-01T23:30:00-05:00"),  # 04:30 UTC on Jan 2
        event("c", "2019-01-02T00:30:00+01:00"),  # 23:30 UTC on Jan 1
        event("d", "2019-01-02T12:00:00Z"),
        event("d", "2019-01-02T12:00:00Z"),
        {"user": "10.0.0.7", "date": "Wed, 02 Jan 2019 08:00:00 GMT"},
        {"user": "10.0.0.7", "date": "Wed, 02 Jan 2019 08:00:00 GMT"},
        event("e", "2019-01-04T23:59:59.999Z"),
    ]


def test_a_range_loads_what_per_date_loads_load_in_one_request(events_api, warehouse, tmp_path):
    data = tmp_path / "replay"
    write_replay(data, edge_records())
    url = events_api(data_dir=data)
    end = D + timedelta(days=5)
    results = load_range(D, end, api_url=url, warehouse_path=warehouse)
    per_date = tmp_path / "per-date"
    for offset in range(5):
        day = D + timedelta(days=offset)
        load_range(day, api_url=url, warehouse_path=per_date)

    assert content(warehouse) == content(per_date)
    assert [row[0] for row in stored(warehouse, D)] == ["a", "c"]
    assert ledger_by_date(warehouse) == ledger_by_date(per_date)
    assert [(r.rows, r.duplicates) for r in results] == [(2, 0), (4, 1), (0, 0), (1, 0), (0, 0)]
    window_url = f"{url}/events?start_date=2019-01-01&end_date=2019-01-06"
    assert {row["source_url"] for row in ledger(warehouse)} == {window_url}  # one request
    with wh.connect(warehouse, read_only=True) as connection:
        for result in results:  # each date's rows carry its own ledger row's load_id
            assert partition_checksum(connection, result.event_date) == (
                result.rows,
                result.checksum,
            )
            loads = connection.execute(
                "select distinct load_id from raw.events where event_date = ?",
                [result.event_date],
            ).fetchall()
            assert loads == ([(result.load_id,)] if result.rows else [])


def test_generated_days_load_what_per_date_loads_load(events_api, warehouse, tmp_path):
    url = events_api(events_per_day=50)
    end = D + timedelta(days=60)
    load_range(D, end, api_url=url, warehouse_path=warehouse)
    per_date = tmp_path / "per-date"
    load_range(D, end, api_url=url, warehouse_path=per_date, days_per_request=1)
    assert content(warehouse) == content(per_date)
    assert len(content(warehouse)) == 60 * 50
    assert ledger_by_date(warehouse) == ledger_by_date(per_date)
    assert len({row["source_url"] for row in ledger(warehouse)}) == 1
    assert len({row["source_url"] for row in ledger(per_date)}) == 60


def test_an_unchanged_date_inside_a_changed_range_is_left_alone(events_api, warehouse, tmp_path):
    data = tmp_path / "replay"
    days = [event("a", "2019-01-01T08:00:00Z"), event("b", "2019-01-02T08:00:00Z")]
    write_replay(data, [*days, event("c", "2019-01-03T08:00:00Z")])
    url = events_api(data_dir=data)
    end = D + timedelta(days=3)
    first = load_range(D, end, api_url=url, warehouse_path=warehouse)
    before = {day: stored(warehouse, day) for day in (D, D1)}

    write_replay(data, [*days, event("c", "2019-01-03T09:00:00Z")])  # only Jan 3 changes
    second = load_range(D, end, api_url=url, warehouse_path=warehouse)
    assert [r.changed for r in second] == [False, False, True]
    assert {day: stored(warehouse, day) for day in (D, D1)} == before  # same rows, same load_ids
    assert [row[3] for row in stored(warehouse, D + timedelta(days=2))] == [datetime(2019, 1, 3, 9)]
    assert [r.checksum for r in second[:2]] == [r.checksum for r in first[:2]]
    log = ledger(warehouse)
    assert len(log) == 6  # one row per date per load
    assert [(row["event_date"], row["changed"]) for row in log[3:]] == sorted(
        [(D, False), (D1, False), (D + timedelta(days=2), True)]
    )


def test_a_date_that_became_empty_inside_a_range_is_emptied(events_api, warehouse, tmp_path):
    data = tmp_path / "replay"
    outer = [event("a", "2019-01-01T08:00:00Z"), event("c", "2019-01-03T08:00:00Z")]
    write_replay(data, [*outer, event("b", "2019-01-02T08:00:00Z")])
    url = events_api(data_dir=data)
    end = D + timedelta(days=3)
    load_range(D, end, api_url=url, warehouse_path=warehouse)
    write_replay(data, outer)
    results = load_range(D, end, api_url=url, warehouse_path=warehouse)
    assert [(r.rows, r.changed) for r in results] == [(1, False), (0, True), (1, False)]
    assert stored(warehouse, D1) == []
    assert ledger_by_date(warehouse)[D1][:2] == (0, "0-0-0")
    assert [row[0] for row in stored(warehouse)] == ["a", "c"]


def test_a_range_answer_cut_in_the_middle_leaves_every_date_exactly_old(
    events_api, warehouse, monkeypatch
):
    end = D + timedelta(days=20)
    load_range(D, end, api_url=events_api(events_per_day=300), warehouse_path=warehouse)
    before, log_before = stored(warehouse), ledger(warehouse)
    new = events_api(events_per_day=400)
    size = len(httpx.get(f"{new}/events", params={"start_date": D, "end_date": end}).content)
    monkeypatch.setenv("EVENTS_API_ATTEMPTS", "2")
    cut = events_api(events_per_day=400, truncate_after=size // 2)
    with pytest.raises(EventSourceError, match="2019-01-01 to 2019-01-20.*RemoteProtocolError"):
        load_range(D, end, api_url=cut, warehouse_path=warehouse)
    assert stored(warehouse) == before and ledger(warehouse) == log_before
    # The same answer whole replaces every date.
    results = load_range(D, end, api_url=new, warehouse_path=warehouse)
    assert all(r.changed and r.rows == 400 for r in results)


def test_an_invalid_record_on_the_last_day_of_a_range_writes_no_day(static_source, warehouse):
    write, url = static_source
    end = D + timedelta(days=3)
    write([event("a", "2019-01-01T08:00:00Z")])
    load_range(D, end, api_url=url, warehouse_path=warehouse)
    before, log_before = stored(warehouse), ledger(warehouse)
    write(
        [
            event("b", "2019-01-01T09:00:00Z"),
            {"event_id": "x", "user": 7, "timestamp": "2019-01-03T10:00:00Z"},
        ]
    )
    with pytest.raises(EventSourceError, match="2019-01-01 to 2019-01-03.*not a string"):
        load_range(D, end, api_url=url, warehouse_path=warehouse)
    assert stored(warehouse) == before and ledger(warehouse) == log_before


def test_ranges_longer_than_366_days_are_asked_for_in_366_day_windows(events_api, warehouse):
    url = events_api(events_per_day=3)
    for days, windows in ((366, 1), (367, 2), (800, 3)):
        end = D + timedelta(days=days)
        results = load_range(D, end, api_url=url, warehouse_path=warehouse)
        assert [r.event_date for r in results] == [D + timedelta(days=i) for i in range(days)]
        assert all(r.rows == 3 for r in results)
        urls = sorted({r.source_url for r in results})
        assert len(urls) == windows
        assert urls[0] == f"{url}/events?start_date=2019-01-01&end_date=2020-01-02"
    assert len(stored(warehouse)) == 800 * 3


def test_events_outside_a_range_are_counted_on_its_first_and_last_dates(
    static_source, warehouse, caplog
):
    write, url = static_source
    write(
        [
            event("early", "2018-12-31T23:00:00Z"),
            event("early", "2018-12-31T22:00:00Z"),  # a duplicate, outside too
            event("in-1", "2019-01-01T10:00:00Z"),
            event("in-2", "2019-01-02T10:00:00Z"),
            event("in-2", "2019-01-04T10:00:00Z"),  # its copy outside loses to the one inside
            event("late", "2019-01-04T00:00:00Z"),
            event("later", "2019-01-09T00:00:00Z"),
        ]
    )
    with caplog.at_level(logging.WARNING):
        results = load_range(D, D + timedelta(days=3), api_url=url, warehouse_path=warehouse)
    assert [row[0] for row in stored(warehouse)] == ["in-1", "in-2"]
    assert [(r.rows, r.out_of_window, r.duplicates) for r in results] == [
        (1, 1, 1),  # "early" (twice) before the window
        (1, 0, 1),  # in-2 kept here, its other copy dropped
        (0, 2, 0),  # "late" and "later" after the window
    ]
    assert "2019-01-01 to 2019-01-03: the source sent 3 event(s) dated outside" in caplog.text
    assert "2018-12-31: 1, 2019-01-04: 1, 2019-01-09: 1" in caplog.text


def test_an_event_redated_inside_a_range_moves_with_the_range(events_api, warehouse, tmp_path):
    data = tmp_path / "replay"
    write_replay(data, [event("m", "2019-01-01T08:00:00Z")])
    url = events_api(data_dir=data)
    end = D + timedelta(days=2)
    load_range(D, end, api_url=url, warehouse_path=warehouse)
    write_replay(data, [event("m", "2019-01-02T08:00:00Z")])
    results = load_range(D, end, api_url=url, warehouse_path=warehouse)
    assert [(r.rows, r.changed) for r in results] == [(0, True), (1, True)]
    assert [(row[0], row[4]) for row in stored(warehouse)] == [("m", D1)]


# --- the book's record shape -----------------------------------------------------------------


def book_groupby_size(records: list[dict]) -> Counter:
    """The book's events.groupby(['date', 'user']).size(), with 'date' as the UTC day."""
    return Counter(
        (parsedate_to_datetime(r["date"]).astimezone(UTC).date(), r["user"]) for r in records
    )


def stored_counts(path: Path) -> Counter:
    with wh.connect(path, read_only=True) as connection:
        rows = connection.execute(
            "select event_date, user_id, count(*) from raw.events group by all"
        ).fetchall()
    return Counter({(day, user): count for day, user, count in rows})


def test_book_format_counts_equal_the_books_groupby(events_api, warehouse, tmp_path):
    # Identical records (same user, same second) are separate events in the book.
    data = tmp_path / "replay"
    write_replay(
        data,
        [{"user": "192.168.0.1", "date": "Tue, 01 Jan 2019 00:00:00 GMT"}] * 3
        + [{"user": "192.168.0.2", "date": "Tue, 01 Jan 2019 13:14:15 GMT"}]
        + [{"user": "192.168.0.1", "date": "Wed, 02 Jan 2019 00:00:00 GMT"}] * 2,
    )
    url = events_api(data_dir=data, record_format="book")
    end = D + timedelta(days=2)
    first = load_range(D, end, api_url=url, warehouse_path=warehouse)
    expected = book_groupby_size(api_records(url, D, end))
    assert expected[(D, "192.168.0.1")] == 3
    assert stored_counts(warehouse) == expected
    before = stored(warehouse)
    assert len({row[0] for row in before}) == 6

    # Reloading synthesizes the same event_ids: nothing changes.
    second = load_range(D, end, api_url=url, warehouse_path=warehouse)
    assert stored(warehouse) == before
    assert [r.changed for r in first] == [True, True]
    assert [r.changed for r in second] == [False, False]

    # One of the three identical records disappears at the source: exactly one row goes.
    write_replay(
        data,
        [{"user": "192.168.0.1", "date": "Tue, 01 Jan 2019 00:00:00 GMT"}] * 2
        + [{"user": "192.168.0.2", "date": "Tue, 01 Jan 2019 13:14:15 GMT"}],
    )
    load_range(D, api_url=url, warehouse_path=warehouse)
    assert stored_counts(warehouse)[(D, "192.168.0.1")] == 2


def test_generated_book_format_range(events_api, warehouse):
    url = events_api(record_format="book", events_per_day=3000)
    end = D + timedelta(days=3)
    load_range(D, end, api_url=url, warehouse_path=warehouse)
    expected = book_groupby_size(api_records(url, D, end))
    assert sum(expected.values()) == 9000
    assert stored_counts(warehouse) == expected


def test_book_shape_with_iso_dates(static_source, warehouse):
    write, url = static_source
    write(
        [
            {"user": "u1", "date": "2019-01-01T10:00:00"},  # no offset: UTC
            {"user": "u1", "date": "2019-01-01T10:00:00"},
            {"user": "u2", "date": "2019-01-01T01:00:00+02:00"},  # 2018-12-31 23:00 UTC
        ]
    )
    (result,) = load_range(D, api_url=url, warehouse_path=warehouse)
    assert [(r[1], r[3]) for r in stored(warehouse)] == sorted(
        [("u1", datetime(2019, 1, 1, 10)), ("u1", datetime(2019, 1, 1, 10))],
    )
    assert (result.rows, result.out_of_window) == (2, 1)


# --- source failures: retry, then a clear error; nothing written -----------------------------


@pytest.fixture
def loaded_day(static_source, warehouse) -> list[tuple]:
    """Jan 1 loaded, to check that failed loads leave it alone."""
    write, url = static_source
    write([event("old-1", "2019-01-01T03:00:00Z"), event("old-2", "2019-01-01T04:00:00Z")])
    load_range(D, api_url=url, warehouse_path=warehouse)
    write("[]")
    return stored(warehouse)


def test_retries_server_errors_then_succeeds(events_api, warehouse, caplog):
    url = events_api(fail_first=2)
    with caplog.at_level(logging.WARNING):
        (result,) = load_range(D, api_url=url, warehouse_path=warehouse)
    assert result.rows == len(api_records(url, D, D1))
    assert caplog.text.count("HTTP 503") == 2


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"fail_first": 10}, "HTTP 503"),
        ({"truncate_after": 5000}, "RemoteProtocolError"),
        ({"delay": 3}, "ReadTimeout"),
    ],
)
def test_persistent_source_failure_names_date_and_url(
    events_api, warehouse, loaded_day, monkeypatch, options, message
):
    monkeypatch.setenv("EVENTS_API_ATTEMPTS", "2")
    monkeypatch.setenv("EVENTS_API_TIMEOUT", "0.5")
    url = events_api(**options)
    with pytest.raises(EventSourceError) as error:
        load_range(D, api_url=url, warehouse_path=warehouse)
    text = str(error.value)
    assert "2019-01-01" in text and url in text and message in text and "2 attempts" in text
    assert stored(warehouse) == loaded_day
    assert len(ledger(warehouse)) == 1


def test_connection_refused_is_retried_then_reported(warehouse, caplog):
    url = f"http://127.0.0.1:{free_port()}"
    with caplog.at_level(logging.WARNING), pytest.raises(EventSourceError, match="ConnectError"):
        load_range(D, api_url=url, warehouse_path=warehouse)
    assert caplog.text.count("retrying") == 2  # 3 attempts


def test_client_error_fails_at_once(events_api, warehouse, loaded_day, monkeypatch):
    monkeypatch.setenv("EVENTS_API_BACKOFF", "30")  # a retry would make this test time out
    url = events_api() + "/no-such-prefix"
    started = time.monotonic()
    with pytest.raises(EventSourceError, match=r"HTTP 404 from http://.*2019-01-01"):
        load_range(D, api_url=url, warehouse_path=warehouse)
    assert time.monotonic() - started < 10
    assert stored(warehouse) == loaded_day


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            '[{"event_id": "a", "user": "u", "timestamp": "2019-01-01T00:00:00Z"',
            "incomplete JSON array",
        ),
        ("[1, 2]", "could not be read as JSON"),
        ([{"event_id": "a", "timestamp": "2019-01-01T10:00:00Z"}], 'missing "user"'),
        ([{"event_id": "a", "user": 7, "timestamp": "2019-01-01T10:00:00Z"}], "not a string"),
        ([{"event_id": 1, "user": "u", "timestamp": "2019-01-01T10:00:00Z"}], '"event_id" is'),
        ([{"event_id": "a", "user": "u"}], 'missing "timestamp"'),
        ([{"event_id": "a", "user": "u", "timestamp": "yesterday"}], '"timestamp" is not ISO'),
        ([{"user": "u", "date": "Tue, 32 Jan 2019 00:00:00 GMT"}], '"date" is not ISO'),
    ],
)
def test_invalid_delivery_names_date_url_and_problem(
    static_source, warehouse, loaded_day, body, message
):
    write, url = static_source
    if isinstance(body, list):
        body = body + [event("fine", "2019-01-01T11:00:00Z")]
    write(body)
    with pytest.raises(EventSourceError) as error:
        load_range(D, api_url=url, warehouse_path=warehouse)
    text = str(error.value)
    assert "2019-01-01" in text and url in text and message in text
    assert stored(warehouse) == loaded_day
    assert len(ledger(warehouse)) == 1


def test_accepts_ndjson_and_refuses_an_empty_body_that_proves_nothing(static_source, warehouse):
    # Deliberate change: an empty body served as application/octet-stream used to empty the day.
    # An empty day must now come as `[]` or as an empty NDJSON answer (see test_sources.py).
    write, url = static_source
    write(
        json.dumps(event("n1", "2019-01-01T01:00:00Z"))
        + "\n"
        + json.dumps(event("n2", "2019-01-01T02:00:00Z"))
        + "\n"
    )
    (result,) = load_range(D, api_url=url, warehouse_path=warehouse)
    assert result.rows == 2
    before = stored(warehouse)
    write("")
    with pytest.raises(EventSourceError, match="does not prove an empty day"):
        load_range(D, api_url=url, warehouse_path=warehouse)
    assert stored(warehouse) == before
    write("[]")
    (result,) = load_range(D, api_url=url, warehouse_path=warehouse)
    assert (result.rows, result.changed) == (0, True)
    assert stored(warehouse) == []


# --- the writer lock ---------------------------------------------------------------------------


def test_waits_for_another_writer_then_loads(static_source, duckdb_file_warehouse):
    """On a DuckDB file, held by another process (a lake has no lock)."""
    from test_warehouse import hold_lock

    warehouse = duckdb_file_warehouse
    write, url = static_source
    write([event("a", "2019-01-01T01:00:00Z")])
    holder = hold_lock(warehouse, 1.5)
    try:
        (result,) = load_range(D, api_url=url, warehouse_path=warehouse)
        assert holder.poll() is not None
        assert result.rows == len(stored(warehouse)) == 1
    finally:
        holder.kill()
        holder.wait()


def test_gives_up_on_a_held_lock_naming_the_holder(
    static_source, duckdb_file_warehouse, monkeypatch
):
    from test_warehouse import hold_lock

    warehouse = duckdb_file_warehouse
    monkeypatch.setenv("WAREHOUSE_LOCK_TIMEOUT", "1")
    _, url = static_source
    holder = hold_lock(warehouse, 60)
    try:
        with pytest.raises(wh.WarehouseLockedError, match=f"PID {holder.pid}"):
            load_range(D, api_url=url, warehouse_path=warehouse)
    finally:
        holder.kill()
        holder.wait()


# --- command line, progress, temp files --------------------------------------------------------


def test_cli_loads_a_range_with_progress_and_fails_clearly(events_api, warehouse, tmp_path):
    url = events_api()
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    command = [sys.executable, "-m", "event_pipeline.cli", "load", "--api-url", url]
    command += ["--warehouse", str(warehouse), "--start", "2019-01-01"]
    done = subprocess.run(
        [*command, "--end", "2019-01-04"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "[1/3] 2019-01-01" in done.stderr and "[3/3] 2019-01-03" in done.stderr
    assert "[1-3/3] 2019-01-01 to 2019-01-03 in one request" in done.stderr
    assert "loaded 3 date(s): 3 replaced, 0 unchanged" in done.stderr
    assert not list(tmp_path.glob("event-stats-load-*"))  # the downloads were removed

    failed = subprocess.run(
        [*command, "--end", "2018-12-01"], env=env, capture_output=True, text=True, timeout=60
    )
    assert failed.returncode != 0 and "must be after start" in failed.stderr


def test_temp_download_is_removed_on_failure(static_source, warehouse, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    write, url = static_source
    write("[{")
    with pytest.raises(EventSourceError):
        load_range(D, api_url=url, warehouse_path=warehouse)
    assert not list(tmp_path.glob("event-stats-load-*"))


# --- SIGKILL in the middle of replacing large partitions ---------------------------------------


def window_state(path: Path, dates: list[date]) -> list[tuple]:
    """Per date: (rows, checksum) stored, and the checksum of its latest ledger row."""
    with wh.connect(path, read_only=True) as connection:
        latest = dict(
            connection.execute(
                "select event_date, checksum from raw.load_log "
                "qualify row_number() over (partition by event_date order by loaded_at desc) = 1"
            ).fetchall()
        )
        return [(*partition_checksum(connection, day), latest.get(day)) for day in dates]


def kill_during_write(command: list[str], warehouse: Path, old_file: Path, delay: float) -> None:
    """Restore the old warehouse, run `command` (a load) and SIGKILL it `delay` s after BEGIN."""
    Path(f"{warehouse}.wal").unlink(missing_ok=True)  # left by the killed writer
    shutil.copyfile(old_file, warehouse)
    process = subprocess.Popen(
        [*command[:3], "-v", *command[3:]], stderr=subprocess.PIPE, text=True
    )
    seen = ""
    for line in process.stderr:  # the loader logs (at debug level) just before BEGIN
        seen += line
        if "replacing the partition" in line:
            break
    else:
        pytest.fail(f"the loader ended before its transaction:\n{seen}")
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()


@pytest.mark.parametrize(
    ("days", "old_volume", "new_volume"),
    [(1, 300_000, 330_000), (30, 10_000, 11_000)],
    ids=["one-large-date", "a-30-day-range"],
)
def test_sigkill_leaves_every_date_of_the_request_complete_old_or_complete_new(
    events_api, duckdb_file_warehouse, days, old_volume, new_volume
):
    """On a DuckDB file (tests/test_ducklake.py kills a load on a DuckLake)."""
    warehouse = duckdb_file_warehouse
    dates = [D + timedelta(days=i) for i in range(days)]
    end = D + timedelta(days=days)
    load_range(D, end, api_url=events_api(events_per_day=old_volume), warehouse_path=warehouse)
    old = window_state(warehouse, dates)
    old_file = warehouse.with_name("old.duckdb")
    shutil.copyfile(warehouse, old_file)  # closed and checkpointed: the file is the whole state

    command = [sys.executable, "-m", "event_pipeline.cli", "load", "--start", str(D)]
    command += ["--end", str(end), "--warehouse", str(warehouse)]
    command += ["--api-url", events_api(events_per_day=new_volume)]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    new = window_state(warehouse, dates)
    assert all(n != o for n, o in zip(new, old, strict=True))
    assert sum(rows for rows, _, _ in new) == days * new_volume

    outcomes = []
    for delay in (0.0, 0.05, 0.15, 0.4):
        kill_during_write(command, warehouse, old_file, delay)
        state = window_state(warehouse, dates)
        # every date old or every date new, each with the ledger row that describes it
        assert state in (old, new), f"killed {delay} s into the transaction: mixed"
        outcomes.append("new" if state == new else "old")
    print(f"kills 0 to 0.4 s after BEGIN left: {outcomes}")
    assert "old" in outcomes, outcomes  # at least one kill landed inside the transaction


@pytest.mark.e2e
def test_a_million_event_day_loads_in_bounded_memory(events_api, warehouse):
    """The body goes to a file and DuckDB parses it within LOADER_MEMORY_LIMIT (spilling beyond)."""
    url = events_api(events_per_day=1_000_000)
    env = {**os.environ, "LOADER_MEMORY_LIMIT": "200MB"}
    command = [sys.executable, "-m", "event_pipeline.cli", "load", "--start", "2019-01-01"]
    process = subprocess.Popen(
        [*command, "--api-url", url, "--warehouse", str(warehouse)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _, status, usage = os.wait4(process.pid, 0)  # this child's own peak RSS
    process.returncode = os.waitstatus_to_exitcode(status)
    assert process.returncode == 0
    with wh.connect(warehouse, read_only=True) as connection:
        assert partition_checksum(connection, D)[0] == 1_000_000
    peak_mb = usage.ru_maxrss / 1024  # KiB on Linux
    print(f"1M-event day: loader peak RSS {peak_mb:.0f} MB")
    # Measured 335 to 580 MB (it varies with the machine's load). The 123 MB body parsed into
    # Python objects would take well over 1 GB, so this bound fails if the data enters Python.
    assert peak_mb < 900, f"peak RSS {peak_mb:.0f} MB"
