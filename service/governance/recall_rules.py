"""What a recall matches, and the recall marker on a DocumentReference: pure functions over plain data.

A criterion is a model file (its sha256, or a prefix of at least 12 hex characters until it is resolved
to the one sha it names) or a prompt version (`v1`, any prompt; `summary/v1`, that prompt). The FHIR
shapes read here are the writer's (fhir_adapters.write.draft): the chartbrief Device names its model file in
`version` (`sha256:<hex> <quantization> <runtime>`) and in its identifier; the AI-Provenance names its
Device as an agent, its prompt in the `urn:chartbrief:prompt` extension, its DocumentReference as target.

The marker: `meta.tag` `urn:chartbrief:recall|under-recall`, plus one extension `urn:chartbrief:recall`
per recall (`criterion`, `reason`, `recorded`). What this module must not do: IO, or produce a marked copy
of anything but a current, preliminary draft's own content.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from fhir_adapters.errors import ChartbriefError
from fhir_adapters.write.draft import MODEL_IDENTIFIER_SYSTEM, PROMPT_EXTENSION_URL, reference_from_location
from service.governance.records import SummaryRecord

JsonObject = dict[str, Any]

RECALL_SYSTEM = "urn:chartbrief:recall"
RECALL_URL = "urn:chartbrief:recall"
RECALL_TAG = {
    "system": RECALL_SYSTEM,
    "code": "under-recall",
    "display": "Under recall: a clinician must re-check this AI draft",
}
MIN_SHA_PREFIX = 12
_HEX = re.compile(r"^[0-9a-f]+$")
_PROMPT = re.compile(r"^(?:(?P<id>[a-z0-9][a-z0-9_-]*)/)?(?P<version>v[0-9]+)$")
_VERSION_SHA = re.compile(r"sha256:([0-9a-f]{64})\b")

State = Literal[
    "unreviewed",
    "under-recall",
    "approved",
    "rejected",
    "superseded",
    "not-written",
    "not-checked",
    "missing",
]


class RecallError(ChartbriefError, ValueError):
    """The recall cannot run as asked; the message says what to change (one line, no PHI)."""


# -- what is recalled (pure) -------------------------------------------------------------------------


@dataclass(frozen=True)
class Criterion:
    """A model file (its sha256, or a prefix until resolved) or a prompt version (`v1` or `summary/v1`)."""

    kind: Literal["model", "prompt"]
    value: str

    @property
    def label(self) -> str:
        return f"model-sha256:{self.value}" if self.kind == "model" else f"prompt:{self.value}"

    @property
    def short_label(self) -> str:
        """For audit rows: the sha cut to its first 12 characters."""
        return (
            f"model-sha256 {self.value[:MIN_SHA_PREFIX]}" if self.kind == "model" else f"prompt {self.value}"
        )

    def matches_sha(self, sha256: str | None) -> bool:
        return self.kind == "model" and bool(sha256) and str(sha256).lower().startswith(self.value)

    def matches_prompt(self, prompt_id: str | None, version: str | None) -> bool:
        if self.kind != "prompt" or not version:
            return False
        if "/" in self.value:
            return f"{prompt_id}/{version}" == self.value
        return version == self.value

    def matches_summary(self, row: SummaryRecord) -> bool:
        if self.kind == "model":
            return self.matches_sha(row.model_sha256)
        return self.matches_prompt(row.prompt_id, row.prompt_version)


def parse_criterion(model_sha: str | None, prompt_version: str | None) -> Criterion:
    """The recall criterion from the two options (exactly one of them).

    >>> parse_criterion("ABCDEF0123456789", None)
    Criterion(kind='model', value='abcdef0123456789')
    >>> parse_criterion(None, "summary/v2")
    Criterion(kind='prompt', value='summary/v2')
    """
    given = [v for v in (model_sha, prompt_version) if v is not None and v.strip()]
    if len(given) != 1:
        raise RecallError("give exactly one of --model-sha SHA or --prompt-version V")
    if model_sha is not None and model_sha.strip():
        sha = model_sha.strip().lower()
        if not _HEX.match(sha) or len(sha) > 64:
            raise RecallError("--model-sha must be the model file's sha256 in hex (or a prefix of it)")
        if len(sha) < MIN_SHA_PREFIX:
            raise RecallError(
                f"--model-sha {sha!r} is too short: give at least {MIN_SHA_PREFIX} hex characters "
                "of the sha256"
            )
        return Criterion("model", sha)
    version = (prompt_version or "").strip()
    if not _PROMPT.match(version):
        raise RecallError(f"--prompt-version must look like v1 or summary/v1, got {version[:40]!r}")
    return Criterion("prompt", version)


def resolve_model(criterion: Criterion, known: Sequence[str]) -> Criterion:
    """The criterion with a sha prefix widened to the one full sha256 it names among `known`.

    >>> a, b = "ab" * 32, "ab" * 31 + "cd"
    >>> resolve_model(Criterion("model", "abababababab"), [a]).value == a
    True
    >>> resolve_model(Criterion("model", "abababababab"), [a, b])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    service.governance.recall_rules.RecallError: --model-sha abababababab matches 2 model files: ...
    """
    if criterion.kind != "model":
        return criterion
    matches = sorted({s.lower() for s in known if s and s.lower().startswith(criterion.value)})
    if len(matches) > 1:
        raise RecallError(
            f"--model-sha {criterion.value} matches {len(matches)} model files: give more characters"
        )
    return Criterion("model", matches[0]) if matches else criterion


def device_sha256(device: Mapping[str, Any]) -> str | None:
    """The model file sha256 a chartbrief Device names: in `version` (`sha256:<hex> ...`), else in its
    identifier."""
    for version in device.get("version") or []:
        if isinstance(version, dict):
            found = _VERSION_SHA.search(str(version.get("value") or ""))
            if found:
                return found.group(1)
    for ident in device.get("identifier") or []:
        if isinstance(ident, dict) and ident.get("system") == MODEL_IDENTIFIER_SYSTEM and ident.get("value"):
            return str(ident["value"]).lower()
    return None


def is_chartbrief_device(device: Mapping[str, Any]) -> bool:
    return any(
        isinstance(i, dict) and i.get("system") == MODEL_IDENTIFIER_SYSTEM
        for i in device.get("identifier") or []
    )


def prompt_of(provenance: Mapping[str, Any]) -> tuple[str, str] | None:
    """(prompt id, version) from an AI-Provenance's `urn:chartbrief:prompt` extension.

    >>> prompt_of({"extension": [{"url": "urn:chartbrief:prompt", "valueString": "summary/v1 sha256:ab"}]})
    ('summary', 'v1')
    """
    for ext in provenance.get("extension") or []:
        if isinstance(ext, dict) and ext.get("url") == PROMPT_EXTENSION_URL:
            spec = str(ext.get("valueString") or "").split(" ", 1)[0]
            prompt_id, _, version = spec.partition("/")
            if prompt_id and version:
                return prompt_id, version
    return None


def _local_reference(reference: str) -> str | None:
    try:
        return reference_from_location(reference)
    except ValueError:
        return None


def author_devices(provenance: Mapping[str, Any]) -> list[str]:
    """`Device/<id>` of every agent of the Provenance that is a Device (relative or absolute reference)."""
    found = []
    for agent in provenance.get("agent") or []:
        ref = (agent.get("who") or {}).get("reference") if isinstance(agent, dict) else None
        local = _local_reference(ref) if isinstance(ref, str) else None
        if local and local.startswith("Device/"):
            found.append(local)
    return found


def target_document(provenance: Mapping[str, Any]) -> str | None:
    """`DocumentReference/<id>` the Provenance is about (a versioned target loses its `_history`)."""
    for target in provenance.get("target") or []:
        ref = target.get("reference") if isinstance(target, dict) else None
        local = _local_reference(ref) if isinstance(ref, str) else None
        if local and local.startswith("DocumentReference/"):
            return local
    return None


def recall_marks(doc: Mapping[str, Any]) -> list[dict[str, str]]:
    """The recalls a document is under: [{criterion, reason, recorded}], oldest first."""
    marks = []
    for ext in doc.get("extension") or []:
        if not (isinstance(ext, dict) and ext.get("url") == RECALL_URL):
            continue
        parts = {
            str(p.get("url")): str(p.get("valueString") or p.get("valueDateTime") or "")
            for p in ext.get("extension") or []
            if isinstance(p, dict)
        }
        marks.append({k: parts.get(k, "") for k in ("criterion", "reason", "recorded")})
    return marks


def is_marked(doc: Mapping[str, Any], criterion: Criterion) -> bool:
    return any(m["criterion"] == criterion.label for m in recall_marks(doc))


def review_state(doc: Mapping[str, Any]) -> State:
    """Where a chartbrief document stands, as recall sees it."""
    status, doc_status = doc.get("status"), doc.get("docStatus")
    if status == "entered-in-error":
        return "rejected"
    if status == "superseded":
        return "superseded"
    if doc_status in ("final", "amended"):
        return "approved"
    return "under-recall" if recall_marks(doc) else "unreviewed"


def markable(doc: Mapping[str, Any]) -> bool:
    """Only a current, preliminary draft is ever marked: the rest is listed, never changed."""
    return doc.get("status") == "current" and doc.get("docStatus") == "preliminary"


def marked_document(doc: Mapping[str, Any], criterion: Criterion, reason: str, when: str) -> JsonObject:
    """A copy of the draft under recall for `criterion`, ready for a PUT (server-managed meta removed).

    It stays preliminary (awaiting a clinician) and keeps everything else, the AI label included.
    """
    marked = copy.deepcopy(dict(doc))
    meta = dict(marked.get("meta") or {})
    meta.pop("versionId", None)
    meta.pop("lastUpdated", None)
    tags = [t for t in meta.get("tag") or [] if isinstance(t, dict)]
    if not any(t.get("system") == RECALL_SYSTEM and t.get("code") == RECALL_TAG["code"] for t in tags):
        tags.append(dict(RECALL_TAG))
    meta["tag"] = tags
    marked["meta"] = meta
    marked["docStatus"] = "preliminary"
    if not is_marked(doc, criterion):
        marked["extension"] = [
            *(marked.get("extension") or []),
            {
                "url": RECALL_URL,
                "extension": [
                    {"url": "criterion", "valueString": criterion.label},
                    {"url": "reason", "valueString": reason},
                    {"url": "recorded", "valueDateTime": when},
                ],
            },
        ]
    return marked


def recall_notice(doc: Mapping[str, Any]) -> str | None:
    """What the review screen says of a draft under recall (None when it is not).

    >>> recall_notice({"extension": [{"url": "urn:chartbrief:recall", "extension": [
    ...     {"url": "criterion", "valueString": "prompt:summary/v1"},
    ...     {"url": "reason", "valueString": "Doses were misread"}]}]})
    'This draft is under recall (prompt:summary/v1): Doses were misread.'
    """
    marks = recall_marks(doc)
    if not marks:
        return None
    parts = [f"({m['criterion']}): {m['reason'].rstrip('.')}" for m in marks]
    return "This draft is under recall " + "; ".join(parts) + "."


def version_of(doc: Mapping[str, Any]) -> str | None:
    meta = doc.get("meta")
    version = meta.get("versionId") if isinstance(meta, dict) else None
    return str(version) if version else None


def subject_patient(doc: Mapping[str, Any]) -> str | None:
    ref = (doc.get("subject") or {}).get("reference")
    return ref.split("/", 1)[1] if isinstance(ref, str) and ref.startswith("Patient/") else None
