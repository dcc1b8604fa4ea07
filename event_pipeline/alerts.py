"""Tell someone when a run fails or a day's stats are late, by the stats email's own path.

dags/event_stats.py wires two Airflow hooks to this module:
- `notify_failure`: every task's on_failure_callback (after its last try, in the task's process):
  names the DAG, the run, its dates, the failed task, the error and the task's log URL.
- `deadline_missed`: the callback of the DAG's DeadlineAlert, once the scheduler sees the
  deadline pass before the run succeeded. An AsyncCallback, so the triggerer runs it: in Airflow
  3.3.2 an executor-run SyncCallback is refused every Airflow connection (its token is
  workload-scoped) and so could not tell whether SMTP is configured. Only scheduled runs carry
  the daily promise; for other runs (backfills, manual runs) it sends nothing.

Each alert is one email per recipient of settings.alert_email_to(), delivered by mail.deliver:
by SMTP when Airflow's SMTP connection exists, else as an .eml file in the outbox's `alerts/`
folder (apart from the stats emails). Delivering an alert never raises: a broken mail path is
logged, and must not hide the error being reported.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate
from functools import partial
from pathlib import Path
from typing import Any

from event_pipeline import mail, settings
from event_pipeline.airflow_support import smtp_settings
from event_pipeline.run_window import WindowError, as_moment, run_window, show_moment

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 4000


@dataclass(frozen=True)
class FailedTask:
    """What a failure notification says."""

    dag_id: str
    run_id: str
    dates: str
    task_id: str
    try_number: int
    error: str
    log_url: str


@dataclass(frozen=True)
class MissedDeadline:
    """What a deadline alert says."""

    dag_id: str
    run_id: str
    dates: str
    deadline: str
    run_state: str
    run_url: str


def alerts_outbox() -> Path:
    """Where alerts go without SMTP: beside the stats emails, in their own folder."""
    return settings.email_outbox_dir() / "alerts"


def failure_message(failure: FailedTask, sender: str, recipient: str) -> EmailMessage:
    body = "\n".join(
        [
            f"A task of the {failure.dag_id} DAG failed after its last try.",
            "",
            f"DAG:      {failure.dag_id}",
            f"Run:      {failure.run_id}",
            f"Date(s):  {failure.dates}",
            f"Task:     {failure.task_id} (try {failure.try_number})",
            f"Log:      {failure.log_url}",
            "",
            "Error:",
            failure.error,
            "",
            "Every task is atomic and idempotent: fix the cause, then clear the failed task "
            "(Airflow UI: Clear) to run it and the tasks after it again.",
        ]
    )
    subject = (
        f"event-stats FAILED: {failure.dag_id} {_short(failure.dates)}, task {failure.task_id} "
        f"(run {failure.run_id})"
    )
    key = f"failure:{failure.dag_id}:{failure.run_id}:{failure.task_id}:{failure.try_number}"
    return _message(subject, body, key, sender=sender, recipient=recipient)


def deadline_message(missed: MissedDeadline, sender: str, recipient: str) -> EmailMessage:
    body = "\n".join(
        [
            f"The stats of {missed.dates} were due by {missed.deadline}, and the run that "
            "sends them had not succeeded by then.",
            "",
            f"DAG:        {missed.dag_id}",
            f"Run:        {missed.run_id} ({missed.run_state} at the deadline)",
            f"Date(s):    {missed.dates}",
            f"Deadline:   {missed.deadline} (EVENT_STATS_DEADLINE)",
            f"Run in UI:  {missed.run_url}",
            "",
            "If the run failed, a failure notification names the task and the error; if it is "
            "still running or queued, look for what holds it (the warehouse pool, the events API).",
        ]
    )
    subject = f"event-stats LATE: stats of {_short(missed.dates)} not sent by {missed.deadline}"
    key = f"deadline:{missed.dag_id}:{missed.run_id}:{missed.deadline}"
    return _message(subject, body, key, sender=sender, recipient=recipient)


def send_alert(compose: Callable[[str, str], EmailMessage]) -> list[str]:
    """Deliver one alert per alert recipient: by SMTP when Airflow's connection exists, else to
    the alerts outbox. `compose(sender, recipient)` builds each message.

    Returns where each went. Never raises: what could not be delivered is logged.
    """
    delivered = []
    try:
        smtp = smtp_settings()
        sender = smtp.from_email if smtp and smtp.from_email else settings.email_from()
        recipients = mail.parse_recipients(settings.alert_email_to(), source="EVENT_STATS_ALERT_TO")
        for recipient in recipients:
            message = compose(sender, recipient.formatted())
            delivered.append(mail.deliver(message, smtp=smtp, outbox_dir=alerts_outbox()))
            log.info("Alert %r delivered to %s", message["Subject"], delivered[-1])
    except Exception:
        log.exception("Could not deliver an alert (delivered so far: %s)", delivered)
    return delivered


def notify_failure(context: Mapping[str, Any]) -> None:
    """on_failure_callback of every task: email who failed, where, why, and the log URL."""
    ti = context["ti"]
    failure = FailedTask(
        dag_id=ti.dag_id,
        run_id=ti.run_id,
        dates=_dates(context["dag_run"], context.get("params")),
        task_id=ti.task_id,
        try_number=int(ti.try_number or 0),
        error=_error_text(context.get("exception")),
        log_url=str(ti.log_url),
    )
    send_alert(partial(failure_message, failure))


async def deadline_missed(context: Mapping[str, Any]) -> None:
    """DeadlineAlert callback: email that a scheduled day's stats are late.

    The sending blocks (SMTP, files, connection lookup), so it runs in a thread, off the
    triggerer's event loop.
    """
    await asyncio.to_thread(send_deadline_alert, context)


def send_deadline_alert(context: Mapping[str, Any]) -> None:
    """Email that a scheduled day's stats are late (`context`: the deadline callback's)."""
    dag_run = context["dag_run"]
    run_id = dag_run.get("dag_run_id") or dag_run.get("run_id")
    if dag_run.get("run_type") != "scheduled":
        log.info("Deadline passed for %s run %s: no alert for it", dag_run.get("run_type"), run_id)
        return
    dag_id = dag_run["dag_id"]
    missed = MissedDeadline(
        dag_id=dag_id,
        run_id=run_id,
        dates=_dates(dag_run, None),
        deadline=show_moment(as_moment(context["deadline"]["deadline_time"])),
        run_state=str(dag_run.get("state")),
        run_url=f"{_ui_base_url()}/dags/{dag_id}/runs/{run_id}",
    )
    send_alert(partial(deadline_message, missed))


def _dates(dag_run: Any, params: Mapping[str, Any] | None) -> str:
    try:
        return run_window(dag_run, params).describe()
    except WindowError as error:
        return f"not determined ({error})"
    except (KeyError, AttributeError, TypeError, ValueError) as error:
        return f"not determined ({type(error).__name__}: {error})"


def _short(dates: str) -> str:
    """The dates without the reason they could not be determined (for a subject line)."""
    return "(dates not determined)" if dates.startswith("not determined") else dates


def _error_text(error: object) -> str:
    if error is None:
        return "(Airflow reported no exception; see the log)"
    text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
    if len(text) > MAX_ERROR_CHARS:
        text = text[:MAX_ERROR_CHARS] + "\n... (cut; the log has all of it)"
    return text


def _message(subject: str, body: str, key: str, *, sender: str, recipient: str) -> EmailMessage:
    message = EmailMessage()
    message["Subject"] = subject
    message["From"] = sender
    message["To"] = recipient
    message["Date"] = formatdate(usegmt=True)
    # The same alert (a callback run twice) keeps one Message-ID, so one outbox file.
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    message["Message-ID"] = f"<event-stats.alert.{digest}@{mail.sender_domain(sender)}>"
    message["X-Event-Stats-Alert"] = key.partition(":")[0]
    message.set_content(body + "\n")
    return message


def _ui_base_url() -> str:
    from airflow.sdk.configuration import conf

    return conf.get("api", "base_url", fallback="http://localhost:8080/").rstrip("/")
