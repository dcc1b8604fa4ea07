"""The rule of which dates a run processes (run_window), on the fields of the runs Airflow makes."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from types import SimpleNamespace

import pytest

from event_pipeline.run_window import WindowError, run_window

NOW = datetime(2026, 3, 10, 14, 30, tzinfo=UTC)  # mid-day: 2026-03-10 is not complete
YESTERDAY = date(2026, 3, 9)


def _run(logical_date=None, run_after=NOW, conf=None, run_type="manual"):
    return SimpleNamespace(
        run_id="r1",
        run_type=run_type,
        logical_date=logical_date,
        run_after=run_after,
        conf=conf or {},
    )


def _window(dag_run, params=None) -> tuple[date, date, str]:
    window = run_window(dag_run, params)
    return window.start, window.end, window.rule


def test_a_scheduled_run_or_backfill_processes_the_day_of_its_logical_date():
    day = datetime(2026, 1, 5, tzinfo=UTC)
    # Scheduled: run_after is the end of the day; a backfill of last year: run_after long after.
    scheduled = _run(day, day + timedelta(days=1), run_type="scheduled")
    assert _window(scheduled)[:2] == (date(2026, 1, 5), date(2026, 1, 6))
    backfill = _run(datetime(2025, 6, 1, tzinfo=UTC), run_type="backfill")
    assert _window(backfill)[:2] == (date(2025, 6, 1), date(2025, 6, 2))
    # A schedule at another hour (event_stats_status at 06:00): still its interval's first day.
    six = datetime(2026, 1, 5, 6, tzinfo=UTC)
    assert _window(_run(six, six + timedelta(days=1), run_type="scheduled"))[:2] == (
        date(2026, 1, 5),
        date(2026, 1, 6),
    )


def test_a_manual_run_of_a_day_at_midnight_processes_that_day():
    # `airflow dags test event_stats D`, `airflow dags trigger -l D`: any past day.
    assert _window(_run(datetime(2025, 6, 1, tzinfo=UTC))) == (
        date(2025, 6, 1),
        date(2025, 6, 2),
        "logical date",
    )


def test_a_manual_run_without_a_logical_date_processes_the_last_complete_day():
    assert _window(_run(None)) == (YESTERDAY, NOW.date(), "last complete day before the trigger")
    # Triggered exactly at midnight: the day that just ended.
    midnight = datetime(2026, 3, 10, tzinfo=UTC)
    assert _window(_run(None, midnight))[:2] == (YESTERDAY, NOW.date())


def test_the_ui_trigger_default_logical_date_now_processes_the_last_complete_day():
    assert _window(_run(NOW)) == (
        YESTERDAY,
        NOW.date(),
        "last complete day before the logical date",
    )


def test_a_past_moment_picked_in_a_browsers_time_zone_processes_its_utc_day():
    # 2026-01-05 00:00 in New York is 05:00 UTC; in Berlin it is 2026-01-04 23:00 UTC.
    new_york = datetime(2026, 1, 5, tzinfo=timezone(timedelta(hours=-5)))
    berlin = datetime(2026, 1, 5, tzinfo=timezone(timedelta(hours=1)))
    assert _window(_run(new_york)) == (
        date(2026, 1, 5),
        date(2026, 1, 6),
        "UTC day of the logical date",
    )
    assert _window(_run(berlin))[:2] == (date(2026, 1, 4), date(2026, 1, 5))


def test_a_logical_date_is_taken_in_utc():
    east = timezone(timedelta(hours=5))
    # 2026-01-06 05:00 +05:00 is 2026-01-06 00:00 UTC: a day, not a moment.
    assert _window(_run(datetime(2026, 1, 6, 5, tzinfo=east)))[:2] == (
        date(2026, 1, 6),
        date(2026, 1, 7),
    )


@pytest.mark.parametrize(
    "logical_date",
    [datetime(2026, 3, 10, tzinfo=UTC), datetime(2026, 3, 12, tzinfo=UTC)],
    ids=["today", "a future day"],
)
def test_a_day_that_had_not_ended_when_triggered_is_refused(logical_date):
    with pytest.raises(WindowError) as refused:
        run_window(_run(logical_date))
    message = str(refused.value)
    assert "r1" in message and "is not complete" in message
    assert f"params start_date={logical_date.date()}" in message  # what to do


def test_params_choose_the_range_and_may_ask_for_today_explicitly():
    assert _window(_run(None), {"start_date": "2026-01-05", "end_date": "2026-01-08"}) == (
        date(2026, 1, 5),
        date(2026, 1, 8),
        "params",
    )
    assert _window(_run(NOW), {"start_date": "2026-03-10", "end_date": None})[:2] == (
        NOW.date(),
        NOW.date() + timedelta(days=1),
    )
    # Without params, the run's conf is read (the deadline callback has no params).
    assert _window(_run(None, conf={"start_date": "2026-01-05"}))[:2] == (
        date(2026, 1, 5),
        date(2026, 1, 6),
    )
    # Empty params fall back to the run's own rule.
    assert _window(_run(None), {"start_date": None, "end_date": None})[:2] == (
        YESTERDAY,
        NOW.date(),
    )


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"start_date": "2026-02-30"}, r"params start_date='2026-02-30' is not a date"),
        ({"start_date": "5.1.2026"}, r"params start_date='5.1.2026' is not a date"),
        ({"start_date": "20260105"}, r"params start_date='20260105' is not a date"),
        (
            {"start_date": "2026-01-05", "end_date": "tomorrow"},
            r"params end_date='tomorrow' is not a date",
        ),
        ({"end_date": "2026-01-05"}, r"end_date='2026-01-05' was given without start_date"),
        (
            {"start_date": "2026-01-05", "end_date": "2026-01-05"},
            r"end_date 2026-01-05 must be after start_date 2026-01-05",
        ),
        (
            {"start_date": "2026-03-10", "end_date": "2026-03-12"},
            r"no events after 2026-03-10 exist yet.*end_date=2026-03-11",
        ),
        ({"start_date": "1969-12-31"}, r"1969-12-31 is before 1970-01-01"),
    ],
)
def test_bad_params_are_refused_naming_the_value(params, expected):
    with pytest.raises(WindowError, match=expected):
        run_window(_run(None), params)


def test_the_rule_reads_airflows_json_dump_of_a_run_too():
    # The deadline callback's context holds the run as the REST API's JSON.
    dumped = {
        "dag_run_id": "scheduled__2026-03-10T00:00:00+00:00",
        "run_type": "scheduled",
        "logical_date": "2026-03-09T00:00:00Z",
        "run_after": "2026-03-10T00:00:00Z",
        "conf": {},
    }
    assert _window(dumped)[:2] == (YESTERDAY, NOW.date())


def test_airflow_tasks_test_of_a_past_day_processes_that_day():
    # `airflow tasks test event_stats load_raw_events 2026-03-01` at NOW: Airflow sets the
    # temporary run's run_after to the day itself; the moment in its run id is when it was asked.
    day = datetime(2026, 3, 1, tzinfo=UTC)
    asked = SimpleNamespace(
        run_id=f"__airflow_temporary_run_{NOW.isoformat()}__",
        run_type="manual",
        logical_date=day,
        run_after=day,
        conf={},
    )
    assert _window(asked) == (date(2026, 3, 1), date(2026, 3, 2), "logical date")
    # The same command for today, which has not ended: refused like any other run.
    today = SimpleNamespace(**{**vars(asked), "logical_date": NOW.replace(hour=0, minute=0)})
    with pytest.raises(WindowError, match="2026-03-10 is not complete"):
        run_window(today)
