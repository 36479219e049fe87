"""`chartbrief monitor`: review outcomes recorded where the actions happen, and the figures computed from
them - per model and prompt, per ISO week, since a date - as a table and as JSON.

The figures are specified on plain records; the recording through `service.review` on `MemoryFhir` and a
real SQLite file; and the whole path (API job, review screen approve / edit / reject, `chartbrief monitor`)
against the real local FHIR server in the integration test at the end.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy.orm import Session, sessionmaker
from structlog.testing import capture_logs

from fhir_adapters.write.draft import provenance_id
from service import review
from service.cli.main import cli
from service.config import Settings
from service.db.audit import RejectionRecord
from service.db.store import SqlSummaryStore
from service.dev.sandbox import LoadedPatient
from service.governance.monitor import edit_size, iso_week, monitor_report
from service.governance.records import ReviewOutcomeRecord, SummaryRecord, review_outcomes
from service.llm.fake import FakeEngine
from service.pipeline import Services
from tests.fhir_adapters.test_review import AI_MARKDOWN, MemoryFhir, ai_device, ai_provenance, draft_doc

DR = "Practitioner/dr-1"
BASE = "http://fhir.test/fhir"
SHA_A, SHA_B = "a" * 64, "b" * 64
MONDAY = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)  # ISO week 2026-W48
NEXT_WEEK = MONDAY + timedelta(days=7)  # 2026-W49


# -- edit size -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("draft", "edited", "words", "chars"),
    [
        ("Hypertension since 2010.", "Hypertension since 2010.", 0, 0),
        ("Hypertension since 2010.", "Hypertension since 2012.", 1, 5),
        ("Takes lisinopril 10 mg daily.", "Takes lisinopril 20 mg daily.", 1, 2),
        ("A B C", "A C", 1, 1),  # a word removed
        ("A C", "A B C", 1, 1),  # a word added
        ("one two", "three four five", 3, 13),  # all replaced: the longer side counts
        ("  spaces\n\nonly   differ ", "spaces only differ", 0, 0),  # whitespace is not an edit
    ],
)
def test_edit_size_counts_the_words_and_characters_a_clinician_changed(
    draft: str, edited: str, words: int, chars: int
) -> None:
    size = edit_size(draft, edited)
    assert (size.words_changed, size.chars_changed) == (words, chars)
    assert size.draft_words == len(draft.split())


# -- figures over plain records ----------------------------------------------------------------------------


def summary(
    n: int,
    *,
    sha: str = SHA_A,
    version: str = "v1",
    created: datetime = MONDAY,
    superseded: str | None = None,
) -> SummaryRecord:
    return SummaryRecord(
        id=f"s{n}",
        created_at=created,
        fhir_base=BASE,
        patient_id=f"p{n}",
        document_reference=f"DocumentReference/d{n}",
        superseded=superseded,
        outcome="written",
        model_name="model-a" if sha == SHA_A else "model-b",
        model_sha256=sha,
        prompt_id="summary",
        prompt_version=version,
    )


_ids = iter(range(1, 10_000))


def outcome(
    n: int, action: str, at: datetime, *, words: int | None = None, draft_words: int | None = None
) -> ReviewOutcomeRecord:
    return ReviewOutcomeRecord(
        id=next(_ids),
        at=at,
        action=action,
        document_reference=f"DocumentReference/d{n}",
        patient_id=f"p{n}",
        summary_id=f"s{n}",
        draft_created_at=None,
        words_changed=words,
        chars_changed=words * 5 if words is not None else None,
        draft_words=draft_words,
    )


def rejection(n: int, reason: str | None, at: datetime) -> RejectionRecord:
    return RejectionRecord(
        id=n, document_reference=f"DocumentReference/d{n}", patient_id=f"p{n}", who=DR, at=at, reason=reason
    )


def scenario() -> tuple[list[SummaryRecord], list[ReviewOutcomeRecord], list[RejectionRecord]]:
    """Model A / v1: 2 approved, 1 edited, 1 rejected, 1 pending, 1 superseded (week 48), 1 approved (49).
    Model B / v2: 1 rejected, 1 pending (week 49)."""
    hour = timedelta(hours=1)
    rows = [
        summary(1),
        summary(2),
        summary(3),
        summary(4),
        summary(5),
        summary(6),
        summary(7, superseded="DocumentReference/d6", created=NEXT_WEEK),
        summary(8, sha=SHA_B, version="v2", created=NEXT_WEEK),
        summary(9, sha=SHA_B, version="v2", created=NEXT_WEEK),
    ]
    outcomes = [
        outcome(1, "approve", MONDAY + 2 * hour),
        outcome(2, "approve", MONDAY + 4 * hour),
        outcome(3, "edit", MONDAY + 1 * hour, words=6, draft_words=30),
        outcome(3, "approve", MONDAY + 1 * hour),
        outcome(4, "reject", MONDAY + 10 * hour),
        outcome(7, "approve", NEXT_WEEK + 3 * hour),
        outcome(8, "reject", NEXT_WEEK + 1 * hour),
    ]
    rejections = [
        rejection(4, "Wrong dose of  metformin", MONDAY + 10 * hour),
        rejection(8, "wrong dose of metformin", NEXT_WEEK + hour),
    ]
    return rows, outcomes, rejections


def group(report: dict[str, Any], sha: str, prompt: str) -> dict[str, Any]:
    (found,) = [g for g in report["by_model_prompt"] if g["model_sha256"] == sha and g["prompt"] == prompt]
    return found


def test_each_draft_lands_in_one_state_and_rates_are_shares_of_the_reviewed_ones() -> None:
    report = monitor_report(*scenario())
    a = group(report, SHA_A, "summary/v1")
    assert {k: a[k] for k in ("summaries", "reviewed", "approved", "edited", "rejected", "pending")} == {
        "summaries": 7,
        "reviewed": 5,
        "approved": 3,
        "edited": 1,
        "rejected": 1,
        "pending": 1,
    }
    assert a["superseded"] == 1, "replaced before anyone reviewed it: not pending, not reviewed"
    assert (a["approval_rate"], a["edit_rate"], a["rejection_rate"]) == (0.6, 0.2, 0.2)
    b = group(report, SHA_B, "summary/v2")
    assert (b["summaries"], b["rejected"], b["pending"], b["rejection_rate"], b["approval_rate"]) == (
        2,
        1,
        1,
        1.0,
        0.0,
    )
    overall = report["overall"]
    assert overall["summaries"] == 9 and overall["reviewed"] == 6
    assert sum(overall[s] for s in ("approved", "edited", "rejected", "superseded", "pending")) == 9


def test_edit_size_and_time_to_review_are_summarised_per_group() -> None:
    a = group(monitor_report(*scenario()), SHA_A, "summary/v1")
    assert a["edit_words_changed"]["n"] == 1 and a["edit_words_changed"]["median"] == 6
    assert a["edit_chars_changed"]["max"] == 30
    assert a["edit_share_of_words_changed"]["median"] == 0.2
    assert a["time_to_review_seconds"]["n"] == 5
    assert a["time_to_review_seconds"]["median"] == 3 * 3600  # of 1, 2, 3, 4, 10 hours
    assert a["time_to_review_seconds"]["max"] == 10 * 3600


def test_rejection_reasons_are_grouped_across_case_and_spacing_and_counted() -> None:
    report = monitor_report(*scenario())
    assert report["overall"]["rejection_reasons"] == [{"reason": "Wrong dose of metformin", "count": 2}]
    assert group(report, SHA_B, "summary/v2")["rejection_reasons"][0]["count"] == 1
    rows, outcomes, _ = scenario()
    silent = monitor_report(rows, outcomes, [rejection(4, None, MONDAY)])
    assert silent["overall"]["rejections_without_reason"] == 2  # d4 (no text) and d8 (no row at all)


def test_weeks_follow_the_drafts_creation_per_model_and_prompt() -> None:
    report = monitor_report(*scenario())
    weeks = {(w["week"], w["model_sha256"], w["prompt"]): w for w in report["by_week"]}
    assert set(weeks) == {
        ("2026-W48", SHA_A, "summary/v1"),
        ("2026-W49", SHA_A, "summary/v1"),
        ("2026-W49", SHA_B, "summary/v2"),
    }
    assert weeks[("2026-W48", SHA_A, "summary/v1")]["summaries"] == 6
    assert weeks[("2026-W49", SHA_A, "summary/v1")]["approved"] == 1
    assert iso_week(datetime(2026, 12, 31, tzinfo=UTC)) == "2026-W53"


def test_since_keeps_only_drafts_created_from_that_instant() -> None:
    report = monitor_report(*scenario(), since=NEXT_WEEK)
    assert report["since"] == NEXT_WEEK.isoformat()
    assert report["overall"]["summaries"] == 3
    assert {g["prompt"] for g in report["by_model_prompt"]} == {"summary/v1", "summary/v2"}
    assert all(w["week"] == "2026-W49" for w in report["by_week"])


def test_a_review_of_a_draft_this_database_did_not_write_counts_under_an_unknown_model() -> None:
    stray = replace(outcome(50, "approve", MONDAY), summary_id=None)
    report = monitor_report([], [stray], [])
    (only,) = report["by_model_prompt"]
    assert (only["model_sha256"], only["approved"]) == ("unknown", 1)


def test_a_draft_approved_after_an_edit_is_edited_and_a_late_approval_does_not_undo_a_rejection() -> None:
    rows = [summary(1), summary(2)]
    outcomes = [
        outcome(1, "edit", MONDAY, words=2, draft_words=10),
        outcome(1, "approve", MONDAY + timedelta(minutes=1)),
        outcome(2, "reject", MONDAY + timedelta(minutes=1)),
        outcome(2, "approve", MONDAY + timedelta(minutes=5)),
    ]
    overall = monitor_report(rows, outcomes, [])["overall"]
    assert (overall["edited"], overall["rejected"], overall["approved"]) == (1, 1, 0)


# -- recording at the review actions ---------------------------------------------------------------------


DRAFTED = datetime(2025, 3, 4, 10, 0, tzinfo=UTC)  # the date of draft_doc()
KEYS = {f"doc-{n}": f"{n}{n}" * 32 for n in (1, 2, 3, 4)}


def _drafts() -> MemoryFhir:
    resources = []
    for doc_id, key in KEYS.items():
        doc = draft_doc(doc_id)
        doc["identifier"] = [{"system": "urn:chartbrief:summary", "value": key}]
        prov = copy.deepcopy(ai_provenance(doc_id))
        prov["id"] = provenance_id(key)
        resources += [doc, prov]
    return MemoryFhir(*resources, ai_device(SHA_A))


def _summary_fields(doc_id: str, key: str, created: datetime) -> dict[str, Any]:
    return {
        "created_at": created,
        "fhir_base": BASE,
        "patient_id": "p1",
        "encounter_id": None,
        "idempotency_key": key,
        "inputs": [],
        "prompt_id": "summary",
        "prompt_version": "v1",
        "prompt_sha256": "c" * 64,
        "model_name": "model-a",
        "model_file": "model-a.gguf",
        "model_sha256": SHA_A,
        "sampling": "temperature=0.0",
        "outcome": "written",
        "document_reference": f"DocumentReference/{doc_id}",
    }


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlSummaryStore]:
    s = SqlSummaryStore.from_url(f"sqlite:///{tmp_path}/cb.db")
    for doc_id, key in KEYS.items():
        s.record(_summary_fields(doc_id, key, DRAFTED))
    yield s
    s.close()


def services(fhir: MemoryFhir, store: SqlSummaryStore) -> Services:
    settings = Settings(fhir={"base_url": BASE})  # type: ignore[arg-type]
    return Services(settings=settings, client=fhir, engine=FakeEngine(), store=store)  # type: ignore[arg-type]


async def _review_three(svc: Services, db: sessionmaker[Session]) -> None:
    await review.approve(svc, "doc-1", patient_id="p1", actor=DR, version="1", db=db)
    edited = AI_MARKDOWN.replace("Hypertension", "Essential hypertension, well controlled")
    await review.edit(svc, "doc-2", patient_id="p1", actor=DR, markdown=edited, version="1", db=db)
    await review.reject(
        svc, "doc-3", patient_id="p1", actor=DR, reason="Invented a diagnosis", version="1", db=db
    )


async def test_each_review_action_records_one_outcome_tied_to_its_summary(store: SqlSummaryStore) -> None:
    fhir = _drafts()
    with capture_logs() as logs:
        await _review_three(services(fhir, store), store.sessions)
    rows = review_outcomes(store.sessions)
    assert [(r.action, r.document_reference) for r in rows] == [
        ("approve", "DocumentReference/doc-1"),
        ("edit", "DocumentReference/doc-2"),
        ("approve", "DocumentReference/doc-2"),
        ("reject", "DocumentReference/doc-3"),
    ]
    by_doc = {s.document_reference: s.id for s in [store.find(BASE, k) for k in KEYS.values()] if s}
    assert all(r.summary_id == by_doc[r.document_reference] for r in rows)
    assert all(r.draft_created_at == DRAFTED for r in rows)
    (edit_row,) = [r for r in rows if r.action == "edit"]
    # "Hypertension" -> "Essential hypertension, well controlled": one word became four (36 characters).
    assert (edit_row.words_changed, edit_row.chars_changed, edit_row.draft_words) == (4, 36, 8)
    dump = json.dumps(logs, default=str)
    assert "well controlled" not in dump and "Invented" not in dump


async def test_a_refused_action_records_no_outcome(store: SqlSummaryStore) -> None:
    fhir = MemoryFhir(draft_doc(patient="p2"), ai_provenance())
    with pytest.raises(review.ReviewForbidden):
        await review.edit(
            services(fhir, store), "doc-1", patient_id="p1", actor=DR, markdown="Mine.", db=store.sessions
        )
    assert review_outcomes(store.sessions) == []


async def test_monitor_json_reports_what_the_review_actions_recorded(store: SqlSummaryStore) -> None:
    await _review_three(services(_drafts(), store), store.sessions)
    url = str(store.engine.url)
    result = CliRunner().invoke(cli, ["monitor", "--json", "--db-url", url])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report) == {"since", "overall", "by_model_prompt", "by_week", "cds_feedback"}
    (g,) = report["by_model_prompt"]
    assert (g["model_sha256"], g["model_name"], g["prompt"]) == (SHA_A, "model-a", "summary/v1")
    assert {k: g[k] for k in ("summaries", "approved", "edited", "rejected", "pending")} == {
        "summaries": 4,
        "approved": 1,
        "edited": 1,
        "rejected": 1,
        "pending": 1,
    }
    assert g["approval_rate"] == g["edit_rate"] == g["rejection_rate"] == round(1 / 3, 4)
    assert g["edit_words_changed"]["median"] == 4
    assert g["rejection_reasons"] == [{"reason": "Invented a diagnosis", "count": 1}]
    assert g["time_to_review_seconds"]["n"] == 3 and g["time_to_review_seconds"]["median"] > 0
    (week,) = report["by_week"]
    assert week["week"] == "2025-W10"  # the drafts' date (2025-03-04), not today's

    later = CliRunner().invoke(cli, ["monitor", "--json", "--since", "2025-03-05", "--db-url", url])
    assert json.loads(later.stdout)["overall"]["summaries"] == 0

    table = CliRunner().invoke(cli, ["monitor", "--db-url", url])
    assert table.exit_code == 0
    assert "model-a aaaaaaaaaaaa" in table.output and "33%" in table.output
    assert "Invented a diagnosis" in table.output


def test_monitor_refuses_a_since_that_is_not_a_date(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["monitor", "--since", "last tuesday", "--db-url", f"sqlite:///{tmp_path}/x.db"]
    )
    assert result.exit_code == 2
    assert result.output.strip().startswith("chartbrief: --since 'last tuesday'")
    assert len(result.output.strip().splitlines()) == 1


# -- end to end: the API and the review screen, on the real FHIR server ----------------------------------


ALLERGIES = "Kermit_Trantow_f1a650a5-737e-4fd7-828e-03c3348b9524.json"
SMALL = "Luigi_Wiegand_e27d88b0-c5e5-4042-ad49-184f6a900ee3.json"
CLAIMS = json.dumps({"claims": [{"text": "Allergy recorded on 1994-03-30.", "citations": ["A1"]}]})


@pytest.mark.integration
async def test_monitor_counts_what_clinicians_did_on_the_review_screen_and_what_the_api_made(
    tmp_path: Path, fhir_base: str, loaded_patients: dict[str, LoadedPatient]
) -> None:
    from tests.api.conftest import REDIRECT_URI, app_settings, launch_session, running_app, scripted_engine
    from tests.api.test_review_flow import stream_a_draft
    from tests.smart_ehr.server import TestEhr

    kermit, luigi = loaded_patients[ALLERGIES].id, loaded_patients[SMALL].id
    text = "# Summary\n\nThree allergies reviewed with the patient today.\n"
    with TestEhr(fhir_base, redirect_uris=[REDIRECT_URI]) as ehr:
        settings = app_settings(
            tmp_path,
            ehr,
            fhir={"base_url": fhir_base},
            api={"jwt_issuer": ehr.base_url, "jwks_url": ehr.jwks_url},
        )
        for action in ("approve", "reject", "edit"):
            # One app per draft: each engine identity gives its own idempotency key, one database for all.
            engine = scripted_engine(f"monitor-{action}-{tmp_path.name}", CLAIMS)
            async with running_app(settings, engine=engine) as (client, _app):
                await launch_session(client, ehr, kermit)
                _events, doc_id, version, csrf = await stream_a_draft(client)
                form = {"document_reference": doc_id, "version": version, "csrf_token": csrf}
                if action == "reject":
                    form["reason"] = "Lists an allergy twice"
                if action == "edit":
                    form["markdown"] = text
                done = await client.post(f"/review/{action}", data=form)
                assert done.status_code == 303 and "notice=" in done.headers["location"], done.headers
        api_engine = scripted_engine(f"monitor-api-{tmp_path.name}", '{"claims": []}')
        token = ehr.issue_token(
            patient=luigi,
            scope="patient/DocumentReference.c patient/DocumentReference.rs",
            audience="https://testserver",
        )
        async with running_app(settings, engine=api_engine) as (client, app):
            started = await client.post(
                "/api/summaries", json={"patient": luigi}, headers={"Authorization": f"Bearer {token}"}
            )
            assert started.status_code == 202, started.text
            await app.state.runtime.jobs.wait(started.json()["id"])

    result = CliRunner().invoke(cli, ["monitor", "--json", "--db-url", settings.db.url])
    assert result.exit_code == 0, result.output
    overall = json.loads(result.stdout)["overall"]
    assert {k: overall[k] for k in ("summaries", "approved", "edited", "rejected", "pending")} == {
        "summaries": 4,
        "approved": 1,
        "edited": 1,
        "rejected": 1,
        "pending": 1,
    }
    assert overall["edit_words_changed"]["n"] == 1 and overall["edit_words_changed"]["median"] > 0
    assert overall["rejection_reasons"] == [{"reason": "Lists an allergy twice", "count": 1}]
    assert overall["time_to_review_seconds"]["n"] == 3
