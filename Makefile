# Quick start: `make run` runs the pipeline over a week of dates; `make test` runs lint and every test.
# Both create or update the locked environment first (bootstrapping uv with pip if needed).

SHELL := /bin/bash
PYTHON ?= python3
UV := $(shell command -v uv 2>/dev/null || echo "$(PYTHON) -m uv")
RUN := $(UV) run --locked

.PHONY: env browser run test lint format ui bench crash pictures clean cluster-start cluster-stop cluster-status

env:
	@command -v uv >/dev/null 2>&1 || $(PYTHON) -m uv --version >/dev/null 2>&1 \
		|| $(PYTHON) -m pip install --quiet uv \
		|| $(PYTHON) -m pip install --quiet --user --break-system-packages uv
	@# Bytecode compiled once here: where PYTHONDONTWRITEBYTECODE is set (CI images often set it),
	@# every process would otherwise compile Airflow and dbt from source again at each import.
	$(UV) sync --locked --compile-bytecode
	@# the DuckLake extensions, from their PyPI packages into DuckDB's extension directory
	$(RUN) python -c "from event_pipeline.warehouse import lake; lake.install_extensions()"
	@# the dbt manifest the DAG renders from, so that no DAG parse has to run `dbt parse`
	$(RUN) python -c "from event_pipeline import dbt_config; dbt_config.dbt_manifest()"

# Headless Chromium (Debian's `chromium`) for the tests that render pages and for `make pictures`:
# installed with apt-get when missing and this is root on Debian; otherwise those tests skip.
browser:
	@command -v chromium >/dev/null 2>&1 || [ -n "$$CHROMIUM" ] \
		|| { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
			&& { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
				--no-install-recommends chromium >/dev/null; } } \
		|| echo "chromium is not installed and could not be (needs apt-get as root): tests that render pages skip"

run: env
	$(RUN) event-stats run

test: env lint browser
	$(RUN) pytest

lint: env
	$(RUN) ruff check .
	$(RUN) ruff format --check .
	$(RUN) sqlfluff lint dbt_project

format: env
	$(RUN) ruff check --fix .
	$(RUN) ruff format .
	$(RUN) sqlfluff fix dbt_project

ui: env
	$(RUN) event-stats airflow standalone

# Speed and memory goals as ratios, written to docs/PERFORMANCE.md (whole commands side by side,
# then benchmarks/bench.py's pieces; not part of `make test`, which runs a --quick smoke).
bench: env
	$(RUN) python benchmarks/runs.py

# SIGKILL every step at random moments and check what it leaves; writes the figures into
# docs/RELIABILITY.md (11 to 25 minutes on 2 cores; `make test` runs a quick version). Options, e.g.
# make crash CRASH_ARGS="--steps loader --trials 5 --seed 42"
crash: env
	$(RUN) python tests/crash_campaign.py $(CRASH_ARGS)

# The README's images (docs/images/*.png): headless Chromium screenshots of the stats email, of
# Airflow's grid after a backfill and of the dbt lineage, from the real services (minutes: see README).
pictures: env browser
	$(RUN) python docs/pictures.py

# The distributed profile (README, "Beyond one machine"): Airflow's services and $(WORKERS) Celery
# workers in the background, configured by $(CLUSTER_ENV) (PostgreSQL, Redis, DuckLake catalog in
# PostgreSQL); PIDs and logs in .airflow-cluster/cluster/. Stopped by those PIDs.
CLUSTER_ENV ?= deploy/distributed.env
WORKERS ?= 2
WITH_CLUSTER_ENV := set -a && . ./$(CLUSTER_ENV) && set +a &&

cluster-start: env
	$(WITH_CLUSTER_ENV) $(RUN) event-stats cluster start --workers $(WORKERS)

cluster-stop:
	$(WITH_CLUSTER_ENV) $(RUN) event-stats cluster stop

cluster-status:
	$(WITH_CLUSTER_ENV) $(RUN) event-stats cluster status

clean:
	rm -rf .airflow .airflow-cluster data dbt_project/target dbt_project/logs dbt_project/dbt_packages logs
