"""What the review screen shows, as plain data built from the pipeline's results or a stored draft.

Pure: no IO, no logging. The templates render these objects (Jinja2 autoescapes every value),
so nothing here builds HTML.

A draft read back from the EHR carries its own record of what it said: the markdown
attachment (what the clinician reads in the chart) and the structured JSON attachment (the
coded sections, the kept and the dropped model statements with their citations, and the
citation keys' versioned sources). That is enough to show it again without the model.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from fhir_adapters.models import ClinicalContext, Fact, ModelIdentity
from service.grounding import Claim, DroppedClaim
from service.narrative import NotesRead
from service.structured import StructuredSummary

JsonObject = dict[str, Any]

KIND_LABELS = {
    "patient": "Patient",
    "condition": "Condition",
    "medication": "Medication request",
    "allergy": "Allergy",
    "encounter": "Encounter",
    "observation": "Observation",
    "procedure": "Procedure",
    "immunization": "Immunization",
    "note": "Clinical note",
}


@dataclass(frozen=True)
class SourceView:
    """One citation's source excerpt, as the clinician sees it when clicking the citation."""

    key: str
    resource_type: str
    reference: str  # Type/id/_history/v
    label: str
    date: str | None
    text: str
    value: str | None = None
    status: str | None = None
    available: bool = True  # False: the draft cites a version no longer in the record


@dataclass(frozen=True)
class ClaimView:
    text: str
    citations: tuple[str, ...]
    written_by: str = "model"  # or "quote": a note's own line, verbatim

    @property
    def quoted(self) -> bool:
        return self.written_by == "quote"


SEVERITIES = ("high", "medium", "low")
VERDICTS = ("unsupported", "contradicted", "redundant")


@dataclass(frozen=True)
class DroppedView:
    """A removed statement. `severity` is None for a draft stored before drops were rated."""

    text: str
    citations: tuple[str, ...]
    reason: str
    verdict: str = "unsupported"  # or "contradicted": it negates what a cited source records
    severity: str | None = None  # high / medium / low

    @property
    def contradicted(self) -> bool:
        return self.verdict == "contradicted"


@dataclass(frozen=True)
class NarrativeView:
    kept: tuple[ClaimView, ...]
    dropped: tuple[DroppedView, ...]
    notes: NotesRead | None = None  # a prompt that reads the notes: which it read, and why not the rest
    # Kept statements (their text) whose cited source version is no longer in the record.
    stale: frozenset[str] = frozenset()

    @property
    def from_notes(self) -> bool:
        return self.notes is not None

    @property
    def notes_line(self) -> str:
        return self.notes.summary_line().strip("_") if self.notes is not None and self.notes.total else ""

    @property
    def quoted(self) -> int:
        return sum(c.quoted for c in self.kept)

    @property
    def contradicted(self) -> tuple[DroppedView, ...]:
        return tuple(d for d in self.dropped if d.contradicted)

    @property
    def severity_counts(self) -> tuple[tuple[str, int], ...]:
        """(severity, count) for each severity some removed statement has, most severe first."""
        counts = [(s, sum(1 for d in self.dropped if d.severity == s)) for s in SEVERITIES]
        return tuple((s, n) for s, n in counts if n)

    @property
    def dropped_by_weight(self) -> tuple[DroppedView, ...]:
        """Contradictions first, then by severity (unrated last); the model's order among equals."""
        rank = {s: i for i, s in enumerate(SEVERITIES)}
        return tuple(
            sorted(self.dropped, key=lambda d: (not d.contradicted, rank.get(d.severity or "", len(rank))))
        )


@dataclass(frozen=True)
class DraftView:
    """A chartbrief DocumentReference as read from the EHR."""

    id: str
    version: str | None
    status: str  # current | superseded | entered-in-error
    doc_status: str | None  # preliminary | final | amended
    markdown: str
    date: str | None
    edited: bool = False
    structured: StructuredSummary | None = None
    narrative: NarrativeView | None = None
    sources: Mapping[str, str] = field(default_factory=dict)  # citation key -> Type/id/_history/v
    # Why chartbrief does not recognise the document as its own (fixed phrases); empty: it does.
    not_ours: tuple[str, ...] = ()

    @property
    def reference(self) -> str:
        return f"DocumentReference/{self.id}"

    @property
    def genuine(self) -> bool:
        """Chartbrief wrote it: its Provenance, Device and labels say so and its statements hold."""
        return not self.not_ours

    @property
    def stale(self) -> int:
        """How many kept statements cite a source version no longer in the record."""
        return len(self.narrative.stale) if self.narrative is not None else 0

    @property
    def reviewable(self) -> bool:
        """Approve, edit and reject apply only to a current, unreviewed draft chartbrief wrote."""
        return self.genuine and self.status == "current" and self.doc_status not in ("final", "amended")

    @property
    def approvable(self) -> bool:
        """Approve and edit also need every statement to hold against the record as it is now."""
        return self.reviewable and not self.stale

    @property
    def state_label(self) -> str:
        if not self.genuine:
            return "Not a chartbrief draft"
        if self.status == "entered-in-error":
            return "Rejected (entered in error)"
        if self.status == "superseded":
            return "Superseded by a newer draft"
        if self.doc_status in ("final", "amended"):
            return "Approved by a clinician (final)"
        return "Draft - not reviewed"


@dataclass(frozen=True)
class BannerView:
    name: str
    gender: str | None
    birth_date: str | None
    identifier: str | None


# -- from the pipeline ---------------------------------------------------------------------------


def source_view(fact: Fact) -> SourceView:
    return SourceView(
        key=fact.key,
        resource_type=fact.source.resource_type,
        reference=fact.source.versioned,
        label=KIND_LABELS.get(fact.kind, fact.kind),
        date=fact.date,
        text=fact.text,
        value=fact.value,
        status=fact.status,
    )


def source_views(ctx: ClinicalContext, keys: Iterable[str]) -> list[SourceView]:
    """The excerpts of the cited keys that exist in `ctx`, in citation-key order."""
    by_key = ctx.by_key()
    return [source_view(by_key[k]) for k in sorted(set(keys), key=key_order) if k in by_key]


def narrative_view(
    kept: Sequence[Claim], dropped: Sequence[DroppedClaim], notes: NotesRead | None = None
) -> NarrativeView:
    return NarrativeView(
        notes=notes,
        kept=tuple(ClaimView(c.text, tuple(c.citations), c.origin) for c in kept),
        dropped=tuple(
            DroppedView(d.claim.text, tuple(d.claim.citations), d.reason, d.verdict, d.severity)
            for d in dropped
        ),
    )


def cited_keys(structured: StructuredSummary | None, narrative: NarrativeView | None) -> set[str]:
    keys = structured.cited_keys() if structured else set()
    if narrative:
        keys |= {k for c in narrative.kept for k in c.citations}
        keys |= {k for d in narrative.dropped for k in d.citations}
    return keys


def key_order(key: str) -> tuple[str, int]:
    """Sort citation keys by prefix, then number (C2 before C10).

    >>> sorted(["C10", "A1", "C2"], key=key_order)
    ['A1', 'C2', 'C10']
    """
    prefix = key.rstrip("0123456789")
    digits = key[len(prefix) :]
    return (prefix, int(digits) if digits else 0)


# -- from a stored draft -------------------------------------------------------------------------


def _attachment_bytes(attachment: Mapping[str, Any]) -> bytes | None:
    data = attachment.get("data")
    if not isinstance(data, str):
        return None
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None


def _attachments(doc: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    out: list[Mapping[str, Any]] = []
    for content in doc.get("content") or []:
        attachment = content.get("attachment") if isinstance(content, dict) else None
        if isinstance(attachment, dict):
            out.append(attachment)
    return out


def stored_markdown(doc: Mapping[str, Any]) -> str:
    """The markdown attachment's text ('' when there is none or it cannot be decoded)."""
    for attachment in _attachments(doc):
        if str(attachment.get("contentType", "")).startswith("text/markdown"):
            raw = _attachment_bytes(attachment)
            if raw is not None:
                return raw.decode("utf-8", errors="replace")
    return ""


def stored_structured_json(doc: Mapping[str, Any]) -> JsonObject | None:
    for attachment in _attachments(doc):
        if str(attachment.get("contentType", "")).startswith("application/json"):
            raw = _attachment_bytes(attachment)
            if raw is None:
                return None
            try:
                data = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                return None
            return data if isinstance(data, dict) else None
    return None


def _claims(items: object) -> tuple[ClaimView, ...]:
    out = []
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict) and isinstance(item.get("text"), str):
            origin = "quote" if item.get("written_by") == "quote" else "model"
            out.append(ClaimView(item["text"], tuple(str(c) for c in item.get("citations") or []), origin))
    return tuple(out)


def _dropped(items: object) -> tuple[DroppedView, ...]:
    out = []
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict) and isinstance(item.get("text"), str):
            verdict, severity = item.get("verdict"), item.get("severity")
            out.append(
                DroppedView(
                    item["text"],
                    tuple(str(c) for c in item.get("citations") or []),
                    str(item.get("reason") or "not supported by its sources"),
                    verdict if verdict in VERDICTS else "unsupported",
                    severity if severity in SEVERITIES else None,
                )
            )
    return tuple(out)


def is_edited(doc: Mapping[str, Any]) -> bool:
    """True when a person changed the AI text (the edit marks the document so)."""
    for ext in doc.get("extension") or []:
        if isinstance(ext, dict) and "edited" in str(ext.get("url", "")):
            return True
    return "edited by" in str(doc.get("description", "")).lower()


def draft_view(doc: Mapping[str, Any]) -> DraftView:
    """A stored chartbrief DocumentReference as a `DraftView`; unreadable parts are left empty."""
    meta = doc.get("meta") or {}
    data = stored_structured_json(doc) or {}
    structured = None
    if isinstance(data.get("structured"), dict):
        try:
            structured = StructuredSummary.from_json(data["structured"])
        except (KeyError, TypeError):
            structured = None
    narrative = None
    if "narrative" in data or "dropped" in data:
        narrative = NarrativeView(
            kept=_claims(data.get("narrative")),
            dropped=_dropped(data.get("dropped")),
            notes=NotesRead.from_json(data.get("notes")),
        )
    stored_sources = data.get("sources")
    sources: dict[Any, Any] = stored_sources if isinstance(stored_sources, dict) else {}
    return DraftView(
        id=str(doc.get("id", "")),
        version=str(meta["versionId"]) if isinstance(meta, dict) and meta.get("versionId") else None,
        status=str(doc.get("status", "")),
        doc_status=doc.get("docStatus") if isinstance(doc.get("docStatus"), str) else None,
        markdown=stored_markdown(doc),
        date=doc.get("date") if isinstance(doc.get("date"), str) else None,
        edited=is_edited(doc),
        structured=structured,
        narrative=narrative,
        sources={str(k): str(v) for k, v in sources.items()},
    )


def checked_draft_view(draft: DraftView, not_ours: Sequence[str], stale: Iterable[str]) -> DraftView:
    """`draft` as `service.review.check_draft` found it. A document chartbrief did not write keeps
    nothing of what it says (no coded part, no statements, no sources, no text): only who it is."""
    if not_ours:
        return replace(
            draft,
            not_ours=tuple(not_ours),
            markdown="",
            structured=None,
            narrative=None,
            sources={},
            edited=False,
        )
    narrative = draft.narrative
    if narrative is not None:
        narrative = replace(narrative, stale=frozenset(stale))
    return replace(draft, narrative=narrative)


def stored_source_views(sources: Mapping[str, str], ctx: ClinicalContext | None) -> list[SourceView]:
    """Excerpts for a stored draft's citations, found by the exact resource version they cite.

    Keys are renumbered when the record changes, so a stored key is matched through its
    versioned reference; a version no longer in the record is shown as unavailable, never
    replaced by a newer one.
    """
    by_ref = {f.source.versioned: f for f in ctx.facts} if ctx else {}
    views = []
    for key in sorted(sources, key=key_order):
        ref = sources[key]
        fact = by_ref.get(ref)
        if fact is not None:
            views.append(replace(source_view(fact), key=key))
        else:
            views.append(
                SourceView(
                    key=key,
                    resource_type=ref.split("/", 1)[0],
                    reference=ref,
                    label=ref.split("/", 1)[0],
                    date=None,
                    text="This version of the source is no longer in the record.",
                    available=False,
                )
            )
    return views


# -- the banner ----------------------------------------------------------------------------------


def banner_view(patient: Mapping[str, Any]) -> BannerView:
    """Name, sex, birth date and first identifier of a Patient resource, for the patient banner.

    >>> banner_view({"name": [{"given": ["Ann", "B"], "family": "Lee"}], "gender": "female",
    ...              "birthDate": "1970-01-02", "identifier": [{"value": "MRN1"}]}).name
    'Ann B Lee'
    """
    name = "(no name recorded)"
    names = [n for n in patient.get("name") or [] if isinstance(n, dict)]
    official = [n for n in names if n.get("use") == "official"] or names
    if official:
        first = official[0]
        if isinstance(first.get("text"), str) and first["text"].strip():
            name = first["text"].strip()
        else:
            parts = [*(str(g) for g in first.get("given") or []), str(first.get("family") or "")]
            name = " ".join(p for p in parts if p).strip() or name
    identifiers = [i for i in patient.get("identifier") or [] if isinstance(i, dict) and i.get("value")]
    # The medical record number is what staff match a chart by; any identifier is the fallback.
    mrn = [i for i in identifiers if any(c.get("code") == "MR" for c in _codings(i.get("type")))]
    chosen = (mrn or identifiers)[0] if (mrn or identifiers) else None
    identifier = str(chosen["value"]) if chosen is not None else None
    return BannerView(
        name=name,
        gender=patient.get("gender") if isinstance(patient.get("gender"), str) else None,
        birth_date=patient.get("birthDate") if isinstance(patient.get("birthDate"), str) else None,
        identifier=identifier,
    )


def _codings(concept: object) -> list[Mapping[str, Any]]:
    if not isinstance(concept, dict):
        return []
    return [c for c in concept.get("coding") or [] if isinstance(c, dict)]


def model_line(identity: ModelIdentity | None) -> str | None:
    """The model the service runs, for the review screen's footer: name, quantization, sha256 prefix.

    >>> model_line(ModelIdentity("SmolLM2-135M-Instruct", "x.gguf", "1a2b3c4d5e6f" + "0" * 52, "Q4_1", "rt"))
    'SmolLM2-135M-Instruct Q4_1 · sha256 1a2b3c4d5e6f'
    """
    if identity is None:
        return None
    return f"{identity.name} {identity.quantization} · sha256 {identity.sha256[:12]}"
