"""`event-stats airflow ...` and `event-stats run` set Airflow up on demand, and once it is set up
they check it with two queries instead of importing Airflow and its migrations on every call."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

from event_pipeline import airflow_support, settings


def _metadata_db() -> str:
    return os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].removeprefix("sqlite:///")


def test_a_set_up_database_is_checked_without_importing_airflow(airflow_db: None):
    check = (
        "import sys; from event_pipeline import airflow_support; airflow_support.ensure_airflow();"
        "print(sorted(m for m in ('airflow', 'sqlalchemy') if m in sys.modules))"
    )

    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_setup_is_redone_when_the_pool_or_the_airflow_version_changed(airflow_db: None):
    assert airflow_support.is_set_up()
    with sqlite3.connect(_metadata_db()) as connection:
        connection.execute("delete from slot_pool where pool = ?", [settings.WAREHOUSE_POOL])
    connection.close()

    assert not airflow_support.is_set_up()  # a task in a missing pool would wait forever
    airflow_support.ensure_airflow()
    assert airflow_support.is_set_up()

    stamp = settings.airflow_home() / airflow_support.SETUP_STAMP
    stamp.write_text(json.dumps({**json.loads(stamp.read_text()), "airflow": "3.0.0"}))
    assert not airflow_support.is_set_up()  # another Airflow may need a migration
    airflow_support.ensure_airflow()
    assert airflow_support.is_set_up()
