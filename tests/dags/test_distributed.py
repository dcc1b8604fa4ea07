"""The distributed profile against real servers: CeleryExecutor with Redis, Airflow's metadata and
the DuckLake catalog in PostgreSQL, data files in a shared folder (deploy/distributed.env).

`event-stats cluster start --workers 2` runs the services; a backfill of several dates runs with
two Celery workers on different dates at the same time, and the tables come out equal, row for
row, to those of the embedded profile (`event-stats run`: a DuckDB file, LocalExecutor, SQLite).
A worker killed with SIGKILL in the middle of a task: the task is retried on the other worker and
the tables are still those of the clean run.

Each test has its own PostgreSQL databases (made in the server of $EVENT_STATS_TEST_POSTGRES,
default database `test` on 127.0.0.1:5432, and dropped after) and its own Celery queue on the
Redis server of $EVENT_STATS_TEST_REDIS (default redis://127.0.0.1:6379/0). Skipped, saying
which, when either server is not reachable.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path

import duckdb
import psutil
import pytest
from dag_fixtures import EVENT_STATS, wait_for
from servers import free_port

from event_pipeline import settings

pytestmark = pytest.mark.e2e

FIRST_DAY = date(2026, 3, 1)
DAYS = 3
DATES = [FIRST_DAY + timedelta(days=i) for i in range(DAYS)]
ENV_FILE = settings.REPO_ROOT / "deploy" / "distributed.env"
POSTGRES = os.environ.get("EVENT_STATS_TEST_POSTGRES", "host=127.0.0.1 port=5432 dbname=test")
REDIS = os.environ.get("EVENT_STATS_TEST_REDIS", "redis://127.0.0.1:6379/0")

# The tables a run writes, without what differs by design between two runs (load and dbt
# invocation ids, times, run ids).
TABLE_QUERIES = {
    "raw.events": "select event_id, user_id, event_type, event_at, event_date from raw.events "
    "order by event_id",
    "raw.load_log": "select distinct event_date, rows, checksum from raw.load_log order by all",
    "analytics.event_stats": "select * from analytics.event_stats order by event_date, user_id",
    "ops.build_log": "select distinct event_date, users, events from ops.build_log order by all",
    "ops.email_log": "select event_date, recipient, revision, content_hash, message_id, status "
    "from ops.email_log order by all",
}


def read_tables(connection: duckdb.DuckDBPyConnection) -> dict[str, list[tuple]]:
    return {name: connection.execute(sql).fetchall() for name, sql in TABLE_QUERIES.items()}


def profile_settings() -> dict[str, str]:
    """deploy/distributed.env as a shell reads it (`set -a; . FILE`)."""
    script = f'set -a; . "{ENV_FILE}"; env -0'
    output = subprocess.run(
        ["bash", "-c", script],
        capture_output=True,
        check=True,
        env={"PATH": os.environ["PATH"]},
        cwd=settings.REPO_ROOT,
    ).stdout.decode()
    shell_own = {"PATH", "PWD", "SHLVL", "_", "OLDPWD"}
    pairs = (entry.split("=", 1) for entry in output.split("\0") if "=" in entry)
    return {key: value for key, value in pairs if key not in shell_own}


@pytest.fixture(name="postgres", scope="module")
def postgres_fixture() -> dict[str, str]:
    """The test PostgreSQL server's connection options (libpq), or a skip saying why."""
    import psycopg2
    from psycopg2.extensions import parse_dsn

    try:
        psycopg2.connect(POSTGRES, connect_timeout=5).close()
    except psycopg2.OperationalError as error:
        pytest.skip(
            f"PostgreSQL not reachable at {POSTGRES!r} ({str(error).strip()}): start it, or set "
            "EVENT_STATS_TEST_POSTGRES to a libpq string of a server where databases may be made"
        )
    return parse_dsn(POSTGRES)


@pytest.fixture(name="redis_url", scope="module")
def redis_fixture() -> str:
    """The test Redis server's URL, or a skip saying why."""
    import redis

    try:
        redis.Redis.from_url(REDIS, socket_timeout=5).ping()
    except (redis.RedisError, OSError) as error:
        pytest.skip(f"Redis not reachable at {REDIS} ({error}): start it, or set "
                    "EVENT_STATS_TEST_REDIS")  # fmt: skip
    return REDIS


def _run_admin(postgres: dict[str, str], statements: list[str]) -> None:
    """Run statements that cannot be in a transaction (create/drop database)."""
    import psycopg2

    connection = psycopg2.connect(**postgres)
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            for statement in statements:
                cursor.execute(statement)
    finally:
        connection.close()


@pytest.fixture(name="databases")
def databases_fixture(postgres: dict[str, str]) -> Iterator[dict[str, str]]:
    """Two fresh databases of this test (Airflow's metadata, the lake's catalog): libpq
    strings, dropped at the end."""
    token = secrets.token_hex(4)
    names = {"airflow": f"es_test_{token}_airflow", "lake": f"es_test_{token}_lake"}
    _run_admin(postgres, [f"create database {name}" for name in names.values()])
    server = " ".join(f"{k}={v}" for k, v in postgres.items() if k != "dbname")
    yield {role: f"{server} dbname={name}" for role, name in names.items()}
    _run_admin(
        postgres, [f"drop database if exists {name} with (force)" for name in names.values()]
    )


def _url(conninfo: str, scheme: str) -> str:
    """A libpq string as a SQLAlchemy URL (user, host, port, dbname)."""
    options = dict(part.split("=", 1) for part in conninfo.split())
    user = options.get("user", "")
    password = f":{options['password']}" if "password" in options else ""
    credentials = f"{user}{password}@" if user else ""
    host = f"{options.get('host', 'localhost')}:{options.get('port', '5432')}"
    return f"{scheme}://{credentials}{host}/{options['dbname']}"


@dataclass
class Cluster:
    env: dict[str, str]
    databases: dict[str, str]
    home: Path
    warehouse: Path
    outbox: Path

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [EVENT_STATS, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=settings.REPO_ROOT,
        )

    def metadata(self, sql: str, params: tuple = ()) -> list[tuple]:
        import psycopg2

        with psycopg2.connect(self.databases["airflow"]) as connection:
            with connection.cursor() as cursor:
                cursor.execute(sql, params)
                rows = cursor.fetchall() if cursor.description else []
        connection.close()
        return rows

    def logs(self, chars: int = 3000) -> str:
        files = sorted((self.home / "cluster").glob("*.log"))
        files += sorted((self.home / "logs").rglob("*.log"))
        return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-chars:]}" for p in files)

    def pid(self, service: str) -> int:
        import json

        return json.loads((self.home / "cluster" / f"{service}.pid").read_text())["pid"]

    def wait_until_parsed(self) -> None:
        def parsed() -> bool:
            rows = self.metadata("select bundle_name from dag where dag_id = 'event_stats'")
            return bool(rows) and rows[0][0] is not None

        wait_for(parsed, "the dag-processor parsing event_stats", 240, 2, self.logs)

    def backfill(self, dates: list[date]) -> None:
        unpaused = self.metadata(
            "update dag set is_paused = false where dag_id = 'event_stats' returning dag_id"
        )
        assert unpaused, "event_stats is not in the metadata database"
        created = self.cli(
            "airflow", "backfill", "create", "--dag-id", "event_stats",
            "--from-date", dates[0].isoformat(), "--to-date", dates[-1].isoformat(),
            "--max-active-runs", str(len(dates)),
        )  # fmt: skip
        assert created.returncode == 0, created.stdout + created.stderr

    def wait_for_runs(self, count: int, timeout: float) -> list[tuple]:
        def finished():
            runs = self.metadata(
                "select run_id, state from dag_run where dag_id = 'event_stats' "
                "and run_type = 'backfill'"
            )
            done = [r for r in runs if r[1] in ("success", "failed")]
            return len(runs) >= count and len(done) == len(runs) and runs

        return wait_for(finished, f"{count} backfill runs finishing", timeout, 3, self.logs)

    def task_instances(self) -> list[TaskRun]:
        rows = self.metadata(
            "select run_id, task_id, try_number, hostname, pid, start_date, end_date, state "
            "from task_instance where dag_id = 'event_stats' order by start_date"
        )
        history = self.metadata(
            "select run_id, task_id, try_number, hostname, pid, start_date, end_date, state "
            "from task_instance_history where dag_id = 'event_stats' order by start_date"
        )
        return [TaskRun(*row) for row in history + rows]

    def tables(self) -> dict[str, list[tuple]]:
        from event_pipeline.warehouse import lake

        os.environ["WAREHOUSE_CATALOG"] = self.env["WAREHOUSE_CATALOG"]
        try:
            with lake.connect(self.warehouse, read_only=True) as connection:
                return read_tables(connection)
        finally:
            del os.environ["WAREHOUSE_CATALOG"]


@dataclass(frozen=True)
class TaskRun:
    run_id: str
    task_id: str
    try_number: int
    hostname: str | None
    pid: int | None
    start: datetime | None
    end: datetime | None
    state: str | None

    def describe(self) -> str:
        return (
            f"{self.run_id} {self.task_id} try {self.try_number} on {self.hostname} "
            f"pid {self.pid} {self.start:%H:%M:%S}-{self.end:%H:%M:%S}"
        )


@pytest.fixture(name="start_cluster")
def start_cluster_fixture(
    databases: dict[str, str], redis_url: str, events_api, tmp_path: Path
) -> Iterator:
    """`start_cluster(**settings)`: deploy/distributed.env with this test's databases, folders,
    ports and Celery queue, and `event-stats cluster start --workers 2`; stopped by
    `event-stats cluster stop` (by PID) at the end."""
    started: list[Cluster] = []

    def start(**overrides: str) -> Cluster:
        home = tmp_path / "airflow-home"
        api_port = free_port()
        env = {**os.environ, **profile_settings()}
        env.update(
            AIRFLOW_HOME=str(home),
            AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=_url(databases["airflow"], "postgresql+psycopg2"),
            AIRFLOW__CELERY__BROKER_URL=redis_url,
            AIRFLOW__CELERY__RESULT_BACKEND=_url(databases["airflow"], "db+postgresql+psycopg2"),
            AIRFLOW__OPERATORS__DEFAULT_QUEUE=f"event-stats-test-{secrets.token_hex(4)}",
            AIRFLOW__API__PORT=str(api_port),
            AIRFLOW__API__BASE_URL=f"http://127.0.0.1:{api_port}",
            AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"http://127.0.0.1:{api_port}/execution/",
            AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT=str(free_port()),
            AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE="False",  # only the backfill's runs
            AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL="600",
            WAREHOUSE_PATH=str(tmp_path / "shared" / "warehouse"),
            WAREHOUSE_CATALOG=f"postgres:{databases['lake']}",
            EVENTS_API_URL=events_api(),
            EMAIL_OUTBOX_DIR=str(tmp_path / "outbox"),
            EMAIL_TO="team@example.com",
        )
        env.update(overrides)
        cluster = Cluster(
            env=env,
            databases=databases,
            home=home,
            warehouse=Path(env["WAREHOUSE_PATH"]),
            outbox=tmp_path / "outbox",
        )
        started.append(cluster)
        result = cluster.cli("cluster", "start", "--workers", "2")
        assert result.returncode == 0, result.stdout + result.stderr
        return cluster

    yield start
    for cluster in started:
        stopped = cluster.cli("cluster", "stop")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr


@pytest.fixture(name="embedded_tables", scope="module")
def embedded_tables_fixture(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tables of the embedded profile (`event-stats run`: DuckDB file, LocalExecutor,
    SQLite metadata) for DATES."""
    tmp = tmp_path_factory.mktemp("embedded")
    warehouse = tmp / "warehouse.duckdb"
    env = {
        **os.environ,
        "WAREHOUSE_PATH": str(warehouse),
        "EMAIL_OUTBOX_DIR": str(tmp / "outbox"),
        "EMAIL_TO": "team@example.com",
    }
    end = DATES[-1] + timedelta(days=1)
    result = subprocess.run(
        [EVENT_STATS, "run", "--start", DATES[0].isoformat(), "--end", end.isoformat()]
        + ["--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    with duckdb.connect(str(warehouse), read_only=True) as connection:
        tables = read_tables(connection)
    assert [d for d, *_ in tables["ops.build_log"]] == DATES
    return tables


def overlapping_on_two_workers(runs: list[TaskRun]) -> list[tuple[TaskRun, TaskRun]]:
    """Pairs of task instances of different dates (runs) on different workers whose
    [start, end] overlap."""
    timed = [r for r in runs if r.start and r.end and r.hostname]
    return [
        (a, b)
        for i, a in enumerate(timed)
        for b in timed[i + 1 :]
        if a.run_id != b.run_id and a.hostname != b.hostname and a.start < b.end and b.start < a.end
    ]


def test_a_backfill_on_celery_workers_equals_the_embedded_profile(
    start_cluster, embedded_tables: dict
):
    cluster = start_cluster()
    cluster.wait_until_parsed()
    cluster.backfill(DATES)

    runs = cluster.wait_for_runs(DAYS, 900)

    assert {state for _, state in runs} == {"success"}, cluster.logs()
    tasks = cluster.task_instances()
    workers = {t.hostname for t in tasks}
    assert len(workers) >= 2 and all(h and h.startswith("worker-") for h in workers), workers
    # Two workers processed different dates at the same time (hostname, pid, times):
    pairs = overlapping_on_two_workers(tasks)
    assert pairs, "\n".join(map(str, tasks))
    for a, b in pairs[:3]:
        print(f"{a.describe()}  at the same time as  {b.describe()}")
    assert cluster.tables() == embedded_tables
    assert len(list(cluster.outbox.glob("*.eml"))) == DAYS


def _kill_tree(pid: int) -> list[int]:
    """SIGKILL a process and all its descendants, each by its PID (a machine lost)."""
    root = psutil.Process(pid)
    victims = [root, *root.children(recursive=True)]
    for process in victims:
        try:
            os.kill(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return [process.pid for process in victims]


def test_a_worker_killed_mid_task_is_retried_on_the_other_and_the_tables_are_unchanged(
    start_cluster, embedded_tables: dict
):
    # A dead worker's task is failed (and retried) after 20 s without heartbeat.
    cluster = start_cluster(AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT="20")
    cluster.wait_until_parsed()
    cluster.backfill(DATES)

    def publishing() -> tuple | None:
        rows = cluster.metadata(
            "select run_id, task_id, hostname, pid from task_instance where dag_id = "
            "'event_stats' and task_id = 'dbt.event_stats_model_build' and state = 'running' "
            "and hostname is not null"
        )
        return rows[0] if rows else None

    run_id, task_id, hostname, task_pid = wait_for(
        publishing, "a dbt publish running", 600, 0.5, cluster.logs
    )
    victim = hostname.split("@")[0]
    killed = _kill_tree(cluster.pid(victim))
    assert task_pid in killed  # the task process itself died with its worker

    runs = cluster.wait_for_runs(DAYS, 900)

    assert {state for _, state in runs} == {"success"}, cluster.logs()
    tries = [t for t in cluster.task_instances() if (t.run_id, t.task_id) == (run_id, task_id)]
    assert tries[0].hostname == hostname and tries[0].state != "success", tries
    assert tries[-1].state == "success" and tries[-1].try_number > tries[0].try_number, tries
    survivor = tries[-1].hostname
    assert survivor != hostname, tries  # retried elsewhere: the killed worker is gone
    print(f"killed {victim} during {run_id} {task_id} (pid {task_pid}); retried on {survivor}")
    assert cluster.tables() == embedded_tables
