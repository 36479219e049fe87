"""`chartbrief eval run`: summarize patients without writing back, and measure each summary.

`evaluate()` runs the real pipeline (`prepare_summary` -> engine -> `complete_summary`, dry run)
for every patient of a record source - a folder of bundle files or a FHIR server - under one or
more configurations (model file, prompt version, sampling), one configuration after the other
so only one model is loaded at a time; `service.eval.measures` turns each result into figures.

What it must not do: write to the FHIR server or to chartbrief's summary database (an eval's
dry runs are not summaries: monitoring and recall must never see them), or log anything but
ids and counts. Statement text goes into the result (the report is the operator's), never a log.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from fhir_adapters.bundle_source import BundleFolder, BundleSource
from fhir_adapters.client import FhirClient
from fhir_adapters.errors import ChartbriefError, FhirNotFound, FhirPermanentError
from fhir_adapters.fetch import FhirSource, fetch_record
from fhir_adapters.models import ModelIdentity, PatientRecord, PromptIdentity
from fhir_adapters.normalize import codeable_text
from service.config import FhirSettings, LlmSettings, Settings
from service.db.store import StoredSummary
from service.eval.measures import PatientEvaluation, measure_patient
from service.llm.base import Engine
from service.pipeline import Services, complete_summary, narrate_summary, prepare_summary
from service.prompts import load_prompt

log = structlog.get_logger(__name__)

JsonObject = dict[str, Any]
EngineFactory = Callable[[LlmSettings], Engine]

# Bundle files have no server behind them; the pipeline's client then only names where a summary
# came from. A host under .invalid can never resolve (RFC 2606), and a dry run sends nothing.
BUNDLE_BASE_URL = "http://bundles.invalid/fhir"


class EvalInputError(ChartbriefError, ValueError):
    """Input the eval cannot use (a patient list, a --compare setting); names the file or field."""


# --- configurations and results --------------------------------------------------------------


@dataclass(frozen=True)
class Configuration:
    """One way of writing summaries: the settings (model file, prompt, sampling) under a short name."""

    name: str  # "A", "B"
    settings: Settings


@dataclass
class RunResult:
    """Every patient of one configuration, with the exact model and prompt that wrote them."""

    configuration: Configuration
    model: ModelIdentity
    prompt: PromptIdentity
    patients: list[PatientEvaluation] = field(default_factory=list)


# --- record sources -----------------------------------------------------------------------------


class RecordSource(Protocol):
    """Where the eval reads patients from: a folder of bundle files or a FHIR server."""

    @property
    def description(self) -> str: ...

    @property
    def base_url(self) -> str: ...

    def patient_ids(self) -> list[str]: ...

    def origin_of(self, patient_id: str) -> str: ...

    async def read_record(self, patient_id: str, settings: FhirSettings) -> PatientRecord: ...

    async def medication_names(self, record: PatientRecord) -> dict[str, str]: ...


@dataclass(frozen=True)
class ServerRecords:
    """Patients of a FHIR server, read with the client the pipeline uses."""

    client: FhirClient
    ids: tuple[str, ...]

    @property
    def description(self) -> str:
        return f"FHIR server {self.client.base_url}"

    @property
    def base_url(self) -> str:
        return self.client.base_url

    def patient_ids(self) -> list[str]:
        return list(self.ids)

    def origin_of(self, patient_id: str) -> str:
        return f"{self.client.base_url}/Patient/{patient_id}"

    async def read_record(self, patient_id: str, settings: FhirSettings) -> PatientRecord:
        return await fetch_record(
            self.client,
            patient_id,
            observation_limit=settings.observation_limit,
            max_concurrency=settings.max_concurrency,
        )

    async def medication_names(self, record: PatientRecord) -> dict[str, str]:
        return await referenced_medication_names(self.client, record)


class BundleRecords:
    """Patients of a folder of bundle files, each record built by `fetch_record` from its file."""

    def __init__(self, folder: BundleFolder, ids: Sequence[str]) -> None:
        self.folder = folder
        self.ids = tuple(ids)
        # The bundle of the patient being read, kept for the look-ups that follow the read.
        self._current: tuple[str, BundleSource] | None = None

    @property
    def description(self) -> str:
        return f"bundle files under {self.folder.root}"

    @property
    def base_url(self) -> str:
        return BUNDLE_BASE_URL

    def patient_ids(self) -> list[str]:
        return list(self.ids)

    def origin_of(self, patient_id: str) -> str:
        path = self.folder.file_of(patient_id)
        return str(path.relative_to(self.folder.root)) if path.is_relative_to(self.folder.root) else str(path)

    async def read_record(self, patient_id: str, settings: FhirSettings) -> PatientRecord:
        source = self.folder.source(patient_id)
        self._current = (patient_id, source)
        return await fetch_record(
            source,
            patient_id,
            observation_limit=settings.observation_limit,
            max_concurrency=settings.max_concurrency,
        )

    async def medication_names(self, record: PatientRecord) -> dict[str, str]:
        pid = str(record.patient.get("id"))
        if self._current is None or self._current[0] != pid:
            self._current = (pid, self.folder.source(pid))
        return await referenced_medication_names(self._current[1], record)


async def referenced_medication_names(source: FhirSource, record: PatientRecord) -> dict[str, str]:
    """`Medication/id` -> name, for the MedicationRequests that name their drug only by reference.

    The record as fetched holds no Medication resources; this look-up lets the report name an
    active medication that the summary could not show instead of only counting it.
    """
    names: dict[str, str] = {}
    for request in record.of_type("MedicationRequest"):
        target = request.get("medicationReference")
        reference = target.get("reference") if isinstance(target, dict) else None
        match = re.fullmatch(r"(?:.*/)?Medication/([^/]+)", reference) if isinstance(reference, str) else None
        if match is None or f"Medication/{match[1]}" in names:
            continue
        try:
            medication = await source.read("Medication", match[1])
        except FhirPermanentError:
            continue
        name = codeable_text(medication.get("code"))
        if name:
            names[f"Medication/{match[1]}"] = name
    return names


async def check_patients_exist(client: FhirClient, ids: Sequence[str], listed_in: str) -> None:
    """Fail before any model runs when a listed patient is not on the server."""
    for pid in ids:
        try:
            await client.read("Patient", pid)
        except FhirNotFound as exc:
            raise EvalInputError(f"{listed_in}: Patient/{pid} is not on {client.base_url}") from exc


def read_patient_list(text: str, listed_in: str) -> list[str]:
    """Patient ids, one a line; blank lines and `#` comments ignored; `Patient/` prefixes accepted.

    >>> read_patient_list("# cohort\\np1\\n\\nPatient/p2  # note\\np1\\n", "ids.txt")
    ['p1', 'p2']
    """
    ids: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        value = line.split("#", 1)[0].strip().removeprefix("Patient/")
        if not value:
            continue
        if not re.fullmatch(r"[A-Za-z0-9\-.]{1,64}", value):
            raise EvalInputError(f"{listed_in} line {number}: {value[:70]!r} is not a FHIR id")
        if value not in ids:
            ids.append(value)
    if not ids:
        raise EvalInputError(f"{listed_in}: no patient id in the file")
    return ids


def select_patients(
    available: Sequence[str], wanted: Sequence[str] | None, listed_in: str, where: str
) -> list[str]:
    """The patients to run: all available, or the wanted ones (each must be available)."""
    if wanted is None:
        return list(available)
    known = set(available)
    for pid in wanted:
        if pid not in known:
            raise EvalInputError(f"{listed_in}: Patient/{pid} is not in {where}")
    return list(wanted)


# --- running ------------------------------------------------------------------------------------


@dataclass
class EvalStore:
    """A `SummaryStore` that keeps the eval's dry runs in memory: they are measurements, not summaries,
    and must not reach the database that monitoring and recall read."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    def record(self, fields: dict[str, Any]) -> str:
        self.rows.append(dict(fields))
        return str(len(self.rows))

    def latest_for_patient(self, fhir_base: str, patient_id: str) -> StoredSummary | None:  # noqa: ARG002
        return None

    def find(self, fhir_base: str, idempotency_key: str) -> StoredSummary | None:  # noqa: ARG002
        return None


@dataclass(frozen=True)
class Progress:
    """One patient done (or the start of a configuration, with `done` 0)."""

    configuration: str
    done: int
    total: int
    patient: PatientEvaluation | None = None


ProgressCallback = Callable[[Progress], None]


async def evaluate(
    source: RecordSource,
    configurations: Sequence[Configuration],
    engine_factory: EngineFactory,
    client: FhirClient,
    *,
    on_progress: ProgressCallback | None = None,
) -> list[RunResult]:
    """Every patient of the source under every configuration, one configuration after the other.

    An engine is made per distinct model setting and closed when no later configuration needs it;
    `client` is what the pipeline names as the summaries' server (nothing is written to it).
    """
    ids = source.patient_ids()
    runs: list[RunResult] = []
    engines: dict[str, Engine] = {}
    try:
        for index, config in enumerate(configurations):
            llm_key = config.settings.llm.model_dump_json()
            if llm_key not in engines:
                engines[llm_key] = engine_factory(config.settings.llm)
            engine = engines[llm_key]
            template = load_prompt(config.settings.prompt, config.settings.prompts_dir)
            run = RunResult(config, engine.identity, template.identity)
            svc = Services(settings=config.settings, client=client, engine=engine, store=EvalStore())
            if on_progress:
                on_progress(Progress(config.name, 0, len(ids)))
            for done, pid in enumerate(ids, 1):
                evaluation = await _evaluate_one(svc, source, pid)
                run.patients.append(evaluation)
                log.info(
                    "eval.patient",
                    configuration=config.name,
                    patient_id=pid,
                    done=done,
                    total=len(ids),
                    kept=len(evaluation.kept),
                    dropped=len(evaluation.dropped),
                    coverage=round(evaluation.coverage, 3),
                )
                if on_progress:
                    on_progress(Progress(config.name, done, len(ids), evaluation))
            runs.append(run)
            later = {c.settings.llm.model_dump_json() for c in configurations[index + 1 :]}
            if llm_key not in later:
                await engines.pop(llm_key).aclose()
    finally:
        for engine in engines.values():
            await engine.aclose()
    return runs


async def _evaluate_one(svc: Services, source: RecordSource, patient_id: str) -> PatientEvaluation:
    structlog.contextvars.bind_contextvars(patient_id=patient_id)
    try:
        started = time.perf_counter()
        record = await source.read_record(patient_id, svc.settings.fhir)
        prep = await prepare_summary(svc, patient_id, record=record)
        result = await complete_summary(svc, prep, await narrate_summary(svc, prep), dry_run=True)
        seconds = time.perf_counter() - started
        names = await source.medication_names(record)
        return measure_patient(record, prep.ctx, result, seconds, source.origin_of(patient_id), names)
    finally:
        structlog.contextvars.unbind_contextvars("patient_id")


__all__ = [
    "BUNDLE_BASE_URL",
    "BundleRecords",
    "Configuration",
    "EngineFactory",
    "EvalInputError",
    "EvalStore",
    "Progress",
    "RecordSource",
    "RunResult",
    "ServerRecords",
    "check_patients_exist",
    "evaluate",
    "read_patient_list",
    "referenced_medication_names",
    "select_patients",
]
