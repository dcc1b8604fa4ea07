"""A simulated year of daily runs on a DuckLake, then housekeeping: files and catalog, before and
after (the figures in README, "Beyond one machine").

Each day as the DAG does it, without Airflow: `loader.load_range(day)`, `dbt build` of the day
(vars start_date/end_date, in-process), `report.send_stats(day)`; then
`maintenance.housekeep(retention_days=0)` (the simulation's snapshots are minutes old: 0 days
expires all but the latest, what a 30-day retention does to the snapshots of older days).
Checks that housekeeping changed no table content.

    uv run python benchmarks/lake_year.py [--days 365] [--start 2025-01-01]
        [--minutes M] [--catalog "postgres:dbname=... host=127.0.0.1"]   (the database must exist)

Without --catalog the catalog is SQLite in the temporary lake. Prints one line per 30 days.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

from event_pipeline import dbt_config, loader, report
from event_pipeline.events import process as events_process
from event_pipeline.warehouse import connect, maintenance

CONTENT = {
    "raw.events": "select count(*), sum(hash(event_id, user_id, event_at)) from raw.events",
    "analytics.event_stats": "select count(*), sum(hash(event_date, user_id, event_count)) "
    "from analytics.event_stats",
    "ops.email_log": "select count(*) from ops.email_log",
}


def content(path: Path) -> dict:
    with connect(path, read_only=True) as connection:
        return {name: connection.execute(sql).fetchall() for name, sql in CONTENT.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--start", type=date.fromisoformat, default=date(2025, 1, 1))
    parser.add_argument("--catalog", default="", help="postgres:<libpq string>; default SQLite")
    parser.add_argument(
        "--minutes", type=float, help="stop adding days after this long (then housekeep)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    workdir = Path(tempfile.mkdtemp(prefix="lake-year-"))
    lake = workdir / "warehouse"
    os.environ.update(
        WAREHOUSE_PATH=str(lake),
        WAREHOUSE_CATALOG=args.catalog,
        EMAIL_OUTBOX_DIR=str(workdir / "outbox"),
        EMAIL_TO="team@example.com",
    )
    server = events_process.start(events_process.free_port(), log_file=workdir / "api.log")
    began = time.monotonic()
    days = 0
    try:
        for number in range(args.days):
            if args.minutes and time.monotonic() - began > args.minutes * 60:
                break
            day = args.start + timedelta(days=number)
            loader.load_range(day, api_url=server.url, run_id=f"simulated-{day}")
            dbt_config.run_dbt(["build", "--quiet"], dbt_vars=dbt_config.date_vars(day))
            report.send_stats(day)
            days = number + 1
            if (number + 1) % 30 == 0 or number + 1 == args.days:
                print(f"{number + 1} days in {time.monotonic() - began:.0f} s", flush=True)
    finally:
        events_process.stop(server.process)
    tables = content(lake)
    before, after = maintenance.housekeep(lake, retention_days=0)
    assert content(lake) == tables, "housekeeping changed the tables"
    catalog = "PostgreSQL" if args.catalog else "SQLite"
    elapsed = time.monotonic() - began
    print(f"{days} daily runs from {args.start} in {elapsed:.0f} s, {catalog} catalog, {lake}")
    print(f"before housekeeping: {before.describe()}")
    print(f"after housekeeping:  {after.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
