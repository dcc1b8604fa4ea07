"""Write-audit-publish: a build's new stats are tested before they replace analytics.event_stats.

The stats of the processed dates are built into audit.event_stats__<start>_<end>
(int_event_stats__audit), its tests run, and only then does event_stats publish them (and drop the
audit table) in one transaction. The tests read only the processed dates.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from hashlib import md5
from pathlib import Path

import pytest
from stats_warehouse import D1, D2, D3, D4, Warehouse, day_events, fill, stats_of

from event_pipeline.dbt_config import DbtRunError, daily_build_flags, date_vars

# A data test on the stats under test that fails as soon as the user "intruder" appears.
FAILING_TEST = "assert_no_intruder"
FAILING_TEST_SQL = "select * from {{ ref('int_event_stats__audit') }} where user_id = 'intruder'\n"


# How Cosmos selects the publishing model alone (the project is also named event_stats).
PUBLISH = "fqn:event_stats.marts.event_stats"


def add_failing_test(project: Path) -> None:
    (project / "tests" / f"{FAILING_TEST}.sql").write_text(FAILING_TEST_SQL)


def published(wh: Warehouse) -> dict[str, list[tuple]]:
    """Everything a build publishes: the stats table (every column, every date) and the ledger."""
    return {
        "event_stats": wh.execute("select * from analytics.event_stats order by all"),
        "build_log": wh.execute("select * from ops.build_log order by all"),
    }


def audit_tables(wh: Warehouse) -> list[str]:
    rows = wh.execute(
        "select table_name from information_schema.tables where table_schema = 'audit' order by 1"
    )
    return [row[0] for row in rows]


def test_a_failing_audit_test_changes_nothing_in_event_stats(
    project_copy: tuple[Path, Warehouse],
) -> None:
    project, wh = project_copy
    add_failing_test(project)
    fill(wh)
    wh.build()
    before = published(wh)
    # New raw events for D2, among them the intruder's: D2's new stats fail the test.
    wh.add_events([("i-1", "intruder", datetime(2024, 3, 2, 9))])
    wh.add_events(day_events(D2, {"u5": 3}, prefix="late"))

    with pytest.raises(DbtRunError, match=FAILING_TEST):
        wh.build(date_vars(D2))

    assert published(wh) == before
    # The failed audit is kept for inspection under a name nothing publishes ...
    assert audit_tables(wh) == ["event_stats__20240302_20240303__failed"]
    failed = wh.execute("select user_id from audit.event_stats__20240302_20240303__failed")
    assert ("intruder",) in failed
    # ... so publishing alone (an Airflow retry of the event_stats task) is refused.
    with pytest.raises(DbtRunError, match="No audited stats to publish for 2024-03-02"):
        wh.build(date_vars(D2), "--select", PUBLISH)
    assert published(wh) == before

    # Without vars too: every date is audited, nothing published.
    with pytest.raises(DbtRunError, match=FAILING_TEST):
        wh.build()
    assert published(wh) == before

    # Fixed at the source, the next build publishes and drops the audit table.
    wh.execute("delete from raw.events where user_id = 'intruder'")
    wh.build(date_vars(D2))
    assert stats_of(wh.stats(), D2) == stats_of(wh.expected_stats(), D2)
    assert audit_tables(wh) == [
        "event_stats__20240302_20240303__failed",
        "event_stats__all__failed",
    ]


def test_a_published_build_leaves_no_audit_table(wh: Warehouse) -> None:
    fill(wh)
    wh.build(date_vars(D2))
    wh.build()

    assert audit_tables(wh) == []
    # Each range audits under its own name (so concurrent builds of other ranges never share it).
    wh.dbt("run", "--select", "+int_event_stats__audit", dbt_vars=date_vars(D2, D3))
    wh.dbt("run", "--select", "+int_event_stats__audit", dbt_vars=date_vars(D3))
    assert audit_tables(wh) == ["event_stats__20240302_20240303", "event_stats__20240303_20240304"]
    [(d2_rows,)] = wh.execute("select count(*) from audit.event_stats__20240302_20240303")
    assert d2_rows == len(stats_of(wh.expected_stats(), D2))


def test_runs_of_the_same_dates_with_their_own_audit_key_keep_their_own_audit_table(
    wh: Warehouse,
) -> None:
    """Var audit_key (e.g. the Airflow run id) separates two runs of the same dates: each
    publishes the rows it audited and drops only its own table."""
    fill(wh)
    run_a = {**date_vars(D2), "audit_key": "scheduled__2024-03-02T00:00:00+00:00"}
    run_b = {**date_vars(D2), "audit_key": "backfill__2024-03-02T00:00:00+00:00"}
    table_a, table_b = (
        f"event_stats__20240302_20240303__{md5(run['audit_key'].encode()).hexdigest()[:8]}"
        for run in (run_a, run_b)
    )
    wh.dbt("run", "--select", "+int_event_stats__audit", dbt_vars=run_a)
    wh.dbt("run", "--select", "+int_event_stats__audit", dbt_vars=run_b)
    assert audit_tables(wh) == sorted([table_a, table_b])

    wh.build(run_a, "--select", PUBLISH)

    assert stats_of(wh.stats(), D2) == stats_of(wh.expected_stats(), D2)
    assert audit_tables(wh) == [table_b]


def test_audited_stats_that_raw_no_longer_matches_are_not_published(wh: Warehouse) -> None:
    """A run audits D2, then raw changes and another run publishes the new stats; when the
    first run's publish comes last (a cleared or retried task), its stale audit is refused."""
    fill(wh)
    wh.build(date_vars(D2))
    run_a = {**date_vars(D2), "audit_key": "scheduled__2024-03-02T00:00:00+00:00"}
    run_b = {**date_vars(D2), "audit_key": "manual__2024-03-02T00:00:00+00:00"}
    wh.dbt("run", "--select", "+int_event_stats__audit", dbt_vars=run_a)
    wh.add_events(day_events(D2, {"u5": 3}, prefix="late"))
    wh.build(run_b)
    current = wh.stats()
    assert stats_of(current, D2) == stats_of(wh.expected_stats(), D2)

    with pytest.raises(DbtRunError, match="no longer match raw.events for 2024-03-02"):
        wh.build(run_a, "--select", PUBLISH)

    assert wh.stats() == current


def test_the_audit_tests_run_before_the_publish(wh: Warehouse) -> None:
    """dbt build orders every test of the audit table (the reconciliation with raw included)
    before event_stats, whatever the build's vars."""
    fill(wh)
    for dbt_vars in (date_vars(D2), None):
        results = wh.dbt("build", dbt_vars=dbt_vars)
        order = [r.node.unique_id for r in results]
        publish = order.index("model.event_stats.event_stats")
        audit_tests = [
            uid
            for r, uid in zip(results, order, strict=True)
            if r.node.resource_type == "test"
            and "model.event_stats.int_event_stats__audit" in r.node.depends_on.nodes
        ]
        assert "test.event_stats.assert_event_stats_reconcile_with_raw" in audit_tests
        assert len(audit_tests) == 6
        assert all(order.index(uid) < publish for uid in audit_tests)


def test_the_dags_audit_build_runs_every_audit_test_and_no_unit_test(wh: Warehouse) -> None:
    """The DAG's task of the audit model (Cosmos: --select its fqn, buildable tests, the DAG's
    flags) still runs all of its data tests; only dbt's unit tests are left to CI, where a plain
    `dbt build` runs them (and the seed)."""
    fill(wh)
    everything = wh.dbt("build", dbt_vars=date_vars(D2))
    audit = "fqn:event_stats.intermediate.int_event_stats__audit"
    daily = wh.dbt(
        "build",
        "--select",
        audit,
        "--indirect-selection",
        "buildable",
        *daily_build_flags(),
        dbt_vars=date_vars(D2),
    )

    def kinds(results: list) -> Counter:
        return Counter(r.node.resource_type for r in results)

    audit_tests = {
        r.node.unique_id
        for r in everything
        if r.node.resource_type == "test"
        and "model.event_stats.int_event_stats__audit" in r.node.depends_on.nodes
    }
    assert len(audit_tests) == 6
    assert {r.node.unique_id for r in daily if r.node.resource_type == "test"} == audit_tests
    assert kinds(daily) == {"model": 1, "test": 6, "operation": 1}  # + the on-run-end hook
    assert kinds(everything)["unit_test"] == 3 and kinds(everything)["seed"] == 1


# --- the gate reads the processed dates only -----------------------------------------------


def test_a_bad_raw_row_of_an_old_date_fails_only_builds_of_that_date(wh: Warehouse) -> None:
    fill(wh)
    wh.build()
    before = published(wh)
    # Stored under D1 but happened on D3: the event_date tests of raw.events and staging fail.
    wh.execute(
        "insert into raw.events values ('misdated', 'u1', 'click', ?, ?, 'test-load')",
        [datetime(2024, 3, 3, 12), D1],
    )

    wh.build(date_vars(D3))  # another date: not blocked
    wh.build(date_vars(D2, D4))

    with pytest.raises(DbtRunError, match="expression_is_true_events_events_event_date"):
        wh.build(date_vars(D1))
    with pytest.raises(DbtRunError, match="expression_is_true_events_events_event_date"):
        wh.build()
    assert stats_of(wh.stats(), D1) == stats_of(before["event_stats"], D1)


def test_a_bad_stats_row_of_an_old_date_does_not_block_other_dates(wh: Warehouse) -> None:
    """A duplicate (date, user) row planted in the published table: builds of other dates pass
    (the tests read the new stats of their own dates), a build of that date replaces it."""
    fill(wh)
    wh.build()
    wh.execute("insert into analytics.event_stats values (?, 'u1', 99)", [D1])

    wh.build(date_vars(D3))
    assert len(stats_of(wh.stats(), D1)) == 3

    wh.build(date_vars(D1))
    assert wh.stats() == wh.expected_stats()


def test_a_change_of_the_public_columns_is_refused_before_the_publish(
    project_copy: tuple[Path, Warehouse],
) -> None:
    """analytics.event_stats(event_date DATE, user_id VARCHAR, event_count BIGINT) is an enforced
    dbt contract: stats of another type fail the build and the table keeps its rows, even a full
    refresh (which on_schema_change does not guard)."""
    project, wh = project_copy
    fill(wh)
    wh.build()
    before = published(wh)
    model = project / "models" / "intermediate" / "int_event_stats__audit.sql"
    count = "count(*) as event_count"
    assert count in model.read_text()
    model.write_text(model.read_text().replace(count, "cast(count(*) as integer) as event_count"))

    with pytest.raises(DbtRunError, match="event_count"):
        wh.build(date_vars(D2))
    with pytest.raises(DbtRunError, match="(?s)contract.*event_count"):
        wh.build(None, "--full-refresh")
    assert published(wh) == before
    types = wh.execute(
        "select data_type from information_schema.columns "
        "where table_schema = 'analytics' and table_name = 'event_stats' order by ordinal_position"
    )
    assert types == [("DATE",), ("VARCHAR",), ("BIGINT",)]


def test_a_retry_of_a_publish_that_committed_republishes_the_same_rows(wh: Warehouse) -> None:
    """A worker killed after the publish committed but before Airflow recorded it: the retry of
    the publish task alone (same audit_key, the run id) succeeds and changes no table, the
    ledger included; another run's publish alone, a wider range, or a build without dates is
    still refused, having no audit table of its own."""
    fill(wh)
    run = {**date_vars(D2), "audit_key": "scheduled__2024-03-02T00:00:00+00:00"}
    wh.build(run)
    before = published(wh)

    wh.build(run, "--select", PUBLISH)

    assert published(wh) == before
    assert stats_of(wh.stats(), D2) == stats_of(wh.expected_stats(), D2)
    assert audit_tables(wh) == []
    other = {**date_vars(D2), "audit_key": "manual__2024-03-02T00:00:00+00:00"}
    wider = {**date_vars(D2, D4), "audit_key": run["audit_key"]}
    every_date = {"audit_key": run["audit_key"]}
    for refused in (other, wider, every_date):
        with pytest.raises(DbtRunError, match="No audited stats to publish for"):
            wh.build(refused, "--select", PUBLISH)
    assert published(wh) == before


def test_a_retry_of_a_publish_after_raw_changed_is_refused(
    project_copy: tuple[Path, Warehouse],
) -> None:
    """A run published D2, then raw changed (another run reloaded it; its audit may even have
    failed): the first run's publish retried alone must neither put back nor confirm its
    stats, which raw no longer matches."""
    project, wh = project_copy
    add_failing_test(project)
    fill(wh)
    run = {**date_vars(D2), "audit_key": "scheduled__2024-03-02T00:00:00+00:00"}
    wh.build(run)
    before = published(wh)
    wh.add_events([("i-1", "intruder", datetime(2024, 3, 2, 9))])
    with pytest.raises(DbtRunError, match=FAILING_TEST):
        wh.build({**date_vars(D2), "audit_key": "manual__2024-03-02T00:00:00+00:00"})

    with pytest.raises(
        DbtRunError, match="published no longer match raw.events for 2024-03-02: raw changed"
    ):
        wh.build(run, "--select", PUBLISH)

    assert published(wh) == before


def test_a_build_log_without_audit_keys_gains_the_column(wh: Warehouse) -> None:
    """A ledger written before builds recorded their audit_key: the next build adds the column
    (earlier rows null) and a publish alone without an audit table is still refused."""
    fill(wh)
    wh.build(date_vars(D1))
    wh.execute("alter table ops.build_log drop column audit_key")
    run = {**date_vars(D2), "audit_key": "scheduled__2024-03-02T00:00:00+00:00"}
    with pytest.raises(DbtRunError, match="No audited stats to publish for 2024-03-02"):
        wh.build(run, "--select", PUBLISH)

    wh.build(run)

    assert wh.execute("select event_date, audit_key from ops.build_log order by all") == [
        (D1, None),
        (D2, run["audit_key"]),
    ]
