"""Which dates a run of the event_stats DAG processes: one rule, used by every task.

The window is a range of UTC dates [start, end):

1. params `start_date` (and `end_date`, default start + 1 day), YYYY-MM-DD: exactly that range.
   It may include the run's own, incomplete day (that is how to ask for it), never a later day.
2. a scheduled run or a backfill: the UTC day of its logical date (its data interval's start),
   and a manual run whose logical date is 00:00 UTC (`airflow dags test event_stats D`,
   `airflow dags trigger -l D`): that day D.
3. a manual run whose logical date is any other time (the UI's Trigger defaults to now): the last
   complete UTC day before it.
4. no logical date (`airflow dags trigger`, the REST API with logical_date null): the last
   complete UTC day before the run was triggered (its run_after).

Rules 2-4 refuse a day that had not ended when the run was triggered. No rule reaches before
EARLIEST_DATE. The inputs are the run's own fields, never the clock: a rerun processes the same
window. This module knows nothing about Airflow beyond those field names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

# Event timestamps count from the Unix epoch; the DAG's start_date is this day, so Airflow
# creates tasks for every date a run can name (it creates none for a logical date before it).
EARLIEST_DATE = date(1970, 1, 1)

# Runs whose logical date starts the data interval they cover (Airflow's DagRunType values).
SCHEDULED_RUN_TYPES = frozenset({"scheduled", "backfill"})
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
# `airflow tasks test DAG TASK D` makes a temporary run whose run_after is D itself (not when it
# was asked for); its run id carries the moment it was made: that is the trigger time.
_TEMPORARY_RUN = re.compile(r"__airflow_temporary_run_(?P<made>.+)__")
ONE_DAY = timedelta(days=1)


class WindowError(ValueError):
    """A run asks for dates it cannot process; the message says which and what to do."""


@dataclass(frozen=True)
class RunWindow:
    """The UTC dates [start, end) a run processes; `rule` says which rule chose them."""

    start: date
    end: date
    rule: str

    def days(self) -> list[date]:
        return [self.start + timedelta(days=i) for i in range((self.end - self.start).days)]

    def describe(self) -> str:
        if self.end - self.start == ONE_DAY:
            return self.start.isoformat()
        return f"{self.start.isoformat()} to {(self.end - ONE_DAY).isoformat()}"


@dataclass(frozen=True)
class RunFacts:
    """The fields of a DAG run the rule reads (from a task's dag_run or a REST/JSON dump)."""

    run_id: str
    run_type: str  # "scheduled", "backfill", "manual", ...
    logical_date: datetime | None
    run_after: datetime
    conf: Mapping[str, Any]

    @classmethod
    def of(cls, dag_run: Any) -> RunFacts:
        """From Airflow's DagRun object (a task's context) or its JSON dump (a dict)."""
        facts = cls._read(dag_run)
        temporary = _TEMPORARY_RUN.fullmatch(facts.run_id)
        if temporary:
            made = as_moment(temporary["made"])
            return replace(facts, run_after=max(_utc(made), _utc(facts.run_after)))
        return facts

    @classmethod
    def _read(cls, dag_run: Any) -> RunFacts:
        if isinstance(dag_run, Mapping):
            return cls(
                run_id=dag_run.get("dag_run_id") or dag_run["run_id"],
                run_type=str(dag_run.get("run_type") or "manual"),
                logical_date=as_moment(dag_run.get("logical_date")),
                run_after=as_moment(dag_run["run_after"]),
                conf=dag_run.get("conf") or {},
            )
        run_type = getattr(dag_run, "run_type", None) or "manual"
        return cls(
            run_id=dag_run.run_id,
            run_type=str(getattr(run_type, "value", run_type)),
            logical_date=as_moment(dag_run.logical_date),
            run_after=as_moment(dag_run.run_after),
            conf=getattr(dag_run, "conf", None) or {},
        )


def run_window(dag_run: Any, params: Mapping[str, Any] | None = None) -> RunWindow:
    """The window a run processes (see the module docstring). Raises WindowError when refused.

    `params` are the task's resolved params (the run's conf over the DAG's defaults); without
    them, the run's conf is read.
    """
    facts = RunFacts.of(dag_run)
    chosen = facts.conf if params is None else params
    if chosen.get("start_date") or chosen.get("end_date"):
        return _from_params(facts, chosen.get("start_date"), chosen.get("end_date"))
    return _from_run(facts)


def _from_params(facts: RunFacts, start_value: Any, end_value: Any) -> RunWindow:
    if not start_value:
        raise WindowError(
            f"Run {facts.run_id}: params end_date={end_value!r} was given without start_date; "
            "pass start_date (YYYY-MM-DD) too, the range is [start_date, end_date)."
        )
    start = _param_date("start_date", start_value, facts)
    end = _param_date("end_date", end_value, facts) if end_value else start + ONE_DAY
    if end <= start:
        raise WindowError(
            f"Run {facts.run_id}: params end_date {end} must be after start_date {start} "
            f"(end_date is exclusive: one day is start_date={start}, end_date={start + ONE_DAY})."
        )
    _check_not_before_earliest(start, facts)
    last_possible = _utc(facts.run_after).date()
    if end - ONE_DAY > last_possible:
        raise WindowError(
            f"Run {facts.run_id}: params ask for {start} to {end - ONE_DAY}, but the run was "
            f"triggered at {show_moment(facts.run_after)}: no events after {last_possible} "
            f"exist yet. End the range at end_date={last_possible + ONE_DAY} at the latest."
        )
    return RunWindow(start, end, "params")


def _from_run(facts: RunFacts) -> RunWindow:
    if facts.logical_date is None:
        day = _utc(facts.run_after).date() - ONE_DAY
        rule = "last complete day before the trigger"
    elif facts.run_type in SCHEDULED_RUN_TYPES or _is_midnight(facts.logical_date):
        day = _utc(facts.logical_date).date()
        rule = "logical date"
    else:
        # A moment (the UI's Trigger: now; a date picked in a browser's time zone): its UTC
        # day once that day has ended, else the last complete day before it.
        day = _utc(facts.logical_date).date()
        rule = "UTC day of the logical date"
        if datetime.combine(day + ONE_DAY, time(), UTC) > _utc(facts.run_after):
            day -= ONE_DAY
            rule = "last complete day before the logical date"
    _check_not_before_earliest(day, facts)
    day_end = datetime.combine(day + ONE_DAY, time(), UTC)
    if day_end > _utc(facts.run_after):
        ends = show_moment(day_end)
        raise WindowError(
            f"Run {facts.run_id}: {day} is not complete: the run was triggered at "
            f"{show_moment(facts.run_after)}, before the day ended ({ends}). Run it after "
            f"{ends}, or pass params start_date={day} to process the incomplete day on purpose."
        )
    return RunWindow(day, day + ONE_DAY, rule)


def _is_midnight(moment: datetime) -> bool:
    return _utc(moment).timetz() == time(tzinfo=UTC)


def _param_date(name: str, value: Any, facts: RunFacts) -> date:
    text = str(value).strip()
    try:
        if not _ISO_DATE.fullmatch(text):
            raise ValueError(text)
        return date.fromisoformat(text)
    except ValueError:
        raise WindowError(
            f"Run {facts.run_id}: params {name}={value!r} is not a date; use YYYY-MM-DD (UTC)."
        ) from None


def _check_not_before_earliest(day: date, facts: RunFacts) -> None:
    if day < EARLIEST_DATE:
        raise WindowError(
            f"Run {facts.run_id}: {day} is before {EARLIEST_DATE}, the earliest date the "
            "pipeline processes (event timestamps count from the Unix epoch)."
        )


def as_moment(value: Any) -> datetime | None:
    """A datetime from a datetime or its ISO text (as in Airflow's JSON dumps)."""
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def _utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)


def show_moment(moment: datetime) -> str:
    """`2026-01-05 06:00:00 UTC`."""
    return _utc(moment).strftime("%Y-%m-%d %H:%M:%S UTC")
