"""`make bench`'s machinery runs and writes a sane docs/PERFORMANCE.md (a smoke, not a timing)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from event_pipeline import settings


@pytest.mark.e2e
def test_the_quick_benchmark_writes_every_figure_as_a_ratio(tmp_path: Path):
    output = tmp_path / "PERFORMANCE.md"
    argv = [sys.executable, str(settings.REPO_ROOT / "benchmarks" / "runs.py"), "--quick"]

    done = subprocess.run(
        [*argv, "--output", str(output)], capture_output=True, text=True, timeout=1800
    )

    assert done.returncode == 0, done.stdout + done.stderr
    text = output.read_text()
    assert re.search(r"on \d+ cores .*apache-airflow 3\.\d+\.\d+.*pandas \d", text), text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "x** (" in line]
    names = [
        "airflow dags list",
        "3 days as one DAG run",
        "dbt step in the DAG / in-process dbt floor",
        "one day's DAG run / in-process dbt floor",
        "pandas path",
    ]
    assert [next(n for n in names if n in row) for row in rows] == names, text
    for row in rows:
        ratio = float(re.search(r"\*\*([\d.]+)x\*\*", row).group(1))
        assert 0 < ratio < 1000, row
    # bench.py's pieces, measured in the same run.
    assert "events/s" in text and "dbt" in text, text
