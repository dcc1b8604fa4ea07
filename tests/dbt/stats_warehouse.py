"""A test warehouse for dbt runs: fill raw.events, run dbt on it, read what dbt built.

Every dbt run is real (in-process dbtRunner on the dbt project of DBT_PROJECT_DIR). dbt re-parses
the project whenever its vars, profile (the warehouse path included) or files change (about 3 s).
To keep the suite short, the `wh` fixture (conftest.py) uses one warehouse path for the session
(the lake is recreated for each test) and every set of vars gets its own target directory, so
dbt's partial parse applies when a test repeats the vars of an earlier one: exactly what it does
for a person rerunning a command.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

from event_pipeline import warehouse
from event_pipeline.dbt_config import format_vars, run_dbt

Stats = list[tuple[date, str, int]]


def vars_key(dbt_vars: Mapping[str, Any] | None) -> str:
    return hashlib.sha256(format_vars(dbt_vars or {}).encode()).hexdigest()[:12]


@dataclass
class Warehouse:
    """A test warehouse: fill raw.events, run dbt, read analytics.event_stats."""

    path: Path
    dbt_dir: Path

    def add_events(self, events: Iterable[tuple[str, str, datetime]]) -> None:
        """Insert (event_id, user_id, event_at UTC) rows into raw.events."""
        rows = [
            (event_id, user, "click", at, at.date(), "test-load") for event_id, user, at in events
        ]
        with warehouse.connect(self.path) as connection:
            connection.executemany("insert into raw.events values (?, ?, ?, ?, ?, ?)", rows)

    def execute(self, sql: str, parameters: list[Any] | None = None) -> list[tuple]:
        with warehouse.connect(self.path) as connection:
            return connection.execute(sql, parameters or []).fetchall()

    def dbt(self, *args: str, dbt_vars: Mapping[str, Any] | None = None) -> list[Any]:
        """Run `dbt <args>`; returns dbt's result of each node, in the order they ran."""
        target = self.dbt_dir / f"target-{vars_key(dbt_vars)}"
        result = run_dbt(
            [*args, "--quiet", "--target-path", str(target), "--log-path", str(self.dbt_dir)],
            dbt_vars=dbt_vars,
            warehouse_path=self.path,
        )
        return list(getattr(result.result, "results", None) or [])

    def build(self, dbt_vars: Mapping[str, Any] | None = None, *args: str) -> None:
        self.dbt("build", *args, dbt_vars=dbt_vars)

    def stats(self) -> Stats:
        return self.execute(
            "select event_date, user_id, event_count from analytics.event_stats "
            "order by event_date, user_id"
        )

    def expected_stats(self) -> Stats:
        """What analytics.event_stats must hold for every date: counted here in Python."""
        rows = self.execute("select event_date, user_id from raw.events")
        return sorted((day, user, count) for (day, user), count in Counter(rows).items())


def stats_of(stats: Stats, *days: date) -> Stats:
    return [row for row in stats if row[0] in days]


def stats_outside(stats: Stats, *days: date) -> Stats:
    return [row for row in stats if row[0] not in days]


D1, D2, D3, D4 = (date(2024, 3, day) for day in (1, 2, 3, 4))


def day_events(day: date, counts: dict[str, int], prefix: str = "e") -> list:
    """counts[user] events of each user on `day`, spread over the day (last one at 23:59:59)."""
    start = datetime(day.year, day.month, day.day)
    events = []
    for user, count in counts.items():
        for n in range(count):
            at = start + timedelta(hours=(7 * n) % 24, seconds=n)
            events.append((f"{prefix}-{day}-{user}-{n}", user, at))
    events.append((f"{prefix}-{day}-late-night", "u1", start + timedelta(seconds=86399)))
    return events


def fill(wh: Warehouse) -> None:
    """Three dates of raw events; D4 has none."""
    wh.add_events(day_events(D1, {"u1": 3, "u2": 1}))
    wh.add_events(day_events(D2, {"u1": 2, "u2": 4, "u3": 1}))
    wh.add_events(day_events(D3, {"u2": 5}))
