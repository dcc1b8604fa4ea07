"""Load the raw events of a date, or of a range of dates, into raw.events: atomic and idempotent.

The range [start, end) is asked for in windows of at most 366 days (the events API's limit), one
request each. For every window W:
1. download GET /events?start_date=W.start&end_date=W.end to a temporary file, and check that
   the answer is complete (`sources.download`: status, framing, structure) as a whole,
2. parse and validate it with DuckDB (`sources.stage_events`) and split it by UTC date in one
   pass (`warehouse.raw.compare_staged`); events dated outside W are counted, never written,
3. in ONE transaction for the whole window: replace every date of W whose content changed
   (delete its rows, insert the new ones) and write one raw.load_log row per date. A date whose
   new content equals the stored partition (same fingerprint) keeps its rows and load_id; its
   ledger row says changed = false.
A failure (source, validation, SIGKILL) leaves every date of a window either all old or all new;
the windows before it stay loaded. While window W is being written, the next one is already
downloading (in a daemon thread).

Login: when credentials are given (or set in $EVENTS_API_USER/$EVENTS_API_PASSWORD), the load logs
in to the events API itself and fetches its windows with the token (sources.ApiLogin): the token
is obtained, renewed after an expiry, and dropped inside this one call, so it never reaches a
caller, a log line or raw.load_log. Wrong credentials fail the load before anything is written.

Why one transaction per window rather than per date: the answer is one delivery, checked whole
before anything is written, so its dates stand or fall together (a reader never sees half a
window), and one commit instead of one per date is what lets a year load in seconds. The price:
when a window fails after its download (a re-dated event, a crash during the write), none of its
dates is kept, where per-date transactions would have kept the dates before the failing one.

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
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from functools import partial
from pathlib import Path
from types import FrameType

import duckdb

from event_pipeline import settings, sources, warehouse
from event_pipeline.warehouse import commits, lake, raw
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
    # delivered events dated outside the request's window, counted on its first date (earlier
    # ones) and its last date (later ones): counted, not loaded
    out_of_window: int
    duplicates: int  # repeated event_ids of the date's events, stored once
    load_id: str  # unchanged dates: the ledger row's id; their rows keep an earlier load_id
    source_url: str  # the request that delivered the date (its window may span many dates)
    seconds: float  # staging and writing the date's window (shared by its dates)


@dataclass(frozen=True)
class _Window:
    """The dates [start, end) asked for in one request."""

    start: date
    end: date

    @property
    def dates(self) -> list[date]:
        return [self.start + timedelta(days=i) for i in range((self.end - self.start).days)]

    @property
    def last(self) -> date:
        return self.end - timedelta(days=1)

    def __str__(self) -> str:
        return _span(self.start, self.last)


def _windows(start: date, end: date, days: int) -> list[_Window]:
    """[start, end) cut into consecutive windows of at most `days` days."""
    starts = [start + timedelta(days=i) for i in range(0, (end - start).days, days)]
    return [_Window(first, min(first + timedelta(days=days), end)) for first in starts]


@dataclass(frozen=True)
class _Source:
    """Where one load reads and writes; it also spells the command that reloads a date range."""

    api_url: str
    warehouse_path: Path | None
    login: sources.ApiLogin | None = None  # the load's token, when the API requires a login

    def url(self, window: _Window) -> str:
        return sources.window_url(self.api_url, window.start, window.end)

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
    size: int
    seconds: float


class _Prefetch:
    """Downloads one window in a daemon thread: an interrupt never waits for a slow source."""

    def __init__(self, source: _Source, directory: Path, window: _Window) -> None:
        self.cancellation = sources.Cancellation()
        self._done = threading.Event()
        self._result: _Download | None = None
        self._error: BaseException | None = None
        self._login = source.login
        threading.Thread(
            target=self._run,
            args=(source.url(window), directory, window),
            name=f"download-{window.start}",
            daemon=True,
        ).start()

    def _run(self, url: str, directory: Path, window: _Window) -> None:
        started = time.monotonic()
        path = directory / f"events-{window.start.isoformat()}-{window.end.isoformat()}.json"
        try:
            delivery = sources.download(
                url,
                path,
                what=f"events of {window}",
                attempts=settings.events_api_attempts(),
                timeout=settings.events_api_timeout(),
                backoff=settings.events_api_backoff(),
                cancellation=self.cancellation,
                login=self._login,
            )
            self._result = _Download(path, delivery.size, time.monotonic() - started)
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


# --- one window: stage, check, write ------------------------------------------------------------


@dataclass(frozen=True)
class _Staged:
    """The temp table `staged` for one window, validated, and what the write needs to know."""

    window: _Window
    url: str
    dates: list[raw.StagedDate]
    outside: list[raw.OutsideDate]
    started: float

    def out_of_window(self, day: date) -> tuple[int, int]:
        """(events, duplicates) outside the window counted on `day`: those dated before the
        window on its first date, those after it on its last."""
        counted = [
            other
            for other in self.outside
            if (day == self.window.start and other.event_date < day)
            or (day == self.window.last and other.event_date > day)
        ]
        return sum(o.events for o in counted), sum(o.duplicates for o in counted)


def _check_not_stored_elsewhere(
    connection: duckdb.DuckDBPyConnection, window: _Window, source: _Source, end: date
) -> None:
    """event_id is unique in raw.events: refuse ids that a date outside the window holds.

    That happens when the source re-dates an event (our ids are stable, timestamps may be
    corrected). Inside the window the replace itself moves the event. The remedy is therefore
    one load whose window spans both the stored dates and this window: it works for events
    moved forwards, backwards, or swapped between dates (one at a time would refuse in turn).
    The check runs in the write's transaction (_compare_and_write).
    """
    found = raw.stored_elsewhere(connection, sources.STAGED, window.start, window.end)
    if found is None:
        return
    listed = ", ".join(
        f"{redated.event_id} (stored under {redated.stored_under}) to {redated.dated}"
        for redated in found.examples
    )
    first = min(window.start, *found.stored_under)
    after_last = max(end, *(day + timedelta(days=1) for day in found.stored_under))
    raise sources.EventSourceError(
        f"{window}: the source ({source.url(window)}) now dates event(s) {listed}, and an "
        f"event_id is stored once; nothing was written for {window}. "
        "Reload the dates they are stored under together with this window, in one load: "
        f"`{source.command(first, after_last)}`. (If the source still dates an event to both "
        "days, it holds two versions of it: fix the source.)"
    )


def _stage(
    connection: duckdb.DuckDBPyConnection,
    window: _Window,
    path: Path,
    source: _Source,
    end: date,
) -> _Staged:
    """Parse and validate the download into `staged`; nothing is written to raw.events."""
    started = time.monotonic()
    url = source.url(window)
    delivered, duplicates = sources.stage_events(
        connection, path, what=f"events of {window}", url=url, start=window.start, end=window.end
    )
    outside = raw.outside_window(connection, sources.STAGED, window.start, window.end)
    outside_events = sum(o.events for o in outside)
    if outside and delivered - duplicates == outside_events:
        # Events, none of them for the window: an answer to another request (a cache keyed
        # without the query string, a source ignoring start_date), not an empty window.
        raise sources.EventSourceError(
            f"The events API answered the events of {window} from {url} with {outside_events} "
            f"event(s), none of them dated in the window (they are of "
            f"{', '.join(str(o.event_date) for o in outside)}): "
            "that is an answer for other dates, not an empty window, so nothing was written. "
            "Check that the API (and any cache before it) honours start_date and end_date."
        )
    if outside:
        log.warning(
            "%s: the source sent %d event(s) dated outside %s, which were NOT loaded: %s (from %s)",
            window,
            outside_events,
            window,
            ", ".join(f"{o.event_date}: {o.events}" for o in outside),
            url,
        )
    if duplicates:
        log.warning("%s: %d repeated event_id(s) in the delivery, stored once", window, duplicates)
    return _Staged(window, url, [], outside, started)


def _compare_and_write(
    connection: duckdb.DuckDBPyConnection, staged: _Staged, source: _Source, end: date, run_id: str
) -> list[LoadResult]:
    """In ONE transaction: compare the stage with raw.events, then write (`_write`). On a
    DuckLake, when another process commits meanwhile, the COMMIT fails, nothing is written, and
    `commits.retry_on_conflict` runs this again, comparing with what that process committed."""
    window = staged.window
    with commits.transaction(connection):
        lake.label_commit(connection, "event-stats load", run_id, str(window))
        _check_not_stored_elsewhere(connection, window, source, end)
        dates = raw.compare_staged(connection, sources.STAGED, window.start, window.end)
        results = _write(connection, replace(staged, dates=dates), run_id)
    log.debug("%s: committed", window)
    return results


def _write(connection: duckdb.DuckDBPyConnection, staged: _Staged, run_id: str) -> list[LoadResult]:
    """Replace the window's changed partitions and write its ledger rows (in the caller's
    transaction)."""
    loaded_at = datetime.now(UTC).replace(tzinfo=None)
    entries = []
    for day in staged.dates:
        out_of_window, outside_duplicates = staged.out_of_window(day.event_date)
        entries.append(
            raw.LoadLogEntry(
                load_id=f"{run_id}/{day.event_date.isoformat()}/{uuid.uuid4().hex[:12]}",
                run_id=run_id,
                event_date=day.event_date,
                rows=day.rows,
                checksum=day.checksum,
                changed=day.changed,
                out_of_window=out_of_window,
                duplicates=day.duplicates + outside_duplicates,
                source_url=staged.url,
                loaded_at=loaded_at,
            )
        )
    changed = [day for day in staged.dates if day.changed]
    log.debug(
        "%s: replacing the partitions of %d changed date(s) (%d rows) in one transaction",
        staged.window,
        len(changed),
        sum(day.rows for day in changed),
    )
    raw.replace_partitions(connection, entries, sources.STAGED)
    seconds = time.monotonic() - staged.started
    return [
        LoadResult(
            event_date=entry.event_date,
            rows=entry.rows,
            checksum=entry.checksum,
            changed=entry.changed,
            out_of_window=entry.out_of_window,
            duplicates=entry.duplicates,
            load_id=entry.load_id,
            source_url=entry.source_url,
            seconds=seconds,
        )
        for entry in entries
    ]


# --- the range ------------------------------------------------------------------------------------


def _print_progress(
    results: list[LoadResult], done: int, total: int, progress: bool, download: _Download
) -> None:
    """A line per date of the window just loaded; for a window of several dates, then a line
    for its request (a one-date window's line carries the timings itself)."""
    timings = f"(download {download.seconds:.1f} s, load {results[0].seconds:.1f} s)"
    first = done - len(results) + 1
    lines = []
    for index, result in enumerate(results, start=first):
        state = "replaced" if result.changed else "unchanged"
        lines.append(
            f"[{index}/{total}] {result.event_date}  {result.rows:>9,} rows  {state:<9}"
            f"  out-of-window {result.out_of_window}  duplicates {result.duplicates}"
        )
    if len(results) == 1:
        lines[0] += f"  {timings}"
    else:
        replaced = sum(result.changed for result in results)
        lines.append(
            f"[{first}-{done}/{total}] {results[0].event_date} to {results[-1].event_date} in one "
            f"request: {sum(result.rows for result in results):,} rows, {replaced} replaced, "
            f"{len(results) - replaced} unchanged, {download.size / 1e6:.1f} MB {timings}"
        )
    for line in lines:
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


def _credentials_from_environment() -> sources.Credentials | None:
    user, password = settings.events_api_user(), settings.events_api_password()
    if user is None and password is None:
        return None
    if user is None or password is None:
        missing = "EVENTS_API_PASSWORD" if user else "EVENTS_API_USER"
        raise ValueError(
            f"{missing} is not set, but its partner is: set both to log in to the events API, "
            "or neither to load without a login"
        )
    return sources.Credentials(user, password)


def load_range(
    start: date,
    end: date | None = None,
    *,
    api_url: str | None = None,
    warehouse_path: Path | None = None,
    run_id: str | None = None,
    progress: bool = False,
    days_per_request: int = sources.MAX_WINDOW_DAYS,
    credentials: sources.Credentials | None = None,
) -> list[LoadResult]:
    """Load the events of every date in [start, end) (default: just `start`) into raw.events.

    The range is asked for in requests of at most `days_per_request` days (366, the events
    API's limit, at most); each request's dates are replaced in one transaction together with
    their raw.load_log rows (one per date). On an error the windows before it stay loaded (each
    complete), the failing window and later ones are untouched, and a rerun is safe. `progress`
    prints a line per date and one per request to stderr. SIGTERM or SIGINT raises
    LoadInterrupted, whose message names what was loaded and how to finish.
    `credentials` (default: $EVENTS_API_USER and $EVENTS_API_PASSWORD, when set) make the load
    log in to the events API first (module docstring); refused ones raise sources.LoginRefused.
    """
    end = end or start + timedelta(days=1)
    if end <= start:
        raise ValueError(f"end ({end}) must be after start ({start}); the range is [start, end)")
    if not 1 <= days_per_request <= sources.MAX_WINDOW_DAYS:
        raise ValueError(f"days_per_request must be 1 to {sources.MAX_WINDOW_DAYS}")
    api_url = api_url or settings.events_api_url()
    credentials = credentials or _credentials_from_environment()
    login = None
    if credentials is not None:
        login = sources.ApiLogin(api_url, credentials, settings.events_api_timeout())
    source = _Source(api_url, warehouse_path, login)
    run_id = run_id or f"manual-{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    windows = _windows(start, end, days_per_request)
    results: list[LoadResult] = []
    interrupts = _Interrupts()
    try:
        with interrupts, _download_directory() as directory:
            _load_windows(windows, source, directory, run_id, progress, interrupts, results)
    except BaseException:
        if interrupts.received is None:
            raise
        dates = [day for window in windows for day in window.dates]
        message = _interrupted_message(interrupts.received, source, dates, len(results))
        raise LoadInterrupted(interrupts.received, message) from None
    return results


def _load_windows(
    windows: list[_Window],
    source: _Source,
    directory: Path,
    run_id: str,
    progress: bool,
    interrupts: _Interrupts,
    results: list[LoadResult],
) -> None:
    """Load `windows` in order, appending each committed window's results to `results`."""
    end = windows[-1].end
    total = (end - windows[0].start).days
    pending = _Prefetch(source, directory, windows[0])
    try:
        for index, window in enumerate(windows):
            download = pending.result()
            if index + 1 < len(windows):  # fetch the next window while this one is written
                pending = _Prefetch(source, directory, windows[index + 1])
            try:
                with warehouse.connect(source.warehouse_path) as connection:
                    commits.retry_on_conflict(
                        lambda: raw.prepare_load(connection, settings.loader_memory_limit()),
                        what="Creating the raw tables",
                    )
                    staged = _stage(connection, window, download.path, source, end)
                    with interrupts.deferred():
                        loaded = commits.retry_on_conflict(
                            partial(_compare_and_write, connection, staged, source, end, run_id),
                            what=f"The load of {window}",
                        )
                        results.extend(loaded)
            finally:
                download.path.unlink(missing_ok=True)
            _print_progress(loaded, len(results), total, progress, download)
    finally:
        pending.cancellation.cancel()  # the directory is removed next: no more writes into it
