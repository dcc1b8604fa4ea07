"""The warehouse connection: schema (on a DuckLake and on a DuckDB file), and waiting for another
process's lock on a DuckDB file."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from event_pipeline import warehouse as wh

HOLD_LOCK = """
import sys, time, duckdb
connection = duckdb.connect(sys.argv[1])
print("holding", flush=True)
time.sleep(float(sys.argv[2]))
connection.close()
"""


def hold_lock(path: Path, seconds: float) -> subprocess.Popen:
    """Another real process that opens the DuckDB file read-write and keeps it for `seconds`."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(path), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().strip() == "holding"
    return process


@pytest.fixture
def lock_holder():
    started: list[subprocess.Popen] = []

    def start(path: Path, seconds: float) -> subprocess.Popen:
        process = hold_lock(path, seconds)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


@pytest.mark.parametrize("storage", ["warehouse", "duckdb_file_warehouse"])
def test_schema_is_created_once_and_again_without_error(storage: str, request) -> None:
    warehouse = request.getfixturevalue(storage)
    for _ in range(2):
        with wh.connect(warehouse, lock_timeout=5) as connection:
            wh.ensure_raw_schema(connection)
    with wh.connect(warehouse, read_only=True) as connection:
        tables = connection.execute(
            "select table_name from information_schema.tables where table_schema = 'raw' order by 1"
        ).fetchall()
        columns = connection.execute(
            "select column_name from information_schema.columns "
            "where table_schema = 'raw' and table_name = 'events' order by ordinal_position"
        ).fetchall()
    assert tables == [("events",), ("load_log",)]
    assert [name for (name,) in columns] == [
        "event_id",
        "user_id",
        "event_type",
        "event_at",
        "event_date",
        "load_id",
    ]


def test_locked_file_fails_after_the_timeout_naming_the_holder(
    duckdb_file_warehouse: Path, lock_holder
) -> None:
    warehouse = duckdb_file_warehouse
    holder = lock_holder(warehouse, 30)
    started = time.monotonic()
    with pytest.raises(wh.WarehouseLockedError) as error:
        with wh.connect(warehouse, lock_timeout=1):
            pass
    waited = time.monotonic() - started
    assert 1 <= waited < 10
    assert f"PID {holder.pid}" in str(error.value)
    assert str(warehouse) in str(error.value)


def test_waits_for_the_lock_and_then_opens(duckdb_file_warehouse: Path, lock_holder) -> None:
    warehouse = duckdb_file_warehouse
    holder = lock_holder(warehouse, 1.5)
    with wh.connect(warehouse, lock_timeout=30) as connection:
        assert holder.poll() is not None  # we only got in after the holder let go
        assert connection.execute("select 42").fetchall() == [(42,)]


def test_the_pool_has_three_slots_on_a_lake_and_one_on_a_file(monkeypatch, tmp_path) -> None:
    from event_pipeline import settings

    monkeypatch.delenv("WAREHOUSE_POOL_SLOTS", raising=False)
    monkeypatch.setenv("WAREHOUSE_PATH", str(tmp_path / "warehouse"))
    assert settings.warehouse_pool_slots() == 3
    monkeypatch.setenv("WAREHOUSE_PATH", str(tmp_path / "warehouse.duckdb"))
    assert settings.warehouse_pool_slots() == 1
    monkeypatch.setenv("WAREHOUSE_POOL_SLOTS", "5")
    assert settings.warehouse_pool_slots() == 5
