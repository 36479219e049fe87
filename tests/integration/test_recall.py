"""`chartbrief recall` against the real local FHIR server: drafts written by the pipeline (FakeEngine with a
model sha256 and a prompt id of this test's own, so nothing another test wrote can match), one approved
through `service.review`, one written by another chartbrief database (found only through Provenance).
Then `recall` lists them, `--mark` puts the unreviewed ones under recall and leaves the approved one as it
was, a second `--mark` changes nothing, and the review screen shows the recall.
"""

from __future__ import annotations

import asyncio
import html
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from fhir_adapters.client import FhirClient
from service import review
from service.cli.main import cli
from service.config import Settings
from service.db.models import AuditEvent
from service.db.store import SqlSummaryStore
from service.dev.sandbox import LoadedPatient
from service.fhir import fhir_client
from service.governance.recall_rules import RECALL_TAG, RECALL_URL
from service.llm.fake import FAKE_IDENTITY, FakeEngine
from service.pipeline import Services, summarize_patient
from service.prompts import DEFAULT_PROMPTS_DIR

pytestmark = pytest.mark.integration

APPROVED = "Luigi_Wiegand_e27d88b0-c5e5-4042-ad49-184f6a900ee3.json"
OPEN = "Kermit_Trantow_f1a650a5-737e-4fd7-828e-03c3348b9524.json"
ELSEWHERE = "Edythe31_Morar593_9c3df38a-d3b7-2198-3898-51f9153d023d.json.gz"
DR = "Practitioner/dr-recall-1"
REASON = "Model file withdrawn: misreads medication strengths"


@dataclass
class Written:
    fhir_base: str
    db_url: str
    sha256: str
    prompt: str
    approved: dict[str, Any]
    open: dict[str, Any]
    elsewhere: dict[str, Any]


def own_prompt(tmp_path: Path) -> tuple[Path, str]:
    """The shipped summary prompt under an id of this test's own (a prompt file is data)."""
    task = f"recall{uuid.uuid4().hex[:8]}"
    folder = tmp_path / "prompts" / task
    folder.mkdir(parents=True)
    text = (DEFAULT_PROMPTS_DIR / "summary" / "v1.yaml").read_text(encoding="utf-8")
    (folder / "v1.yaml").write_text(text.replace("id: summary\n", f"id: {task}\n", 1), encoding="utf-8")
    return tmp_path / "prompts", f"{task}/v1"


async def draft(svc: Services, patient: str) -> dict[str, Any]:
    assert isinstance(svc.engine, FakeEngine)
    svc.engine.enqueue('{"claims": []}')
    result = await summarize_patient(svc, patient)
    assert result.write is not None and result.write.created
    return await svc.client.read(*result.write.document_reference.split("/"))


@pytest.fixture
async def written(
    fhir_base: str, tmp_path: Path, loaded_patients: dict[str, LoadedPatient]
) -> AsyncIterator[Written]:
    prompts_dir, prompt = own_prompt(tmp_path)
    sha = uuid.uuid4().hex + uuid.uuid4().hex
    identity = replace(FAKE_IDENTITY, sha256=sha, sampling=f"{FAKE_IDENTITY.sampling} test=recall-{sha[:8]}")
    urls = [f"sqlite:///{tmp_path}/cb.db", f"sqlite:///{tmp_path}/elsewhere.db"]
    docs = []
    for url, files in ((urls[0], (APPROVED, OPEN)), (urls[1], (ELSEWHERE,))):
        settings = Settings(
            fhir={"base_url": fhir_base},  # type: ignore[arg-type]
            db={"url": url},  # type: ignore[arg-type]
            prompts_dir=prompts_dir,
            prompt=prompt,
        )
        store = SqlSummaryStore.from_url(url)
        async with fhir_client(settings.fhir) as client:
            svc = Services(settings=settings, client=client, engine=FakeEngine(identity), store=store)
            for name in files:
                docs.append(await draft(svc, loaded_patients[name].id))
            if url == urls[0]:
                approved = docs[0]
                await review.approve(
                    svc,
                    approved["id"],
                    patient_id=loaded_patients[APPROVED].id,
                    actor=DR,
                    version=approved["meta"]["versionId"],
                    db=store.sessions,
                )
                docs[0] = await client.read("DocumentReference", approved["id"])
        store.close()
    yield Written(fhir_base, urls[0], sha, prompt, *docs)


async def recall(written: Written, *args: str) -> dict[str, Any]:
    # The command runs its own event loop (asyncio.run): off this test's loop, in a thread.
    result = await asyncio.to_thread(
        CliRunner().invoke,
        cli,
        ["recall", *args, "--json", "--fhir-base", written.fhir_base, "--db-url", written.db_url],
    )
    assert result.exit_code == 0, result.output
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def by_doc(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["document_reference"]: s for s in report["summaries"]}


def ref(doc: dict[str, Any]) -> str:
    return f"DocumentReference/{doc['id']}"


async def read(written: Written, doc: dict[str, Any]) -> dict[str, Any]:
    async with FhirClient(written.fhir_base) as client:
        return await client.read("DocumentReference", doc["id"])


async def test_recall_finds_marks_and_leaves_approved_summaries_alone(written: Written) -> None:
    listed = by_doc(await recall(written, "--model-sha", written.sha256[:12]))
    assert set(listed) == {ref(written.approved), ref(written.open), ref(written.elsewhere)}
    assert listed[ref(written.approved)]["action"] == "re-check"
    assert listed[ref(written.open)]["action"] == "to-mark"
    assert listed[ref(written.open)]["found_in"] == ["database", "fhir"]
    assert listed[ref(written.elsewhere)]["found_in"] == ["fhir"], "found through Provenance only"
    assert all(s["model_sha256"] == written.sha256 for s in listed.values())

    marked = await recall(written, "--model-sha", written.sha256, "--mark", "--reason", REASON)
    assert marked["actions"] == {"marked": 2, "re-check": 1}
    assert marked["to_recheck"] == [ref(written.approved)]
    for doc in (written.open, written.elsewhere):
        now = await read(written, doc)
        assert (now["status"], now["docStatus"]) == ("current", "preliminary")
        assert int(now["meta"]["versionId"]) == int(doc["meta"]["versionId"]) + 1
        assert RECALL_TAG["code"] in [t.get("code") for t in now["meta"].get("tag", [])]
        (mark,) = [e for e in now.get("extension", []) if e["url"] == RECALL_URL]
        parts = {p["url"]: p.get("valueString") for p in mark["extension"]}
        assert parts["reason"] == REASON and parts["criterion"] == f"model-sha256:{written.sha256}"
        assert now["meta"]["security"][0]["code"] == "AIAST", "still labelled as AI-written"
    approved = await read(written, written.approved)
    assert approved["meta"]["versionId"] == written.approved["meta"]["versionId"]
    assert approved["docStatus"] == "final" and RECALL_URL not in json.dumps(approved)

    store = SqlSummaryStore.from_url(written.db_url)
    with store.sessions() as s:
        rows = list(s.scalars(select(AuditEvent).where(AuditEvent.action == "recall")).all())
    store.close()
    assert sorted(r.resource or "" for r in rows) == sorted([ref(written.open), ref(written.elsewhere)])
    assert all(r.outcome == "ok" and REASON not in (r.detail or "") for r in rows)

    again = await recall(written, "--model-sha", written.sha256[:16], "--mark", "--reason", REASON)
    assert again["actions"] == {"already-marked": 2, "re-check": 1}
    for doc in (written.open, written.elsewhere):
        assert int((await read(written, doc))["meta"]["versionId"]) == int(doc["meta"]["versionId"]) + 1

    by_prompt = by_doc(await recall(written, "--prompt-version", written.prompt))
    assert set(by_prompt) == set(listed), "the prompt version finds the same three"
    assert by_prompt[ref(written.open)]["state"] == "under-recall"


async def test_the_review_screen_says_a_draft_is_under_recall(
    written: Written, tmp_path: Path, loaded_patients: dict[str, LoadedPatient]
) -> None:
    from tests.api.conftest import REDIRECT_URI, app_settings, launch_session, running_app
    from tests.smart_ehr.server import TestEhr

    await recall(written, "--model-sha", written.sha256, "--mark", "--reason", REASON)
    with TestEhr(written.fhir_base, redirect_uris=[REDIRECT_URI]) as ehr:
        async with running_app(app_settings(tmp_path / "app", ehr)) as (client, _app):
            await launch_session(client, ehr, loaded_patients[OPEN].id)
            page = await client.get(f"/review?doc={written.open['id']}")
    assert page.status_code == 200, page.text
    text = html.unescape(page.text)
    assert 'id="recall-notice"' in text and "Under recall." in text and REASON in text
    assert "approve-button" in text, "still awaiting a clinician's review"
