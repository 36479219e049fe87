"""`chartbrief eval run`: figures that add up, coverage of the coded part, a report that opens
offline, two configurations side by side, and one-line errors for bad input."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from fhir_adapters.bundle_source import BundleFolder
from fhir_adapters.models import ModelIdentity, PatientRecord
from service.cli.eval_run import compare_overrides, run_eval
from service.config import LlmSettings
from service.eval.measures import (
    age_band,
    age_in_years,
    assess_statement,
    coded_terms,
    key_fact_coverage,
)
from service.eval.run import EvalInputError, read_patient_list
from service.llm.base import Engine, Generation, GenerationRequest
from service.llm.fake import FAKE_IDENTITY, FakeEngine
from service.prompts import DEFAULT_PROMPTS_DIR

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


# --- pure measures ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("birth", "as_of", "band"),
    [
        ("2010-05-01", "2028-04-30", "0-17"),
        ("2010-05-01", "2028-05-01", "18-44"),
        ("1980-01-01", "2024-12-31", "18-44"),
        ("1980-01-01", "2025-01-01", "45-64"),
        ("1950-03-02", "2015-03-02", "65+"),
        (None, "2015-03-02", "unknown"),
    ],
)
def test_age_band_is_taken_in_whole_years_at_the_as_of_date(birth: str | None, as_of: str, band: str) -> None:
    assert age_band(age_in_years(birth, as_of)) == band


KEYS = frozenset({"C1", "M1", "E1"})
CODED = coded_terms(
    "female, 67 years old (as of 2020-01-01)\n## Active problems\n- Hypertension (since 2011-04-03) [C1]\n"
    "## Active medications\n- lisinopril 10 MG Oral Tablet (ordered 2019-02-01) [M1]",
    KEYS,
)


@pytest.mark.parametrize(
    ("text", "adds"),
    [
        ("Hypertension [C1]", False),  # the coded line's name and key
        ("Hypertension, active since April 3, 2011 [C1]", False),  # ... its status and its date, written out
        ("The patient has had hypertension since 2011.", False),  # a year of a coded date
        ("Takes lisinopril 10 mg [M1]", False),
        ("C1", False),  # only a citation key
        ("Hypertension is poorly controlled [C1]", True),  # a judgement the coded part does not hold
        ("Hypertension since 2015 [C1]", True),  # a date the coded part does not hold
        ("Lisinopril 20 mg [M1]", True),  # another number
        ("Seen in the emergency department for chest pain [E1]", True),
    ],
)
def test_a_statement_adds_information_only_with_words_numbers_or_dates_beyond_the_coded_part(
    text: str, adds: bool
) -> None:
    statement = assess_statement(text, ["C1"], CODED, KEYS)
    assert statement.adds_information is adds, statement.new_terms


def _resource(rtype: str, rid: str, **fields: Any) -> dict[str, Any]:
    return {"resourceType": rtype, "id": rid, **fields}


def _status(code: str) -> dict[str, Any]:
    return {"coding": [{"code": code}]}


def test_coverage_counts_every_active_allergy_medication_and_problem_of_the_record_and_names_misses() -> None:
    record = PatientRecord(
        patient=_resource("Patient", "p1"),
        resources={
            "AllergyIntolerance": [
                _resource("AllergyIntolerance", "a1", clinicalStatus=_status("active"), code={"text": "Peanut"}),
                _resource("AllergyIntolerance", "a2", clinicalStatus=_status("resolved"), code={"text": "Latex"}),
            ],
            "MedicationRequest": [
                _resource("MedicationRequest", "m1", status="active", medicationCodeableConcept={"text": "Insulin"}),
                _resource("MedicationRequest", "m2", status="active", medicationCodeableConcept={"text": "insulin"}),
                _resource("MedicationRequest", "m3", status="stopped", medicationCodeableConcept={"text": "Aspirin"}),
                _resource("MedicationRequest", "m4", status="active", medicationReference={"reference": "Medication/x"}),
            ],
            "Condition": [
                _resource("Condition", "c1", clinicalStatus=_status("active"), code={"text": "Asthma"}),
                _resource("Condition", "c2", clinicalStatus=_status("relapse"), code={"text": "Gout"}),
                _resource("Condition", "c3", clinicalStatus=_status("active"), code={"text": "Flu"},
                          verificationStatus=_status("refuted")),
            ],
        },
    )
    markdown = "## Allergies\n- peanut [A1]\n## Active medications\n- INSULIN [M1, M2]\n## Active problems\n- Asthma\n"

    facts = key_fact_coverage(record, markdown, {"Medication/x": "Metformin 500 MG"})

    assert [(f.kind, f.name, f.found) for f in facts] == [
        ("allergy", "Peanut", True),
        ("medication", "Insulin", True),  # two orders of one drug are one key fact
        ("medication", "Metformin 500 MG", False),  # named from the referenced Medication
        ("problem", "Asthma", True),
        ("problem", "Gout", False),
    ]


def test_a_patient_list_is_ids_one_a_line_and_a_bad_line_is_named() -> None:
    assert read_patient_list("a\n# x\nPatient/b\n\n", "ids.txt") == ["a", "b"]
    with pytest.raises(EvalInputError, match=r"ids\.txt line 2: 'not an id!' is not a FHIR id"):
        read_patient_list("a\nnot an id!\n", "ids.txt")
    with pytest.raises(EvalInputError, match="no patient id"):
        read_patient_list("# nobody\n", "ids.txt")


def test_compare_takes_known_settings_only() -> None:
    assert compare_overrides(["prompt_version=v2", "seed=7"], "summary/v1") == {"prompt": "summary/v2", "llm__seed": "7"}
    with pytest.raises(EvalInputError, match="unknown key 'colour'"):
        compare_overrides(["colour=blue"], "summary/v1")
    with pytest.raises(EvalInputError, match="expected KEY=VALUE"):
        compare_overrides(["model_path"], "summary/v1")


# --- the command on the fixtures ----------------------------------------------------------------


def _claims_for(request: GenerationRequest) -> str:
    """What the scripted model says.

    Of one note (the default prompt): a line of the note copied verbatim, and an invention. Of a
    whole record (summary/v1): the prompt's patient line verbatim (it restates the coded part), an
    invention citing the patient, and a claim citing a key that does not exist."""
    prompt = "\n".join(m["content"] for m in request.messages)
    if request.json_schema and "statements" in request.json_schema["properties"]:
        quoted = [line[2:] for line in prompt.splitlines() if line.startswith("| ") and len(line.split()) > 4]
        copied = next((q for q in quoted if "presenting with" in q.lower()), quoted[0] if quoted else None)
        return json.dumps({"statements": [s for s in (copied, INVENTION) if s]})
    patient_line = re.search(r"^Patient: (.+)$", prompt, re.MULTILINE)
    assert patient_line, "the prompt states the patient line"
    claims = [
        {"text": patient_line.group(1), "citations": ["P1"]},
        {"text": INVENTION, "citations": ["P1"]},
        {"text": "Hypertension", "citations": ["Z999"]},
    ]
    return json.dumps({"claims": claims})


INVENTION = "Works as an airline pilot and lives in Boston"


class Responder(FakeEngine):
    """A FakeEngine whose next output is scripted from the request it is given."""

    async def generate(self, request: GenerationRequest) -> Generation:
        self.enqueue(_claims_for(request))
        return await super().generate(request)


class ScriptedFactory:
    """A Responder per model setting, its identity named after the model file."""

    def __init__(self) -> None:
        self.engines: list[Responder] = []

    def __call__(self, settings: LlmSettings) -> Engine:
        name = settings.model_path.name if settings.model_path else FAKE_IDENTITY.file_name
        sha = "0" * 64 if settings.model_path is None else "b" * 64
        engine = Responder(ModelIdentity(name.removesuffix(".gguf"), name, sha, "none", "fake", "seed=42"))
        self.engines.append(engine)
        return engine


def _invoke(args: list[str], factory: ScriptedFactory | None = None, env: dict[str, str] | None = None) -> Result:
    obj = {"engine_factory": factory} if factory else {"engine": FakeEngine()}
    return CliRunner().invoke(run_eval, args, obj=obj, env=env)


@pytest.fixture(scope="module")
def all_fixtures_report(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, Any], Path]]:
    out = tmp_path_factory.mktemp("eval-all")
    factory = ScriptedFactory()
    result = _invoke(["--bundles", str(FIXTURES), "--out", str(out), "--json"], factory)
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["report"] == str(out / "report.json")
    report = json.loads((out / "report.json").read_text())
    calls = len(factory.engines[0].history)
    assert len(factory.engines) == 1 and calls == sum(p["notes_read"] for p in report["patients"]) > 0
    yield report, out


SUMMED = (
    "claims_kept",
    "claims_dropped",
    "claims_contradicted",
    "adds_information",
    "adds_information_model_written",
    "quoted",
    "conflicts",
    "prompt_tokens",
    "completion_tokens",
    "key_facts",
    "key_facts_found",
)


def test_eval_run_on_every_fixture_gives_figures_that_add_up(all_fixtures_report: tuple[dict[str, Any], Path]) -> None:
    report, _ = all_fixtures_report
    patients, overall = report["patients"], report["overall"]

    assert len(patients) == 20 == overall["patients"]
    for field in SUMMED:
        total = sum(p[field] for p in patients)
        assert overall[field] == total, field
        assert sum(g[field] for g in report["by_sex"].values()) == total, field
        assert sum(g[field] for g in report["by_age_band"].values()) == total, field
    assert sum(g["patients"] for g in report["by_sex"].values()) == 20
    assert sum(g["patients"] for g in report["by_age_band"].values()) == 20
    assert list(report["by_age_band"]) == ["0-17", "18-44", "45-64", "65+"]
    assert {p["sex"] for p in patients} <= {"female", "male"}
    assert sum(overall["dropped_by_severity"].values()) == overall["claims_dropped"]
    assert overall["seconds"] == pytest.approx(sum(p["seconds"] for p in patients), abs=0.05)
    with_notes = [p for p in patients if p["notes"]]
    assert len(with_notes) == overall["patients_with_notes"] == 8
    for p in patients:
        assert 0.0 <= p["coverage"] <= 1.0 and p["seconds"] > 0
        assert p["age_band"] in {"0-17", "18-44", "45-64", "65+"}
        assert p["claims_contradicted"] <= p["claims_dropped"]
        # What only restates the coded part is dropped, so everything kept adds something.
        assert p["adds_information"] == p["claims_kept"] and p["adds_nothing"] == 0
        if not p["notes"]:
            assert p["notes_read"] == 0 and p["prompt_tokens"] == 0 and p["claims_kept"] == 0, "no note, no call"
            continue
        assert 1 <= p["notes_read"] <= 4 and p["prompt_tokens"] > 0
        assert p["claims_dropped"] >= 1, "the invention never passes (once per patient: repeats merge)"
        assert p["claims_kept"] >= 1, "a copied line, or a quotation, is kept"
        assert all(set(k["citations"]) <= {f"N{i}" for i in range(1, 200)} for k in p["kept"])
        assert all(INVENTION not in k["text"] for k in p["kept"])
    assert overall["adds_information_model_written"] > 0
    assert overall["least_adds_information_with_notes"] >= 1
    reasons = {r["reason"] for r in overall["top_reasons"]}
    assert any("not stated by the cited sources" in r for r in reasons)


def test_the_coded_part_names_every_active_item_of_the_record(all_fixtures_report: tuple[dict[str, Any], Path]) -> None:
    """Coverage is 1.0 for every patient: every active allergy, medication (also those named only
    through a referenced Medication resource) and problem appears in the written document."""
    report, _ = all_fixtures_report
    misses = [(p["patient"], m) for p in report["patients"] for m in p["coverage_misses"]]

    assert misses == []
    assert all(p["coverage"] == 1.0 for p in report["patients"])
    assert report["overall"]["coverage"] == 1.0
    assert report["overall"]["key_facts"] > 100


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    return (gzip.decompress(raw) if path.name.endswith(".gz") else raw).decode()


def test_the_report_names_the_machine_model_and_prompt(all_fixtures_report: tuple[dict[str, Any], Path]) -> None:
    report, _ = all_fixtures_report
    config = report["configuration"]
    prompt_file = DEFAULT_PROMPTS_DIR / "summary" / "v2.yaml"
    assert config["prompt_id"] == "summary" and config["prompt_version"] == "v2"
    assert config["prompt_sha256"] == hashlib.sha256(prompt_file.read_bytes()).hexdigest()
    assert config["model_sha256"] == "0" * 64
    assert report["machine"]["cores"] >= 1 and report["machine"]["cpu"]
    assert report["compare"] is None


def test_report_html_is_self_contained_with_embedded_plots(all_fixtures_report: tuple[dict[str, Any], Path]) -> None:
    report, out = all_fixtures_report
    html = (out / "report.html").read_text()

    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", html, re.IGNORECASE)
    assert "<script" not in html.lower() and "<link" not in html.lower()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) == 2
    assert all(base64.b64decode(i).startswith(b"\x89PNG\r\n\x1a\n") for i in images)
    assert report["patients"][0]["patient"] in html
    assert "Airline pilot".lower() in html.lower(), "dropped claims are listed for the operator"


def test_compare_runs_the_same_patients_under_a_second_model_and_prompt(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts" / "summary"
    prompts.mkdir(parents=True)
    shutil.copy(DEFAULT_PROMPTS_DIR / "summary" / "v1.yaml", prompts / "v1.yaml")
    v2 = (DEFAULT_PROMPTS_DIR / "summary" / "v1.yaml").read_text().replace("version: v1", "version: v2")
    (prompts / "v2.yaml").write_text(v2 + "\n# v2: the same instructions, another file\n")
    folder = FIXTURES / "synthea"
    ids = [BundleFolder.scan(folder).patient_ids()[i] for i in (3, 4)]
    (tmp_path / "ids.txt").write_text("\n".join(ids) + "\n")
    factory = ScriptedFactory()
    out = tmp_path / "out"

    result = _invoke(
        ["--bundles", str(folder), "--patients", str(tmp_path / "ids.txt"), "--out", str(out),
         "--compare", "model_path=/models/other-model.gguf", "--compare", "prompt_version=v2"],
        factory,
        env={"CHARTBRIEF_PROMPTS_DIR": str(tmp_path / "prompts"), "CHARTBRIEF_PROMPT": "summary/v1"},
    )

    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    a, b = report["configuration"], report["compare"]["configuration"]
    assert (a["model"]["file"], a["prompt_version"]) == ("fake-model.gguf", "v1")
    assert (b["model"]["file"], b["prompt_version"]) == ("other-model.gguf", "v2")
    assert a["prompt_sha256"] != b["prompt_sha256"] and a["model_sha256"] != b["model_sha256"]
    assert [p["patient"] for p in report["patients"]] == ids == [p["patient"] for p in report["compare"]["patients"]]
    assert [r["configuration"] for r in report["by_model_and_prompt"]] == ["A", "B"]
    assert len(factory.engines) == 2 and all(len(e.history) == 2 and e.closed for e in factory.engines)
    html = (out / "report.html").read_text()
    assert "fake-model.gguf" in html and "other-model.gguf" in html and "summary/v2" in html
    for pid in ids:  # each patient has a row under A and one under B in the side-by-side table
        row = html[html.index(f"<code>{pid}</code>") :]
        assert row.index("<td>A</td>") < row.index("<td>B</td>")
    assert "A: fake-model.gguf" in result.stdout and "B: other-model.gguf" in result.stdout


# --- bad input ----------------------------------------------------------------------------------


def _one_line_error(result: Result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("chartbrief:")]
    assert len(lines) == 1, result.output
    return lines[0]


def test_a_missing_bundle_folder_is_one_line_naming_it(tmp_path: Path) -> None:
    line = _one_line_error(_invoke(["--bundles", str(tmp_path / "absent"), "--out", str(tmp_path / "o")]))
    assert "absent: no such folder" in line
    assert not (tmp_path / "o").exists()


def test_an_unknown_patient_in_the_list_is_one_line_naming_the_file_and_id(tmp_path: Path) -> None:
    (tmp_path / "ids.txt").write_text("nobody-here\n")
    line = _one_line_error(
        _invoke(["--bundles", str(FIXTURES / "synthea"), "--patients", str(tmp_path / "ids.txt"), "--out", str(tmp_path)])
    )
    assert "ids.txt" in line and "Patient/nobody-here is not in the bundles under" in line


def test_a_bundle_without_a_patient_is_one_line_naming_the_file(tmp_path: Path) -> None:
    shutil.copy(next((FIXTURES / "synthea").glob("Luigi*")), tmp_path)
    (tmp_path / "hospitalInformation.json").write_text(
        json.dumps({"resourceType": "Bundle", "type": "batch",
                    "entry": [{"resource": {"resourceType": "Organization", "id": "o1"}}]})
    )
    line = _one_line_error(_invoke(["--bundles", str(tmp_path), "--out", str(tmp_path / "o")]))
    assert "hospitalInformation.json: no Patient resource" in line


def test_one_source_exactly_and_known_compare_keys(tmp_path: Path) -> None:
    line = _one_line_error(_invoke(["--out", str(tmp_path)], env={"CHARTBRIEF_FHIR__BASE_URL": ""}))
    assert "exactly one of --bundles" in line
    line = _one_line_error(
        _invoke(["--bundles", str(FIXTURES), "--fhir-base", "http://x.test/fhir", "--out", str(tmp_path)])
    )
    assert "exactly one of --bundles" in line
    line = _one_line_error(_invoke(["--bundles", str(FIXTURES), "--out", str(tmp_path), "--compare", "colour=blue"]))
    assert "--compare 'colour=blue': unknown key" in line


# --- against a real FHIR server -----------------------------------------------------------------

SERVER_PATIENTS = (
    "Kermit_Trantow_f1a650a5-737e-4fd7-828e-03c3348b9524.json",
    "Luigi_Wiegand_e27d88b0-c5e5-4042-ad49-184f6a900ee3.json",
)
COMPARED = ("sex", "age_band", "key_facts", "key_facts_found", "coverage", "claims_kept", "claims_dropped", "quoted")


@pytest.mark.integration
def test_a_fhir_server_and_the_same_bundle_files_give_the_same_figures(
    fhir_base: str, loaded_patients: dict[str, Any], tmp_path: Path
) -> None:
    ids = [loaded_patients[name].id for name in SERVER_PATIENTS]
    (tmp_path / "ids.txt").write_text("\n".join(ids) + "\n")
    folder = tmp_path / "bundles"
    folder.mkdir()
    for name in SERVER_PATIENTS:
        shutil.copy(FIXTURES / "synthea" / name, folder)

    server = _invoke(
        ["--fhir-base", fhir_base, "--patients", str(tmp_path / "ids.txt"), "--out", str(tmp_path / "server")],
        ScriptedFactory(),
    )
    files = _invoke(["--bundles", str(folder), "--out", str(tmp_path / "files")], ScriptedFactory())

    assert server.exit_code == 0, server.output
    assert files.exit_code == 0, files.output
    from_server = json.loads((tmp_path / "server" / "report.json").read_text())
    from_files = json.loads((tmp_path / "files" / "report.json").read_text())
    assert [p["patient"] for p in from_server["patients"]] == ids
    assert from_server["source"] == f"FHIR server {fhir_base}"
    assert [[p[f] for f in COMPARED] for p in from_server["patients"]] == [
        [p[f] for f in COMPARED] for p in from_files["patients"]
    ]

    (tmp_path / "unknown.txt").write_text(f"{ids[0]}\nno-such-patient\n")
    line = _one_line_error(
        _invoke(["--fhir-base", fhir_base, "--patients", str(tmp_path / "unknown.txt"), "--out", str(tmp_path / "x")])
    )
    assert "unknown.txt" in line and "Patient/no-such-patient is not on" in line


# --- with the real default model ----------------------------------------------------------------


@pytest.mark.model
def test_real_default_model_reads_the_notes_and_keeps_what_they_add_in_a_consistent_report(tmp_path: Path) -> None:
    from service.llm.llamacpp import LlamaCppEngine

    folder = tmp_path / "bundles"
    folder.mkdir()
    for prefix in ("Luigi_Wiegand", "Beatris270"):  # no notes; 31 notes
        shutil.copy(next((FIXTURES / "synthea").glob(f"{prefix}*")), folder)
    # One thread: llama.cpp's threads spin while waiting for each other on a busy, shared CPU.
    engine = LlamaCppEngine(LlmSettings(n_ctx=2048, n_threads=1), cache_dir=tmp_path / "model-cache")
    try:
        result = CliRunner().invoke(
            run_eval, ["--bundles", str(folder), "--out", str(tmp_path / "out")], obj={"engine": engine}
        )
    finally:
        asyncio.run(engine.aclose())

    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["configuration"]["model"]["quantization"] == "Q4_1"
    assert re.fullmatch(r"[0-9a-f]{64}", report["configuration"]["model_sha256"])
    assert report["configuration"]["model_sha256"] != "0" * 64
    overall = report["overall"]
    assert overall["patients"] == 2 and overall["completion_tokens"] > 0
    for field in SUMMED:
        assert overall[field] == sum(p[field] for p in report["patients"]), field
    for p in report["patients"]:
        assert p["adds_information"] == p["claims_kept"], "what only restates the coded part is dropped"
        assert p["coverage"] == 1.0, p["coverage_misses"]
    without, with_notes = sorted(report["patients"], key=lambda p: p["notes"])
    assert without["notes"] == 0 and without["prompt_tokens"] == 0 and without["claims_kept"] == 0
    assert with_notes["notes"] == 31 and with_notes["notes_read"] == 4
    from_notes = [k for k in with_notes["kept"] if any(c.startswith("N") for c in k["citations"])]
    assert from_notes and all(k["adds_information"] for k in from_notes), with_notes["kept"]
    assert "data:image/png;base64," in (tmp_path / "out" / "report.html").read_text()
