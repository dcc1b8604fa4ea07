"""Read-only SQL on the warehouse: what `event-stats sql` runs, returned as typed results.

A `QuerySession` opens the warehouse read-only through `warehouse.connect` (the one place that
knows how the storage is opened). On a DuckLake (the default) it keeps that connection for the
whole session: a reader idle between statements blocks no writer there, and each statement sees
the latest commit. A DuckDB file is held by whichever process has it open, and a reader blocks
the pipeline's writers just as a writer does: on a file the session opens it for each batch of
statements and closes it before returning, so an idle session holds nothing; settings (SET,
RESET, USE, SET VARIABLE) are replayed on every new connection, so they last the whole session;
temporary tables, views and macros last one batch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import duckdb

from event_pipeline import settings
from event_pipeline.warehouse import WarehouseLockedError, connect, lake

T = TypeVar("T")

# Statement types whose effect is a session setting: replayed on each new connection.
_SESSION_SETTING_TYPES = {duckdb.StatementType.SET}
_QUERY_RESULT = [duckdb.ExpectedResultType.QUERY_RESULT]


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # DuckDB's type name, e.g. DATE, BIGINT, DECIMAL(18,3), VARCHAR[]


@dataclass(frozen=True)
class QueryResult:
    """The rows of one statement that returns a result, as Python values (None for NULL)."""

    columns: tuple[Column, ...]
    rows: list[tuple[Any, ...]]


class QueryError(RuntimeError):
    """A statement failed, or the warehouse could not be opened; the message is one line.

    `completed` holds the results of the statements of the same batch that ran before it.
    """

    def __init__(self, message: str, completed: Sequence[QueryResult] = ()) -> None:
        super().__init__(message)
        self.completed = list(completed)


@dataclass
class QuerySession:
    """Runs SQL read-only on the warehouse at `path` (default: $WAREHOUSE_PATH)."""

    path: Path | None = None
    lock_timeout: float | None = None
    _settings: list[str] = field(default_factory=list)
    _kept: ExitStack | None = None  # a lake's connection, open for the whole session
    _connection: duckdb.DuckDBPyConnection | None = None

    @property
    def warehouse_path(self) -> Path:
        return Path(self.path) if self.path else settings.warehouse_path()

    def execute(self, sql: str) -> list[QueryResult]:
        """Run every statement of `sql` in one read-only connection, closed before returning.

        Returns the results of the statements that return rows (SELECT, SHOW, DESCRIBE, EXPLAIN,
        PRAGMA, CALL...); statements like SET or BEGIN return none. The first failing statement
        ends the batch with a QueryError.
        """
        results: list[QueryResult] = []
        with self._open() as connection:
            try:
                statements = connection.extract_statements(sql)
            except duckdb.Error as error:
                raise QueryError(_one_line(error)) from error
            for statement in statements:
                try:
                    result = _run_statement(connection, statement)
                except duckdb.Error as error:
                    raise QueryError(self._explain(error), results) from error
                if result is not None:
                    results.append(result)
                if statement.type in _SESSION_SETTING_TYPES:
                    self._settings.append(statement.query)
        return results

    def close(self) -> None:
        """Close the connection a session on a DuckLake keeps (nothing to do on a file)."""
        if self._kept is not None:
            self._kept.close()
        self._kept = self._connection = None

    @contextmanager
    def _open(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """The warehouse, read-only, with the session's settings replayed; closed on exit, but
        on a DuckLake kept for the next batch."""
        if self._connection is not None:
            yield self._connection
            return
        path = self.warehouse_path
        with ExitStack() as stack:
            try:
                connection = stack.enter_context(
                    connect(path, read_only=True, lock_timeout=self.lock_timeout)
                )
            except WarehouseLockedError as error:
                raise QueryError(_one_line(error)) from error
            except duckdb.Error as error:
                raise QueryError(
                    f"Cannot open the warehouse {path} ({_one_line(error)}). It may not be "
                    "built yet: `make run` builds it; $WAREHOUSE_PATH or --warehouse chooses it."
                ) from error
            for setting in self._settings:
                connection.execute(setting).fetchall()
            if lake.is_lake(path):
                self._connection, self._kept = connection, stack.pop_all()
            yield connection

    def _explain(self, error: duckdb.Error) -> str:
        """DuckDB's message on one line, plus what to do when the cause is likely ours."""
        message = _one_line(error)
        if "read-only mode" in message:
            return (
                f"{message} `event-stats sql` only reads the warehouse; the pipeline writes it "
                "(`event-stats load`, dbt)."
            )
        if isinstance(error, duckdb.CatalogException) and "does not exist" in message:
            return (
                f"{message} The warehouse {self.warehouse_path} may not be built yet "
                "(`make run` builds it; `show all tables` lists what it holds; "
                "$WAREHOUSE_PATH or --warehouse chooses the warehouse)."
            )
        return message


def _run_statement(
    connection: duckdb.DuckDBPyConnection, statement: duckdb.Statement
) -> QueryResult | None:
    rows = _interruptible(connection, lambda: connection.execute(statement).fetchall())
    if statement.expected_result_type != _QUERY_RESULT or connection.description is None:
        return None  # SET, BEGIN, CREATE TEMP ...: DuckDB answers with a status row, not a result
    columns = tuple(Column(name, str(kind)) for name, kind, *_ in connection.description)
    return QueryResult(columns, rows)


def _interruptible(connection: duckdb.DuckDBPyConnection, work: Callable[[], T]) -> T:
    """Run `work` in a thread so that Ctrl-C (KeyboardInterrupt) cancels the query.

    DuckDB's Python client does not notice SIGINT while a query runs; the main thread waits
    here instead, where the signal arrives, and interrupts the connection.
    """
    outcome: list = []
    done = threading.Event()

    def run() -> None:
        try:
            outcome.append((True, work()))
        except BaseException as error:  # handed to the caller
            outcome.append((False, error))
        finally:
            done.set()

    threading.Thread(target=run, name="sql-statement", daemon=True).start()
    try:
        done.wait()
    except KeyboardInterrupt:
        connection.interrupt()
        done.wait()
        raise
    succeeded, value = outcome[0]
    if not succeeded:
        raise value
    return value


def _one_line(error: BaseException) -> str:
    """DuckDB's message without its `LINE 1: ...` pointer, joined onto one line."""
    message = str(error).split("\n\n")[0]
    return " ".join(line.strip() for line in message.splitlines() if line.strip())
