"""`/metrics` for Prometheus: off unless configured, behind its bearer token or on a port of its own,
moved by what the service does (summaries, stages, tokens, claims, refusals, failed jobs) and by what
other processes left in the database (review outcomes, batch progress); never a patient id."""

from __future__ import annotations

import json
import re
import socket
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.db.batch import BatchRepository, ItemOutcome
from service.dev.sandbox import LoadedPatient
from service.governance.records import record_cds_feedback
from service.llm.fake import FAKE_IDENTITY, FakeEngine
from service.metrics import Metrics
from tests.api.conftest import APP_BASE, app_settings, running_app
from tests.api.test_api import READ, SMALL, WRITE, bearer
from tests.smart_ehr.server import TestEhr

TOKEN = "prometheus-scrape-token"


def metrics_settings(tmp_path: Path, ehr: TestEhr, fhir: str | None = None, **metrics: Any) -> Any:
    api = {"jwt_issuer": ehr.base_url, "jwks_url": ehr.jwks_url}
    sections: dict[str, Any] = {"api": api, "metrics": metrics}
    if fhir is not None:
        sections["fhir"] = {"base_url": fhir}
    return app_settings(tmp_path, ehr, **sections)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, by name and labels (parsed as Prometheus parses it)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def scrape(client: httpx.AsyncClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await client.get("/metrics", headers=bearer(TOKEN))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return samples(response.text)


async def test_metrics_are_off_by_default_and_need_their_bearer_token(ehr: TestEhr, tmp_path: Path) -> None:
    async with running_app(metrics_settings(tmp_path, ehr)) as (client, _):
        off = await client.get("/metrics")
    async with running_app(metrics_settings(tmp_path, ehr, bearer_token=TOKEN)) as (client, _):
        anonymous = await client.get("/metrics")
        wrong = await client.get("/metrics", headers=bearer("not-" + TOKEN))
        figures = await scrape(client)
    assert off.status_code == 404
    assert anonymous.status_code == 401 and wrong.status_code == 401
    assert anonymous.headers["www-authenticate"].startswith("Bearer")
    assert figures[("chartbrief_summaries_total", (("outcome", "written"),))] == 0
    assert figures[("chartbrief_work_in_flight", ())] == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_metrics_port_of_its_own_serves_them_and_the_main_port_does_not(
    ehr: TestEhr, tmp_path: Path
) -> None:
    port = _free_port()
    settings = metrics_settings(tmp_path, ehr, port=port, bearer_token=TOKEN)
    async with running_app(settings) as (client, _):
        main = await client.get("/metrics", headers=bearer(TOKEN))
        async with httpx.AsyncClient() as http:
            own = await http.get(f"http://127.0.0.1:{port}/metrics")
    assert main.status_code == 404
    assert own.status_code == 200
    assert ("chartbrief_stage_seconds_count", (("stage", "model"),)) in samples(own.text)
    with pytest.raises(httpx.ConnectError):  # stopped with the app
        async with httpx.AsyncClient() as http:
            await http.get(f"http://127.0.0.1:{port}/metrics")


@pytest.mark.integration
async def test_a_summary_through_the_api_moves_outcomes_stages_tokens_and_claims(
    ehr: TestEhr, tmp_path: Path, fhir_base: str, loaded_patients: dict[str, LoadedPatient]
) -> None:
    patient = loaded_patients[SMALL].id
    # Its own sampling tag: a summary key no other test wrote, so this one is written, not found.
    engine = FakeEngine(
        identity=replace(
            FAKE_IDENTITY, sampling=f"{FAKE_IDENTITY.sampling} test=metrics-{uuid.uuid4().hex}"
        )
    )
    # One claim that cites nothing in the record: grounding drops it, and the metrics count the drop.
    engine.enqueue(json.dumps({"claims": [{"text": "Takes warfarin 5 mg daily.", "citations": ["M999"]}]}))
    token = ehr.issue_token(patient=patient, scope=f"{READ} {WRITE}", audience=APP_BASE, subject="portal")
    settings = metrics_settings(tmp_path, ehr, fhir=fhir_base, bearer_token=TOKEN)
    async with running_app(settings, engine=engine) as (client, app):
        started = await client.post("/api/summaries", json={"patient": patient}, headers=bearer(token))
        await app.state.runtime.jobs.wait(started.json()["id"])
        job = (await client.get(started.headers["location"], headers=bearer(token))).json()
        response = await client.get("/metrics", headers=bearer(TOKEN))
    assert job["status"] == "succeeded", job["error"]
    figures = samples(response.text)
    assert figures[("chartbrief_summaries_total", (("outcome", "written"),))] == 1
    for stage in ("fetch", "prompt", "model", "grounding", "write"):
        assert figures[("chartbrief_stage_seconds_count", (("stage", stage),))] == 1, stage
    assert figures[("chartbrief_stage_seconds_sum", (("stage", "fetch"),))] > 0
    assert figures[("chartbrief_tokens_total", (("kind", "prompt"),))] == job["result"]["prompt_tokens"] > 0
    identity = engine.identity
    model = (
        ("file", identity.file_name),
        ("model", identity.name),
        ("quantization", identity.quantization),
        ("sha256", identity.sha256),
    )
    assert figures[("chartbrief_model_info", model)] == 1
    dropped = sum(v for (name, _), v in figures.items() if name == "chartbrief_claims_dropped_total")
    assert dropped == len(job["result"]["dropped"]) == 1
    # Nothing of the patient is in a label or a value name: ids, names.
    assert patient not in response.text
    assert "Luigi" not in response.text and "Wiegand" not in response.text


async def test_a_failed_job_and_a_refused_one_are_counted(ehr: TestEhr, tmp_path: Path) -> None:
    token = ehr.issue_token(patient="p1", scope=f"{READ} {WRITE}", audience=APP_BASE, subject="portal")
    settings = metrics_settings(tmp_path, ehr, fhir="http://127.0.0.1:9/fhir", bearer_token=TOKEN)
    settings = settings.model_copy(
        update={
            "api": settings.api.model_copy(update={"max_queued_work_per_client": 1}),
            # One retry a third of a second later: the first job is still in flight when the second
            # request comes, and it fails soon after.
            "fhir": settings.fhir.model_copy(update={"max_attempts": 2, "backoff_initial_seconds": 0.3}),
        }
    )
    engine = FakeEngine()
    async with running_app(settings, engine=engine) as (client, app):
        first = await client.post("/api/summaries", json={"patient": "p1"}, headers=bearer(token))
        refused = await client.post("/api/summaries", json={"patient": "p1"}, headers=bearer(token))
        await app.state.runtime.jobs.wait(first.json()["id"])  # the FHIR server is a closed port: it fails
        figures = await scrape(client)
    assert first.status_code == 202 and refused.status_code == 429
    assert figures[("chartbrief_summaries_total", (("outcome", "failed"),))] == 1
    assert figures[("chartbrief_work_refused_total", (("bound", "client"), ("kind", "job")))] == 1
    assert figures[("chartbrief_work_in_flight", ())] == 0


async def test_review_outcomes_and_batch_progress_are_read_from_the_database(
    ehr: TestEhr, tmp_path: Path
) -> None:
    settings = metrics_settings(tmp_path, ehr, bearer_token=TOKEN)
    async with running_app(settings) as (client, app):
        db = app.state.runtime.db
        before = await scrape(client)
        record_cds_feedback(db, outcome="overridden", summary_id=None, who="cds:test", reasons=["x"])
        batch = BatchRepository.from_url(settings.db.url)  # what a batch process on another machine does
        try:
            run_id = batch.create_run(
                fhir_base="http://fhir.test/r4",
                mode="local",
                selection="changed",
                patient_ids=["a", "b", "c"],
            )
            batch.start_item(run_id, "a", "worker-1")
            batch.finish_item(run_id, "a", ItemOutcome(state="done"))
        finally:
            batch.close()
        after = await scrape(client)
    assert before[("chartbrief_review_outcomes_total", (("action", "cds_overridden"),))] == 0
    assert after[("chartbrief_review_outcomes_total", (("action", "cds_overridden"),))] == 1
    assert after[("chartbrief_batch_items", (("state", "done"),))] == 1
    assert after[("chartbrief_batch_items", (("state", "queued"),))] == 2
    assert after[("chartbrief_batch_running", ())] == 1


def test_every_label_value_comes_from_a_closed_set() -> None:
    figures = Metrics()
    figures.refused("a-kind-nobody-declared", "somewhere")
    text = "\n".join(f"{s.name}{s.labels}" for family in figures.registry.collect() for s in family.samples)
    assert "a-kind-nobody-declared" not in text and "somewhere" not in text
    assert "other" in text


def test_the_dashboard_asks_only_for_metrics_chartbrief_exposes() -> None:
    dashboard = json.loads(
        (Path(__file__).parents[2] / "docker" / "grafana" / "chartbrief-dashboard.json").read_text()
    )
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs
    names = {family.name for family in Metrics().registry.collect()} | {
        "chartbrief_review_outcomes",
        "chartbrief_batch_items",
        "chartbrief_batch_running",
        "chartbrief_model_info",
    }
    suffixes = ("_total", "_bucket", "_sum", "_count")
    for expr in exprs:
        for used in re.findall(r"chartbrief_[a-z_]+", expr):
            base = next(
                (used[: -len(x)] for x in suffixes if used.endswith(x) and used[: -len(x)] in names), used
            )
            assert base in names, f"{used} in {expr!r} is not a metric chartbrief exposes"
