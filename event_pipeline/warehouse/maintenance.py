"""Housekeeping of a DuckLake warehouse: compact small files, expire old snapshots, delete files
that nothing refers to. A DuckDB file needs none of it (a replace rewrites it in place).

Every daily run adds snapshots and small Parquet files: a load writes a file per changed date of
raw.events, dbt an audit table and a file of stats; a replace keeps the old files for time
travel. `housekeep` (the event_stats_housekeeping DAG, `event-stats housekeeping`), in order:

1. merges adjacent small files of each table into larger ones, and rewrites files that are
   mostly deleted rows (the old files become unreferenced by new snapshots);
2. expires the snapshots older than the retention ($WAREHOUSE_SNAPSHOT_RETENTION_DAYS): time
   travel (`at (version => N)`) reaches back that far and no further; the ledgers name dates,
   runs and content hashes, never snapshots, so no ledger row loses what it refers to;
3. deletes the files only expired snapshots used, and orphaned files (a killed writer's) older
   than a day, so that a writer still in its transaction keeps its new files.

Each step is a DuckLake transaction of its own: a crash between steps leaves a consistent lake,
and the next run finishes the work.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import duckdb

from event_pipeline import settings
from event_pipeline.warehouse import lake

# A writer mid-transaction has written files no snapshot refers to yet: never delete those.
ORPHAN_MIN_AGE = "1 day"


@dataclass(frozen=True)
class LakeSize:
    data_files: int  # Parquet files under PATH/data/
    data_bytes: int
    snapshots: int
    catalog_bytes: int  # the SQLite catalog file, or the PostgreSQL database

    def describe(self) -> str:
        return (
            f"{self.data_files:,} data files ({self.data_bytes / 1e6:,.1f} MB), "
            f"{self.snapshots:,} snapshots, catalog {self.catalog_bytes / 1e6:,.1f} MB"
        )


def measure(connection: duckdb.DuckDBPyConnection, path: Path) -> LakeSize:
    """Files on disk, snapshots and catalog size of the lake at `path` (attached)."""
    files = [f for f in (Path(path) / lake.DATA_DIR).rglob("*") if f.is_file()]
    (snapshots,) = connection.execute(
        f"select count(*) from ducklake_snapshots('{lake.CATALOG_NAME}')"
    ).fetchall()[0]
    return LakeSize(
        data_files=len(files),
        data_bytes=sum(f.stat().st_size for f in files),
        snapshots=snapshots,
        catalog_bytes=_catalog_bytes(connection, path),
    )


def _catalog_bytes(connection: duckdb.DuckDBPyConnection, path: Path) -> int:
    if not settings.warehouse_catalog():
        catalog = Path(path) / lake.CATALOG_FILE
        return sum(f.stat().st_size for f in catalog.parent.glob(f"{catalog.name}*") if f.is_file())
    metadata = f"__ducklake_metadata_{lake.CATALOG_NAME}"
    rows = connection.execute(
        f"select * from postgres_query('{metadata}', "
        "'select pg_database_size(current_database())::bigint')"
    ).fetchall()
    return int(rows[0][0])


def housekeep(
    path: Path | None = None, *, retention_days: int | None = None
) -> tuple[LakeSize, LakeSize]:
    """Compact, expire snapshots older than `retention_days` (default the setting), delete
    unreferenced files; returns the lake's size before and after."""
    from event_pipeline.warehouse import connect

    path = Path(path) if path else settings.warehouse_path()
    if not lake.is_lake(path):
        raise ValueError(
            f"{path} is a DuckDB file: housekeeping is for a DuckLake warehouse (a "
            "WAREHOUSE_PATH not ending in .duckdb)"
        )
    days = settings.snapshot_retention_days() if retention_days is None else retention_days
    name = lake.CATALOG_NAME
    with connect(path) as connection:
        before = measure(connection, path)
        connection.execute(f"call ducklake_merge_adjacent_files('{name}')")
        connection.execute(f"call ducklake_rewrite_data_files('{name}')")
        connection.execute(
            f"call ducklake_expire_snapshots('{name}', "
            f"older_than => now() - interval '{int(days)} days')"
        )
        connection.execute(f"call ducklake_cleanup_old_files('{name}', cleanup_all => true)")
        connection.execute(
            f"call ducklake_delete_orphaned_files('{name}', "
            f"older_than => now() - interval '{ORPHAN_MIN_AGE}')"
        )
        after = measure(connection, path)
    return before, after
