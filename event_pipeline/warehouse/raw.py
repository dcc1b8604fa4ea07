"""raw.events and its ledger raw.load_log: DDL, partition checksums, and the partition replace.

The loader stages a window's new rows in a temp table (`sources.stage_events`: the columns of
raw.events without load_id, plus `copies`) and calls these functions on the same connection,
naming that table; every statement that reads or writes raw.* lives here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import date, datetime, timedelta
from typing import NamedTuple

import duckdb

from event_pipeline.warehouse import lake

RAW_EVENTS_DDL = """
create schema if not exists raw;
create table if not exists raw.events (
    -- unique, enforced by the loader: with a primary key index, replacing a 1M-row partition
    -- took 70 s instead of 0.7 s (DuckDB 1.5 deletes and re-inserts index entries row by row)
    event_id    varchar   not null,
    user_id     varchar   not null,
    event_type  varchar,
    event_at    timestamp not null,  -- UTC, without offset
    event_date  date      not null,  -- UTC date of event_at: the partition key
    load_id     varchar   not null   -- raw.load_log.load_id of the load that wrote the row
);
"""

# The load ledger: one row per (load, date), written in the same transaction that replaces (or
# keeps) the partition, so it always describes what raw.events holds.
LOAD_LOG_DDL = """
create schema if not exists raw;
create table if not exists raw.load_log (
    load_id        varchar   not null primary key,  -- raw.events.load_id of the rows it wrote
    run_id         varchar   not null,  -- the Airflow run (or CLI invocation) that loaded
    event_date     date      not null,  -- the partition
    rows           bigint    not null,  -- rows in the partition after this load
    checksum       varchar   not null,  -- content checksum of the partition (load_id excluded)
    changed        boolean   not null,  -- false: content was identical, raw.events untouched
    -- delivered events dated outside the request's window, not loaded: those before it are
    -- counted on its first date, those after it on its last (a one-date request: all of them)
    out_of_window  bigint    not null,
    duplicates     bigint    not null,  -- repeated event_ids of the date's events, stored once
    source_url     varchar   not null,
    loaded_at      timestamp not null   -- UTC
);
"""


def ensure_raw_schema(connection: duckdb.DuckDBPyConnection) -> None:
    """Create raw.events and the raw.load_log ledger if they do not exist."""
    connection.execute(RAW_EVENTS_DDL)
    connection.execute(lake.table_ddl(connection, LOAD_LOG_DDL))


def prepare_load(connection: duckdb.DuckDBPyConnection, memory_limit: str) -> None:
    """Bound DuckDB's memory for a load (it spills to disk beyond) and create the raw tables."""
    limit = memory_limit.replace("'", "")
    connection.execute(f"set memory_limit = '{limit}'")
    ensure_raw_schema(connection)


class PartitionChecksum(NamedTuple):
    """Rows and content checksum of one date's partition (load_id is not content)."""

    rows: int
    checksum: str


@dataclass(frozen=True)
class StagedDate:
    """One date of a window: its staged rows, and whether they differ from raw.events."""

    event_date: date
    rows: int
    checksum: str  # as partition_checksum would give for these rows
    duplicates: int  # repeated event_ids among these rows' deliveries, each stored once
    changed: bool  # False: raw.events holds exactly these rows already


@dataclass(frozen=True)
class OutsideDate:
    """Staged events dated outside the requested window, for one date (they are not loaded)."""

    event_date: date
    events: int
    duplicates: int


@dataclass(frozen=True)
class LoadLogEntry:
    """A raw.load_log row: what one load did to one date."""

    load_id: str
    run_id: str
    event_date: date
    rows: int
    checksum: str
    changed: bool
    out_of_window: int
    duplicates: int
    source_url: str
    loaded_at: datetime


@dataclass(frozen=True)
class Redated:
    """A staged event that raw.events stores under a date outside the window."""

    event_id: str
    stored_under: date
    dated: date  # its date in the new delivery


@dataclass(frozen=True)
class StoredElsewhere:
    """Event ids of a delivery that raw.events holds under dates outside the window."""

    examples: list[Redated]  # the first few
    stored_under: list[date]  # every date holding one of them


# Order-independent content checksum: sums of the two 64-bit halves of each row's md5, plus the
# row count. It needs no sort and no giant string, so a 1M-row partition costs a single scan.
# md5 is computed once per row: the low half of md5_number is md5_number_upper, the high half
# md5_number_lower (the functions the checksums were first written with; a test pins it).
_ROW_MD5 = """md5_number(concat_ws(
    chr(31), event_id, user_id, coalesce(event_type, chr(0)),
    strftime(event_at, '%Y-%m-%dT%H:%M:%S.%f')
))"""
_MD5_SUMS = """
    coalesce(sum((row_md5 & 18446744073709551615::uhugeint)::ubigint), 0),
    coalesce(sum((row_md5 >> 64)::ubigint), 0)"""

_CHECKSUM_SQL = f"""
select count(*), {_MD5_SUMS}
from (select {_ROW_MD5} as row_md5 from {{relation}} where event_date = ?)
"""

# DuckDB's hash() is 10x cheaper than md5 but may differ between DuckDB versions, so it only
# compares the stored and the new rows within one process; the ledger keeps the md5 checksum.
_FINGERPRINT = "coalesce(sum(hash(event_id, user_id, event_type, event_at)), 0)"

_STAGED_DATES_SQL = f"""
select
    event_date,
    count(*),
    {_MD5_SUMS},
    {_FINGERPRINT},
    coalesce(sum(copies - 1), 0)
from (
    select *, {_ROW_MD5} as row_md5
    from {{staged}}
    where event_date >= $start and event_date < $end
)
group by event_date
"""

_STORED_DATES_SQL = f"""
select event_date, count(*), {_FINGERPRINT}
from raw.events
where event_date >= $start and event_date < $end
group by event_date
"""


def _checksum(rows: int, upper: int, lower: int) -> str:
    return f"{rows}-{upper:x}-{lower:x}"


def partition_checksum(
    connection: duckdb.DuckDBPyConnection, event_date: date, relation: str = "raw.events"
) -> PartitionChecksum:
    """Rows and checksum of the events of `event_date` in `relation` (raw.events or a stage)."""
    ((rows, upper, lower),) = connection.execute(
        _CHECKSUM_SQL.format(relation=relation), [event_date]
    ).fetchall()
    return PartitionChecksum(rows, _checksum(rows, upper, lower))


def compare_staged(
    connection: duckdb.DuckDBPyConnection, staged: str, start: date, end: date
) -> list[StagedDate]:
    """Every date of [start, end) in order: its rows in `staged`, and whether raw.events
    holds other rows for it. One scan of the stage and one of the stored window."""
    window = {"start": start, "end": end}
    new = {
        row[0]: row[1:]
        for row in connection.execute(_STAGED_DATES_SQL.format(staged=staged), window).fetchall()
    }
    stored = {
        day: (rows, hashed)
        for day, rows, hashed in connection.execute(_STORED_DATES_SQL, window).fetchall()
    }
    dates = []
    for offset in range((end - start).days):
        day = start + timedelta(days=offset)
        rows, upper, lower, hashed, duplicates = new.get(day, (0, 0, 0, 0, 0))
        dates.append(
            StagedDate(
                event_date=day,
                rows=rows,
                checksum=_checksum(rows, upper, lower),
                duplicates=duplicates,
                changed=(rows, hashed) != stored.get(day, (0, 0)),
            )
        )
    return dates


def outside_window(
    connection: duckdb.DuckDBPyConnection, staged: str, start: date, end: date
) -> list[OutsideDate]:
    """The rows of `staged` dated outside [start, end), counted by date."""
    rows = connection.execute(
        f"select event_date, count(*), sum(copies - 1) from {staged} "
        "where event_date < $start or event_date >= $end group by all order by 1",
        {"start": start, "end": end},
    ).fetchall()
    return [OutsideDate(day, events, duplicates) for day, events, duplicates in rows]


def stored_elsewhere(
    connection: duckdb.DuckDBPyConnection, staged: str, start: date, end: date
) -> StoredElsewhere | None:
    """The event ids of `staged` dated in [start, end) that raw.events stores under a date
    outside it (inside it, the replace moves them)."""
    query = f"""
        select stored.event_id, stored.event_date as stored_under, new.event_date as dated
        from raw.events as stored
        inner join {staged} as new on stored.event_id = new.event_id
        where
            new.event_date >= $start and new.event_date < $end
            and (stored.event_date < $start or stored.event_date >= $end)
    """
    window = {"start": start, "end": end}
    examples = connection.execute(f"{query} order by all limit 3", window).fetchall()
    if not examples:
        return None
    stored_under = connection.execute(
        f"select distinct stored_under from ({query}) order by 1", window
    ).fetchall()
    return StoredElsewhere([Redated(*row) for row in examples], [day for (day,) in stored_under])


def replace_partitions(
    connection: duckdb.DuckDBPyConnection, entries: Sequence[LoadLogEntry], staged: str
) -> None:
    """Replace the rows of every changed entry's date with that date's rows of `staged` (tagged
    with the entry's load_id), and write every entry's ledger row. Dates not changed keep their
    rows and load_ids. Run it inside the caller's transaction (commits.transaction), which also
    holds the comparison that decided `changed`: all of it commits, or none."""
    changed = [entry for entry in entries if entry.changed]
    if changed:
        connection.execute(
            "delete from raw.events where event_date >= $first and event_date <= $last "
            f"and event_date in (select event_date from ({_ENTRIES}))",
            {
                "entries": _as_json(changed),
                "first": changed[0].event_date,
                "last": changed[-1].event_date,
            },
        )
        connection.execute(
            _INSERT_EVENTS_SQL.format(staged=staged, entries=_ENTRIES),
            {"entries": _as_json(changed)},
        )
    connection.execute(_INSERT_LOG_SQL, {"entries": _as_json(entries)})


# Entries travel as ONE JSON parameter: binding a Python list costs tens of ms per list here.
_ENTRIES = """
select unnest(from_json($entries, '[{
    "load_id": "VARCHAR", "run_id": "VARCHAR", "event_date": "DATE", "rows": "BIGINT",
    "checksum": "VARCHAR", "changed": "BOOLEAN", "out_of_window": "BIGINT",
    "duplicates": "BIGINT", "source_url": "VARCHAR", "loaded_at": "TIMESTAMP"
}]'), recursive := true)
"""

_INSERT_EVENTS_SQL = """
insert into raw.events (event_id, user_id, event_type, event_at, event_date, load_id)
select new.event_id, new.user_id, new.event_type, new.event_at, new.event_date, entries.load_id
from {staged} as new
inner join ({entries}) as entries on new.event_date = entries.event_date
"""

_INSERT_LOG_SQL = f"""
insert into raw.load_log (
    load_id, run_id, event_date, rows, checksum, changed, out_of_window, duplicates,
    source_url, loaded_at
)
select
    load_id, run_id, event_date, rows, checksum, changed, out_of_window, duplicates,
    source_url, loaded_at
from ({_ENTRIES})
"""


def _as_json(entries: Sequence[LoadLogEntry]) -> str:
    return json.dumps([asdict(entry) for entry in entries], default=lambda value: value.isoformat())
