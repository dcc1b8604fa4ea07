"""Every DAG file imports cleanly and keeps the settings the project promises."""

from __future__ import annotations

import datetime as dt

import pytest
from airflow.dag_processing.dagbag import DagBag

from event_pipeline import settings


@pytest.fixture(scope="module")
def dagbag() -> DagBag:
    # No airflow_db: parsing needs no metadata database (see test_dag_import.py).
    return DagBag(dag_folder=str(settings.REPO_ROOT / "dags"))


def test_no_import_errors(dagbag: DagBag) -> None:
    assert dagbag.import_errors == {}, f"DAG import errors: {dagbag.import_errors}"


def test_dags_were_found(dagbag: DagBag) -> None:
    assert "event_stats" in dagbag.dag_ids


def test_every_dag_declares_tags_retries_and_a_utc_start(dagbag: DagBag) -> None:
    for dag_id, dag in dagbag.dags.items():
        assert dag.tags, f"{dag_id} has no tags"
        assert dag.default_args.get("retries", 0) >= 1, f"{dag_id} has no retries"
        start = dag.start_date
        assert start is not None, f"{dag_id} has no start_date"
        assert start.utcoffset() == dt.timedelta(0), f"{dag_id} start_date is not UTC"
        assert dag.dag_id == dag.fileloc.rsplit("/", 1)[-1].removesuffix(".py")
