"""Serialising events: our record shape, the book's shape, and JSON array / NDJSON bodies.

Everything here writes text by hand with fixed English names (never the locale), so the bytes
are the same on every machine.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import numpy as np

from event_pipeline.events.generator import EVENT_TYPES, EventBatch

RecordFormat = Literal["standard", "book"]
RECORD_FORMATS: tuple[RecordFormat, ...] = ("standard", "book")

_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
CHUNK_BYTES = 1024 * 1024  # large writes: few trips through the server per MB
REPLAY_BATCH = 8192  # replayed records per batch


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

    def iso_minute(self, minute: int) -> str:
        """'2019-01-01T00:03:' for the minute (minutes since the Unix epoch)."""
        if minute != self._minute:
            self._update(minute)
        return self._iso

    def http_minute(self, minute: int) -> str:
        """'Tue, 01 Jan 2019 00:03:' for the minute (minutes since the Unix epoch)."""
        if minute != self._minute:
            self._update(minute)
        return self._http

    def iso(self, at_ms: int) -> str:
        """ISO 8601 with milliseconds and offset: 2019-01-01T00:03:12.345+00:00."""
        minute, ms = divmod(at_ms, 60_000)
        return f"{self.iso_minute(minute)}{ms // 1000:02d}.{ms % 1000:03d}+00:00"

    def http(self, at_ms: int) -> str:
        """RFC 1123 in GMT, to the second, as Flask's jsonify writes datetimes."""
        minute, ms = divmod(at_ms, 60_000)
        return f"{self.http_minute(minute)}{ms // 1000:02d} GMT"


def http_date(moment: datetime) -> str:
    """RFC 1123 GMT text of an aware datetime, e.g. 'Tue, 01 Jan 2019 00:00:00 GMT'."""
    return _MinutePrefixes().http(epoch_ms(moment))


def generated_records(
    batches: Iterable[EventBatch], record_format: RecordFormat
) -> Iterator[list[str]]:
    """Per batch, one compact JSON object per generated event (plain ASCII: no escaping needed).

    Each record is put together from a few pieces looked up in small tables (the text of the
    minute, of the user, of the type), never through json.dumps.
    """
    prefixes = _MinutePrefixes()
    if record_format == "book":
        seconds = [f"{second:02d} GMT" for second in range(60)]
        for batch in batches:
            # Keys sorted, as Flask's jsonify does.
            users = [f'","user":"{user}"}}' for user in batch.users]
            minutes, within = np.divmod(batch.at_ms, 60_000)
            texts = _minute_texts(minutes, prefixes.http_minute, '{"date":"')
            yield [
                f"{minute}{seconds[ms // 1000]}{users[user]}"
                for minute, ms, user in zip(
                    texts, within.tolist(), batch.user_index.tolist(), strict=True
                )
            ]
        return
    millis = _iso_millis()
    kinds = [f'","event_type":"{kind}"}}' for kind in EVENT_TYPES]
    for batch in batches:
        users = [f'","user":"{user}","timestamp":"' for user in batch.users]
        minutes, within = np.divmod(batch.at_ms, 60_000)
        texts = _minute_texts(minutes, prefixes.iso_minute, "")
        head = f'{{"event_id":"{batch.id_prefix}'
        yield [
            f"{head}{ordinal:07d}{users[user]}{minute}{millis[ms]}{kinds[kind]}"
            for ordinal, user, minute, ms, kind in zip(
                range(batch.first_ordinal, batch.first_ordinal + len(batch)),
                batch.user_index.tolist(),
                texts,
                within.tolist(),
                batch.type_index.tolist(),
                strict=True,
            )
        ]


_ISO_MILLIS: list[str] = []


def _iso_millis() -> list[str]:
    """'SS.mmm+00:00' for every millisecond of a minute (made once, on first use)."""
    if not _ISO_MILLIS:
        _ISO_MILLIS.extend(f"{ms // 1000:02d}.{ms % 1000:03d}+00:00" for ms in range(60_000))
    return _ISO_MILLIS


def _minute_texts(minutes: np.ndarray, text: Callable[[int], str], before: str) -> list[str]:
    """`before` + text(minute) for each event of a batch, text computed once per minute."""
    distinct, where = np.unique(minutes, return_inverse=True)
    table = np.array([before + text(minute) for minute in distinct.tolist()], dtype=object)
    return table[where].tolist()


def replayed_records(
    records: Iterable[tuple[datetime, dict[str, Any]]], record_format: RecordFormat
) -> Iterator[list[str]]:
    """Replayed records as they are in the files, or reshaped into the book's {date, user}."""
    batch: list[str] = []
    for moment, record in records:
        if record_format == "book":
            record = {"date": http_date(moment), "user": record.get("user")}
        batch.append(json.dumps(record, separators=(",", ":"), ensure_ascii=False))
        if len(batch) >= REPLAY_BATCH:
            yield batch
            batch = []
    yield batch


def body_chunks(batches: Iterable[list[str]], ndjson: bool) -> Iterator[bytes]:
    """A JSON array (one record a line) or NDJSON, in chunks of about CHUNK_BYTES.

    `batches` are lists of records (any may be empty).
    """
    opening, between, closing = ("", "\n", "\n") if ndjson else ("[\n", ",\n", "\n]\n")
    parts = [opening]
    size = 0
    empty = True
    for batch in batches:
        if not batch:
            continue
        if not empty:
            parts.append(between)
        empty = False
        text = between.join(batch)
        parts.append(text)
        size += len(text)
        if size >= CHUNK_BYTES:
            yield "".join(parts).encode("utf-8")
            parts = []
            size = 0
    if empty:
        closing = "" if ndjson else "]\n"
    parts.append(closing)
    yield "".join(parts).encode("utf-8")
