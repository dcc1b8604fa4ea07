"""The warehouse as a DuckLake: a directory holding a SQLite catalog and Parquet data files.

The default storage: a $WAREHOUSE_PATH that does not end in `.duckdb` names a DuckLake
directory, PATH/catalog.sqlite (the catalog: tables, snapshots, which files hold which rows) and
PATH/data/ (the Parquet files). It is attached to an in-memory DuckDB as the catalog `warehouse`
and made the default one, so raw.events, analytics.event_stats and ops.* resolve as in a DuckDB
file. `attach_sql` is the one place that builds the ATTACH statement (catalog and data path);
profiles.yml attaches it the same way for dbt.

$WAREHOUSE_CATALOG may put the catalog in PostgreSQL instead (the distributed profile: workers on
several machines share it; the data files then go to a folder they all reach).

The extensions come from PyPI (duckdb-extension-ducklake, -sqlite-scanner, -postgres-scanner) and
are installed into DuckDB's extension directory on first use (and by `make env`); DuckDB itself
never downloads one (autoinstall is off).
"""

from __future__ import annotations

import fcntl
import re
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import duckdb

from event_pipeline import settings
from event_pipeline.warehouse import commits

CATALOG_NAME = "warehouse"
CATALOG_FILE = "catalog.sqlite"
DATA_DIR = "data"
LOCK_DIR = "locks"
EXTENSIONS = ("ducklake", "sqlite_scanner", "postgres_scanner")
# Settings of every connection: never download an extension; load them from the PyPI packages.
CONFIG = {"autoinstall_known_extensions": False}


def is_lake(path: Path) -> bool:
    """A path ending in `.duckdb` is a DuckDB file; any other path is a DuckLake directory."""
    return Path(path).suffix != ".duckdb"


def attach_sql(path: Path, *, read_only: bool = False, catalog: str | None = None) -> str:
    """The ATTACH statement of the lake at `path`, as a plain `duckdb` shell can run it.

    `catalog` (default settings.warehouse_catalog()): empty for the SQLite catalog
    PATH/catalog.sqlite, or `postgres:<libpq connection string>` for a PostgreSQL one; the
    Parquet files are in PATH/data/ either way.
    """
    path = Path(path)
    catalog = settings.warehouse_catalog() if catalog is None else catalog
    options = [f"data_path '{_quoted(path / DATA_DIR)}/'"]
    if read_only:
        options.append("read_only")
    source = _quoted(catalog or f"sqlite:{path / CATALOG_FILE}")
    return f"attach if not exists 'ducklake:{source}' as {CATALOG_NAME} ({', '.join(options)})"


def install_extensions(connection: duckdb.DuckDBPyConnection | None = None) -> None:
    """Load the DuckLake and SQLite extensions, installing them from their PyPI packages into
    DuckDB's extension directory when missing (a fresh HOME, a new DuckDB version). Without a
    connection (`make env`), only install them, for dbt and the `duckdb` shell."""
    from duckdb_extensions import import_extension

    if connection is None:
        with duckdb.connect(config=CONFIG) as connection:
            install_extensions(connection)
        return
    for name in EXTENSIONS:
        try:
            connection.execute(f"load {name}")
        except duckdb.IOException:
            import_extension(name, con=connection)
            connection.execute(f"load {name}")


@contextmanager
def connect(path: Path, *, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
    """An in-memory DuckDB with the lake at `path` attached as `warehouse` and in use.

    Writing creates the lake when it does not exist; reading a missing lake fails (the catalog
    cannot be opened) and creates nothing.
    """
    path = Path(path)
    if not read_only:
        (path / DATA_DIR).mkdir(parents=True, exist_ok=True)
        if not settings.warehouse_catalog():  # a PostgreSQL catalog has no journal to set
            # Two first writers at once: the one that finds the catalog in rollback mode must
            # not switch it while the other is creating its tables (SQLite: "locked").
            with exclusive(path, "catalog"):
                use_wal(path / CATALOG_FILE)
    connection = duckdb.connect(config=CONFIG)
    try:
        # In-memory DuckDB spills to ./.tmp by default; keep spill files beside the data.
        connection.execute(f"set temp_directory = '{_quoted(path / 'tmp')}'")
        install_extensions(connection)
        # Two first writers at once both create the catalog's tables: one loses, then finds them.
        commits.retry_on_conflict(
            lambda: connection.execute(attach_sql(path, read_only=read_only)),
            what=f"Attaching the DuckLake {path}",
        )
        connection.execute(f"use {CATALOG_NAME}")
        yield connection
    finally:
        connection.close()


def create_if_missing(path: Path) -> None:
    """Create the lake at `path` unless it exists: dbt's attach cannot make its folder (SQLite
    fails to open a catalog in a missing directory), and a lake made here gets its WAL mode."""
    path = Path(path)
    if settings.warehouse_catalog() or (path / CATALOG_FILE).exists():
        return
    with connect(path):
        pass


@contextmanager
def exclusive(path: Path, name: str) -> Iterator[None]:
    """Hold the lock `name` of the lake at `path` (an OS file lock, PATH/locks/NAME.lock) until
    the block ends, waiting while another process holds it. For work that must not interleave
    with itself across processes beyond one transaction (an email's send between its ledger
    rows). The OS frees it when the holder dies. A lake on a local disk only."""
    folder = Path(path) / LOCK_DIR
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def use_wal(catalog: Path) -> None:
    """Put the SQLite catalog in WAL mode (kept in the file; creates an empty catalog, which
    DuckLake fills on ATTACH). In SQLite's default rollback journal, a reader inside a
    transaction blocks a writer's commit, and readers querying in a loop delay it; in WAL mode
    neither does (docs/STORAGE.md has the figures)."""
    with closing(sqlite3.connect(catalog, timeout=30)) as database:
        (mode,) = database.execute("pragma journal_mode").fetchone()
        if mode != "wal":
            database.execute("pragma journal_mode = wal")


def is_lake_connection(connection: duckdb.DuckDBPyConnection) -> bool:
    """Whether the connection's default catalog is a DuckLake."""
    rows = connection.execute(
        "select type from duckdb_databases() where database_name = current_database()"
    ).fetchall()
    return bool(rows) and rows[0][0] == "ducklake"


def current_snapshot(connection: duckdb.DuckDBPyConnection) -> int | None:
    """The DuckLake snapshot the connection reads (in a transaction: the one it started at);
    None on a DuckDB file."""
    if not is_lake_connection(connection):
        return None
    return connection.execute(f"from {CATALOG_NAME}.current_snapshot()").fetchall()[0][0]


def label_commit(
    connection: duckdb.DuckDBPyConnection, author: str, message: str, extra_info: str = ""
) -> None:
    """Label the snapshot the open transaction will commit (ducklake_snapshots' author,
    commit_message, commit_extra_info), so that a ledger row leads to the snapshot it wrote.
    Nothing on a DuckDB file."""
    if is_lake_connection(connection):
        connection.execute(
            f"call ducklake_set_commit_message('{CATALOG_NAME}', ?, ?, extra_info => ?)",
            [author, message, extra_info],
        )


# A table constraint (with the comma before it and a comment after that comma) or a column's.
_PRIMARY_KEY = re.compile(
    r",[ \t]*(--[^\n]*)?\s*primary key\s*\([^)]*\)|\s+primary key\b", re.IGNORECASE
)


def table_ddl(connection: duckdb.DuckDBPyConnection, ddl: str) -> str:
    """`ddl` as the storage of `connection` accepts it: unchanged for a DuckDB file."""
    return without_keys(ddl) if is_lake_connection(connection) else ddl


def without_keys(ddl: str) -> str:
    """`ddl` without PRIMARY KEY clauses, which DuckLake does not support: on a lake the
    writers keep those keys unique (see docs/STORAGE.md)."""
    return _PRIMARY_KEY.sub("", ddl)


def _quoted(path: Path | str) -> str:
    return str(path).replace("'", "''")
