"""Whether a DocumentReference carrying chartbrief's identifier is a draft chartbrief wrote, and whether
its stored statements still hold against the patient's record as it is now.

The identifier alone proves nothing (anyone who may write to the chart can set it). `check_origin` reads
the Provenance by the id chartbrief gives its draft, that Provenance's Device and the AIAST labels
(`fhir_adapters.write.review.origin_problems`), and chartbrief's own summary row for the key.
`recheck_claims` runs the verifier again on each stored statement against the cited resource versions
in the freshly prepared record: a cited version gone makes the statement stale (the draft may be
rejected or regenerated, not approved or edited); a statement failing on unchanged sources means the
document was not written by chartbrief as it stands. `checked` is the check every review action runs
first (`NotChartbriefDraft` when the document is not chartbrief's).

What this module must not do: write to the FHIR server or the database, audit (the caller audits the
refusal), or log a statement's text or a problem's wording beyond counts and ids.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from fhir_adapters.errors import FhirNotFound
from fhir_adapters.models import ClinicalContext
from fhir_adapters.write import send as fhir_write
from fhir_adapters.write.draft import provenance_id, version_of
from fhir_adapters.write.review import NotChartbriefDraft, ReviewConflict, agents_of_type, origin_problems
from service.db.store import in_thread
from service.grounding import Claim, ground
from service.pipeline import Services, prepare_summary

_log = structlog.get_logger(__name__)

__all__ = [
    "DraftCheck",
    "check_draft",
    "check_origin",
    "checked",
    "fhir_base",
    "has_statements",
    "recheck_claims",
]


def fhir_base(svc: Services) -> str:
    """The server the summary rows name: the client's, else the configured one."""
    return str(getattr(svc.client, "base_url", None) or svc.settings.fhir.base_url)


@dataclass(frozen=True)
class DraftCheck:
    """What `check_draft` found: why the document is not chartbrief's (empty: it is), and the kept
    statements (their text) whose cited source version is no longer in the record."""

    problems: tuple[str, ...] = ()
    stale: tuple[str, ...] = ()

    @property
    def genuine(self) -> bool:
        return not self.problems

    @property
    def current(self) -> bool:
        """Chartbrief's, and every statement still verified against the record as it is now."""
        return self.genuine and not self.stale


def _stored_json(doc: Mapping[str, Any]) -> dict[str, Any] | None:
    for content in doc.get("content") or []:
        attachment = content.get("attachment") if isinstance(content, dict) else None
        if not isinstance(attachment, dict):
            continue
        if not str(attachment.get("contentType", "")).startswith("application/json"):
            continue
        try:
            data = json.loads(base64.b64decode(str(attachment.get("data", "")), validate=True))
        except (binascii.Error, ValueError):
            return None
        return data if isinstance(data, dict) else None
    return None


def recheck_claims(doc: Mapping[str, Any], ctx: ClinicalContext) -> tuple[list[str], list[str]]:
    """The stored statements verified again against `ctx`, the record as it is now: (why the draft
    cannot be chartbrief's, the texts of statements whose cited source version is gone).

    A citation key is matched through the versioned reference the draft stored for it (keys are
    renumbered when the record changes). A statement whose cited versions are all still in the record
    and that the verifier does not support is not one chartbrief kept: the verifier is
    deterministic over the same versions, so the document was written or changed by someone else.
    """
    data = _stored_json(doc)
    if data is None:
        return [], []  # no stored statements (an edited draft holds only the clinician's text)
    raw_sources = data.get("sources")
    sources = raw_sources if isinstance(raw_sources, dict) else {}
    current = {fact.source.versioned: fact.key for fact in ctx.facts}
    problems: list[str] = []
    stale: list[str] = []
    to_check: list[Claim] = []
    for item in data.get("narrative") or []:
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            problems.append("a stored statement is not a text with citations")
            continue
        cited = [str(c) for c in item.get("citations") or []]
        refs = [sources.get(key) for key in cited]
        if not cited or any(not isinstance(ref, str) for ref in refs):
            problems.append("a stored statement cites no source, or a key the draft names no source for")
            continue
        keys = [current.get(str(ref)) for ref in refs]
        if any(key is None for key in keys):
            stale.append(item["text"])
            continue
        found = tuple(k for k in keys if k is not None)
        quoted = item.get("written_by") == "quote"
        to_check.append(Claim(item["text"], found, "quote" if quoted else "model"))
    if to_check:
        dropped = ground(to_check, ctx).dropped
        if dropped:
            problems.append(f"{len(dropped)} stored statement(s) are not supported by the sources they cite")
    return problems, stale


def _device_id(provenance: Mapping[str, Any]) -> str | None:
    for ref in agents_of_type(dict(provenance), "author"):
        if "Device/" in ref:
            tail = ref.rsplit("Device/", 1)[1].split("/_history/", 1)[0]
            return tail or None
    return None


async def _read_or_none(svc: Services, resource_type: str, resource_id: str) -> dict[str, Any] | None:
    try:
        return await svc.client.read(resource_type, resource_id)
    except FhirNotFound:
        return None


async def check_origin(svc: Services, doc: dict[str, Any], key: str) -> list[str]:
    """Why `doc` (read with `fhir_write.read_draft`, `key` its identifier) is not shown to be
    chartbrief's: its Provenance by the id chartbrief gives it, that Provenance's Device, the AIAST
    labels, and chartbrief's own summary row for the key. Empty: it is chartbrief's."""
    doc_ref = f"DocumentReference/{doc.get('id')}"
    provenance = await _read_or_none(svc, "Provenance", provenance_id(key))
    device_id = _device_id(provenance) if provenance is not None else None
    device = await _read_or_none(svc, "Device", device_id) if device_id else None
    row = await in_thread(svc.store.find, fhir_base(svc), key)
    # The summary row chartbrief keeps for the key names the model. Without one (a draft written
    # through another database) any chartbrief model Device will do: the model configured now is no
    # guide, since drafts outlive a model change and a recalled draft's model is usually not the current one.
    model_sha256 = row.model_sha256 if row is not None else None
    problems = origin_problems(doc, provenance, device, model_sha256=model_sha256 or None)
    if row is not None and row.document_reference and row.document_reference != doc_ref:
        problems.append("chartbrief recorded another document for this summary")
    return problems


def has_statements(doc: Mapping[str, Any]) -> bool:
    """True when the draft stores model statements that a check against the record must cover."""
    data = _stored_json(doc)
    return bool(data and data.get("narrative"))


async def check_draft(svc: Services, doc: dict[str, Any], key: str, ctx: ClinicalContext) -> DraftCheck:
    """Whether chartbrief wrote `doc` (`check_origin`) and whether its statements still hold against
    `ctx`, the patient's record as prepared now (`recheck_claims`)."""
    problems = await check_origin(svc, doc, key)
    forged, stale = recheck_claims(doc, ctx)
    return _found(doc, [*problems, *forged], stale)


def _found(doc: Mapping[str, Any], problems: list[str], stale: list[str]) -> DraftCheck:
    doc_ref = f"DocumentReference/{doc.get('id')}"
    if problems:
        _log.warning("review.not_chartbrief", document_reference=doc_ref, problems=len(problems))
    elif stale:
        _log.info("review.stale_draft", document_reference=doc_ref, statements=len(stale))
    return DraftCheck(problems=tuple(problems), stale=tuple(stale))


async def checked(
    svc: Services,
    document_reference_id: str,
    patient_id: str,
    *,
    encounter_id: str | None,
    action: str,
    version: str | None = None,
) -> DraftCheck:
    """The draft checked before `action`; NotChartbriefDraft when it is not chartbrief's. The record
    is read only when the origin holds and there are stored statements to check against it."""
    doc, key = await fhir_write.read_draft(
        svc.client,
        document_reference_id,
        identifier_system=svc.settings.writer.identifier_system,
        patient_id=patient_id,
    )
    problems = await check_origin(svc, doc, key)
    stale: list[str] = []
    if not problems and has_statements(doc):
        prep = await prepare_summary(svc, patient_id, encounter_id=encounter_id)
        forged, stale = recheck_claims(doc, prep.ctx)
        problems += forged
    found = _found(doc, problems, stale)
    if not found.genuine and version is not None and version_of(doc) != str(version):
        # Not the version the clinician saw: what it is now is for them to see on reloading.
        raise ReviewConflict(f"DocumentReference/{doc.get('id')}")
    if not found.genuine:
        raise NotChartbriefDraft(
            f"DocumentReference/{doc.get('id')} is not a chartbrief draft "
            f"({'; '.join(found.problems)}): it cannot be {action}"
        )
    return found
