"""Load the raw events of a date, or of a range of dates, into raw.events: atomic and idempotent.

For every date D of [start, end):
1. download GET /events?start_date=D&end_date=D+1 to a temporary file, and check that the
   answer is complete (`sources.download`: status, framing, structure),
2. parse and validate it with DuckDB (`sources.stage_events`),
3. in ONE transaction: delete partition D, insert its new rows, write a raw.load_log row.
   If the new content equals the stored partition (same fingerprint), raw.events is left alone
   and only the ledger row (changed = false) is written.
A failure (source, validation, SIGKILL) leaves each date either fully old or fully new.
While date D is being written, the next date is already downloading (in a daemon thread).

Interrupts: while loading, SIGTERM and SIGINT raise LoadInterrupted (after calling the handler
installed before, e.g. Airflow's, which runs the task's on_kill). One arriving during a write
(from BEGIN to COMMIT) takes effect right after the commit, so the message can say exactly which
dates were loaded. The download directory is removed at once: the download thread is cancelled,
not awaited. A directory left by a loader killed with SIGKILL is removed by the next load (its
owner's lock on it is gone).
"""

from __future__ import annotations

import fcntl
import logging
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from types import FrameType

import duckdb

from event_pipeline import settings, sources, warehouse
from event_pipeline.warehouse import raw
from event_pipeline.warehouse.raw import partition_checksum  # noqa: F401 (tests and tools use it)

log = logging.getLogger(__name__)

DOWNLOAD_DIR_PREFIX = "event-stats-load-"
_OWNER_LOCK = ".owner.lock"


class LoadInterrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT stopped a load; each date is untouched or completely loaded."""

    def __init__(self, signum: int, message: str = "") -> None:
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        super().__init__(message or f"interrupted by {self.signal_name}")


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


@dataclass(frozen=True)
class _Source:
    """Where one load reads and writes; it also spells the command that reloads a date range."""

    api_url: str
    warehouse_path: Path | None

    def url(self, day: date) -> str:
        return sources.window_url(self.api_url, day, day + timedelta(days=1))

    def command(self, start: date, end: date) -> str:
        """The `event-stats load` command for [start, end) from this source into this warehouse."""
        words = ["event-stats", "load", "--start", start.isoformat(), "--end", end.isoformat()]
        if self.api_url != settings.events_api_url():
            words += ["--api-url", self.api_url]
        if self.warehouse_path and Path(self.warehouse_path) != settings.warehouse_path():
            words += ["--warehouse", str(self.warehouse_path)]
        return shlex.join(words)


# --- interrupts, download directory, prefetch ---------------------------------------------------


class _Interrupts:
    """While active (main thread only), SIGTERM and SIGINT raise LoadInterrupted.

    Inside `deferred()` they wait until the block ends, so a write is never cut between its
    commit and its bookkeeping. A signal that was ignored stays ignored. `received` remembers
    the signal: DuckDB turns a handler's exception during a query into its own RuntimeError.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self._previous: dict[int, object] = {}
        self._deferring = False
        self._pending: tuple[int, FrameType | None] | None = None
        self.received: int | None = None

    def __enter__(self) -> _Interrupts:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                previous = signal.getsignal(signum)
                if previous in (signal.SIG_IGN, None):
                    continue
                self._previous[signum] = previous
                signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = self.received or signum
        if self._deferring:
            self._pending = self._pending or (signum, frame)
            return
        previous = self._previous.get(signum)
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signum, frame)  # e.g. Airflow's task runner: calls the task's on_kill()
        raise LoadInterrupted(signum)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        if self._pending:
            signum, frame = self._pending
            self._pending = None
            self._handle(signum, frame)


def _remove_abandoned_directories(root: Path, min_age: float = 10.0) -> None:
    """Remove download directories whose loader died (SIGKILL): nobody holds their lock.

    `min_age` spares a directory created a moment ago whose owner is about to lock it.
    """
    for directory in root.glob(f"{DOWNLOAD_DIR_PREFIX}*"):
        lock_path = directory / _OWNER_LOCK
        try:
            if time.time() - lock_path.stat().st_mtime < min_age:
                continue
            with lock_path.open("a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(directory, ignore_errors=True)
                log.info("Removed %s, left behind by a loader that was killed", directory)
        except OSError:  # locked by a running loader, or already gone
            continue


@contextmanager
def _download_directory() -> Iterator[Path]:
    """A temporary directory for the downloads, locked by this process while it exists."""
    root = Path(tempfile.gettempdir())
    _remove_abandoned_directories(root)
    directory = Path(tempfile.mkdtemp(prefix=DOWNLOAD_DIR_PREFIX, dir=root))
    lock = (directory / _OWNER_LOCK).open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        lock.close()


@dataclass(frozen=True)
class _Download:
    path: Path
    seconds: float


class _Prefetch:
    """Downloads one date in a daemon thread: an interrupt never waits for a slow source."""

    def __init__(self, source: _Source, directory: Path, day: date) -> None:
        self.cancellation = sources.Cancellation()
        self._done = threading.Event()
        self._result: _Download | None = None
        self._error: BaseException | None = None
        arguments = (source.url(day), directory, day)
        threading.Thread(
            target=self._run, args=arguments, name=f"download-{day}", daemon=True
        ).start()

    def _run(self, url: str, directory: Path, day: date) -> None:
        started = time.monotonic()
        path = directory / f"events-{day.isoformat()}.json"
        try:
            sources.download(
                url,
                path,
                what=f"events of {day.isoformat()}",
                attempts=settings.events_api_attempts(),
                timeout=settings.events_api_timeout(),
                backoff=settings.events_api_backoff(),
                cancellation=self.cancellation,
            )
            self._result = _Download(path, time.monotonic() - started)
        except BaseException as error:  # handed to the main thread by result()
            self._error = error
        finally:
            self._done.set()

    def result(self) -> _Download:
        self._done.wait()  # a signal handler's exception interrupts this wait
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


# --- one date: stage, check, write --------------------------------------------------------------


@dataclass(frozen=True)
class _Staged:
    """The temp table `staged`, validated, and what the write needs to know about it."""

    event_date: date
    url: str
    rows: int
    checksum: str
    changed: bool
    out_of_window: int
    duplicates: int
    started: float


def _check_not_stored_elsewhere(
    connection: duckdb.DuckDBPyConnection, event_date: date, source: _Source, end: date
) -> None:
    """event_id is unique in raw.events: refuse ids that another date's partition holds.

    That happens when the source re-dates an event (our ids are stable, timestamps may be
    corrected). This process holds the writer lock, so nothing changes until the transaction.
    The remedy reloads the other date(s) first (which drops the event there), then resumes
    at this date: that works whether the event moved forwards or backwards.
    """
    found = raw.stored_elsewhere(connection, event_date, sources.STAGED)
    if found is None:
        return
    listed = ", ".join(f"{event_id} (stored under {day})" for event_id, day in found.examples)
    commands = [source.command(day, day + timedelta(days=1)) for day in found.stored_under]
    commands.append(source.command(event_date, end))
    raise sources.EventSourceError(
        f"{event_date}: the source ({source.url(event_date)}) now dates event(s) {listed} to "
        f"{event_date}, and an event_id is stored once; nothing was written for {event_date}. "
        "Reload the date(s) they are stored under first, then resume here: "
        f"`{' && '.join(commands)}`. (If the source still dates an event to both days, it "
        "holds two versions of it: fix the source.)"
    )


def _stage(
    connection: duckdb.DuckDBPyConnection,
    event_date: date,
    path: Path,
    source: _Source,
    end: date,
) -> _Staged:
    """Parse and validate the download into `staged`; nothing is written to raw.events."""
    started = time.monotonic()
    url = source.url(event_date)
    what = f"events of {event_date.isoformat()}"
    _, duplicates = sources.stage_events(
        connection, path, what=what, url=url, event_date=event_date
    )
    outside = raw.out_of_window(connection, event_date, sources.STAGED)
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
    _check_not_stored_elsewhere(connection, event_date, source, end)
    rows, checksum = raw.partition_checksum(connection, event_date, sources.STAGED)
    changed = raw.fingerprint(connection, event_date, sources.STAGED) != raw.fingerprint(
        connection, event_date, "raw.events"
    )
    return _Staged(event_date, url, rows, checksum, changed, out_of_window, duplicates, started)


def _write(connection: duckdb.DuckDBPyConnection, staged: _Staged, run_id: str) -> LoadResult:
    """Replace the partition (if changed) and write its ledger row in ONE transaction."""
    event_date = staged.event_date
    entry = raw.LoadLogEntry(
        load_id=f"{run_id}/{event_date.isoformat()}/{uuid.uuid4().hex[:12]}",
        run_id=run_id,
        event_date=event_date,
        rows=staged.rows,
        checksum=staged.checksum,
        changed=staged.changed,
        out_of_window=staged.out_of_window,
        duplicates=staged.duplicates,
        source_url=staged.url,
        loaded_at=datetime.now(UTC).replace(tzinfo=None),
    )
    log.debug("%s: replacing the partition (%d rows) in one transaction", event_date, staged.rows)
    raw.replace_partition(connection, entry, sources.STAGED)
    log.debug("%s: committed", event_date)
    return LoadResult(
        event_date=event_date,
        rows=staged.rows,
        checksum=staged.checksum,
        changed=staged.changed,
        out_of_window=staged.out_of_window,
        duplicates=staged.duplicates,
        load_id=entry.load_id,
        source_url=staged.url,
        seconds=time.monotonic() - staged.started,
    )


def _print_progress(
    result: LoadResult, index: int, total: int, progress: bool, download: float
) -> None:
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


def _span(first: date, last: date) -> str:
    return str(first) if first == last else f"{first} to {last}"


def _interrupted_message(signum: int, source: _Source, dates: list[date], loaded: int) -> str:
    name = signal.Signals(signum).name
    rest = dates[loaded:]
    if not rest:
        return f"load interrupted by {name} at its end: {_span(dates[0], dates[-1])} loaded"
    done = f"{_span(dates[0], dates[loaded - 1])} loaded, " if loaded else ""
    resume = source.command(rest[0], rest[-1] + timedelta(days=1))
    return (
        f"load interrupted by {name}: {done}{_span(rest[0], rest[-1])} unchanged; "
        f"`{resume}` finishes the job"
    )


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
    untouched, and a rerun is safe. `progress` prints a line per date to stderr. SIGTERM or
    SIGINT raises LoadInterrupted, whose message names what was loaded and how to finish.
    """
    end = end or start + timedelta(days=1)
    if end <= start:
        raise ValueError(f"end ({end}) must be after start ({start}); the range is [start, end)")
    source = _Source(api_url or settings.events_api_url(), warehouse_path)
    run_id = run_id or f"manual-{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    dates = [start + timedelta(days=i) for i in range((end - start).days)]
    results: list[LoadResult] = []
    interrupts = _Interrupts()
    try:
        with interrupts, _download_directory() as directory:
            _load_dates(dates, source, directory, run_id, progress, interrupts, results)
    except BaseException:
        if interrupts.received is None:
            raise
        message = _interrupted_message(interrupts.received, source, dates, len(results))
        raise LoadInterrupted(interrupts.received, message) from None
    return results


def _load_dates(
    dates: list[date],
    source: _Source,
    directory: Path,
    run_id: str,
    progress: bool,
    interrupts: _Interrupts,
    results: list[LoadResult],
) -> None:
    """Load `dates` in order, appending each committed date's result to `results`."""
    end = dates[-1] + timedelta(days=1)
    pending = _Prefetch(source, directory, dates[0])
    try:
        for index, day in enumerate(dates):
            download = pending.result()
            if index + 1 < len(dates):  # fetch the next date while this one is written
                pending = _Prefetch(source, directory, dates[index + 1])
            try:
                with warehouse.connect(source.warehouse_path) as connection:
                    raw.prepare_load(connection, settings.loader_memory_limit())
                    staged = _stage(connection, day, download.path, source, end)
                    with interrupts.deferred():
                        results.append(_write(connection, staged, run_id))
            finally:
                download.path.unlink(missing_ok=True)
            _print_progress(results[-1], index + 1, len(dates), progress, download.seconds)
    finally:
        pending.cancellation.cancel()  # the directory is removed next: no more writes into it
