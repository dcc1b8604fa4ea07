"""The day's stats email: compose it from analytics.event_stats and send it exactly once.

Exactly once per (date, recipient, content): the ledger ops.email_log records every email sent.
A rerun whose stats are unchanged (same content hash as the recipient's latest email for that date)
sends nothing; changed stats send an updated email that names the one it replaces (Supersedes,
In-Reply-To and References headers, and a sentence in the body).

The ledger row is written only after the send succeeded. The Message-ID is derived from the date,
the content hash and the revision, so if the process dies between sending and writing the ledger,
the retry sends a message with the same Message-ID, which mail clients treat as the same message.

Backends (event_pipeline.mail): by default each email is written as an .eml file to the outbox
directory; with SMTP settings (from Airflow's SMTP connection, see airflow_support.smtp_settings)
it goes by SMTP. This module knows nothing about Airflow.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
from dataclasses import dataclass
from datetime import date
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path

import duckdb

from event_pipeline import mail, settings, warehouse
from event_pipeline.mail import SmtpSettings

log = logging.getLogger(__name__)

TOP_USERS = 10

EMAIL_LOG_DDL = """
create schema if not exists ops;
create table if not exists ops.email_log (
    event_date    date      not null,
    recipient     varchar   not null,
    revision      integer   not null,  -- 1 for the first email of the date, +1 per update
    content_hash  varchar   not null,  -- DayStats.content_hash() of the stats that were sent
    message_id    varchar   not null,
    supersedes    varchar,             -- Message-ID of the email this one replaces
    total_events  bigint    not null,
    users         bigint    not null,
    backend       varchar   not null,  -- smtp://host:port or outbox:<dir>
    sent_at       timestamp not null,  -- when the send succeeded (audit only)
    primary key (event_date, recipient, revision)
);
"""


@dataclass(frozen=True)
class DayStats:
    """One date's rows of analytics.event_stats, ordered by event count (desc), then user."""

    event_date: date
    counts: tuple[tuple[str, int], ...]

    @property
    def total_events(self) -> int:
        return sum(count for _, count in self.counts)

    @property
    def users(self) -> int:
        return len(self.counts)

    def content_hash(self) -> str:
        """Hash of the date and every (user, count): equal stats give an equal hash."""
        canonical = json.dumps(
            {"event_date": self.event_date.isoformat(), "counts": sorted(self.counts)},
            separators=(",", ":"),
        )
        return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class SendResult:
    """What send_stats did for one recipient: status is "sent" or "unchanged"."""

    event_date: date
    recipient: str
    status: str
    message_id: str
    revision: int
    backend: str
    supersedes: str | None = None


def ensure_email_log(connection: duckdb.DuckDBPyConnection) -> None:
    """Create the ops.email_log ledger if it does not exist."""
    connection.execute(EMAIL_LOG_DDL)


def read_day_stats(connection: duckdb.DuckDBPyConnection, event_date: date) -> DayStats:
    """Read one date's rows of analytics.event_stats."""
    try:
        rows = connection.execute(
            """
            select user_id, event_count
            from analytics.event_stats
            where event_date = ?
            order by event_count desc, user_id
            """,
            [event_date],
        ).fetchall()
    except duckdb.CatalogException as error:
        raise RuntimeError(
            f"Cannot email the stats of {event_date}: analytics.event_stats does not exist. "
            "Build it first (the DAG's dbt task group, or `dbt build`)."
        ) from error
    return DayStats(event_date, tuple((str(user), int(count)) for user, count in rows))


def message_id(stats: DayStats, revision: int, domain: str) -> str:
    return f"<event-stats.{stats.event_date}.r{revision}.{stats.content_hash()[:16]}@{domain}>"


def compose_email(
    stats: DayStats,
    *,
    sender: str,
    recipient: str,
    message_id: str,
    replaces: list[str] | None = None,
    top: int = TOP_USERS,
) -> EmailMessage:
    """Build the email (plain text and HTML). `replaces`: earlier Message-IDs, oldest first."""
    day = stats.event_date.isoformat()
    replaces = replaces or []
    update = bool(replaces)
    summary = f"{stats.total_events:,} events from {stats.users:,} users"
    subject = f"Event stats for {day}: {summary}"
    if update:
        subject = f"[Updated] {subject}"

    top_rows = stats.counts[:top]
    notice = (
        f"This email replaces the earlier stats email for {day} ({replaces[-1]}): "
        "the stats changed since it was sent."
        if update
        else ""
    )

    lines = [f"Event stats for {day} (UTC)", ""]
    if notice:
        lines += [notice, ""]
    lines += [f"Total events: {stats.total_events:,}", f"Users:        {stats.users:,}", ""]
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
    text = "\n".join(lines) + "\n"

    esc = html.escape
    parts = [f"<h2>Event stats for {esc(day)} (UTC)</h2>"]
    if notice:
        parts.append(f"<p><strong>{esc(notice)}</strong></p>")
    parts.append(
        f"<p>Total events: <b>{stats.total_events:,}</b><br>Users: <b>{stats.users:,}</b></p>"
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
    body_html = "<html><body>" + "".join(parts) + "</body></html>"

    message = EmailMessage()
    message["Subject"] = subject
    message["From"] = sender
    message["To"] = recipient
    message["Date"] = formatdate(usegmt=True)
    message["Message-ID"] = message_id
    message["X-Event-Stats-Date"] = day
    message["X-Event-Stats-Content-Hash"] = stats.content_hash()
    if update:
        message["Supersedes"] = replaces[-1]
        message["In-Reply-To"] = replaces[-1]
        message["References"] = " ".join(replaces)
    message.set_content(text)
    message.add_alternative(body_html, subtype="html")
    return message


def _ledger(
    connection: duckdb.DuckDBPyConnection, event_date: date, recipient: str
) -> list[tuple[int, str, str]]:
    """(revision, content_hash, message_id) of the emails sent for this date, oldest first."""
    return connection.execute(
        """
        select revision, content_hash, message_id
        from ops.email_log
        where event_date = ? and recipient = ?
        order by revision
        """,
        [event_date, recipient],
    ).fetchall()


def send_stats(
    event_date: date,
    *,
    warehouse_path: Path | None = None,
    recipients: list[str] | None = None,
    sender: str | None = None,
    outbox_dir: Path | None = None,
    smtp: SmtpSettings | None = None,
) -> list[SendResult]:
    """Email `event_date`'s stats to every recipient that has not received this content yet.

    Reads analytics.event_stats (never writes it); writes one ops.email_log row per email sent,
    after the send succeeded. Raises on a send failure; a retry sends only what is missing.
    """
    recipients = recipients if recipients is not None else settings.email_to()
    if not recipients:
        raise ValueError(f"No recipients for the stats email of {event_date}: set EMAIL_TO.")
    sender = sender or (smtp.from_email if smtp and smtp.from_email else settings.email_from())
    outbox_dir = outbox_dir or settings.email_outbox_dir()
    domain = sender.rpartition("@")[2] or "localhost"
    backend = smtp.describe() if smtp else f"outbox:{outbox_dir}"

    with warehouse.connect(warehouse_path, read_only=False) as connection:
        ensure_email_log(connection)
        stats = read_day_stats(connection, event_date)
        history = {
            recipient: _ledger(connection, event_date, recipient) for recipient in recipients
        }
    content_hash = stats.content_hash()

    results = []
    for recipient in recipients:
        earlier = history[recipient]
        if earlier and earlier[-1][1] == content_hash:
            log.info("Stats email for %s to %s unchanged; not sent again", event_date, recipient)
            results.append(
                SendResult(event_date, recipient, "unchanged", earlier[-1][2], earlier[-1][0], "")
            )
            continue
        revision = earlier[-1][0] + 1 if earlier else 1
        msg_id = message_id(stats, revision, domain)
        replaces = [row[2] for row in earlier]
        message = compose_email(
            stats, sender=sender, recipient=recipient, message_id=msg_id, replaces=replaces
        )
        where = mail.deliver(message, smtp=smtp, outbox_dir=outbox_dir)
        # The ledger row only after the send succeeded.
        with warehouse.connect(warehouse_path) as connection:
            ensure_email_log(connection)
            connection.execute(
                """
                insert into ops.email_log (
                    event_date, recipient, revision, content_hash, message_id, supersedes,
                    total_events, users, backend, sent_at
                )
                values (?, ?, ?, ?, ?, ?, ?, ?, ?, now())
                """,
                [
                    event_date,
                    recipient,
                    revision,
                    content_hash,
                    msg_id,
                    replaces[-1] if replaces else None,
                    stats.total_events,
                    stats.users,
                    backend,
                ],
            )
        log.info("Stats email for %s sent to %s via %s (%s)", event_date, recipient, where, msg_id)
        results.append(
            SendResult(
                event_date,
                recipient,
                "sent",
                msg_id,
                revision,
                backend,
                replaces[-1] if replaces else None,
            )
        )
    return results
