"""Write-audit-publish through the DAG's dbt task group (Cosmos, TestBehavior.BUILD).

A failing data test of the audited stats fails its Cosmos task: the publishing task and
send_stats never run, and analytics.event_stats and ops.build_log are unchanged for every date.
A publishing task that fails after its commit is retried and republishes the same rows.
"""

from __future__ import annotations

import json
import re
from datetime import date, timedelta
from hashlib import md5
from pathlib import Path

import pytest
from dag_fixtures import PipelineEnv, load_dag, midnight, task_states

from event_pipeline import loader
from event_pipeline.dbt_config import run_dbt

pytestmark = pytest.mark.e2e

DAY = date(2026, 1, 5)
BEFORE = DAY - timedelta(days=1)
AUDIT_TASK = "dbt.int_event_stats__audit_model_build"
PUBLISH_TASK = "dbt.event_stats_model_build"


def write_events(folder: Path, day: date, users: dict[str, int]) -> None:
    """The replayed events API's answer for `day`: users[user] events each."""
    events = [
        {
            "event_id": f"{day}-{user}-{n}",
            "user": user,
            "timestamp": f"{day}T{n % 24:02d}:00:00+00:00",
            "event_type": "click",
        }
        for user, count in users.items()
        for n in range(count)
    ]
    (folder / f"{day}.json").write_text(json.dumps(events))


def published(env: PipelineEnv) -> dict[str, list[tuple]]:
    return {
        "event_stats": env.query("select * from analytics.event_stats order by all"),
        "build_log": env.query("select * from ops.build_log order by all"),
    }


def test_a_failing_audit_test_in_the_dag_changes_nothing_and_sends_nothing(
    pipeline_env: PipelineEnv, dbt_project_copy: Path, events_api, monkeypatch: pytest.MonkeyPatch
):
    # A data test of the audited stats that fails once the user "intruder" appears.
    (dbt_project_copy / "tests" / "assert_no_intruder.sql").write_text(
        "select * from {{ ref('int_event_stats__audit') }} where user_id = 'intruder'\n"
    )
    events = pipeline_env.tmp / "events"
    events.mkdir()
    write_events(events, BEFORE, {"u1": 2, "u2": 1})
    write_events(events, DAY, {"u1": 3})
    url = events_api(data_dir=events)
    monkeypatch.setenv("EVENTS_API_URL", url)
    loader.load_range(BEFORE, DAY + timedelta(days=1), api_url=url)
    run_dbt(["build", "--quiet"], warehouse_path=pipeline_env.warehouse)
    before = published(pipeline_env)
    assert [row[:2] for row in before["event_stats"]] == [
        (BEFORE, "u1"),
        (BEFORE, "u2"),
        (DAY, "u1"),
    ]
    # DAY's events change, the intruder among them.
    write_events(events, DAY, {"u1": 4, "u3": 2, "intruder": 1})

    run = load_dag().test(logical_date=midnight(DAY))

    states = task_states(run)
    assert str(run.state) == "failed", states
    assert states["load_raw_events"] == "success", states
    assert states[AUDIT_TASK] == "failed", states
    assert states[PUBLISH_TASK] == "upstream_failed", states
    assert states["send_stats"] == "upstream_failed", states
    assert pipeline_env.query("select count(*) from raw.events where event_date = ?", [DAY]) == [
        (7,)
    ]
    assert published(pipeline_env) == before
    assert pipeline_env.emails() == []
    audit_tables = pipeline_env.query(
        "select table_name from information_schema.tables where table_schema = 'audit'"
    )
    # The run's own audit table (named by a digest of its run id), kept for inspection.
    run_digest = md5(run.run_id.encode()).hexdigest()[:8]
    assert audit_tables == [(f"event_stats__20260105_20260106__{run_digest}__failed",)]

    # Running the publishing task alone (an operator clearing it) publishes nothing either.
    not_publish = rf"(?!{re.escape(PUBLISH_TASK)}$).*"
    alone = load_dag().test(logical_date=midnight(DAY), mark_success_pattern=not_publish)

    assert task_states(alone)[PUBLISH_TASK] == "failed"
    assert published(pipeline_env) == before
    assert pipeline_env.emails() == []


def test_a_publish_task_that_fails_after_its_commit_is_retried_and_changes_nothing(
    pipeline_env: PipelineEnv,
):
    """The publish task's first try commits and then fails before Airflow records its success
    (a worker lost at that moment): its retry, the same run, republishes the same rows, and the
    run goes on to email the day once."""
    dag = load_dag(retries=1)
    tries = []

    def lost_after_commit(context, result) -> None:
        tries.append(context["ti"].try_number)
        if len(tries) == 1:
            raise RuntimeError("worker lost after the publish committed")

    dag.get_task(PUBLISH_TASK)._post_execute_hook = lost_after_commit

    run = dag.test(logical_date=midnight(DAY))

    states = task_states(run)
    assert str(run.state) == "success", states
    assert tries == [1, 2]
    recount = pipeline_env.query(
        "select event_date, user_id, count(*) from raw.events where event_date = ? "
        "group by all order by all",
        [DAY],
    )
    assert recount  # the day has events
    assert (
        pipeline_env.query(
            "select * from analytics.event_stats where event_date = ? order by all", [DAY]
        )
        == recount
    )
    # The retry changed no table: one build in the ledger, the first try's.
    builds = pipeline_env.query(
        "select audit_key from ops.build_log where event_date = ?",
        [DAY],
    )
    assert builds == [(run.run_id,)]
    assert len(pipeline_env.emails()) == 1
