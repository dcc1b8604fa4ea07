"""Housekeeping of a DuckLake warehouse (event_pipeline.warehouse.maintenance), and the settings
of the distributed profile (the catalog in PostgreSQL, the warehouse pool's slots).

A lake written by real loads (one snapshot and one Parquet file per daily load): housekeeping
merges the files, expires the snapshots older than the retention, deletes the files nothing
refers to and old orphans, and never changes what a query reads.
"""

from __future__ import annotations

import os
import time
from datetime import date, timedelta
from pathlib import Path

import duckdb
import pytest

from event_pipeline import loader, settings
from event_pipeline.warehouse import connect, lake, maintenance

DAYS = [date(2026, 2, 1) + timedelta(days=i) for i in range(5)]


def _tables(path: Path) -> dict[str, list[tuple]]:
    with connect(path, read_only=True) as connection:
        return {
            "raw.events": connection.execute("select * from raw.events order by all").fetchall(),
            "raw.load_log": connection.execute(
                "select * from raw.load_log order by all"
            ).fetchall(),
        }


def _orphan(folder: Path, name: str, age_days: float) -> Path:
    """A Parquet file no snapshot refers to (as a killed writer leaves), `age_days` old."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    duckdb.sql(f"copy (select 1 as x) to '{path}' (format parquet)")
    then = time.time() - age_days * 86400
    os.utime(path, (then, then))
    return path


@pytest.fixture(name="daily_lake")
def daily_lake_fixture(events_api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A lake (SQLite catalog) after five daily loads, one date each."""
    path = tmp_path / "lake"
    monkeypatch.setenv("WAREHOUSE_PATH", str(path))
    monkeypatch.delenv("WAREHOUSE_CATALOG", raising=False)
    url = events_api()
    for day in DAYS:
        loader.load_range(day, api_url=url, warehouse_path=path)
    return path


def test_housekeeping_compacts_expires_and_deletes_old_orphans_without_changing_the_tables(
    daily_lake: Path,
):
    events_dir = next((daily_lake / lake.DATA_DIR).rglob("*.parquet")).parent
    old_orphan = _orphan(events_dir, "killed-writer-old.parquet", age_days=2)
    new_orphan = _orphan(events_dir, "writer-in-flight.parquet", age_days=0)
    tables = _tables(daily_lake)

    before, after = maintenance.housekeep(daily_lake, retention_days=0)

    assert _tables(daily_lake) == tables
    assert before.data_files >= len(DAYS) + 2
    assert after.data_files < before.data_files
    assert after.snapshots == 1 < before.snapshots  # all but the latest expired
    assert not old_orphan.exists()
    assert new_orphan.exists()  # a writer's file before its commit is never deleted
    with connect(daily_lake, read_only=True) as connection:
        listed = {
            Path(row[0]).name
            for row in connection.execute(
                "select data_file from ducklake_list_files('warehouse', 'events', schema => 'raw')"
            ).fetchall()
        }
    on_disk = {p.name for p in events_dir.glob("*.parquet")}
    assert on_disk == listed | {new_orphan.name}


def _history(path: Path) -> dict[int, int]:
    """raw.events' row count at every snapshot that has the table (time travel)."""
    counts = {}
    with connect(path, read_only=True) as connection:
        ids = connection.execute("select snapshot_id from ducklake_snapshots('warehouse')")
        for (snapshot,) in ids.fetchall():
            try:
                at = connection.execute(
                    f"select count(*) from raw.events at (version => {snapshot})"
                )
            except duckdb.Error:
                continue  # before the table existed
            counts[snapshot] = at.fetchall()[0][0]
    return counts


def test_snapshots_within_the_retention_are_kept_for_time_travel(daily_lake: Path):
    history = _history(daily_lake)
    assert len(set(history.values())) >= len(DAYS)  # one state per daily load

    maintenance.housekeep(daily_lake, retention_days=30)  # nothing is 30 days old

    assert history.items() <= _history(daily_lake).items()


def test_housekeeping_refuses_a_duckdb_file(tmp_path: Path):
    with pytest.raises(ValueError, match="DuckDB file"):
        maintenance.housekeep(tmp_path / "warehouse.duckdb")


def test_the_catalog_setting_names_postgres_or_nothing(monkeypatch: pytest.MonkeyPatch):
    path = Path("/srv/shared/warehouse")
    monkeypatch.delenv("WAREHOUSE_CATALOG", raising=False)
    assert "'ducklake:sqlite:/srv/shared/warehouse/catalog.sqlite'" in lake.attach_sql(path)
    monkeypatch.setenv("WAREHOUSE_CATALOG", "postgres:dbname=lake host=db.internal")
    sql = lake.attach_sql(path)
    assert "'ducklake:postgres:dbname=lake host=db.internal'" in sql
    assert "data_path '/srv/shared/warehouse/data/'" in sql
    monkeypatch.setenv("WAREHOUSE_CATALOG", "mysql:db=lake")
    with pytest.raises(ValueError, match="WAREHOUSE_CATALOG"):
        settings.warehouse_catalog()


def test_more_than_one_warehouse_pool_slot_is_refused_on_a_duckdb_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from event_pipeline import airflow_support

    monkeypatch.setenv("WAREHOUSE_PATH", str(tmp_path / "warehouse.duckdb"))
    monkeypatch.setenv("WAREHOUSE_POOL_SLOTS", "2")
    with pytest.raises(ValueError, match="WAREHOUSE_POOL_SLOTS=2.*one writer"):
        airflow_support.ensure_airflow()
