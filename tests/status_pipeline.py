"""A warehouse built by the real pipeline steps, for the status tests.

The events API runs in replay mode over a folder of one JSON file per date (re-read on each
request, so a test changes a date's source by rewriting its file); `event-stats load` loads it,
dbt really builds it with date vars, `event-stats send-stats --outbox` emails it, and
`event-stats status` runs as the console script would (a child process: its real exit code).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

from event_pipeline import cli
from event_pipeline.dbt_config import date_vars, run_dbt

TO = "team@example.com"


@dataclass
class StatusPipeline:
    warehouse: Path
    data_dir: Path
    outbox: Path
    dbt_dir: Path
    api_url: str

    def write_events(self, day: date, users: dict[str, int]) -> None:
        """The source's events of `day`: users[u] events of each user u, spread over the day."""
        records = []
        for user, count in users.items():
            for n in range(count):
                at = f"{day}T{n % 24:02d}:{n % 60:02d}:00+00:00"
                records.append(
                    {"event_id": f"{day}-{user}-{n}", "user": user, "timestamp": at}
                    | {"event_type": "click"}
                )
        (self.data_dir / f"{day}.json").write_text(json.dumps(records))

    def load(self, start: date, end: date | None = None) -> None:
        args = ["load", "--start", str(start), "--api-url", self.api_url]
        args += ["--end", str(end or start + timedelta(days=1)), "--warehouse", str(self.warehouse)]
        assert cli.main(args) == 0

    def build(self, start: date, end: date) -> None:
        """`dbt build` with vars start_date, end_date: [start, end)."""
        target = self.dbt_dir / f"target-{start}-{end}"
        run_dbt(
            ["build", "--quiet", "--target-path", str(target), "--log-path", str(self.dbt_dir)],
            dbt_vars=date_vars(start, end),
            warehouse_path=self.warehouse,
        )

    def send(self, *days: date) -> None:
        for day in days:
            args = ["send-stats", "--date", str(day), "--warehouse", str(self.warehouse)]
            assert cli.main([*args, "--outbox"]) == 0

    def status(self, *args: str) -> subprocess.CompletedProcess:
        """`event-stats status ARGS --warehouse W` in a child process."""
        command = [sys.executable, "-m", "event_pipeline.cli", "status", *args]
        command += ["--warehouse", str(self.warehouse)]
        return subprocess.run(
            command, env=dict(os.environ), capture_output=True, text=True, timeout=120
        )

    def status_json(self, *args: str) -> tuple[int, dict]:
        done = self.status(*args, "--json")
        assert done.returncode in (0, 1), done.stderr
        return done.returncode, json.loads(done.stdout)


def start_pipeline(tmp_path: Path, events_api, monkeypatch) -> StatusPipeline:
    """An empty pipeline: the replay events API on an empty folder, a warehouse path, an outbox.

    Sets EMAIL_TO, EMAIL_OUTBOX_DIR and WAREHOUSE_PATH for the steps run in this process."""
    data_dir = tmp_path / "events"
    data_dir.mkdir()
    pipeline = StatusPipeline(
        warehouse=tmp_path / "warehouse",
        data_dir=data_dir,
        outbox=tmp_path / "outbox",
        dbt_dir=tmp_path / "dbt",
        api_url=events_api(data_dir=data_dir),
    )
    monkeypatch.setenv("EMAIL_TO", TO)
    monkeypatch.setenv("EMAIL_OUTBOX_DIR", str(pipeline.outbox))
    monkeypatch.setenv("WAREHOUSE_PATH", str(pipeline.warehouse))
    return pipeline
