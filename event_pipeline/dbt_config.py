"""How the pipeline runs dbt: the Cosmos configs of the DAG, and `run_dbt` for in-process runs.

The DAG renders its dbt task group from a manifest.json (`dbt_manifest`), made by `dbt parse` only
when the files of dbt_project/ changed, so parsing the DAG needs no Airflow metadata database.

Both give dbt the warehouse as an absolute path (`dbt_env`): profiles.yml reads WAREHOUSE_PATH,
and its relative default (data/warehouse.duckdb) would point elsewhere when Cosmos runs dbt from
a temporary copy of the project.

Cosmos is imported inside the functions that need it, so `run_dbt` costs no Airflow import.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import date
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from event_pipeline import settings
from event_pipeline.warehouse import commits, lake

if TYPE_CHECKING:
    from cosmos import ExecutionConfig, ProfileConfig, ProjectConfig, RenderConfig
    from dbt.cli.main import dbtRunnerResult

log = logging.getLogger(__name__)

PROFILE_NAME = "event_stats"
# dbt_manifest's cache, inside the project's (git-ignored) target/: <key>/manifest.json.
MANIFEST_CACHE = Path("target") / "cosmos-manifest"
MANIFESTS_KEPT = 3
# Not part of the project's content: dbt output and installed packages.
_NOT_HASHED = {"target", "logs", "dbt_packages"}


class DbtRunError(RuntimeError):
    """A dbt command failed; the message carries dbt's own error text."""


def dbt_env(warehouse_path: Path | None = None) -> dict[str, str]:
    """Environment variables every dbt run of this project needs, as absolute paths."""
    path = Path(warehouse_path) if warehouse_path else settings.warehouse_path()
    return {"WAREHOUSE_PATH": str(path.expanduser().resolve())}


def target_name(warehouse_path: Path | None = None) -> str:
    """The profiles.yml target of the warehouse's storage: `dev` (a DuckDB file) or `lake`
    (a DuckLake directory), as profiles.yml itself chooses from WAREHOUSE_PATH."""
    path = Path(warehouse_path) if warehouse_path else settings.warehouse_path()
    return "lake" if lake.is_lake(path) else "dev"


def dbt_executable() -> Path:
    """The dbt of the environment this package runs in (the project's venv), else dbt on PATH."""
    beside_python = Path(sys.executable).parent / "dbt"
    if beside_python.exists():
        return beside_python
    on_path = shutil.which("dbt")
    if on_path is None:
        raise FileNotFoundError(
            f"No dbt executable next to {sys.executable} or on PATH; run `uv sync` in the repo."
        )
    return Path(on_path)


def format_vars(dbt_vars: Mapping[str, Any]) -> str:
    """dbt's --vars argument; dates become ISO strings."""
    return json.dumps(
        {k: v.isoformat() if isinstance(v, date) else v for k, v in dbt_vars.items()},
        sort_keys=True,
    )


def date_vars(start: date, end: date | None = None) -> dict[str, str]:
    """The vars that make dbt process [start, end) (end exclusive, default start + 1 day)."""
    dbt_vars = {"start_date": start.isoformat()}
    if end is not None:
        dbt_vars["end_date"] = end.isoformat()
    return dbt_vars


# --- Cosmos -------------------------------------------------------------------------------


def _cosmos() -> Any:
    """The cosmos package. Airflow first: importing cosmos first makes Airflow's plugin loading
    import cosmos again, half-initialised (ImportError on cosmos.constants)."""
    import airflow  # noqa: F401
    import cosmos

    return cosmos


def project_config() -> ProjectConfig:
    """The dbt project, its manifest (dbt_manifest: may run `dbt parse`) and its environment
    (used at DAG parse and at task run)."""
    return _cosmos().ProjectConfig(
        dbt_project_path=settings.dbt_project_dir(),
        manifest_path=dbt_manifest(),
        env_vars=dbt_env(),
    )


def profile_config() -> ProfileConfig:
    """The repository's profiles.yml, the same file a person uses with --profiles-dir ."""
    return _cosmos().ProfileConfig(
        profile_name=PROFILE_NAME,
        target_name=target_name(),
        profiles_yml_filepath=settings.dbt_profiles_dir() / "profiles.yml",
    )


def execution_config() -> ExecutionConfig:
    """Run dbt in the task's process (dbtRunner) with the venv's dbt.

    Indirect test selection "buildable": a model's `dbt build` also runs the tests whose other
    parents are its ancestors, so the raw/stats reconcile test runs with int_event_stats__audit
    (the stats under test), before event_stats publishes them.
    """
    cosmos = _cosmos()
    return cosmos.ExecutionConfig(
        dbt_executable_path=str(dbt_executable()),
        invocation_mode=cosmos.InvocationMode.DBT_RUNNER,
        test_indirect_selection=cosmos.TestIndirectSelection.BUILDABLE,
    )


def daily_build_flags() -> list[str]:
    """Flags of every `dbt build` the DAG runs: no unit tests, which test the SQL, not the day's
    data (a model's `dbt build` would run them each run); CI (`make test`) and a person's
    `dbt build` run them. Every data test, the audit's included, still runs in every run."""
    return ["--exclude-resource-type", "unit_test"]


def render_config(**overrides: Any) -> RenderConfig:
    """How Cosmos turns the project into tasks at DAG parse.

    LoadMode.DBT_MANIFEST reads project_config()'s manifest: no dbt run and no Airflow metadata
    database at parse (LoadMode.DBT_LS keeps its cache in an Airflow Variable, so a DAG import
    without the database failed). TestBehavior.BUILD makes one task per node: `dbt build` runs
    the model, then its tests, so a failing test stops everything downstream (stg_events__events
    repeats the raw.events key checks, as Cosmos does not render source tests by default); the
    int_event_stats__audit task's tests gate the event_stats task, which publishes (write-audit-
    publish). Seeds are not rendered: reference data changes only with the repository, so `dbt
    build` in CI and by hand loads it, and each task is a dbt invocation with its own parse (a
    seed task cost a run as much as a model's). `overrides` win.
    """
    cosmos = _cosmos()
    options: dict[str, Any] = {
        "load_method": cosmos.LoadMode.DBT_MANIFEST,
        "test_behavior": cosmos.TestBehavior.BUILD,
        "exclude": ["resource_type:seed"],
    }
    options.update(overrides)
    return cosmos.RenderConfig(**options)


# --- the manifest of the DAG --------------------------------------------------------------


def project_hash(project_dir: Path | None = None) -> str:
    """A digest of what `dbt parse` reads: the project's files (symlinks followed, without
    target/, logs/, dbt_packages/ and hidden files), profiles.yml and the dbt-core version."""
    project = project_dir or settings.dbt_project_dir()
    digest = hashlib.sha256(f"dbt-core {version('dbt-core')}\0".encode())
    digest.update((settings.dbt_profiles_dir() / "profiles.yml").read_bytes())
    files = []
    for folder, subfolders, names in os.walk(project, followlinks=True):
        top = Path(folder) == project
        subfolders[:] = [
            d for d in subfolders if not d.startswith(".") and not (top and d in _NOT_HASHED)
        ]
        files += [Path(folder, name) for name in names if not name.startswith(".")]
    for path in sorted(files):
        digest.update(f"\0{path.relative_to(project).as_posix()}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:20]


def dbt_manifest() -> Path:
    """manifest.json of the current files of the dbt project, made by `dbt parse` if missing.

    Cached as <project>/target/cosmos-manifest/<project_hash>/manifest.json: a parse with
    unchanged files only hashes them (milliseconds); after a change, `dbt parse` runs in-process
    (about 5 s; it does not open the warehouse). The parse writes into a temporary folder that
    is renamed into place, so a concurrent parse never reads a half-written manifest.
    """
    project = settings.dbt_project_dir()
    cache = project / MANIFEST_CACHE
    final = cache / project_hash(project)
    manifest = final / "manifest.json"
    if manifest.is_file():
        return manifest
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".parse-", dir=cache))
    try:
        run_dbt(
            ["parse", "--quiet", "--target-path", str(staging / "target")]
            + ["--log-path", str(staging / "logs")]
        )
        (staging / "target" / "manifest.json").rename(staging / "manifest.json")
        shutil.rmtree(staging / "target")
        staging.chmod(0o755)  # mkdtemp's 0700 would hide it from other users' DAG processors
        try:
            staging.rename(final)
        except OSError:
            if not manifest.is_file():  # not "another process stored it first"
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _prune_manifests(cache)
    return manifest


def _prune_manifests(cache: Path) -> None:
    """Keep the newest manifests (another process may still use a recent one); drop the
    temporary folders of parses that died more than an hour ago."""
    folders = [d for d in cache.iterdir() if d.is_dir()]
    stored = sorted(
        (d for d in folders if not d.name.startswith(".")),
        key=lambda d: d.stat().st_mtime,
        reverse=True,
    )
    abandoned = [d for d in folders if d.name.startswith(".parse-") and _age(d) > 3600]
    for old in stored[MANIFESTS_KEPT:] + abandoned:
        shutil.rmtree(old, ignore_errors=True)


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


# --- in-process dbt -----------------------------------------------------------------------


@contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _failure_message(result: dbtRunnerResult) -> str:
    if result.exception is not None:
        return str(result.exception)
    failures = []
    for node_result in getattr(result.result, "results", None) or []:
        status = str(getattr(node_result, "status", "")).lower()
        if status in {"error", "fail", "runtime error"}:
            name = getattr(getattr(node_result, "node", None), "name", "?")
            failures.append(f"{name} ({status}): {node_result.message}")
    return "; ".join(failures) or "dbt reported failure without details; see its log above"


def run_dbt(
    args: list[str],
    *,
    dbt_vars: Mapping[str, Any] | None = None,
    warehouse_path: Path | None = None,
) -> dbtRunnerResult:
    """Run `dbt <args>` in this process on the project and profiles of this repository.

    `dbt_vars` become --vars (e.g. date_vars(day)); `warehouse_path` defaults to
    settings.warehouse_path(). Returns dbt's result; raises DbtRunError with dbt's message when
    the command fails (a failing test included). On a DuckLake, a command that fails because
    another process committed first (a model is rolled back whole), or created the same
    relation at the same moment (a seed, a view), runs again, up to
    settings.warehouse_commit_attempts() times. Sets environment variables while dbt runs, so
    do not call it from several threads at once.
    """
    from dbt.cli.main import dbtRunner

    command = [
        *args,
        "--project-dir",
        str(settings.dbt_project_dir()),
        "--profiles-dir",
        str(settings.dbt_profiles_dir()),
    ]
    if dbt_vars:
        command += ["--vars", format_vars(dbt_vars)]
    env = dbt_env(warehouse_path)
    attempts = settings.warehouse_commit_attempts()
    for attempt in range(1, attempts + 1):
        with _environment(env):
            result = dbtRunner().invoke(command)
        if result.success or attempt == attempts:
            break
        message = _failure_message(result)
        if not commits.is_conflict_message(message, ddl=True):
            break
        delay = commits.retry_delay(attempt)
        log.warning(
            "`dbt %s` lost a commit race on the warehouse (attempt %d of %d: %s); each model "
            "commits whole or not at all, so the command runs again in %.2f s",
            " ".join(args),
            attempt,
            attempts,
            message,
            delay,
        )
        time.sleep(delay)
    if not result.success:
        shown_vars = format_vars(dbt_vars) if dbt_vars else "none (every date)"
        raise DbtRunError(
            f"`dbt {' '.join(args)}` failed on {env['WAREHOUSE_PATH']} with vars {shown_vars}: "
            f"{_failure_message(result)}"
        )
    return result
