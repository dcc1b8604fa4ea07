"""The warehouse as a DuckLake (the default storage: a $WAREHOUSE_PATH not ending in `.duckdb`).

Every test runs on a lake in a temp directory: the real loader against the real events API, dbt
really run, the CLI in child processes, and reader sessions in other processes (the `duckdb`
shell of duckdb-cli, and a Python loop). Figures measured here are in docs/STORAGE.md.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import date, timedelta
from multiprocessing import get_context
from pathlib import Path

import pytest

from event_pipeline import settings
from event_pipeline import warehouse as wh
from event_pipeline.loader import load_range, partition_checksum
from event_pipeline.warehouse import lake as lake_storage

D = date(2019, 1, 1)
D1 = D + timedelta(days=1)
BIN = Path(sys.executable).parent
CLI = [sys.executable, "-m", "event_pipeline.cli"]


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTS_API_ATTEMPTS", "3")
    monkeypatch.setenv("EVENTS_API_BACKOFF", "0.05")


@pytest.fixture
def lake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh DuckLake directory path, exported as $WAREHOUSE_PATH."""
    path = tmp_path / "lake"
    monkeypatch.setenv("WAREHOUSE_PATH", str(path))
    return path


def query(path: Path, sql: str, params: list | None = None) -> list[tuple]:
    with wh.connect(path, read_only=True) as connection:
        return connection.execute(sql, params or []).fetchall()


def partitions(path: Path) -> dict[date, int]:
    rows = query(path, "select event_date, count(*) from raw.events group by 1")
    return dict(rows)


def data_files(path: Path) -> set[str]:
    """Names of the Parquet files under the lake's data directory (DuckLake names are UUIDs)."""
    return {file.name for file in (path / lake_storage.DATA_DIR).rglob("*.parquet")}


def referenced_files(path: Path) -> set[str]:
    """Names of the files the catalog knows (data and delete files, of any snapshot)."""
    rows = query(
        path,
        "select path from __ducklake_metadata_warehouse.ducklake_data_file union all "
        "select path from __ducklake_metadata_warehouse.ducklake_delete_file",
    )
    return {Path(name).name for (name,) in rows}


def dbt_build(path: Path, day: date) -> subprocess.CompletedProcess:
    """`dbt build` as a person runs it from the repository root, on the lake at `path`."""
    command = [str(BIN / "dbt"), "build", "--project-dir", "dbt_project", "--profiles-dir", "."]
    command += ["--vars", json.dumps({"start_date": day.isoformat()})]
    return subprocess.run(
        command,
        cwd=settings.REPO_ROOT,
        env={**os.environ, "WAREHOUSE_PATH": str(path)},
        capture_output=True,
        text=True,
        timeout=300,
    )


# --- the storage and its extensions ----------------------------------------------------------


def test_extensions_install_from_pypi_and_the_duckdb_shell_attaches_the_lake(
    events_api, lake, tmp_path
):
    """In a fresh HOME (no extension installed) with autoinstall and autoload off, connect()
    installs DuckLake from its PyPI package; the `duckdb` shell of duckdb-cli then reads it."""
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home)}
    probe = textwrap.dedent(
        f"""
        import duckdb
        from event_pipeline import warehouse
        off = {{"autoinstall_known_extensions": False, "autoload_known_extensions": False}}
        try:
            duckdb.connect(config=off).execute("load ducklake")
            print("loaded before install")
        except duckdb.IOException:
            print("not installed")
        with warehouse.connect({str(lake)!r}) as connection:
            warehouse.ensure_raw_schema(connection)
        duckdb.connect(config=off).execute("load ducklake")
        print("loaded after connect")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.stdout.split("\n")[:2] == ["not installed", "loaded after connect"], done
    assert list((home / ".duckdb" / "extensions").rglob("ducklake.duckdb_extension"))
    assert (lake / "catalog.sqlite").is_file() and (lake / "data").is_dir()
    assert not list(lake.rglob("*.duckdb"))

    load_range(D, api_url=events_api(events_per_day=300), warehouse_path=lake)
    shell = subprocess.run(
        [str(BIN / "duckdb"), "-csv", "-noheader"],
        input="set autoinstall_known_extensions = false;\n"
        f"{lake_storage.attach_sql(lake, read_only=True)};\n"
        "use warehouse;\nselect count(*) from raw.events;\n",
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shell.returncode == 0, shell.stderr
    assert shell.stdout.split() == ["300"]


# --- the loader ------------------------------------------------------------------------------


def test_load_replaces_a_day_and_a_reload_of_the_same_source_changes_nothing(events_api, lake):
    small, large = events_api(events_per_day=300), events_api(events_per_day=500)
    load_range(D, D + timedelta(days=2), api_url=small, warehouse_path=lake)
    before = query(lake, "select * from raw.events order by event_id")
    snapshots = query(lake, "select count(*) from ducklake_snapshots('warehouse')")

    (again,) = load_range(D, api_url=small, warehouse_path=lake)
    assert not again.changed
    assert query(lake, "select * from raw.events order by event_id") == before
    # The unchanged reload wrote its ledger row only: one snapshot, no data file for raw.events.
    assert query(lake, "select count(*) from ducklake_snapshots('warehouse')") == [
        (snapshots[0][0] + 1,)
    ]

    (replaced,) = load_range(D, api_url=large, warehouse_path=lake)
    assert replaced.changed and partitions(lake) == {D: 500, D1: 300}
    assert query(
        lake, "select checksum from raw.load_log where event_date = ? order by loaded_at", [D]
    )[-1] == (replaced.checksum,)


def test_sigkill_mid_commit_leaves_the_old_or_the_new_day_and_no_files_that_trip_a_rerun(
    events_api, lake
):
    urls = {"old": events_api(events_per_day=300_000), "new": events_api(events_per_day=330_000)}
    checksums = {}
    for name in ("new", "old"):
        load_range(D, api_url=urls[name], warehouse_path=lake)
        checksums[name] = partition_checksum_of(lake)
    assert checksums["new"] != checksums["old"]

    # Each kill interrupts a load of the other content than the day holds, so every one of them
    # writes; orphaned files pile up. "file": kill as soon as the load's first data file appears.
    state, outcomes, orphans = "old", [], []
    for kill_at in ("file", 0.0, 0.15, 0.3, "file", 0.45):
        target = "new" if state == "old" else "old"
        command = [*CLI, "-v", "load", "--start", D.isoformat(), "--warehouse", str(lake)]
        files_before = data_files(lake)
        process = subprocess.Popen([*command, "--api-url", urls[target]], stderr=subprocess.PIPE)
        seen = b""
        for line in process.stderr:
            seen += line
            if b"replacing the partition" in line:
                break
        else:
            pytest.fail(f"the loader ended before its transaction:\n{seen.decode()}")
        if kill_at == "file":
            deadline = time.monotonic() + 60
            while data_files(lake) == files_before and time.monotonic() < deadline:
                time.sleep(0.005)
        else:
            time.sleep(kill_at)
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stderr.close()

        checksum = partition_checksum_of(lake)
        (latest,) = query(
            lake,
            "select checksum from raw.load_log where event_date = ? order by loaded_at desc "
            "limit 1",
            [D],
        )
        assert checksum in checksums.values(), f"killed at {kill_at}: mixed {checksum}"
        assert latest[0] == checksum[1]  # the ledger row commits together with the partition
        state = "new" if checksum == checksums["new"] else "old"
        outcomes.append("committed" if state == target else "rolled back")
        orphans.append(len(data_files(lake) - referenced_files(lake)))
    print(
        f"kills (at {'file'!r}: first data file seen) left: {outcomes}; orphaned files: {orphans}"
    )
    assert "rolled back" in outcomes, outcomes  # at least one kill landed inside the transaction

    # Later runs do not trip over what the kills left: a load and a rebuild of the day.
    for name in ("new", "old"):
        load_range(D, api_url=urls[name], warehouse_path=lake)
        assert partition_checksum_of(lake) == checksums[name]
    # Files of killed transactions belong to no snapshot; DuckLake's own cleanup deletes them.
    with wh.connect(lake) as connection:
        connection.execute("call ducklake_delete_orphaned_files('warehouse', cleanup_all => true)")
    assert data_files(lake) <= referenced_files(lake)
    assert partition_checksum_of(lake) == checksums["old"]


def partition_checksum_of(path: Path) -> tuple[int, str]:
    with wh.connect(path, read_only=True) as connection:
        return partition_checksum(connection, D)


# --- dbt -------------------------------------------------------------------------------------


def stats_at(path: Path, version: int, day: date) -> tuple[int, int]:
    """(users, events) of `day` in analytics.event_stats as of snapshot `version`."""
    ((users, events),) = query(
        path,
        f"select count(*), coalesce(sum(event_count), 0) from analytics.event_stats "
        f"at (version => {version}) where event_date = ?",
        [day],
    )
    return users, events


def build_log_at(path: Path, version: int, day: date) -> list[tuple]:
    return query(
        path,
        f"select users, events from ops.build_log at (version => {version}) "
        "where event_date = ? order by built_at",
        [day],
    )


def table_exists_at(path: Path, version: int, table: str) -> bool:
    try:
        query(path, f"select 1 from {table} at (version => {version}) limit 0")
    except Exception:
        return False
    return True


def latest_snapshot(path: Path) -> int:
    return query(path, "select max(snapshot_id) from ducklake_snapshots('warehouse')")[0][0]


def test_dbt_build_publishes_a_date_with_its_build_log_in_one_snapshot(events_api, lake):
    load_range(D, D + timedelta(days=2), api_url=events_api(events_per_day=400))
    assert dbt_build(lake, D).returncode == 0

    before = latest_snapshot(lake)
    built = dbt_build(lake, D1)
    assert built.returncode == 0, built.stdout[-3000:]
    # The audit table is written and tested in snapshots of its own; the publish (delete+insert
    # of the date, its ops.build_log row, the audit table dropped) is one snapshot.
    publish = min(
        v for v in range(before + 1, latest_snapshot(lake) + 1) if stats_at(lake, v, D1)[0]
    )
    audit = "audit.event_stats__20190102_20190103"
    assert stats_at(lake, publish - 1, D1) == (0, 0)
    assert build_log_at(lake, publish - 1, D1) == []
    assert table_exists_at(lake, publish - 1, audit)
    users, events = stats_at(lake, publish, D1)
    assert events == 400
    assert build_log_at(lake, publish, D1) == [(users, events)]
    assert not table_exists_at(lake, publish, audit)

    # Late data for D: the rebuild replaces D's stats, from the old complete ones to the new.
    load_range(D, api_url=events_api(events_per_day=450))
    old_d = stats_at(lake, latest_snapshot(lake), D)
    before = latest_snapshot(lake)
    assert dbt_build(lake, D).returncode == 0
    changed = [v for v in range(before, latest_snapshot(lake) + 1) if stats_at(lake, v, D) != old_d]
    publish = changed[0]
    assert stats_at(lake, publish, D)[1] == 450
    assert build_log_at(lake, publish, D)[-1] == stats_at(lake, publish, D)
    assert stats_at(lake, publish, D1) == (users, events)  # other dates untouched


def test_send_stats_sql_and_status_work_on_the_lake(events_api, lake, tmp_path):
    load_range(D, api_url=events_api(events_per_day=300))
    assert dbt_build(lake, D).returncode == 0
    env = {**os.environ, "EMAIL_OUTBOX_DIR": str(tmp_path / "outbox")}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=120)

    sent = cli("send-stats", "--date", D.isoformat(), "--outbox")
    assert sent.returncode == 0, sent.stderr
    assert len(list((tmp_path / "outbox").glob("*.eml"))) == 1
    again = cli("send-stats", "--date", D.isoformat(), "--outbox")
    assert again.returncode == 0 and len(list((tmp_path / "outbox").glob("*.eml"))) == 1

    answer = cli(
        "sql",
        "--format",
        "json",
        "select status, revision from ops.email_log; "
        "select sum(event_count) as events from analytics.event_stats",
    )
    assert answer.returncode == 0, answer.stderr
    ledger, stats = (json.loads(line) for line in answer.stdout.splitlines())
    assert ledger == [{"status": "sent", "revision": 1}]
    assert stats == [{"events": 300}]

    status = cli("status", "--start", D.isoformat(), "--json")
    assert status.returncode == 0, status.stdout + status.stderr
    assert str(lake) in status.stdout

    refused = cli("sql", "delete from raw.events")  # read-only on the lake too
    assert refused.returncode != 0
    assert partitions(lake) == {D: 300}


# --- readers never block a run ---------------------------------------------------------------

# A reader querying in a loop: every read must see each date complete (its row count is that of
# a whole delivery, all rows from one load) and the stats of a date complete too.
READ_LOOP = """
import json, sys, time
from pathlib import Path
from event_pipeline import warehouse
lake, stop, sizes = Path(sys.argv[1]), Path(sys.argv[2]), set(json.loads(sys.argv[3]))
reads, torn, seen = 0, [], set()
with warehouse.connect(lake, read_only=True) as connection:
    print("ready", flush=True)
    while not stop.exists():
        rows = connection.execute(
            "select event_date, count(*), count(distinct load_id) from raw.events group by all"
        ).fetchall()
        stats = connection.execute(
            "select event_date, sum(event_count) from analytics.event_stats group by all"
        ).fetchall()
        reads += 1
        seen.update(n for _, n, _ in rows)
        torn += [str(r) for r in rows if r[1] not in sizes or r[2] != 1]
        torn += [str(r) for r in stats if r[1] not in sizes]
        time.sleep(0.01)
print(json.dumps({"reads": reads, "torn": torn[:5], "seen": sorted(seen)}), flush=True)
"""


def start_shell(path: Path, statements: str) -> subprocess.Popen:
    """A `duckdb` shell that attaches the lake, runs `statements`, then sits idle."""
    shell = subprocess.Popen(
        [str(BIN / "duckdb"), "-csv", "-noheader"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    shell.stdin.write(
        "set autoinstall_known_extensions = false;\n"
        f"{lake_storage.attach_sql(path, read_only=True)};\nuse warehouse;\n"
        f"{statements}\nselect 'ready';\n"
    )
    shell.stdin.flush()
    assert shell.stdout.readline().strip() != ""  # the first query ran: the lake is attached
    return shell


def timed(work) -> float:
    started = time.monotonic()
    work()
    return time.monotonic() - started


def test_open_reader_sessions_block_neither_a_load_nor_a_dbt_build(events_api, lake, tmp_path):
    old_url, new_url = events_api(events_per_day=100_000), events_api(events_per_day=120_000)
    alone_load = timed(lambda: load_range(D, api_url=old_url))
    alone_build = timed(lambda: dbt_build(lake, D).check_returncode())

    stop = tmp_path / "stop"
    shells = [
        start_shell(lake, "select count(*) from raw.events;"),  # idle between queries
        start_shell(lake, "begin transaction;\nselect count(*) from analytics.event_stats;"),
    ]
    loop = subprocess.Popen(
        [sys.executable, "-c", READ_LOOP, str(lake), str(stop), "[100000, 120000]"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert loop.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        with_readers_load = timed(lambda: load_range(D, api_url=new_url))
        build = {}
        with_readers_build = timed(lambda: build.update(done=dbt_build(lake, D)))
        assert build["done"].returncode == 0, build["done"].stdout[-3000:]
        time.sleep(0.5)
    finally:
        stop.touch()
        for shell in shells:
            shell.stdin.close()
            shell.wait(timeout=30)
        outcome = json.loads(loop.stdout.read().strip().splitlines()[-1])
        loop.wait(timeout=30)
    print(
        f"load alone {alone_load:.1f} s, with readers {with_readers_load:.1f} s; "
        f"dbt build alone {alone_build:.1f} s, with readers {with_readers_build:.1f} s; "
        f"reader loop: {outcome['reads']} reads"
    )
    assert partitions(lake) == {D: 120_000}
    assert query(lake, "select sum(event_count) from analytics.event_stats") == [(120_000,)]
    assert outcome["torn"] == [], outcome
    assert outcome["seen"] == [100_000, 120_000]  # the loop read before and after the commit
    assert with_readers_load < 3 * alone_load + 10
    assert with_readers_build < 3 * alone_build + 10


# --- two writers at the same moment ----------------------------------------------------------


def _replace_day_at_the_barrier(path: str, day: date, load_id: str, barrier, results) -> None:
    """Replace `day` of raw.events with rows of `load_id` (delete, insert) in one transaction
    run by commits.retry_on_conflict, its first attempt committing when the other writer does;
    reports the attempts and whether a failed attempt left the date untouched. A child process."""
    from event_pipeline.warehouse import commits

    attempts, untouched = [], []
    with wh.connect(Path(path)) as connection:

        def replace() -> None:
            attempts.append(len(attempts) + 1)
            if len(attempts) > 1:  # the failed attempt changed nothing
                loads = connection.execute(
                    "select list(distinct load_id) from raw.events where event_date = ?", [day]
                ).fetchall()[0][0]
                untouched.append(load_id not in (loads or []))
            with commits.transaction(connection):
                connection.execute("delete from raw.events where event_date = ?", [day])
                connection.execute(
                    "insert into raw.events select 'n' || i || $day, 'u', 'click', "
                    "$day::timestamp, $day, $load_id from range(50000) t(i)",
                    {"day": day, "load_id": load_id},
                )
                if len(attempts) == 1:
                    barrier.wait(timeout=60)

        try:
            commits.retry_on_conflict(replace, what=f"replacing {day}", attempts=5)
        except Exception as error:  # reported to the test
            results.put((day, len(attempts), f"failed: {error}"))
            return
    results.put((day, len(attempts), "untouched" if all(untouched) else "TORN"))


def test_two_writers_committing_at_once_both_commit_by_retrying_the_transaction(lake):
    """commits.retry_on_conflict, with the two commits forced to the same moment: one loses
    (DuckLake: "database is locked"), changed nothing, and its whole transaction runs again."""
    with wh.connect(lake) as connection:
        wh.ensure_raw_schema(connection)
    context = get_context("spawn")
    outcomes = []
    for trial in range(3):
        barrier, results = context.Barrier(2), context.Queue()
        writers = [
            context.Process(
                target=_replace_day_at_the_barrier,
                args=(str(lake), day, f"trial {trial}", barrier, results),
            )
            for day in (D, D1)
        ]
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join(timeout=120)
        outcomes.append(sorted(results.get(timeout=5)[1:] for _ in writers))
    print(f"(attempts, state after a failed attempt) per writer, per trial: {outcomes}")
    assert partitions(lake) == {D: 50_000, D1: 50_000}
    assert query(lake, "select distinct load_id from raw.events") == [("trial 2",)]
    for trial in outcomes:
        assert [state for _, state in trial] == ["untouched", "untouched"], trial
        assert sorted(attempts for attempts, _ in trial)[1] >= 2, trial  # one lost the race


def test_two_loads_of_different_dates_at_the_same_moment_both_succeed(events_api, lake):
    """`event-stats load` of two dates in two processes started together, three times: every
    load succeeds (a lost commit race is retried, and logged) and each date holds its own
    complete delivery."""
    urls = [events_api(events_per_day=volume) for volume in (60_000, 70_000, 80_000)]
    retried = 0
    for url in urls:
        loads = [
            subprocess.Popen(
                [*CLI, "load", "--start", day.isoformat(), "--api-url", url],
                stderr=subprocess.PIPE,
                text=True,
            )
            for day in (D, D1)
        ]
        for load in loads:
            _, stderr = load.communicate(timeout=300)
            assert load.returncode == 0, stderr
            retried += stderr.count("commit conflict with another writer")
        with wh.connect(lake, read_only=True) as connection:
            for day in (D, D1):
                rows, checksum = partition_checksum(connection, day)
                [(logged_rows, logged_checksum)] = connection.execute(
                    "select rows, checksum from raw.load_log where event_date = ? "
                    "order by loaded_at desc limit 1",
                    [day],
                ).fetchall()
                assert (rows, checksum) == (logged_rows, logged_checksum)
    print(f"commit races retried by the loads: {retried}")
    assert partitions(lake) == {D: 80_000, D1: 80_000}
    assert query(lake, "select count(*) from raw.load_log") == [(6,)]


def test_two_dbt_builds_of_different_dates_at_the_same_moment_both_succeed(events_api, lake):
    """dbt_config.run_dbt (`dbt build` in-process) of two dates in two processes started
    together: both succeed (a model that lost a commit race runs again), each date's stats
    are those of its raw events, with one ops.build_log row per build."""
    load_range(D, D + timedelta(days=2), api_url=events_api(events_per_day=2_000))
    build = (
        "import sys\n"
        "from datetime import date\n"
        "from event_pipeline.dbt_config import date_vars, run_dbt\n"
        "day = date.fromisoformat(sys.argv[1])\n"
        "run_dbt(['build', '--quiet', '--target-path', sys.argv[2]], "
        "dbt_vars={**date_vars(day), 'audit_key': sys.argv[1]})\n"
    )
    retried = 0
    for _ in range(2):
        builds = [
            subprocess.Popen(
                [sys.executable, "-c", build, day.isoformat(), str(lake / f"target-{day}")],
                stderr=subprocess.PIPE,
                text=True,
                cwd=settings.REPO_ROOT,
            )
            for day in (D, D1)
        ]
        for process in builds:
            _, stderr = process.communicate(timeout=600)
            assert process.returncode == 0, stderr[-3000:]
            retried += stderr.count("lost a commit race")
    print(f"dbt commands run again after a lost commit race: {retried}")
    assert query(
        lake,
        "select event_date, sum(event_count) from analytics.event_stats group by 1 order by 1",
    ) == [(D, 2_000), (D1, 2_000)]
    # A build per date and round; a rerun of a whole dbt command after a lost race may publish
    # its date once more (the same rows: idempotent), so the ledger can hold an extra row.
    builds = query(
        lake,
        "select event_date, count(*), min(events), max(events) from ops.build_log "
        "group by 1 order by 1",
    )
    assert [day for day, *_ in builds] == [D, D1]
    assert all(count >= 2 and low == high == 2_000 for _, count, low, high in builds), builds


# --- snapshots ---------------------------------------------------------------------------------


def test_an_email_is_requeried_exactly_as_sent_after_the_stats_changed(events_api, lake, tmp_path):
    """ops.email_log.snapshot_id: the snapshot the email's numbers were read at. After late data
    changed the date's stats (and a second email went out), `at (version => snapshot_id)` gives
    each email's numbers, content hash included. The pipeline's commits are labelled."""
    from event_pipeline.report import send_stats
    from event_pipeline.warehouse.stats import DayStats

    outbox = tmp_path / "outbox"
    for volume in (300, 500):
        load_range(D, api_url=events_api(events_per_day=volume))
        assert dbt_build(lake, D).returncode == 0
        send_stats(D, recipients="a@example.com", outbox_dir=outbox)

    emails = query(
        lake,
        "select revision, snapshot_id, total_events, users, content_hash from ops.email_log "
        "order by revision",
    )
    assert [(revision, total) for revision, _, total, _, _ in emails] == [(1, 300), (2, 500)]
    for _, snapshot, total, users, content_hash in emails:
        as_sent = query(
            lake,
            f"select user_id, event_count from analytics.event_stats at (version => {snapshot}) "
            "where event_date = ? order by event_count desc, user_id",
            [D],
        )
        day = DayStats(D, tuple(as_sent))
        assert (day.total_events, day.users, day.content_hash()) == (total, users, content_hash)
    authors = query(
        lake,
        "select distinct author from ducklake_snapshots('warehouse') "
        "where author is not null order by 1",
    )
    assert authors == [("dbt",), ("event-stats load",), ("event-stats send-stats",)]
    [(invocations,)] = query(
        lake,
        "select count(*) from ops.build_log join ducklake_snapshots('warehouse') "
        "on author = 'dbt' and commit_message = invocation_id",
    )
    assert invocations == 2  # each build's ledger row leads to the snapshot it published
