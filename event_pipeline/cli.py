"""The `event-stats` command line. Thin: parses arguments and calls the package's modules."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from event_pipeline.report import SendResult

WAREHOUSE_HELP = "DuckLake directory, or a .duckdb file (default: $WAREHOUSE_PATH)"


def _serve_events(args: argparse.Namespace) -> int:
    from event_pipeline.events.server import ServerConfig, serve

    if args.data_dir is not None and args.events_per_day is not None:
        raise SystemExit(
            "serve-events: --events-per-day is for generated mode; drop it or --data-dir"
        )
    config = ServerConfig(
        data_dir=args.data_dir,
        events_per_day=args.events_per_day,
        record_format=args.record_format,
        fail_first=args.fail_first,
        delay=args.delay,
        truncate_after=args.truncate_after,
        login=_server_login(args),
    )
    serve(config, host=args.host, port=args.port)
    return 0


def _server_login(args: argparse.Namespace):  # noqa: ANN202 - LoginConfig | None, imported lazily
    """--require-login: the user and password the API accepts, from its environment."""
    from event_pipeline import settings
    from event_pipeline.events.login import LoginConfig

    if not args.require_login:
        return None
    user, password = settings.events_api_user(), settings.events_api_password()
    if not user or not password:
        raise SystemExit(
            "serve-events --require-login: set EVENTS_API_USER and EVENTS_API_PASSWORD in the "
            "server's environment (the credentials it accepts; never on the command line)"
        )
    if args.token_ttl <= 0:
        raise SystemExit(f"serve-events: --token-ttl must be > 0 seconds, got {args.token_ttl:g}")
    return LoginConfig(user=user, password=password, token_ttl=args.token_ttl)


def _non_negative(kind: Callable[[str], float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def _iso_date(text: str):  # noqa: ANN202 - argparse type
    from datetime import date

    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a YYYY-MM-DD date: {text!r}") from None


def _load(args: argparse.Namespace) -> int:
    """Load raw events of [start, end) into the warehouse: one request and one atomic
    transaction per window of up to 366 days, a ledger row and a progress line per date.

    SIGTERM or SIGINT ends it with one line saying what was loaded and how to finish, and the
    exit status 128 + the signal's number.
    """
    from event_pipeline.loader import LoadInterrupted, load_range
    from event_pipeline.sources import EventSourceError
    from event_pipeline.warehouse import WarehouseLockedError

    if not args.verbose:  # the loader's progress lines; not one httpx line per request too
        logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        results = load_range(
            args.start,
            args.end,
            api_url=args.api_url,
            warehouse_path=args.warehouse,
            run_id=args.run_id,
            progress=True,
        )
    except (EventSourceError, WarehouseLockedError, ValueError) as error:
        raise SystemExit(f"load failed: {error}") from error
    except LoadInterrupted as interrupted:
        print(interrupted, file=sys.stderr, flush=True)
        return 128 + interrupted.signum
    replaced = sum(result.changed for result in results)
    rows = sum(result.rows for result in results)
    print(
        f"loaded {len(results)} date(s): {replaced} replaced, {len(results) - replaced} "
        f"unchanged, {rows:,} rows",
        file=sys.stderr,
    )
    return 0


def _run(args: argparse.Namespace) -> int:
    from event_pipeline import pipeline

    return pipeline.run(args.start, args.end, port=args.port)


def _backfill(args: argparse.Namespace) -> int:
    from event_pipeline import pipeline

    try:
        return pipeline.backfill(args.start, args.end, port=args.port)
    except ValueError as error:
        raise SystemExit(f"backfill: {error}") from error


def _send_stats(args: argparse.Namespace) -> int:
    from event_pipeline import airflow_support, report
    from event_pipeline.mail import InvalidAddressError
    from event_pipeline.warehouse import WarehouseLockedError

    smtp = None
    if not args.outbox:
        airflow_support.configure_environment()
        smtp = airflow_support.smtp_settings()
    try:
        results = report.send_stats(args.date, warehouse_path=args.warehouse, smtp=smtp)
    except report.SendStatsError as error:
        _print_sent(error.results)
        raise SystemExit(f"send-stats failed: {error}") from error
    except (
        report.StatsNotBuiltError,
        InvalidAddressError,
        WarehouseLockedError,
        ValueError,
    ) as error:
        raise SystemExit(f"send-stats failed: {error}") from error
    _print_sent(results)
    return 0


def _sql(args: argparse.Namespace) -> int:
    """Print the results of SQL on the warehouse (read-only), or read statements from stdin."""
    from event_pipeline import sql_shell
    from event_pipeline.warehouse.query import QuerySession

    session = QuerySession(args.warehouse)
    try:
        if args.sql is None:
            return sql_shell.run_prompt(session, args.format)
        return sql_shell.run_sql(session, args.sql, args.format)
    except KeyboardInterrupt:
        print("sql: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader stopped early (`| head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        session.close()


def _add_sql_parser(commands: argparse._SubParsersAction) -> None:
    sql = commands.add_parser(
        "sql",
        help="print the results of read-only SQL on the warehouse; no SQL: read it from stdin",
        description="Run read-only SQL on the warehouse and print the results. Without SQL, "
        "read `;`-terminated statements from stdin (a prompt on a terminal; .quit to leave).",
    )
    sql.add_argument("sql", nargs="?", help='statements, e.g. "select * from raw.load_log"')
    sql.add_argument(
        "--format",
        choices=["table", "csv", "json"],
        default="table",
        help="json: an array of objects, one per row, per statement (default: table)",
    )
    sql.add_argument(
        "--warehouse",
        type=Path,
        help="DuckLake directory or .duckdb file (default: $WAREHOUSE_PATH)",
    )
    sql.set_defaults(handler=_sql)


def _status(args: argparse.Namespace) -> int:
    """Print what was loaded, built and emailed per date; exit 1 on gaps or stale dates."""
    import json

    from event_pipeline import status
    from event_pipeline.warehouse import WarehouseLockedError

    try:
        report = status.read_report(args.start, args.end, warehouse_path=args.warehouse)
    except (status.StatusUnavailableError, WarehouseLockedError) as error:
        print(f"status: {error}", file=sys.stderr)
        return status.EXIT_UNAVAILABLE
    try:
        if args.json:
            print(json.dumps(status.report_json(report), indent=2))
        else:
            print(status.render_text(report), end="")
    except BrokenPipeError:  # the reader stopped early (`| head`): the verdict still stands
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return report.exit_code


def _add_status_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "status",
        help="per date: loaded, built, emailed; gaps and stale dates (exit 1 when any)",
        description="Per date of [start, end): raw rows loaded (when, source, run), stats built "
        "(when, users, events), email sent (revision, recipients, when), and the problems: gaps "
        "(not loaded, not built) and stale dates (raw changed after the build, email not sent "
        "or holding other stats than the ones built now). Exit codes: 0 all well, 1 problems, "
        "2 no report (no warehouse, locked, bad arguments).",
    )
    parser.add_argument(
        "--start",
        type=_iso_date,
        help="first date, YYYY-MM-DD (default: the first date any ledger knows)",
    )
    parser.add_argument(
        "--end",
        type=_iso_date,
        help="YYYY-MM-DD, exclusive (default: start + 1 day with --start, else today UTC, or "
        "later if a later date was loaded)",
    )
    parser.add_argument("--json", action="store_true", help="the documented JSON object")
    parser.add_argument("--warehouse", type=Path, help=WAREHOUSE_HELP)
    parser.set_defaults(handler=_status)


def _print_sent(results: list[SendResult]) -> None:
    for result in results:
        print(f"{result.event_date} {result.recipient}: {result.status} {result.message_id}")


# `airflow` subcommands that must work before (or without) our setup.
_AIRFLOW_NO_SETUP = {"db", "version", "config", "info", "cheat-sheet", "-h", "--help"}


def _airflow(args: argparse.Namespace) -> int:
    """Run the `airflow` command with this project's embedded configuration."""
    from event_pipeline import airflow_support, settings

    os.environ.update(settings.airflow_env())
    if args.airflow_args and args.airflow_args[0] not in _AIRFLOW_NO_SETUP:
        airflow_support.ensure_airflow()  # metadata database and the warehouse pool
    beside_python = Path(sys.executable).with_name("airflow")  # this venv's, even if not on PATH
    executable = str(beside_python) if beside_python.exists() else "airflow"
    os.execvp(executable, ["airflow", *args.airflow_args])


def _cluster(args: argparse.Namespace) -> int:
    """Start, list or stop the distributed profile's processes (event_pipeline.cluster)."""
    from event_pipeline import cluster

    try:
        if args.action == "start":
            services = cluster.start(workers=args.workers)
        elif args.action == "stop":
            services = cluster.stop()
        else:
            services = cluster.status()
    except (RuntimeError, ValueError) as error:
        raise SystemExit(f"cluster {args.action} failed: {error}") from error
    verb = {"start": "started", "stop": "stopped", "status": "running"}[args.action]
    for service in services:
        state = verb if service.alive else "not running"
        print(f"{service.name:<14} PID {service.pid:<8} {state:<12} log {service.log}")
    if args.action == "status":
        return 0 if services and all(s.alive for s in services) else 1
    return 0


def _housekeeping(args: argparse.Namespace) -> int:
    """Compact a DuckLake warehouse, expire old snapshots, delete unreferenced files."""
    from event_pipeline.warehouse import maintenance

    try:
        before, after = maintenance.housekeep(args.warehouse, retention_days=args.retention_days)
    except ValueError as error:
        raise SystemExit(f"housekeeping failed: {error}") from error
    print(f"before: {before.describe()}")
    print(f"after:  {after.describe()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="event-stats", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve-events", help="run the events API")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=5000)
    serve.add_argument(
        "--data-dir", type=Path, help="replay mode: serve DIR/*.json, re-read on each request"
    )
    serve.add_argument(
        "--events-per-day",
        type=_non_negative(int),
        help="generated mode: events per UTC day (default: 200 to 2000, chosen per day)",
    )
    serve.add_argument(
        "--record-format",
        choices=["standard", "book"],
        default="standard",
        help='book: {"user", "date": RFC 1123 GMT} records, like the book\'s Flask API',
    )
    serve.add_argument(
        "--fail-first",
        type=_non_negative(int),
        default=0,
        metavar="N",
        help="fault: answer 503 to the first N GET /events requests",
    )
    serve.add_argument(
        "--delay",
        type=_non_negative(float),
        default=0.0,
        metavar="SECONDS",
        help="fault: wait this long before answering each GET /events",
    )
    serve.add_argument(
        "--truncate-after",
        type=_non_negative(int),
        metavar="BYTES",
        help="fault: send only this many bytes of each /events body, then drop the connection",
    )
    serve.add_argument(
        "--require-login",
        action="store_true",
        help="GET /events needs a bearer token from POST /login; the accepted user and password "
        "come from $EVENTS_API_USER and $EVENTS_API_PASSWORD",
    )
    serve.add_argument(
        "--token-ttl",
        type=_non_negative(float),
        default=300.0,
        metavar="SECONDS",
        help="with --require-login: how long a token stays valid (default: 300)",
    )
    serve.set_defaults(handler=_serve_events)

    load = commands.add_parser("load", help="load raw events of [start, end) into the warehouse")
    load.add_argument("--start", type=_iso_date, required=True, help="YYYY-MM-DD")
    load.add_argument(
        "--end", type=_iso_date, help="YYYY-MM-DD, exclusive (default: start + 1 day)"
    )
    load.add_argument("--api-url", help="events API base URL (default: $EVENTS_API_URL)")
    load.add_argument("--warehouse", type=Path, help=WAREHOUSE_HELP)
    load.add_argument("--run-id", help="recorded in raw.load_log (default: manual-<time>)")
    load.set_defaults(handler=_load)

    run = commands.add_parser(
        "run",
        help="the `make run` job: the event_stats DAG through Airflow over a week of dates",
    )
    run.add_argument("--start", type=_iso_date, help="first date, YYYY-MM-DD (default: 2026-01-01)")
    run.add_argument(
        "--end", type=_iso_date, help="YYYY-MM-DD, exclusive (default: start + 7 days)"
    )
    run.add_argument(
        "--port", type=int, help="port of the events API it starts (default: 5000 if free)"
    )
    run.set_defaults(handler=_run)

    backfill = commands.add_parser(
        "backfill",
        help="[start, end) as ONE event_stats DAG run through Airflow (params start_date/end_date)",
    )
    backfill.add_argument("--start", type=_iso_date, required=True, help="first date, YYYY-MM-DD")
    backfill.add_argument("--end", type=_iso_date, required=True, help="YYYY-MM-DD, exclusive")
    backfill.add_argument(
        "--port", type=int, help="port of the events API it starts (default: 5000 if free)"
    )
    backfill.set_defaults(handler=_backfill)

    send = commands.add_parser(
        "send-stats", help="email one date's stats (once per recipient and content)"
    )
    send.add_argument("--date", type=_iso_date, required=True, help="YYYY-MM-DD")
    send.add_argument("--warehouse", type=Path, help=WAREHOUSE_HELP)
    send.add_argument(
        "--outbox", action="store_true", help="write to the outbox even if SMTP is configured"
    )
    send.set_defaults(handler=_send_stats)

    _add_sql_parser(commands)
    _add_status_parser(commands)

    housekeeping = commands.add_parser(
        "housekeeping",
        help="DuckLake: merge small files, expire old snapshots, delete unreferenced files",
    )
    housekeeping.add_argument(
        "--warehouse", type=Path, help="DuckLake directory (default: $WAREHOUSE_PATH)"
    )
    housekeeping.add_argument(
        "--retention-days",
        type=int,
        help="keep snapshots this many days (default: $WAREHOUSE_SNAPSHOT_RETENTION_DAYS, 30)",
    )
    housekeeping.set_defaults(handler=_housekeeping)

    cluster = commands.add_parser(
        "cluster",
        help="start/stop/status of the distributed profile's Airflow processes and Celery workers",
    )
    cluster.add_argument("action", choices=["start", "stop", "status"])
    cluster.add_argument("--workers", type=int, default=2, help="Celery workers (default 2)")
    cluster.set_defaults(handler=_cluster)

    airflow = commands.add_parser(
        "airflow",
        help="run airflow on the embedded defaults, e.g. `event-stats airflow standalone`",
    )
    airflow.add_argument("airflow_args", nargs=argparse.REMAINDER)
    airflow.set_defaults(handler=_airflow)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return args.handler(args) or 0


if __name__ == "__main__":
    sys.exit(main())
