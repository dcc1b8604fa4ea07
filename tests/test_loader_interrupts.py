"""Interrupts: SIGTERM or SIGINT during `event-stats load` (and inside an Airflow task).

Each ends the load promptly with one line saying what was loaded and the command that finishes
the job, leaves no download behind (TMPDIR points at a directory the test inspects), and leaves
every date either untouched or completely loaded, with a ledger that agrees.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import pytest
from raw_http_server import Answer

from event_pipeline import warehouse as wh
from event_pipeline.loader import DOWNLOAD_DIR_PREFIX, load_range
from event_pipeline.warehouse.raw import partition_checksum

D = date(2019, 1, 1)
LOAD = [sys.executable, "-m", "event_pipeline.cli", "load"]


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTS_API_ATTEMPTS", "3")
    monkeypatch.setenv("EVENTS_API_BACKOFF", "0.05")
    monkeypatch.setenv("EVENTS_API_TIMEOUT", "120")


@pytest.fixture
def tmpdir_env(tmp_path: Path) -> Path:
    directory = tmp_path / "tmpdir"
    directory.mkdir()
    return directory


class Loader:
    """`event-stats load` in a child process, its stderr collected line by line."""

    def __init__(self, arguments: list[str], tmpdir: Path, verbose: bool = False) -> None:
        command = [*LOAD[:3], "-v", *LOAD[3:]] if verbose else LOAD
        self.process = subprocess.Popen(
            [*command, *arguments],
            env={**os.environ, "TMPDIR": str(tmpdir)},
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, condition: Callable[[], object], what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                pytest.fail(f"the load ended before {what}:\n" + "\n".join(self.lines))
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} within {timeout} s:\n" + "\n".join(self.lines))
            time.sleep(0.05)

    def interrupt(self, signum: int, timeout: float = 15) -> int:
        """Send `signum`; return the exit code, failing if it takes longer than `timeout`."""
        self.process.send_signal(signum)
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"still running {timeout} s after {signum!r}:\n" + "\n".join(self.lines))
        self._reader.join(timeout=5)
        return code

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def start_loader(tmpdir_env: Path):
    started: list[Loader] = []

    def start(arguments: list[str], verbose: bool = False) -> Loader:
        loader = Loader(arguments, tmpdir_env, verbose)
        started.append(loader)
        return loader

    yield start
    for loader in started:
        loader.stop()


def download_dirs(tmpdir: Path) -> list[Path]:
    return sorted(tmpdir.glob(f"{DOWNLOAD_DIR_PREFIX}*"))


def state(path: Path, day: date = D) -> tuple[tuple[int, str], list[tuple]]:
    """(rows, checksum) of `day`, and its ledger rows."""
    with wh.connect(path, read_only=True) as connection:
        stored = partition_checksum(connection, day)
        ledger = connection.execute(
            "select rows, checksum from raw.load_log where event_date = ? order by loaded_at",
            [day],
        ).fetchall()
    return stored, ledger


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_an_interrupt_while_downloading_ends_cleanly_and_changes_nothing(
    events_api, warehouse, tmpdir_env, start_loader, signum
):
    load_range(D, api_url=events_api(), warehouse_path=warehouse)
    before = state(warehouse)
    slow = events_api(delay=60)

    loader = start_loader(["--start", "2019-01-01", "--api-url", slow])
    loader.wait_for(lambda: download_dirs(tmpdir_env), "download directory")
    time.sleep(0.5)  # the request is in flight
    code = loader.interrupt(signum)

    name = signal.Signals(signum).name
    assert code == 128 + signum
    assert loader.lines == [
        f"load interrupted by {name}: 2019-01-01 unchanged; "
        f"`event-stats load --start 2019-01-01 --end 2019-01-02 --api-url {slow}` finishes the job"
    ]
    assert list(tmpdir_env.iterdir()) == []
    assert state(warehouse) == before


def test_an_interrupt_between_requests_keeps_the_loaded_window_and_says_how_to_finish(
    raw_source, warehouse, tmpdir_env, start_loader, monkeypatch
):
    """369 days are two requests (366 days, then 3): SIGTERM while the second is awaited.
    (Deliberate change: a range used to be one request per date, so this fell between dates.)"""
    day_one = json.dumps([{"event_id": "a", "user": "u", "timestamp": "2019-01-01T10:00:00Z"}])
    raw_source.script(Answer(body=day_one.encode()), Answer(body=b"[]", delay=60))

    monkeypatch.setenv("EVENTS_API_URL", raw_source.url)
    loader = start_loader(["--start", "2019-01-01", "--end", "2020-01-05"])
    loader.wait_for(lambda: any("[1-366/369]" in line for line in loader.lines), "first window")
    code = loader.interrupt(signal.SIGTERM)
    assert code == 128 + signal.SIGTERM
    advice = (
        "load interrupted by SIGTERM: 2019-01-01 to 2020-01-01 loaded, 2020-01-02 to 2020-01-04 "
        "unchanged; `event-stats load --start 2020-01-02 --end 2020-01-05` finishes the job"
    )
    # a line per date of the first window, its request's line, then the advice
    assert loader.lines[-1] == advice and len(loader.lines) == 366 + 2
    assert list(tmpdir_env.iterdir()) == []
    assert state(warehouse)[0][0] == 1

    raw_source.script(Answer(body=b"[]"))
    command = shlex.split(advice.split("`")[1])
    subprocess.run([*LOAD, *command[2:]], check=True, capture_output=True, timeout=60)
    with wh.connect(warehouse, read_only=True) as connection:
        loaded = connection.execute(
            "select event_date, count(*) from raw.load_log group by all order by 1"
        ).fetchall()
    assert len(loaded) == 369 and {count for _, count in loaded} == {1}
    assert loaded[-1][0] == date(2020, 1, 4)


def test_an_interrupt_during_a_write_takes_effect_once_it_is_committed(
    events_api, warehouse, tmpdir_env, start_loader
):
    url = events_api(events_per_day=300_000)
    loader = start_loader(["--start", "2019-01-01", "--api-url", url], verbose=True)
    loader.wait_for(
        lambda: any("replacing the partition" in line for line in loader.lines), "the write"
    )
    code = loader.interrupt(signal.SIGTERM)
    assert code == 128 + signal.SIGTERM
    assert loader.lines[-1] == "load interrupted by SIGTERM at its end: 2019-01-01 loaded"
    (rows, checksum), ledger = state(warehouse)
    assert rows == 300_000 and ledger == [(rows, checksum)]
    assert list(tmpdir_env.iterdir()) == []


def test_a_download_directory_left_by_sigkill_is_removed_by_the_next_load(
    events_api, warehouse, tmpdir_env, start_loader
):
    loader = start_loader(["--start", "2019-01-01", "--api-url", events_api(delay=60)])
    loader.wait_for(lambda: download_dirs(tmpdir_env), "download directory")
    loader.interrupt(signal.SIGKILL)
    (left,) = download_dirs(tmpdir_env)
    old = time.time() - 60  # its owner died a minute ago
    for path in (left, *left.iterdir()):
        os.utime(path, (old, old))

    running = start_loader(["--start", "2019-01-02", "--api-url", events_api(delay=60)])
    running.wait_for(lambda: len(download_dirs(tmpdir_env)) == 1 and not left.exists(), "sweep")
    (live,) = download_dirs(tmpdir_env)
    for path in (live, *live.iterdir()):
        os.utime(path, (old, old))
    # A third load leaves the live directory alone: its owner still holds the lock.
    done = subprocess.run(
        [*LOAD, "--start", "2019-01-01", "--api-url", events_api()],
        env={**os.environ, "TMPDIR": str(tmpdir_env)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert download_dirs(tmpdir_env) == [live]


@pytest.mark.e2e
def test_sigterm_to_an_airflow_task_interrupts_the_load_cleanly(
    events_api, warehouse, tmpdir_env, tmp_path
):
    """Airflow's task runner handles SIGTERM itself (it calls the task's on_kill and returns);
    the loader chains that handler, then stops: the task fails, up for retry, within seconds."""
    url = events_api(delay=120)
    log = tmp_path / "task.log"
    env = {**os.environ, "TMPDIR": str(tmpdir_env), "EVENTS_API_URL": url}
    command = [sys.executable, "-m", "event_pipeline.cli", "airflow", "tasks", "test"]
    command += [
        "event_stats",
        "load_raw_events",
        "2026-04-17",
    ]  # a date no other test runs: the session's Airflow DB keeps their task instances
    with log.open("w") as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not download_dirs(tmpdir_env):
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the task never started downloading"
            time.sleep(0.2)
        time.sleep(1)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=40)  # the delayed answer would take 120 s
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = log.read_text()
    assert "load interrupted by SIGTERM: 2026-04-17 unchanged" in text, text[-3000:]
    assert "up_for_retry" in text
    assert download_dirs(tmpdir_env) == []
    if warehouse.exists():  # nothing was written: no table, or an empty one
        with wh.connect(warehouse, read_only=True) as connection:
            tables = connection.execute(
                "select table_name from information_schema.tables where table_schema = 'raw'"
            ).fetchall()
            if ("events",) in tables:
                assert connection.execute("select count(*) from raw.events").fetchall() == [(0,)]
