"""Serialising events: our record shape, the book's shape, and JSON array / NDJSON bodies.

Everything here writes text by hand with fixed English names (never the locale), so the bytes
are the same on every machine.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from event_pipeline.events.generator import Event

RecordFormat = Literal["standard", "book"]
RECORD_FORMATS: tuple[RecordFormat, ...] = ("standard", "book")

_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
CHUNK_BYTES = 64 * 1024


def epoch_ms(moment: datetime) -> int:
    """Milliseconds since the Unix epoch of an aware datetime (truncated)."""
    return (moment - _EPOCH) // timedelta(milliseconds=1)


class _MinutePrefixes:
    """Formats UTC instants quickly: the text up to the minute is computed once per minute."""

    def __init__(self) -> None:
        self._minute = -1
        self._iso = ""
        self._http = ""

    def _update(self, minute: int) -> None:
        moment = _EPOCH + timedelta(minutes=minute)
        self._minute = minute
        day = f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}"
        self._iso = f"{day}T{moment.hour:02d}:{moment.minute:02d}:"
        self._http = (
            f"{_WEEKDAYS[moment.weekday()]}, {moment.day:02d} {_MONTHS[moment.month - 1]} "
            f"{moment.year:04d} {moment.hour:02d}:{moment.minute:02d}:"
        )

    def iso(self, at_ms: int) -> str:
        """ISO 8601 with milliseconds and offset: 2019-01-01T00:03:12.345+00:00."""
        minute, ms = divmod(at_ms, 60_000)
        if minute != self._minute:
            self._update(minute)
        return f"{self._iso}{ms // 1000:02d}.{ms % 1000:03d}+00:00"

    def http(self, at_ms: int) -> str:
        """RFC 1123 in GMT, to the second, as Flask's jsonify writes datetimes."""
        minute, ms = divmod(at_ms, 60_000)
        if minute != self._minute:
            self._update(minute)
        return f"{self._http}{ms // 1000:02d} GMT"


def http_date(moment: datetime) -> str:
    """RFC 1123 GMT text of an aware datetime, e.g. 'Tue, 01 Jan 2019 00:00:00 GMT'."""
    return _MinutePrefixes().http(epoch_ms(moment))


def generated_records(events: Iterable[Event], record_format: RecordFormat) -> Iterator[str]:
    """One compact JSON object per generated event (values are plain ASCII: no escaping needed)."""
    prefixes = _MinutePrefixes()
    if record_format == "book":
        # Keys sorted, as Flask's jsonify does.
        for event in events:
            yield f'{{"date":"{prefixes.http(event.at_ms)}","user":"{event.user}"}}'
    else:
        for event in events:
            yield (
                f'{{"event_id":"{event.event_id}","user":"{event.user}",'
                f'"timestamp":"{prefixes.iso(event.at_ms)}","event_type":"{event.event_type}"}}'
            )


def replayed_records(
    records: Iterable[tuple[datetime, dict[str, Any]]], record_format: RecordFormat
) -> Iterator[str]:
    """Replayed records as they are in the files, or reshaped into the book's {date, user}."""
    for moment, record in records:
        if record_format == "book":
            record = {"date": http_date(moment), "user": record.get("user")}
        yield json.dumps(record, separators=(",", ":"), ensure_ascii=False)


def body_chunks(records: Iterable[str], ndjson: bool) -> Iterator[bytes]:
    """A JSON array (one record a line) or NDJSON, in chunks of about CHUNK_BYTES."""
    opening, between, closing = ("", "\n", "\n") if ndjson else ("[\n", ",\n", "\n]\n")
    parts = [opening]
    size = 0
    empty = True
    for record in records:
        if not empty:
            parts.append(between)
        empty = False
        parts.append(record)
        size += len(record)
        if size >= CHUNK_BYTES:
            yield "".join(parts).encode("utf-8")
            parts = []
            size = 0
    if empty:
        closing = "" if ndjson else "]\n"
    parts.append(closing)
    yield "".join(parts).encode("utf-8")
