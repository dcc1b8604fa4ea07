"""Glue between Airflow and the package: setup on demand, the run's processed dates, SMTP lookup.

Airflow reads its configuration when it is first imported, so callers apply
`settings.airflow_env()` to os.environ before calling anything here (`configure_environment`).
Airflow itself is imported lazily, inside the functions.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from datetime import date, timedelta
from typing import TYPE_CHECKING, Any

from event_pipeline import settings
from event_pipeline.run_window import run_window

if TYPE_CHECKING:
    from event_pipeline.mail import SmtpSettings

log = logging.getLogger(__name__)


def configure_environment() -> None:
    """Apply the embedded Airflow configuration (values already in the environment win)."""
    os.environ.update(settings.airflow_env())


def ensure_airflow() -> None:
    """Create or upgrade the metadata database and create the warehouse pool. Idempotent.

    The pool matters: a task in a pool that does not exist is held by the scheduler forever.
    """
    configure_environment()
    from airflow.models.pool import Pool
    from airflow.utils import db

    settings.airflow_home().mkdir(parents=True, exist_ok=True)
    db.upgradedb()  # creates a fresh database, or migrates an old one; no-op when current
    pool = Pool.get_pool(settings.WAREHOUSE_POOL)
    slots = settings.warehouse_pool_slots()
    if pool is None or pool.slots != slots:
        Pool.create_or_update_pool(
            name=settings.WAREHOUSE_POOL,
            slots=slots,
            description="Tasks that write the warehouse at once (one for a DuckDB file)",
            include_deferred=False,
        )
        log.info("Airflow pool %s has %d slot(s)", settings.WAREHOUSE_POOL, slots)


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
