"""`event-stats status`: per date, what was loaded, built and emailed, and what is wrong.

The report is read from the three ledgers (warehouse.status): raw.load_log, ops.build_log and
ops.email_log, plus the content hash of the stats built now. Everything but `read_report` is a
pure function of those rows.

Problems, each naming a date and a kind:
- gaps: `not_loaded` (the date was never loaded into raw.events), `not_built` (loaded, but its
  stats were never built). A gap hides the problems after it: a date never loaded is not also
  reported as not built or not emailed.
- stale: `raw_changed` (a load changed the date's raw events after its latest build),
  `email_not_sent` (built, but no email was ever sent), `email_outdated` (the stats built now
  differ from the ones a recipient's latest email holds: its content hash differs),
  `email_unconfirmed` (a recipient's latest email is still 'sending': a run stopped while sending
  it, so whether it went out is unknown).

The default range is every date from the first date any ledger knows through yesterday (UTC), or
through the last date a ledger knows if that is later, so nothing loaded is left out; `--start D`
alone is D only. Exit codes: EXIT_OK, EXIT_PROBLEMS, EXIT_UNAVAILABLE.

JSON (`report_json`, schema_version 1): {"schema_version", "warehouse", "range": {"start", "end"
(exclusive)}, "ok", "gaps", "stale", "dates": [{"date", "raw", "stats", "email", "problems"}],
"problems": [{"date", "kind", "category", "detail", "fix"}]}; "raw", "stats" and "email" are null
when there is nothing of that kind for the date. Timestamps are UTC, ISO 8601 with a Z.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from email.utils import parseaddr
from itertools import groupby
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from event_pipeline.warehouse.email_log import SENDING, SENT
from event_pipeline.warehouse.stats import BuildRecord
from event_pipeline.warehouse.status import EmailRecord, Ledgers, LoadSummary

EXIT_OK = 0  # every date of the range is loaded, built and emailed with the stats built now
EXIT_PROBLEMS = 1  # at least one gap or stale date
EXIT_UNAVAILABLE = 2  # no report: bad arguments, no warehouse, or the warehouse stayed locked

SCHEMA_VERSION = 1

GAP = "gap"
STALE = "stale"


@dataclass(frozen=True)
class ProblemKind:
    name: str
    category: str  # GAP or STALE
    meaning: str
    fix: str  # str.format fields: start, end (exclusive), last (end - 1 day), build, send


_BACKFILL = (
    "`event-stats airflow backfill create --dag-id event_stats --from-date {start} "
    "--to-date {last}`"
)

KINDS = {
    kind.name: kind
    for kind in (
        ProblemKind(
            "not_loaded",
            GAP,
            "never loaded into raw.events",
            f"run the event_stats DAG ({_BACKFILL}), or load "
            "(`event-stats load --start {start} --end {end}`), then build and send",
        ),
        ProblemKind(
            "not_built",
            GAP,
            "loaded, but its stats were never built",
            "build ({build}), then {send}",
        ),
        ProblemKind(
            "raw_changed",
            STALE,
            "raw.events changed after the stats were built",
            "rebuild ({build}), then {send}: it sends an update if the stats changed",
        ),
        ProblemKind(
            "email_not_sent",
            STALE,
            "built, but no email was ever sent",
            "{send}",
        ),
        ProblemKind(
            "email_outdated",
            STALE,
            "the stats built now differ from the ones emailed",
            "{send}: it sends an update that replaces the earlier email",
        ),
        ProblemKind(
            "email_unconfirmed",
            STALE,
            "an email's outcome is unknown (a run stopped while sending it)",
            "{send}: it finishes the send (same Message-ID, so no duplicate in mail clients)",
        ),
    )
}


@dataclass(frozen=True)
class Problem:
    event_date: date
    kind: str  # a key of KINDS
    detail: str  # what the ledgers say about this date

    @property
    def category(self) -> str:
        return KINDS[self.kind].category

    def fix(self) -> str:
        return _fix(self.kind, self.event_date, self.event_date + timedelta(days=1))


@dataclass(frozen=True)
class EmailState:
    """The latest email of each recipient of a date."""

    revision: int  # the highest revision among them
    recipients: tuple[str, ...]  # whose latest email was sent
    sent_at: datetime | None  # the latest of their sends
    unconfirmed: tuple[str, ...]  # whose latest email is still 'sending'
    outdated: tuple[str, ...]  # whose latest email holds other stats than the ones built now


@dataclass(frozen=True)
class DateStatus:
    event_date: date
    load: LoadSummary | None
    build: BuildRecord | None
    email: EmailState | None
    problems: tuple[Problem, ...]


@dataclass(frozen=True)
class StatusReport:
    start: date
    end: date  # exclusive
    dates: tuple[DateStatus, ...]
    warehouse: str = ""

    @property
    def problems(self) -> list[Problem]:
        return [problem for status in self.dates for problem in status.problems]

    def count(self, category: str) -> int:
        return sum(problem.category == category for problem in self.problems)

    @property
    def exit_code(self) -> int:
        return EXIT_PROBLEMS if self.problems else EXIT_OK


class StatusUnavailableError(RuntimeError):
    """The report cannot be made: no warehouse at the path, or bad arguments."""


# Reading


def read_report(
    start: date | None = None,
    end: date | None = None,
    *,
    warehouse_path: Path | None = None,
    today: date | None = None,
    lock_timeout: float | None = None,
) -> StatusReport:
    """The report for [start, end) (defaults: see the module docstring), read in one brief
    read-only connection. Raises StatusUnavailableError when there is no warehouse."""
    from event_pipeline import settings, warehouse
    from event_pipeline.warehouse import status as status_queries

    path = Path(warehouse_path) if warehouse_path else settings.warehouse_path()
    if not path.exists():
        raise StatusUnavailableError(
            f"No warehouse at {path}: nothing was loaded there yet. Check $WAREHOUSE_PATH (or "
            "--warehouse), or load dates first (`make run`, `event-stats load`)."
        )
    start, end = requested_bounds(start, end)
    with warehouse.connect(path, read_only=True, lock_timeout=lock_timeout) as connection:
        ledgers = status_queries.read_ledgers(connection, start, end)
    today = today or datetime.now(UTC).date()
    first, stop = report_range(start, end, ledgers, today)
    return build_report(first, stop, ledgers, warehouse=str(path))


def requested_bounds(start: date | None, end: date | None) -> tuple[date | None, date | None]:
    """The dates to read: --start alone is that date; None leaves a side open."""
    if start is not None and end is None:
        end = start + timedelta(days=1)
    if start is not None and end is not None and end <= start:
        raise StatusUnavailableError(
            f"--end ({end}) must be after --start ({start}): the range is [start, end)."
        )
    return start, end


def report_range(
    start: date | None, end: date | None, ledgers: Ledgers, today: date
) -> tuple[date, date]:
    """Fill the open sides: from the first date any ledger knows, through yesterday (end =
    today) or the last date a ledger knows, whichever is later. Nothing known: an empty range."""
    known = ledger_dates(ledgers)
    if start is None:
        start = known[0] if known else (end or today)
    if end is None:
        end = max(today, known[-1] + timedelta(days=1)) if known else start
    return start, max(start, end)


def ledger_dates(ledgers: Ledgers) -> list[date]:
    dates = {row.event_date for row in [*ledgers.loads, *ledgers.builds, *ledgers.emails]}
    return sorted(dates)


# The report


def build_report(start: date, end: date, ledgers: Ledgers, *, warehouse: str = "") -> StatusReport:
    """Every date of [start, end) with its load, build, email and problems."""
    loads = {load.event_date: load for load in ledgers.loads}
    builds = {build.event_date: build for build in ledgers.builds}
    emails = {
        day: list(rows)
        for day, rows in groupby(
            sorted(ledgers.emails, key=lambda row: row.event_date), key=lambda row: row.event_date
        )
    }
    dates = []
    for offset in range((end - start).days):
        day = start + timedelta(days=offset)
        email = email_state(emails.get(day, []), ledgers.stats_hashes.get(day))
        load, build = loads.get(day), builds.get(day)
        dates.append(DateStatus(day, load, build, email, date_problems(day, load, build, email)))
    return StatusReport(start, end, tuple(dates), warehouse)


def email_state(rows: Sequence[EmailRecord], current_hash: str | None) -> EmailState | None:
    """The state of a date's email from its ledger rows. `current_hash`: of the stats now, or None
    when the date was not built again since its emails were composed (they hold the stats now)."""
    if not rows:
        return None
    latest: dict[str, EmailRecord] = {}
    for row in sorted(rows, key=lambda row: row.revision):
        latest[_address(row.recipient)] = row
    sent = {address: row for address, row in latest.items() if row.status == SENT}
    sent_times = [row.sent_at for row in sent.values() if row.sent_at is not None]
    return EmailState(
        revision=max(row.revision for row in latest.values()),
        recipients=tuple(sorted(sent)),
        sent_at=max(sent_times) if sent_times else None,
        unconfirmed=tuple(sorted(a for a, row in latest.items() if row.status == SENDING)),
        outdated=tuple(
            sorted(
                address
                for address, row in latest.items()
                if current_hash is not None and row.content_hash != current_hash
            )
        ),
    )


def _address(recipient: str) -> str:
    """The bare lowercased address (older ledger rows kept display names)."""
    address = parseaddr(recipient)[1]
    return (address or recipient).lower()


def date_problems(
    day: date,
    load: LoadSummary | None,
    build: BuildRecord | None,
    email: EmailState | None,
) -> tuple[Problem, ...]:
    """What is wrong with one date; a gap hides the problems downstream of it."""
    if load is None:
        return (Problem(day, "not_loaded", "no raw.load_log row"),)
    if build is None:
        detail = f"loaded {_minute(load.loaded_at)} by run {load.run_id}; no ops.build_log row"
        return (Problem(day, "not_built", detail),)
    problems = []
    if load.changed_at is not None and load.changed_at > build.built_at:
        problems.append(
            Problem(
                day,
                "raw_changed",
                f"built {_minute(build.built_at)}, raw changed {_minute(load.changed_at)} "
                f"(latest load by run {load.run_id})",
            )
        )
    if email is None:
        detail = f"built {_minute(build.built_at)}; no ops.email_log row"
        problems.append(Problem(day, "email_not_sent", detail))
        return tuple(problems)
    if email.outdated:
        problems.append(
            Problem(
                day,
                "email_outdated",
                f"the latest email to {', '.join(email.outdated)} holds other stats than the "
                f"build of {_minute(build.built_at)}",
            )
        )
    if email.unconfirmed:
        detail = f"the latest email to {', '.join(email.unconfirmed)} is still 'sending'"
        problems.append(Problem(day, "email_unconfirmed", detail))
    return tuple(problems)


def _fix(kind: str, start: date, end: date) -> str:
    last = end - timedelta(days=1)
    build = (
        "`dbt build --project-dir dbt_project --profiles-dir . "
        f"--vars '{{start_date: {start}, end_date: {end}}}'`"
    )
    send = (
        f"`event-stats send-stats --date {start}`"
        if start == last
        else f"`event-stats send-stats --date D` for each date D from {start} to {last}"
    )
    return KINDS[kind].fix.format(start=start, end=end, last=last, build=build, send=send)


# Output


def report_json(report: StatusReport) -> dict[str, Any]:
    """The report as the documented JSON object (module docstring)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "warehouse": report.warehouse,
        "range": {"start": report.start.isoformat(), "end": report.end.isoformat()},
        "ok": not report.problems,
        "gaps": report.count(GAP),
        "stale": report.count(STALE),
        "dates": [_date_json(status) for status in report.dates],
        "problems": [
            {
                "date": problem.event_date.isoformat(),
                "kind": problem.kind,
                "category": problem.category,
                "detail": problem.detail,
                "fix": problem.fix(),
            }
            for problem in report.problems
        ],
    }


def _date_json(status: DateStatus) -> dict[str, Any]:
    load, build, email = status.load, status.build, status.email
    return {
        "date": status.event_date.isoformat(),
        "raw": load
        and {
            "rows": load.rows,
            "loaded_at": _iso(load.loaded_at),
            "source_url": load.source_url,
            "run_id": load.run_id,
            "changed_at": _iso(load.changed_at),
            "loads": load.loads,
        },
        "stats": build
        and {
            "users": build.users,
            "events": build.events,
            "built_at": _iso(build.built_at),
            "invocation_id": build.invocation_id,
        },
        "email": email
        and {
            "revision": email.revision,
            "recipients": list(email.recipients),
            "sent_at": _iso(email.sent_at),
            "unconfirmed": list(email.unconfirmed),
            "outdated": list(email.outdated),
        },
        "problems": [problem.kind for problem in status.problems],
    }


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat(timespec="seconds") + "Z"


_HEADERS = (
    "date",
    "raw rows",
    "loaded (UTC)",
    "source",
    "load run",
    "users",
    "events",
    "built (UTC)",
    "email rev",
    "sent to",
    "sent (UTC)",
    "problems",
)
_RIGHT = {"raw rows", "users", "events", "email rev", "sent to"}


def render_text(report: StatusReport) -> str:
    """The human report: a title, one line per date, then the problems summary."""
    days = len(report.dates)
    title = (
        f"Status of {report.start} to {report.end - timedelta(days=1)} ({days} dates, UTC)"
        if days
        else f"Status: no dates to report (nothing loaded before {report.end})"
    )
    if report.warehouse:
        title += f", warehouse {report.warehouse}"
    lines = [title, ""]
    if days:
        lines += _table([_row(status) for status in report.dates]) + [""]
    lines += summary_lines(report)
    return "\n".join(lines) + "\n"


def _row(status: DateStatus) -> list[str]:
    load, build, email = status.load, status.build, status.email
    return [
        status.event_date.isoformat(),
        f"{load.rows:,}" if load else "-",
        _minute(load.loaded_at) if load else "-",
        urlsplit(load.source_url).netloc or load.source_url if load else "-",
        load.run_id if load else "-",
        f"{build.users:,}" if build else "-",
        f"{build.events:,}" if build else "-",
        _minute(build.built_at) if build else "-",
        str(email.revision) if email else "-",
        str(len(email.recipients)) if email else "-",
        _minute(email.sent_at) if email and email.sent_at else "-",
        ", ".join(problem.kind for problem in status.problems) or "ok",
    ]


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(cell) for cell in column) for column in zip(_HEADERS, *rows, strict=True)]

    def line(cells: Iterable[str]) -> str:
        parts = [
            cell.rjust(width) if header in _RIGHT else cell.ljust(width)
            for header, cell, width in zip(_HEADERS, cells, widths, strict=True)
        ]
        return "  ".join(parts).rstrip()

    return [line(_HEADERS)] + [line(row) for row in rows]


def summary_lines(report: StatusReport) -> list[str]:
    """'All well', or the problems: one entry per kind and run of consecutive dates, by date."""
    problems = report.problems
    if not problems:
        return [f"All well: {len(report.dates)} date(s) loaded, built and emailed."]
    dates = len({problem.event_date for problem in problems})
    lines = [
        f"{len(problems)} problem(s) on {dates} date(s): {report.count(GAP)} gap(s), "
        f"{report.count(STALE)} stale:"
    ]
    runs = [
        (run, kind)
        for kind in KINDS
        for run in _runs(sorted(p.event_date for p in problems if p.kind == kind))
    ]
    for run, kind in sorted(runs, key=lambda entry: entry[0][0]):
        lines += _summary_entry(kind, run, problems)
    return lines


def _summary_entry(kind: str, run: list[date], problems: list[Problem]) -> list[str]:
    first, last = run[0], run[-1]
    if len(run) == 1:
        [problem] = [p for p in problems if p.kind == kind and p.event_date == first]
        what = f"{first}  {kind}: {KINDS[kind].meaning}; {problem.detail}"
    else:
        what = f"{first} to {last} ({len(run)} dates)  {kind}: {KINDS[kind].meaning}"
    return [f"- {what}", f"  fix: {_fix(kind, first, last + timedelta(days=1))}"]


def _runs(dates: list[date]) -> list[list[date]]:
    """Consecutive dates grouped: [1, 2, 3, 5] -> [[1, 2, 3], [5]]."""
    runs: list[list[date]] = []
    for day in dates:
        if runs and day - runs[-1][-1] == timedelta(days=1):
            runs[-1].append(day)
        else:
            runs.append([day])
    return runs


def _minute(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M")
