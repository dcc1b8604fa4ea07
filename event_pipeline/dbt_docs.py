"""The dbt docs of the project (models, columns, tests, the email exposure, the lineage from
raw.events to analytics.event_stats), generated for Airflow's UI, where Cosmos' plugin serves them.

`generate_docs` runs `dbt docs generate` into a new folder next to settings.dbt_docs_dir() and
then points that path (a symbolic link) at it in one rename: the UI shows the old docs or the new,
never a half-written folder. The catalog (column types, row counts) is read from the warehouse.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from event_pipeline import dbt_config, settings
from event_pipeline.warehouse import lake

DOCS_FILES = ("index.html", "manifest.json", "catalog.json")


def generate_docs(docs_dir: Path | None = None, *, warehouse_path: Path | None = None) -> Path:
    """Generate the dbt docs and publish them at `docs_dir` (default settings.dbt_docs_dir())."""
    docs_dir = Path(docs_dir or settings.dbt_docs_dir()).absolute()
    docs_dir.parent.mkdir(parents=True, exist_ok=True)
    warehouse = Path(warehouse_path or settings.warehouse_path())
    if lake.is_lake(warehouse):
        lake.create_if_missing(warehouse)  # the catalog is read from it, even before any load
    build = Path(tempfile.mkdtemp(prefix=f".{docs_dir.name}-", dir=docs_dir.parent))
    build.chmod(0o755)  # mkdtemp makes it private; the docs are for every reader
    try:
        dbt_config.run_dbt(
            ["docs", "generate", "--target-path", str(build)], warehouse_path=warehouse_path
        )
        missing = [name for name in DOCS_FILES if not (build / name).is_file()]
        if missing:
            raise dbt_config.DbtRunError(
                f"`dbt docs generate` wrote no {', '.join(missing)} in {build}: the docs at "
                f"{docs_dir} are unchanged. See dbt's log above."
            )
        _publish(build, docs_dir)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return docs_dir


def _publish(build: Path, docs_dir: Path) -> None:
    """Point `docs_dir` at `build` in one rename, then remove the earlier builds."""
    if docs_dir.exists() and not docs_dir.is_symlink():
        shutil.rmtree(docs_dir)  # a plain folder from elsewhere: replaced by the link
    link = docs_dir.parent / f".{docs_dir.name}.link-{build.name}"
    os.symlink(build.name, link)
    os.replace(link, docs_dir)
    for earlier in docs_dir.parent.glob(f".{docs_dir.name}-*"):
        if earlier != build and earlier.is_dir():
            shutil.rmtree(earlier, ignore_errors=True)
