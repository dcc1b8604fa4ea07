"""send-stats on stats that dbt really built: a built day, a built empty day, a date never built."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import date, datetime, timedelta
from pathlib import Path

import pytest
from report_fixtures import read_eml, table

from event_pipeline import mail, warehouse
from event_pipeline.dbt_config import date_vars, run_dbt
from event_pipeline.report import StatsNotBuiltError, send_stats

BUILT = date(2026, 2, 10)
EMPTY = BUILT + timedelta(days=1)  # built, no events
NEVER_BUILT = BUILT + timedelta(days=2)
TO = "a@example.com"


def build(path: Path, dbt_dir: Path, start: date) -> None:
    end = start + timedelta(days=1)
    target = dbt_dir / f"target-{start}"
    run_dbt(
        ["build", "--quiet", "--target-path", str(target), "--log-path", str(dbt_dir)],
        dbt_vars=date_vars(start, end),
        warehouse_path=path,
    )


@pytest.fixture
def built_warehouse(tmp_path: Path) -> Path:
    """Raw events on BUILT only; dbt builds BUILT and EMPTY (NEVER_BUILT has no build)."""
    path = tmp_path / "warehouse"
    start = datetime(BUILT.year, BUILT.month, BUILT.day, 8)
    rows = [
        (f"e{n}", user, "click", start + timedelta(minutes=n), BUILT, "test-load")
        for n, user in enumerate(["u1", "u1", "u2", "u1", "u3"])
    ]
    with warehouse.connect(path) as connection:
        warehouse.ensure_raw_schema(connection)
        connection.executemany("insert into raw.events values (?, ?, ?, ?, ?, ?)", rows)
    build(path, tmp_path / "dbt", BUILT)
    build(path, tmp_path / "dbt", EMPTY)
    return path


@pytest.mark.e2e
def test_built_days_are_sent_and_a_date_never_built_is_refused(
    built_warehouse: Path, tmp_path: Path
):
    outbox = tmp_path / "outbox"

    [day] = send_stats(BUILT, warehouse_path=built_warehouse, recipients=TO, outbox_dir=outbox)
    [empty] = send_stats(EMPTY, warehouse_path=built_warehouse, recipients=TO, outbox_dir=outbox)
    with pytest.raises(StatsNotBuiltError, match=f"{NEVER_BUILT} were never built"):
        send_stats(NEVER_BUILT, warehouse_path=built_warehouse, recipients=TO, outbox_dir=outbox)

    subject = read_eml(mail.outbox_path(outbox, TO, day.message_id))["Subject"]
    assert "5 events from 3 users" in subject
    empty_subject = read_eml(mail.outbox_path(outbox, TO, empty.message_id))["Subject"]
    assert "0 events from 0 users" in empty_subject
    assert len(list(outbox.glob("*.eml"))) == 2
    sent_dates = table(built_warehouse, "select event_date from ops.email_log order by 1")
    assert sent_dates == [(BUILT,), (EMPTY,)]

    # Rebuilding an unchanged day records another build; the email is not sent again.
    build(built_warehouse, tmp_path / "dbt", BUILT)
    [again] = send_stats(BUILT, warehouse_path=built_warehouse, recipients=TO, outbox_dir=outbox)
    assert again.status == "unchanged"

    # The command line: a clear refusal (no traceback), and the built day reported unchanged.
    refused = send_stats_command(built_warehouse, outbox, NEVER_BUILT)
    unchanged = send_stats_command(built_warehouse, outbox, EMPTY)
    assert refused.returncode == 1
    assert f"send-stats failed: The stats of {NEVER_BUILT} were never built" in refused.stderr
    assert "event-stats run --start" in refused.stderr and "Traceback" not in refused.stderr
    assert unchanged.returncode == 0, unchanged.stderr
    assert f"{EMPTY} {TO}: unchanged {empty.message_id}" in unchanged.stdout
    assert len(list(outbox.glob("*.eml"))) == 2


def send_stats_command(path: Path, outbox: Path, day: date) -> subprocess.CompletedProcess:
    """`event-stats send-stats --date D --outbox` (the outbox: no Airflow connection lookup)."""
    command = [sys.executable, "-m", "event_pipeline.cli", "send-stats", "--date", str(day)]
    command += ["--warehouse", str(path), "--outbox"]
    env = {**os.environ, "EMAIL_TO": TO, "EMAIL_OUTBOX_DIR": str(outbox)}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
