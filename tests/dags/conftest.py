"""Fixtures of the DAG tests (dag_fixtures.py), for the modules that do not import them."""

from __future__ import annotations

from dag_fixtures import airflow_db_fixture, pipeline_env_fixture, start_airflow_fixture

__all__ = ["airflow_db_fixture", "pipeline_env_fixture", "start_airflow_fixture"]
