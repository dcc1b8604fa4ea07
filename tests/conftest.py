"""Shared fixtures: Airflow's embedded configuration, free ports, and the real events API."""

from __future__ import annotations

import atexit
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
import servers
from raw_http_server import RawHttpServer
from report_fixtures import stats_db_fixture
from smtp_fixtures import smtp_server_fixture, smtps_server_fixture, starttls_server_fixture

from event_pipeline import settings
from event_pipeline.events import process as events_process

# Fixtures defined beside their helpers, shared with every test module from here.
__all__ = [
    "smtp_server_fixture",
    "smtps_server_fixture",
    "starttls_server_fixture",
    "stats_db_fixture",
]

# Airflow reads its configuration at import: set it before any test imports airflow.
# Tests never touch the repository's .airflow: a fresh Airflow home (SQLite) per test session.
_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="event-stats-airflow-"))
atexit.register(shutil.rmtree, _AIRFLOW_HOME, ignore_errors=True)
os.environ["AIRFLOW_HOME"] = str(_AIRFLOW_HOME)
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_AIRFLOW_HOME / 'airflow.db'}"
os.environ.update(settings.airflow_env())


EventsApi = Callable[..., str]


def _events_api_starter(log_dir: Path, started: list[subprocess.Popen]) -> EventsApi:
    def start(*, env: Mapping[str, str] | None = None, **options: object) -> str:
        port = servers.free_port()
        server = events_process.start(
            port, options=options, env=env, log_file=log_dir / f"events-api-{port}.log"
        )
        started.append(server.process)
        return server.url

    return start


@pytest.fixture
def events_api(tmp_path: Path) -> Iterator[EventsApi]:
    """Start `event-stats serve-events` on a free localhost port; returns its base URL.

    Keyword arguments become command-line options: events_api(data_dir=d, fail_first=2)
    runs `serve-events --data-dir d --fail-first 2`. A value of True is a bare flag; None and
    False leave the option out. `env` (not an option) adds environment variables to the server's
    environment, e.g. events_api(env={"TZ": "Asia/Tokyo"}).
    Every server started is stopped by PID at the end of the test.
    """
    started: list[subprocess.Popen] = []
    yield _events_api_starter(tmp_path, started)
    for process in started:
        servers.stop_process(process)


@pytest.fixture(scope="module")
def events_api_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EventsApi]:
    """Like events_api, but the servers live for the whole test module: for servers that keep
    no state between requests (no --fail-first), shared by several tests to save start-up time."""
    started: list[subprocess.Popen] = []
    yield _events_api_starter(tmp_path_factory.mktemp("events-api"), started)
    for process in started:
        servers.stop_process(process)


@pytest.fixture
def raw_source() -> Iterator[RawHttpServer]:
    """A test-only HTTP server (tests/raw_http_server.py) that answers as scripted, even wrongly:
    any status, headers, framing, and a body cut at any byte."""
    server = RawHttpServer()
    yield server
    server.close()


@pytest.fixture
def warehouse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh warehouse path in a temp dir (a DuckLake directory, the default storage), also
    exported as $WAREHOUSE_PATH."""
    path = tmp_path / "warehouse"
    monkeypatch.setenv("WAREHOUSE_PATH", str(path))
    return path


@pytest.fixture
def duckdb_file_warehouse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh warehouse path of the other storage, one DuckDB file (`.duckdb`), also exported
    as $WAREHOUSE_PATH."""
    path = tmp_path / "warehouse.duckdb"
    monkeypatch.setenv("WAREHOUSE_PATH", str(path))
    return path


# --- the events API in login mode -----------------------------------------------------------------


@dataclass
class LoginApi:
    """An events API started with --require-login, the credentials it accepts, its log, and the
    tokens it issued (recorded by tests/token_recorder, a harness only tests load)."""

    url: str
    user: str
    password: str
    log_file: Path
    token_file: Path

    def requests(self, method: str, path: str, status: int | None = None) -> int:
        """How many `method path` requests the server answered (with `status`), from its
        access log: the server's own count, whatever the client believes it sent."""
        answered = re.compile(rf'"{method} {re.escape(path)}(?:\?[^" ]*)? HTTP/1\.1" (\d+)')
        codes = answered.findall(self.log_file.read_text(errors="replace"))
        return sum(1 for code in codes if status is None or int(code) == status)

    def tokens(self) -> list[str]:
        """Every token the server has issued."""
        if not self.token_file.exists():
            return []
        return self.token_file.read_text().split()


@pytest.fixture
def login_api(events_api: EventsApi, tmp_path: Path) -> Callable[..., LoginApi]:
    """Start `serve-events --require-login` (a random password; tokens live `token_ttl` s):
    `login_api(token_ttl=2, delay=0.5)`; other keyword arguments are options, as for events_api.
    """

    def start(token_ttl: float = 300, **options: object) -> LoginApi:
        user, password = "loader", f"pw-{secrets.token_hex(12)}"
        token_file = tmp_path / f"tokens-{secrets.token_hex(4)}.txt"
        recorder = Path(__file__).parent / "token_recorder"
        env = {
            "EVENTS_API_USER": user,
            "EVENTS_API_PASSWORD": password,
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(recorder), os.environ.get("PYTHONPATH")])
            ),
            "EVENT_STATS_TEST_TOKEN_LOG": str(token_file),
        }
        url = events_api(require_login=True, token_ttl=token_ttl, env=env, **options)
        port = url.rsplit(":", 1)[1]
        return LoginApi(url, user, password, tmp_path / f"events-api-{port}.log", token_file)

    return start


@pytest.fixture(scope="session")
def chromium() -> str:
    """The headless Chromium that renders emails and pages; the test skips where there is none."""
    from event_pipeline import screenshots

    binary = screenshots.chromium()
    if binary is None:
        pytest.skip(
            "Chromium is not installed (Debian package `chromium`; `make browser` installs it "
            "as root with apt-get, or set CHROMIUM): nothing to render the page with"
        )
    return binary
