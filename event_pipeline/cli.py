"""The `event-stats` command line. Thin: parses arguments and calls the package's modules."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence


def _serve_events(args: argparse.Namespace) -> int:
    raise SystemExit("serve-events: not implemented yet")


def _load(args: argparse.Namespace) -> int:
    raise SystemExit("load: not implemented yet")


def _airflow(args: argparse.Namespace) -> int:
    """Run the `airflow` command with this project's embedded configuration."""
    from event_pipeline import settings

    os.environ.update(settings.airflow_env())
    os.execvp("airflow", ["airflow", *args.airflow_args])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="event-stats", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve-events", help="run the events API")
    serve.set_defaults(handler=_serve_events)

    load = commands.add_parser("load", help="load raw events of [start, end) into the warehouse")
    load.set_defaults(handler=_load)

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
