"""Rows per date of raw.events and analytics.event_stats, counted in the tables themselves.

The ledgers (warehouse.status) say the same for every write that went through the pipeline; these
counts are for checks that must not take the ledgers' word for it, such as the benchmark's. A
table that does not exist yet has no rows.
"""

from __future__ import annotations

from datetime import date

import duckdb

_COUNT_BY_DATE = {
    "raw.events": "select event_date, count(*) from raw.events group by event_date",
    "analytics.event_stats": (
        "select event_date, count(*) from analytics.event_stats group by event_date"
    ),
}


def raw_rows_by_date(connection: duckdb.DuckDBPyConnection) -> dict[date, int]:
    """Rows of raw.events per date (dates without rows are absent)."""
    return _count_by_date(connection, "raw.events")


def stats_rows_by_date(connection: duckdb.DuckDBPyConnection) -> dict[date, int]:
    """Rows of analytics.event_stats per date, that is users with events (dates without rows
    are absent)."""
    return _count_by_date(connection, "analytics.event_stats")


def _count_by_date(connection: duckdb.DuckDBPyConnection, table: str) -> dict[date, int]:
    schema, name = table.split(".")
    exists = connection.execute(
        "select count(*) from duckdb_tables() where schema_name = ? and table_name = ?",
        [schema, name],
    ).fetchall()[0][0]
    if not exists:
        return {}
    return dict(connection.execute(_COUNT_BY_DATE[table]).fetchall())
