"""Benchmark of whole commands, side by side: ratios for docs/PERFORMANCE.md.

Not a test: run `make bench` or
`uv run python benchmarks/runs.py [--quick] [--repeat N] [--output FILE]`.

Each figure is a ratio of two commands run in turn (A B A B ...) as real subprocesses, the median
of the pairs' ratios, with min and max: a ratio of commands run moments apart holds on a slower or
faster (or busier) machine. Measured:
- a year (365 days) as ONE DAG run (`event-stats backfill`) vs one day's DAG run (`event-stats
  run`), each on a fresh warehouse, through Airflow (dag.test) with the embedded events API;
- that day's dbt step (first dbt task's start to last one's end, from Airflow's metadata
  database) and the whole DAG run vs the in-process floor: dbtRunner on an already loaded
  manifest building the same models and data tests on the same warehouse, right after the run;
- `event-stats airflow dags list` vs the plain `airflow dags list` on the same configuration, once
  set up;
- the seed's pandas path (read_json -> groupby(['date', 'user']).size() -> CSV) vs
  `event-stats load` of the same day, as a reference (downloaded once; pandas reads the file).
It also runs benchmarks/bench.py (the events API, loader and dbt goals) and writes both into
docs/PERFORMANCE.md (--output).
--quick: 3 days instead of a year, one pair each, small days: a smoke check of the machinery.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from importlib import metadata
from pathlib import Path

import httpx

from event_pipeline import settings, sources
from event_pipeline.events import process as events_process

REPO = settings.REPO_ROOT
BIN = Path(sys.executable).parent
DAY = date(2025, 1, 1)
PANDAS_PATH = """
import sys, pandas
events = pandas.read_json(sys.argv[1], lines=True)
events["date"] = pandas.to_datetime(events["timestamp"], utc=True).dt.date
events.groupby(["date", "user"]).size().to_csv(sys.argv[2])
"""

# The in-process floor of a day's dbt step: the models of the DAG's dbt task group and their data
# tests (what its tasks build, dbt_config.daily_build_flags included) in one dbtRunner call on a
# manifest parsed beforehand. Prints the build's seconds.
DBT_FLOOR = """
import sys, time
from dbt.cli.main import dbtRunner
from event_pipeline import dbt_config, settings
args = ["--project-dir", str(settings.dbt_project_dir()), "--quiet", "--target-path", sys.argv[1],
        "--profiles-dir", str(settings.dbt_profiles_dir()), "--log-path", sys.argv[1],
        "--vars", sys.argv[2]]
parsed = dbtRunner().invoke(["parse", *args])
assert parsed.success, parsed.exception
models = ["stg_events__events", "int_event_stats__audit", "event_stats"]
started = time.monotonic()
built = dbtRunner(manifest=parsed.result).invoke(
    ["build", "--select", *models, *dbt_config.daily_build_flags(), *args])
seconds = time.monotonic() - started
assert built.success, built.exception or built.result
print(seconds)
"""


@dataclass(frozen=True)
class Pair:
    """Figure A/B over several pairs of runs: medians of A, B and of the pairs' ratios."""

    name: str
    a: str
    b: str
    a_seconds: list[float]
    b_seconds: list[float]
    goal: str = ""

    @property
    def ratios(self) -> list[float]:
        return [a / b for a, b in zip(self.a_seconds, self.b_seconds, strict=True)]

    def row(self) -> str:
        ratios = self.ratios
        spread = f"{min(ratios):.2f}-{max(ratios):.2f}"
        return (
            f"| {self.name} | **{statistics.median(ratios):.2f}x** ({spread}, {len(ratios)} pairs) "
            f"| {self.a}: {statistics.median(self.a_seconds):.1f} s | {self.b}: "
            f"{statistics.median(self.b_seconds):.1f} s | {self.goal} |"
        )


def timed(argv: list[str], env: dict[str, str], log: Path) -> float:
    """Run a command to completion; its wall seconds. Fails with its log's end on an error."""
    started = time.monotonic()
    with log.open("ab") as output:
        done = subprocess.run(argv, env=env, stdout=output, stderr=output, check=False)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}):\n{tail}")
    return seconds


def pairs(
    repeat: int, a: Callable[[int], float], b: Callable[[int], float]
) -> tuple[list[float], list[float]]:
    """A then B, `repeat` times (each call gets the pair's number)."""
    a_seconds, b_seconds = [], []
    for number in range(repeat):
        a_seconds.append(a(number))
        b_seconds.append(b(number))
    return a_seconds, b_seconds


def last_run_spans(airflow_home: Path) -> tuple[float, float]:
    """(dbt step, whole DAG run) seconds of the newest DAG run in Airflow's metadata database:
    the first dbt task's start to the last one's end, and the run's start to its end."""
    with sqlite3.connect(airflow_home / "airflow.db") as db:
        [(run_id, run_start, run_end)] = db.execute(
            "select run_id, start_date, end_date from dag_run order by start_date desc limit 1"
        ).fetchall()
        [(dbt_start, dbt_end)] = db.execute(
            "select min(start_date), max(end_date) from task_instance "
            "where run_id = ? and task_id like 'dbt.%'",
            [run_id],
        ).fetchall()

    def span(start: str, end: str) -> float:
        return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()

    return span(dbt_start, dbt_end), span(run_start, run_end)


def dbt_floor(folder: Path, env: dict[str, str], log: Path) -> float:
    """DBT_FLOOR on the day a run left in `folder` (a rebuild: the same tables again)."""
    dbt_vars = {"start_date": str(DAY), "audit_key": "bench-floor"}
    argv = [sys.executable, "-c", DBT_FLOOR, str(folder / "dbt-floor"), json.dumps(dbt_vars)]
    settings_env = {**env, "WAREHOUSE_PATH": str(folder / "warehouse.duckdb")}
    with log.open("ab") as errors:
        done = subprocess.run(
            argv, env=settings_env, stdout=subprocess.PIPE, stderr=errors, text=True, check=True
        )
    return float(done.stdout.split()[-1])


def bench_range_run(tmp: Path, env: dict[str, str], repeat: int, days: int) -> list[Pair]:
    """`event-stats backfill` of `days` dates vs `event-stats run` of one, fresh warehouses; that
    day's dbt step and DAG run vs the in-process dbt floor, measured right after it."""
    port = events_process.free_port()
    end = DAY + timedelta(days=days)
    dbt_steps, dag_runs, floors = [], [], []

    def command(name: str, *args: str) -> Callable[[int], float]:
        def run(number: int) -> float:
            folder = tmp / f"{name}-{number}"
            settings_env = {
                **env,
                "WAREHOUSE_PATH": str(folder / "warehouse.duckdb"),
                "EMAIL_OUTBOX_DIR": str(folder / "outbox"),
            }
            argv = [str(BIN / "event-stats"), name, *args, "--port", str(port)]
            seconds = timed(argv, settings_env, tmp / f"{name}.log")
            if name == "run":
                dbt_step, dag_run = last_run_spans(Path(env["AIRFLOW_HOME"]))
                dbt_steps.append(dbt_step)
                dag_runs.append(dag_run)
                floors.append(dbt_floor(folder, env, tmp / "dbt-floor.log"))
            shutil.rmtree(folder)
            return seconds

        return run

    backfill = command("backfill", "--start", str(DAY), "--end", str(end))
    one_day = command("run", "--start", str(DAY), "--end", str(DAY + timedelta(days=1)))
    a_seconds, b_seconds = pairs(repeat, backfill, one_day)
    floor = "in-process floor (dbtRunner, loaded manifest, same models and data tests)"
    return [
        Pair(
            f"{days} days as one DAG run / one day's DAG run",
            f"`event-stats backfill` ({days} days)",
            "`event-stats run` (1 day)",
            a_seconds,
            b_seconds,
            "<= 3" if days >= 365 else "",
        ),
        Pair(
            "one day's dbt step in the DAG / in-process dbt floor",
            "dbt task group (first start to last end)",
            floor,
            dbt_steps,
            floors,
            "<= 5",
        ),
        Pair(
            "one day's DAG run / in-process dbt floor",
            "DAG run (start to end, in `event-stats run`)",
            floor,
            dag_runs,
            floors,
        ),
    ]


def bench_wrapper(tmp: Path, env: dict[str, str], repeat: int) -> Pair:
    """`event-stats airflow dags list` vs `airflow dags list`, once Airflow is set up."""
    airflow_env = {**env, **settings.airflow_env()}
    log = tmp / "airflow.log"
    timed([str(BIN / "event-stats"), "airflow", "pools", "list"], env, log)  # the setup, once
    wrapper = [str(BIN / "event-stats"), "airflow", "dags", "list"]
    plain = [str(BIN / "airflow"), "dags", "list"]
    a_seconds, b_seconds = pairs(
        repeat, lambda _: timed(wrapper, env, log), lambda _: timed(plain, airflow_env, log)
    )
    return Pair(
        "`event-stats airflow dags list` / `airflow dags list`",
        "wrapper",
        "plain",
        a_seconds,
        b_seconds,
        "<= 1.2",
    )


def bench_pandas(tmp: Path, env: dict[str, str], repeat: int, events: int) -> Pair:
    """The seed's pandas path over a downloaded day vs `event-stats load` of that day."""
    log = tmp / "pandas.log"
    options = {"events_per_day": events}
    with events_process.running(options=options, log_file=tmp / "events-api.log") as server:
        body = tmp / "day.ndjson"
        url = sources.window_url(server.url, DAY, DAY + timedelta(days=1))
        with httpx.stream("GET", url, headers={"Accept": "application/x-ndjson"}) as answer:
            with body.open("wb") as out:
                for chunk in answer.iter_bytes():
                    out.write(chunk)

        def load(number: int) -> float:
            warehouse_path = tmp / f"load-{number}.duckdb"
            argv = [str(BIN / "event-stats"), "load", "--start", str(DAY)]
            argv += ["--api-url", server.url, "--warehouse", str(warehouse_path)]
            seconds = timed(argv, env, log)
            warehouse_path.unlink()
            return seconds

        python = pandas_python(tmp, log)

        def with_pandas(_: int) -> float:
            argv = [python, "-c", PANDAS_PATH, str(body), str(tmp / "stats.csv")]
            return timed(argv, env, log)

        a_seconds, b_seconds = pairs(repeat, with_pandas, load)
    return Pair(
        f"seed's pandas path / `event-stats load`, one day of {events:,} events",
        "pandas (read_json, groupby, CSV; file already downloaded)",
        "`event-stats load` (download, parse, one transaction)",
        a_seconds,
        b_seconds,
    )


def locked_pandas() -> str:
    """The version of pandas in uv.lock (the `bench` dependency group)."""
    with (REPO / "uv.lock").open("rb") as lock:
        packages = tomllib.load(lock)["package"]
    [version] = [p["version"] for p in packages if p["name"] == "pandas"]
    return version


def pandas_python(tmp: Path, log: Path) -> str:
    """A Python with the locked pandas in a venv of its own (uv, from the registry or uv's cache):
    installed in the project's venv, pandas would be imported by duckdb in every pipeline process
    and slow it."""
    uv = shutil.which("uv") or "uv"
    venv = tmp / "pandas-venv"
    timed([uv, "venv", "--quiet", "--python", sys.executable, str(venv)], dict(os.environ), log)
    python = str(venv / "bin" / "python")
    install = [uv, "pip", "install", "--quiet", "--python", python, f"pandas=={locked_pandas()}"]
    timed(install, dict(os.environ), log)
    return python


def versions() -> str:
    names = ("apache-airflow", "astronomer-cosmos", "dbt-core", "dbt-duckdb", "duckdb")
    found = ", ".join(f"{name} {metadata.version(name)}" for name in names)
    return f"{found}, pandas {locked_pandas()} (in a venv of its own)"


def component_benchmark(quick: bool) -> str:
    """benchmarks/bench.py's output (the API, loader and dbt ratios), run now."""
    argv = [sys.executable, str(REPO / "benchmarks" / "bench.py"), *(["--quick"] if quick else [])]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    verdict = "" if done.returncode == 0 else f" (exit code {done.returncode}: a goal failed)"
    return f"{done.stdout.strip()}\n{done.stderr.strip()[-2000:]}".strip() + verdict


def write_report(
    output: Path, figures: list[Pair], components: str, args: argparse.Namespace
) -> str:
    load = os.getloadavg()[0]
    lines = [
        "# Performance",
        "",
        "Written by `make bench` (benchmarks/runs.py); do not edit by hand. Figures are ratios "
        "of things measured side by side in this one run, so they carry to another machine; the "
        "absolute seconds only give the scale on this one.",
        "",
        "## Whole commands, side by side",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} cores "
        f"({platform.machine()}, load average {load:.1f} at the end), Python "
        f"{platform.python_version()}, {versions()}"
        f"{'; --quick (smoke sizes)' if args.quick else ''}.",
        "Each ratio is the median of the ratios of pairs run in turn (min-max, pairs); the seconds "
        "are medians, for scale only.",
        "",
        "| figure | ratio A/B | A | B | goal |",
        "| --- | --- | --- | --- | --- |",
        *(figure.row() for figure in figures),
        "",
        "## The pieces: events API, loader, dbt (benchmarks/bench.py, same run)",
        "",
        "```",
        components,
        "```",
        "",
    ]
    text = "\n".join(lines)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke sizes: 3 days, one pair")
    parser.add_argument("--repeat", type=int, help="pairs per figure (default 3; --quick 1)")
    parser.add_argument(
        "--output",
        type=Path,
        default=REPO / "docs" / "PERFORMANCE.md",
        help="the Markdown file written (default docs/PERFORMANCE.md)",
    )
    args = parser.parse_args(argv)
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="event-stats-runs-") as directory:
        tmp = Path(directory)
        # A fresh Airflow home (its own SQLite database): the runs never mix with the user's.
        os.environ["AIRFLOW_HOME"] = str(tmp / "airflow-home")
        os.environ.pop("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", None)
        env = dict(os.environ)
        figures = []
        for measure in (
            lambda: [bench_wrapper(tmp, env, args.repeat)],
            lambda: bench_range_run(tmp, env, args.repeat, 3 if args.quick else 365),
            lambda: [bench_pandas(tmp, env, args.repeat, 20_000 if args.quick else 1_000_000)],
        ):
            for figure in measure():
                figures.append(figure)
                print(figure.row(), flush=True)
    components = component_benchmark(args.quick)
    print(write_report(args.output, figures, components, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
