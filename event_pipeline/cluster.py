"""The distributed profile's processes on one machine: start them, list them, stop them by PID.

`event-stats cluster start` runs Airflow's api-server, scheduler, dag-processor, triggerer and N
Celery workers in the background, each in a process group of its own, with its PID file and log
in $AIRFLOW_HOME/cluster/; `event-stats cluster stop` stops exactly those PIDs. Everything else
is configuration from the environment (deploy/distributed.env sets it): CeleryExecutor, Airflow's
metadata in PostgreSQL, the Redis broker, the DuckLake catalog in PostgreSQL ($WAREHOUSE_CATALOG)
and its data files in $WAREHOUSE_PATH, a folder every worker reaches.

On several machines, each runs its own share of the same commands with the same environment
(`airflow celery worker` on the worker machines); see README, "Beyond one machine".
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from event_pipeline import settings

CELERY_EXECUTOR = "CeleryExecutor"
# Identifies a worker's task instances (`hostname`) when several workers share one machine.
WORKER_NAME_VARIABLE = "EVENT_STATS_WORKER_NAME"


@dataclass(frozen=True)
class Service:
    name: str
    argv: list[str]
    env: dict[str, str]


@dataclass(frozen=True)
class Running:
    name: str
    pid: int
    alive: bool
    log: Path


def worker_hostname() -> str:
    """Airflow's [core] hostname_callable for the workers `start` runs: `worker-N@host`, so
    task instances say which of the machine's workers ran them (the machine's name otherwise)."""
    host = socket.getfqdn()
    name = os.environ.get(WORKER_NAME_VARIABLE)
    return f"{name}@{host}" if name else host


def cluster_dir() -> Path:
    return settings.airflow_home() / "cluster"


def _airflow() -> str:
    beside_python = Path(sys.executable).with_name("airflow")
    return str(beside_python) if beside_python.exists() else "airflow"


def services(workers: int) -> list[Service]:
    """The processes of the profile, with `workers` Celery workers (one slot each by default:
    $AIRFLOW__CELERY__WORKER_CONCURRENCY)."""
    airflow = _airflow()
    queue = os.environ.get("AIRFLOW__OPERATORS__DEFAULT_QUEUE", "default")
    found = [
        Service("api-server", [airflow, "api-server"], {}),
        Service("scheduler", [airflow, "scheduler"], {}),
        Service("dag-processor", [airflow, "dag-processor"], {}),
        Service("triggerer", [airflow, "triggerer"], {}),
    ]
    for number in range(1, workers + 1):
        name = f"worker-{number}"
        argv = [airflow, "celery", "worker", "--celery-hostname", f"{name}@%h", "--queues", queue]
        # The task logs are written to $AIRFLOW_HOME/logs, which the api-server reads here; on
        # separate machines, drop --skip-serve-logs (each worker serves its logs on port 8793).
        argv.append("--skip-serve-logs")
        env = {
            WORKER_NAME_VARIABLE: name,
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "event_pipeline.cluster.worker_hostname",
        }
        found.append(Service(name, argv, env))
    return found


def check_profile() -> None:
    """Refuse to start a cluster on the embedded defaults (LocalExecutor, SQLite)."""
    executor = os.environ.get("AIRFLOW__CORE__EXECUTOR", "")
    database = os.environ.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "")
    if executor != CELERY_EXECUTOR or not database.startswith("postgresql"):
        raise ValueError(
            f"The cluster needs the distributed profile (CeleryExecutor and PostgreSQL), not "
            f"executor={executor or 'unset'} and database={database.split(':')[0] or 'unset'}: "
            "`set -a; . deploy/distributed.env; set +a` first, or `make cluster-start`"
        )


def shared_secrets() -> dict[str, str]:
    """The JWT secret (task processes to the api-server) and Fernet key every process must
    share: from the environment, else made once and kept in $AIRFLOW_HOME/cluster/secrets.json
    (mode 600). On several machines, set both in the environment of every machine."""
    names = ("AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__CORE__FERNET_KEY")
    stored_file = cluster_dir() / "secrets.json"
    stored = json.loads(stored_file.read_text()) if stored_file.exists() else {}
    if not all(stored.get(name) for name in names):
        from cryptography.fernet import Fernet

        stored = {names[0]: secrets.token_hex(32), names[1]: Fernet.generate_key().decode()}
        stored_file.parent.mkdir(parents=True, exist_ok=True)
        stored_file.touch(mode=0o600)
        stored_file.write_text(json.dumps(stored))
    return {name: os.environ.get(name) or stored[name] for name in names}


def ensure_postgres_database(conninfo: str) -> None:
    """Create the PostgreSQL database of `conninfo` (libpq string or URL) when it does not
    exist, connecting to the server's `postgres` database to do so."""
    import psycopg2
    from psycopg2 import sql
    from psycopg2.extensions import parse_dsn

    options = parse_dsn(conninfo)
    name = options.get("dbname")
    try:
        psycopg2.connect(**options).close()
        return
    except psycopg2.OperationalError as error:
        if not name or f'database "{name}" does not exist' not in str(error):
            raise
    server = {**options, "dbname": "postgres"}
    try:
        admin = psycopg2.connect(**server)
    except psycopg2.OperationalError as error:
        raise RuntimeError(
            f"PostgreSQL database {name} does not exist and cannot be created from the "
            f"server's `postgres` database ({error}); create it: `createdb {name}`"
        ) from error
    admin.autocommit = True
    try:
        with admin.cursor() as cursor:
            cursor.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    finally:
        admin.close()


def _sqlalchemy_to_libpq(url: str) -> str:
    """A SQLAlchemy PostgreSQL URL (postgresql+psycopg2://...) as libpq understands it."""
    scheme, _, rest = url.partition("://")
    return f"postgresql://{rest}" if scheme.startswith("postgresql") else url


def prepare() -> None:
    """What the processes need before they start: the PostgreSQL databases, Airflow's schema and
    pool, and the lake's catalog (made here once, so that workers never race to create it)."""
    from event_pipeline import airflow_support
    from event_pipeline.warehouse import connect

    ensure_postgres_database(
        _sqlalchemy_to_libpq(os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    )
    catalog = settings.warehouse_catalog()
    if catalog:
        ensure_postgres_database(catalog.removeprefix("postgres:"))
    airflow_support.ensure_airflow()
    with connect():  # creates the lake (catalog tables, data folder) when new
        pass


def _start_ticks(pid: int) -> str | None:
    """The process's start time (clock ticks since boot), to tell it from a later one that got
    the same PID; None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_file(name: str) -> Path:
    return cluster_dir() / f"{name}.pid"


def _read_pid(name: str) -> tuple[int, bool] | None:
    """(pid, still the process we started) from the service's PID file, or None."""
    path = _pid_file(name)
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    pid = int(record["pid"])
    return pid, _start_ticks(pid) == record["start"]


def start(workers: int = 2) -> list[Running]:
    """Start every service in the background; refuses when one of them already runs."""
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    os.environ.update(settings.airflow_env())
    check_profile()
    directory = cluster_dir()
    wanted = services(workers)
    running = [s.name for s in wanted if (found := _read_pid(s.name)) and found[1]]
    if running:
        raise RuntimeError(
            f"Already running: {', '.join(running)}; `event-stats cluster stop` first"
        )
    directory.mkdir(parents=True, exist_ok=True)
    os.environ.update(shared_secrets())
    prepare()
    started = []
    for service in wanted:
        log = directory / f"{service.name}.log"
        with log.open("ab") as output:
            process = subprocess.Popen(
                service.argv,
                env={**os.environ, **service.env},
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, stopped as one
            )
        record = {"pid": process.pid, "start": _start_ticks(process.pid), "argv": service.argv}
        _pid_file(service.name).write_text(json.dumps(record))
        started.append(Running(service.name, process.pid, True, log))
    return started


def status() -> list[Running]:
    """Every service with a PID file, and whether that process still runs."""
    found = []
    for path in sorted(cluster_dir().glob("*.pid")):
        name = path.stem
        pid, alive = _read_pid(name) or (0, False)
        found.append(Running(name, pid, alive, cluster_dir() / f"{name}.log"))
    return found


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs (zombies, exited but not yet reaped, do not)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def stop(grace: float = 60.0) -> list[Running]:
    """Stop the services started by `start`, by their PIDs: SIGTERM to each (a Celery worker
    then finishes its running task), SIGKILL to what is left of its process group after
    `grace` seconds. A PID file whose process is gone (or is another process now) is dropped."""
    stopped = status()
    for service in stopped:
        if service.alive:
            os.kill(service.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for service in stopped:
        if not service.alive:
            continue
        while _group_alive(service.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _group_alive(service.pid):
            try:
                os.killpg(service.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for service in stopped:
        _pid_file(service.name).unlink(missing_ok=True)
    return stopped
