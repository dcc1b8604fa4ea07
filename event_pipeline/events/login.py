"""Login mode of the events API: POST /login gives a short-lived bearer token, GET /events needs it.

Off by default (`serve-events --require-login` turns it on). The protocol, documented in README.md:
- `POST /login` with `{"username": ..., "password": ...}` as JSON, or the same two fields as an
  HTML form (application/x-www-form-urlencoded), answers 200 with
  `{"access_token": T, "token_type": "bearer", "expires_in": SECONDS}`; wrong credentials get
  401, a body without both fields 400.
- `GET /events` with `Authorization: Bearer T` is served while T is valid; without a token, or
  with one that is unknown or expired, it answers 401 with a `WWW-Authenticate: Bearer` challenge
  (RFC 6750) saying which. Other paths (/health) stay open.
Tokens are random, kept in this process's memory only, and never logged.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

logger = logging.getLogger(__name__)

REALM = "events"
PROTECTED_PATHS = frozenset({"/events"})
_FORGET_AFTER = 3600.0  # seconds after its expiry that a token is still reported as "expired"


@dataclass(frozen=True)
class LoginConfig:
    """The one user the API accepts, and how long a token stays valid (seconds)."""

    user: str
    password: str = field(repr=False)
    token_ttl: float = 300.0


class TokenStore:
    """Tokens issued by this process and when each expires (monotonic clock)."""

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._expiry: dict[str, float] = {}

    def issue(self) -> str:
        token = secrets.token_urlsafe(32)
        now = self._clock()
        with self._lock:
            for old, expiry in list(self._expiry.items()):
                if expiry + _FORGET_AFTER < now:
                    del self._expiry[old]
            self._expiry[token] = now + self.ttl
        return token

    def problem(self, authorization: str | None) -> str | None:
        """None for a valid `Authorization: Bearer T` header, else what is wrong with it."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "missing"
        with self._lock:
            expiry = self._expiry.get(token.strip())
        if expiry is None:
            return "unknown"
        return "expired" if self._clock() >= expiry else None


def _challenge(problem: str) -> tuple[str, str]:
    """(WWW-Authenticate header, detail) for a request to a protected path."""
    if problem == "missing":
        detail = "a login is required: POST /login, then send Authorization: Bearer <token>"
        return f'Bearer realm="{REALM}"', detail
    detail = f"the token is {problem}: log in again (POST /login)"
    return f'Bearer realm="{REALM}", error="invalid_token", error_description="{detail}"', detail


class RequireToken:
    """ASGI middleware: a request to a protected path without a valid token gets 401."""

    def __init__(self, app: ASGIApp, tokens: TokenStore) -> None:
        self.app = app
        self.tokens = tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in PROTECTED_PATHS:
            headers = dict(scope["headers"])
            authorization = headers.get(b"authorization", b"").decode("latin-1")
            problem = self.tokens.problem(authorization)
            if problem is not None:
                challenge, detail = _challenge(problem)
                response = JSONResponse(
                    {"detail": detail}, status_code=401, headers={"WWW-Authenticate": challenge}
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _credentials(request: Request) -> tuple[str, str] | None:
    """(username, password) from a JSON or form body; None when the body has not both."""
    body = await request.body()
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        if media_type == "application/x-www-form-urlencoded":
            form = parse_qs(body.decode(), keep_blank_values=True)
            fields = {name: values[0] for name, values in form.items()}
        else:
            fields = json.loads(body or b"null")
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(fields, dict):
        return None
    username, password = fields.get("username"), fields.get("password")
    if not isinstance(username, str) or not isinstance(password, str):
        return None
    return username, password


def require_login(app: FastAPI, config: LoginConfig) -> None:
    """Add POST /login to `app` and require its tokens on the protected paths."""
    tokens = TokenStore(config.token_ttl)

    @app.post("/login")
    async def login(request: Request) -> JSONResponse:
        given = await _credentials(request)
        if given is None:
            return JSONResponse(
                {
                    "detail": 'send {"username": ..., "password": ...} as JSON, or username '
                    "and password as a form (application/x-www-form-urlencoded)"
                },
                status_code=400,
            )
        username, password = given
        user_ok = secrets.compare_digest(username.encode(), config.user.encode())
        password_ok = secrets.compare_digest(password.encode(), config.password.encode())
        if not (user_ok and password_ok):
            logger.warning("login refused for user %r", username)
            return JSONResponse(
                {"detail": "wrong username or password"},
                status_code=401,
                headers={"WWW-Authenticate": f'Bearer realm="{REALM}"'},
            )
        logger.info("login of user %r: a token valid for %g s", username, tokens.ttl)
        return JSONResponse(
            {"access_token": tokens.issue(), "token_type": "bearer", "expires_in": tokens.ttl},
            headers={"Cache-Control": "no-store"},
        )

    app.add_middleware(RequireToken, tokens=tokens)
