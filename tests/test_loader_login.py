"""The loader against the events API in login mode: login and fetch are one unit.

The server counts what it answered (its access log) and, in tests, records the tokens it issued
(tests/token_recorder), so the tests can look for them where they must never be.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from datetime import date, timedelta
from pathlib import Path

import duckdb
import httpx
import pytest
from leaks import assert_absent, warehouse_text
from raw_http_server import Answer

from event_pipeline import warehouse as wh
from event_pipeline.loader import load_range
from event_pipeline.sources import Credentials, EventSourceError, LoginRefused

D = date(2019, 1, 1)


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTS_API_ATTEMPTS", "3")
    monkeypatch.setenv("EVENTS_API_BACKOFF", "0.05")
    monkeypatch.setenv("EVENTS_API_TIMEOUT", "10")
    monkeypatch.delenv("EVENTS_API_USER", raising=False)
    monkeypatch.delenv("EVENTS_API_PASSWORD", raising=False)


def credentials(api) -> Credentials:
    return Credentials(api.user, api.password)


def stored(path: Path) -> list[tuple]:
    with wh.connect(path, read_only=True) as connection:
        return connection.execute("select * from raw.events order by event_id").fetchall()


def ledger_rows(path: Path) -> int:
    with wh.connect(path, read_only=True) as connection:
        return connection.execute("select count(*) from raw.load_log").fetchall()[0][0]


def test_a_token_that_expires_mid_range_is_renewed_once_per_expiry_and_the_range_loads(
    login_api, warehouse, caplog
):
    # One request per day, each answered after 1.1 s: the third request comes after the 2 s
    # token has expired, however fast the machine (and a renewed token has 2 s to be used).
    api = login_api(token_ttl=2, delay=1.1, events_per_day=50)

    with caplog.at_level(logging.DEBUG):
        results = load_range(
            D,
            D + timedelta(days=4),
            warehouse_path=warehouse,
            api_url=api.url,
            days_per_request=1,
            credentials=credentials(api),
        )

    assert [r.event_date for r in results] == [D + timedelta(days=i) for i in range(4)]
    assert [r.rows for r in results] == [50] * 4
    assert len(stored(warehouse)) == 200
    expired = api.requests("GET", "/events", 401)
    assert expired >= 1  # the token expired in the middle of the range
    # Each expiry cost exactly one new login and one repeated request; nothing else.
    assert api.requests("POST", "/login", 200) == 1 + expired == len(api.tokens())
    assert api.requests("POST", "/login") == 1 + expired
    assert api.requests("GET", "/events", 200) == 4
    assert "logging in again" in caplog.text
    assert_absent([*api.tokens(), api.password], [caplog.text, warehouse_text(warehouse)])


def test_wrong_credentials_fail_at_once_naming_url_and_user_and_write_nothing(
    login_api, warehouse, monkeypatch, caplog
):
    api = login_api(events_per_day=20)
    load_range(D, warehouse_path=warehouse, api_url=api.url, credentials=credentials(api))
    before, ledger_before = stored(warehouse), ledger_rows(warehouse)
    monkeypatch.setenv("EVENTS_API_BACKOFF", "30")  # a retry would make this test time out
    wrong = Credentials(api.user, api.password + "-wrong")

    started = time.monotonic()
    with caplog.at_level(logging.DEBUG), pytest.raises(LoginRefused) as refused:
        load_range(
            D,
            D + timedelta(days=5),
            warehouse_path=warehouse,
            api_url=api.url,
            credentials=wrong,
            days_per_request=1,
        )

    assert time.monotonic() - started < 10
    message = str(refused.value)
    assert f"{api.url}/login" in message and "'loader'" in message and "HTTP 401" in message
    assert "Nothing was written" in message
    assert api.requests("POST", "/login", 401) == 1  # one attempt, no retry storm
    assert api.requests("GET", "/events") == 1  # the first load's only
    assert stored(warehouse) == before and ledger_rows(warehouse) == ledger_before
    assert_absent([wrong.password], [message, repr(refused.value.args), caplog.text])


def test_without_credentials_a_login_api_fails_at_once_saying_what_to_set(login_api, warehouse):
    api = login_api()
    with pytest.raises(EventSourceError) as error:
        load_range(D, warehouse_path=warehouse, api_url=api.url)
    message = str(error.value)
    assert "requires a login" in message and "2019-01-01" in message
    assert "EVENTS_API_USER" in message and "'events_api'" in message
    assert api.requests("GET", "/events", 401) == 1
    assert not warehouse.exists() or ledger_rows(warehouse) == 0


def test_a_fresh_token_refused_again_fails_without_a_login_storm(raw_source, warehouse):
    token = json.dumps({"access_token": "t-1", "token_type": "bearer"}).encode()
    raw_source.script(
        Answer(body=token),  # POST /login
        Answer(401, headers=(("WWW-Authenticate", 'Bearer error="invalid_token"'),)),
        Answer(body=token),  # POST /login again, once
        Answer(401, headers=(("WWW-Authenticate", 'Bearer error="invalid_token"'),)),
    )
    with pytest.raises(EventSourceError, match="rejected a fresh token of user 'u'"):
        load_range(
            D, warehouse_path=warehouse, api_url=raw_source.url, credentials=Credentials("u", "p")
        )
    methods = [line.split()[0] for line in raw_source.requests]
    assert methods == ["POST", "GET", "POST", "GET"]


def test_the_command_line_logs_in_with_environment_variables(login_api, warehouse, tmp_path):
    api = login_api(events_per_day=30)
    env = {**os.environ, "EVENTS_API_USER": api.user, "EVENTS_API_PASSWORD": api.password}
    command = [sys.executable, "-m", "event_pipeline.cli", "-v", "load", "--api-url", api.url]
    command += ["--warehouse", str(warehouse), "--start", "2019-01-01", "--end", "2019-01-03"]

    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)

    assert done.returncode == 0, done.stderr
    assert "loaded 2 date(s): 2 replaced" in done.stderr
    assert api.requests("POST", "/login", 200) == 1
    assert api.password not in done.stderr + done.stdout
    assert "Bearer" not in done.stderr and "access_token" not in done.stderr

    wrong = subprocess.run(
        command,
        env={**env, "EVENTS_API_PASSWORD": "nope"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert wrong.returncode != 0
    assert "load failed: The events API refused the login of user 'loader'" in wrong.stderr
    half = subprocess.run(
        command,
        env={key: value for key, value in env.items() if key != "EVENTS_API_PASSWORD"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert half.returncode != 0 and "EVENTS_API_PASSWORD is not set" in half.stderr


def test_a_login_api_behind_the_token_serves_what_an_open_api_serves(
    login_api, events_api, warehouse, tmp_path
):
    api = login_api()
    open_url = events_api()
    token = httpx.post(f"{api.url}/login", json={"username": api.user, "password": api.password})
    headers = {"Authorization": f"Bearer {token.json()['access_token']}"}
    window = {"start_date": "2019-01-01", "end_date": "2019-01-03"}
    behind = httpx.get(f"{api.url}/events", params=window, headers=headers, timeout=30)
    assert behind.content == httpx.get(f"{open_url}/events", params=window, timeout=30).content
    other = tmp_path / "open.duckdb"
    load_range(
        D,
        D + timedelta(days=2),
        warehouse_path=warehouse,
        credentials=credentials(api),
        api_url=api.url,
    )
    load_range(D, D + timedelta(days=2), warehouse_path=other, api_url=open_url)
    with duckdb.connect(str(other), read_only=True) as connection:
        open_rows = connection.execute(
            "select event_id, user_id, event_type, event_at from raw.events order by event_id"
        ).fetchall()
    assert [row[:4] for row in stored(warehouse)] == open_rows
