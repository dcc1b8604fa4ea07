"""Commit races on a DuckLake: retry the whole transaction, a bounded number of times.

Several processes write one lake (loads and dbt builds of other dates, the email ledger). When
another process commits while a transaction is open, that transaction fails at COMMIT with
"Failed to flush changes into DuckLake: database is locked" and is rolled back whole: it changed
nothing. Waiting and committing again cannot help (SQLite refuses the stale transaction at once;
docs/STORAGE.md has the measurements): the transaction must run again, reading what the other
process committed. `retry_on_conflict` does that; the connection stays usable (its temporary
tables too).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import TypeVar

import duckdb

from event_pipeline import settings

log = logging.getLogger(__name__)

T = TypeVar("T")

# What DuckDB says when a DuckLake commit (or a catalog read) loses to another process's commit.
_CONFLICT_MESSAGES = (
    "Failed to flush changes into DuckLake",
    "database is locked",
    "Transaction conflict",
)
FIRST_DELAY = 0.1  # seconds before the second attempt; doubles, at most MAX_DELAY, with jitter
MAX_DELAY = 2.0


class CommitConflictError(RuntimeError):
    """A warehouse transaction lost the commit race on every attempt; it changed nothing."""


def is_commit_conflict(error: BaseException) -> bool:
    """Whether `error` is a DuckLake commit race (rolled back; running it again may succeed)."""
    return isinstance(error, duckdb.Error) and is_conflict_message(str(error))


# dbt creates a relation after checking that it does not exist (a seed's table, a view renamed
# into place): when another dbt did the same in between, the create or rename fails. Measured
# with two `dbt build`s of different dates at once; the rerun finds the relation and goes on.
_DDL_RACE_MESSAGES = ("already exists!",)


def is_conflict_message(message: str, *, ddl: bool = False) -> bool:
    """Whether an error message (DuckDB's, or dbt's quoting it) tells of a commit race; with
    `ddl`, also of a race between two creators of one relation (dbt's)."""
    races = _CONFLICT_MESSAGES + (_DDL_RACE_MESSAGES if ddl else ())
    return any(text in message for text in races)


def retry_delay(attempt: int) -> float:
    """Seconds to wait after failed attempt number `attempt` (1, 2, ...): doubling, jittered."""
    return min(FIRST_DELAY * 2 ** (attempt - 1), MAX_DELAY) * random.uniform(0.5, 1.5)


def retry_on_conflict(work: Callable[[], T], *, what: str, attempts: int | None = None) -> T:
    """Run `work` (one whole transaction: its reads and writes) until it commits, at most
    `attempts` times (default settings.warehouse_commit_attempts()); each conflict is logged.

    Only commit races are retried; any other error propagates at once. After the last attempt
    raises CommitConflictError naming `what`.
    """
    attempts = attempts or settings.warehouse_commit_attempts()
    for attempt in range(1, attempts + 1):
        try:
            return work()
        except duckdb.Error as error:
            if not is_commit_conflict(error):
                raise
            if attempt == attempts:
                raise CommitConflictError(
                    f"{what}: another process committed to the warehouse first on each of "
                    f"{attempts} attempts (last: {_one_line(error)}). Nothing of it was "
                    "written. Run it again, or raise WAREHOUSE_COMMIT_ATTEMPTS."
                ) from error
            delay = retry_delay(attempt)
            log.warning(
                "%s: commit conflict with another writer (attempt %d of %d: %s); running the "
                "whole transaction again in %.2f s",
                what,
                attempt,
                attempts,
                _one_line(error),
                delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


@contextmanager
def transaction(connection: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """BEGIN, the block, COMMIT; ROLLBACK when the block raises (a failed COMMIT of a DuckLake
    has rolled back already)."""
    connection.begin()
    try:
        yield
    except BaseException:
        with suppress(duckdb.Error):
            connection.rollback()
        raise
    connection.commit()


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())
