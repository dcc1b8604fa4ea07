"""The events API as a child process: for `event-stats run`, the tests and the benchmark.

The server is started with this interpreter (`python -m event_pipeline.cli serve-events`), waited
for on GET /health, and stopped by its PID (SIGTERM, then SIGKILL), never by name.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx


@dataclass(frozen=True)
class EventsServer:
    url: str
    process: subprocess.Popen


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def command_line(port: int, options: Mapping[str, object]) -> list[str]:
    """serve-events argv: {"data_dir": d, "fail_first": 2} -> --data-dir d --fail-first 2.

    True is a bare flag; None and False leave the option out.
    """
    argv = [sys.executable, "-m", "event_pipeline.cli", "serve-events", "--port", str(port)]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not None and value is not False:
            argv += [flag, str(value)]
    return argv


def _log_tail(log_file: Path | None, lines: int = 20) -> str:
    if log_file is None or not log_file.exists():
        return ""
    return "\n" + "\n".join(log_file.read_text(errors="replace").splitlines()[-lines:])


def stop(process: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop a process this program started, by its PID: SIGTERM, then SIGKILL after `grace`."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start(
    port: int | None = None,
    *,
    options: Mapping[str, object] | None = None,
    env: Mapping[str, str] | None = None,
    log_file: Path | None = None,
    timeout: float = 30.0,
) -> EventsServer:
    """Start `serve-events` on 127.0.0.1 (a free port by default) and wait until it answers."""
    port = port or free_port()
    argv = command_line(port, options or {})
    output = log_file.open("ab") if log_file else subprocess.DEVNULL
    try:
        process = subprocess.Popen(
            argv, stdout=output, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    finally:
        if log_file:
            output.close()
    server = EventsServer(f"http://127.0.0.1:{port}", process)
    try:
        _wait_until_serving(server, log_file, timeout)
    except BaseException:  # also Ctrl-C while waiting: never leave the server behind
        stop(process)
        raise
    return server


def _wait_until_serving(server: EventsServer, log_file: Path | None, timeout: float) -> None:
    process = server.process
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(
                f"The events API exited with {process.returncode} before serving on "
                f"{server.url}{_log_tail(log_file)}"
            )
        try:
            if httpx.get(f"{server.url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"The events API did not answer on {server.url} within {timeout} s")
        time.sleep(0.1)


@contextmanager
def running(
    port: int | None = None,
    *,
    options: Mapping[str, object] | None = None,
    env: Mapping[str, str] | None = None,
    log_file: Path | None = None,
) -> Iterator[EventsServer]:
    """`start`, then `stop` when the block ends (also on an error or Ctrl-C)."""
    server = start(port, options=options, env=env, log_file=log_file)
    try:
        yield server
    finally:
        stop(server.process)
