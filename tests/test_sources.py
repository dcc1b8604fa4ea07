"""The source boundary: a stored day is replaced only from an answer that is provably complete.

Wire faults our events API never produces (a redirect, 204, a body cut at a record boundary with
no length, close-delimited NDJSON, an empty body that says nothing) come from a test-only server
that writes answers by hand (tests/raw_http_server.py). Each test first loads a day, then shows
that the refused answer left the day and its ledger exactly as they were.
"""

from __future__ import annotations

import json
import zlib
from datetime import date, timedelta
from pathlib import Path

import pytest
from raw_http_server import Answer, RawHttpServer, ndjson_answer

from event_pipeline import warehouse as wh
from event_pipeline.loader import load_range
from event_pipeline.sources import EventSourceError
from event_pipeline.warehouse.raw import partition_checksum

D = date(2019, 1, 1)
ATTEMPTS = 3


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTS_API_ATTEMPTS", str(ATTEMPTS))
    monkeypatch.setenv("EVENTS_API_BACKOFF", "0.01")
    monkeypatch.setenv("EVENTS_API_TIMEOUT", "10")


def event(event_id: str, at: str, user: str = "10.0.0.1") -> dict:
    return {"event_id": event_id, "user": user, "timestamp": at, "event_type": "click"}


OLD = [event("old-1", "2019-01-01T03:00:00Z"), event("old-2", "2019-01-01T04:00:00Z")]
NEW = [event(f"new-{i}", f"2019-01-01T{i:02d}:30:00+00:00") for i in range(10)]


def array_body(records: list[dict]) -> bytes:
    """Like our API's JSON array: one record a line, so a cut can fall between records."""
    if not records:
        return b"[\n]\n"
    return ("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n").encode()


def ndjson_body(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def state(path: Path) -> tuple[tuple[int, str], list[tuple]]:
    """(rows, checksum) of D, and the ledger rows for D."""
    with wh.connect(path, read_only=True) as connection:
        stored = partition_checksum(connection, D)
        ledger = connection.execute(
            "select rows, checksum, changed from raw.load_log where event_date = ? "
            "order by loaded_at",
            [D],
        ).fetchall()
    return stored, ledger


@pytest.fixture
def old_day(raw_source: RawHttpServer, warehouse: Path) -> tuple:
    """D loaded from OLD; returns its state, to compare after a refused answer."""
    raw_source.script(Answer(body=array_body(OLD)))
    load_range(D, api_url=raw_source.url, warehouse_path=warehouse)
    before = state(warehouse)
    assert before[0][0] == 2 and len(before[1]) == 1
    return before


def refused(raw_source: RawHttpServer, warehouse: Path, *answers: Answer) -> str:
    """Load D from `answers`; it must fail. Returns the error text."""
    raw_source.script(*answers)
    with pytest.raises(EventSourceError) as error:
        load_range(D, api_url=raw_source.url, warehouse_path=warehouse)
    text = str(error.value)
    assert "2019-01-01" in text and raw_source.url in text, text
    return text


# --- status ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        Answer(204, headers=()),
        Answer(201, body=array_body(NEW)),
        Answer(206, body=array_body(NEW[:3])),
        Answer(304, headers=()),
    ],
    ids=["204", "201", "206", "304"],
)
def test_only_200_replaces_a_day(raw_source, warehouse, old_day, answer):
    text = refused(raw_source, warehouse, answer)
    assert f"HTTP {answer.status}" in text and "nothing was written" in text.lower()
    assert len(raw_source.requests) == 1  # not retried: the answer is what the source means
    assert state(warehouse) == old_day


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_not_followed_and_says_what_to_do(raw_source, warehouse, old_day, status):
    location = (
        "https://new-host.example:8443/api/v2/events?start_date=2019-01-01&end_date=2019-01-02"
    )
    text = refused(raw_source, warehouse, Answer(status, headers=(("Location", location),)))
    assert f"HTTP {status}" in text and location in text
    assert "set EVENTS_API_URL to https://new-host.example:8443/api/v2" in text
    assert len(raw_source.requests) == 1
    assert state(warehouse) == old_day


def test_a_relative_redirect_names_the_absolute_address(raw_source, warehouse, old_day):
    location = "/moved/events?start_date=2019-01-01&end_date=2019-01-02"
    text = refused(raw_source, warehouse, Answer(301, headers=(("Location", location),)))
    assert f"set EVENTS_API_URL to {raw_source.url}/moved " in text
    assert state(warehouse) == old_day


# --- framing: a body cut in transit is retried, then refused -----------------------------------


def _record_boundaries(body: bytes) -> list[int]:
    """Offsets just after each ',\\n' between records: where a cut looks like a shorter day."""
    return [i + 2 for i in range(len(body)) if body[i : i + 2] == b",\n"]


@pytest.mark.parametrize("framing", ["content-length", "chunked", "close"])
def test_a_body_cut_at_a_record_boundary_is_retried_then_refused(
    raw_source, warehouse, old_day, framing
):
    body = array_body(NEW)
    cut = _record_boundaries(body)[4]  # five whole records, then the connection drops
    answer = Answer(body=body, framing=framing, chunk_size=64, cut_at=cut)
    text = refused(raw_source, warehouse, answer)
    assert f"after {ATTEMPTS} attempts" in text
    expected = "incomplete JSON array" if framing == "close" else "RemoteProtocolError"
    assert expected in text
    assert len(raw_source.requests) == ATTEMPTS
    assert state(warehouse) == old_day


@pytest.mark.parametrize("framing", ["content-length", "chunked", "close"])
def test_a_cut_body_then_a_whole_one_loads_the_new_day(raw_source, warehouse, old_day, framing):
    body = array_body(NEW)
    cut = Answer(body=body, framing=framing, cut_at=_record_boundaries(body)[2])
    raw_source.script(cut, Answer(body=body, framing=framing))
    (result,) = load_range(D, api_url=raw_source.url, warehouse_path=warehouse)
    assert (result.rows, result.changed) == (10, True)
    assert len(raw_source.requests) == 2


def test_ndjson_cut_between_lines_is_refused_in_every_framing(raw_source, warehouse, old_day):
    body = ndjson_body(NEW)
    cut = body.index(b"\n", len(body) // 2) + 1  # a clean line boundary
    for framing in ("content-length", "chunked"):
        refused(raw_source, warehouse, ndjson_answer(body, framing=framing, cut_at=cut))
    text = refused(raw_source, warehouse, ndjson_answer(body, framing="close", cut_at=cut))
    assert "only by the connection closing" in text and "Content-Length or chunked" in text
    assert len(raw_source.requests) == 1  # a property of the answer, not a transient fault
    assert state(warehouse) == old_day


@pytest.mark.parametrize("version", ["HTTP/1.0", "HTTP/1.1"])
def test_a_close_delimited_array_is_accepted_when_it_is_closed(raw_source, warehouse, version):
    raw_source.script(Answer(body=array_body(NEW), framing="close", http_version=version))
    (result,) = load_range(D, api_url=raw_source.url, warehouse_path=warehouse)
    assert result.rows == 10


def test_close_delimited_ndjson_is_refused_even_when_whole(raw_source, warehouse, old_day):
    answer = ndjson_answer(ndjson_body(NEW), framing="close", http_version="HTTP/1.0")
    text = refused(raw_source, warehouse, answer)
    assert "NDJSON whose end was marked only by the connection closing" in text
    assert state(warehouse) == old_day


def test_a_framed_array_without_its_closing_bracket_is_refused(raw_source, warehouse, old_day):
    body = array_body(NEW)
    cut_body = body[: _record_boundaries(body)[4]]  # Content-Length matches the cut body
    text = refused(raw_source, warehouse, Answer(body=cut_body))
    assert "incomplete JSON array" in text and "closing ']'" in text
    assert state(warehouse) == old_day


# --- an empty body is an empty day only when the answer proves it ------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        Answer(body=b"[]"),
        Answer(body=b"[\n]\n", framing="chunked"),
        Answer(body=b"[]", framing="close", http_version="HTTP/1.0"),
        ndjson_answer(b""),
        ndjson_answer(b"", framing="chunked"),
        Answer(body=b"\n", headers=(("Content-Type", "application/x-ndjson; charset=utf-8"),)),
    ],
    ids=["array", "array-chunked", "array-close", "ndjson", "ndjson-chunked", "ndjson-params"],
)
def test_a_proven_empty_day_empties_the_stored_day(raw_source, warehouse, old_day, answer):
    raw_source.script(answer)
    (result,) = load_range(D, api_url=raw_source.url, warehouse_path=warehouse)
    assert (result.rows, result.changed) == (0, True)
    stored, ledger = state(warehouse)
    assert stored[0] == 0 and ledger[-1][:2] == (0, stored[1])


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (Answer(body=b""), "empty body (Content-Type application/json)"),
        (Answer(body=b"", headers=()), "empty body (Content-Type missing)"),
        (Answer(body=b"", framing="chunked", headers=()), "does not prove an empty day"),
        (ndjson_answer(b"", framing="close"), "an empty body whose end was marked only"),
        (Answer(body=b"", framing="close", http_version="HTTP/1.0"), "an empty body whose"),
    ],
    ids=["json", "no-type", "chunked-no-type", "ndjson-close", "http1.0-close"],
)
def test_an_empty_body_that_proves_nothing_is_refused(
    raw_source, warehouse, old_day, answer, message
):
    text = refused(raw_source, warehouse, answer)
    assert message in text and "nothing was written" in text.lower()
    assert state(warehouse) == old_day


def test_our_events_api_answers_an_empty_day_in_a_form_the_loader_accepts(
    events_api, warehouse, raw_source, old_day
):
    (result,) = load_range(D, api_url=events_api(events_per_day=0), warehouse_path=warehouse)
    assert (result.rows, result.changed) == (0, True)


def test_ndjson_and_arrays_in_every_framing_load_the_same_day(raw_source, warehouse):
    answers = [
        Answer(body=array_body(NEW)),
        Answer(body=array_body(NEW), framing="chunked", chunk_size=7),
        Answer(body=array_body(NEW), framing="close"),
        ndjson_answer(ndjson_body(NEW)),
        ndjson_answer(ndjson_body(NEW), framing="chunked", chunk_size=7),
    ]
    checksums = set()
    for answer in answers:
        raw_source.script(answer)
        (result,) = load_range(D, api_url=raw_source.url, warehouse_path=warehouse)
        checksums.add((result.rows, result.checksum))
    assert len(checksums) == 1 and next(iter(checksums))[0] == 10


def test_a_malformed_record_in_a_whole_answer_is_refused(raw_source, warehouse, old_day):
    body = array_body(NEW).replace(b'"user": "10.0.0.1"', b'"user": 7', 1)
    text = refused(raw_source, warehouse, Answer(body=body))
    assert '"user" is not a string' in text
    assert state(warehouse) == old_day


def test_a_server_error_then_a_whole_answer_loads_the_new_day(raw_source, warehouse, old_day):
    raw_source.script(Answer(503, body=b"busy"), Answer(body=array_body(NEW)))
    (result,) = load_range(D, api_url=raw_source.url, warehouse_path=warehouse)
    assert result.rows == 10 and len(raw_source.requests) == 2


def test_a_refused_second_request_keeps_the_first_window_and_writes_nothing_of_its_own(
    raw_source, warehouse
):
    """368 days are two requests (366 days, then 2). A redirect for the second leaves the first
    window loaded, whole, and nothing of the second. (Deliberate change: a range used to be one
    request per date.)"""
    second = D + timedelta(days=366)
    raw_source.script(
        Answer(body=array_body(OLD)),
        Answer(301, headers=(("Location", "/elsewhere/events"),)),
    )
    with pytest.raises(EventSourceError, match=f"events of {second} to {second + timedelta(1)}"):
        load_range(D, D + timedelta(days=368), api_url=raw_source.url, warehouse_path=warehouse)
    assert [request.split()[1] for request in raw_source.requests] == [
        "/events?start_date=2019-01-01&end_date=2020-01-02",
        "/events?start_date=2020-01-02&end_date=2020-01-04",
    ]
    assert state(warehouse)[0][0] == 2
    with wh.connect(warehouse, read_only=True) as connection:
        ((dates, first, last),) = connection.execute(
            "select count(*), min(event_date), max(event_date) from raw.load_log"
        ).fetchall()
    assert (dates, first, last) == (366, D, second - timedelta(1))


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("whole", [False, True], ids=["cut", "whole"])
def test_a_compressed_body_is_refused_even_in_intact_framing(
    raw_source: RawHttpServer, warehouse: Path, old_day: tuple, framing: str, whole: bool
):
    # A gzip stream that stops after 2 of 10 NDJSON lines, inside framing that is complete:
    # httpx's decoder would hand over the 2 lines without noticing the missing end.
    gzip = zlib.compressobj(wbits=31)
    lines = ndjson_body(NEW if whole else NEW[:2])
    body = gzip.compress(lines) + (gzip.flush() if whole else gzip.flush(zlib.Z_FULL_FLUSH))
    headers = (("Content-Type", "application/x-ndjson"), ("Content-Encoding", "gzip"))
    text = refused(raw_source, warehouse, Answer(body=body, headers=headers, framing=framing))
    assert "Content-Encoding 'gzip'" in text and "nothing was written" in text
    assert state(warehouse) == old_day


def test_an_answer_for_other_dates_does_not_empty_the_stored_day(
    raw_source: RawHttpServer, warehouse: Path, old_day: tuple
):
    # Yesterday's answer served again (a cache keyed without the query string): complete and
    # well-framed, but not one event of D. That is not an empty day.
    yesterday = [event(f"y-{i}", f"2018-12-31T0{i}:00:00Z") for i in range(3)]
    text = refused(raw_source, warehouse, Answer(body=array_body(yesterday)))
    assert "none of them dated in the window" in text and "2018-12-31" in text
    assert state(warehouse) == old_day
