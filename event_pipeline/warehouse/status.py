"""Reads of the three ledgers for `event-stats status`: one query per ledger, whatever the range.

- raw.load_log (loader): every load of a date, summarised as its latest load and the last load
  that changed raw.events;
- ops.build_log (dbt's post-hook): the latest build of each date;
- ops.email_log (send-stats): every row, so the caller can take each recipient's latest one;
- and the content hash of the stats now in analytics.event_stats (DayStats.content_hash(), the
  function whose hash send-stats stores) for each emailed date built again after its email was
  composed. The other emailed dates need none: stats change only by a build, and an email is
  composed after the build before it committed (DuckDB lets one process hold the file), so their
  emails hold the stats built now. This keeps a year of dates fast however many users a day has.

A ledger table that does not exist yet reads as no rows. `start` and `end` (exclusive) bound the
dates read; None leaves that side open.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime
from itertools import groupby

import duckdb

from event_pipeline.warehouse.stats import BuildRecord, DayStats

_LEDGERS = (("raw", "load_log"), ("ops", "build_log"), ("ops", "email_log"))


@dataclass(frozen=True)
class LoadSummary:
    """The loads of one date in raw.load_log."""

    event_date: date
    rows: int  # rows in the partition after the latest load
    loaded_at: datetime  # UTC, the latest load
    source_url: str  # of the latest load
    run_id: str  # of the latest load
    changed_at: datetime | None  # UTC, the last load that changed raw.events (None: none did)
    loads: int


@dataclass(frozen=True)
class EmailRecord:
    """One ops.email_log row: an email of a date to a recipient, sent or being sent."""

    event_date: date
    recipient: str
    revision: int
    status: str  # email_log.SENT or email_log.SENDING
    content_hash: str
    message_id: str
    sent_at: datetime | None  # UTC; None while 'sending'
    composed_at: datetime | None  # UTC, its latest send attempt (older ledgers: sent_at)


@dataclass(frozen=True)
class Ledgers:
    loads: list[LoadSummary]
    builds: list[BuildRecord]
    emails: list[EmailRecord]
    # content hash of the stats now, for each emailed date built again since its first email
    stats_hashes: dict[date, str]


def read_ledgers(
    connection: duckdb.DuckDBPyConnection, start: date | None, end: date | None
) -> Ledgers:
    """Every ledger's rows for the dates in [start, end)."""
    columns = _ledger_columns(connection)
    bounds = [start, start, end, end]
    builds = _builds(connection, bounds) if ("ops", "build_log") in columns else []
    emails = _emails(connection, bounds, columns.get(("ops", "email_log")))
    rebuilt = _built_after_email(builds, emails)
    return Ledgers(
        loads=_loads(connection, bounds) if ("raw", "load_log") in columns else [],
        builds=builds,
        emails=emails,
        stats_hashes=_stats_hashes(connection, rebuilt, ("analytics", "event_stats") in columns),
    )


def _built_after_email(builds: list[BuildRecord], emails: list[EmailRecord]) -> list[date]:
    """The dates whose latest build is later than the first email composed for them."""
    built_at = {build.event_date: build.built_at for build in builds}
    first_email: dict[date, datetime | None] = {}
    for email in emails:
        earlier = first_email.get(email.event_date, email.composed_at)
        both = [moment for moment in (earlier, email.composed_at) if moment is not None]
        first_email[email.event_date] = min(both) if both else None
    return sorted(
        day
        for day, composed in first_email.items()
        if day in built_at and (composed is None or built_at[day] > composed)
    )


# `bounds` = [start, start, end, end]: each side may be null (open).
_IN_RANGE = (
    "(?::date is null or event_date >= ?::date) and (?::date is null or event_date < ?::date)"
)


def _ledger_columns(connection: duckdb.DuckDBPyConnection) -> dict[tuple[str, str], set[str]]:
    """The columns of each ledger table (and of analytics.event_stats) that exists."""
    rows = connection.execute(
        """
        select table_schema, table_name, list(column_name)
        from information_schema.columns
        where (table_schema, table_name) in (
            ('raw', 'load_log'), ('ops', 'build_log'), ('ops', 'email_log'),
            ('analytics', 'event_stats')
        )
        group by all
        """
    ).fetchall()
    return {(schema, table): set(names) for schema, table, names in rows}


def _loads(connection: duckdb.DuckDBPyConnection, bounds: list) -> list[LoadSummary]:
    rows = connection.execute(
        f"""
        select
            event_date,
            arg_max(rows, loaded_at),
            max(loaded_at),
            arg_max(source_url, loaded_at),
            arg_max(run_id, loaded_at),
            max(loaded_at) filter (where changed),
            count(*)
        from raw.load_log
        where {_IN_RANGE}
        group by event_date
        order by event_date
        """,
        bounds,
    ).fetchall()
    return [LoadSummary(*row) for row in rows]


def _builds(connection: duckdb.DuckDBPyConnection, bounds: list) -> list[BuildRecord]:
    rows = connection.execute(
        f"""
        select
            event_date,
            arg_max(invocation_id, built_at),
            arg_max(users, built_at),
            arg_max(events, built_at),
            max(built_at)
        from ops.build_log
        where {_IN_RANGE}
        group by event_date
        order by event_date
        """,
        bounds,
    ).fetchall()
    return [BuildRecord(*row) for row in rows]


def _emails(
    connection: duckdb.DuckDBPyConnection, bounds: list, columns: set[str] | None
) -> list[EmailRecord]:
    if columns is None:
        return []
    # A ledger written before intent rows existed has no status column: every row was sent.
    status = "coalesce(status, 'sent')" if "status" in columns else "'sent'"
    composed = "coalesce(intent_at, sent_at)" if "intent_at" in columns else "sent_at"
    rows = connection.execute(
        f"""
        select
            event_date, recipient, revision, {status}, content_hash, message_id, sent_at,
            {composed}
        from ops.email_log
        where {_IN_RANGE}
        order by event_date, recipient, revision
        """,
        bounds,
    ).fetchall()
    return [EmailRecord(*row) for row in rows]


def _stats_hashes(
    connection: duckdb.DuckDBPyConnection, dates: list[date], stats_exist: bool
) -> dict[date, str]:
    """DayStats.content_hash() of the stats now in analytics.event_stats, for each of `dates`
    (one query, whatever their number)."""
    hashes = {day: DayStats(day, ()).content_hash() for day in dates}  # a date without rows
    if not stats_exist or not dates:
        return hashes
    rows = connection.execute(
        """
        select event_date, user_id, event_count
        from analytics.event_stats
        where event_date in (select unnest(?::date[]))
        order by event_date
        """,
        [dates],
    ).fetchall()
    for day, counts in _by_date(rows):
        hashes[day] = DayStats(day, counts).content_hash()
    return hashes


def _by_date(rows: list[tuple]) -> Iterator[tuple[date, tuple[tuple[str, int], ...]]]:
    for day, group in groupby(rows, key=lambda row: row[0]):
        yield day, tuple((str(user), int(count)) for _, user, count in group)
