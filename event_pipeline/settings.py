"""Every setting of the pipeline: an environment variable with a default that works as cloned.

Paths default to locations inside the repository, so a clone runs with no configuration at all.
"""

from __future__ import annotations

import json
import os
import re
from datetime import timedelta
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _path(name: str, default: Path) -> Path:
    value = os.environ.get(name)
    return Path(value).expanduser().resolve() if value else default


def warehouse_path() -> Path:
    """The warehouse ($WAREHOUSE_PATH): raw.events, analytics.event_stats and the ledgers.

    A DuckLake directory (the default, data/warehouse): PATH/catalog.sqlite and PATH/data/. A
    path ending in `.duckdb` is one DuckDB file instead (see docs/STORAGE.md).
    """
    return _path("WAREHOUSE_PATH", REPO_ROOT / "data" / "warehouse")


def warehouse_catalog() -> str:
    """Where a DuckLake warehouse keeps its catalog ($WAREHOUSE_CATALOG).

    Empty (the default): the SQLite file WAREHOUSE_PATH/catalog.sqlite. `postgres:` followed by
    a libpq connection string (`postgres:dbname=event_stats_lake host=127.0.0.1`): a PostgreSQL
    database that every worker reaches (it must exist); the Parquet files stay in
    WAREHOUSE_PATH/data/, a folder every worker must reach too. A DuckLake path only.
    """
    value = os.environ.get("WAREHOUSE_CATALOG", "").strip()
    if value and not value.startswith("postgres:"):
        raise ValueError(
            f"WAREHOUSE_CATALOG={value!r}: use `postgres:` and a libpq connection string, e.g. "
            "postgres:dbname=event_stats_lake host=127.0.0.1, or leave it empty for the SQLite "
            "catalog in the warehouse directory"
        )
    return value


def snapshot_retention_days() -> int:
    """Days of DuckLake snapshots housekeeping keeps ($WAREHOUSE_SNAPSHOT_RETENTION_DAYS,
    default 30): time travel reaches back that far; older snapshots and their files go."""
    return max(0, int(os.environ.get("WAREHOUSE_SNAPSHOT_RETENTION_DAYS", "30")))


def events_api_url() -> str:
    """Base URL of the events API (without /events)."""
    return os.environ.get("EVENTS_API_URL", "http://127.0.0.1:5000").rstrip("/")


def events_api_user() -> str | None:
    """User the loader logs in as ($EVENTS_API_USER); unset: no login. `serve-events
    --require-login` accepts this user. The DAG prefers its Airflow connection (events_api_conn_id).
    """
    return os.environ.get("EVENTS_API_USER") or None


def events_api_password() -> str | None:
    """Password of events_api_user ($EVENTS_API_PASSWORD); keep it out of the repository."""
    return os.environ.get("EVENTS_API_PASSWORD") or None


def events_api_conn_id() -> str:
    """Airflow connection (type http: host, port, login, password) the DAG's load task uses for
    the events API when it exists; otherwise EVENTS_API_URL, EVENTS_API_USER and
    EVENTS_API_PASSWORD."""
    return os.environ.get("EVENT_STATS_EVENTS_API_CONN_ID", "events_api")


def events_api_attempts() -> int:
    """Attempts per events API request (connection errors, timeouts, 5xx) before failing."""
    return max(1, int(os.environ.get("EVENTS_API_ATTEMPTS", "5")))


def events_api_timeout() -> float:
    """Seconds the loader waits to connect to the events API, or for its next bytes."""
    return float(os.environ.get("EVENTS_API_TIMEOUT", "60"))


def events_api_backoff() -> float:
    """First retry delay in seconds; it doubles after every failed attempt."""
    return float(os.environ.get("EVENTS_API_BACKOFF", "1"))


def loader_memory_limit() -> str:
    """DuckDB memory_limit while loading; beyond it DuckDB spills to disk (e.g. 1GB, 500MB)."""
    return os.environ.get("LOADER_MEMORY_LIMIT", "1GB")


def email_to() -> str:
    """Recipients of the daily stats email: $EMAIL_TO, an address list as in a To header
    (`a@x.com, "Doe, John" <j@x.com>`). Parse it with mail.parse_recipients."""
    return os.environ.get("EMAIL_TO", "stats@example.com")


def email_from() -> str:
    """Sender of the stats email, e.g. `Event Stats <stats@example.com>` (the Message-ID's
    domain is its address's domain). An SMTP connection's from_email extra takes precedence."""
    return os.environ.get("EMAIL_FROM", "event-stats@localhost")


def email_outbox_dir() -> Path:
    """Where the default email backend writes .eml files."""
    return _path("EMAIL_OUTBOX_DIR", REPO_ROOT / "data" / "outbox")


def alert_email_to() -> str:
    """Recipients of failure notifications and deadline alerts: $EVENT_STATS_ALERT_TO, an
    address list like $EMAIL_TO; default: the stats recipients."""
    return os.environ.get("EVENT_STATS_ALERT_TO", "").strip() or email_to()


def stats_deadline() -> timedelta:
    """How long after a day ends (00:00 UTC) its stats email must have gone out, else an alert.

    $EVENT_STATS_DEADLINE is the UTC time on the next day, HH:MM or HH:MM:SS (default 06:00);
    hours above 23 reach into later days (30:00 is 06:00 two days after the day).
    """
    raw = os.environ.get("EVENT_STATS_DEADLINE", "06:00").strip()
    match = re.fullmatch(r"(\d+):([0-5]\d)(?::([0-5]\d))?", raw)
    if not match:
        raise ValueError(
            f"EVENT_STATS_DEADLINE={raw!r} is not a time; use HH:MM or HH:MM:SS (UTC, on the day "
            "after the processed day), e.g. 06:00"
        )
    hours, minutes, seconds = (int(group or 0) for group in match.groups())
    return timedelta(hours=hours, minutes=minutes, seconds=seconds)


def smtp_conn_id() -> str:
    """Airflow connection used for SMTP when it exists; otherwise email goes to the outbox."""
    return os.environ.get("EVENT_STATS_SMTP_CONN_ID", "smtp_default")


def dbt_project_dir() -> Path:
    return _path("DBT_PROJECT_DIR", REPO_ROOT / "dbt_project")


def dbt_profiles_dir() -> Path:
    return _path("DBT_PROFILES_DIR", REPO_ROOT)


def dbt_docs_dir() -> Path:
    """Where the generated dbt docs are (index.html, manifest.json, catalog.json), which Airflow's
    UI serves through Cosmos' plugin (airflow_env)."""
    return _path("DBT_DOCS_DIR", REPO_ROOT / "data" / "dbt-docs")


def cosmos_docs_projects(docs_dir: Path | None = None) -> str:
    """Cosmos' `[cosmos] dbt_docs_projects`: the dbt docs at `docs_dir` (default dbt_docs_dir())
    served at /cosmos/event_stats/dbt_docs_index.html, listed in the UI's Browse menu."""
    docs = {"dir": str(docs_dir or dbt_docs_dir()), "name": "dbt docs (event_stats)"}
    return json.dumps({DBT_DOCS_SLUG: docs})


# The path segment of the dbt docs in Airflow's UI: /cosmos/<slug>/dbt_docs_index.html
DBT_DOCS_SLUG = "event_stats"


def warehouse_lock_timeout() -> float:
    """Seconds to wait for another process's DuckDB write lock before failing."""
    return float(os.environ.get("WAREHOUSE_LOCK_TIMEOUT", "300"))


def warehouse_commit_attempts() -> int:
    """Attempts of a warehouse transaction that loses a commit race on a DuckLake (another
    process committed first) before the task fails; each retry runs the whole transaction."""
    return max(1, int(os.environ.get("WAREHOUSE_COMMIT_ATTEMPTS", "8")))


def warehouse_pool_slots() -> int:
    """Slots of the Airflow pool WAREHOUSE_POOL: tasks that may write the warehouse at once.
    Default 3 on a DuckLake (commit races are retried) and 1 on a DuckDB file (one writer)."""
    from event_pipeline.warehouse import lake

    default = "3" if lake.is_lake(warehouse_path()) else "1"
    return max(1, int(os.environ.get("WAREHOUSE_POOL_SLOTS", default)))


# Airflow pool (warehouse_pool_slots() slots) that every task opening the warehouse runs in.
WAREHOUSE_POOL = "duckdb_warehouse"


def airflow_home() -> Path:
    return _path("AIRFLOW_HOME", REPO_ROOT / ".airflow")


def airflow_env() -> dict[str, str]:
    """Airflow configuration for the embedded defaults: SQLite, LocalExecutor, dags/ of this repo.

    Values already present in the environment win, so a deployment can override any of them.
    """
    home = airflow_home()
    api_port = os.environ.get("AIRFLOW__API__PORT", "8080")
    defaults = {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "4",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__COSMOS__ENABLE_TELEMETRY": "False",
        "AIRFLOW__COSMOS__DBT_DOCS_PROJECTS": cosmos_docs_projects(),
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        # A parse that must remake the dbt manifest (a dbt file changed since `make env`) runs
        # `dbt parse`; on a busy 2-core machine that can exceed Airflow's 30 s.
        "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "180",
        "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
        # The UI and API of `event-stats airflow standalone` on loopback only (Airflow: 0.0.0.0),
        # and task processes reach its execution API there, also on another AIRFLOW__API__PORT.
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
        "DO_NOT_TRACK": "1",
        "SCARF_ANALYTICS": "false",
    }
    return {key: os.environ.get(key, value) for key, value in defaults.items()}
