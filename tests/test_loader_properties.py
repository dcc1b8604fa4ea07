"""Property-based tests (hypothesis) of the loader's contract.

For generated sets of events (offsets from -14:00 to +14:00, `Z` or none, instants on the
window's edges, repeated event_ids, the book's record shape) and a generated single fault of the
source (a status, a body cut at any byte in every framing, 503 then success, a malformed record,
an empty body that proves nothing), the stored day is exactly the old one or exactly the new one
(and which one is predictable), and raw.load_log agrees with it.

A small Python model says what a delivery must store: records dated on the day's UTC date, one
per event_id (a copy dated on the day first, then the earliest), every record without an
event_id its own event. One server per test serves every example: the test-only raw server
(re-scripted per example) or the events API in replay mode (it re-reads its files per request).
The warehouse is a DuckDB file: what is tested happens before the write, whatever the storage,
and opening a file is cheaper than attaching a DuckLake, for many examples (test_loader.py and
test_ducklake.py run the loader on a lake).
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import hypothesis
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from raw_http_server import Answer, RawHttpServer, ndjson_answer

from event_pipeline import warehouse as wh
from event_pipeline.events.records import http_date
from event_pipeline.loader import load_range
from event_pipeline.sources import EventSourceError
from event_pipeline.warehouse.raw import partition_checksum

D = date(2019, 1, 1)
MIDNIGHT = datetime(2019, 1, 1, tzinfo=UTC)
MS = timedelta(milliseconds=1)
EDGES = [MIDNIGHT - MS, MIDNIGHT, MIDNIGHT + MS, MIDNIGHT + timedelta(days=1) - MS]
EDGES.append(MIDNIGHT + timedelta(days=1))

# Bounded so that `make test` stays quick; each example loads a day two or three times into a
# fresh file. The servers are shared by the examples: each re-scripts (or re-writes) them.
PROPERTY_SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
FAULT_SETTINGS = settings(PROPERTY_SETTINGS, max_examples=10)  # per kind of fault


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTS_API_ATTEMPTS", "2")
    monkeypatch.setenv("EVENTS_API_BACKOFF", "0")
    monkeypatch.setenv("EVENTS_API_TIMEOUT", "10")


# --- generated events ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Generated:
    event_id: str | None  # None: the book's shape ({"user", "date"}), no id
    user: str
    event_type: str | None
    at: datetime  # aware, UTC
    offset_minutes: int | None  # None: "Z"; a value: +HH:MM; (book records are GMT)
    naive: bool  # written without an offset (the loader takes it as UTC)

    def record(self) -> dict:
        if self.event_id is None:
            return {"user": self.user, "date": http_date(self.at)}
        record = {"event_id": self.event_id, "user": self.user, "timestamp": self.timestamp()}
        if self.event_type is not None:
            record["event_type"] = self.event_type
        return record

    def timestamp(self) -> str:
        if self.naive:
            return self.at.replace(tzinfo=None).isoformat(timespec="milliseconds")
        if self.offset_minutes is None:
            return self.at.replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"
        local = self.at + timedelta(minutes=self.offset_minutes)
        sign = "-" if self.offset_minutes < 0 else "+"
        hours, minutes = divmod(abs(self.offset_minutes), 60)
        text = local.replace(tzinfo=None).isoformat(timespec="milliseconds")
        return f"{text}{sign}{hours:02d}:{minutes:02d}"


instants = st.one_of(
    st.sampled_from(EDGES),
    st.integers(-36 * 3_600_000, 60 * 3_600_000).map(lambda ms: MIDNIGHT + ms * MS),
)


@st.composite
def events(draw: st.DrawFn) -> Generated:
    book = draw(st.booleans()) and draw(st.booleans())  # about a quarter in the book's shape
    at = draw(instants)
    if book:
        at = at.replace(microsecond=0)  # RFC 1123 has whole seconds
    return Generated(
        event_id=None if book else draw(st.sampled_from([f"e{i}" for i in range(8)])),
        user=draw(st.sampled_from(["10.0.0.1", "10.0.0.2", "192.168.0.7"])),
        event_type=None if book else draw(st.sampled_from([None, "click", "view"])),
        at=at,
        offset_minutes=draw(st.one_of(st.none(), st.integers(-14 * 60, 14 * 60))),
        naive=draw(st.booleans()) and draw(st.booleans()),
    )


deliveries = st.lists(events(), max_size=12)


def expected_day(delivery: list[Generated]) -> Counter:
    """The model: what raw.events must hold for D after loading `delivery`."""
    chosen: dict[str, Generated] = {}
    kept: list[Generated] = []
    for event in delivery:
        if event.event_id is None:
            kept.append(event)
            continue
        current = chosen.get(event.event_id)
        if current is None or _preference(event) < _preference(current):
            chosen[event.event_id] = event
    kept += chosen.values()
    return Counter(
        (e.event_id or "md5", e.user, e.event_type, e.at.replace(tzinfo=None))
        for e in kept
        if e.at.date() == D
    )


def only_other_dates(delivery: list[Generated]) -> bool:
    """Events, none of them for D: the loader refuses such an answer (not an empty day)."""
    return bool(delivery) and not expected_day(delivery)


def _preference(event: Generated) -> tuple:
    return (event.at.date() != D, event.at, event.user, event.event_type is not None,
            event.event_type or "")  # fmt: skip


def stored_day(path: Path) -> Counter:
    with wh.connect(path, read_only=True) as connection:
        rows = connection.execute(
            "select event_id, user_id, event_type, event_at from raw.events where event_date = ?",
            [D],
        ).fetchall()
    return Counter(
        ("md5" if event_id.startswith("md5-") else event_id, user, kind, at)
        for event_id, user, kind, at in rows
    )


def assert_ledger_agrees(path: Path, loads: int) -> None:
    with wh.connect(path, read_only=True) as connection:
        rows, checksum = partition_checksum(connection, D)
        ledger = connection.execute(
            "select rows, checksum from raw.load_log where event_date = ? order by loaded_at",
            [D],
        ).fetchall()
    assert len(ledger) == loads
    assert ledger[-1] == (rows, checksum)


# --- bodies and faults ---------------------------------------------------------------------------


def array_body(delivery: list[Generated]) -> bytes:
    records = [json.dumps(event.record()) for event in delivery]
    return ("[\n" + ",\n".join(records) + "\n]\n").encode() if records else b"[]"


def ndjson_body(delivery: list[Generated]) -> bytes:
    return "".join(json.dumps(event.record()) + "\n" for event in delivery).encode()


@dataclass(frozen=True)
class Fault:
    """A scripted source answer and the day it must leave: "old" or "new"."""

    name: str
    answers: tuple[Answer, ...]
    outcome: str


def whole(delivery: list[Generated], shape: str, framing: str) -> Answer:
    if shape == "ndjson":
        return ndjson_answer(ndjson_body(delivery), framing=framing, chunk_size=50)
    return Answer(body=array_body(delivery), framing=framing, chunk_size=50)


FAULT_KINDS = ["none", "status", "503-then-ok", "cut", "cut-then-ok", "malformed", "empty"]


@st.composite
def faults(draw: st.DrawFn, delivery: list[Generated], kind: str) -> Fault:
    shape = draw(st.sampled_from(["array", "ndjson"]))
    provable = ["content-length", "chunked"] + (["close"] if shape == "array" else [])
    framing = draw(st.sampled_from(provable))
    if kind == "none":
        return Fault(f"{shape}/{framing}", (whole(delivery, shape, framing),), "new")
    if kind == "status":
        status = draw(st.sampled_from([204, 301, 302, 304, 404, 500, 503]))
        answer = Answer(status, body=b"", headers=(("Location", "http://elsewhere/events"),))
        return Fault(f"HTTP {status}", (answer,), "old")
    if kind == "empty":  # an empty body that does not prove an empty day
        headers = draw(st.sampled_from([(("Content-Type", "application/json"),), ()]))
        empty = Answer(body=b"", headers=headers, framing=framing)
        return Fault(f"empty body, {headers}, {framing}", (empty,), "old")
    if kind == "503-then-ok":
        return Fault("503 then ok", (Answer(503), whole(delivery, shape, framing)), "new")
    if kind == "malformed":
        bad = draw(
            st.sampled_from(
                [
                    {"event_id": "bad", "user": 7, "timestamp": "2019-01-01T10:00:00Z"},
                    {"event_id": "bad", "user": "u", "timestamp": "yesterday"},
                    {"event_id": "bad", "timestamp": "2019-01-01T10:00:00Z"},
                    {"user": "u", "date": "Tue, 32 Jan 2019 00:00:00 GMT"},
                ]
            )
        )
        records = [event.record() for event in delivery]
        records.insert(draw(st.integers(0, len(records))), bad)
        body = json.dumps(records).encode()
        return Fault("malformed record", (Answer(body=body, framing=framing),), "old")
    framing = draw(st.sampled_from(["content-length", "chunked", "close"]))
    answer = whole(delivery, shape, framing)
    wire = answer.framed_body()
    cut = draw(st.integers(0, max(0, len(wire) - 1)))
    cut_answer = Answer(
        body=answer.body, headers=answer.headers, framing=framing, chunk_size=50, cut_at=cut
    )
    name = f"{shape}/{framing} cut at {cut} of {len(wire)}"
    # A close-delimited answer is refused outright, not retried, when it cannot be a cut array:
    # NDJSON, or an empty body (a cut at 0 bytes proves nothing: test_sources' empty-body rows).
    refused_outright = framing == "close" and (shape == "ndjson" or cut == 0)
    if kind == "cut-then-ok" and not refused_outright:
        return Fault(name + " then whole", (cut_answer, answer), "new")
    # A close-delimited array cut after its closing ']' (in the trailing newline) is whole.
    whole_anyway = framing == "close" and shape == "array" and wire[:cut].rstrip().endswith(b"]")
    return Fault(name, (cut_answer,), "new" if whole_anyway else "old")


# --- the properties ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_raw_source() -> RawHttpServer:
    server = RawHttpServer()
    yield server
    server.close()


@pytest.mark.parametrize("kind", FAULT_KINDS)
@FAULT_SETTINGS
@given(data=st.data(), old=deliveries, new=deliveries)
def test_a_faulty_answer_leaves_exactly_the_old_day_a_good_one_exactly_the_new(
    shared_raw_source: RawHttpServer, kind: str, data: st.DataObject, old: list, new: list
):
    hypothesis.assume(not only_other_dates(old))  # the starting day must load
    fault = data.draw(faults(new, kind), label="fault")
    # A whole answer with events but none of D is refused like a faulty one.
    expected = "old" if fault.outcome == "new" and only_other_dates(new) else fault.outcome
    hypothesis.event(f"{fault.name.split(' cut at ')[0]} -> {expected}")
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "warehouse.duckdb"
        shared_raw_source.script(Answer(body=array_body(old)))
        load_range(D, api_url=shared_raw_source.url, warehouse_path=path)
        assert stored_day(path) == expected_day(old)

        shared_raw_source.script(*fault.answers)
        try:
            load_range(D, api_url=shared_raw_source.url, warehouse_path=path)
            outcome = "new"
        except EventSourceError:
            outcome = "old"
        assert outcome == expected, fault.name
        assert stored_day(path) == expected_day(new if outcome == "new" else old), fault.name
        assert_ledger_agrees(path, loads=2 if outcome == "new" else 1)


@pytest.fixture(scope="module")
def replay(tmp_path_factory: pytest.TempPathFactory, events_api_module) -> tuple[Path, str]:
    data_dir = tmp_path_factory.mktemp("replay")
    (data_dir / "events.json").write_text("[]")
    return data_dir, events_api_module(data_dir=data_dir)


@PROPERTY_SETTINGS
@given(old=deliveries, new=deliveries)
def test_the_events_api_and_the_loader_agree_on_the_day_of_every_event(
    replay: tuple[Path, str], old: list, new: list
):
    """Through the real events API (replay mode filters the window itself), old then new."""
    data_dir, url = replay
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "warehouse.duckdb"
        for loads, delivery in enumerate([old, new, new], start=1):
            (data_dir / "events.json").write_text(json.dumps([e.record() for e in delivery]))
            (result,) = load_range(D, api_url=url, warehouse_path=path)
            assert stored_day(path) == expected_day(delivery)
            assert_ledger_agrees(path, loads=loads)
        assert not result.changed  # the same source twice: raw.events untouched
