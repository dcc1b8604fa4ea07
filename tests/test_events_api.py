"""The events API, tested over HTTP against the real server (`event-stats serve-events`)."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import subprocess
import sys
import threading
import time
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from event_pipeline.events import records as event_records
from event_pipeline.events.generator import generate_day_batches

NDJSON = {"Accept": "application/x-ndjson"}
RFC_1123 = re.compile(
    r"(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep"
    r"|Oct|Nov|Dec) \d{4} \d\d:\d\d:\d\d GMT"
)


def events_url(base: str, start: date | str, end: date | str) -> str:
    return f"{base}/events?start_date={start}&end_date={end}"


def get_bytes(base: str, start: date | str, end: date | str, ndjson: bool = False) -> bytes:
    response = httpx.get(events_url(base, start, end), headers=NDJSON if ndjson else {}, timeout=60)
    response.raise_for_status()
    return response.content


def get_events(base: str, start: date | str, end: date | str) -> list[dict[str, Any]]:
    return json.loads(get_bytes(base, start, end))


def utc(timestamp: str) -> datetime:
    moment = datetime.fromisoformat(timestamp)
    assert moment.tzinfo is not None, f"timestamp without offset: {timestamp}"
    return moment.astimezone(UTC)


def write_replay(directory: Path, name: str, records: list[dict[str, Any]]) -> None:
    directory.mkdir(exist_ok=True)
    (directory / name).write_text(json.dumps(records), encoding="utf-8")


def event(event_id: str, timestamp: str, **extra: Any) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "user": "10.0.0.1",
        "timestamp": timestamp,
        "event_type": "click",
        **extra,
    }


# Stateless servers shared by the tests of this module (each start costs about a second).


@pytest.fixture(scope="module")
def generated(events_api_module) -> str:
    """Generated mode with the default volume."""
    return events_api_module()


@pytest.fixture(scope="module")
def five_a_day(events_api_module) -> str:
    """Generated mode with --events-per-day 5."""
    return events_api_module(events_per_day=5)


# --- generated mode ----------------------------------------------------------------------------


def test_generated_day_has_the_documented_shape(generated):
    base = generated
    assert httpx.get(f"{base}/health").json()["status"] == "ok"
    for day in (date(2019, 1, 1), date(2024, 2, 29)):
        records = get_events(base, day, day + timedelta(days=1))
        assert 200 <= len(records) <= 2000, "default volume is like the book's API"
        assert len({r["user"] for r in records}) <= 100
        assert len({r["event_id"] for r in records}) == len(records)
        times = [utc(r["timestamp"]) for r in records]
        assert times == sorted(times)
        start = datetime.combine(day, datetime.min.time(), UTC)
        assert start <= times[0] and times[-1] < start + timedelta(days=1)
        for record in records:
            assert set(record) == {"event_id", "user", "timestamp", "event_type"}
            ipaddress.IPv4Address(record["user"])


@pytest.mark.parametrize("first_ordinal", [1, 9_999_000])
def test_records_put_together_in_batches_say_each_event_as_json_would(first_ordinal):
    # The serializer builds records from byte tables, not json.dumps: compare with json.dumps of
    # each event, also where event_ids grow past seven digits (a day of more than 9,999,999).
    [batch, *_] = generate_day_batches(date(2024, 2, 29), 3000)
    batch = replace(batch, first_ordinal=first_ordinal)
    events = list(batch.events())
    assert first_ordinal + len(events) > 10_000_000 or first_ordinal == 1
    for record_format in event_records.RECORD_FORMATS:
        expected = []
        for e in events:
            moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=e.at_ms)
            if record_format == "book":
                record = {"date": format_datetime(moment, usegmt=True), "user": e.user}
            else:
                timestamp = moment.isoformat(timespec="milliseconds")
                record = {"event_id": e.event_id, "user": e.user, "timestamp": timestamp}
                record["event_type"] = e.event_type
            expected.append(json.dumps(record, separators=(",", ":")))
        [text] = event_records.generated_records([batch], record_format)
        assert text.decode("ascii").split("\n") == expected, record_format


def test_same_bytes_in_every_process_and_time_zone(events_api, generated):
    # The book's API seeded with local time, so its data changed with TZ. Ours must not; the
    # range spans the day Europe moved to summer time (2019-03-31).
    servers = [generated] + [events_api(env={"TZ": tz}) for tz in ("Asia/Tokyo", "Europe/Berlin")]
    bodies = [get_bytes(base, "2019-03-30", "2019-04-01") for base in servers]
    assert bodies[0] == bodies[1] == bodies[2]
    # Pinned across releases: a change here silently changes every backfilled day of every user.
    # If the generator is changed on purpose, say so in the changelog and update the digest.
    first_day = get_bytes(servers[1], "2019-01-01", "2019-01-02")
    assert hashlib.sha256(first_day).hexdigest() == (
        "a7ea06bcf54164a5b7858af5f7bf2f88d5f837ecc6e820a6b8aac91352d1efce"
    )


def test_a_range_is_the_union_of_its_days(generated):
    base = generated
    start = date(2019, 12, 28)  # across a year boundary
    week = get_bytes(base, start, start + timedelta(days=7), ndjson=True)
    days = [
        get_bytes(base, start + timedelta(days=n), start + timedelta(days=n + 1), ndjson=True)
        for n in range(7)
    ]
    assert week == b"".join(days)
    assert all(days), "every day has events"
    assert json.loads(get_bytes(base, start, start + timedelta(days=7))) == [
        json.loads(line) for line in week.splitlines()
    ]


def test_events_per_day_sets_the_volume_up_to_the_longest_range(events_api, five_a_day):
    records = get_events(five_a_day, "2020-01-01", "2021-01-01")  # 366 days (leap year): the max
    assert len(records) == 5 * 366
    assert [r["event_id"] for r in records[4:7]] == [
        "20200101-0000005",
        "20200102-0000001",
        "20200102-0000002",
    ]
    empty = events_api(events_per_day=0)
    assert get_events(empty, "2020-06-01", "2020-06-03") == []
    assert get_bytes(empty, "2020-06-01", "2020-06-03", ndjson=True) == b""


def test_ndjson_and_json_carry_the_same_records(generated):
    base = generated
    url = events_url(base, "2019-01-01", "2019-01-03")
    as_json = httpx.get(url)
    as_ndjson = httpx.get(url, headers={"Accept": "application/x-ndjson, */*;q=0.1"})
    assert as_json.headers["content-type"].startswith("application/json")
    assert as_ndjson.headers["content-type"].startswith("application/x-ndjson")
    assert as_json.json() == [json.loads(line) for line in as_ndjson.text.splitlines()]


BAD_QUERIES = [
    ("start_date=2019-01-01", "end_date is required"),
    ("start_date=yesterday&end_date=2019-01-02", "start_date='yesterday' is not a date"),
    ("start_date=2019-02-30&end_date=2019-03-02", "start_date='2019-02-30' is not a date"),
    ("start_date=20190101&end_date=2019-01-02", "use YYYY-MM-DD"),
    ("start_date=2019-01-01T00:00&end_date=2019-01-02", "is not a date"),
    ("start_date=2019-01-02&end_date=2019-01-02", "must be before end_date"),
    ("start_date=2019-01-03&end_date=2019-01-02", "must be before end_date"),
    ("start_date=2019-01-01&end_date=2020-01-03", "at most 366 days"),
]


@pytest.mark.parametrize("volume", [0, 5])
@pytest.mark.parametrize("ndjson", [False, True], ids=["json", "ndjson"])
def test_every_answer_proves_it_is_complete(events_api_module, volume, ndjson):
    """The source contract, server side: 200, chunked (so a cut shows), an array closed by ']',
    and an empty day either `[]` or an empty body declared as NDJSON."""
    url = events_api_module(events_per_day=volume)
    with httpx.stream(
        "GET", events_url(url, "2019-01-01", "2019-01-02"), headers=NDJSON if ndjson else {}
    ) as response:
        body = response.read()
    assert response.status_code == 200
    assert response.headers["transfer-encoding"] == "chunked"
    media_type = response.headers["content-type"].split(";")[0]
    assert media_type == ("application/x-ndjson" if ndjson else "application/json")
    if ndjson:
        assert len(body.splitlines()) == volume and (body == b"" or body.endswith(b"\n"))
    else:
        assert body.rstrip().endswith(b"]") and len(json.loads(body)) == volume


def test_bad_parameters_get_a_400_that_says_why(generated):
    base = generated
    for query, message in BAD_QUERIES:
        response = httpx.get(f"{base}/events?{query}")
        assert response.status_code == 400, query
        assert message in response.json()["detail"], query


def serve_events_cli(*options: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "event_pipeline.cli", "serve-events", *options]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_the_command_line_refuses_bad_options(tmp_path):
    negative = serve_events_cli("--fail-first", "-1")
    assert negative.returncode == 2
    assert "--fail-first" in negative.stderr and "must be >= 0" in negative.stderr
    both_modes = serve_events_cli("--data-dir", str(tmp_path), "--events-per-day", "5")
    assert both_modes.returncode != 0
    assert "--events-per-day is for generated mode" in both_modes.stderr


# --- the book's record format -------------------------------------------------------------------


def test_book_format_has_the_books_shape_and_the_same_events(events_api, generated, tmp_path):
    day, next_day = "2019-01-01", "2019-01-02"
    standard = get_events(generated, day, next_day)
    book = get_events(events_api(record_format="book"), day, next_day)
    assert len(book) == len(standard)
    for ours, theirs in zip(standard, book, strict=True):
        assert set(theirs) == {"user", "date"}
        assert RFC_1123.fullmatch(theirs["date"])
        moment = utc(ours["timestamp"]).replace(microsecond=0)
        assert theirs == {
            "user": ours["user"],
            "date": moment.strftime("%a, %d %b %Y %H:%M:%S GMT"),
        }
    assert book[0]["date"].startswith("Tue, 01 Jan 2019 ")

    replay_dir = tmp_path / "replay"
    write_replay(replay_dir, "a.json", [event("x", "2019-01-02T08:30:15.900+09:00")])
    replayed = get_events(events_api(data_dir=replay_dir, record_format="book"), day, next_day)
    assert replayed == [{"user": "10.0.0.1", "date": "Tue, 01 Jan 2019 23:30:15 GMT"}]


# --- replay mode -------------------------------------------------------------------------------


def test_replay_window_edges_offsets_and_order(events_api, tmp_path):
    data = tmp_path / "replay"
    write_replay(
        data,
        "b.json",
        [
            event("late", "2019-01-01T23:59:59.999+00:00", source="b"),
            event("next-day", "2019-01-02T00:00:00+00:00"),
            event("tokyo-same-utc-day", "2019-01-02T08:59:59+09:00"),  # 2019-01-01T23:59:59Z
            event("tokyo-previous-utc-day", "2019-01-01T08:59:59.999+09:00"),  # 2018-12-31
        ],
    )
    write_replay(
        data,
        "a.json",
        [
            event("first", "2019-01-01T09:00:00+09:00"),  # 2019-01-01T00:00:00Z: in
            event("zulu", "2019-01-01T12:00:00Z"),
            event("new-york-next-utc-day", "2019-01-01T19:00:00-05:00"),  # 2019-01-02T00:00Z
        ],
    )
    (data / "notes.txt").write_text("not a *.json file: ignored")
    # A timestamp without offset is taken as UTC; a book-shaped record is placed by its date.
    write_replay(
        data,
        "c.json",
        [
            event("naive", "2019-01-03T05:00:00"),
            {"user": "10.0.0.2", "date": "Thu, 03 Jan 2019 06:00:00 GMT"},
        ],
    )
    base = events_api(data_dir=data)

    records = get_events(base, "2019-01-01", "2019-01-02")
    assert [r["event_id"] for r in records] == ["first", "zulu", "tokyo-same-utc-day", "late"]
    # Passed through untouched: the offset as written, extra fields kept.
    assert records[2]["timestamp"] == "2019-01-02T08:59:59+09:00"
    assert records[3] == event("late", "2019-01-01T23:59:59.999+00:00", source="b")

    next_day = get_events(base, "2019-01-02", "2019-01-03")
    # Same instant: file-name order (a.json before b.json) breaks the tie.
    assert [r["event_id"] for r in next_day] == ["new-york-next-utc-day", "next-day"]
    previous = get_events(base, "2018-12-31", "2019-01-01")
    assert [r["event_id"] for r in previous] == ["tokyo-previous-utc-day"]
    ndjson = get_bytes(base, "2018-12-31", "2019-01-03", ndjson=True).splitlines()
    assert len(ndjson) == 7
    assert get_events(base, "2019-01-03", "2019-01-04") == [
        event("naive", "2019-01-03T05:00:00"),
        {"user": "10.0.0.2", "date": "Thu, 03 Jan 2019 06:00:00 GMT"},
    ]


def test_replay_rereads_the_files_on_every_request(events_api, tmp_path):
    data = tmp_path / "replay"
    write_replay(data, "day.json", [event("a", "2019-01-01T10:00:00+00:00")])
    base = events_api(data_dir=data)

    def ids() -> list[str]:
        return [r["event_id"] for r in get_events(base, "2019-01-01", "2019-01-02")]

    assert ids() == ["a"]
    write_replay(
        data,
        "day.json",
        [event("a", "2019-01-01T10:00:00+00:00"), event("b", "2019-01-01T11:00:00+00:00")],
    )
    assert ids() == ["a", "b"]
    write_replay(data, "late.json", [event("c", "2019-01-01T10:30:00+00:00")])
    assert ids() == ["a", "c", "b"]
    (data / "day.json").unlink()
    assert ids() == ["c"]
    (data / "late.json").unlink()
    assert ids() == []


def test_replay_of_a_broken_file_names_the_file(events_api, tmp_path):
    data = tmp_path / "replay"
    write_replay(data, "good.json", [event("a", "2019-01-01T10:00:00+00:00")])
    base = events_api(data_dir=data)
    (data / "broken.json").write_text('[{"event_id": "x", "timestamp": "2019-01-01T10:00:00+00:00"')
    response = httpx.get(events_url(base, "2019-01-01", "2019-01-02"))
    assert response.status_code == 500
    assert "broken.json" in response.json()["detail"]
    write_replay(data, "broken.json", [event("b", "yesterday")])
    detail = httpx.get(events_url(base, "2019-01-01", "2019-01-02")).json()["detail"]
    assert "broken.json: record 0" in detail


# --- fault modes -------------------------------------------------------------------------------


def test_fail_first_answers_503_then_serves(events_api):
    base = events_api(fail_first=2, events_per_day=10)
    url = events_url(base, "2019-01-01", "2019-01-02")
    first = httpx.get(url)
    assert httpx.get(f"{base}/health").status_code == 200  # not counted
    second = httpx.get(url)
    third = httpx.get(url)
    assert (first.status_code, second.status_code, third.status_code) == (503, 503, 200)
    assert "simulated outage" in first.json()["detail"]
    assert len(third.json()) == 10


def test_delay_answers_slowly(events_api):
    base = events_api(delay=1.0, events_per_day=10)
    url = events_url(base, "2019-01-01", "2019-01-02")
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(url, timeout=0.3)
    started = time.monotonic()
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200
    assert time.monotonic() - started >= 1.0
    assert httpx.get(f"{base}/health", timeout=0.5).status_code == 200


def test_truncate_after_cuts_the_body_and_drops_the_connection(events_api, five_a_day):
    base = events_api(truncate_after=1000, events_per_day=5)
    url = events_url(base, "2019-01-01", "2019-01-03")  # 10 events: about 1300 bytes
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(url)
    received = bytearray()
    with pytest.raises(httpx.RemoteProtocolError), httpx.stream("GET", url) as response:
        assert response.status_code == 200
        for chunk in response.iter_bytes():
            received += chunk
    assert len(received) == 1000
    normal = five_a_day
    assert bytes(received) == get_bytes(normal, "2019-01-01", "2019-01-03")[:1000]
    # A body shorter than the limit (one day: about 650 bytes) arrives whole.
    one_day = get_bytes(base, "2019-01-01", "2019-01-02")
    assert len(one_day) < 1000
    assert one_day == get_bytes(normal, "2019-01-01", "2019-01-02")


# --- streaming a large day ---------------------------------------------------------------------


class PeakRss:
    """Samples a process's resident memory in a thread; reports the peak in MB."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def _high_water_mark(self) -> int:
        """The kernel's exact peak (Linux VmHWM), which sampling could miss; 0 elsewhere."""
        status = Path(f"/proc/{self.process.pid}/status")
        if status.exists():
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return 0

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._high_water_mark())

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20


def server_pid(base: str) -> int:
    port = base.rsplit(":", 1)[1]
    for child in psutil.Process().children():
        try:
            if port in child.cmdline():
                return child.pid
        except psutil.Error:  # an earlier test's server that has exited (a zombie until reaped)
            continue
    raise AssertionError(f"no server process of ours listens on port {port}")


def test_a_million_events_stream_in_bounded_memory(events_api, capsys):
    base = events_api(events_per_day=1_000_000)
    pid = server_pid(base)
    idle_mb = psutil.Process(pid).memory_info().rss / 2**20
    url = events_url(base, "2019-01-01", "2019-01-02")
    report = []
    for label, headers in (("JSON", {}), ("NDJSON", NDJSON)):
        lines = 0
        size = 0
        tail = b""
        started = time.monotonic()
        with PeakRss(pid) as rss, httpx.stream("GET", url, headers=headers, timeout=60) as response:
            assert response.status_code == 200
            for chunk in response.iter_raw():
                lines += chunk.count(b"\n")
                size += len(chunk)
                tail = (tail + chunk)[-400:]
        seconds = time.monotonic() - started
        last = tail.rstrip(b"\n]").rsplit(b"\n", 1)[-1]
        assert json.loads(last)["event_id"] == "20190101-1000000"
        assert lines == (1_000_000 + 2 if label == "JSON" else 1_000_000)
        report.append(
            f"{label}: {size / 2**20:.0f} MB in {seconds:.1f} s, "
            f"server peak RSS {rss.peak_mb:.0f} MB (idle {idle_mb:.0f} MB)"
        )
        assert rss.peak_mb < 400, report[-1]
        # The body is about 120 MB: building it in memory even once would break this.
        assert rss.peak_mb - idle_mb < 100, report[-1]
    with capsys.disabled():
        print("\n1M events/day: " + "; ".join(report))
