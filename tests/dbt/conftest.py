"""Fixtures of the dbt tests: a test warehouse at the session's path, a copy of the project."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from stats_warehouse import Warehouse

from event_pipeline import settings, warehouse


@pytest.fixture(scope="session")
def dbt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dbt")


@pytest.fixture
def wh(dbt_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Warehouse:
    """An empty warehouse (raw.events and no stats table) at the session's warehouse path."""
    path = dbt_dir / "warehouse"  # a DuckLake, the default storage
    # Emptied in place, not deleted: the in-process dbt keeps its in-memory DuckDB, with the
    # lake's catalog attached, for the whole session.
    with warehouse.connect(path) as connection:
        for (schema,) in connection.execute(
            "select schema_name from duckdb_schemas() "
            "where database_name = current_database() and schema_name <> 'main'"
        ).fetchall():
            connection.execute(f'drop schema "{schema}" cascade')
    monkeypatch.setenv("WAREHOUSE_PATH", str(path))
    with warehouse.connect(path) as connection:
        warehouse.ensure_raw_schema(connection)
    return Warehouse(path=path, dbt_dir=dbt_dir)


@pytest.fixture
def project_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Warehouse]:
    """A copy of dbt_project/ that a test may change (used through DBT_PROJECT_DIR) and an empty
    warehouse of its own: (project folder, warehouse)."""
    project = tmp_path / "dbt_project"
    shutil.copytree(
        settings.dbt_project_dir(),
        project,
        symlinks=False,
        ignore=shutil.ignore_patterns("target", "logs", "dbt_packages"),
    )
    monkeypatch.setenv("DBT_PROJECT_DIR", str(project))
    path = tmp_path / "warehouse"
    monkeypatch.setenv("WAREHOUSE_PATH", str(path))
    with warehouse.connect(path) as connection:
        warehouse.ensure_raw_schema(connection)
    return project, Warehouse(path=path, dbt_dir=tmp_path)
