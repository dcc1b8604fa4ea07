"""A test-only HTTP server that answers exactly as told, including wrongly.

Our events API (uvicorn) always frames its answers correctly. To test what the loader does with
answers it must refuse, this server writes the status line, headers, framing and body by hand on
a raw socket, and can cut the answer at any byte and drop the connection. It runs in a thread of
the test process on a free localhost port; `close()` stops it.

    server = RawHttpServer()
    server.script(Answer(503), Answer(body=b"[]"))   # first request 503, then (every time) `[]`
    ... server.url ...
    server.close()
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Literal

Framing = Literal["content-length", "chunked", "close"]


@dataclass(frozen=True)
class Answer:
    """One HTTP answer.

    framing: "content-length" (the header announces the whole body), "chunked" (chunks of
    `chunk_size`, then the last chunk `0`), or "close" (no length: the end is the connection
    closing). `cut_at` sends only that many bytes of the framed body (chunk lines included), then
    closes the connection: a body cut in transit. `http_version` "HTTP/1.0" gives an old server.
    `delay` waits that many seconds before answering (a slow source).
    """

    status: int = 200
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = (("Content-Type", "application/json"),)
    framing: Framing = "content-length"
    cut_at: int | None = None
    chunk_size: int = 1000
    http_version: str = "HTTP/1.1"
    delay: float = 0.0

    def framed_body(self) -> bytes:
        if self.framing != "chunked":
            return self.body
        parts = [
            b"%x\r\n%s\r\n" % (len(piece), piece)
            for piece in (
                self.body[i : i + self.chunk_size]
                for i in range(0, len(self.body), self.chunk_size)
            )
        ]
        return b"".join(parts) + b"0\r\n\r\n"

    def head(self) -> bytes:
        try:
            reason = HTTPStatus(self.status).phrase
        except ValueError:
            reason = "Unknown"
        lines = [f"{self.http_version} {self.status} {reason}"]
        lines += [f"{name}: {value}" for name, value in self.headers]
        if self.framing == "content-length":
            lines.append(f"Content-Length: {len(self.body)}")
        elif self.framing == "chunked":
            lines.append("Transfer-Encoding: chunked")
        lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def wire(self) -> bytes:
        body = self.framed_body()
        if self.cut_at is not None:
            body = body[: self.cut_at]
        return self.head() + body


def ndjson_answer(body: bytes, **options: object) -> Answer:
    return Answer(body=body, headers=(("Content-Type", "application/x-ndjson"),), **options)


@dataclass
class RawHttpServer:
    """Answers each request with the next Answer of its script; the last one repeats."""

    answers: list[Answer] = field(default_factory=lambda: [Answer(body=b"[]")])
    requests: list[str] = field(default_factory=list)  # request lines, in order

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._served = 0
        self._socket = socket.socket()
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self._socket.listen(16)
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        self._thread = threading.Thread(target=self._accept, name="raw-http", daemon=True)
        self._thread.start()

    def script(self, *answers: Answer) -> None:
        """Answer the next requests with `answers` in order (the last one repeats)."""
        with self._lock:
            self.answers = list(answers)
            self._served = 0
            self.requests.clear()

    def _next_answer(self, request_line: str) -> Answer:
        with self._lock:
            self.requests.append(request_line)
            answer = self.answers[min(self._served, len(self.answers) - 1)]
            self._served += 1
            return answer

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._socket.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection: socket.socket) -> None:
        with connection:
            request = b""
            while b"\r\n\r\n" not in request:
                data = connection.recv(65536)
                if not data:
                    return
                request += data
            request_line = request.split(b"\r\n", 1)[0].decode("latin-1")
            answer = self._next_answer(request_line)
            time.sleep(answer.delay)
            try:
                connection.sendall(answer.wire())
                connection.shutdown(socket.SHUT_WR)
            except OSError:  # the client went away first
                pass

    def close(self) -> None:
        try:
            self._socket.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
        except OSError:
            pass
        self._socket.close()
        self._thread.join(timeout=5)
