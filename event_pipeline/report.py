"""The day's stats email: compose it from analytics.event_stats and send it once per recipient.

Once per (date, recipient, content), kept by the ledger ops.email_log (warehouse.email_log). A
rerun whose stats are unchanged (same content hash as the recipient's latest email for that date)
sends nothing; changed stats send an updated email that names the one it replaces (Supersedes,
In-Reply-To and References headers, and a sentence in the body).

Order of work, so that a crash or a failure at any point neither loses nor repeats an email:
1. take the date's email lock and keep it until the end: no other send of the date can run
   between a send and its ledger update (on a DuckDB file, its file lock, held by the open
   connection; on a DuckLake, warehouse.exclusive, an OS lock beside the catalog);
2. in ONE transaction: refuse a date whose stats were never built (ops.build_log), read the
   stats and the ledger, and record every email about to be sent as a 'sending' row (the
   intent, with the DuckLake snapshot its numbers come from); on a lake a concurrent commit
   makes it run again (commits.retry_on_conflict), reading what that commit wrote;
3. send each; mark it 'sent', or remove the row when the transport says the email was certainly
   not accepted. If marking fails, the email still went out: a warning, not a failure.
A rerun that finds a 'sending' row for the same content resumes it with the same Message-ID: with
the outbox backend the row's outbox file tells whether it was written (then nothing is sent);
over SMTP the outcome cannot be known, so it resends with the same Message-ID and says so.

The email holds the day's totals and top users, and a chart (event_pipeline.chart, an inline PNG)
of the totals of the day and the 13 days before it; the text part lists the same figures. The
content hash covers the day's stats only: the earlier days of the chart are as they stood when the
email went out, and a change to one of them sends that day's update, not one of every later day.
The chart is the same bytes for the same figures, so a resend with the same Message-ID is the same
message.

Backends (event_pipeline.mail): by default each email is written as an .eml file to the outbox
directory; with SMTP settings (from Airflow's SMTP connection, see airflow_support.smtp_settings)
it goes by SMTP. This module knows nothing about Airflow.
"""

from __future__ import annotations

import hashlib
import html
import logging
from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from email.message import EmailMessage
from email.utils import formatdate, getaddresses
from functools import partial
from pathlib import Path

import duckdb

from event_pipeline import chart, mail, settings, warehouse
from event_pipeline.mail import Recipient, SmtpSettings
from event_pipeline.warehouse import commits, email_log, lake, stats
from event_pipeline.warehouse.email_log import SENDING, SENT, EmailLogEntry
from event_pipeline.warehouse.stats import DailyTotal, DayStats

log = logging.getLogger(__name__)

TOP_USERS = 10

# SendResult.status values
STATUS_SENT = "sent"
STATUS_RESENT = "resent"  # an earlier attempt may have gone out: sent again, same Message-ID
STATUS_UNCHANGED = "unchanged"


class StatsNotBuiltError(RuntimeError):
    """The date's stats were never built, so there is nothing to email."""


class SendStatsError(RuntimeError):
    """Some emails were not sent; `results` holds the ones that were (or were unchanged)."""

    def __init__(self, message: str, results: list[SendResult]) -> None:
        super().__init__(message)
        self.results = results


@dataclass(frozen=True)
class SendResult:
    """What send_stats did for one recipient (the bare address): status is STATUS_*."""

    event_date: date
    recipient: str
    status: str
    message_id: str
    revision: int
    backend: str
    supersedes: str | None = None


@dataclass(frozen=True)
class _Plan:
    """One recipient's email in this run: nothing to do, a new row, or a row sent again."""

    recipient: Recipient
    entry: EmailLogEntry
    action: str  # "unchanged" | "new" | "retry"
    replaces: list[str] = field(default_factory=list)  # earlier Message-IDs, oldest first
    maybe_delivered: bool = False  # retry of a row whose earlier send may have gone out


def message_id(stats: DayStats, revision: int, domain: str) -> str:
    """Deterministic Message-ID: the same date, revision and content give the same ID."""
    return f"<event-stats.{stats.event_date}.r{revision}.{stats.content_hash()[:16]}@{domain}>"


def compose_email(
    stats: DayStats,
    *,
    sender: str,
    recipient: str,
    message_id: str,
    replaces: list[str] | None = None,
    history: tuple[DailyTotal, ...] = (),
    top: int = TOP_USERS,
) -> EmailMessage:
    """Build the email: plain text, and HTML with the chart as an inline PNG.

    `replaces`: earlier Message-IDs, oldest first. `history`: the daily totals the chart and the
    text show (the date and the days before it). MIME structure: multipart/alternative of
    text/plain (complete on its own) and multipart/related (text/html, image/png referenced by
    its Content-ID, which is derived from the Message-ID: the same message, the same bytes).
    """
    replaces = replaces or []
    day = stats.event_date.isoformat()
    subject = f"Event stats for {day}: {stats.total_events:,} events from {stats.users:,} users"
    notice = (
        f"This email replaces the earlier stats email for {day} ({replaces[-1]}): "
        "the stats changed since it was sent."
        if replaces
        else ""
    )
    message = EmailMessage()
    message["Subject"] = f"[Updated] {subject}" if replaces else subject
    message["From"] = sender
    message["To"] = recipient
    message["Date"] = formatdate(usegmt=True)
    message["Message-ID"] = message_id
    message["X-Event-Stats-Date"] = day
    message["X-Event-Stats-Content-Hash"] = stats.content_hash()
    if replaces:
        message["Supersedes"] = replaces[-1]
        message["In-Reply-To"] = replaces[-1]
        message["References"] = " ".join(replaces)
    top_rows = stats.counts[:top]
    chart_id = f"<chart.{message_id.strip().strip('<>')}>"
    message.set_content(_text_body(stats, top_rows, notice, history))
    message.add_alternative(_html_body(stats, top_rows, notice, chart_id), subtype="html")
    html_part = message.get_payload()[1]
    html_part.add_related(
        chart.day_chart_png(stats, history, top=top),
        maintype="image",
        subtype="png",
        cid=chart_id,
        disposition="inline",
        filename=f"event-stats-{day}.png",
    )
    # Boundaries from the content, not random: the same message is the same bytes (but Date).
    token = hashlib.sha256(f"{message_id}\n{stats.content_hash()}".encode()).hexdigest()[:24]
    message.set_boundary(f"event-stats-alternative-{token}")
    html_part.set_boundary(f"event-stats-related-{token}")
    return message


def _text_body(
    stats: DayStats,
    top_rows: tuple[tuple[str, int], ...],
    notice: str,
    history: tuple[DailyTotal, ...],
) -> str:
    lines = [f"Event stats for {stats.event_date} (UTC)", ""]
    if notice:
        lines += [notice, ""]
    lines += [f"Total events: {stats.total_events:,}", f"Users:        {stats.users:,}", ""]
    if history:  # what the chart shows, for clients without HTML
        lines.append(f"Events per day, last {len(history)} days:")
        for total in history:
            events = f"{total.events:>8,}" if total.built else f"{'not built':>9}"
            marker = "  <- this email" if total.event_date == stats.event_date else ""
            lines.append(f"  {total.event_date}  {total.event_date:%a}  {events}{marker}")
        lines.append("")
    if top_rows:
        width = max(len("user"), *(len(user) for user, _ in top_rows))
        lines.append(f"Top {len(top_rows)} users:")
        lines.append(f"  {'rank':>4}  {'user':<{width}}  {'events':>8}  {'share':>6}")
        for rank, (user, count) in enumerate(top_rows, 1):
            share = count / stats.total_events
            lines.append(f"  {rank:>4}  {user:<{width}}  {count:>8,}  {share:>6.1%}")
        if stats.users > len(top_rows):
            lines.append(f"  ... and {stats.users - len(top_rows):,} more users")
    else:
        lines.append("No events were recorded on this date.")
    lines += ["", "Source: analytics.event_stats in the event-stats warehouse."]
    return "\n".join(lines) + "\n"


def _html_body(
    stats: DayStats, top_rows: tuple[tuple[str, int], ...], notice: str, chart_id: str
) -> str:
    esc = html.escape
    parts = [f"<h2>Event stats for {esc(stats.event_date.isoformat())} (UTC)</h2>"]
    if notice:
        parts.append(f"<p><strong>{esc(notice)}</strong></p>")
    parts.append(
        f"<p>Total events: <b>{stats.total_events:,}</b><br>Users: <b>{stats.users:,}</b></p>"
    )
    alt = f"Events per day up to {stats.event_date}, and the top users of the day"
    parts.append(
        f"<p><img src='cid:{esc(chart_id.strip('<>'))}' alt='{esc(alt)}' "
        f"width='{chart.WIDTH_PX}' height='{chart.HEIGHT_PX}'></p>"
    )
    if top_rows:
        cells = "".join(
            f"<tr><td>{rank}</td><td>{esc(user)}</td><td align='right'>{count:,}</td>"
            f"<td align='right'>{count / stats.total_events:.1%}</td></tr>"
            for rank, (user, count) in enumerate(top_rows, 1)
        )
        parts.append(
            f"<table border='1' cellpadding='4' cellspacing='0'><caption>Top {len(top_rows)} "
            "users</caption><tr><th>rank</th><th>user</th><th>events</th><th>share</th></tr>"
            f"{cells}</table>"
        )
        if stats.users > len(top_rows):
            parts.append(f"<p>... and {stats.users - len(top_rows):,} more users</p>")
    else:
        parts.append("<p>No events were recorded on this date.</p>")
    return "<html><body>" + "".join(parts) + "</body></html>"


def read_built_stats(connection: duckdb.DuckDBPyConnection, event_date: date) -> DayStats:
    """The date's stats, or StatsNotBuiltError when dbt never built that date, or when the table
    no longer holds what its latest build published."""
    build = stats.latest_build(connection, event_date)
    if build is None:
        end = event_date + timedelta(days=1)
        raise StatsNotBuiltError(
            f"The stats of {event_date} were never built (no row for it in ops.build_log), so "
            f"no email was sent. Build them first: run the event_stats DAG for {event_date} "
            f"(`event-stats run --start {event_date}`), or `dbt build --project-dir dbt_project "
            f"--profiles-dir . --vars '{{start_date: {event_date}, end_date: {end}}}'`."
        )
    day = stats.read_day_stats(connection, event_date)
    if (day.users, day.total_events) != (build.users, build.events):
        raise StatsNotBuiltError(
            f"analytics.event_stats for {event_date} holds {day.users} users and "
            f"{day.total_events} events, but its latest build ({build.invocation_id} at "
            f"{build.built_at}) published {build.users} users and {build.events} events: the "
            "table was changed outside dbt. No email was sent; rebuild the date with dbt."
        )
    return day


def read_history(connection: duckdb.DuckDBPyConnection, event_date: date) -> tuple[DailyTotal, ...]:
    """The daily totals of the chart: `event_date` and the days before it."""
    start = event_date - timedelta(days=chart.HISTORY_DAYS - 1)
    return stats.daily_totals(connection, start, event_date + timedelta(days=1))


def _ledger_key(recipient: str) -> str:
    """The bare lowercased address of a ledger row's recipient (older rows kept display names)."""
    pairs = getaddresses([recipient])
    return pairs[0][1].lower() if len(pairs) == 1 and pairs[0][1] else recipient.lower()


def _resolve_outbox(
    connection: duckdb.DuckDBPyConnection, entry: EmailLogEntry
) -> EmailLogEntry | None:
    """A 'sending' row of the outbox backend: its file says whether it was sent. None: it was not
    (the row is removed, as after any send that certainly failed)."""
    prefix = "outbox:"
    if entry.status != SENDING or not entry.backend.startswith(prefix):
        return entry
    path = mail.outbox_path(Path(entry.backend[len(prefix) :]), entry.recipient, entry.message_id)
    written = path.exists()
    log.info(
        "Stats email %s to %s was being written to the outbox when a run stopped: %s",
        entry.message_id,
        entry.recipient,
        f"{path} is there, so it was sent" if written else "no file, so it was not sent",
    )
    if not written:
        email_log.forget(connection, entry)
        return None
    email_log.mark_sent(connection, entry)
    return replace(entry, status=SENT)


def _plan(
    history: list[EmailLogEntry],
    recipient: Recipient,
    day: DayStats,
    *,
    domain: str,
    backend: str,
) -> _Plan:
    """What to send `recipient`, given its earlier ledger rows for the date (oldest first)."""
    content_hash = day.content_hash()
    latest = history[-1] if history else None
    if latest is not None and latest.content_hash == content_hash:
        if latest.status == SENT:
            return _Plan(recipient, latest, "unchanged")
        # 'sending': an earlier send may have gone out; the same Message-ID again.
        earlier = [e.message_id for e in history[:-1]]
        entry = replace(latest, backend=backend)
        return _Plan(recipient, entry, "retry", earlier, maybe_delivered=True)
    # Every earlier row went out or may have: the new email replaces them.
    replaces = [e.message_id for e in history]
    revision = latest.revision + 1 if latest else 1
    entry = EmailLogEntry(
        event_date=day.event_date,
        recipient=recipient.address,
        revision=revision,
        content_hash=content_hash,
        message_id=message_id(day, revision, domain),
        supersedes=replaces[-1] if replaces else None,
        total_events=day.total_events,
        users=day.users,
        backend=backend,
    )
    return _Plan(recipient, entry, "new", replaces)


def _plans(
    connection: duckdb.DuckDBPyConnection,
    day: DayStats,
    recipients: list[Recipient],
    *,
    domain: str,
    backend: str,
) -> list[_Plan]:
    resolved = [
        _resolve_outbox(connection, e) for e in email_log.entries(connection, day.event_date)
    ]
    rows = [e for e in resolved if e is not None]
    plans = []
    for recipient in recipients:
        history = [e for e in rows if _ledger_key(e.recipient) == recipient.address]
        history.sort(key=lambda e: e.revision)
        plans.append(_plan(history, recipient, day, domain=domain, backend=backend))
    return plans


def _record_plans(
    connection: duckdb.DuckDBPyConnection,
    event_date: date,
    recipients: list[Recipient],
    *,
    domain: str,
    backend: str,
) -> tuple[DayStats, tuple[DailyTotal, ...], list[_Plan]]:
    """In ONE transaction: read the built stats (and the chart's days) and the ledger, decide
    each recipient's email, and record the intents. A refusal (StatsNotBuiltError) writes
    nothing."""
    with commits.transaction(connection):
        day = read_built_stats(connection, event_date)
        history = read_history(connection, event_date)
        email_log.ensure_email_log(connection)
        lake.label_commit(connection, "event-stats send-stats", str(event_date))
        snapshot = lake.current_snapshot(connection)
        plans = _plans(connection, day, recipients, domain=domain, backend=backend)
        plans = [
            replace(p, entry=replace(p.entry, snapshot_id=snapshot)) if p.action == "new" else p
            for p in plans
        ]
        email_log.record_intents(
            connection,
            new=[p.entry for p in plans if p.action == "new"],
            retried=[p.entry for p in plans if p.action == "retry"],
        )
    return day, history, plans


def _record_outcome(
    connection: duckdb.DuckDBPyConnection, plan: _Plan, error: mail.MailDeliveryError | None
) -> None:
    """Best effort: the email's fate is decided; a ledger that cannot record it is a warning."""
    entry = plan.entry
    if error is None:
        record = email_log.mark_sent
    elif error.maybe_delivered or plan.maybe_delivered:
        record = partial(email_log.mark_unknown, error=str(error))
    else:
        record = email_log.forget
    try:
        commits.retry_on_conflict(
            lambda: record(connection, entry), what=f"Recording stats email {entry.message_id}"
        )
    except (duckdb.Error, commits.CommitConflictError) as failure:
        log.warning(
            "Stats email %s to %s: %s, but ops.email_log could not record it (%s). A rerun "
            "finds the row 'sending': the outbox backend looks for its file and sends nothing "
            "if it is there; over SMTP it resends with the same Message-ID.",
            entry.message_id,
            entry.recipient,
            "sent" if error is None else "not sent",
            failure,
        )


def _send_one(
    connection: duckdb.DuckDBPyConnection,
    plan: _Plan,
    day: DayStats,
    *,
    history: tuple[DailyTotal, ...],
    sender: str,
    smtp: SmtpSettings | None,
    outbox_dir: Path,
) -> SendResult:
    entry = plan.entry
    if plan.action == "unchanged":
        log.info(
            "Stats email %s to %s unchanged; not sent again", entry.message_id, entry.recipient
        )
        return _result(entry, STATUS_UNCHANGED)
    if plan.maybe_delivered:
        log.warning(
            "Stats email %s to %s may have been delivered by an earlier attempt (it stopped "
            "after the message was handed to the server); resending it with the same "
            "Message-ID, which mail clients treat as the same message.",
            entry.message_id,
            entry.recipient,
        )
    try:
        message = compose_email(
            day,
            sender=sender,
            recipient=plan.recipient.formatted(),
            message_id=entry.message_id,
            replaces=plan.replaces,
            history=history,
        )
    except Exception as error:  # nothing left this process: certainly not sent
        failure = mail.MailDeliveryError(
            f"The stats email to {entry.recipient} could not be composed: {error!r}"
        )
        _record_outcome(connection, plan, failure)
        raise failure from error
    try:
        where = mail.deliver(message, smtp=smtp, outbox_dir=outbox_dir)
    except mail.MailDeliveryError as error:
        _record_outcome(connection, plan, error)
        raise
    _record_outcome(connection, plan, None)
    log.info("Stats email %s to %s sent via %s", entry.message_id, entry.recipient, where)
    return _result(entry, STATUS_RESENT if plan.maybe_delivered else STATUS_SENT)


def _result(entry: EmailLogEntry, status: str) -> SendResult:
    return SendResult(
        entry.event_date,
        entry.recipient,
        status,
        entry.message_id,
        entry.revision,
        entry.backend,
        entry.supersedes,
    )


def send_stats(
    event_date: date,
    *,
    warehouse_path: Path | None = None,
    recipients: str | list[str] | None = None,
    sender: str | None = None,
    outbox_dir: Path | None = None,
    smtp: SmtpSettings | None = None,
) -> list[SendResult]:
    """Email `event_date`'s stats to every recipient that has not received this content yet.

    `recipients`: address lists as in $EMAIL_TO (the default). Reads analytics.event_stats (never
    writes it); keeps ops.email_log. Every recipient is tried; if any email failed, raises
    SendStatsError after the others went out, and a retry sends only what is missing.
    """
    return send_stats_dates(
        [event_date],
        warehouse_path=warehouse_path,
        recipients=recipients,
        sender=sender,
        outbox_dir=outbox_dir,
        smtp=smtp,
    )


def send_stats_dates(
    event_dates: list[date],
    *,
    warehouse_path: Path | None = None,
    recipients: str | list[str] | None = None,
    sender: str | None = None,
    outbox_dir: Path | None = None,
    smtp: SmtpSettings | None = None,
) -> list[SendResult]:
    """send_stats for each date in turn, on one warehouse connection (a range run's emails).

    A date whose stats were never built is refused at once (StatsNotBuiltError). A failed email
    does not stop the later dates: every date is tried, then one SendStatsError names every
    failure, and a retry sends only what is missing.
    """
    if recipients is None:
        targets = mail.parse_recipients(settings.email_to(), source="EMAIL_TO")
    else:
        targets = mail.parse_recipients(recipients, source="the recipients")
    if not targets:
        dates = ", ".join(str(day) for day in event_dates)
        raise ValueError(f"No recipients for the stats email of {dates}: set EMAIL_TO.")
    sender = sender or (smtp.from_email if smtp and smtp.from_email else settings.email_from())
    transport = _Transport(
        sender=sender,
        domain=mail.sender_domain(sender),
        outbox_dir=outbox_dir or settings.email_outbox_dir(),
        smtp=smtp,
    )
    results: list[SendResult] = []
    failed: list[SendStatsError] = []
    with warehouse.connect(warehouse_path) as connection:
        for event_date in event_dates:
            try:
                results += _send_day(connection, event_date, targets, transport, warehouse_path)
            except SendStatsError as error:
                results += error.results
                failed.append(error)
    if failed:
        raise SendStatsError("\n".join(str(error) for error in failed), results)
    return results


@dataclass(frozen=True)
class _Transport:
    sender: str
    domain: str
    outbox_dir: Path
    smtp: SmtpSettings | None

    @property
    def backend(self) -> str:
        return self.smtp.describe() if self.smtp else f"outbox:{self.outbox_dir}"


def _send_day(
    connection: duckdb.DuckDBPyConnection,
    event_date: date,
    targets: list[Recipient],
    transport: _Transport,
    warehouse_path: Path | None,
) -> list[SendResult]:
    """Record the intents of one date's emails (one transaction, retried on a commit race),
    send them, raise SendStatsError on failures. The date's lock is held from the read to the
    last mark, so another sender never sees this one's intents as left by a crash."""
    results: list[SendResult] = []
    failures: list[str] = []
    with warehouse.exclusive(f"email-{event_date}", warehouse_path):
        day, history, plans = commits.retry_on_conflict(
            lambda: _record_plans(
                connection,
                event_date,
                targets,
                domain=transport.domain,
                backend=transport.backend,
            ),
            what=f"Recording the stats emails of {event_date} in ops.email_log",
        )
        for plan in plans:
            try:
                results.append(
                    _send_one(
                        connection,
                        plan,
                        day,
                        history=history,
                        sender=transport.sender,
                        smtp=transport.smtp,
                        outbox_dir=transport.outbox_dir,
                    )
                )
            except mail.MailDeliveryError as error:
                failures.append(str(error))
    if failures:
        raise SendStatsError(
            f"The stats email for {event_date} was not sent to {len(failures)} of "
            f"{len(plans)} recipient(s):\n- " + "\n- ".join(failures),
            results,
        )
    return results
