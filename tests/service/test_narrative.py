"""The narrative from the notes: what each note adds, which notes reach the model and why not the
others, the map step within its time budget, the merge of the notes' statements, quotations, and
the pipeline's document with statements the model wrote apart from those it quoted."""

from __future__ import annotations

import asyncio
import doctest
import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import service.narrative
from fhir_adapters.fetch import fetch_record
from fhir_adapters.models import ClinicalContext, Fact, SourceRef
from fhir_adapters.normalize import normalize
from service.config import LlmSettings, NarrativeSettings, Settings
from service.grounding import ADDS_NOTHING, Claim, ground
from service.llm.base import Generation, GenerationRequest
from service.llm.fake import FakeEngine
from service.narrative import (
    OVER_LIMIT,
    REPEATS,
    TIME_BUDGET,
    Narration,
    NoteCall,
    NoteOutput,
    NoteView,
    narrate,
    note_views,
    plan_notes,
    quotations,
    statements_of,
)
from service.pipeline import PreparedSummary, Services, complete_summary, narrate_summary, prepare_summary
from service.prompts import load_prompt
from tests.fakes import FakeFhirSource, bundle_patient, load_synthea

V2 = load_prompt("summary/v2")


def note(key: str, day: str, text: str) -> Fact:
    return Fact(key, "note", text, SourceRef("DocumentReference", key.lower(), "1"), date=day, display="Progress note")


async def context_of(prefix: str) -> ClinicalContext:
    bundle = load_synthea(prefix)
    record = await fetch_record(FakeFhirSource.from_bundle(bundle), str(bundle_patient(bundle)["id"]))
    return normalize(record)


def test_narrative_doctests_pass() -> None:
    assert doctest.testmod(service.narrative).failed == 0


# --- what each note adds ------------------------------------------------------------------------


async def test_synthea_notes_repeat_whole_sections_and_each_line_is_shown_once() -> None:
    ctx = await context_of("Beatris270")
    views = note_views(ctx.facts)

    assert len(views) == len(ctx.of_kind("note")) == 31
    assert [v.fact.date for v in views] == sorted((v.fact.date for v in views), reverse=True), "newest first"
    newest, older = views[0], views[1:]
    assert newest.repeated == 0 and "# Social History" in newest.body
    shown: list[str] = []
    for view in views:
        for line in view.body.splitlines():
            if not line.startswith("#"):
                assert line.strip().lower() not in shown, f"{line!r} shown twice"
                shown.append(line.strip().lower())
    # The templated sections (history, social history, allergies, medications) are read once.
    assert sum(v.repeated for v in older) > sum(len(v.body.splitlines()) for v in older)
    assert all("Never smoked" not in v.body for v in older)


def test_a_repeat_differing_only_in_a_number_is_a_repeat_in_prose_but_not_in_a_short_value_line() -> None:
    new = note("N2", "2021-01-01", "The patient is a 8 year-old female with a history of asthma and eczema.\nBP 140/90")
    old = note("N1", "2020-01-01", "The patient is a 7 year-old female with a history of asthma and eczema.\nBP 120/80")

    _, older = note_views([old, new])

    assert older.body == "BP 120/80" and older.repeated == 1


def test_a_heading_is_kept_only_above_lines_that_are_kept() -> None:
    new = note("N2", "2021-01-01", "# Allergies\nNo Known Allergies.\n# Plan\nRecheck in 3 months.")
    old = note("N1", "2020-01-01", "# Allergies\nNo Known Allergies.\n\n# Plan\nStart metformin 500 mg.")

    assert note_views([old, new])[1].body == "# Plan\nStart metformin 500 mg."


# --- the plan -----------------------------------------------------------------------------------


async def test_the_plan_reads_the_newest_notes_that_add_text_and_names_every_other_note() -> None:
    ctx = await context_of("Allen322")  # 80 notes, the largest fixture record with notes
    engine = FakeEngine(n_ctx=2048)
    narrative = NarrativeSettings(max_notes=4)

    plan = plan_notes(V2, ctx, engine, LlmSettings(), narrative)

    notes = ctx.of_kind("note")
    assert plan.notes == len(notes) == 80
    assert len(plan.calls) == 4 and len(plan.read_keys) == 4
    assert {u.key for u in plan.unread} | set(plan.read_keys) == {n.key for n in notes}, "every note accounted for"
    reasons = {u.reason for u in plan.unread}
    assert reasons <= {REPEATS, OVER_LIMIT} and OVER_LIMIT in reasons
    read_dates = [ctx.by_key()[k].date or "" for k in plan.read_keys]
    over = [u.date or "" for u in plan.unread if u.reason == OVER_LIMIT]
    assert read_dates == sorted(read_dates, reverse=True) and min(read_dates) >= max(over), "newest first"
    for call in plan.calls:
        assert call.key is not None
        request = call.request
        prompt = "\n".join(m["content"] for m in request.messages)
        # One note per request, quoted line by line, and a bounded, small prompt.
        assert prompt.count("(quoted from the record):") == 1 and f"[{call.key}]" in prompt
        assert sum(engine.count_tokens(m["content"]) for m in request.messages) + request.max_tokens <= engine.n_ctx
        assert request.json_schema is not None and "statements" in request.json_schema["properties"]
        view = plan.views[call.key]
        assert all(f"| {' '.join(line.split())}" in prompt for line in view.body.splitlines())


async def test_the_map_prompts_read_far_fewer_tokens_than_the_whole_notes() -> None:
    ctx = await context_of("Allen322")
    engine = FakeEngine(n_ctx=8192)

    plan = plan_notes(V2, ctx, engine, LlmSettings(), NarrativeSettings(max_notes=80))

    whole = sum(engine.count_tokens(n.text) for n in ctx.of_kind("note"))
    read = sum(engine.count_tokens(v.body) for v in plan.views.values())
    assert len(plan.calls) >= 10, "notes that add text are each read"
    assert read * 3 < whole, (read, whole)


def test_a_note_too_long_for_the_window_is_shortened_on_a_word_boundary() -> None:
    text = "# Assessment\n" + " ".join(f"finding{i}" for i in range(3000))
    ctx = ClinicalContext(SourceRef("Patient", "p", "1"), "female, 50 years old", [note("N1", "2021-01-01", text)])
    engine = FakeEngine(n_ctx=1024)

    plan = plan_notes(V2, ctx, engine, LlmSettings(), NarrativeSettings())

    (call,) = plan.calls
    assert call.truncated
    assert "[...]" in call.request.messages[1]["content"]
    assert sum(engine.count_tokens(m["content"]) for m in call.request.messages) + call.request.max_tokens <= 1024


def test_max_notes_zero_gives_the_model_nothing() -> None:
    ctx = ClinicalContext(SourceRef("Patient", "p", "1"), "male", [note("N1", "2021-01-01", "# Plan\nRest.")])

    plan = plan_notes(V2, ctx, FakeEngine(), LlmSettings(), NarrativeSettings(max_notes=0))

    assert plan.calls == () and [u.reason for u in plan.unread] == [OVER_LIMIT]


# --- the map step -------------------------------------------------------------------------------


class SlowEngine(FakeEngine):
    """Each generation takes `seconds` of wall time."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    async def generate(self, request: GenerationRequest) -> Generation:
        await asyncio.sleep(self.seconds)
        self.enqueue('{"statements": ["Presenting with cough."]}')
        return await super().generate(request)


def _calls(n: int) -> list[NoteCall]:
    request = GenerationRequest(messages=[{"role": "user", "content": "x"}], max_tokens=8)
    return [NoteCall(f"N{i}", request) for i in range(1, n + 1)]


async def test_no_note_is_given_to_the_model_once_the_time_budget_is_spent() -> None:
    engine = SlowEngine(0.05)

    narration = await narrate(engine, _calls(6), seconds_budget=0.12)

    read = [o.key for o in narration.outputs]
    assert 2 <= len(read) <= 4 and read == [f"N{i}" for i in range(1, len(read) + 1)]
    assert list(narration.late) == [f"N{i}" for i in range(len(read) + 1, 7)]
    assert narration.prompt_tokens == sum(o.generation.prompt_tokens for o in narration.outputs)


async def test_the_first_note_is_read_even_when_the_budget_is_tiny() -> None:
    narration = await narrate(SlowEngine(0.01), _calls(3), seconds_budget=0.000001)

    assert [o.key for o in narration.outputs] == ["N1"] and narration.late == ("N2", "N3")


# --- the reduce step ----------------------------------------------------------------------------


def _output(key: str | None, text: str) -> NoteOutput:
    return NoteOutput(key, Generation(text=text, prompt_tokens=10, completion_tokens=5, seconds=0.1))


def test_each_note_statement_cites_its_note_and_a_statement_repeated_by_an_older_note_is_kept_once() -> None:
    narration = Narration(
        (
            _output("N1", '{"statements": ["Presenting with acute bronchitis.", "Given an inhaler."]}'),
            _output("N2", '{"statements": ["presenting with acute  bronchitis", "Referred to cardiology."]}'),
            _output("N3", "not json at all"),
        )
    )

    claims, dropped = statements_of(narration)

    assert [(c.text, c.citations, c.origin) for c in claims] == [
        ("Presenting with acute bronchitis.", ("N1",), "model"),
        ("Given an inhaler.", ("N1",), "model"),
        ("Referred to cardiology.", ("N2",), "model"),
    ]
    assert [(d.claim.text, d.claim.citations) for d in dropped] == [("not json at all", ("N3",))]


def test_a_record_wide_output_keeps_its_own_citations() -> None:
    claims, _ = statements_of(Narration((_output(None, '{"claims": [{"text": "Asthma", "citations": ["C1"]}]}'),)))

    assert [(c.text, c.citations) for c in claims] == [("Asthma", ("C1",))]


# --- quotations ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "quotes"),
    [
        pytest.param(
            "# Chief Complaint\n- cough\n- fever\n# Assessment and Plan\nPatient is presenting with acute bronchitis.",
            ["cough; fever", "Patient is presenting with acute bronchitis."],
            id="synthea-complaint-items-and-assessment",
        ),
        pytest.param(
            "# Chief Complaint\nNo complaints.\n# Social History\nNever smoked.\n## Plan\nRecheck blood pressure in 2 weeks.",
            ["Recheck blood pressure in 2 weeks."],
            id="nothing-said-and-other-sections-left-out",
        ),
        pytest.param(
            "CC: chest pain on exertion\nHPI: long story\nAssessment: stable angina\nPlan: start aspirin 81 mg daily",
            ["chest pain on exertion", "stable angina", "start aspirin 81 mg daily"],
            id="labelled-lines",
        ),
        pytest.param(
            "# Plan\nThe following procedures were conducted:\n- throat culture (procedure)\n- rapid strep test",
            ["The following procedures were conducted: throat culture (procedure); rapid strep test."],
            id="a-lead-line-takes-its-items",
        ),
        pytest.param(
            "# Assessment\n[name] is doing well after surgery.\n" + "# Plan\n" + " ".join(["word"] * 50),
            [],
            id="name-placeholder-and-overlong-lines-never-cut",
        ),
    ],
)
def test_quotations_take_a_notes_complaint_assessment_and_plan_verbatim(body: str, quotes: list[str]) -> None:
    fact = note("N1", "2021-01-01", body)

    found = quotations(NoteView(fact, body, len(body.splitlines()), 0), limit=5)

    assert [q.text for q in found] == quotes
    assert all(q.citations == ("N1",) and q.origin == "quote" for q in found)
    for q in found:  # verbatim: every word of a quotation is in the note, in order
        words = re.findall(r"\w+", q.text)
        assert re.search(r"\W+".join(map(re.escape, words)), body), q.text


# --- grounding: adds nothing --------------------------------------------------------------------


def test_a_supported_statement_that_only_restates_a_coded_line_is_dropped_as_adding_nothing() -> None:
    condition = Fact(
        "C1", "condition", "Hypertension", SourceRef("Condition", "c1", "1"), date="2011-04-03",
        status="active", display="Hypertension",
    )  # fmt: skip
    visit = note("N1", "2021-01-01", "Hypertension is poorly controlled; start amlodipine.")
    ctx = ClinicalContext(SourceRef("Patient", "p", "1"), "female, 67 years old", [condition, visit])
    coded = "## Problems\n- Hypertension (since 2011-04-03) [C1]"
    claims = [
        Claim("Hypertension, active since April 3, 2011", ("C1",)),
        Claim("C1: Active since 2011-04-03", ("C1",)),
        Claim("Hypertension is poorly controlled", ("N1",)),
    ]

    result = ground(claims, ctx, coded=coded)

    assert [c.text for c in result.kept] == ["Hypertension is poorly controlled"]
    assert [d.verdict for d in result.dropped] == ["redundant", "redundant"]
    assert all(d.reason.startswith(ADDS_NOTHING) and d.severity == "low" for d in result.dropped)
    # Without the coded part, the same restatements are supported and kept.
    assert len(ground(claims, ctx).kept) == 3


# --- the pipeline -------------------------------------------------------------------------------


class NoteReader(FakeEngine):
    """Answers a note request with one line copied from the note, one invention and one restatement."""

    async def generate(self, request: GenerationRequest) -> Generation:
        prompt = request.messages[1]["content"]
        quoted = [line[2:] for line in prompt.splitlines() if line.startswith("| ") and not line.startswith("| #")]
        copied = next((q for q in quoted if "presenting with" in q.lower()), None)
        statements = [copied] if copied else []
        statements += ["The patient enjoys skydiving on weekends."]
        self.enqueue(json.dumps({"statements": statements}))
        return await super().generate(request)


async def _summary(prefix: str, settings: Settings, engine: FakeEngine) -> tuple[PreparedSummary, Any]:
    bundle = load_synthea(prefix)
    pid = str(bundle_patient(bundle)["id"])
    record = await fetch_record(FakeFhirSource.from_bundle(bundle), pid)
    client = SimpleNamespace(base_url="http://fhir.test/r4")  # named in the record row; nothing is sent
    svc = Services(settings=settings, client=client, engine=engine, store=_NoStore())  # type: ignore[arg-type]
    prep = await prepare_summary(svc, pid, record=record)
    result = await complete_summary(svc, prep, await narrate_summary(svc, prep), dry_run=True)
    return prep, result


class _NoStore:
    def record(self, row: dict[str, Any]) -> None:
        self.row = row


async def test_the_default_prompt_reads_the_notes_and_the_document_marks_quotations_apart(tmp_path: Path) -> None:
    settings = Settings(db={"url": f"sqlite:///{tmp_path / 'db.sqlite'}"})
    engine = NoteReader()

    prep, result = await _summary("Beatris270", settings, engine)

    assert settings.prompt == "summary/v2" and prep.plan is not None
    assert len(engine.history) == len(prep.calls) == settings.narrative.max_notes
    notes = {f.key for f in prep.ctx.of_kind("note")}
    assert result.kept and all(set(c.citations) <= notes for c in result.kept)
    assert any(c.origin == "model" for c in result.kept)
    assert all("skydiving" not in c.text for c in result.kept)
    assert any("skydiving" in d.claim.text for d in result.dropped)
    md = result.markdown
    assert "## From the notes" in md
    for claim in result.kept:
        line = next(line for line in md.splitlines() if claim.text in line)
        assert ("(quoted from the note)" in line) is (claim.origin == "quote")
    written = sum(c.origin == "model" for c in result.kept)
    assert f"_{written} statement(s) written by the model, {len(result.kept) - written} quoted" in md
    assert "Notes read by the model: 4 of 31" in md and "over the note limit of 4" in md
    assert result.notes_read is not None and result.notes_read.total == 31
    as_json = result.to_json()
    assert as_json["notes_read"]["read"] == list(prep.plan.read_keys)
    assert {k["written_by"] for k in as_json["kept"]} <= {"model", "quote"}


async def test_a_read_note_the_model_says_nothing_verifiable_about_is_quoted(tmp_path: Path) -> None:
    class Inventor(FakeEngine):
        async def generate(self, request: GenerationRequest) -> Generation:
            self.enqueue('{"statements": ["The patient flew to the moon."]}')
            return await super().generate(request)

    settings = Settings(db={"url": f"sqlite:///{tmp_path / 'db.sqlite'}"})
    _, result = await _summary("Beatris270", settings, Inventor())

    assert result.kept and all(c.origin == "quote" for c in result.kept)
    assert "0 statement(s) written by the model" in result.markdown
    no_quotes = settings.model_copy(update={"narrative": NarrativeSettings(quotations=False)})
    _, bare = await _summary("Beatris270", no_quotes, Inventor())
    assert bare.kept == [] and "No statement from the notes could be verified" in bare.markdown


async def test_a_patient_without_notes_costs_no_model_call(tmp_path: Path) -> None:
    engine = FakeEngine()

    _, result = await _summary("Luigi_Wiegand", Settings(db={"url": f"sqlite:///{tmp_path / 'db'}"}), engine)

    assert engine.history == [] and result.kept == [] and result.prompt_tokens == 0
    assert "The record holds no notes" in result.markdown


async def test_how_many_notes_are_read_is_part_of_the_idempotency_key(tmp_path: Path) -> None:
    base = Settings(db={"url": f"sqlite:///{tmp_path / 'db'}"})
    fewer = base.model_copy(update={"narrative": NarrativeSettings(max_notes=2)})

    first, _ = await _summary("Beatris270", base, NoteReader())
    again, _ = await _summary("Beatris270", base, NoteReader())
    other, _ = await _summary("Beatris270", fewer, NoteReader())

    assert first.idempotency_key == again.idempotency_key != other.idempotency_key


async def test_unread_notes_by_time_are_named_in_the_document(tmp_path: Path) -> None:
    settings = Settings(db={"url": f"sqlite:///{tmp_path / 'db'}"})
    settings = settings.model_copy(update={"narrative": NarrativeSettings(seconds_budget=0.01)})
    engine = SlowEngine(0.05)

    _, result = await _summary("Beatris270", settings, engine)

    assert len(engine.history) == 1
    assert result.notes_read is not None
    assert [u.reason for u in result.notes_read.unread].count(TIME_BUDGET) == 3
    assert f"3 {TIME_BUDGET}" in result.markdown


def test_each_sentence_is_its_own_statement_and_an_echoed_heading_is_not_one() -> None:
    text = json.dumps(
        {"statements": ["Presenting with otitis media. The patient flew to the moon.", "| # Plan", "## Plan (2023-03-28)"]}
    )

    claims, dropped = statements_of(Narration((_output("N1", text),)))

    assert [c.text for c in claims] == ["Presenting with otitis media.", "The patient flew to the moon."]
    assert [d.claim.text for d in dropped] == ["| # Plan", "## Plan (2023-03-28)"]
    assert all("echoes a line of the note" in d.reason for d in dropped)


def test_a_request_without_an_output_schema_is_answered_in_plain_lines() -> None:
    lines = NoteOutput("N1", Generation("- Presenting with cough.\n\n- Given an inhaler.\n", 5, 5, 0.1), False)
    json_expected = NoteOutput("N2", Generation("- Presenting with cough.", 5, 5, 0.1), True)

    claims, dropped = statements_of(Narration((lines, json_expected)))

    assert [(c.text, c.citations) for c in claims] == [("Presenting with cough.", ("N1",)), ("Given an inhaler.", ("N1",))]
    assert [(d.claim.citations, d.reason) for d in dropped] == [(("N2",), "model output was not valid JSON")]
