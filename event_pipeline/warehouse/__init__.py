"""The warehouse: the one home of warehouse SQL. This module opens it; its modules hold the
tables' DDL and queries (raw.py: raw.events and raw.load_log; email_log.py, stats.py, ...).

$WAREHOUSE_PATH chooses the storage (`connect`, the one place that decides): a DuckLake
directory (the default, data/warehouse; see lake.py), or, for a path ending in `.duckdb`, one
DuckDB file; the same table names resolve on both.

On a DuckLake, readers never block writers and several processes write at once: a transaction
that loses a commit race runs again (commits.retry_on_conflict). DuckDB allows one process to
hold a database file at a time: `connect` waits, with a bounded retry, while another process (a
load, dbt, a user's SQL shell) holds the lock, then fails with a message naming the holder.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import duckdb

from event_pipeline import settings
from event_pipeline.warehouse import lake
from event_pipeline.warehouse.raw import ensure_raw_schema

__all__ = ["WarehouseLockedError", "connect", "ensure_raw_schema", "exclusive"]

log = logging.getLogger(__name__)


class WarehouseLockedError(RuntimeError):
    """Another process held the DuckDB file for longer than the lock timeout."""


def _lock_holder(message: str) -> str:
    match = re.search(r"Conflicting lock is held in (.+?) \(PID (\d+)\)", message)
    return f"{match.group(1)} (PID {match.group(2)})" if match else "another process"


def exclusive(name: str, path: Path | None = None) -> contextlib.AbstractContextManager[None]:
    """A lock `name` across processes, held for a block that spans several transactions (see
    lake.exclusive). On a DuckDB file, the connection's file lock already excludes every other
    process: nothing more is taken."""
    path = Path(path) if path else settings.warehouse_path()
    return lake.exclusive(path, name) if lake.is_lake(path) else nullcontext()


@contextmanager
def connect(
    path: Path | None = None,
    *,
    read_only: bool = False,
    lock_timeout: float | None = None,
) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open the warehouse at `path` (default $WAREHOUSE_PATH): a DuckDB file, waiting up to
    `lock_timeout` seconds for another process's lock, or a DuckLake directory."""
    path = Path(path) if path else settings.warehouse_path()
    if lake.is_lake(path):
        with lake.connect(path, read_only=read_only) as connection:
            yield connection
        return
    timeout = settings.warehouse_lock_timeout() if lock_timeout is None else lock_timeout
    if not read_only:
        path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        try:
            connection = duckdb.connect(str(path), read_only=read_only)
            break
        except duckdb.IOException as error:
            if "Could not set lock" not in str(error):
                raise
            holder = _lock_holder(str(error))
            if time.monotonic() >= deadline:
                raise WarehouseLockedError(
                    f"The warehouse {path} is locked by {holder}; waited {timeout:.0f} s. "
                    "Close that process (an open SQL shell, a running load or dbt) and retry, "
                    "or raise WAREHOUSE_LOCK_TIMEOUT."
                ) from error
            log.info("Warehouse %s is locked by %s; waiting", path, holder)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
    try:
        yield connection
    finally:
        connection.close()
