"""analytics.event_stats built by real dbt runs on a temp warehouse (see stats_warehouse.py)."""

from __future__ import annotations

import json
from datetime import date, datetime, timedelta
from pathlib import Path

import pytest
from stats_warehouse import (
    D1,
    D2,
    D3,
    D4,
    Warehouse,
    day_events,
    fill,
    stats_of,
    stats_outside,
    vars_key,
)

from event_pipeline import warehouse
from event_pipeline.dbt_config import DbtRunError, date_vars, run_dbt


def test_first_build_without_vars_counts_every_date(wh: Warehouse) -> None:
    fill(wh)
    wh.build()

    assert wh.stats() == wh.expected_stats()
    assert stats_of(wh.stats(), D1) == [(D1, "u1", 4), (D1, "u2", 1)]
    columns = wh.execute(
        "select column_name, data_type from information_schema.columns "
        "where table_schema = 'analytics' and table_name = 'event_stats' order by ordinal_position"
    )
    assert columns == [("event_date", "DATE"), ("user_id", "VARCHAR"), ("event_count", "BIGINT")]


def test_first_build_with_vars_creates_only_that_date(wh: Warehouse) -> None:
    fill(wh)
    wh.build(date_vars(D2))

    assert wh.stats() == stats_of(wh.expected_stats(), D2)


def test_rebuild_gives_identical_table(wh: Warehouse) -> None:
    fill(wh)
    wh.build(date_vars(D2))
    wh.build()
    first = wh.stats()

    wh.build()
    assert wh.stats() == first
    wh.build(date_vars(D2))
    assert wh.stats() == first


def test_late_data_replaces_its_date_and_leaves_other_dates_untouched(wh: Warehouse) -> None:
    fill(wh)
    wh.build()
    before = wh.stats()
    # Late events for D2 (one more for u1, a new user), and raw changes on D1 and D3 that a
    # build of D2 alone must not pick up.
    wh.add_events(
        [("late-1", "u1", datetime(2024, 3, 2, 12)), ("late-2", "u9", datetime(2024, 3, 2))]
    )
    wh.execute("delete from raw.events where event_date = ? and user_id = 'u2'", [D1])
    wh.add_events(day_events(D3, {"u7": 2}, prefix="extra"))

    wh.build(date_vars(D2))

    after = wh.stats()
    assert stats_of(after, D2) == stats_of(wh.expected_stats(), D2)
    assert stats_of(after, D2) == [(D2, "u1", 4), (D2, "u2", 4), (D2, "u3", 1), (D2, "u9", 1)]
    assert stats_outside(after, D2) == stats_outside(before, D2)


def test_date_that_became_empty_loses_its_stats(wh: Warehouse) -> None:
    fill(wh)
    wh.build()
    before = wh.stats()
    wh.execute("delete from raw.events where event_date = ?", [D2])

    wh.build(date_vars(D2))

    after = wh.stats()
    assert stats_of(after, D2) == []
    assert stats_outside(after, D2) == stats_outside(before, D2)


def test_range_build_replaces_exactly_start_to_end(wh: Warehouse) -> None:
    fill(wh)
    wh.add_events(day_events(D4, {"u1": 1}))
    wh.build()
    before = wh.stats()
    # Change every date; only [D2, D4) may follow: D2 gains an event, D3 becomes empty.
    wh.add_events([("new-d1", "u1", datetime(2024, 3, 1, 8))])
    wh.add_events([("new-d2", "u3", datetime(2024, 3, 2, 8))])
    wh.execute("delete from raw.events where event_date = ?", [D3])
    wh.add_events([("new-d4", "u1", datetime(2024, 3, 4, 8))])

    wh.build(date_vars(D2, D4))

    after = wh.stats()
    assert stats_of(after, D2, D3) == stats_of(wh.expected_stats(), D2, D3)
    assert stats_of(after, D3) == []
    assert stats_of(after, D2) != stats_of(before, D2)
    assert stats_outside(after, D2, D3) == stats_outside(before, D2, D3)


def test_build_without_vars_makes_the_whole_table_match_raw(wh: Warehouse) -> None:
    fill(wh)
    wh.build(date_vars(D1, D4))
    # D1 vanishes from raw, D4 appears, D3 changes: a build without vars follows all of it.
    wh.execute("delete from raw.events where event_date = ?", [D1])
    wh.add_events(day_events(D4, {"u4": 2}))
    wh.add_events([("new-d3", "u2", datetime(2024, 3, 3, 9))])

    wh.build()

    assert wh.stats() == wh.expected_stats()
    assert {row[0] for row in wh.stats()} == {D2, D3, D4}


def test_full_refresh_equals_incremental_builds(wh: Warehouse) -> None:
    fill(wh)
    wh.build(date_vars(D1))
    wh.add_events(day_events(D4, {"u1": 1, "u5": 2}))
    wh.execute("delete from raw.events where event_date = ? and user_id = 'u3'", [D2])
    wh.build(date_vars(D2, D4 + timedelta(days=1)))
    incremental = wh.stats()

    wh.build(None, "--full-refresh")

    assert wh.stats() == incremental == wh.expected_stats()


def test_full_refresh_with_a_date_range_is_refused(wh: Warehouse) -> None:
    fill(wh)
    wh.build()
    before = wh.stats()

    with pytest.raises(DbtRunError, match="--full-refresh rebuilds every date"):
        wh.build(date_vars(D2), "--full-refresh")
    assert wh.stats() == before


def test_duplicate_raw_event_fails_the_build_before_the_stats_change(wh: Warehouse) -> None:
    fill(wh)
    wh.build()
    before = wh.stats()
    duplicate = wh.execute("select * from raw.events where event_date = ? limit 1", [D2])[0]
    wh.execute("insert into raw.events values (?, ?, ?, ?, ?, ?)", list(duplicate))

    duplicate_test = "source_unique_in_processed_dates_events_events_event_id"
    with pytest.raises(DbtRunError, match=duplicate_test):
        wh.build(date_vars(D2))
    assert wh.stats() == before


RECONCILE = "assert_event_stats_reconcile_with_raw"
AUDIT_D2 = "audit.event_stats__20240302_20240303"


def audit(wh: Warehouse, dbt_vars: dict[str, str] | None = None) -> None:
    """Build the audit table (the stats under test) alone: no tests, no publish."""
    wh.dbt("run", "--select", "+int_event_stats__audit", dbt_vars=dbt_vars)


def test_reconciliation_fails_on_tampered_audited_stats_of_a_processed_date(
    wh: Warehouse,
) -> None:
    fill(wh)
    audit(wh, date_vars(D2))
    # Raw changes on other dates are not checked ...
    wh.add_events([("new-d1", "u1", datetime(2024, 3, 1, 8))])
    wh.add_events([("new-d3", "u1", datetime(2024, 3, 3, 8))])
    wh.dbt("test", "--select", RECONCILE, dbt_vars=date_vars(D2))

    # ... a mismatch on the processed date fails dbt.
    wh.execute(f"update {AUDIT_D2} set event_count = event_count + 1 where user_id = 'u3'")
    with pytest.raises(DbtRunError, match=RECONCILE):
        wh.dbt("test", "--select", RECONCILE, dbt_vars=date_vars(D2))

    audit(wh)
    wh.execute("update audit.event_stats__all set event_count = 7 where event_date = ?", [D3])
    with pytest.raises(DbtRunError, match=RECONCILE):
        wh.dbt("test", "--select", RECONCILE)


def test_audited_stats_of_a_date_gone_from_raw_fail_reconciliation(wh: Warehouse) -> None:
    """Stats of a date with no raw events fail, as stats missing for a raw date do."""
    fill(wh)
    audit(wh, date_vars(D2))
    wh.execute("delete from raw.events where event_date = ?", [D2])

    with pytest.raises(DbtRunError, match=RECONCILE):
        wh.dbt("test", "--select", RECONCILE, dbt_vars=date_vars(D2))


def test_end_date_not_after_start_date_is_refused(wh: Warehouse) -> None:
    fill(wh)
    with pytest.raises(DbtRunError, match="must be after start_date"):
        wh.build({"start_date": D2.isoformat(), "end_date": D2.isoformat()})


def test_docs_generate_describes_every_column_of_every_model(wh: Warehouse) -> None:
    fill(wh)
    wh.build()
    audit(wh)  # the publish drops it: built again, so that the catalog describes it
    wh.dbt("docs", "generate")

    target = next(wh.dbt_dir.glob(f"target-{vars_key(None)}"))
    manifest = json.loads((target / "manifest.json").read_text())
    catalog = json.loads((target / "catalog.json").read_text())
    models = [n for n in manifest["nodes"].values() if n["resource_type"] in ("model", "seed")]
    assert {n["name"] for n in models} == {
        "stg_events__events",
        "int_event_stats__audit",
        "event_stats",
        "event_types",
    }
    for node in models:
        assert node["description"], node["name"]
        documented = {name for name, column in node["columns"].items() if column["description"]}
        built = set(catalog["nodes"][node["unique_id"]]["columns"])
        assert built <= documented, (node["name"], built - documented)
    stats = catalog["nodes"]["model.event_stats.event_stats"]["metadata"]
    assert (stats["schema"], stats["name"]) == ("analytics", "event_stats")


def test_failed_insert_rolls_back_the_delete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Delete and insert are one transaction: when the insert fails, the old rows stay. On a
    DuckDB file: a DuckLake has no CHECK constraint to make the insert fail (on a lake the
    publish is one snapshot: tests/test_ducklake.py)."""
    path = tmp_path / "warehouse.duckdb"
    monkeypatch.setenv("WAREHOUSE_PATH", str(path))
    with warehouse.connect(path) as connection:
        warehouse.ensure_raw_schema(connection)
    wh = Warehouse(path=path, dbt_dir=tmp_path)
    fill(wh)
    wh.build()
    before = wh.stats()
    # The same table with a constraint the next insert will break (at most 9 events a user).
    wh.execute(
        "create table analytics.event_stats_checked ("
        " event_date date, user_id varchar, event_count bigint check (event_count < 10));"
        "insert into analytics.event_stats_checked select * from analytics.event_stats;"
        "drop table analytics.event_stats;"
        "alter table analytics.event_stats_checked rename to event_stats"
    )
    wh.add_events(day_events(D2, {"u8": 12}, prefix="burst"))

    with pytest.raises(DbtRunError, match="(?i)constraint"):
        wh.build(date_vars(D2))
    assert wh.stats() == before


def test_sample_events_give_the_stats_in_seeds_readme(
    events_api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """seeds/sample_events replayed, loaded and built: the numbers seeds/README.md promises."""
    from event_pipeline import loader, settings

    path = tmp_path / "warehouse"
    monkeypatch.setenv("WAREHOUSE_PATH", str(path))
    url = events_api(data_dir=settings.REPO_ROOT / "seeds" / "sample_events")
    loader.load_range(date(2019, 1, 1), date(2019, 1, 5), api_url=url, warehouse_path=path)
    run_dbt(
        [
            "build",
            "--quiet",
            "--target-path",
            str(tmp_path / "target"),
            "--log-path",
            str(tmp_path),
        ],
        warehouse_path=path,
    )

    with warehouse.connect(path, read_only=True) as connection:
        per_day = connection.execute(
            "select event_date, sum(event_count), count(*) from analytics.event_stats "
            "group by event_date order by event_date"
        ).fetchall()
    assert per_day == [
        (date(2019, 1, 1), 40, 5),
        (date(2019, 1, 2), 30, 5),
        (date(2019, 1, 3), 21, 5),
    ]


def test_cosmos_configs_point_at_this_repository(monkeypatch: pytest.MonkeyPatch) -> None:
    from event_pipeline import dbt_config, settings

    cosmos = dbt_config._cosmos()
    InvocationMode, LoadMode = cosmos.InvocationMode, cosmos.LoadMode

    monkeypatch.setenv("WAREHOUSE_PATH", "relative/warehouse")
    project = dbt_config.project_config()
    profile = dbt_config.profile_config()
    execution = dbt_config.execution_config()
    render = dbt_config.render_config()

    assert project.dbt_project_path == settings.REPO_ROOT / "dbt_project"
    # Absolute, since Cosmos runs dbt from a temporary directory.
    assert project.env_vars == {"WAREHOUSE_PATH": str(Path.cwd() / "relative/warehouse")}
    assert Path(profile.profiles_yml_filepath) == settings.REPO_ROOT / "profiles.yml"
    assert (profile.profile_name, profile.target_name) == ("event_stats", "lake")
    assert Path(execution.dbt_executable_path).is_file()
    assert execution.invocation_mode == InvocationMode.DBT_RUNNER
    assert render.load_method == LoadMode.DBT_MANIFEST
    assert str(project.manifest_path) == str(dbt_config.dbt_manifest())
    assert dbt_config.dbt_manifest().is_relative_to(settings.REPO_ROOT / "dbt_project" / "target")
    assert dbt_config.render_config(load_method=LoadMode.DBT_LS).load_method == LoadMode.DBT_LS


# --- ops.build_log ------------------------------------------------------------------------

BuildLog = list[tuple[date, int, int]]


def build_log(wh: Warehouse) -> BuildLog:
    """(event_date, users, events) of every ops.build_log row, in order."""
    return wh.execute("select event_date, users, events from ops.build_log order by all")


def invocations(wh: Warehouse) -> list[str]:
    rows = wh.execute("select distinct invocation_id from ops.build_log order by built_at")
    return [row[0] for row in rows]


def test_build_log_has_every_date_of_the_vars_range_including_an_empty_one(wh: Warehouse) -> None:
    fill(wh)
    wh.build(date_vars(D2, D4 + timedelta(days=1)))

    assert build_log(wh) == [(D2, 3, 8), (D3, 2, 6), (D4, 0, 0)]
    [(invocation, built_at)] = wh.execute(
        "select distinct invocation_id, built_at from ops.build_log"
    )
    assert len(invocation) == 36 and isinstance(built_at, datetime)
    columns = wh.execute(
        "select column_name, data_type from information_schema.columns "
        "where table_schema = 'ops' and table_name = 'build_log' order by ordinal_position"
    )
    assert columns == [
        ("event_date", "DATE"),
        ("invocation_id", "VARCHAR"),
        ("users", "BIGINT"),
        ("events", "BIGINT"),
        ("built_at", "TIMESTAMP"),
        ("audit_key", "VARCHAR"),
    ]


def test_build_log_gets_one_row_per_date_per_build(wh: Warehouse) -> None:
    fill(wh)
    wh.build(date_vars(D2))
    wh.build(date_vars(D2))

    assert build_log(wh) == [(D2, 3, 8), (D2, 3, 8)]
    assert len(invocations(wh)) == 2


def test_build_log_without_vars_has_every_raw_date_and_every_vanished_date(
    wh: Warehouse,
) -> None:
    fill(wh)
    wh.build()
    assert build_log(wh) == [(D1, 2, 5), (D2, 3, 8), (D3, 2, 6)]
    first = invocations(wh)
    wh.execute("delete from raw.events where event_date = ?", [D1])
    wh.add_events(day_events(D4, {"u4": 2}))

    wh.build()

    [second] = [i for i in invocations(wh) if i not in first]
    latest = wh.execute(
        "select event_date, users, events from ops.build_log where invocation_id = ? order by all",
        [second],
    )
    assert latest == [(D1, 0, 0), (D2, 3, 8), (D3, 2, 6), (D4, 2, 3)]


def test_a_failure_after_the_build_log_insert_keeps_the_old_stats_and_log(
    project_copy: tuple[Path, Warehouse],
) -> None:
    """The ledger rows and the publish are one transaction: dbt-duckdb runs the post-hook
    between the publish and COMMIT, so a failure after the ledger insert rolls back both."""
    project, wh = project_copy
    fill(wh)
    wh.build()
    before, log_before = wh.stats(), build_log(wh)
    model = project / "models" / "marts" / "event_stats.sql"
    hook = '"{{ write_build_log() }}",'
    assert hook in model.read_text()
    model.write_text(
        model.read_text().replace(hook, hook + "\n\"select error('failed after the log')\",")
    )
    wh.add_events(day_events(D2, {"u8": 2}, prefix="late"))

    with pytest.raises(DbtRunError, match="failed after the log"):
        wh.build(date_vars(D2))

    assert wh.stats() == before
    assert build_log(wh) == log_before
