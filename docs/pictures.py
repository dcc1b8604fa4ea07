"""`make pictures`: the README's images, screenshots of the real services in headless Chromium.

In a temporary folder (its own warehouse, outbox, dbt docs and Airflow home: the repository's
data/ and .airflow/ are not touched), it
1. starts the events API, loads and builds LEAD_DAYS days with `event-stats load` and dbt (the
   earlier days of the email's chart);
2. starts Airflow (api-server with the UI, scheduler, dag-processor), backfills BACKFILL_DAYS
   days of event_stats through the REST API (3 active runs), then runs event_stats_docs;
3. writes docs/images/email.png (the last day's stats email from the outbox, its HTML part as a
   mail client shows it), docs/images/airflow-backfill-grid.png (the DAG's grid in Airflow's UI)
   and docs/images/dbt-lineage.png (the dbt docs' lineage of event_stats, served by Airflow);
and stops every process it started, by PID.
"""

from __future__ import annotations

import email
import email.policy
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy
from cryptography.fernet import Fernet
from PIL import Image

from event_pipeline import screenshots, settings
from event_pipeline.events import process as events_process

IMAGES = settings.REPO_ROOT / "docs" / "images"
FIRST_DAY = date(2026, 1, 1)
LEAD_DAYS = 11  # loaded and built directly: the chart's earlier days
BACKFILL_DAYS = 3  # through Airflow, 3 runs at once: the grid
BIN = Path(sys.executable).parent


def main() -> None:
    if screenshots.chromium() is None:
        sys.exit("No Chromium: run `make browser` (as root) or set CHROMIUM, then retry.")
    started: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="event-stats-pictures-") as folder:
        try:
            run(Path(folder), started)
        finally:  # before the folder goes: the services write into it
            for process in reversed(started):
                if process.args[0] == str(BIN / "airflow"):
                    _stop_group(process)
                else:
                    events_process.stop(process)


def run(tmp: Path, started: list[subprocess.Popen]) -> None:
    port = events_process.free_port()
    api = events_process.start(port, options={}, log_file=tmp / "events-api.log")
    started.append(api.process)
    backfill_start = FIRST_DAY + timedelta(days=LEAD_DAYS)
    last_day = backfill_start + timedelta(days=BACKFILL_DAYS - 1)
    airflow_port = events_process.free_port()
    airflow_url = f"http://127.0.0.1:{airflow_port}"
    os.environ.update(
        {
            "WAREHOUSE_PATH": str(tmp / "warehouse.duckdb"),
            "EMAIL_OUTBOX_DIR": str(tmp / "outbox"),
            "EMAIL_TO": "team@example.com",
            "EVENTS_API_URL": api.url,
            "DBT_DOCS_DIR": str(tmp / "dbt-docs"),
            "AIRFLOW_HOME": str(tmp / "airflow"),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{tmp / 'airflow' / 'airflow.db'}",
            "AIRFLOW__API__PORT": str(airflow_port),
            "AIRFLOW__API__BASE_URL": airflow_url,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{airflow_url}/execution/",
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(16),
            "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",  # no login page to pass
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",  # only the backfill and triggers
        }
    )
    os.environ["AIRFLOW__COSMOS__DBT_DOCS_PROJECTS"] = settings.cosmos_docs_projects()
    os.environ.update(settings.airflow_env())

    say(f"Loading and building {FIRST_DAY} to {backfill_start - timedelta(days=1)} ...")
    window = ["--start", str(FIRST_DAY), "--end", str(backfill_start)]
    _check([BIN / "event-stats", "load", *window])
    dbt_vars = f"{{start_date: {FIRST_DAY}, end_date: {backfill_start}}}"
    project = ["--project-dir", str(settings.dbt_project_dir())]
    profiles = ["--profiles-dir", str(settings.dbt_profiles_dir())]
    _check([BIN / "dbt", "build", *project, *profiles, "--vars", dbt_vars])

    say(f"Starting Airflow on {airflow_url} ...")
    _check([BIN / "event-stats", "airflow", "pools", "list"])  # metadata database and pool
    for name, argv in {
        "api-server": ["api-server", "--port", str(airflow_port), "--workers", "1"],
        "dag-processor": ["dag-processor"],
        "scheduler": ["scheduler"],
    }.items():
        with (tmp / f"{name}.log").open("wb") as log:
            started.append(
                subprocess.Popen(
                    [str(BIN / "airflow"), *argv],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    rest = _Rest(airflow_url, tmp)
    for dag_id in ("event_stats", "event_stats_docs"):
        rest.wait(lambda d=dag_id: rest.get(f"/dags/{d}"), f"Airflow parsing {dag_id}", 300)
        rest.call("PATCH", f"/dags/{dag_id}", json={"is_paused": False})

    say(f"Backfilling {backfill_start} to {last_day} through Airflow ...")
    rest.call(
        "POST",
        "/backfills",
        json={
            "dag_id": "event_stats",
            "from_date": f"{backfill_start}T00:00:00Z",
            "to_date": f"{last_day}T00:00:00Z",
            "max_active_runs": 3,
        },
    )
    rest.wait(lambda: _finished(rest, "event_stats", BACKFILL_DAYS), "the backfill", 2400)
    say("Generating the dbt docs (event_stats_docs) ...")
    run_id = rest.call("POST", "/dags/event_stats_docs/dagRuns", json={"logical_date": None})[
        "dag_run_id"
    ]
    rest.wait(lambda: _finished(rest, "event_stats_docs", 1), "event_stats_docs", 300)
    state = rest.call("GET", f"/dags/event_stats_docs/dagRuns/{run_id}")["state"]
    if state != "success":
        raise RuntimeError(f"event_stats_docs ended {state}; logs in {tmp}")

    say(f"Screenshots into {IMAGES} ...")
    outbox = sorted((tmp / "outbox").glob(f"*{last_day}*.eml"))
    if len(outbox) != 1:
        raise RuntimeError(f"Expected one email of {last_day} in the outbox, found {outbox}")
    message = email.message_from_bytes(outbox[0].read_bytes(), policy=email.policy.default)
    _checked(screenshots.screenshot_email(message, IMAGES / "email.png", width=860, height=1200))
    _checked(
        screenshots.screenshot(
            f"{airflow_url}/dags/event_stats",
            IMAGES / "airflow-backfill-grid.png",
            width=1400,
            height=800,
            wait_ms=20000,
        )
    )
    lineage = "#!/model/model.event_stats.event_stats?g_v=1"
    _checked(
        screenshots.screenshot(
            f"{airflow_url}/cosmos/{settings.DBT_DOCS_SLUG}/dbt_docs_index.html{lineage}",
            IMAGES / "dbt-lineage.png",
            width=1400,
            height=800,
            wait_ms=15000,
        )
    )
    say("Done: docs/images/email.png, airflow-backfill-grid.png, dbt-lineage.png")


class _Rest:
    """Airflow's public REST API (every user is an admin here)."""

    def __init__(self, base: str, logs: Path) -> None:
        self.base, self.logs = base, logs

    def get(self, path: str) -> Any:
        try:
            answer = httpx.get(f"{self.base}/api/v2{path}", timeout=30)
        except httpx.HTTPError:
            return None
        return answer.json() if answer.status_code == 200 else None

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        answer = httpx.request(method, f"{self.base}/api/v2{path}", timeout=60, **kwargs)
        if not answer.is_success:
            raise RuntimeError(f"{method} {path}: {answer.status_code} {answer.text}")
        return answer.json()

    def wait(self, condition: Callable[[], Any], what: str, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = condition()
            if result:
                return result
            time.sleep(2)
        raise TimeoutError(f"{what} did not happen within {timeout:.0f} s; logs in {self.logs}")


def _finished(rest: _Rest, dag_id: str, count: int) -> bool:
    runs = (rest.get(f"/dags/{dag_id}/dagRuns") or {}).get("dag_runs", [])
    done = [r for r in runs if r["state"] in {"success", "failed"}]
    return len(runs) >= count and len(done) == len(runs)


def _checked(image_path: Path) -> None:
    """A screenshot that is (almost) one colour shows nothing: refuse it."""
    with Image.open(image_path) as image:
        gray = numpy.asarray(image.convert("L"))
    if gray.std() < 10:
        raise RuntimeError(f"{image_path} is (almost) blank: the page did not render in time")
    say(f"  {image_path.relative_to(settings.REPO_ROOT)} ({image_path.stat().st_size:,} bytes)")


def _check(argv: list[Any]) -> None:
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed:\n{done.stdout}\n{done.stderr}")


def _stop_group(process: subprocess.Popen) -> None:
    """Stop a process we started and its children (its own process group), by PID."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def say(text: str) -> None:
    print(text, flush=True)


if __name__ == "__main__":
    main()
