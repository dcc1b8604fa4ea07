"""Serialising events: our record shape, the book's shape, and JSON array / NDJSON bodies.

Everything here writes text by hand with fixed English names (never the locale), so the bytes
are the same on every machine.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
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
) -> Iterator[bytes]:
    """Per batch, one compact JSON object per generated event, a line each (no final newline).

    Values are plain ASCII, so nothing needs escaping and no json.dumps is needed: a batch is
    put together as one byte matrix, a row per event, its columns the fixed pieces of the record
    (digits computed in numpy, the text of the minute, the user and the type looked up in small
    tables padded with NUL bytes), and the NUL padding is dropped when the rows are joined.
    """
    prefixes = _MinutePrefixes()
    for batch in batches:
        if not len(batch):
            continue
        minutes, within = np.divmod(batch.at_ms, 60_000)
        distinct, where = np.unique(minutes, return_inverse=True)
        seconds = _digits(within // 1000, 2)
        if record_format == "book":
            # Keys sorted, as Flask's jsonify does.
            texts = [prefixes.http_minute(minute) for minute in distinct.tolist()]
            users = _table([f' GMT","user":"{user}"}}\n' for user in batch.users])
            columns = [
                _same(batch, '{"date":"'),
                _table(texts)[where],
                seconds,
                users[batch.user_index],
            ]
        else:
            texts = [prefixes.iso_minute(minute) for minute in distinct.tolist()]
            users = _table([f'","user":"{user}","timestamp":"' for user in batch.users])
            ordinals = np.arange(batch.first_ordinal, batch.first_ordinal + len(batch))
            columns = [
                _same(batch, f'{{"event_id":"{batch.id_prefix}'),
                _ordinals(ordinals),
                users[batch.user_index],
                _table(texts)[where],
                seconds,
                _same(batch, "."),
                _digits(within % 1000, 3),
                _TYPE_ENDS[batch.type_index],
            ]
        yield _rows(columns)[:-1]


def _table(texts: list[str]) -> np.ndarray:
    """ASCII texts as the rows of a uint8 matrix, padded with NUL bytes."""
    width = max(len(text) for text in texts)
    padded = np.array([text.encode("ascii") for text in texts], dtype=f"S{width}")
    return padded.view(np.uint8).reshape(len(texts), width)


_TYPE_ENDS = _table([f'+00:00","event_type":"{kind}"}}\n' for kind in EVENT_TYPES])


def _same(batch: EventBatch, text: str) -> np.ndarray:
    """The same ASCII text in every row."""
    row = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    return np.broadcast_to(row, (len(batch), len(row)))


def _digits(values: np.ndarray, width: int) -> np.ndarray:
    """Zero-padded decimal digits of non-negative values below 10**width, as ASCII rows."""
    kind = np.int32 if width <= 9 else np.int64
    powers = 10 ** np.arange(width - 1, -1, -1, dtype=kind)
    return (values.astype(kind)[:, None] // powers % 10 + ord("0")).astype(np.uint8)


def _ordinals(ordinals: np.ndarray) -> np.ndarray:
    """f"{ordinal:07d}" as ASCII rows: at least 7 digits, more without leading zeros."""
    width = max(7, len(str(ordinals[-1])))
    digits = _digits(ordinals, width)
    for column in range(width - 7):  # a zero there is a leading zero: NUL, left out
        digits[ordinals < 10 ** (width - 1 - column), column] = 0
    return digits


def _rows(columns: list[np.ndarray]) -> bytes:
    """The rows of the columns side by side, all joined, NUL bytes left out."""
    widths = [column.shape[1] for column in columns]
    matrix = np.empty((len(columns[0]), sum(widths)), dtype=np.uint8)
    at = 0
    for column, width in zip(columns, widths, strict=True):
        matrix[:, at : at + width] = column
        at += width
    return matrix[matrix != 0].tobytes()


def replayed_records(
    records: Iterable[tuple[datetime, dict[str, Any]]], record_format: RecordFormat
) -> Iterator[bytes]:
    """Replayed records as they are in the files, or reshaped into the book's {date, user}.

    In batches, one record a line (no final newline); json.dumps escapes any newline in a value.
    """
    batch: list[str] = []
    for moment, record in records:
        if record_format == "book":
            record = {"date": http_date(moment), "user": record.get("user")}
        batch.append(json.dumps(record, separators=(",", ":"), ensure_ascii=False))
        if len(batch) >= REPLAY_BATCH:
            yield "\n".join(batch).encode("utf-8")
            batch = []
    yield "\n".join(batch).encode("utf-8")


def body_chunks(batches: Iterable[bytes], ndjson: bool) -> Iterator[bytes]:
    """A JSON array (one record a line) or NDJSON, in chunks of about CHUNK_BYTES.

    `batches` hold records one a line, without a final newline (any may be empty).
    """
    opening, between, closing = (b"", b"\n", b"\n") if ndjson else (b"[\n", b",\n", b"\n]\n")
    parts = [opening]
    size = 0
    empty = True
    for batch in batches:
        if not batch:
            continue
        if not ndjson:
            batch = batch.replace(b"\n", b",\n")
        if not empty:
            parts.append(between)
        empty = False
        parts.append(batch)
        size += len(batch)
        if size >= CHUNK_BYTES:
            yield b"".join(parts)
            parts = []
            size = 0
    if empty:
        closing = b"" if ndjson else b"]\n"
    parts.append(closing)
    yield b"".join(parts)
