"""dags/event_stats.py imports like a plain DAG: no metadata database, no dbt work per parse.

Each import runs in a new Python process with an empty AIRFLOW_HOME, as a CI DAG-integrity check
or a user's first `airflow` command would, on a copy of dbt_project/ (DBT_PROJECT_DIR).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from dag_fixtures import DAG_FILE

from event_pipeline import dbt_config

EXPECTED_TASKS = {
    "load_raw_events",
    "dbt.stg_events__events_model_build",
    "dbt.int_event_stats__audit_model_build",
    "dbt.event_stats_model_build",
    "send_stats",
}

# Parses the DAG file and reports its import errors, task ids and the dbt commands it ran
# (dbtRunner.invoke wrapped to record them; dbt still runs for real).
IMPORT_SCRIPT = """
import json, sys, time
from dbt.cli.main import dbtRunner
commands = []
invoke = dbtRunner.invoke
def recording_invoke(self, args, **kwargs):
    commands.append(args[0])
    return invoke(self, args, **kwargs)
dbtRunner.invoke = recording_invoke
from airflow.dag_processing.dagbag import DagBag
started = time.monotonic()
bag = DagBag(dag_folder=sys.argv[1])
seconds = time.monotonic() - started
tasks = sorted(bag.dags["event_stats"].task_ids) if "event_stats" in bag.dags else []
print(json.dumps({"errors": bag.import_errors, "tasks": tasks, "dbt": commands, "s": seconds}))
"""


def _import_dag(home: Path, warehouse: Path) -> dict:
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "WAREHOUSE_PATH": str(warehouse),
    }
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_SCRIPT, str(DAG_FILE)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_dag_imports_without_a_database_and_parses_dbt_only_after_a_change(
    dbt_project_copy: Path, tmp_path: Path
) -> None:
    home = tmp_path / "airflow-home"
    home.mkdir()
    # In a folder that does not exist: importing the DAG must not create it (no dbt opened it).
    warehouse = tmp_path / "absent" / "warehouse"

    first = _import_dag(home, warehouse)
    assert first["errors"] == {}
    assert set(first["tasks"]) == EXPECTED_TASKS
    assert first["dbt"] == ["parse"]
    [stored] = (dbt_project_copy / dbt_config.MANIFEST_CACHE).iterdir()
    manifest = stored / "manifest.json"
    written = manifest.stat().st_mtime_ns

    second = _import_dag(home, warehouse)
    assert second["errors"] == {}
    assert set(second["tasks"]) == EXPECTED_TASKS
    assert second["dbt"] == [], "unchanged dbt files must reuse the manifest"
    assert manifest.stat().st_mtime_ns == written
    assert not (home / "airflow.db").exists()
    assert not warehouse.parent.exists()

    # A changed dbt file gets a manifest of its own, which has the change.
    (dbt_project_copy / "models" / "marts" / "event_stats_copy.sql").write_text(
        "select * from {{ ref('event_stats') }}\n"
    )
    changed = dbt_config.dbt_manifest()
    assert changed != manifest
    assert "model.event_stats.event_stats_copy" in json.loads(changed.read_text())["nodes"]
    assert manifest.stat().st_mtime_ns == written
