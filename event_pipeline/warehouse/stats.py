"""Reads of the built stats: one date's rows of analytics.event_stats, and whether it was built.

"Built" is recorded by the dbt step: the event_stats model's post-hook writes one ops.build_log
row per processed date in the same transaction that publishes the date's stats (the table and its
DDL belong to dbt). A date without such a row was never built, which is not the same as a built
day that had no events.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import date, datetime

import duckdb


@dataclass(frozen=True)
class DayStats:
    """One date's rows of analytics.event_stats, ordered by event count (desc), then user."""

    event_date: date
    counts: tuple[tuple[str, int], ...]

    @property
    def total_events(self) -> int:
        return sum(count for _, count in self.counts)

    @property
    def users(self) -> int:
        return len(self.counts)

    def content_hash(self) -> str:
        """Hash of the date and every (user, count): equal stats give an equal hash."""
        canonical = json.dumps(
            {"event_date": self.event_date.isoformat(), "counts": sorted(self.counts)},
            separators=(",", ":"),
        )
        return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class BuildRecord:
    """The latest ops.build_log row of a date: the dbt invocation that published its stats."""

    event_date: date
    invocation_id: str
    users: int
    events: int
    built_at: datetime


def _table_exists(connection: duckdb.DuckDBPyConnection, schema: str, table: str) -> bool:
    rows = connection.execute(
        "select count(*) from duckdb_tables() where schema_name = ? and table_name = ?",
        [schema, table],
    ).fetchall()
    return rows[0][0] > 0


def latest_build(connection: duckdb.DuckDBPyConnection, event_date: date) -> BuildRecord | None:
    """The latest build of `event_date`, or None when it was never built (or nothing ever was)."""
    if not _table_exists(connection, "ops", "build_log"):
        return None
    rows = connection.execute(
        """
        select event_date, invocation_id, users, events, built_at
        from ops.build_log
        where event_date = ?
        order by built_at desc
        limit 1
        """,
        [event_date],
    ).fetchall()
    return BuildRecord(*rows[0]) if rows else None


def read_day_stats(connection: duckdb.DuckDBPyConnection, event_date: date) -> DayStats:
    """One date's rows of analytics.event_stats (none for a date without events)."""
    if not _table_exists(connection, "analytics", "event_stats"):
        raise RuntimeError(
            f"Cannot read the stats of {event_date}: analytics.event_stats does not exist. "
            "Build it first (the DAG's dbt task group, or `dbt build`)."
        )
    rows = connection.execute(
        """
        select user_id, event_count
        from analytics.event_stats
        where event_date = ?
        order by event_count desc, user_id
        """,
        [event_date],
    ).fetchall()
    return DayStats(event_date, tuple((str(user), int(count)) for user, count in rows))


@dataclass(frozen=True)
class DailyTotal:
    """One date's totals in analytics.event_stats; `built` False: no ops.build_log row (never
    built, so its zero totals mean "unknown", not "no events")."""

    event_date: date
    events: int
    users: int
    built: bool


def daily_totals(
    connection: duckdb.DuckDBPyConnection, start: date, end: date
) -> tuple[DailyTotal, ...]:
    """Every date of [start, end) with its total events and users, oldest first."""
    if not _table_exists(connection, "analytics", "event_stats"):
        return ()
    has_build_log = _table_exists(connection, "ops", "build_log")
    built = (
        "exists (select 1 from ops.build_log as b where b.event_date = days.event_date)"
        if has_build_log
        else "false"
    )
    rows = connection.execute(
        f"""
        with days as (
            select cast(range as date) as event_date
            from range(cast(? as date), cast(? as date), interval 1 day)
        ),
        totals as (
            select event_date, sum(event_count) as events, count(*) as users
            from analytics.event_stats
            where event_date >= ? and event_date < ?
            group by event_date
        )
        select days.event_date, coalesce(totals.events, 0), coalesce(totals.users, 0), {built}
        from days
        left join totals on totals.event_date = days.event_date
        order by days.event_date
        """,  # `built` is one of the two fixed expressions above
        [start, end, start, end],
    ).fetchall()
    return tuple(
        DailyTotal(day, int(events), int(users), bool(b)) for day, events, users, b in rows
    )
