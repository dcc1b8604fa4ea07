"""Fixtures of the DAG tests (defined in dag_fixtures.py), for every module of tests/dags."""

from __future__ import annotations

from dag_fixtures import (
    airflow_db_fixture,
    airflow_services_fixture,
    dbt_project_copy_fixture,
    pipeline_env_fixture,
    start_airflow_fixture,
)

__all__ = [
    "airflow_db_fixture",
    "airflow_services_fixture",
    "dbt_project_copy_fixture",
    "pipeline_env_fixture",
    "start_airflow_fixture",
]
