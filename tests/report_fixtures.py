"""Built stats for email tests: analytics.event_stats and ops.build_log as dbt leaves them."""

from __future__ import annotations

import email
import email.policy
from datetime import date
from email.message import EmailMessage
from pathlib import Path

import pytest

from event_pipeline import warehouse

DAY = date(2026, 1, 5)
OTHER_DAY = date(2026, 1, 6)


def write_stats(
    path: Path, rows: list[tuple[date, str, int]], *, built: tuple[date, ...] = ()
) -> None:
    """Replace analytics.event_stats with `rows` and record a build of their dates and of `built`
    in ops.build_log, as dbt's event_stats model and its post-hook do (same shapes)."""
    with warehouse.connect(path) as connection:
        connection.execute("create schema if not exists analytics")
        connection.execute("create schema if not exists ops")
        connection.execute(
            "create or replace table analytics.event_stats "
            "(event_date date, user_id varchar, event_count bigint)"
        )
        connection.execute(
            "create table if not exists ops.build_log (event_date date, invocation_id varchar, "
            "users bigint, events bigint, built_at timestamp, audit_key varchar)"
        )
        if rows:
            connection.executemany("insert into analytics.event_stats values (?, ?, ?)", rows)
        for day in sorted({row[0] for row in rows} | set(built)):
            connection.execute(
                "insert into ops.build_log select ?, 'test-build', count(*), "
                "coalesce(sum(event_count), 0), now()::timestamp, null "
                "from analytics.event_stats where event_date = ?",
                [day, day],
            )


def table(path: Path, sql: str) -> list[tuple]:
    with warehouse.connect(path, read_only=True) as connection:
        return connection.execute(sql).fetchall()


def read_eml(path: Path) -> EmailMessage:
    return email.message_from_bytes(path.read_bytes(), policy=email.policy.default)


def bodies(message: EmailMessage) -> tuple[str, str]:
    text = message.get_body(("plain",)).get_content()
    body_html = message.get_body(("html",)).get_content()
    return text, body_html


def sample_stats(path: Path) -> Path:
    """Built stats of DAY (18 events, 3 users) and OTHER_DAY in the warehouse at `path`."""
    write_stats(
        path,
        [
            (DAY, "10.0.0.1", 5),
            (DAY, "10.0.0.2", 12),
            (DAY, "10.0.0.3", 1),
            (OTHER_DAY, "10.0.0.9", 99),  # another date: must not appear
        ],
    )
    return path


@pytest.fixture(name="stats_db")
def stats_db_fixture(tmp_path: Path) -> Path:
    """A warehouse (a DuckLake, the default storage) with sample_stats."""
    return sample_stats(tmp_path / "warehouse")
