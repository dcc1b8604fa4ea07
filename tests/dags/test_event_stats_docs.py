"""dbt docs inside Airflow: the event_stats_docs DAG generates them, and the running api-server
serves them through Cosmos' plugin, with the lineage raw.events -> event_stats -> the email."""

from __future__ import annotations

import httpx
import pytest
from dag_fixtures import AirflowServices, PipelineEnv, wait_for

from event_pipeline import settings

DOCS = f"/cosmos/{settings.DBT_DOCS_SLUG}"
EMAIL = "exposure.event_stats.daily_stats_email"
RAW_EVENTS = "source.event_stats.events.events"  # the source events.events: raw.events


def _get(services: AirflowServices, path: str) -> httpx.Response | None:
    try:
        return httpx.get(f"{services.api_url}{path}", timeout=30)
    except httpx.HTTPError:
        return None


def _ancestors(parent_map: dict[str, list[str]], node: str) -> set[str]:
    found, todo = set(), [node]
    while todo:
        for parent in parent_map.get(todo.pop(), []):
            if parent not in found:
                found.add(parent)
                todo.append(parent)
    return found


@pytest.mark.e2e
def test_the_docs_dag_generates_dbt_docs_that_the_api_server_serves(
    pipeline_env: PipelineEnv, start_airflow, monkeypatch: pytest.MonkeyPatch
):
    docs = pipeline_env.tmp / "dbt-docs"
    monkeypatch.setenv("DBT_DOCS_DIR", str(docs))
    monkeypatch.setenv("AIRFLOW__COSMOS__DBT_DOCS_PROJECTS", settings.cosmos_docs_projects(docs))
    services = start_airflow(rest=True)

    def parsed() -> bool:
        answer = _get(services, "/api/v2/dags/event_stats_docs")
        return answer is not None and answer.status_code == 200

    wait_for(parsed, "the api-server serving the parsed event_stats_docs", 240, every=2)
    # Before the DAG ran: the page says the docs are missing (not an error page of Airflow).
    missing = _get(services, f"{DOCS}/dbt_docs_index.html")
    assert missing.status_code == 404 and "index not found" in missing.text

    # The scheduler runs the DAG (in the warehouse pool), as it would every day.
    assert services.rest("PATCH", "/dags/event_stats_docs", json={"is_paused": False}).is_success
    run = services.rest("POST", "/dags/event_stats_docs/dagRuns", json={"logical_date": None})
    assert run.status_code == 200, run.text
    run_id = run.json()["dag_run_id"]

    def finished() -> str | None:
        state = services.rest("GET", f"/dags/event_stats_docs/dagRuns/{run_id}").json()["state"]
        return state if state in {"success", "failed"} else None

    state = wait_for(finished, "the event_stats_docs run", 300, every=2, explain=services.log_tail)
    assert state == "success", services.log_tail()

    page = _get(services, f"{DOCS}/dbt_docs_index.html")
    assert page.status_code == 200 and "<title>dbt Docs</title>" in page.text
    manifest = _get(services, f"{DOCS}/manifest.json").json()
    assert EMAIL in manifest["exposures"]
    # The lineage the docs draw: the email <- event_stats <- ... <- raw.events
    assert {"model.event_stats.event_stats", RAW_EVENTS} <= _ancestors(
        manifest["parent_map"], EMAIL
    )
    assert manifest["sources"][RAW_EVENTS]["relation_name"].replace('"', "").endswith("raw.events")
    catalog = _get(services, f"{DOCS}/catalog.json")
    assert catalog.status_code == 200 and "nodes" in catalog.json()

    # One click from the UI: the Browse menu entry, and the link in event_stats' docs.
    plugins = services.rest("GET", "/plugins").json()["plugins"]
    views = [view for plugin in plugins for view in plugin.get("external_views", [])]
    assert any(view["href"].endswith(f"{DOCS}/dbt_docs_index.html") for view in views), views
    details = services.rest("GET", "/dags/event_stats/details").json()
    assert f"{DOCS}/dbt_docs_index.html#!/model/model.event_stats.event_stats" in details["doc_md"]
