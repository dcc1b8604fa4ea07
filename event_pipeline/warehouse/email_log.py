"""The email ledger ops.email_log: one row per email (date, recipient, revision) and its state.

A row is written with status 'sending' and committed before the email is sent (the intent), then
set to 'sent' once the transport returned. When the transport says the email was certainly not
accepted, the row is deleted again (`forget`): every row is an email that went out or may have.
A 'sending' row that a run leaves behind (a crash, a connection lost after the message was
transmitted) means the outcome is unknown.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime

import duckdb

from event_pipeline.warehouse import lake

SENDING = "sending"  # intent recorded, outcome not (yet) known
SENT = "sent"  # the transport returned: SMTP server accepted it, or the outbox file is written

EMAIL_LOG_DDL = """
create schema if not exists ops;
create table if not exists ops.email_log (
    event_date    date      not null,
    recipient     varchar   not null,  -- bare address, lowercased (older rows: as configured)
    revision      integer   not null,  -- 1 for the first email of the date, +1 per update
    content_hash  varchar   not null,  -- DayStats.content_hash() of the stats in the email
    message_id    varchar   not null,
    supersedes    varchar,             -- Message-ID of the email this one replaces
    total_events  bigint    not null,
    users         bigint    not null,
    backend       varchar   not null,  -- smtp://host:port or outbox:<dir>
    sent_at       timestamp,           -- UTC, when the send succeeded; null until then
    status        varchar   default 'sent',  -- sending | sent
    attempts      integer   default 1,       -- sends started for this row (> 1: resent)
    intent_at     timestamp,           -- UTC, when the latest send was recorded, before it
    error         varchar,             -- why the outcome of a 'sending' row is unknown
    snapshot_id   bigint,              -- DuckLake snapshot the stats were read at (null: a file)
    primary key (event_date, recipient, revision)
);
"""

# Ledgers written before the intent rows existed: add the new columns (old rows were all sent)
# and let sent_at be null.
_UPGRADE = {
    "status": "alter table ops.email_log add column if not exists status varchar default 'sent'",
    "attempts": "alter table ops.email_log add column if not exists attempts integer default 1",
    "intent_at": "alter table ops.email_log add column if not exists intent_at timestamp",
    "error": "alter table ops.email_log add column if not exists error varchar",
    "snapshot_id": "alter table ops.email_log add column if not exists snapshot_id bigint",
}


@dataclass(frozen=True)
class EmailLogEntry:
    event_date: date
    recipient: str
    revision: int
    content_hash: str
    message_id: str
    supersedes: str | None
    total_events: int
    users: int
    backend: str
    status: str = SENDING
    attempts: int = 1
    snapshot_id: int | None = None  # DuckLake snapshot whose stats the email holds


_COLUMNS = (
    "event_date, recipient, revision, content_hash, message_id, supersedes, total_events, "
    "users, backend, status, attempts, snapshot_id"
)


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def ensure_email_log(connection: duckdb.DuckDBPyConnection) -> None:
    """Create ops.email_log, or upgrade an older one in place. Idempotent."""
    connection.execute(lake.table_ddl(connection, EMAIL_LOG_DDL))
    columns = {
        row[0]: row[1]
        for row in connection.execute(
            "select column_name, is_nullable from information_schema.columns "
            "where table_schema = 'ops' and table_name = 'email_log'"
        ).fetchall()
    }
    for column, statement in _UPGRADE.items():
        if column not in columns:
            connection.execute(statement)
    if columns.get("sent_at") == "NO":
        connection.execute("alter table ops.email_log alter column sent_at drop not null")


def entries(connection: duckdb.DuckDBPyConnection, event_date: date) -> list[EmailLogEntry]:
    """Every ledger row of `event_date`, by recipient, oldest revision first."""
    rows = connection.execute(
        f"select {_COLUMNS} from ops.email_log where event_date = ? order by recipient, revision",
        [event_date],
    ).fetchall()
    return [EmailLogEntry(*row) for row in rows]


def record_intents(
    connection: duckdb.DuckDBPyConnection,
    new: list[EmailLogEntry],
    retried: list[EmailLogEntry],
) -> None:
    """Insert `new` rows and mark `retried` rows as being sent again. Call it in the transaction
    that read the ledger (report.send_stats): on a DuckLake, a concurrent writer of the ledger
    then makes this commit fail, and the retry reads its rows."""
    now = _now()
    for entry in new:
        connection.execute(
            f"insert into ops.email_log ({_COLUMNS}, intent_at) "
            "values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [*_values(entry), now],
        )
    for entry in retried:
        connection.execute(
            "update ops.email_log set status = ?, attempts = attempts + 1, backend = ?, "
            "intent_at = ?, error = null "
            "where event_date = ? and recipient = ? and revision = ?",
            [SENDING, entry.backend, now, *_key(entry)],
        )


def mark_sent(connection: duckdb.DuckDBPyConnection, entry: EmailLogEntry) -> None:
    """The transport returned: the email went out."""
    connection.execute(
        "update ops.email_log set status = ?, sent_at = ?, error = null "
        "where event_date = ? and recipient = ? and revision = ?",
        [SENT, _now(), *_key(entry)],
    )


def mark_unknown(connection: duckdb.DuckDBPyConnection, entry: EmailLogEntry, error: str) -> None:
    """The send failed in a way that may have delivered the email: keep 'sending', say why."""
    connection.execute(
        "update ops.email_log set status = ?, error = ? "
        "where event_date = ? and recipient = ? and revision = ?",
        [SENDING, error, *_key(entry)],
    )


def forget(connection: duckdb.DuckDBPyConnection, entry: EmailLogEntry) -> None:
    """The email certainly did not go out: remove its intent row."""
    connection.execute(
        "delete from ops.email_log where event_date = ? and recipient = ? and revision = ?",
        _key(entry),
    )


def _key(entry: EmailLogEntry) -> list[object]:
    return [entry.event_date, entry.recipient, entry.revision]


def _values(entry: EmailLogEntry) -> list[object]:
    return [
        entry.event_date,
        entry.recipient,
        entry.revision,
        entry.content_hash,
        entry.message_id,
        entry.supersedes,
        entry.total_events,
        entry.users,
        entry.backend,
        entry.status,
        entry.attempts,
        entry.snapshot_id,
    ]
