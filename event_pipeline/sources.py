"""The events API as a source: download one window to a file, then parse it with DuckDB.

Two record shapes are accepted, in NDJSON or in a JSON array:
- ours:      {"event_id": str, "user": str, "timestamp": ISO 8601 with offset, "event_type": str}
- the book's: {"user": str, "date": "Tue, 01 Jan 2019 00:00:00 GMT"} (RFC 1123, or ISO 8601)
A timestamp without an offset is taken as UTC. Records without an event_id get a deterministic
one (see `stage_events`), so that identical records each count as one event and a reload of the
same delivery yields the same ids.
"""

from __future__ import annotations

import logging
import time
from datetime import date
from pathlib import Path

import duckdb
import httpx

log = logging.getLogger(__name__)

ACCEPT = "application/x-ndjson, application/json;q=0.9"
_RETRYABLE_STATUS = {429, 500, 502, 503, 504}


class EventSourceError(RuntimeError):
    """The events API failed, or sent something that is not a valid list of events."""


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
) -> None:
    """Stream `url` into `destination`, retrying connection errors, timeouts and 5xx.

    `what` names the request in errors (e.g. "events of 2019-01-01"). A 4xx fails at once;
    a response cut short (connection dropped mid-body) counts as a connection error.
    """
    failure = ""
    for attempt in range(1, attempts + 1):
        try:
            with httpx.stream("GET", url, headers={"Accept": ACCEPT}, timeout=timeout) as response:
                status = response.status_code
                if status in _RETRYABLE_STATUS:
                    failure = f"HTTP {status}"
                elif status >= 400:
                    body = response.read()[:300].decode("utf-8", "replace")
                    raise EventSourceError(
                        f"The events API refused the {what}: HTTP {status} from {url}: {body!r}. "
                        "Check the date and EVENTS_API_URL."
                    )
                else:
                    with destination.open("wb") as file:
                        for chunk in response.iter_bytes(1 << 20):
                            file.write(chunk)
                    return
        except httpx.TransportError as error:  # connect/read errors, timeouts, truncated bodies
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
            time.sleep(delay)
    raise EventSourceError(
        f"Could not fetch the {what} from {url} after {attempts} attempts; last error: {failure}. "
        "Is the events API up (EVENTS_API_URL)? Rerun the load when it is: it is idempotent."
    )


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
# delivered more than once is kept once (deterministically: the earliest, then smallest, copy).
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
select *
from identified
qualify row_number() over (
    partition by event_id order by event_at, user_id, event_type nulls first
) = 1
"""

_STAGED_PLAIN_SQL = """
create or replace temp table staged as
select
    event_id_text as event_id,
    user_text as user_id,
    event_type_text as event_type,
    event_at,
    event_at::date as event_date
from delivered
"""


def stage_events(
    connection: duckdb.DuckDBPyConnection, path: Path, *, what: str, url: str
) -> tuple[int, int]:
    """Parse the downloaded file into the temp table `staged` and validate every record.

    `staged` has the columns of raw.events except load_id, one row per event_id. Returns
    (records delivered, duplicate event_ids dropped). Raises EventSourceError naming `what`
    and `url` for malformed JSON or invalid records; then nothing has been written.
    """
    connection.execute("set TimeZone = 'UTC'")  # offset-less ISO timestamps are UTC
    fmt = json_format(path)
    if fmt is None:  # empty body: no events
        connection.execute(
            "create or replace temp table staged as select event_id, user_id, event_type, "
            "event_at, event_date from raw.events limit 0"
        )
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
    connection.execute(_STAGED_SQL if without_id or repeated else _STAGED_PLAIN_SQL)
    ((delivered, staged),) = connection.execute(
        "select (select count(*) from delivered), (select count(*) from staged)"
    ).fetchall()
    connection.execute("drop table delivered")
    return delivered, delivered - staged
