"""Load the raw events of a date, or of a range of dates, into raw.events: atomic and idempotent.

For every date D of [start, end):
1. download GET /events?start_date=D&end_date=D+1 to a temporary file (removed afterwards),
2. parse and validate it with DuckDB (`sources.stage_events`),
3. in ONE transaction: delete partition D, insert its new rows, write a raw.load_log row.
   If the new content equals the stored partition (same fingerprint), raw.events is left alone
   and only the ledger row (changed = false) is written.
A failure (source, validation, SIGKILL) leaves each date either fully old or fully new.
While date D is being written, the next date is already downloading.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import duckdb

from event_pipeline import settings, sources, warehouse

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadResult:
    """What one date's load did (also a row of raw.load_log)."""

    event_date: date
    rows: int  # rows in the partition after the load
    checksum: str  # content checksum of the partition (load_id excluded)
    changed: bool  # False: the source was unchanged and raw.events was not touched
    out_of_window: int  # delivered events dated outside event_date: counted, not loaded
    duplicates: int  # repeated event_ids in the delivery, stored once
    load_id: str
    source_url: str
    seconds: float


# Order-independent content checksum: sums of the two 64-bit halves of each row's md5, plus the
# row count. It needs no sort and no giant string, so a 1M-row partition costs a single scan.
_CHECKSUM_SQL = """
select
    count(*),
    coalesce(sum(md5_number_upper(row_key)), 0),
    coalesce(sum(md5_number_lower(row_key)), 0)
from (
    select concat_ws(
        chr(31), event_id, user_id, coalesce(event_type, chr(0)),
        strftime(event_at, '%Y-%m-%dT%H:%M:%S.%f')
    ) as row_key
    from {relation}
    where event_date = ?
)
"""


def partition_checksum(
    connection: duckdb.DuckDBPyConnection, event_date: date, relation: str = "raw.events"
) -> tuple[int, str]:
    """(rows, checksum) of the events of `event_date` in `relation` (load_id is not content)."""
    ((rows, upper, lower),) = connection.execute(
        _CHECKSUM_SQL.format(relation=relation), [event_date]
    ).fetchall()
    return rows, f"{rows}-{upper:x}-{lower:x}"


@dataclass(frozen=True)
class _Download:
    path: Path
    seconds: float


def _fingerprint(connection: duckdb.DuckDBPyConnection, event_date: date, relation: str) -> tuple:
    """A fast content fingerprint to compare two partitions within one process.

    DuckDB's hash() is 10x cheaper than md5 but may differ between DuckDB versions, so it only
    compares the stored and the new partition here; the ledger keeps the md5 checksum.
    """
    return connection.execute(
        f"select count(*), coalesce(sum(hash(event_id, user_id, event_type, event_at)), 0) "
        f"from {relation} where event_date = ?",
        [event_date],
    ).fetchall()[0]


def _fetch(url: str, directory: Path, event_date: date) -> _Download:
    started = time.monotonic()
    path = directory / f"events-{event_date.isoformat()}.json"
    sources.download(
        url,
        path,
        what=f"events of {event_date.isoformat()}",
        attempts=settings.events_api_attempts(),
        timeout=settings.events_api_timeout(),
        backoff=settings.events_api_backoff(),
    )
    return _Download(path, time.monotonic() - started)


def _check_not_stored_elsewhere(
    connection: duckdb.DuckDBPyConnection, event_date: date, url: str
) -> None:
    """event_id is unique in raw.events: refuse ids that another date's partition holds.

    That happens when the source re-dates an event (our ids are stable, timestamps may be
    corrected). This process holds the writer lock, so nothing changes until the transaction.
    """
    moved = connection.execute(
        "select event_id, event_date from raw.events where event_date <> ? and event_id in "
        "(select event_id from staged where event_date = ?) order by all limit 3",
        [event_date, event_date],
    ).fetchall()
    if moved:
        listed = ", ".join(f"{event_id} (stored under {day})" for event_id, day in moved)
        raise sources.EventSourceError(
            f"{event_date}: the source ({url}) now dates event(s) {listed} to {event_date}. "
            "Reload the date(s) they are stored under first, or load a range covering both "
            "(dates load in order); nothing was written for this date."
        )


def _replace_partition(
    connection: duckdb.DuckDBPyConnection,
    event_date: date,
    path: Path,
    url: str,
    run_id: str,
) -> LoadResult:
    started = time.monotonic()
    what = f"events of {event_date.isoformat()}"
    _, duplicates = sources.stage_events(connection, path, what=what, url=url)
    outside = connection.execute(
        "select event_date, count(*) from staged where event_date <> ? group by all order by 1",
        [event_date],
    ).fetchall()
    out_of_window = sum(count for _, count in outside)
    if outside:
        log.warning(
            "%s: the source sent %d event(s) dated outside %s, which were NOT loaded: %s (from %s)",
            event_date,
            out_of_window,
            event_date,
            ", ".join(f"{day}: {count}" for day, count in outside),
            url,
        )
    if duplicates:
        log.warning(
            "%s: %d repeated event_id(s) in the delivery, stored once", event_date, duplicates
        )
    _check_not_stored_elsewhere(connection, event_date, url)
    rows, checksum = partition_checksum(connection, event_date, relation="staged")
    changed = _fingerprint(connection, event_date, "staged") != _fingerprint(
        connection, event_date, "raw.events"
    )
    load_id = f"{run_id}/{event_date.isoformat()}/{uuid.uuid4().hex[:12]}"
    loaded_at = datetime.now(UTC).replace(tzinfo=None)
    log.debug("%s: replacing the partition (%d rows) in one transaction", event_date, rows)
    connection.execute("begin transaction")
    try:
        if changed:
            connection.execute("delete from raw.events where event_date = ?", [event_date])
            connection.execute(
                "insert into raw.events (event_id, user_id, event_type, event_at, event_date, "
                "load_id) select event_id, user_id, event_type, event_at, event_date, ? "
                "from staged where event_date = ?",
                [load_id, event_date],
            )
        connection.execute(
            "insert into raw.load_log (load_id, run_id, event_date, rows, checksum, changed, "
            "out_of_window, duplicates, source_url, loaded_at) "
            "values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [load_id, run_id, event_date, rows, checksum, changed, out_of_window, duplicates]
            + [url, loaded_at],
        )
        connection.execute("commit")
        log.debug("%s: committed", event_date)
    except BaseException:
        connection.execute("rollback")
        raise
    finally:
        connection.execute("drop table if exists staged")
    return LoadResult(
        event_date=event_date,
        rows=rows,
        checksum=checksum,
        changed=changed,
        out_of_window=out_of_window,
        duplicates=duplicates,
        load_id=load_id,
        source_url=url,
        seconds=time.monotonic() - started,
    )


def _report(result: LoadResult, index: int, total: int, progress: bool, download: float) -> None:
    state = "replaced" if result.changed else "unchanged"
    line = (
        f"[{index}/{total}] {result.event_date}  {result.rows:>9,} rows  {state:<9}"
        f"  out-of-window {result.out_of_window}  duplicates {result.duplicates}"
        f"  (download {download:.1f} s, load {result.seconds:.1f} s)"
    )
    if progress:
        print(line, file=sys.stderr, flush=True)
    else:
        log.info("Loaded %s", line)


def load_range(
    start: date,
    end: date | None = None,
    *,
    api_url: str | None = None,
    warehouse_path: Path | None = None,
    run_id: str | None = None,
    progress: bool = False,
) -> list[LoadResult]:
    """Load the events of every date in [start, end) (default: just `start`) into raw.events.

    Each date is replaced in its own transaction together with its raw.load_log row; on an
    error the dates before it stay loaded (each complete), the failing date and later ones are
    untouched, and a rerun is safe. `progress` prints a line per date to stderr.
    """
    end = end or start + timedelta(days=1)
    if end <= start:
        raise ValueError(f"end ({end}) must be after start ({start}); the range is [start, end)")
    api_url = api_url or settings.events_api_url()
    run_id = run_id or f"manual-{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    memory_limit = settings.loader_memory_limit().replace("'", "")
    dates = [start + timedelta(days=i) for i in range((end - start).days)]
    urls = [sources.window_url(api_url, day, day + timedelta(days=1)) for day in dates]
    results: list[LoadResult] = []
    with (
        tempfile.TemporaryDirectory(prefix="event-stats-load-") as tmp,
        ThreadPoolExecutor(max_workers=1) as prefetcher,
    ):
        directory = Path(tmp)
        pending: Future[_Download] = prefetcher.submit(_fetch, urls[0], directory, dates[0])
        try:
            for index, (day, url) in enumerate(zip(dates, urls, strict=True)):
                download = pending.result()
                if index + 1 < len(dates):  # fetch the next date while this one is written
                    pending = prefetcher.submit(
                        _fetch, urls[index + 1], directory, dates[index + 1]
                    )
                try:
                    with warehouse.connect(warehouse_path) as connection:
                        connection.execute(f"set memory_limit = '{memory_limit}'")
                        warehouse.ensure_raw_schema(connection)
                        result = _replace_partition(connection, day, download.path, url, run_id)
                finally:
                    download.path.unlink(missing_ok=True)
                results.append(result)
                _report(result, index + 1, len(dates), progress, download.seconds)
        finally:
            pending.cancel()
            if not pending.cancelled():
                # wait so the directory can be removed; a failure there no longer matters
                pending.exception()
    return results
