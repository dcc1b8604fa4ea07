"""Crash campaign: SIGKILL each step of the pipeline at random moments and check what it leaves.

    make crash
    uv run python tests/crash_campaign.py [--trials N] [--seed S] [--steps loader,dbt,...] [--quick]

Not a pytest module (tests/test_crash_campaign.py runs a quick version in `make test`). Every step
runs through its public command, as a subprocess, on a real DuckDB warehouse in a temp dir:

  loader        event-stats load (the events API in generated mode: old -> new volume per day)
  dbt           dbt build --project-dir dbt_project --profiles-dir . --vars {start_date, end_date}
  email-outbox  event-stats send-stats --outbox (stats changed since the first email: an update)
  email-smtp    event-stats send-stats through an Airflow SMTP connection to an aiosmtpd server
                started here, which records what it received and when

A trial restores the step's known old state, starts the step, sends SIGKILL at a moment drawn
uniformly over the step's duration (the median of its latest whole runs; stratified: N trials
cover N equal slices once each, in a seeded order), then checks: every partition of raw.events
and analytics.event_stats is the complete old or new one, the ledgers agree with the data, no
email was delivered twice (over SMTP, a resend with the same Message-ID is allowed when the server
had received the message from the killed run and the ledger did not record it), and a rerun
converges to the tables of a clean run.

The figures of a full campaign are written into docs/RELIABILITY.md between its marker comments.
The exit code is 1 when any trial found a violation.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import secrets
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from aiosmtpd.controller import Controller
from crash_state import (
    Delivery,
    Snapshot,
    build_log_violations,
    convergence_violations,
    delivery_from_headers,
    email_log_violations,
    load_log_violations,
    outbox_duplicate_violations,
    partition_violations,
    read_snapshot,
    smtp_duplicate_violations,
)

from event_pipeline.events import process as events_process

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCS = REPO_ROOT / "docs" / "RELIABILITY.md"
MARK_START = "<!-- crash-campaign:start"
MARK_END = "<!-- crash-campaign:end -->"
STEPS = ("loader", "dbt", "email-outbox", "email-smtp")
STORAGE_NAMES = {"duckdb": "a DuckDB file", "lake": "a DuckLake"}

DAY = date(2024, 5, 1)
LOADED = (DAY, DAY + timedelta(days=3))  # the old state holds these dates
CHANGED = (DAY, DAY + timedelta(days=2))  # the loader and dbt steps move these to the new version
OUTBOX_DATE = DAY
SMTP_DATE = DAY + timedelta(days=1)
RECENT_RUNS = 5  # the step's duration is the median of this many latest whole runs


@dataclass(frozen=True)
class Sizes:
    old_events_per_day: int
    new_events_per_day: int
    outbox_recipients: int
    smtp_recipients: int
    smtp_accept_delay: float  # seconds the SMTP server takes between DATA and its 250 reply


FULL = Sizes(400_000, 440_000, 200, 30, 0.1)
QUICK = Sizes(20_000, 22_000, 50, 12, 0.1)


# --- running a step --------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    exit_code: int
    seconds: float  # from start to exit (or to the kill)
    killed_at: float | None  # seconds after the start; None: the step ended before the kill


def run_step(
    argv: Sequence[str], env: dict[str, str], log: Path, kill_after: float | None = None
) -> Run:
    """Run the step; with `kill_after`, SIGKILL it (its process group, by the step's PID) that
    many seconds after its start."""
    with log.open("ab") as output:
        started = time.monotonic()
        # Its own process group: the kill takes its children too (dbt's multiprocessing
        # resource tracker), as a crash of the machine or container would.
        process = subprocess.Popen(
            argv,
            cwd=REPO_ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        killed_at = None
        if kill_after is not None and not _exits_within(process, kill_after):
            killed_at = time.monotonic() - started
            os.killpg(process.pid, signal.SIGKILL)
        code = process.wait()
        return Run(code, time.monotonic() - started, killed_at)


def _exits_within(process: subprocess.Popen, seconds: float) -> bool:
    """Wait precisely (a pidfd, not polling) until the process exits or `seconds` pass."""
    fd = os.pidfd_open(process.pid)
    try:
        ready, _, _ = select.select([fd], [], [], max(seconds, 0.0))
    finally:
        os.close(fd)
    return bool(ready)


# --- the SMTP server ---------------------------------------------------------------------------


class RecordingSmtp:
    """aiosmtpd handler: records every message with the campaign phase and the moment its DATA
    had fully arrived (from then on the server delivers it, whatever happens to the client),
    then waits `accept_delay` before its 250 reply, like a server that does some work first."""

    def __init__(self, accept_delay: float) -> None:
        self.accept_delay = accept_delay
        self.phase = "setup"
        self._received: list[Delivery] = []
        self._lock = threading.Lock()

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 (aiosmtpd's name)
        arrived = time.monotonic()
        with self._lock:
            for recipient in envelope.rcpt_tos:
                delivery = delivery_from_headers(envelope.content, self.phase, arrived)
                self._received.append(replace(delivery, recipient=recipient.lower()))
        await asyncio.sleep(self.accept_delay)
        return "250 Message accepted for delivery"

    def take(self) -> list[Delivery]:
        """The messages received since the last call."""
        with self._lock:
            received, self._received = self._received, []
        return received


# --- the lab: processes, directories and the live warehouse -----------------------------------


@dataclass
class Lab:
    """Everything a campaign runs against. Every step uses ONE live directory (the warehouse
    and the outbox), restored from a saved state before each run: dbt then sees the same
    profile every time and reuses its parse."""

    work: Path
    sizes: Sizes
    storage: str  # "duckdb" (one file) or "lake" (a DuckLake directory), see docs/STORAGE.md
    old_api: str  # the events API serving the old volume per day
    new_api: str  # ... and the new one
    smtp: RecordingSmtp
    smtp_port: int
    smtp_before: list[Delivery] = field(default_factory=list)  # received while setting up

    @property
    def live(self) -> Path:
        return self.work / "live"

    @property
    def warehouse(self) -> Path:
        name = "warehouse.duckdb" if self.storage == "duckdb" else "lake"
        return self.live / "warehouse" / name

    @property
    def outbox(self) -> Path:
        return self.live / "outbox"

    def env(self) -> dict[str, str]:
        smtp_connection = {
            "conn_type": "smtp",
            "host": "127.0.0.1",
            "port": self.smtp_port,
            "extra": {"disable_ssl": True, "disable_tls": True, "timeout": 30},
        }
        airflow_home = self.work / "airflow"
        return {
            **os.environ,
            "WAREHOUSE_PATH": str(self.warehouse),
            "WAREHOUSE_LOCK_TIMEOUT": "60",
            "EMAIL_OUTBOX_DIR": str(self.outbox),
            "AIRFLOW_HOME": str(airflow_home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{airflow_home / 'airflow.db'}",
            "AIRFLOW_CONN_SMTP_DEFAULT": json.dumps(smtp_connection),
            "DBT_TARGET_PATH": str(self.work / "dbt-target"),
            "DBT_LOG_PATH": str(self.work / "dbt-logs"),
            "TMPDIR": str(self.work / "tmp"),  # what a killed loader leaves is removed per trial
            "DO_NOT_TRACK": "1",
            "PYTHONUNBUFFERED": "1",  # a killed step's last output line says where it was
        }

    def restore(self, state: str | None) -> None:
        shutil.rmtree(self.live, ignore_errors=True)
        shutil.rmtree(self.work / "tmp", ignore_errors=True)
        (self.work / "tmp").mkdir(parents=True)
        if state is None:
            self.warehouse.parent.mkdir(parents=True)
        else:
            shutil.copytree(self.work / "states" / state, self.live)

    def save(self, state: str, source: Path | None = None) -> None:
        target = self.work / "states" / state
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source or self.live, target)

    def snapshot(self) -> Snapshot:
        return read_snapshot(self.warehouse, self.outbox)

    def smtp_delivered(self, step: Step) -> list[Delivery]:
        """What the SMTP server received for the step's date before the step ran."""
        return [d for d in self.smtp_before if d.event_date == step.email_date]

    def run(
        self,
        argv: Sequence[str],
        log: str,
        kill_after: float | None = None,
        env: dict[str, str] | None = None,
    ) -> Run:
        env = {**self.env(), **(env or {})}
        return run_step(argv, env, self.work / "logs" / f"{log}.log", kill_after)

    def run_ok(self, argv: Sequence[str], log: str, env: dict[str, str] | None = None) -> Run:
        run = self.run(argv, log, env=env)
        if run.exit_code != 0:
            raise RuntimeError(
                f"{' '.join(argv)} failed with exit code {run.exit_code}; "
                f"see {self.work / 'logs' / log}.log"
            )
        return run


@contextmanager
def started_lab(work: Path, sizes: Sizes, storage: str) -> Iterator[Lab]:
    """Start the two events APIs (old and new volume) and the SMTP server; stop them after."""
    (work / "logs").mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        urls = {}
        for name, volume in (("old", sizes.old_events_per_day), ("new", sizes.new_events_per_day)):
            server = stack.enter_context(
                events_process.running(
                    options={"events_per_day": volume}, log_file=work / "logs" / f"api-{name}.log"
                )
            )
            urls[name] = server.url
        smtp = RecordingSmtp(sizes.smtp_accept_delay)
        port = events_process.free_port()
        controller = Controller(smtp, hostname="127.0.0.1", port=port)
        controller.start()
        stack.callback(controller.stop)
        yield Lab(work, sizes, storage, urls["old"], urls["new"], smtp, port)


# --- the steps -------------------------------------------------------------------------------


def _event_stats() -> list[str]:
    beside = Path(sys.executable).with_name("event-stats")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "event_pipeline.cli"]


def _dbt_build(start: date, end: date) -> list[str]:
    dbt = Path(sys.executable).with_name("dbt")
    dbt_vars = json.dumps({"start_date": start.isoformat(), "end_date": end.isoformat()})
    return [str(dbt), "build", "--project-dir", "dbt_project", "--profiles-dir", "."] + [
        "--vars",
        dbt_vars,
    ]


def _load(api_url: str, start: date, end: date) -> list[str]:
    """-v: the loader logs each date's transaction, so a trial's last output shows kills in it."""
    dates = ["--start", str(start), "--end", str(end)]
    return [*_event_stats(), "-v", "load", *dates, "--api-url", api_url]


def _email_to(count: int) -> dict[str, str]:
    return {"EMAIL_TO": ",".join(f"reader{n:03d}@example.com" for n in range(count))}


def _send_outbox() -> list[str]:
    return [*_event_stats(), "send-stats", "--date", str(OUTBOX_DATE), "--outbox"]


def _send_smtp() -> list[str]:
    return [*_event_stats(), "send-stats", "--date", str(SMTP_DATE)]


@dataclass(frozen=True)
class Step:
    name: str
    what: str  # for the summary
    argv: Callable[[Lab], list[str]]
    old_state: str  # the saved state a trial starts from
    new_state: str | None  # where its clean result is saved for the steps after it
    env: dict[str, str] = field(default_factory=dict)
    email_date: date | None = None
    smtp: bool = False


def steps_in_order(sizes: Sizes) -> list[Step]:
    days = (CHANGED[1] - CHANGED[0]).days
    volume = f"{days} days x {sizes.old_events_per_day:,} -> {sizes.new_events_per_day:,} events"
    return [
        Step(
            "loader",
            f"`event-stats load`, {volume}",
            lambda lab: _load(lab.new_api, *CHANGED),
            old_state="loaded",
            new_state="reloaded",
        ),
        Step(
            "dbt",
            f"`dbt build` with vars, {volume}",
            lambda lab: _dbt_build(*CHANGED),
            old_state="reloaded",
            new_state="rebuilt",
        ),
        Step(
            "email-outbox",
            f"`event-stats send-stats --outbox`, an update to {sizes.outbox_recipients} recipients",
            lambda lab: _send_outbox(),
            old_state="rebuilt",
            new_state=None,
            env=_email_to(sizes.outbox_recipients),
            email_date=OUTBOX_DATE,
        ),
        Step(
            "email-smtp",
            f"`event-stats send-stats` over SMTP (aiosmtpd), an update to "
            f"{sizes.smtp_recipients} recipients",
            lambda lab: _send_smtp(),
            old_state="rebuilt",
            new_state=None,
            env=_email_to(sizes.smtp_recipients),
            email_date=SMTP_DATE,
            smtp=True,
        ),
    ]


def build_first_state(lab: Lab) -> None:
    """The state "loaded": old events of three dates, their stats, and a first email of the
    outbox date (to the outbox) and of the SMTP date (over SMTP)."""
    lab.restore(None)
    lab.run_ok(_load(lab.old_api, *LOADED), "setup-load")
    lab.run_ok(_dbt_build(*LOADED), "setup-dbt")
    lab.run_ok(_send_outbox(), "setup-outbox", env=_email_to(lab.sizes.outbox_recipients))
    lab.smtp.phase = "setup"
    lab.run_ok(_send_smtp(), "setup-smtp", env=_email_to(lab.sizes.smtp_recipients))
    lab.smtp_before = lab.smtp.take()
    lab.save("loaded")


@dataclass
class Prepared:
    """A step's reference points: its old state, a clean run's result, and its duration.

    The duration is the median of the latest runs that did the whole step: the clean runs,
    then every rerun after a kill that had left nothing new. It follows the machine's load
    (other jobs on the same cores) as the campaign goes on."""

    step: Step
    old: Snapshot
    clean: Snapshot
    clean_deliveries: list[Delivery]
    runs: list[float]  # seconds of the runs that did the whole step, oldest first
    violations: list[str]

    @property
    def duration(self) -> float:
        return statistics.median(self.runs[-RECENT_RUNS:])


def prepare(lab: Lab, step: Step, measure_runs: int) -> Prepared:
    """Run the step cleanly from its old state (its new state is that result), then
    `measure_runs` times more, warm, to time it and to check that clean runs agree."""
    lab.restore(step.old_state)
    old = lab.snapshot()
    lab.smtp.phase = "clean"
    first = lab.run_ok(step.argv(lab), f"{step.name}-clean-0", env=step.env)
    clean = lab.snapshot()
    deliveries = lab.smtp.take()
    if step.new_state:
        lab.save(step.new_state)
    durations, violations = [], []
    for number in range(1, measure_runs + 1):
        lab.restore(step.old_state)
        run = lab.run_ok(step.argv(lab), f"{step.name}-clean-{number}", env=step.env)
        durations.append(run.seconds)
        again = lab.snapshot()
        lab.smtp.take()
        violations += [f"two clean runs differ: {v}" for v in convergence_violations(again, clean)]
    if old.tables() == clean.tables():
        violations.append("a clean run changed nothing: old and new versions are equal")
    return Prepared(step, old, clean, deliveries, durations or [first.seconds], violations)


# --- a trial ---------------------------------------------------------------------------------


@dataclass
class Trial:
    step: str
    number: int  # 1-based within the step
    fraction: float  # kill moment as a fraction of the measured duration
    kill_after: float
    duration: float
    killed_at: float | None = None
    outcome: str = ""  # old, partial, new (what the kill left) or finished (ended before it)
    done: int = 0
    units: int = 0
    last_output: str = ""  # the killed run's last log line: where the kill fell
    in_flight: int = 0  # emails delivered by the killed run that its ledger did not record
    resends: int = 0  # SMTP: of those, delivered again (same Message-ID) by the rerun
    violations: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.step}-{self.number:02d}"  # names its logs and kept states


def _units(prepared: Prepared) -> list[tuple]:
    """What the step changes: (table, date) partitions, and new ledger rows of emails sent."""
    old, clean = prepared.old, prepared.clean
    units: list[tuple] = []
    for name in ("raw", "stats"):
        before, after = getattr(old, name), getattr(clean, name)
        units += [
            (name, day)
            for day in sorted(set(before) | set(after))
            if before.get(day) != after.get(day)
        ]
    units += [("email", row) for row in sorted(set(clean.email_log) - set(old.email_log))]
    return units


def _is_done(unit: tuple, snapshot: Snapshot, clean: Snapshot) -> bool:
    kind, what = unit
    if kind == "email":
        return what in snapshot.email_log
    return getattr(snapshot, kind).get(what) == getattr(clean, kind).get(what)


def _state_violations(
    prepared: Prepared, snapshot: Snapshot, deliveries: list[Delivery], in_flight: int
) -> list[str]:
    found = partition_violations(snapshot, prepared.old, prepared.clean)
    found += load_log_violations(snapshot)
    found += build_log_violations(snapshot)
    step = prepared.step
    if step.email_date:
        found += email_log_violations(snapshot, deliveries, step.email_date, in_flight)
        if not step.smtp:
            found += outbox_duplicate_violations(deliveries)
    return found


def _kill(lab: Lab, prepared: Prepared, trial: Trial) -> tuple[Snapshot, list[Delivery]]:
    """Run the step from its old state and SIGKILL it; record what the kill left and check it.
    Returns the state after the kill and the SMTP messages the killed run delivered."""
    step = prepared.step
    lab.restore(step.old_state)
    lab.smtp.take()
    lab.smtp.phase = "killed"
    killed = lab.run(step.argv(lab), trial.label, kill_after=trial.kill_after, env=step.env)
    trial.killed_at = killed.killed_at
    trial.last_output = last_line(lab.work / "logs" / f"{trial.label}.log")
    after_kill = lab.snapshot()
    lab.save("last-kill")
    from_killed = lab.smtp.take()

    units = _units(prepared)
    trial.units = len(units)
    trial.done = sum(_is_done(unit, after_kill, prepared.clean) for unit in units)
    if killed.killed_at is None:
        trial.outcome = "finished"
    else:
        trial.outcome = {0: "old", len(units): "new"}.get(trial.done, "partial")

    delivered = lab.smtp_delivered(step) + from_killed if step.smtp else list(after_kill.outbox)
    if step.email_date:
        recorded = {row.key for row in after_kill.sent_rows(step.email_date)}
        day_keys = {d.key for d in delivered if d.event_date == step.email_date}
        trial.in_flight = len(day_keys - recorded)
    trial.violations += [
        f"after the kill: {v}" for v in _state_violations(prepared, after_kill, delivered, 1)
    ]
    return after_kill, from_killed


def _rerun(
    lab: Lab, prepared: Prepared, trial: Trial, after_kill: Snapshot, from_killed: list[Delivery]
) -> None:
    """Run the step again, not killed: it must leave what a clean run leaves."""
    step = prepared.step
    lab.smtp.phase = "rerun"
    rerun = lab.run(step.argv(lab), f"{trial.label}-rerun", env=step.env)
    if trial.outcome == "old" and rerun.exit_code == 0:
        prepared.runs.append(rerun.seconds)  # it did the whole step: a measurement
    after_rerun = lab.snapshot()
    from_rerun = lab.smtp.take()
    if rerun.exit_code != 0:
        trial.violations.append(f"the rerun failed (exit {rerun.exit_code}): see its log")
    before = lab.smtp_delivered(step)
    delivered = before + from_killed + from_rerun if step.smtp else list(after_rerun.outbox)
    trial.violations += [
        f"after the rerun: {v}" for v in _state_violations(prepared, after_rerun, delivered, 0)
    ]
    trial.violations += convergence_violations(after_rerun, prepared.clean)
    if step.smtp:
        found, trial.resends = smtp_duplicate_violations(
            before, from_killed, from_rerun, after_kill
        )
        trial.violations += found
        sent = sorted({d.sent for d in from_killed + from_rerun})
        if sent != sorted({d.sent for d in prepared.clean_deliveries}):
            trial.violations.append("SMTP: the emails received differ from a clean run's")


def run_trial(lab: Lab, prepared: Prepared, trial: Trial) -> Trial:
    after_kill, from_killed = _kill(lab, prepared, trial)
    _rerun(lab, prepared, trial, after_kill, from_killed)
    if trial.violations:  # keep both states for inspection
        lab.save(f"violation-{trial.label}-after-kill", lab.work / "states" / "last-kill")
        lab.save(f"violation-{trial.label}-after-rerun")
    return trial


def kill_fractions(seed: int, step: str, trials: int) -> list[float]:
    """Stratified uniform kill moments: trial k falls in a slice of [0, 1) of its own, every
    slice once, in a seeded order (so few trials still spread over the whole duration)."""
    rng = random.Random(f"{seed}:{step}")
    slices = list(range(trials))
    rng.shuffle(slices)
    return [(index + rng.random()) / trials for index in slices]


def describe(trial: Trial) -> str:
    where = f"{trial.fraction:.0%} of {trial.duration:.2f} s"
    if trial.killed_at is None:
        what = f"the step ended before the kill due at {trial.kill_after:.2f} s ({where})"
    else:
        what = (
            f"killed at {trial.killed_at:.2f} s ({where}): left {trial.outcome} "
            f"({trial.done}/{trial.units} new)"
        )
    if trial.in_flight:
        what += f", {trial.in_flight} email in flight (delivered, not in the ledger)"
    rerun = f"rerun resent {trial.resends} (same Message-ID)" if trial.resends else "rerun"
    verdict = f"{len(trial.violations)} VIOLATION(S)" if trial.violations else "ok"
    line = f"[{trial.step:<12} {trial.number:>2}] {what}; {rerun}; {verdict}"
    if trial.killed_at is not None:
        line += f"\n    its last output: {trial.last_output[:90] or '(none)'}"
    return line


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LOG_TIME = re.compile(r"^(\d{4}-\d{2}-\d{2} )?\d{2}:\d{2}:\d{2}(,\d+)?\s*")
# Library chatter (the loader's prefetch of the next date, with -v) is not the step's stage.
_LIBRARY_DEBUG = re.compile(r"\b(DEBUG (?!event_pipeline)|INFO httpx:)")


def last_line(log: Path) -> str:
    """The last line a run wrote about its own work, without colours and time stamps."""
    text = _ANSI.sub("", log.read_text(errors="replace"))
    lines = [_LOG_TIME.sub("", line.strip()) for line in text.splitlines()]
    lines = [line for line in lines if line and not _LIBRARY_DEBUG.search(line)]
    return lines[-1] if lines else ""


# --- the campaign ----------------------------------------------------------------------------


@dataclass
class Options:
    trials: int = 15
    seed: int = 0
    steps: tuple[str, ...] = STEPS
    quick: bool = False
    only_trial: int | None = None
    work: Path | None = None
    keep: bool = False
    docs: bool = True
    storage: str = "lake"


@dataclass
class Campaign:
    options: Options
    sizes: Sizes
    prepared: dict[str, Prepared] = field(default_factory=dict)
    trials: list[Trial] = field(default_factory=list)
    seconds: float = 0.0

    def violations(self) -> int:
        setup = sum(len(p.violations) for p in self.prepared.values())
        return setup + sum(len(t.violations) for t in self.trials)


def run_trials(
    lab: Lab, prepared: Prepared, options: Options, out: Callable[[str], None]
) -> list[Trial]:
    trials = []
    fractions = kill_fractions(options.seed, prepared.step.name, options.trials)
    for number, fraction in enumerate(fractions, 1):
        if options.only_trial not in (None, number):
            continue
        duration = prepared.duration
        trial = Trial(prepared.step.name, number, fraction, fraction * duration, duration)
        trials.append(run_trial(lab, prepared, trial))
        out(describe(trial))
        for violation in trial.violations:
            out(f"    VIOLATION: {violation}")
    return trials


def run_campaign(options: Options, out: Callable[[str], None] = print) -> Campaign:
    """Prepare every step up to the last one selected, then run the trials of the selected ones."""
    sizes = QUICK if options.quick else FULL
    campaign = Campaign(options, sizes)
    started = time.monotonic()
    work = options.work or Path(tempfile.mkdtemp(prefix="crash-campaign-"))
    out(
        f"crash campaign: seed {options.seed}, {options.trials} trial(s) per step, "
        f"{options.storage} warehouse, work dir {work}"
    )
    with started_lab(work, sizes, options.storage) as lab:
        build_first_state(lab)
        steps = steps_in_order(sizes)
        last = max(STEPS.index(name) for name in options.steps)
        for step in steps[: last + 1]:
            selected = step.name in options.steps
            prepared = prepare(lab, step, measure_runs=(1 if options.quick else 2) * selected)
            campaign.prepared[step.name] = prepared
            for violation in prepared.violations:
                out(f"[{step.name}] SETUP VIOLATION: {violation}")
            if not selected:
                continue
            out(f"[{step.name}] {step.what}: a clean run takes {prepared.duration:.2f} s")
            campaign.trials += run_trials(lab, prepared, options, out)
    campaign.seconds = time.monotonic() - started
    if campaign.violations() or options.keep:
        out(f"work dir kept for inspection: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return campaign


# --- summary and docs ------------------------------------------------------------------------


def summary_rows(campaign: Campaign) -> list[dict[str, str]]:
    rows = []
    for name in campaign.options.steps:
        trials = [t for t in campaign.trials if t.step == name]
        prepared = campaign.prepared[name]
        moments = [t.killed_at for t in trials if t.killed_at is not None]
        deciles = {min(int(t.fraction * 10), 9) for t in trials}
        outcomes = Counter(t.outcome for t in trials)
        spread = (
            f"{min(moments):.2f} to {max(moments):.2f} s (median {statistics.median(moments):.2f})"
            if moments
            else "none"
        )
        rows.append(
            {
                "step": name,
                "what": prepared.step.what,
                "trials": str(len(trials)),
                "duration": f"{prepared.duration:.2f} s",
                "kill moments": f"{spread}, {len(deciles)}/10 tenths",
                "left old / partial / new / finished": " / ".join(
                    str(outcomes[o]) for o in ("old", "partial", "new", "finished")
                ),
                "in flight / resent": (
                    f"{sum(t.in_flight for t in trials)} / {sum(t.resends for t in trials)}"
                    if prepared.step.email_date
                    else "-"
                ),
                "violations": str(
                    sum(len(t.violations) for t in trials) + len(prepared.violations)
                ),
            }
        )
    return rows


def format_table(rows: list[dict[str, str]], columns: Sequence[str]) -> str:
    widths = [max(len(c), *(len(r[c]) for r in rows)) for c in columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(r[c].ljust(w) for c, w in zip(columns, widths, strict=True)) for r in rows]
    return "\n".join(lines)


TABLE_COLUMNS = (
    "step",
    "trials",
    "duration",
    "kill moments",
    "left old / partial / new / finished",
    "in flight / resent",
    "violations",
)


def markdown_section(campaign: Campaign) -> str:
    options, rows = campaign.options, summary_rows(campaign)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    header = "| " + " | ".join(TABLE_COLUMNS) + " |"
    lines = [
        f"Latest campaign: {when}, `make crash` (seed {options.seed}, {options.trials} trials per "
        f"step, {STORAGE_NAMES[options.storage]}), {campaign.seconds / 60:.1f} minutes on a "
        f"{os.cpu_count()}-core machine.",
        "",
        header,
        "|" + "---|" * len(TABLE_COLUMNS),
    ]
    for row in rows:
        cells = [f"{row['step']}: {row['what']}", *(row[c] for c in TABLE_COLUMNS[1:])]
        lines.append("| " + " | ".join(cells) + " |")
    total = sum(int(r["trials"]) for r in rows)
    lines += [
        "",
        f"**{total} trials, {campaign.violations()} violations.**",
        "",
        "Replay one trial: `uv run python tests/crash_campaign.py --seed "
        f"{options.seed} --trials {options.trials} --storage {options.storage} --steps STEP "
        "--trial N`.",
    ]
    return "\n".join(lines)


def write_docs(campaign: Campaign, path: Path = DOCS) -> None:
    """Replace the text between the marker comments of docs/RELIABILITY.md."""
    text = path.read_text()
    start = text.index(MARK_START)
    start = text.index("\n", start) + 1
    end = text.index(MARK_END)
    path.write_text(text[:start] + markdown_section(campaign) + "\n" + text[end:])


def parse_options(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, help="trials per step (default 15; --quick: 3)")
    parser.add_argument("--seed", type=int, help="seed of the kill moments (default: random)")
    parser.add_argument(
        "--steps", default=",".join(STEPS), help=f"comma-separated, of {','.join(STEPS)}"
    )
    parser.add_argument("--quick", action="store_true", help="small partitions, 3 trials")
    parser.add_argument("--trial", type=int, help="replay only trial N of each step")
    parser.add_argument("--work-dir", type=Path, help="keep the warehouses here")
    parser.add_argument("--keep", action="store_true", help="keep the work dir")
    parser.add_argument("--no-docs", action="store_true", help="do not update RELIABILITY.md")
    parser.add_argument(
        "--storage",
        choices=["duckdb", "lake"],
        default="lake",
        help="the warehouse as a DuckLake directory (default) or one DuckDB file",
    )
    args = parser.parse_args(argv)
    steps = tuple(s.strip() for s in args.steps.split(",") if s.strip())
    unknown = set(steps) - set(STEPS)
    if unknown or not steps:
        parser.error(f"--steps: unknown {sorted(unknown)}; choose from {','.join(STEPS)}")
    trials = args.trials or (3 if args.quick else 15)
    if trials < 1 or (args.trial is not None and not 1 <= args.trial <= trials):
        parser.error(f"--trials must be >= 1 and --trial within 1..{trials}")
    return Options(
        trials=trials,
        seed=args.seed if args.seed is not None else secrets.randbelow(1_000_000),
        steps=tuple(s for s in STEPS if s in steps),
        quick=args.quick,
        only_trial=args.trial,
        work=args.work_dir,
        keep=args.keep,
        docs=not args.no_docs,
        storage=args.storage,
    )


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    campaign = run_campaign(options, out=lambda line: print(line, flush=True))
    print()
    print(format_table(summary_rows(campaign), TABLE_COLUMNS))
    print(
        f"\n{len(campaign.trials)} trials, {campaign.violations()} violation(s), "
        f"{campaign.seconds / 60:.1f} minutes"
    )
    full = not options.quick and options.only_trial is None and options.steps == STEPS
    if options.docs and full:
        write_docs(campaign)
        print(f"figures written to {DOCS.relative_to(REPO_ROOT)}")
    elif options.docs:
        print("docs not updated: only a full campaign (all steps, not --quick) writes them")
    return 1 if campaign.violations() else 0


if __name__ == "__main__":
    sys.exit(main())
