"""`chartbrief recall`: what a model file or prompt version produced, found in the database and through
Provenance on the FHIR server; `--mark` puts only unreviewed drafts under recall (If-Match, audited,
idempotent), approved ones are listed and left alone; bad input is one line and exit 2.

The FHIR side is `MemoryFhir` with Device/Provenance search; the real server is in
tests/integration/test_recall.py.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import select
from structlog.testing import capture_logs

from fhir_adapters.models import ModelIdentity
from fhir_adapters.write.draft import PROMPT_EXTENSION_URL, build_device, provenance_id
from service.cli.main import cli
from service.db.models import AuditEvent
from service.db.store import SqlSummaryStore
from service.governance.recall import run_recall
from service.governance.recall_rules import (
    RECALL_TAG,
    Criterion,
    RecallError,
    is_marked,
    marked_document,
    parse_criterion,
    recall_notice,
    review_state,
)
from tests.fhir_adapters.test_review import MemoryFhir, ai_provenance, draft_doc

BASE = "http://fhir.test/fhir"
SHA_A = "a1" * 32
SHA_A2 = "a1" * 6 + "ff" * 26  # shares a 12-character prefix with SHA_A
SHA_B = "b2" * 32
WHEN = "2026-12-01T10:00:00+00:00"
REASON = "Model file recalled: misreads medication strengths"


# -- input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_sha", "prompt_version", "message"),
    [
        (None, None, "exactly one of"),
        (SHA_A, "v1", "exactly one of"),
        ("a1a1a1a1a1a", None, "too short"),
        ("z" * 64, None, "sha256 in hex"),
        (None, "version one", "must look like v1"),
        (None, "summary/1", "must look like v1"),
    ],
)
def test_a_criterion_needs_one_well_formed_option(
    model_sha: str | None, prompt_version: str | None, message: str
) -> None:
    with pytest.raises(RecallError, match=message):
        parse_criterion(model_sha, prompt_version)


def test_a_criterion_is_a_lowercased_sha_prefix_or_a_prompt_with_or_without_its_id() -> None:
    assert parse_criterion(SHA_A[:12].upper(), None) == Criterion("model", SHA_A[:12])
    assert parse_criterion(None, "v2").matches_prompt("summary", "v2")
    assert not parse_criterion(None, "v2").matches_prompt("summary", "v1")
    assert parse_criterion(None, "other/v1").matches_prompt("other", "v1")
    assert not parse_criterion(None, "other/v1").matches_prompt("summary", "v1")


# -- the marker (pure) ---------------------------------------------------------------------------------


def test_the_marker_keeps_the_draft_preliminary_and_ai_labelled_and_says_why() -> None:
    doc = draft_doc()
    criterion = Criterion("model", SHA_A)
    marked = marked_document(doc, criterion, REASON, WHEN)
    assert (marked["status"], marked["docStatus"]) == ("current", "preliminary")
    assert "versionId" not in marked["meta"] and "lastUpdated" not in marked["meta"]
    assert marked["meta"]["security"] == doc["meta"]["security"]
    assert marked["meta"]["tag"] == [RECALL_TAG]
    assert is_marked(marked, criterion) and not is_marked(doc, criterion)
    assert review_state(marked) == "under-recall" and review_state(doc) == "unreviewed"
    assert recall_notice(marked) == f"This draft is under recall (model-sha256:{SHA_A}): {REASON}."
    again = marked_document(marked, criterion, "another reason", WHEN)
    assert again["meta"]["tag"] == [RECALL_TAG] and again["extension"] == marked["extension"]
    assert recall_notice(doc) is None
    assert doc == draft_doc(), "the builder does not change what it was given"


# -- a FHIR server with chartbrief's Devices and Provenance -----------------------------------------------


class SearchableFhir(MemoryFhir):
    """MemoryFhir answering the two searches recall makes, and remembering each update's If-Match."""

    base_url = BASE

    def __init__(self, *resources: dict[str, Any]) -> None:
        super().__init__(*resources)
        self.if_matches: list[str | None] = []

    async def search_all(
        self, resource_type: str, params: Mapping[str, str] | None = None
    ) -> list[dict[str, Any]]:
        found = [
            copy.deepcopy(h[-1]) for ref, h in self.history.items() if ref.startswith(f"{resource_type}/")
        ]
        agent = (params or {}).get("agent")
        if resource_type == "Provenance" and agent:
            found = [p for p in found if any(a["who"]["reference"] == agent for a in p.get("agent", []))]
        return found

    async def update(self, resource: dict[str, Any], *, if_match: str | None = None) -> dict[str, Any]:
        self.if_matches.append(if_match)
        return await super().update(resource, if_match=if_match)


def device(device_id: str, sha: str) -> dict[str, Any]:
    built = build_device(ModelIdentity("model", "model.gguf", sha, "Q4_1", "llama.cpp"))
    return {**built, "id": device_id}


def doc_and_provenance(
    doc_id: str, *, device_id: str, prompt: str = "summary/v1", **fields: Any
) -> list[dict[str, Any]]:
    key = doc_id.ljust(64, "0")
    doc = {**draft_doc(doc_id), "identifier": [{"system": "urn:chartbrief:summary", "value": key}], **fields}
    doc["author"] = [{"reference": f"Device/{device_id}"}]
    prov = copy.deepcopy(ai_provenance(doc_id))
    prov["id"] = provenance_id(key)
    prov["agent"][0]["who"] = {"reference": f"Device/{device_id}"}
    prov["extension"] = [{"url": PROMPT_EXTENSION_URL, "valueString": f"{prompt} sha256:{'c' * 64}"}]
    return [doc, prov]


def row(doc_id: str | None, sha: str, version: str = "v1") -> dict[str, Any]:
    return {
        "fhir_base": BASE,
        "patient_id": "p1",
        "encounter_id": None,
        "idempotency_key": (doc_id or "dry").ljust(64, "0"),
        "inputs": [],
        "prompt_id": "summary",
        "prompt_version": version,
        "prompt_sha256": "c" * 64,
        "model_name": "model",
        "model_file": "model.gguf",
        "model_sha256": sha,
        "sampling": "temperature=0.0",
        "outcome": "written" if doc_id else "dry-run",
        "document_reference": f"DocumentReference/{doc_id}" if doc_id else None,
    }


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlSummaryStore]:
    s = SqlSummaryStore.from_url(f"sqlite:///{tmp_path}/cb.db")
    yield s
    s.close()


@pytest.fixture
def fhir(store: SqlSummaryStore) -> SearchableFhir:
    """Model A: d-open (unreviewed), d-final (approved), d-rejected, d-old (superseded) in the database;
    d-fhir-only on the server only; d-dry never written. Model B: d-b (unreviewed, prompt v2)."""
    server = SearchableFhir(
        device("dev-a", SHA_A),
        device("dev-b", SHA_B),
        *doc_and_provenance("d-open", device_id="dev-a"),
        *doc_and_provenance("d-final", device_id="dev-a", docStatus="final"),
        *doc_and_provenance("d-rejected", device_id="dev-a", status="entered-in-error"),
        *doc_and_provenance("d-old", device_id="dev-a", status="superseded"),
        *doc_and_provenance("d-fhir-only", device_id="dev-a"),
        *doc_and_provenance("d-b", device_id="dev-b", prompt="summary/v2"),
    )
    for doc_id in ("d-open", "d-final", "d-rejected", "d-old"):
        store.record(row(doc_id, SHA_A))
    store.record(row(None, SHA_A))
    store.record(row("d-b", SHA_B, "v2"))
    return server


def actions(report: Any) -> dict[str | None, str]:
    return {s.document_reference: s.action for s in report.summaries}


def audit_rows(store: SqlSummaryStore) -> list[AuditEvent]:
    with store.sessions() as s:
        return list(s.scalars(select(AuditEvent).order_by(AuditEvent.id)).all())


async def test_recall_lists_every_summary_of_the_model_from_the_database_and_the_server(
    fhir: SearchableFhir, store: SqlSummaryStore
) -> None:
    report = await run_recall(
        Criterion("model", SHA_A[:12]), db=store.sessions, client=fhir, mark=False, when=WHEN
    )
    assert report.criterion == Criterion("model", SHA_A), "the prefix is resolved to the full sha256"
    assert actions(report) == {
        "DocumentReference/d-open": "to-mark",
        "DocumentReference/d-final": "re-check",
        "DocumentReference/d-rejected": "none",
        "DocumentReference/d-old": "none",
        "DocumentReference/d-fhir-only": "to-mark",
        None: "none",  # the dry run: in the database, never written
    }
    found = {s.document_reference: sorted(s.found_in) for s in report.summaries}
    assert found["DocumentReference/d-open"] == ["database", "fhir"]
    assert found["DocumentReference/d-fhir-only"] == ["fhir"]
    assert found[None] == ["database"]
    assert fhir.writes == [], "without --mark nothing is written"


async def test_mark_sets_only_unreviewed_drafts_under_recall_with_if_match_and_an_audit_row(
    fhir: SearchableFhir, store: SqlSummaryStore
) -> None:
    before = {ref: fhir.current(ref) for ref in fhir.history}
    with capture_logs() as logs:
        report = await run_recall(
            Criterion("model", SHA_A), db=store.sessions, client=fhir, mark=True, reason=REASON, when=WHEN
        )
    assert actions(report)["DocumentReference/d-open"] == "marked"
    assert actions(report)["DocumentReference/d-fhir-only"] == "marked"
    assert actions(report)["DocumentReference/d-final"] == "re-check"
    assert sorted(fhir.writes) == ["DocumentReference/d-fhir-only", "DocumentReference/d-open"]
    assert fhir.if_matches == ['W/"1"', 'W/"1"']
    for ref in ("DocumentReference/d-final", "DocumentReference/d-rejected", "DocumentReference/d-b"):
        assert fhir.current(ref) == before[ref], f"{ref} must not change"
    marked = fhir.current("DocumentReference/d-open")
    assert (marked["status"], marked["docStatus"], marked["meta"]["versionId"]) == (
        "current",
        "preliminary",
        "2",
    )
    assert REASON in (recall_notice(marked) or "")
    recalls = [r for r in audit_rows(store) if r.action == "recall"]
    assert sorted((r.resource, r.outcome, r.actor) for r in recalls) == [
        ("DocumentReference/d-fhir-only", "ok", "system"),
        ("DocumentReference/d-open", "ok", "system"),
    ]
    assert all(f"model-sha256 {SHA_A[:12]}" in (r.detail or "") for r in recalls)
    assert all(REASON not in (r.detail or "") for r in audit_rows(store))
    assert REASON not in json.dumps(logs, default=str)


async def test_a_second_mark_changes_nothing_more(fhir: SearchableFhir, store: SqlSummaryStore) -> None:
    criterion = Criterion("model", SHA_A)
    await run_recall(criterion, db=store.sessions, client=fhir, mark=True, reason=REASON, when=WHEN)
    writes, recalls = len(fhir.writes), len([r for r in audit_rows(store) if r.action == "recall"])
    again = await run_recall(criterion, db=store.sessions, client=fhir, mark=True, reason=REASON, when=WHEN)
    assert len(fhir.writes) == writes
    assert len([r for r in audit_rows(store) if r.action == "recall"]) == recalls
    assert actions(again)["DocumentReference/d-open"] == "already-marked"
    assert actions(again)["DocumentReference/d-final"] == "re-check"


async def test_a_prompt_version_recalls_across_models_and_only_that_version(
    fhir: SearchableFhir, store: SqlSummaryStore
) -> None:
    report = await run_recall(
        parse_criterion(None, "v2"), db=store.sessions, client=fhir, mark=True, reason=REASON, when=WHEN
    )
    assert actions(report) == {"DocumentReference/d-b": "marked"}
    assert fhir.writes == ["DocumentReference/d-b"]


async def test_a_draft_changed_while_marking_is_read_again_and_marked_on_its_new_version(
    fhir: SearchableFhir, store: SqlSummaryStore
) -> None:
    changed = []

    def someone_else_writes() -> None:
        if not changed:
            changed.append(True)
            fhir.change("DocumentReference/d-b", description="changed elsewhere")

    fhir.before_write = someone_else_writes
    report = await run_recall(
        Criterion("prompt", "summary/v2"), db=store.sessions, client=fhir, mark=True, reason=REASON, when=WHEN
    )
    assert actions(report) == {"DocumentReference/d-b": "marked"}
    assert fhir.if_matches == ['W/"1"', 'W/"2"']
    doc = fhir.current("DocumentReference/d-b")
    assert doc["description"] == "changed elsewhere" and is_marked(doc, Criterion("prompt", "summary/v2"))


async def test_an_ambiguous_sha_prefix_is_refused(fhir: SearchableFhir, store: SqlSummaryStore) -> None:
    store.record(row("d-other", SHA_A2))
    with pytest.raises(RecallError, match="matches 2 model files"):
        await run_recall(Criterion("model", SHA_A[:12]), db=store.sessions, client=fhir, when=WHEN)


async def test_mark_needs_a_reason_and_a_server(fhir: SearchableFhir, store: SqlSummaryStore) -> None:
    with pytest.raises(RecallError, match="--reason"):
        await run_recall(Criterion("model", SHA_A), db=store.sessions, client=fhir, mark=True, when=WHEN)
    with pytest.raises(RecallError, match="FHIR server"):
        await run_recall(
            Criterion("model", SHA_A), db=store.sessions, client=None, mark=True, reason=REASON, when=WHEN
        )
    assert fhir.writes == []


# -- the command -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give exactly one of --model-sha SHA or --prompt-version V"),
        (["--model-sha", SHA_A, "--prompt-version", "v1"], "give exactly one of"),
        (["--model-sha", "a1a1a1"], "is too short: give at least 12 hex characters"),
        (["--prompt-version", "v1", "--mark"], "--mark needs --reason TEXT"),
        (["--prompt-version", "v1", "--mark", "--reason", "x"], "--mark needs the FHIR server"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(
    args: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CHARTBRIEF_FHIR__BASE_URL", raising=False)
    result = CliRunner().invoke(cli, ["recall", *args, "--db-url", f"sqlite:///{tmp_path}/x.db"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("chartbrief: ") and message in lines[0]


def test_recall_without_a_server_lists_the_database_summaries_as_json(
    store: SqlSummaryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CHARTBRIEF_FHIR__BASE_URL", raising=False)
    store.record(row("d-open", SHA_A))
    store.record(row("d-b", SHA_B, "v2"))
    result = CliRunner().invoke(
        cli, ["recall", "--model-sha", SHA_A[:16], "--json", "--db-url", str(store.engine.url)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["criterion"] == f"model-sha256:{SHA_A}" and report["fhir_base"] is None
    assert [(s["document_reference"], s["state"], s["found_in"]) for s in report["summaries"]] == [
        ("DocumentReference/d-open", "not-checked", ["database"])
    ]
    assert datetime.fromisoformat(report["summaries"][0]["created"]).tzinfo == UTC
