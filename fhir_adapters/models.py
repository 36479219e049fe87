"""Plain data passed between the pipeline's stages.

Nothing here does IO. `PatientRecord` is what `fetch` read from a FHIR server (raw JSON kept,
so unknown extensions survive); `ClinicalContext` is what `normalize` made of it: a list of
facts, each with a short citation key that maps back to `Type/id/_history/versionId`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

FactKind = Literal[
    "patient",
    "condition",
    "medication",
    "allergy",
    "encounter",
    "observation",
    "procedure",
    "immunization",
    "note",
]


@dataclass(frozen=True)
class SourceRef:
    """A versioned pointer to one resource read from the server."""

    resource_type: str
    id: str
    version: str | None = None

    @property
    def reference(self) -> str:
        """`Type/id` - what a FHIR Reference.reference holds."""
        return f"{self.resource_type}/{self.id}"

    @property
    def versioned(self) -> str:
        """`Type/id/_history/v` when the version is known, else `Type/id`."""
        if self.version:
            return f"{self.resource_type}/{self.id}/_history/{self.version}"
        return self.reference

    @classmethod
    def of(cls, resource: dict[str, Any]) -> SourceRef:
        meta = resource.get("meta") or {}
        return cls(resource["resourceType"], str(resource["id"]), meta.get("versionId"))


@dataclass(frozen=True)
class Skipped:
    """A resource or attachment that could not be used, and why. Never PHI: ids and reasons."""

    resource: str  # "DocumentReference/123", "DocumentReference/123#content[1]", or a type: "Procedure"
    reason: str
    # A read limit was reached: `resource` names the search (a type) or attachment cut short.
    truncated: bool = False

    @property
    def resource_type(self) -> str:
        """`DocumentReference` for `DocumentReference/123#content[1]`."""
        return self.resource.split("/", 1)[0].split("#", 1)[0]

    @property
    def whole_type(self) -> bool:
        """True when a whole type is missing (its search was refused), not one resource."""
        return "/" not in self.resource and not self.truncated


@dataclass(frozen=True)
class Note:
    """The decoded text of one clinical note (DocumentReference attachment)."""

    source: SourceRef
    text: str
    content_type: str
    date: str | None
    title: str | None
    status: str | None  # DocumentReference.status: current / superseded / entered-in-error
    sha256: str  # of the normalized text, for de-duplication


@dataclass
class PatientRecord:
    """Raw resources read for one patient, by type, plus the decoded notes and what was skipped."""

    patient: dict[str, Any]
    encounter_id: str | None = None
    resources: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    notes: list[Note] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def of_type(self, resource_type: str) -> list[dict[str, Any]]:
        return self.resources.get(resource_type, [])

    @property
    def truncated(self) -> list[Skipped]:
        """The searches and attachments a read limit cut short (part of `skipped`)."""
        return [s for s in self.skipped if s.truncated]

    @property
    def sources(self) -> list[SourceRef]:
        """Every resource read, in a stable order (type, id)."""
        refs = [SourceRef.of(self.patient)]
        for rtype in sorted(self.resources):
            refs.extend(SourceRef.of(r) for r in sorted(self.resources[rtype], key=lambda r: str(r["id"])))
        return refs


@dataclass(frozen=True)
class Fact:
    """One citable statement taken from coded data or a note.

    `key` is the short citation key the model and the reader see ("C3", "M1", "N2"); `source` is
    the exact resource version it came from. `terms` are the words, numbers and dates that a claim
    citing this fact may state (grounding checks claims against them); `text` is the whole
    source excerpt shown to the model and to the reviewing clinician.
    """

    key: str
    kind: FactKind
    text: str
    source: SourceRef
    date: str | None = None  # ISO date (YYYY-MM-DD) the fact is about, when known
    status: str | None = None  # active / resolved / stopped / final ...
    code: str | None = None  # system|code of the main coding, when coded
    display: str | None = None  # the main human label (condition name, medication name, lab name)
    value: str | None = None  # value with unit for observations ("7.2 %")
    category: str | None = None  # Observation category code ("laboratory", "vital-signs", "survey", ...)


@dataclass
class ClinicalContext:
    """Everything the summary may say, as citable facts. Built by `normalize`, pure."""

    patient: SourceRef
    patient_summary: str  # "female, born 2015-05-03" style line, no name; shown to the model
    facts: list[Fact] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    encounter: SourceRef | None = None
    # What the facts were taken from, so a claim can be checked against the whole cited resource
    # (every coding, date, value, dosage) and not only against the excerpt shown to the model:
    # the raw resources by "Type/id", and the decoded text of every note by its "Type/id".
    resources: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    note_texts: dict[str, str] = field(default_factory=dict, repr=False)

    def by_key(self) -> dict[str, Fact]:
        return {f.key: f for f in self.facts}

    def of_kind(self, kind: FactKind) -> list[Fact]:
        return [f for f in self.facts if f.kind == kind]


@dataclass(frozen=True)
class ModelIdentity:
    """The exact model that wrote a summary: what the Device resource and Provenance name."""

    name: str  # "SmolLM2-135M-Instruct"
    file_name: str  # "SmolLM2-135M-Instruct.Q4_1.gguf"
    sha256: str  # of the GGUF file
    quantization: str  # "Q4_1"
    runtime: str  # "llama.cpp (llama-cpp-python 0.3.36)"
    sampling: str = ""  # "temperature=0.0 seed=42 n_ctx=2048", part of the idempotency key

    @property
    def version_string(self) -> str:
        return f"sha256:{self.sha256} {self.quantization} {self.runtime}"


@dataclass(frozen=True)
class PromptIdentity:
    id: str  # "summary"
    version: str  # "v1"
    sha256: str  # of the prompt file's bytes


@dataclass
class SummaryDraft:
    """A grounded summary ready to be written back. Built by the pipeline, written by `writer`."""

    patient: SourceRef
    markdown: str
    structured: dict[str, Any]  # the deterministic, cited part plus kept/dropped claims, as JSON
    cited: list[SourceRef]  # every source a kept line cites -> DocumentReference.context.related
    inputs: list[SourceRef]  # every resource read -> Provenance.entity (role=source)
    model: ModelIdentity
    prompt: PromptIdentity
    idempotency_key: str
    created: str  # ISO instant
    encounter: SourceRef | None = None
    period_start: str | None = None
    period_end: str | None = None
