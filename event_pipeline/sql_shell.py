"""`event-stats sql`: run SQL given on the command line or read from stdin, print the results.

stdout holds only results (table, csv or json); errors go to stderr, and so does the prompt when
stdout is not the terminal. The statements run in `warehouse.query`, which opens the warehouse
only while a batch of them runs.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import sys
from collections.abc import Callable
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, TextIO
from uuid import UUID

from event_pipeline.warehouse.query import QueryError, QueryResult, QuerySession

PROMPT = "event-stats> "
CONTINUATION = "        ...> "
QUIT_COMMANDS = {".quit", ".exit"}


def run_sql(session: QuerySession, sql: str, output_format: str) -> int:
    """Run the statements of `sql` as one batch; 0 on success, 1 (and a message) on an error."""
    printer = _Printer(output_format)
    printer.run(session, sql)
    return printer.exit_code


def run_prompt(session: QuerySession, output_format: str) -> int:
    """Read `;`-terminated statements from stdin until EOF or .quit; run each as it completes.

    A prompt is shown only when stdin is a terminal. A failed statement is reported and the
    next one runs; the exit code is 1 when any statement failed.
    """
    printer = _Printer(output_format)
    read_line = _line_reader(sys.stdin, sys.stdout, sys.stderr)
    pending = ""
    while True:
        try:
            line = read_line(CONTINUATION if pending.strip() else PROMPT)
        except KeyboardInterrupt:  # Ctrl-C at the prompt drops the statement being typed
            print(file=sys.stderr)
            pending = ""
            continue
        if line is None:  # EOF: run what is left, even without a final `;`
            if pending.strip():
                printer.run(session, pending)
            return printer.exit_code
        if not pending.strip() and line.strip().startswith("."):
            command = line.strip().rstrip(";")
            if command in QUIT_COMMANDS:
                return printer.exit_code
            printer.error(f"unknown command {command} (known: .quit, .exit)")
            continue
        pending += line
        end = complete_statements_end(pending)
        if end:
            batch, pending = pending[:end], pending[end:]
            try:
                printer.run(session, batch)
            except KeyboardInterrupt:  # Ctrl-C cancels the statement, not the session
                printer.error("interrupted")


class _Printer:
    """Results to stdout (a blank line between two tables or csv results), errors to stderr."""

    def __init__(self, output_format: str) -> None:
        self.output_format = output_format
        self.printed = False
        self.exit_code = 0

    def run(self, session: QuerySession, sql: str) -> None:
        try:
            results = session.execute(sql)
        except QueryError as error:
            self.results(error.completed)
            self.error(str(error))
        else:
            self.results(results)

    def results(self, results: list[QueryResult]) -> None:
        for result in results:
            if self.printed and self.output_format != "json":
                sys.stdout.write("\n")
            sys.stdout.write(format_result(result, self.output_format))
            self.printed = True
        sys.stdout.flush()  # a reader on a pipe sees each result as soon as it is ready

    def error(self, message: str) -> None:
        print(f"sql: {message}", file=sys.stderr, flush=True)
        self.exit_code = 1


def _line_reader(stdin: TextIO, stdout: TextIO, stderr: TextIO) -> Callable[[str], str | None]:
    """A function that reads the next line (None at EOF), prompting only on a terminal."""
    if not stdin.isatty():
        return lambda prompt: stdin.readline() or None
    if stdout.isatty():
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass

        def read_with_input(prompt: str) -> str | None:
            try:
                return input(prompt) + "\n"
            except EOFError:
                print(file=stdout)
                return None

        return read_with_input

    def read_prompting_on_stderr(prompt: str) -> str | None:  # stdout is piped: results only
        stderr.write(prompt)
        stderr.flush()
        line = stdin.readline()
        if not line:
            stderr.write("\n")
        return line or None

    return read_prompting_on_stderr


# Where a statement's text cannot end: inside quotes, comments and dollar-quoted strings.
_DOLLAR_QUOTE = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")


def complete_statements_end(text: str) -> int:
    """The index just after the last `;` that ends a statement in `text` (0 if none does).

    Semicolons inside 'strings', "identifiers", $$dollar quotes$$, -- comments and /* comments */
    do not end a statement.
    """
    end = 0
    i = 0
    while i < len(text):
        char = text[i]
        if char == ";":
            end = i + 1
            i += 1
        elif char in "'\"":
            i = _after_quoted(text, i, escapes=char == "'" and _is_escape_string(text, i))
        elif text.startswith("--", i):
            newline = text.find("\n", i)
            i = len(text) if newline < 0 else newline + 1
        elif text.startswith("/*", i):
            i = _after_block_comment(text, i)
        elif char == "$" and (match := _DOLLAR_QUOTE.match(text, i)):
            closing = text.find(match.group(0), match.end())
            i = len(text) if closing < 0 else closing + len(match.group(0))
        else:
            i += 1
    return end


def _is_escape_string(text: str, quote: int) -> bool:
    """E'...' strings take backslash escapes."""
    return quote > 0 and text[quote - 1] in "eE" and (quote < 2 or not text[quote - 2].isalnum())


def _after_quoted(text: str, start: int, *, escapes: bool) -> int:
    quote = text[start]
    i = start + 1
    while i < len(text):
        if escapes and text[i] == "\\":
            i += 2
        elif text[i] == quote:
            if text.startswith(quote * 2, i):  # '' inside '...' is one quote
                i += 2
            else:
                return i + 1
        else:
            i += 1
    return len(text)


def _after_block_comment(text: str, start: int) -> int:
    depth = 0
    i = start
    while i < len(text):
        if text.startswith("/*", i):
            depth += 1
            i += 2
        elif text.startswith("*/", i):
            depth -= 1
            i += 2
            if depth == 0:
                return i
        else:
            i += 1
    return len(text)


def format_result(result: QueryResult, output_format: str) -> str:
    """One result as text ending with a newline; an empty result still shows its header."""
    if output_format == "json":
        return _as_json(result) + "\n"
    if output_format == "csv":
        return _as_csv(result)
    return _as_table(result)


def _as_json(result: QueryResult) -> str:
    """An array of objects, one per row, in column order."""
    names = [json.dumps(column.name, ensure_ascii=False) for column in result.columns]
    rows = (
        "{"
        + ", ".join(f"{name}: {_json_value(value)}" for name, value in zip(names, row, strict=True))
        + "}"
        for row in result.rows
    )
    return "[" + ", ".join(rows) + "]"


def _json_value(value: Any) -> str:
    """JSON text for a DuckDB value: exact numbers, ISO dates and times, null for NULL."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else "null"
    if isinstance(value, Decimal):
        return format(value, "f") if value.is_finite() else "null"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_json_value(item) for item in value) + "]"
    if isinstance(value, dict):
        items = (f"{json.dumps(str(key))}: {_json_value(item)}" for key, item in value.items())
        return "{" + ", ".join(items) + "}"
    return json.dumps(_scalar_text(value, iso=True), ensure_ascii=False)


def _scalar_text(value: Any, *, iso: bool) -> str:
    """A scalar as text: ISO 8601 (json) or DuckDB's own spelling (table, csv)."""
    if isinstance(value, datetime | date | time):
        return value.isoformat() if iso else str(value)
    if isinstance(value, timedelta):
        return _iso_duration(value) if iso else _interval_text(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return _blob_text(bytes(value))
    if isinstance(value, UUID):
        return str(value)
    return str(value)


def _interval_parts(value: timedelta) -> tuple[str, int, int, int, Decimal]:
    """Sign, days, hours, minutes, seconds (months of an INTERVAL arrive as 30 days)."""
    micros = abs(value // timedelta(microseconds=1))
    days, micros = divmod(micros, 86_400_000_000)
    hours, micros = divmod(micros, 3_600_000_000)
    minutes, micros = divmod(micros, 60_000_000)
    seconds = (Decimal(micros) / 1_000_000).normalize()
    return ("-" if value < timedelta(0) else ""), days, hours, minutes, seconds


def _iso_duration(value: timedelta) -> str:
    """An ISO 8601 duration, e.g. P1DT2H30M0.5S."""
    sign, days, hours, minutes, seconds = _interval_parts(value)
    return f"{sign}P{days}DT{hours}H{minutes}M{format(seconds, 'f')}S"


def _interval_text(value: timedelta) -> str:
    """As DuckDB shows an INTERVAL, e.g. 1 day 02:30:00.5 or -01:30:00."""
    sign, days, hours, minutes, seconds = _interval_parts(value)
    whole, _, fraction = format(seconds, "f").partition(".")
    clock = f"{hours:02}:{minutes:02}:{int(whole):02}" + (f".{fraction}" if fraction else "")
    day_part = f"{days} day{'s' if days != 1 else ''} " if days else ""
    return f"{sign}{day_part}{clock}"


def _blob_text(value: bytes) -> str:
    """Printable ASCII as is, other bytes as \\xHH, as DuckDB shows a BLOB."""
    return "".join(
        chr(byte) if 32 <= byte < 127 and byte != 92 else f"\\x{byte:02X}" for byte in value
    )


def _cell(value: Any) -> str:
    """A value for the table and csv formats (None is handled by the caller)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, list | tuple | dict):
        return _json_value(value)
    return _scalar_text(value, iso=False)


def _as_csv(result: QueryResult) -> str:
    """Header and rows; fields with commas, quotes or newlines quoted (RFC 4180); NULL empty."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(column.name for column in result.columns)
    for row in result.rows:
        writer.writerow("" if value is None else _cell(value) for value in row)
    return buffer.getvalue()


def _as_table(result: QueryResult) -> str:
    """Aligned columns under a header and a rule; numbers right-aligned, NULL shown as NULL."""
    header = [column.name for column in result.columns]
    cells = [
        ["NULL" if value is None else _table_text(_cell(value)) for value in row]
        for row in result.rows
    ]
    widths = [max(len(text) for text in column) for column in zip(header, *cells, strict=True)]
    numeric = [_is_numeric_type(column.type) for column in result.columns]

    def line(texts: list[str]) -> str:
        padded = (
            text.rjust(width) if right else text.ljust(width)
            for text, width, right in zip(texts, widths, numeric, strict=True)
        )
        return "  ".join(padded).rstrip() + "\n"

    rule = line(["-" * width for width in widths])
    return line(header) + rule + "".join(line(row) for row in cells)


def _table_text(text: str) -> str:
    """Keep one row on one line: control characters shown escaped."""
    return text.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


_NUMERIC_TYPES = re.compile(
    r"^(U?(TINY|SMALL|BIG|HUGE)?INT(EGER)?|UHUGEINT|FLOAT|DOUBLE|REAL|DECIMAL(\(.*\))?)$"
)


def _is_numeric_type(type_name: str) -> bool:
    return bool(_NUMERIC_TYPES.match(type_name))
