"""The events API as a source: download one window to a file, then parse it with DuckDB.

Two record shapes are accepted, in NDJSON or in a JSON array:
- ours:      {"event_id": str, "user": str, "timestamp": ISO 8601 with offset, "event_type": str}
- the book's: {"user": str, "date": "Tue, 01 Jan 2019 00:00:00 GMT"} (RFC 1123, or ISO 8601)
A timestamp without an offset is taken as UTC. Records without an event_id get a deterministic
one (see `stage_events`), so that identical records each count as one event and a reload of the
same delivery yields the same ids.

An answer is one window of one or more days (a range load asks for up to MAX_WINDOW_DAYS days at
once). It replaces the stored days only when it is provably complete (`download` checks it), as a
whole: a cut or malformed range answer replaces none of its days.
- status 200. 429 and 5xx are retried; anything else (204, 206, a 3xx, a 4xx) fails at once.
  Redirects are NOT followed: the URL in EVENTS_API_URL is the source of record (it is written to
  raw.load_log), and a redirect is a moved or misconfigured source that a person should confirm by
  setting EVENTS_API_URL to the new address.
- framing: a Content-Length that the body matched, or a chunked body with its last chunk (httpx
  and h11 raise RemoteProtocolError otherwise: retried like any connection error). A body whose
  end is marked only by the connection closing (no Content-Length, not chunked) is accepted only
  when its own structure proves it ended: a JSON array must end with its closing ']' (else it is
  retried as a cut body); close-delimited NDJSON, or an empty close-delimited body, cannot be
  proven complete and is refused.
- structure: a JSON array must end with ']'. An empty body is an empty window only when it is
  properly framed and declared NDJSON (Content-Type application/x-ndjson); otherwise an empty
  window must come as `[]`.
Completeness is checked on the file's tail: the body never enters Python memory whole.

Login (when credentials are configured, see `ApiLogin`): the download first gets a bearer token
from POST /login and sends it with GET /events. A 401 from /events (an expired token) leads to one
new login and one retry of the request; a fresh token refused again, or credentials refused by
/login (401/403), fail at once. The token stays inside the ApiLogin of one load: it is in no log
line, no exception message and no return value.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from urllib.parse import urlsplit

import duckdb
import httpx

from event_pipeline import settings

log = logging.getLogger(__name__)

STAGED = "staged"  # the temp table `stage_events` fills, read by warehouse.raw
MAX_WINDOW_DAYS = 366  # the events API answers at most this many days per request

ACCEPT = "application/x-ndjson, application/json;q=0.9"
# The body must arrive as sent: inside a compressed body, a stream cut at a line boundary can sit
# in intact HTTP framing, and httpx's decoders do not check that the stream ended.
REQUEST_HEADERS = {"Accept": ACCEPT, "Accept-Encoding": "identity"}
NDJSON_TYPES = frozenset(
    {"application/x-ndjson", "application/ndjson", "application/jsonl", "application/x-jsonlines"}
)
_RETRYABLE_STATUS = {429, 500, 502, 503, 504}
_REDIRECT_STATUS = {301, 302, 303, 307, 308}
_WHITESPACE = b" \t\r\n"


class EventSourceError(RuntimeError):
    """The events API failed, or sent something that is not a valid list of events."""


class LoginRefused(EventSourceError):
    """The events API refused the credentials (401/403 from POST /login): a retry cannot help."""


class DownloadCancelled(Exception):
    """The download was cancelled from another thread (see `Cancellation`)."""


class _Incomplete(Exception):
    """An answer that may succeed when asked again: 429/5xx, or a body cut short."""


class _TokenRejected(Exception):
    """GET /events answered 401: no token, or one that is unknown or expired."""

    def __init__(self, challenge: str) -> None:
        super().__init__(challenge)
        self.challenge = challenge


@dataclass(frozen=True)
class Credentials:
    """A user and password for the events API's POST /login (the password is in no repr)."""

    user: str
    password: str = field(repr=False)


def _hint() -> str:
    return (
        "Check the user and password: $EVENTS_API_USER and $EVENTS_API_PASSWORD for the command "
        f"line, the Airflow connection {settings.events_api_conn_id()!r} for the DAG"
    )


class ApiLogin:
    """The bearer token of one load: logs in on first use, and again when the API rejects it.

    Thread-safe (downloads run in a prefetch thread). The token never leaves this object except
    as the Authorization header of a request; its repr shows the URL and the user only.
    """

    def __init__(self, api_url: str, credentials: Credentials, timeout: float) -> None:
        self.url = f"{api_url.rstrip('/')}/login"
        self.user = credentials.user
        self._credentials = credentials
        self._timeout = timeout
        self._lock = threading.Lock()
        self._token: str | None = None

    def __repr__(self) -> str:
        return f"ApiLogin(url={self.url!r}, user={self.user!r})"

    def authorization(self) -> dict[str, str]:
        """The Authorization header, logging in first when there is no token yet."""
        with self._lock:
            if self._token is None:
                self._token = self._log_in()
            return {"Authorization": f"Bearer {self._token}"}

    def renew(self, rejected: dict[str, str]) -> dict[str, str]:
        """Log in again after the API rejected the header `rejected`, unless another thread has
        already replaced that token; returns the new header."""
        with self._lock:
            if self._token is None or rejected.get("Authorization") == f"Bearer {self._token}":
                self._token = None
                self._token = self._log_in()
            return {"Authorization": f"Bearer {self._token}"}

    def _log_in(self) -> str:
        """POST the credentials; raises _Incomplete (retryable), LoginRefused or EventSourceError.

        No exception raised here carries the request (whose body holds the password)."""
        who = f"user {self.user!r} at {self.url}"
        body = {"username": self._credentials.user, "password": self._credentials.password}
        try:
            response = httpx.post(self.url, json=body, timeout=self._timeout)
        except httpx.TransportError as error:
            raise _Incomplete(f"login of {who}: {type(error).__name__}: {error}") from None
        status = response.status_code
        if status in _RETRYABLE_STATUS:
            raise _Incomplete(f"login of {who}: HTTP {status}")
        if status in (401, 403):
            raise LoginRefused(
                f"The events API refused the login of {who} (HTTP {status}): wrong user or "
                f"password. {_hint()}. Nothing was written."
            )
        token = None
        if status == 200:
            try:
                answer = response.json()
                token = answer.get("access_token") if isinstance(answer, dict) else None
            except ValueError:
                token = None
        if not isinstance(token, str) or not token:
            raise EventSourceError(
                f"The login of {who} answered HTTP {status} without an access_token: is "
                "EVENTS_API_URL the events API, and does it require a login (serve-events "
                "--require-login)? Without a login, unset the credentials. Nothing was written."
            )
        log.info("Logged in to the events API as %r (%s)", self.user, self.url)
        return token


class Cancellation:
    """Stops a download running in another thread.

    Once `cancel()` has returned, the download creates no file and writes no more bytes, so the
    caller may remove its directory at once, without waiting for a slow source.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._event = threading.Event()

    def cancel(self) -> None:
        with self._lock:
            self._event.set()

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Hold off `cancel()` while touching the file; raise DownloadCancelled once cancelled."""
        with self._lock:
            if self._event.is_set():
                raise DownloadCancelled
            yield

    def sleep(self, seconds: float) -> None:
        if self._event.wait(seconds):
            raise DownloadCancelled


@dataclass(frozen=True)
class Delivery:
    """A downloaded answer and what its headers said about it."""

    path: Path
    framing: str  # "content-length", "chunked" or "close" (end marked only by the connection)
    media_type: str  # Content-Type without parameters, lower case ("" when absent)
    size: int  # body bytes, after content decoding


def window_url(api_url: str, start: date, end: date) -> str:
    """The URL of the events of [start, end), as it appears in logs and in raw.load_log."""
    return f"{api_url.rstrip('/')}/events?start_date={start.isoformat()}&end_date={end.isoformat()}"


def download(
    url: str,
    destination: Path,
    *,
    what: str,
    attempts: int,
    timeout: float,
    backoff: float,
    cancellation: Cancellation | None = None,
    login: ApiLogin | None = None,
) -> Delivery:
    """Stream `url` into `destination` and check that the answer is complete (module docstring).

    Connection errors, timeouts, 429/5xx and cut bodies are retried up to `attempts` times with
    exponential `backoff`; other refusals fail at once. `what` names the request in errors
    (e.g. "events of 2019-01-01"). `cancellation` lets another thread stop it (DownloadCancelled).
    `login` sends its token (see the module docstring); without it, a 401 fails naming the
    settings that configure a login.
    """
    cancellation = cancellation or Cancellation()
    failure = ""
    for attempt in range(1, attempts + 1):
        try:
            return _download_once(url, destination, what, timeout, cancellation, login)
        except _Incomplete as error:
            failure = str(error)
        except httpx.TransportError as error:  # connect/read errors, timeouts, cut framed bodies
            failure = f"{type(error).__name__}: {error}"
        if attempt < attempts:
            delay = backoff * 2 ** (attempt - 1)
            log.warning(
                "Fetching the %s from %s failed (%s), attempt %d of %d; retrying in %.1f s",
                what,
                url,
                failure,
                attempt,
                attempts,
                delay,
            )
            cancellation.sleep(delay)
    raise EventSourceError(
        f"Could not fetch the {what} from {url} after {attempts} attempts; last error: {failure}. "
        "Is the events API up (EVENTS_API_URL)? Rerun the load when it is: it is idempotent."
    )


def _download_once(
    url: str,
    destination: Path,
    what: str,
    timeout: float,
    cancellation: Cancellation,
    login: ApiLogin | None,
) -> Delivery:
    """One attempt; with a login, a 401 leads to one new login and one more request."""
    if login is None:
        try:
            return _get(url, destination, what, timeout, cancellation, {})
        except _TokenRejected as rejected:
            raise EventSourceError(
                f"The events API requires a login for the {what} from {url} (HTTP 401, "
                f"WWW-Authenticate: {rejected.challenge or 'missing'}). Set $EVENTS_API_USER and "
                "$EVENTS_API_PASSWORD (command line) or the Airflow connection "
                f"{settings.events_api_conn_id()!r} (the DAG). Nothing was written."
            ) from None
    authorization = login.authorization()
    try:
        return _get(url, destination, what, timeout, cancellation, authorization)
    except _TokenRejected:
        log.info("The events API rejected the token for the %s (expired): logging in again", what)
    authorization = login.renew(authorization)
    try:
        return _get(url, destination, what, timeout, cancellation, authorization)
    except _TokenRejected as rejected:
        raise EventSourceError(
            f"The events API rejected a fresh token of user {login.user!r} for the {what} from "
            f"{url} (HTTP 401, {rejected.challenge or 'no WWW-Authenticate'}), right after "
            f"{login.url} issued it. Is {login.url} the login of this events API? "
            "Nothing was written."
        ) from None


def _get(
    url: str,
    destination: Path,
    what: str,
    timeout: float,
    cancellation: Cancellation,
    authorization: dict[str, str],
) -> Delivery:
    headers = {**REQUEST_HEADERS, **authorization}
    with httpx.stream("GET", url, headers=headers, timeout=timeout) as response:
        _check_status(response, what, url)
        _check_encoding(response, what, url)
        size = _write_body(response, destination, cancellation)
        delivery = Delivery(destination, _framing(response), _media_type(response), size)
    _check_complete(delivery, what=what, url=url)
    return delivery


def _check_status(response: httpx.Response, what: str, url: str) -> None:
    status = response.status_code
    if status == 200:
        return
    if status in _RETRYABLE_STATUS:
        raise _Incomplete(f"HTTP {status}")
    if status == 401:
        raise _TokenRejected(response.headers.get("www-authenticate", ""))
    answered = f"The events API answered HTTP {status} {response.reason_phrase}".rstrip()
    if status in _REDIRECT_STATUS:
        location = response.headers.get("location", "")
        raise EventSourceError(
            f"{answered} for the {what} from {url}, a redirect to {location or '(no Location)'}. "
            "The loader does not follow redirects: the configured URL is the source of record. "
            f"If the API has moved, set EVENTS_API_URL to {_base_url(location, url)} and rerun "
            "the load. Nothing was written."
        )
    if status < 400:
        raise EventSourceError(
            f"{answered} for the {what} from {url}; only 200 with the day's events (a JSON "
            "array or NDJSON) can replace a stored day, so nothing was written. Check that "
            "EVENTS_API_URL points at the events API."
        )
    body = response.read()[:300].decode("utf-8", "replace")
    raise EventSourceError(
        f"The events API refused the {what}: HTTP {status} from {url}: {body!r}. "
        "Check the date and EVENTS_API_URL."
    )


def _check_encoding(response: httpx.Response, what: str, url: str) -> None:
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise EventSourceError(
            f"The events API answered the {what} from {url} with Content-Encoding {encoding!r} "
            "although the loader asked for none (Accept-Encoding: identity): the end of a "
            "compressed body cannot be verified, so nothing was written. Configure the API (or "
            "the proxy before it) to honour Accept-Encoding: identity."
        )


def _base_url(location: str, url: str) -> str:
    """The EVENTS_API_URL that a redirect's Location implies ('<its base>' when unclear)."""
    target = httpx.URL(url).join(location) if location else None
    if target is None or not target.path.endswith("/events"):
        return "the new base URL (without /events)"
    parts = urlsplit(str(target))
    return f"{parts.scheme}://{parts.netloc}{parts.path.removesuffix('/events')}"


def _write_body(response: httpx.Response, destination: Path, cancellation: Cancellation) -> int:
    size = 0
    try:
        with cancellation.writing():
            file = destination.open("wb")
        with file:
            for chunk in response.iter_bytes(1 << 20):
                with cancellation.writing():
                    file.write(chunk)
                size += len(chunk)
    except DownloadCancelled:
        destination.unlink(missing_ok=True)
        raise
    return size


def _framing(response: httpx.Response) -> str:
    if "chunked" in response.headers.get("transfer-encoding", "").lower():
        return "chunked"
    if "content-length" in response.headers:
        return "content-length"
    return "close"


def _media_type(response: httpx.Response) -> str:
    return response.headers.get("content-type", "").split(";")[0].strip().lower()


def _check_complete(delivery: Delivery, *, what: str, url: str) -> None:
    """Refuse an answer that does not prove it is the whole window (see the module docstring).

    Raises EventSourceError, or _Incomplete for a close-delimited array cut short (retried).
    """
    fmt = json_format(delivery.path)
    close_delimited = delivery.framing == "close"
    if fmt == "array":
        if _last_byte(delivery.path) != b"]":
            problem = (
                "the connection closed before its closing ']' (cut in transit)"
                if close_delimited
                else "it ends without its closing ']'"
            )
            if close_delimited:
                raise _Incomplete(f"incomplete JSON array: {problem}")
            raise EventSourceError(
                f"The {what} from {url} is an incomplete JSON array: {problem}; nothing was "
                "written. A complete answer ends with ']' (an empty day is `[]`)."
            )
        return
    if close_delimited:
        shape = "an empty body" if fmt is None else "NDJSON"
        raise EventSourceError(
            f"The {what} from {url} came as {shape} whose end was marked only by the connection "
            "closing (no Content-Length, not chunked): a cut between two lines would look like "
            "a shorter day, so it is refused and nothing was written. Serve it with "
            "Content-Length or chunked transfer encoding (HTTP/1.1), or as a JSON array."
        )
    if fmt is None and delivery.media_type not in NDJSON_TYPES:
        raise EventSourceError(
            f"The {what} from {url} is an empty body (Content-Type "
            f"{delivery.media_type or 'missing'}), which does not prove an empty day: an empty "
            "day is `[]`, or an empty answer declared as NDJSON (Content-Type "
            "application/x-ndjson). Nothing was written."
        )


def _last_byte(path: Path) -> bytes:
    """The last non-whitespace byte of a file (b'' if none), read from its tail only."""
    with path.open("rb") as file:
        end = file.seek(0, 2)
        while end > 0:
            start = max(0, end - 4096)
            file.seek(start)
            block = file.read(end - start).rstrip(_WHITESPACE)
            if block:
                return block[-1:]
            end = start
    return b""


def json_format(path: Path) -> str | None:
    """'array' or 'newline_delimited' from the first non-blank byte; None for an empty body."""
    with path.open("rb") as file:
        while chunk := file.read(4096):
            stripped = chunk.lstrip()
            if stripped:
                return "array" if stripped[:1] == b"[" else "newline_delimited"
    return None


# Every field is read as JSON so that a mistyped value (a number where a string belongs) is
# reported rather than silently cast. Unknown fields are ignored.
_PARSED_SQL = """
create or replace temp table delivered as
with records as (
    select *
    from read_json(?, format = ?, columns = {
        'event_id': 'JSON', 'user': 'JSON', 'timestamp': 'JSON',
        'event_type': 'JSON', 'date': 'JSON'
    })
),
typed as (
    select
        event_id,
        "user",
        event_type,
        coalesce("timestamp", "date") as raw_time,
        if("timestamp" is null and "date" is not null, 'date', 'timestamp') as time_field,
        event_id ->> '$' as event_id_text,
        "user" ->> '$' as user_text,
        event_type ->> '$' as event_type_text,
        coalesce("timestamp", "date") ->> '$' as time_text
    from records
)
select
    *,
    coalesce(
        timezone('UTC', try_cast(time_text as timestamptz)),
        try_strptime(time_text, '%a, %d %b %Y %H:%M:%S GMT')
    ) as event_at
from typed
"""

_PROBLEM_SQL = """
select problem, count(*) as records, any_value(example) as example
from (
    select
        case
            when "user" is null then 'missing "user"'
            when json_type("user") <> 'VARCHAR' then '"user" is not a string'
            when user_text = '' then '"user" is empty'
            when event_id is not null and json_type(event_id) <> 'VARCHAR'
                then '"event_id" is not a string'
            when event_id_text = '' then '"event_id" is empty'
            when event_type is not null and json_type(event_type) <> 'VARCHAR'
                then '"event_type" is not a string'
            when raw_time is null then 'missing "timestamp" (or the book''s "date")'
            when json_type(raw_time) <> 'VARCHAR'
                then '"' || time_field || '" is not a string'
            when event_at is null
                then '"' || time_field || '" is not ISO 8601 or RFC 1123 '
                    || '(''Tue, 01 Jan 2019 00:00:00 GMT'')'
        end as problem,
        json_object(
            'event_id', event_id, 'user', "user", time_field, raw_time, 'event_type', event_type
        )::varchar as example
    from delivered
)
where problem is not null
group by problem
order by problem
"""

# One row per event: the delivery's own event_id, or for records without one (the book's shape)
# md5 of (user, UTC timestamp, event_type, ordinal among identical records). Identical records
# thus stay distinct events, and the same delivery always gives the same ids. An event_id
# delivered more than once is kept once, deterministically: a copy dated inside the requested
# window first (so a copy outside the window never hides one inside), then the earliest,
# smallest; `copies` says how many copies it had.
_STAGED_SQL = """
create or replace temp table staged as
with numbered as (
    select
        event_id_text,
        user_text as user_id,
        event_type_text as event_type,
        event_at,
        row_number() over (
            partition by event_id_text is null, user_text, event_at, event_type_text
        ) as ordinal
    from delivered
),
identified as (
    select
        coalesce(
            event_id_text,
            'md5-' || md5(concat_ws(
                chr(31), user_id, strftime(event_at, '%Y-%m-%dT%H:%M:%S.%f'),
                coalesce(event_type, ''), ordinal::varchar
            ))
        ) as event_id,
        user_id,
        event_type,
        event_at,
        event_at::date as event_date
    from numbered
)
select
    *,
    count(*) over (partition by event_id) as copies
from identified
qualify row_number() over (
    partition by event_id
    order by
        event_date >= $start and event_date < $end desc,
        event_at, user_id, event_type nulls first
) = 1
"""

_STAGED_PLAIN_SQL = """
create or replace temp table staged as
select
    event_id_text as event_id,
    user_text as user_id,
    event_type_text as event_type,
    event_at,
    event_at::date as event_date,
    1 as copies
from delivered
"""

_STAGED_EMPTY_SQL = """
create or replace temp table staged (
    event_id varchar, user_id varchar, event_type varchar, event_at timestamp, event_date date,
    copies bigint
)
"""


def stage_events(
    connection: duckdb.DuckDBPyConnection,
    path: Path,
    *,
    what: str,
    url: str,
    start: date,
    end: date,
) -> tuple[int, int]:
    """Parse the downloaded answer for [start, end) into the temp table `staged`, validating
    every record.

    `staged` has the columns of raw.events except load_id, plus `copies` (how often the
    delivery held the event_id): one row per event_id, preferring a copy dated inside
    [start, end) when an id comes more than once. Rows dated outside the window stay in it, for
    the caller to count. Returns (records delivered, duplicate event_ids dropped). Raises
    EventSourceError naming `what` and `url` for malformed JSON or invalid records; then
    nothing has been written.
    """
    connection.execute("set TimeZone = 'UTC'")  # offset-less ISO timestamps are UTC
    fmt = json_format(path)
    if fmt is None:  # empty body: no events
        connection.execute(_STAGED_EMPTY_SQL)
        return 0, 0
    try:
        connection.execute(_PARSED_SQL, [str(path), fmt])
    except duckdb.Error as error:
        raise EventSourceError(
            f"The {what} from {url} could not be read as JSON event objects (malformed or "
            f"truncated JSON, or not an array/NDJSON of objects): {error}"
        ) from error
    problems = connection.execute(_PROBLEM_SQL).fetchall()
    if problems:
        details = "; ".join(
            f"{records} record(s) with {problem}, e.g. {example}"
            for problem, records, example in problems
        )
        raise EventSourceError(f"The {what} from {url} has invalid records: {details}")
    ((without_id, repeated),) = connection.execute(
        "select count(*) filter (where event_id_text is null), "
        "count(event_id_text) - count(distinct event_id_text) from delivered"
    ).fetchall()
    # The common case (every record has a distinct event_id) needs no window functions.
    if without_id or repeated:
        connection.execute(_STAGED_SQL, {"start": start, "end": end})
    else:
        connection.execute(_STAGED_PLAIN_SQL)
    ((delivered, staged),) = connection.execute(
        "select (select count(*) from delivered), (select count(*) from staged)"
    ).fetchall()
    connection.execute("drop table delivered")
    return delivered, delivered - staged
