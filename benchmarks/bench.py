"""Benchmark of event-stats' speed and memory goals: prints measurements and ratios, PASS/FAIL.

Not a test and not part of `make test`: run `make bench` or
`uv run python benchmarks/bench.py [--quick] [--events N] [--days N] [--per-day N] [--scale F]`.
Everything is real: the events API runs as a subprocess on a free localhost port (stopped by its
PID), the warehouses are DuckDB files in a temp dir, `event-stats load` runs as a subprocess and
dbt runs in this process (event_pipeline.dbt_config.run_dbt). The exit code is 1 when a goal fails
(in --quick mode the sizes are too small for the goals: they are shown but never fail the run).
"""

from __future__ import annotations

import argparse
import json
import operator
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, timedelta
from importlib import metadata
from pathlib import Path
from typing import Any

import duckdb
import psutil

from event_pipeline import sources, warehouse
from event_pipeline.dbt_config import date_vars, run_dbt
from event_pipeline.events import process as events_process
from event_pipeline.loader import load_range
from event_pipeline.warehouse import counts
from event_pipeline.warehouse import status as ledger_reads

DAY = date(2026, 1, 1)  # the date of the big day; the dbt data set starts here too
MB = 1024 * 1024
GOAL_DATASET = (30, 100_000)  # days x events per day that --scale 1 means
_OPERATORS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">=": operator.ge,
}
API_GOAL = 500_000  # events/s the events API streams a big day at, at least


# --- results --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measure:
    """One printed line: a value, what it compares, and optionally its goal ("< 2", "<= 1.2")."""

    name: str
    value: float
    unit: str
    note: str = ""
    goal: str | None = None

    def passed(self) -> bool | None:
        if self.goal is None:
            return None
        symbol, limit = self.goal.split()
        return _OPERATORS[symbol](self.value, float(limit))

    def shown_value(self) -> str:
        return f"{self.value:,.0f}" if abs(self.value) >= 1000 else f"{self.value:.3g}"

    def line(self) -> str:
        """`name: value unit (note; goal ...)`"""
        details = [self.note] if self.note else []
        if self.goal:
            details.append(f"goal {self.goal}")
        text = f"{self.name}: {self.shown_value()} {self.unit}"
        return f"{text} ({'; '.join(details)})" if details else text


def ratio(
    name: str, numerator: float, denominator: float, note: str, goal: str | None = None
) -> Measure:
    """A Measure of numerator / denominator; `note` names the two, e.g. 'load vs download'."""
    value = numerator / denominator if denominator else float("inf")
    return Measure(name, value, "x", note, goal)


class Report:
    """Collects measures and prints each as it comes."""

    def __init__(self) -> None:
        self.measures: list[Measure] = []

    def add(self, *measures: Measure) -> None:
        for measure in measures:
            self.measures.append(measure)
            print(measure.line(), flush=True)

    def info(self, name: str, text: str) -> None:
        """A line without a value (not in the final table)."""
        print(f"{name}: {text}", flush=True)

    def table(self) -> str:
        rows = [("measure", "value", "unit", "goal", "verdict")]
        for m in self.measures:
            verdict = {None: "", True: "PASS", False: "FAIL"}[m.passed()]
            rows.append((m.name, m.shown_value(), m.unit, m.goal or "", verdict))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        return "\n".join(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            for row in rows
        )

    def failed(self) -> list[Measure]:
        return [m for m in self.measures if m.passed() is False]


# --- processes and memory -------------------------------------------------------------------


def _tail(log: Path, lines: int = 20) -> str:
    """The end of a subprocess's log, for an error message (the temp dir goes away)."""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


@contextmanager
def events_api(events_per_day: int, log_dir: Path) -> Iterator[tuple[str, int]]:
    """The real events API in generated mode on a free localhost port: yields (url, pid)."""
    options = {"events_per_day": events_per_day}
    with events_process.running(options=options, log_file=log_dir / "events-api.log") as server:
        yield server.url, server.process.pid


class PeakRss:
    """Samples a process's resident memory every `interval` seconds while in the `with` block."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def run_measured(argv: list[str], env: dict[str, str], log: Path) -> tuple[float, int]:
    """Run a command to completion: (wall seconds, its peak RSS in bytes from the kernel)."""
    started = time.monotonic()
    with log.open("ab") as output:
        process = subprocess.Popen(argv, env={**os.environ, **env}, stdout=output, stderr=output)
    # wait4 gives this child's own ru_maxrss (exact, unlike sampling); keep Popen informed.
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.monotonic() - started
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({process.returncode}):\n{_tail(log)}")
    return seconds, usage.ru_maxrss * 1024  # KiB on Linux


def timed(function: Callable[[], Any]) -> tuple[float, Any]:
    started = time.monotonic()
    value = function()
    return time.monotonic() - started, value


# --- the measurements -----------------------------------------------------------------------


def day_url(api_url: str, day: date) -> str:
    return sources.window_url(api_url, day, day + timedelta(days=1))


@contextmanager
def static_server(directory: Path, log_dir: Path) -> Iterator[str]:
    """Python's own static file server over `directory` on a free port: yields its URL."""
    port = events_process.free_port()
    argv = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)]
    with (log_dir / "static-server.log").open("ab") as log:
        server = subprocess.Popen(
            [*argv, "--directory", str(directory)], stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 30
        while events_process.port_is_free(port):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the static file server did not start:\n{_tail(log_dir / 'static-server.log')}"
                )
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        events_process.stop(server)


def _download(url: str, destination: Path) -> float:
    """Seconds to stream `url` into `destination` as the loader does (sources.download)."""
    seconds, _ = timed(
        lambda: sources.download(
            url, destination, what="benchmark day", attempts=1, timeout=120, backoff=0
        )
    )
    return seconds


def bench_api(report: Report, url: str, pid: int, body: Path, events: int, runs: int) -> float:
    """1. Stream a day as NDJSON into `body`, in turn with a plain download of the same bytes
    (a static file server); the server's peak vs idle RSS. Returns the API's median seconds."""
    idle = psutil.Process(pid).memory_info().rss
    copy = body.with_name("plain-copy.ndjson")
    api_seconds, plain_seconds = [], []
    with PeakRss(pid) as server:
        api_seconds.append(_download(day_url(url, DAY), body))
    with static_server(body.parent, body.parent) as static_url:
        for run in range(runs):
            if run:
                api_seconds.append(_download(day_url(url, DAY), body))
            plain_seconds.append(_download(f"{static_url}/{body.name}", copy))
    if copy.read_bytes() != body.read_bytes():
        raise RuntimeError("the static server's copy of the day differs from the API's answer")
    copy.unlink()
    size = body.stat().st_size
    api, plain = statistics.median(api_seconds), statistics.median(plain_seconds)
    report.add(
        Measure(
            "api: stream one day",
            api,
            "s",
            f"{events:,} events, {size / MB:.0f} MB NDJSON, median of {runs}",
        ),
        Measure(
            "api: plain download of the same bytes",
            plain,
            "s",
            f"static file server, in turn with the API, median of {runs}",
        ),
        ratio("api: stream/plain download time", api, plain, f"{api:.2f} s vs {plain:.2f} s"),
        Measure(
            "api: throughput",
            events / api,
            "events/s",
            f"the plain download: {events / plain:,.0f} events/s",
            f">= {API_GOAL}",
        ),
        ratio(
            "api: server peak/idle RSS",
            server.peak,
            idle,
            f"{server.peak / MB:.0f} MB vs {idle / MB:.0f} MB",
            "< 2",
        ),
    )
    return api


def bench_loader(
    report: Report, url: str, body_size: int, download: float, events: int, tmp: Path
) -> None:
    """2 and 3. `event-stats load` of the day into a fresh warehouse, then an unchanged reload."""
    argv = [sys.executable, "-m", "event_pipeline.cli", "load", "--start", DAY.isoformat()]
    env = {"WAREHOUSE_PATH": str(tmp / "load.duckdb"), "EVENTS_API_URL": url}
    first, first_peak = run_measured(argv, env, tmp / "load.log")
    again, again_peak = run_measured(argv, env, tmp / "load.log")
    with warehouse.connect(tmp / "load.duckdb", read_only=True) as connection:
        rows = sum(counts.raw_rows_by_date(connection).values())
        [load] = ledger_reads.read_ledgers(connection, DAY, DAY + timedelta(days=1)).loads
    # the ledger: two loads of the day; the first changed raw.events, the second did not
    changed_at = load.changed_at
    reloaded_unchanged = load.loads == 2 and changed_at is not None and changed_at < load.loaded_at
    if rows != events or not reloaded_unchanged:
        raise RuntimeError(f"unexpected load: {rows} rows, {load}")
    report.add(
        Measure("load: first load of the day", first, "s", f"{rows:,} rows, subprocess"),
        ratio(
            "load: load/download time", first, download, f"{first:.1f} s vs {download:.1f} s", "< 4"
        ),
        ratio(
            "load: peak RSS/body size",
            first_peak,
            body_size,
            f"{first_peak / MB:.0f} MB vs {body_size / MB:.0f} MB",
            "< 6",
        ),
        Measure("load: throughput", events / first, "events/s"),
        ratio(
            "reload: unchanged/first load time",
            again,
            first,
            f"{again:.1f} s vs {first:.1f} s; peak RSS {again_peak / MB:.0f} MB",
            "<= 1.2",
        ),
    )


def bench_parsers(report: Report, body: Path) -> None:
    """5. Informative: DuckDB read_json vs Python json.loads over the downloaded NDJSON."""

    def with_duckdb() -> int:
        with duckdb.connect() as connection:  # in memory: not the warehouse
            sql = "select count(*) from read_json(?, format = 'newline_delimited')"
            return connection.execute(sql, [str(body)]).fetchall()[0][0]

    def with_json() -> int:
        with body.open("rb") as file:
            return sum(1 for line in file if json.loads(line))

    duck, duck_rows = timed(with_duckdb)
    python, python_rows = timed(with_json)
    if duck_rows != python_rows:
        raise RuntimeError(f"read_json counted {duck_rows} records, json.loads {python_rows}")
    report.add(
        ratio("parse: json.loads/read_json time", python, duck, f"{python:.1f} s vs {duck:.2f} s")
    )


@dataclass(frozen=True)
class DbtRuns:
    """Timings of the same dbt command run several times (the first one parses the project)."""

    seconds: list[float]  # wall time of each in-process run
    model_seconds: list[float]  # dbt's own execution time of the event_stats model in each
    slowest: str  # the slowest nodes of the last run, e.g. "unique_x 0.41 s, ..."

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def best_model(self) -> float:
        return min(self.model_seconds)


def dbt_builds(
    warehouse_path: Path, target: Path, *args: str, dbt_vars: dict | None = None, runs: int = 3
) -> DbtRuns:
    """`dbt build` `runs` times; each command has its own target dir, so later runs reuse the
    parsed project (dbt re-parses whenever the vars change). Best-of-N evens out noise."""
    command = ["build", *args, "--quiet", "--target-path", str(target), "--log-path", str(target)]
    seconds, model_seconds = [], []
    for _ in range(runs):
        wall, result = timed(
            lambda: run_dbt(command, dbt_vars=dbt_vars, warehouse_path=warehouse_path)
        )
        seconds.append(wall)
        nodes = {r.node.name: r.execution_time for r in result.result.results}
        model_seconds.append(nodes["event_stats"])
    slowest = sorted(nodes.items(), key=lambda item: item[1], reverse=True)[:3]
    return DbtRuns(seconds, model_seconds, ", ".join(f"{n} {s:.2f} s" for n, s in slowest))


def _stats_rows(path: Path) -> dict[date, int]:
    with warehouse.connect(path, read_only=True) as connection:
        return counts.stats_rows_by_date(connection)


def bench_dbt(report: Report, url: str, days: int, tmp: Path) -> None:
    """4. dbt over `days` loaded days: a one-date incremental build vs a full refresh."""
    path = tmp / "dbt.duckdb"
    load_seconds, results = timed(
        lambda: load_range(DAY, DAY + timedelta(days=days), api_url=url, warehouse_path=path)
    )
    raw_rows = sum(result.rows for result in results)
    report.add(Measure("dbt data: load of all days", load_seconds, "s", f"{raw_rows:,} raw rows"))

    one_date = date_vars(DAY + timedelta(days=days // 2))
    full = dbt_builds(path, tmp / "target-full", "--full-refresh")
    total_rows = sum(_stats_rows(path).values())
    single = dbt_builds(path, tmp / "target-one", dbt_vars=one_date)
    after = _stats_rows(path)
    replaced = after.get(date.fromisoformat(one_date["start_date"]), 0)
    if sum(after.values()) != total_rows:
        raise RuntimeError("the one-date build changed the number of stats rows of other dates")
    report.add(
        Measure("dbt: full refresh (build)", full.best, "s", f"{total_rows:,} stats rows"),
        Measure(
            "dbt: one-date build",
            single.best,
            "s",
            f"{replaced:,} stats rows replaced; first run (parse) {single.seconds[0]:.1f} s",
        ),
        ratio(
            "dbt: one-date/full-refresh build time",
            single.best,
            full.best,
            f"best of {len(full.seconds)}: {single.best:.1f} s vs {full.best:.1f} s",
            "<= 1.2",
        ),
        ratio(
            "dbt: one-date/full-refresh model time",
            single.best_model,
            full.best_model,
            f"event_stats alone: {single.best_model:.2f} s vs {full.best_model:.2f} s",
        ),
    )
    report.info("dbt: slowest nodes of the one-date build", single.slowest)


# --- command line ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, help="events of the big day (default 1,000,000)")
    parser.add_argument("--days", type=int, help="days loaded for the dbt part (default 30)")
    parser.add_argument(
        "--per-day", type=int, help="events per day for dbt (default: 100k x scale)"
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="dbt data set: 30 days x (100k x F) events a day (default 1; not with --quick)",
    )
    parser.add_argument(
        "--api-runs", type=int, default=3, help="API and plain downloads of the day, in turn"
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes (50k events; 3 days x 5k): a smoke check"
    )
    args = parser.parse_args(argv)
    quick = {"events": 50_000, "days": 3, "per_day": 5_000}
    normal = {
        "events": 1_000_000,
        "days": GOAL_DATASET[0],
        "per_day": round(GOAL_DATASET[1] * args.scale),
    }
    for name, default in (quick if args.quick else normal).items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    return args


def print_header(args: argparse.Namespace) -> None:
    versions = ", ".join(
        f"{name} {metadata.version(name)}" for name in ("duckdb", "dbt-core", "dbt-duckdb")
    )
    memory = psutil.virtual_memory().total / 1024**3
    print(f"machine: {os.cpu_count()} cores, {memory:.1f} GB memory, {platform.platform()}")
    print(f"versions: Python {platform.python_version()}, {versions}")
    print(
        f"parameters: --events {args.events:,} --days {args.days} --per-day {args.per_day:,}"
        f" (dbt data set {args.days * args.per_day:,} events){' --quick' if args.quick else ''}"
    )
    print(flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print_header(args)
    report = Report()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="event-stats-bench-") as directory:
        tmp = Path(directory)
        body = tmp / "day.ndjson"
        with events_api(args.events, tmp) as (url, pid):
            download = bench_api(report, url, pid, body, args.events, args.api_runs)
            bench_loader(report, url, body.stat().st_size, download, args.events, tmp)
        bench_parsers(report, body)
        body.unlink()
        with events_api(args.per_day, tmp) as (url, _):
            bench_dbt(report, url, args.days, tmp)
    print(f"\n{report.table()}\n\ntotal: {time.monotonic() - started:.0f} s")
    failed = report.failed()
    if failed and args.quick:
        print("--quick: sizes too small for the goals; FAIL above does not fail the run")
        return 0
    print(f"{len(failed)} goal(s) failed" if failed else "all goals met")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
