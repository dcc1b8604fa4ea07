"""The events API (FastAPI): GET /events for a UTC window, GET /health, and fault modes.

Bodies are streamed in chunks from a generator, so a day of a million events never sits in
memory. Fault modes make a real server misbehave for the loader's tests: --fail-first answers 503,
--delay answers slowly, --truncate-after sends part of the body and then drops the connection.
Login mode (`login` in ServerConfig, events/login.py) requires a token from POST /login.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Send

from event_pipeline.events import records
from event_pipeline.events.generator import generate_range_batches
from event_pipeline.events.login import LoginConfig, require_login
from event_pipeline.events.replay import ReplayError, read_window

logger = logging.getLogger(__name__)

MAX_RANGE_DAYS = 366
NDJSON = "application/x-ndjson"
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


@dataclass(frozen=True)
class ServerConfig:
    data_dir: Path | None = None  # replay mode when set, generated mode otherwise
    events_per_day: int | None = None  # generated mode; None = 200 to 2000 a day, like the book
    record_format: records.RecordFormat = "standard"
    fail_first: int = 0
    delay: float = 0.0
    truncate_after: int | None = None
    login: LoginConfig | None = None  # login mode when set: GET /events needs a token


class BadRequest(ValueError):
    pass


def parse_window(start_date: str | None, end_date: str | None) -> tuple[date, date]:
    """Validate the query's dates: YYYY-MM-DD, start < end, at most MAX_RANGE_DAYS days."""
    days = []
    for name, value in (("start_date", start_date), ("end_date", end_date)):
        if value is None:
            raise BadRequest(f"{name} is required (YYYY-MM-DD, UTC)")
        try:
            if not _DATE.fullmatch(value):
                raise ValueError
            days.append(date.fromisoformat(value))
        except ValueError:
            raise BadRequest(f"{name}={value!r} is not a date; use YYYY-MM-DD") from None
    start, end = days
    if start >= end:
        raise BadRequest(
            f"start_date {start} must be before end_date {end} (end_date is exclusive: "
            f"one day is start_date=D&end_date=D+1)"
        )
    if (end - start).days > MAX_RANGE_DAYS:
        raise BadRequest(
            f"range {start} to {end} is {(end - start).days} days; at most {MAX_RANGE_DAYS} "
            "days per request, ask for smaller windows"
        )
    return start, end


class TruncatedStreamingResponse(StreamingResponse):
    """Sends only the first `limit` body bytes, then returns without ending the body.

    The server then closes the connection mid-body, so a client sees an incomplete response
    (httpx: RemoteProtocolError), exactly like a connection lost in transit.
    """

    def __init__(self, content: Iterator[bytes], limit: int, **kwargs: object) -> None:
        super().__init__(content, **kwargs)
        self.limit = limit

    async def stream_response(self, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        remaining = self.limit
        async for chunk in self.body_iterator:
            if len(chunk) >= remaining:
                await send(
                    {"type": "http.response.body", "body": chunk[:remaining], "more_body": True}
                )
                logger.warning("--truncate-after %d: dropping the connection", self.limit)
                return
            remaining -= len(chunk)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _wants_ndjson(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return any(part.split(";")[0].strip().lower() == NDJSON for part in accept.split(","))


def create_app(config: ServerConfig) -> FastAPI:
    """The ASGI app; one per server process (the --fail-first count lives in it)."""
    app = FastAPI(title="event-stats events API", docs_url=None, redoc_url=None)
    state = {"events_requests": 0}

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok", "mode": "replay" if config.data_dir else "generated"}

    @app.get("/events")
    async def events(
        request: Request, start_date: str | None = None, end_date: str | None = None
    ) -> Response:
        state["events_requests"] += 1
        number = state["events_requests"]
        if config.delay:
            await asyncio.sleep(config.delay)
        if number <= config.fail_first:
            return JSONResponse(
                {
                    "detail": f"simulated outage (--fail-first {config.fail_first}): "
                    f"request {number} of {config.fail_first}"
                },
                status_code=503,
                headers={"Retry-After": "0"},
            )
        try:
            start, end = parse_window(start_date, end_date)
        except BadRequest as exc:
            return JSONResponse({"detail": str(exc)}, status_code=400)

        if config.data_dir is not None:
            window = (datetime.combine(start, time(), UTC), datetime.combine(end, time(), UTC))
            try:
                # Small files by nature; read them off the event loop.
                replayed = await asyncio.to_thread(read_window, config.data_dir, *window)
            except ReplayError as exc:
                return JSONResponse({"detail": f"replay: {exc}"}, status_code=500)
            lines = records.replayed_records(replayed, config.record_format)
        else:
            generated = generate_range_batches(start, end, config.events_per_day)
            lines = records.generated_records(generated, config.record_format)

        ndjson = _wants_ndjson(request)
        body = records.body_chunks(lines, ndjson=ndjson)
        media_type = NDJSON if ndjson else "application/json"
        if config.truncate_after is not None:
            return TruncatedStreamingResponse(body, config.truncate_after, media_type=media_type)
        return StreamingResponse(body, media_type=media_type)

    if config.login is not None:
        require_login(app, config.login)
    return app


def serve(config: ServerConfig, host: str = "127.0.0.1", port: int = 5000) -> None:
    """Run the API with uvicorn until interrupted (SIGINT/SIGTERM)."""
    import uvicorn

    uvicorn.run(
        create_app(config),
        host=host,
        port=port,
        log_level="info",
        timeout_graceful_shutdown=5,
    )
