"""What the crash campaign reads after each kill, and the checks it makes (tests/crash_campaign.py).

A `Snapshot` is everything a step may change, read through the public tables of DESIGN.md
(raw.events, analytics.event_stats and the ledgers raw.load_log, ops.build_log, ops.email_log) and
the emails delivered (outbox .eml files, or the messages an SMTP server received). Partitions are
compared by per-date fingerprints; the checks return violations as sentences naming the table and
the date, so a campaign run prints what broke.
"""

from __future__ import annotations

import email.parser
import email.policy
import email.utils
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import duckdb

from event_pipeline import warehouse
from event_pipeline.loader import partition_checksum

Fingerprints = dict[date, tuple]

# Per-date content fingerprints: row count plus an order-independent sum of row hashes.
_RAW_FINGERPRINTS = """
select event_date, count(*), sum(hash(event_id, user_id, event_type, event_at))
from raw.events group by event_date
"""
_STATS_FINGERPRINTS = """
select event_date, count(*), sum(event_count), sum(hash(user_id, event_count))
from analytics.event_stats group by event_date
"""
_STATS_TOTALS = """
select event_date, count(*), sum(event_count) from analytics.event_stats group by event_date
"""
_LATEST_LOAD = """
select event_date, checksum from raw.load_log
qualify row_number() over (partition by event_date order by loaded_at desc) = 1
"""
_LATEST_BUILD = """
select event_date, users, events from ops.build_log
qualify row_number() over (partition by event_date order by built_at desc) = 1
"""


@dataclass(frozen=True, order=True)
class EmailRow:
    """A row of ops.email_log, without its audit columns (sent_at, backend)."""

    event_date: date
    recipient: str
    revision: int
    content_hash: str
    message_id: str
    supersedes: str | None
    status: str  # "sent" when the ledger has no status column (every row is a sent email)

    @property
    def key(self) -> tuple[date, str, str]:
        return (self.event_date, self.recipient, self.content_hash)


@dataclass(frozen=True, order=True)
class Delivery:
    """One email as delivered: an outbox file, or a message the SMTP server accepted."""

    event_date: date | None
    recipient: str
    content_hash: str
    message_id: str
    source: str  # the outbox file name, or the campaign phase in which the server received it
    received_at: float | None = None  # SMTP: time.monotonic() when the DATA had fully arrived

    @property
    def key(self) -> tuple[date | None, str, str]:
        return (self.event_date, self.recipient, self.content_hash)

    @property
    def sent(self) -> tuple:
        """What must be equal between two runs: not where or when it was received."""
        return (self.event_date, self.recipient, self.content_hash, self.message_id)


def delivery_from_headers(raw: bytes, source: str, received_at: float | None = None) -> Delivery:
    """Read the stats email's identity from its headers (Message-ID, date, content hash, To)."""
    headers = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(raw)

    def header(name: str) -> str:
        return str(headers.get(name, "")).strip()  # a long value is folded onto the next line

    day = header("X-Event-Stats-Date")
    return Delivery(
        event_date=date.fromisoformat(day) if day else None,
        recipient=normal_address(header("To")),
        content_hash=header("X-Event-Stats-Content-Hash"),
        message_id=header("Message-ID"),
        source=source,
        received_at=received_at,
    )


def normal_address(text: str) -> str:
    return email.utils.parseaddr(text)[1].lower() or text.strip().lower()


def read_outbox(directory: Path) -> tuple[Delivery, ...]:
    """Every finished .eml of the outbox (a `.partial` file is not an email)."""
    if not directory.exists():
        return ()
    return tuple(
        sorted(
            delivery_from_headers(path.read_bytes(), path.name) for path in directory.glob("*.eml")
        )
    )


@dataclass(frozen=True)
class Snapshot:
    raw: Fingerprints
    stats: Fingerprints
    raw_checksums: dict[date, str]  # loader.partition_checksum of the stored partitions
    load_log: dict[date, str]  # checksum of the latest raw.load_log row per date
    build_log: dict[date, tuple[int, int]] | None  # latest (users, events); None: no such table
    stats_totals: dict[date, tuple[int, int]]  # (users, events) of analytics.event_stats
    email_log: tuple[EmailRow, ...]
    outbox: tuple[Delivery, ...]

    def tables(self) -> dict[str, object]:
        """The parts a rerun must make equal to a clean run (ledgers by content, not time)."""
        return {
            "raw.events": self.raw,
            "analytics.event_stats": self.stats,
            "raw.load_log (latest checksum per date)": self.load_log,
            "ops.build_log (latest users, events per date)": self.build_log,
            "ops.email_log": sorted(self.email_log),
            "outbox": sorted(delivery.sent for delivery in self.outbox),
        }

    def sent_rows(self, event_date: date) -> list[EmailRow]:
        return [r for r in self.email_log if r.event_date == event_date and r.status == "sent"]


def _per_date(connection: duckdb.DuckDBPyConnection, sql: str) -> dict[date, tuple] | None:
    try:
        rows = connection.execute(sql).fetchall()
    except duckdb.CatalogException:  # the table does not exist (yet)
        return None
    return {row[0]: tuple(row[1:]) for row in rows}


def _email_log(connection: duckdb.DuckDBPyConnection) -> tuple[EmailRow, ...]:
    try:
        cursor = connection.execute("select * from ops.email_log")
    except duckdb.CatalogException:
        return ()
    names = [column[0] for column in cursor.description]
    rows = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
    return tuple(
        sorted(
            EmailRow(
                event_date=row["event_date"],
                recipient=normal_address(row["recipient"]),
                revision=row["revision"],
                content_hash=row["content_hash"],
                message_id=row["message_id"].strip(),
                supersedes=row["supersedes"],
                status=row.get("status") or "sent",
            )
            for row in rows
        )
    )


def read_snapshot(warehouse_path: Path, outbox_dir: Path) -> Snapshot:
    """Read the warehouse (read-only, as another process would) and the outbox."""
    with warehouse.connect(warehouse_path, read_only=True, lock_timeout=60) as connection:
        raw = _per_date(connection, _RAW_FINGERPRINTS) or {}
        load_log = {day: row[0] for day, row in (_per_date(connection, _LATEST_LOAD) or {}).items()}
        checksums = {
            day: partition_checksum(connection, day)[1] for day in set(raw) | set(load_log)
        }
        return Snapshot(
            raw=raw,
            stats=_per_date(connection, _STATS_FINGERPRINTS) or {},
            raw_checksums=checksums,
            load_log=load_log,
            build_log=_per_date(connection, _LATEST_BUILD),
            stats_totals=_per_date(connection, _STATS_TOTALS) or {},
            email_log=_email_log(connection),
            outbox=read_outbox(outbox_dir),
        )


# --- checks: each returns a list of violations (sentences) -----------------------------------


def partition_violations(after: Snapshot, old: Snapshot, new: Snapshot) -> list[str]:
    """Every partition of raw.events and analytics.event_stats is the complete old or new one."""
    found = []
    for table, part in (("raw.events", "raw"), ("analytics.event_stats", "stats")):
        now, before, clean = (getattr(s, part) for s in (after, old, new))
        for day in sorted(set(now) | set(before) | set(clean)):
            if now.get(day) not in (before.get(day), clean.get(day)):
                found.append(
                    f"{table} {day}: neither the old nor the new partition (rows, fingerprint: "
                    f"{now.get(day)}; old {before.get(day)}, new {clean.get(day)})"
                )
    return found


def load_log_violations(snapshot: Snapshot) -> list[str]:
    """The latest raw.load_log row of every date has the checksum of the stored partition."""
    found = []
    for day in sorted(set(snapshot.raw) | set(snapshot.load_log)):
        logged = snapshot.load_log.get(day)
        stored = snapshot.raw_checksums.get(day)
        if logged != stored:
            found.append(
                f"raw.load_log {day}: latest row says checksum {logged}, raw.events holds {stored}"
            )
    return found


def build_log_violations(snapshot: Snapshot) -> list[str]:
    """When ops.build_log exists: its latest (users, events) per date match event_stats."""
    if snapshot.build_log is None:
        return []
    found = []
    for day in sorted(set(snapshot.build_log) | set(snapshot.stats_totals)):
        logged = snapshot.build_log.get(day)
        actual = snapshot.stats_totals.get(day, (0, 0))
        if logged is None or tuple(logged) != tuple(actual):
            found.append(
                f"ops.build_log {day}: latest row says (users, events) {logged}, "
                f"analytics.event_stats holds {actual}"
            )
    return found


def email_log_violations(
    snapshot: Snapshot, deliveries: Iterable[Delivery], event_date: date, in_flight_allowed: int
) -> list[str]:
    """ops.email_log agrees with the emails delivered for `event_date`.

    Every row marked sent has its delivered email (same recipient, content and Message-ID).
    Delivered emails without a sent row: at most `in_flight_allowed` (the one a kill interrupted
    between the send and the ledger; 0 once a rerun completed).
    """
    delivered = [d for d in deliveries if d.event_date == event_date]
    by_id = {(d.recipient, d.content_hash, d.message_id) for d in delivered}
    found = []
    sent = snapshot.sent_rows(event_date)
    for row in sent:
        if (row.recipient, row.content_hash, row.message_id) not in by_id:
            found.append(
                f"ops.email_log {event_date} {row.recipient} revision {row.revision}: marked sent "
                f"but no such email was delivered ({row.message_id})"
            )
    sent_keys = {row.key for row in sent}
    unrecorded = sorted({d.key for d in delivered} - sent_keys)
    if len(unrecorded) > in_flight_allowed:
        listed = ", ".join(f"{recipient}" for _, recipient, _ in unrecorded[:5])
        found.append(
            f"ops.email_log {event_date}: {len(unrecorded)} delivered email(s) have no sent row "
            f"(allowed: {in_flight_allowed}): {listed}"
        )
    return found


def outbox_duplicate_violations(deliveries: Iterable[Delivery]) -> list[str]:
    """The outbox backend never delivers a (date, recipient, content) twice."""
    groups: dict[tuple, list[Delivery]] = defaultdict(list)
    for delivery in deliveries:
        groups[delivery.key].append(delivery)
    found = []
    for (day, recipient, content), copies in sorted(groups.items(), key=lambda g: str(g[0])):
        if len(copies) > 1:
            files = ", ".join(copy.source for copy in copies)
            found.append(
                f"outbox {day} {recipient}: content {content[:12]} delivered {len(copies)} times "
                f"({files})"
            )
        if not day or not content or not copies[0].message_id:
            found.append(f"outbox: unreadable email {copies[0].source} (headers missing)")
    return found


def smtp_duplicate_violations(
    before: Iterable[Delivery],
    killed: Iterable[Delivery],
    rerun: Iterable[Delivery],
    ledger_after_kill: Snapshot,
) -> tuple[list[str], int]:
    """(violations, resends): over SMTP a (date, recipient, content) arrives once, or twice only
    as a resend with the same Message-ID of a message the server had received from the killed run
    while the ledger did not record it as sent. `before`: deliveries of earlier runs."""
    groups: dict[tuple, dict[str, list[Delivery]]] = defaultdict(lambda: defaultdict(list))
    for phase, deliveries in (("before", before), ("killed", killed), ("rerun", rerun)):
        for delivery in deliveries:
            groups[delivery.key][phase].append(delivery)
    recorded = {row.key for row in ledger_after_kill.email_log if row.status == "sent"}
    found, resends = [], 0
    for key, phases in sorted(groups.items(), key=lambda g: str(g[0])):
        day, recipient, content = key
        what = f"SMTP {day} {recipient} content {content[:12]}"
        counts = {phase: len(copies) for phase, copies in phases.items() if copies}
        if counts.get("before") and (counts.get("killed") or counts.get("rerun")):
            found.append(f"{what}: delivered before this step and again by it ({counts})")
        elif counts.get("killed", 0) > 1 or counts.get("rerun", 0) > 1:
            found.append(f"{what}: delivered twice within one run ({counts})")
        elif counts.get("killed") and counts.get("rerun"):
            first, second = phases["killed"][0], phases["rerun"][0]
            if first.message_id != second.message_id:
                found.append(
                    f"{what}: resent with another Message-ID ({first.message_id}, then "
                    f"{second.message_id})"
                )
            elif key in recorded:
                found.append(f"{what}: resent although ops.email_log recorded it as sent")
            else:
                resends += 1
    return found, resends


def convergence_violations(after_rerun: Snapshot, clean: Snapshot) -> list[str]:
    """The rerun left the tables (and emails) of a clean run of the step."""
    found = []
    rerun_tables, clean_tables = after_rerun.tables(), clean.tables()
    for name, clean_value in clean_tables.items():
        value = rerun_tables[name]
        if value == clean_value:
            continue
        if isinstance(clean_value, dict) and isinstance(value, dict):
            dates = sorted(
                d for d in set(value) | set(clean_value) if value.get(d) != clean_value.get(d)
            )
            found.append(f"{name}: after the rerun differs from a clean run on {dates}")
        else:
            found.append(f"{name}: after the rerun differs from a clean run")
    return found
