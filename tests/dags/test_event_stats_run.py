"""The event_stats DAG run through Airflow (dag.test) against the real events API and DuckDB."""

from __future__ import annotations

from datetime import date

import pytest
from dag_fixtures import PipelineEnv, load_dag, midnight, task_states
from smtp_fixtures import airflow_connection

pytestmark = pytest.mark.e2e

DAY = date(2026, 1, 5)


def test_a_day_runs_end_to_end_and_a_rerun_changes_nothing(pipeline_env: PipelineEnv):
    dag = load_dag()

    first = dag.test(logical_date=midnight(DAY))

    assert str(first.state) == "success", task_states(first)
    # The run processes its logical date D (not the data interval start, D - 1).
    raw_dates = pipeline_env.query("select distinct event_date from raw.events")
    assert raw_dates == [(DAY,)]
    [(raw_rows,)] = pipeline_env.query("select count(*) from raw.events")
    stats = pipeline_env.query(
        "select event_date, count(*), sum(event_count) from analytics.event_stats group by 1"
    )
    assert raw_rows > 0
    assert stats[0][0] == DAY and stats[0][2] == raw_rows
    [eml] = pipeline_env.emails()
    assert "2026-01-05" in eml.read_text() and f"{raw_rows:,} events" in eml.read_text()
    before = pipeline_env.tables()
    assert len(before["ops.email_log"]) == 1

    second = load_dag().test(logical_date=midnight(DAY))

    assert str(second.state) == "success", task_states(second)
    assert pipeline_env.tables() == before
    assert pipeline_env.emails() == [eml]


def test_a_failing_dbt_test_blocks_the_email(pipeline_env: PipelineEnv, dbt_project_copy):
    # A data test that rejects every stats row of the processed date.
    (dbt_project_copy / "tests" / "assert_no_stats_for_this_day.sql").write_text(
        "select * from {{ ref('event_stats') }} where event_date = '{{ var('start_date') }}'\n"
    )
    dag = load_dag()

    run = dag.test(logical_date=midnight(DAY))

    states = task_states(run)
    assert str(run.state) == "failed"
    assert states["dbt.event_stats_model_build"] == "failed", states
    assert states["send_stats"] == "upstream_failed", states
    assert pipeline_env.emails() == []
    tables = pipeline_env.query(
        "select table_schema || '.' || table_name from information_schema.tables"
    )
    assert ("ops.email_log",) not in tables  # send_stats never ran
    # Someone is told: the failed dbt task, with the test's failure in the notification.
    [alert] = pipeline_env.alerts()
    assert "FAILED: event_stats 2026-01-05, task dbt.event_stats_model_build" in alert["Subject"]
    assert "assert_no_stats_for_this_day" in alert.get_body().get_content()


def test_smtp_failure_keeps_the_stats_and_retrying_send_stats_alone_sends_once(
    pipeline_env: PipelineEnv, smtp_server, monkeypatch: pytest.MonkeyPatch
):
    recorder, smtp = smtp_server
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", airflow_connection(smtp))
    dag = load_dag()
    recorder.reject = True

    failed = dag.test(logical_date=midnight(DAY))

    states = task_states(failed)
    assert states["send_stats"] == "failed", states
    assert all(s == "success" for task, s in states.items() if task != "send_stats"), states
    stats = pipeline_env.tables()
    assert stats["ops.email_log"] == [] and recorder.messages == []

    # Retry the email alone: every other task is marked success without running.
    recorder.reject = False
    not_email = r"(?!send_stats$).*"
    retried = dag.test(logical_date=midnight(DAY), mark_success_pattern=not_email)
    again = dag.test(logical_date=midnight(DAY), mark_success_pattern=not_email)

    assert str(retried.state) == "success" and str(again.state) == "success"
    [message] = recorder.messages
    assert "2026-01-05" in message["Subject"]
    after = pipeline_env.tables()
    assert after["raw.events"] == stats["raw.events"]
    assert after["analytics.event_stats"] == stats["analytics.event_stats"]
    assert [row[4] for row in after["ops.email_log"]] == [message["Message-ID"]]
    assert pipeline_env.emails() == []  # SMTP, not the outbox
