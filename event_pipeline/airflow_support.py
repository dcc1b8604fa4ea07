"""Glue between Airflow and the package: setup on demand, the run's processed dates, SMTP and
events API connection lookups.

Airflow reads its configuration when it is first imported, so callers apply
`settings.airflow_env()` to os.environ before calling anything here (`configure_environment`).
Airflow itself is imported lazily, inside the functions.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import date, timedelta
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from event_pipeline import settings
from event_pipeline.run_window import WindowError, run_window

if TYPE_CHECKING:
    from event_pipeline.mail import SmtpSettings
    from event_pipeline.sources import Credentials

log = logging.getLogger(__name__)

# In AIRFLOW_HOME: the schema revision ensure_airflow left (is_set_up compares the database's).
SETUP_STAMP = "event-stats-setup.json"


def configure_environment() -> None:
    """Apply the embedded Airflow configuration (values already in the environment win)."""
    os.environ.update(settings.airflow_env())


def ensure_airflow() -> None:
    """Create or upgrade the metadata database and create the warehouse pool. Idempotent.

    The pool matters: a task in a pool that does not exist is held by the scheduler forever.
    When the database is already set up (is_set_up: two queries) it imports no Airflow.
    """
    configure_environment()
    if is_set_up():
        return
    from airflow.models.pool import Pool
    from airflow.utils import db

    from event_pipeline.warehouse import lake

    slots = settings.warehouse_pool_slots()
    if slots > 1 and not lake.is_lake(settings.warehouse_path()):
        raise ValueError(
            f"WAREHOUSE_POOL_SLOTS={slots}, but the warehouse {settings.warehouse_path()} is a "
            "DuckDB file, which allows one writer: set it to 1, or use a DuckLake (a "
            "WAREHOUSE_PATH not ending in .duckdb)"
        )
    settings.airflow_home().mkdir(parents=True, exist_ok=True)
    db.upgradedb()  # creates a fresh database, or migrates an old one; no-op when current
    pool = Pool.get_pool(settings.WAREHOUSE_POOL)
    if pool is None or pool.slots != slots:
        Pool.create_or_update_pool(
            name=settings.WAREHOUSE_POOL,
            slots=slots,
            description="Tasks using the warehouse at once (1 for a DuckDB file: one writer)",
            include_deferred=False,
        )
        log.info("Created Airflow pool %s with %d slot(s)", settings.WAREHOUSE_POOL, slots)
    stamp = {"airflow": version("apache-airflow"), "database": _database_url()}
    _setup_stamp().write_text(json.dumps({**stamp, "revision": _database_state()[0]}))


def _setup_stamp() -> Path:
    """Where ensure_airflow notes the schema revision the installed Airflow migrated to."""
    return settings.airflow_home() / SETUP_STAMP


def _database_url() -> str:
    return os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]  # set by configure_environment


def is_set_up() -> bool:
    """Whether the metadata database holds the schema revision ensure_airflow migrated it to for
    the installed Airflow version, and the warehouse pool with the configured slots (no
    Airflow import). False whenever in doubt: then ensure_airflow does the full setup."""
    try:
        stamp = json.loads(_setup_stamp().read_text())
    except (OSError, ValueError):
        return False
    if (
        stamp.get("airflow") != version("apache-airflow")
        or stamp.get("database") != _database_url()
    ):
        return False
    revision, slots = _database_state()
    expected_slots = settings.warehouse_pool_slots()
    return revision is not None and revision == stamp.get("revision") and slots == expected_slots


def _database_state() -> tuple[str | None, int | None]:
    """(alembic revision, slots of the warehouse pool) of the metadata database; None: absent.

    SQLite (the embedded default) is read with the standard library's sqlite3, which imports in
    milliseconds; other databases with SQLAlchemy.
    """
    url = _database_url()
    queries = (
        ("select version_num from alembic_version", {}),
        ("select slots from slot_pool where pool = :pool", {"pool": settings.WAREHOUSE_POOL}),
    )
    if url.startswith("sqlite:///"):
        import sqlite3

        path = Path(url.removeprefix("sqlite:///").split("?")[0])
        if not path.exists():
            return None, None
        try:
            with closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as connection:
                revision, slots = (
                    (connection.execute(sql, values).fetchone() or (None,))[0]
                    for sql, values in queries
                )
        except sqlite3.Error:
            return None, None
        return revision, slots
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as connection:
            revision, slots = (
                connection.execute(sqlalchemy.text(sql), values).scalar() for sql, values in queries
            )
    except sqlalchemy.exc.SQLAlchemyError:
        return None, None
    finally:
        engine.dispose()
    return revision, slots


def run_day(dag_run: Any, offset: int = 0, params: Mapping[str, Any] | None = None) -> str:
    """The first date (YYYY-MM-DD) a DAG run processes, plus `offset` days (see run_window)."""
    return (run_window(dag_run, params).start + timedelta(days=offset)).isoformat()


def run_date(dag_run: Any, params: Mapping[str, Any] | None = None) -> date:
    """The first date a DAG run processes (see run_window)."""
    return run_window(dag_run, params).start


def let_dag_test_finish_with_deadlines(dag: Any) -> Any:
    """Make `dag.test()` (`airflow dags test`, `event-stats run`) work on a DAG with deadline
    alerts; returns the DAG.

    Airflow 3.3.2's dag.test() schedules a copy of the DAG in which the deadline alerts are
    their definitions, not the database ids that the end of a successful run looks them up by:
    the lookup raises, after every task succeeded, and the command fails. A dag.test() run is not
    a scheduled run, so no deadline applies to it: the copy is made without them.
    """
    original_test = type(dag).test

    def test_without_deadlines(*args: Any, **kwargs: Any) -> Any:
        deadlines, dag.deadline = dag.deadline, None
        try:
            return original_test(dag, *args, **kwargs)
        finally:
            dag.deadline = deadlines

    dag.test = test_without_deadlines
    return dag


@contextmanager
def named_test_runs(run_id: Callable[[], str], note: str, user: str) -> Iterator[None]:
    """Make the runs `dag.test()` creates meanwhile look like what they are in Airflow's UI.

    Airflow 3.3.2's dag.test() records a run started at its logical date (a run of a past day
    lasts hundreds of days in the UI), triggered by "test", by user "dag_test", with a run id
    saying only "manual". While this is in force the run is created by the same helper
    (airflow.models.dagrun.get_or_create_dagrun, which dag.test() looks up on each call) with
    its real start time, the run id `run_id()`, triggered by the command line, by `user`, and
    `note` as its note. Its end (set when it finishes) was real already.
    """
    from airflow.models import dagrun
    from airflow.sdk import timezone
    from airflow.utils.types import DagRunTriggeredByType

    original = dagrun.get_or_create_dagrun

    def create(**kwargs: Any) -> Any:
        kwargs.update(
            run_id=run_id(),
            start_date=timezone.utcnow(),
            triggered_by=DagRunTriggeredByType.CLI,
            triggering_user_name=user,
        )
        session = kwargs["session"]
        created = original(**kwargs)
        created.note = note
        session.commit()
        return created

    dagrun.get_or_create_dagrun = create
    try:
        yield
    finally:
        dagrun.get_or_create_dagrun = original


def smtp_settings(conn_id: str | None = None) -> SmtpSettings | None:
    """SMTP settings from Airflow's connection `conn_id`, or None when it does not exist.

    Extras follow the SMTP provider's names: disable_ssl (default false in the provider; SSL is
    used unless disabled), disable_tls, timeout, from_email, and ssl_context: unset or "default"
    verifies the server's TLS certificate and host name; "none" skips verification (an explicit
    opt-out, for a test server with a self-signed certificate).
    """
    from airflow.exceptions import AirflowNotFoundException
    from airflow.sdk import BaseHook

    from event_pipeline.mail import SSL_CONTEXT_DEFAULT, SSL_CONTEXT_NONE, SmtpSettings

    conn_id = conn_id or settings.smtp_conn_id()
    try:
        connection = BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        log.info("No Airflow connection %s: stats emails go to the outbox", conn_id)
        return None
    extra = connection.extra_dejson
    use_ssl = not _flag(extra.get("disable_ssl", False))
    ssl_context = extra.get("ssl_context") or SSL_CONTEXT_DEFAULT
    if ssl_context not in (SSL_CONTEXT_DEFAULT, SSL_CONTEXT_NONE):
        raise ValueError(
            f"Airflow connection {conn_id}: extra ssl_context must be "
            f"{SSL_CONTEXT_DEFAULT!r} or {SSL_CONTEXT_NONE!r}, not {ssl_context!r}"
        )
    return SmtpSettings(
        host=connection.host or "localhost",
        port=int(connection.port or (465 if use_ssl else 25)),
        login=connection.login or None,
        password=connection.password or None,
        use_ssl=use_ssl,
        starttls=not use_ssl and not _flag(extra.get("disable_tls", False)),
        timeout=float(extra.get("timeout", 30)),
        from_email=extra.get("from_email"),
        verify_tls=ssl_context != SSL_CONTEXT_NONE,
    )


@dataclass(frozen=True)
class EventsApiAccess:
    """Where the load task fetches events and as whom; None: the environment's settings."""

    api_url: str | None = None
    credentials: Credentials | None = None


def events_api_access(conn_id: str | None = None) -> EventsApiAccess:
    """The events API's Airflow connection `conn_id` (type http), or the settings without one.

    host (a URL, or a host name with the connection's schema, http by default, and port)
    replaces $EVENTS_API_URL; login and password are the credentials of the API's POST /login.
    Airflow masks the connection's password in task logs.
    """
    from airflow.exceptions import AirflowNotFoundException
    from airflow.sdk import BaseHook

    from event_pipeline.sources import Credentials

    conn_id = conn_id or settings.events_api_conn_id()
    try:
        connection = BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        log.info("No Airflow connection %s: the events API from EVENTS_API_* settings", conn_id)
        return EventsApiAccess()
    api_url = None
    if connection.host:
        api_url = connection.host
        if "://" not in api_url:
            api_url = f"{connection.schema or 'http'}://{api_url}"
            if connection.port:
                api_url += f":{connection.port}"
    credentials = None
    if connection.login or connection.password:
        if not (connection.login and connection.password):
            raise ValueError(
                f"Airflow connection {conn_id}: set both login and password to log in to the "
                "events API, or neither"
            )
        credentials = Credentials(connection.login, connection.password)
    log.info(
        "Events API from Airflow connection %s: %s, %s",
        conn_id,
        api_url or settings.events_api_url(),
        f"login as {connection.login!r}" if credentials else "no login",
    )
    return EventsApiAccess(api_url, credentials)


@contextmanager
def _fail_without_retry(*refusals: type[BaseException]) -> Iterator[None]:
    """Turn `refusals` (errors a retry would meet again) into AirflowFailException, which fails
    the task without using its retries."""
    from airflow.sdk.exceptions import AirflowFailException

    try:
        yield
    except refusals as refused:
        raise AirflowFailException(str(refused)) from None


def load_events(dag_run: Any, params: Mapping[str, Any] | None = None) -> list[dict]:
    """The load task: log in (when configured) and load the run's window; returns the XCom.

    Refused credentials and a refused window fail the task without retries: a retry would ask
    the same again. The XCom holds dates and row counts only.
    """
    from event_pipeline import loader
    from event_pipeline.sources import LoginRefused

    with _fail_without_retry(WindowError, LoginRefused):
        window = run_window(dag_run, params)
        api = events_api_access()
        results = loader.load_range(
            window.start,
            window.end,
            run_id=dag_run.run_id,
            api_url=api.api_url,
            credentials=api.credentials,
        )
    return [{"event_date": r.event_date.isoformat(), "rows": r.rows} for r in results]


def send_emails(dag_run: Any, params: Mapping[str, Any] | None = None) -> list[dict]:
    """The send_stats task: email each date of the run's window once; returns the XCom.

    By SMTP when the Airflow connection exists, else to the outbox. Refusals that a retry
    would meet again (a refused window, a date never built, an invalid address) fail the task
    without retries; a failed email is retried (a retry sends only what is missing).
    """
    from event_pipeline import report
    from event_pipeline.mail import InvalidAddressError

    with _fail_without_retry(WindowError, report.StatsNotBuiltError, InvalidAddressError):
        days = run_window(dag_run, params).days()
        results = report.send_stats_dates(days, smtp=smtp_settings())
    return [
        {"date": r.event_date.isoformat(), "recipient": r.recipient, "status": r.status}
        for r in results
    ]


def _flag(value: object) -> bool:
    return value is True or str(value).strip().lower() in {"true", "1", "yes"}


def check_status(through: date) -> dict[str, Any]:
    """Log `event-stats status` for every date up to `through`; fail the task on any problem.

    A problem fails it with AirflowFailException (no retries: a rerun finds the same ledgers);
    other errors, a warehouse locked too long included, fail it normally, so it is retried.
    """
    from airflow.sdk.exceptions import AirflowFailException

    from event_pipeline import status

    report = status.read_report(end=through + timedelta(days=1))
    log.info("event-stats status:\n%s", status.render_text(report))
    if report.problems:
        kinds = sorted({problem.kind for problem in report.problems})
        raise AirflowFailException(
            f"{len(report.problems)} problem(s) in the warehouse up to {through} "
            f"({', '.join(kinds)}): see the report above, or `event-stats status --end "
            f"{through + timedelta(days=1)}`"
        )
    return {"start": report.start.isoformat(), "end": report.end.isoformat(), "problems": 0}
