"""Replay mode: serve the records of DIR/*.json, re-read on every request.

Records pass through untouched; only their timestamp is read, to keep those in the window and to
sort them. A timestamp with an offset belongs to the UTC day of its instant (23:30-05:00 is the
next UTC day). A timestamp without an offset is taken as UTC. Files in the book's shape
({"user", "date": "Tue, 01 Jan 2019 00:00:00 GMT"}) are read too.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any


class ReplayError(ValueError):
    """A replay file that cannot be served; the message names the file and the record."""


def record_time(record: Any) -> datetime:
    """The aware UTC instant of a record's `timestamp` (ISO 8601) or, failing that, `date`."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if isinstance(record.get("timestamp"), str):
        moment = datetime.fromisoformat(record["timestamp"])
    elif isinstance(record.get("date"), str):
        moment = parsedate_to_datetime(record["date"])
    else:
        raise ValueError('no "timestamp" (ISO 8601 with offset) or "date" (RFC 1123) string')
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def read_window(
    data_dir: Path, start: datetime, end: datetime
) -> list[tuple[datetime, dict[str, Any]]]:
    """Records of every data_dir/*.json whose instant is in [start, end), sorted by instant.

    Ties keep file-name order, then the order inside the file.
    """
    if not data_dir.is_dir():
        raise ReplayError(f"replay directory {data_dir} does not exist")
    selected: list[tuple[datetime, dict[str, Any]]] = []
    for path in sorted(data_dir.glob("*.json")):
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ReplayError(f"{path}: cannot read a JSON array of events: {exc}") from exc
        if not isinstance(records, list):
            raise ReplayError(f"{path}: expected a JSON array of events")
        for index, record in enumerate(records):
            try:
                moment = record_time(record)
            except (ValueError, TypeError, IndexError) as exc:
                raise ReplayError(f"{path}: record {index}: {exc}") from exc
            if start <= moment < end:
                selected.append((moment, record))
    selected.sort(key=lambda item: item[0])
    return selected
