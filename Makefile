# Quick start: `make run` runs the pipeline over a week of dates; `make test` runs lint and every test.
# Both create or update the locked environment first (bootstrapping uv with pip if needed).

SHELL := /bin/bash
PYTHON ?= python3
UV := $(shell command -v uv 2>/dev/null || echo "$(PYTHON) -m uv")
RUN := $(UV) run --locked

.PHONY: env run test lint format ui bench crash clean cluster-start cluster-stop cluster-status

env:
	@command -v uv >/dev/null 2>&1 || $(PYTHON) -m uv --version >/dev/null 2>&1 \
		|| $(PYTHON) -m pip install --quiet uv \
		|| $(PYTHON) -m pip install --quiet --user --break-system-packages uv
	$(UV) sync --locked
	@# the DuckLake extensions, from their PyPI packages into DuckDB's extension directory
	$(RUN) python -c "from event_pipeline.warehouse import lake; lake.install_extensions()"

run: env
	$(RUN) event-stats run

test: env lint
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

# Speed and memory goals as ratios (about 1.5 min; not part of `make test`).
bench: env
	$(RUN) python benchmarks/bench.py

# SIGKILL every step at random moments and check what it leaves; writes the figures into
# docs/RELIABILITY.md (11 to 25 minutes on 2 cores; `make test` runs a quick version). Options, e.g.
# make crash CRASH_ARGS="--steps loader --trials 5 --seed 42"
crash: env
	$(RUN) python tests/crash_campaign.py $(CRASH_ARGS)

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
