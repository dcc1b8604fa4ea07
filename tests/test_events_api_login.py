"""The events API's login mode (`serve-events --require-login`), over HTTP, the real server."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest

WINDOW = {"start_date": "2019-01-01", "end_date": "2019-01-02"}


def log_in(base: str, user: str, password: str, *, form: bool = False) -> httpx.Response:
    fields = {"username": user, "password": password}
    body = {"data": fields} if form else {"json": fields}
    return httpx.post(f"{base}/login", timeout=10, **body)


def get_events(base: str, token: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(f"{base}/events", params=WINDOW, headers=headers, timeout=30)


def test_a_token_from_post_login_opens_get_events_until_it_expires(login_api):
    api = login_api(token_ttl=2.5, events_per_day=10)

    answer = log_in(api.url, api.user, api.password)

    assert answer.status_code == 200
    body = answer.json()
    assert body["token_type"] == "bearer" and body["expires_in"] == 2.5
    assert answer.headers["cache-control"] == "no-store"
    served = get_events(api.url, body["access_token"])
    assert served.status_code == 200 and len(served.json()) == 10
    time.sleep(2.6)
    expired = get_events(api.url, body["access_token"])
    assert expired.status_code == 401
    assert 'error="invalid_token"' in expired.headers["www-authenticate"]
    assert "expired" in expired.json()["detail"]
    # A form login works the same, and gives another token.
    again = log_in(api.url, api.user, api.password, form=True)
    assert again.status_code == 200 and again.json()["access_token"] != body["access_token"]
    assert get_events(api.url, again.json()["access_token"]).status_code == 200


def test_get_events_without_a_valid_token_is_401_with_a_bearer_challenge(login_api):
    api = login_api(events_per_day=10)

    missing = get_events(api.url)
    unknown = get_events(api.url, "not-a-token-we-issued")
    basic = httpx.get(f"{api.url}/events", params=WINDOW, auth=(api.user, api.password))

    assert missing.status_code == unknown.status_code == basic.status_code == 401
    assert missing.headers["www-authenticate"] == 'Bearer realm="events"'
    assert "POST /login" in missing.json()["detail"]
    assert 'error="invalid_token"' in unknown.headers["www-authenticate"]
    assert "unknown" in unknown.json()["detail"]
    assert httpx.get(f"{api.url}/health").status_code == 200  # the liveness check stays open


@pytest.mark.parametrize("form", [False, True], ids=["json", "form"])
def test_wrong_credentials_and_malformed_logins_are_refused(login_api, form):
    api = login_api()

    wrong_password = log_in(api.url, api.user, api.password + "x", form=form)
    wrong_user = log_in(api.url, "someone", api.password, form=form)
    no_password = httpx.post(f"{api.url}/login", json={"username": api.user})
    not_json = httpx.post(f"{api.url}/login", content=b"{", headers={"content-type": "text/plain"})

    assert wrong_password.status_code == wrong_user.status_code == 401
    assert wrong_password.json() == {"detail": "wrong username or password"}
    assert "access_token" not in wrong_user.text
    assert no_password.status_code == not_json.status_code == 400
    assert "username" in no_password.json()["detail"]
    log = api.log_file.read_text()
    assert "login refused for user 'loader'" in log and api.password not in log


def test_login_is_off_by_default(events_api):
    base = events_api(events_per_day=10)
    assert get_events(base).status_code == 200
    assert httpx.post(f"{base}/login", json={"username": "a", "password": "b"}).status_code in (
        404,
        405,
    )


def test_require_login_without_credentials_in_the_environment_is_refused(monkeypatch):
    monkeypatch.delenv("EVENTS_API_USER", raising=False)
    monkeypatch.delenv("EVENTS_API_PASSWORD", raising=False)
    argv = [sys.executable, "-m", "event_pipeline.cli", "serve-events", "--require-login"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "EVENTS_API_USER and EVENTS_API_PASSWORD" in done.stderr
