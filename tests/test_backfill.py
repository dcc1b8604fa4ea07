"""`event-stats backfill`: a date range as ONE run of the event_stats DAG, as a user runs it.

Its tables must be those of per-date runs (`event-stats run`) of the same dates.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import date
from pathlib import Path

import duckdb
import pytest
from servers import free_port

START, END = date(2026, 4, 1), date(2026, 4, 4)  # three dates; end exclusive
DATES = ("2026-04-01", "2026-04-02", "2026-04-03")


def _env(folder: Path) -> dict[str, str]:
    env = dict(os.environ)  # the session's temp AIRFLOW_HOME (tests/conftest.py)
    env.update(
        WAREHOUSE_PATH=str(folder / "warehouse.duckdb"),
        EMAIL_OUTBOX_DIR=str(folder / "outbox"),
        EMAIL_TO="team@example.com",
    )
    return env


def _command(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "event_pipeline.cli", *args, "--port", str(free_port())]
    argv += ["--start", str(START), "--end", str(END)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def _tables(env: dict[str, str]) -> dict[str, list[tuple]]:
    """What a run leaves, without what names the run or the moment (load ids, times, paths)."""
    queries = {
        "raw.events": "select * exclude (load_id) from raw.events order by event_id",
        "analytics.event_stats": "select * from analytics.event_stats order by all",
        "ops.email_log": "select event_date, recipient, revision, content_hash, message_id, "
        "supersedes, total_events, users, status from ops.email_log order by all",
        "ops.build_log": "select event_date, users, events from ops.build_log order by all",
    }
    with duckdb.connect(env["WAREHOUSE_PATH"], read_only=True) as connection:
        return {name: connection.execute(sql).fetchall() for name, sql in queries.items()}


@pytest.mark.e2e
def test_a_backfill_is_one_run_that_leaves_the_tables_of_per_date_runs(tmp_path: Path):
    per_date, ranged = _env(tmp_path / "per-date"), _env(tmp_path / "range")

    _command(per_date, "run")
    backfill = _command(ranged, "backfill")

    expected = _tables(per_date)
    assert {row[0].isoformat() for row in expected["ops.email_log"]} == set(DATES)
    assert _tables(ranged) == expected
    # One run for the range: one load (one run id in the ledger for all three dates).
    with duckdb.connect(ranged["WAREHOUSE_PATH"], read_only=True) as connection:
        run_ids = connection.execute("select distinct run_id from raw.load_log").fetchall()
    assert len(run_ids) == 1 and run_ids[0][0].startswith("event-stats-backfill_2026-04-01_to_")
    # Progress per task, then the summary per date.
    out = backfill.stdout
    assert "2026-04-01 to 2026-04-03 (3 dates): one event_stats DAG run" in out
    for task in ("load_raw_events", "dbt.event_stats_model_build", "send_stats"):
        assert f"    {task}: success (" in out, out
    for day in DATES:
        [row] = [line for line in out.splitlines() if line.startswith(day + "  ")]
        assert "success" in row and "sent (revision 1)" in row, row
    emails = sorted(Path(ranged["EMAIL_OUTBOX_DIR"]).glob("*.eml"))
    assert len(emails) == 3

    # A backfill over dates per-date runs made changes nothing and sends nothing again.
    again = _command(per_date, "backfill")

    assert again.stdout.count("unchanged, not sent again") == 3, again.stdout
    after = _tables(per_date)
    assert len(after.pop("ops.build_log")) == 6  # the build ledger gains a row per build
    assert after == {name: rows for name, rows in expected.items() if name != "ops.build_log"}


def test_a_backfill_refuses_a_range_that_has_not_happened_yet(tmp_path: Path):
    env = _env(tmp_path)
    argv = [sys.executable, "-m", "event_pipeline.cli", "backfill"]
    argv += ["--start", "2026-01-01", "--end", "2999-01-01"]

    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)

    assert done.returncode != 0
    assert "backfill: --end 2999-01-01: no events after" in done.stderr, done.stderr
    assert not (tmp_path / "warehouse.duckdb").exists()
