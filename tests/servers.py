"""Helpers for tests that start servers: a free port, wait until up, stop by PID."""

from __future__ import annotations

import subprocess
import time

import httpx

from event_pipeline.events import process as events_process

free_port = events_process.free_port
stop_process = events_process.stop


def wait_for_http(url: str, server: subprocess.Popen, timeout: float = 30.0) -> None:
    """Wait until `url` answers 200 (for servers other than the events API)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"{server.args} exited with {server.returncode} before serving")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout} s")
