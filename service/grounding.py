"""Check the model's claims against the facts they cite; keep the supported ones, drop the rest.

`parse_claims()` reads the model's JSON output (`{"claims": [{"text", "citations"}]}`), tolerating
text around it and recovering whole claims from output that was cut off. `ground()` drops a claim
that is empty, a repeat, longer than `MAX_WORDS` words, cites nothing or cites a key that is not in
the record; every other claim is checked by the verifier (`service.verify`) against the WHOLE
resources its keys cite - every coding, date, value, dosage and status, and a note's full text -
not only against the excerpt the model was shown. A claim is kept only when the verifier finds it
supported; a dropped claim carries the verifier's reason, whether it contradicts the record, and
a severity, all shown to the reviewing clinician and never written as fact.

Pure: no IO, no logging of claim text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from fhir_adapters.models import ClinicalContext, Fact
from service.verify import RecordIndex, SourceEvidence, evidence_of, verify
from service.verify.dates import widen
from service.verify.terms import coded_terms, statement_terms

MAX_WORDS = 60
_MIN_WORDS = 2  # words or numbers: "HbA1c 7.2%" is a statement, a bare "P1" is not
_WORD_OR_NUMBER = re.compile(r"[A-Za-z]\w*|\d+(?:[.,]\d+)?")
NOT_JSON = "model output was not valid JSON"
NO_CLAIMS = 'model output has no "claims" list'

_INLINE_KEY = re.compile(r"\[([A-Za-z]{1,3}[0-9]+)\]")
_LIST_MARKER = re.compile(r"^(?:\d{1,2}[.)]|[-*\u2022])\s+")
_MAX_JSON_STARTS = 200  # bounds the search for JSON in long garbage output


Origin = Literal["model", "quote"]


@dataclass(frozen=True)
class Claim:
    """A statement and the keys it cites; `origin` "quote" when it is a note's line, verbatim."""

    text: str
    citations: tuple[str, ...]
    origin: Origin = "model"


Severity = Literal["high", "medium", "low"]
Verdict = Literal["unsupported", "contradicted", "redundant"]
ADDS_NOTHING = "adds nothing beyond the coded part: it restates a coded line's name, status or date"


@dataclass(frozen=True)
class DroppedClaim:
    """A claim that is not written as fact, why, and how much it matters.

    `verdict` is "contradicted" when the claim negates or inverts what a cited source records
    (shown to the reviewer as a warning, not only as a drop); "redundant" when it is supported but
    says nothing the coded part does not already say. `severity`: high for a contradicted
    or wrong allergy, medication or dose, medium for a wrong date or value, low for wording.
    """

    claim: Claim
    reason: str
    verdict: Verdict = "unsupported"
    severity: Severity = "low"

    @property
    def contradicted(self) -> bool:
        return self.verdict == "contradicted"


@dataclass(frozen=True)
class GroundingResult:
    kept: list[Claim]
    dropped: list[DroppedClaim]

    @property
    def support_rate(self) -> float:
        """Share of claims kept (0.0 when there were none)."""
        total = len(self.kept) + len(self.dropped)
        return len(self.kept) / total if total else 0.0


# --- parsing -----------------------------------------------------------------------------------


def parse_claims(
    output: str, *, cite: str | None = None, lines: bool = False
) -> tuple[list[Claim], list[DroppedClaim]]:
    """Claims from model output, and what could not be read as a claim.

    Output that is not valid JSON gives one DroppedClaim holding the raw text; whole claim
    objects inside it (output cut off at max_tokens) are still recovered.

    `cite`: the one source the output was written from (a note read on its own): the output may
    then be `{"statements": ["...", ...]}` or plain lines, one statement each, and every claim cites
    that source (`lines`: the request had no output schema, so plain lines are expected).
    """
    if cite is not None:
        return _cited(output, cite, lines=lines)
    raw = Claim(output.strip(), ())
    document = _first_json(output)
    if document is None:
        whole = [_claim_from(item) for item in _claim_objects(output)]
        recovered = [c for c in whole if isinstance(c, Claim)]
        if not recovered and _is_json(output):
            return [], [DroppedClaim(raw, NO_CLAIMS)]
        return recovered, [DroppedClaim(raw, NOT_JSON)]
    items = document.get("claims") if isinstance(document, dict) else document
    if not isinstance(items, list):
        return [], [DroppedClaim(raw, NO_CLAIMS)]
    claims: list[Claim] = []
    dropped: list[DroppedClaim] = []
    for number, item in enumerate(items, 1):
        parsed = _claim_from(item)
        if isinstance(parsed, Claim):
            claims.append(parsed)
        else:
            text = item if isinstance(item, str) else json.dumps(item, ensure_ascii=False)
            dropped.append(DroppedClaim(Claim(text, ()), f"claim {number} {parsed}"))
    return claims, dropped


def _cited(output: str, cite: str, *, lines: bool) -> tuple[list[Claim], list[DroppedClaim]]:
    document = _first_json(output, "statements")
    items = document.get("statements") if isinstance(document, dict) else None
    if not isinstance(items, list) and _first_json(output) is not None:
        found, unreadable = parse_claims(output)
        return [replace(c, citations=(cite,)) for c in found], [
            replace(d, claim=replace(d.claim, citations=(cite,))) for d in unreadable
        ]
    if not isinstance(items, list) and not lines:
        return [], [DroppedClaim(Claim(output.strip(), (cite,)), NOT_JSON)]
    if not isinstance(items, list):
        # A prompt without an output schema answers in lines, one statement each.
        items = [line for line in (" ".join(raw.split()) for raw in output.splitlines()) if line]
    claims: list[Claim] = []
    dropped: list[DroppedClaim] = []
    for number, item in enumerate(items, 1):
        text = item.get("text") if isinstance(item, dict) else item
        if isinstance(text, str):
            claims.append(Claim(_LIST_MARKER.sub("", " ".join(text.split())), (cite,)))
        else:
            raw = json.dumps(item, ensure_ascii=False)
            dropped.append(DroppedClaim(Claim(raw, (cite,)), f"statement {number} is not text"))
    return claims, dropped


def _first_json(output: str, key: str = "claims") -> dict[str, Any] | list[Any] | None:
    decoder = json.JSONDecoder()
    starts = [m.start() for m in re.finditer(r"[{\[]", output)][:_MAX_JSON_STARTS]
    for start in starts:
        try:
            value, _end = decoder.raw_decode(output, start)
        except (ValueError, RecursionError):
            continue
        if isinstance(value, dict) and key in value:
            return value
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            return value
    return None


def _is_json(output: str) -> bool:
    try:
        json.loads(output)
    except (ValueError, RecursionError):
        return False
    return True


def _claim_objects(output: str) -> list[dict[str, Any]]:
    """Complete `{"text": ...}` objects found anywhere in (possibly cut-off) output."""
    decoder = json.JSONDecoder()
    found: list[dict[str, Any]] = []
    position = 0
    for _ in range(_MAX_JSON_STARTS):
        start = output.find("{", position)
        if start < 0:
            break
        try:
            value, end = decoder.raw_decode(output, start)
        except (ValueError, RecursionError):
            position = start + 1
            continue
        if isinstance(value, dict) and "text" in value:
            found.append(value)
            position = end
        else:
            position = start + 1
    return found


def _claim_from(item: object) -> Claim | str:
    """A Claim, or why the item is not one."""
    if not isinstance(item, dict):
        return "is not an object with text and citations"
    text = item.get("text")
    if not isinstance(text, str):
        return "has no text"
    raw = item.get("citations")
    if isinstance(raw, str):
        raw = re.split(r"[,;\s]+", raw)
    keys = [_normal_key(k) for k in raw if isinstance(k, str)] if isinstance(raw, list) else []
    if not any(keys):
        # A model that ignores the schema may still cite inline: "... [C1]".
        keys = [_normal_key(k) for k in _INLINE_KEY.findall(text)]
    # List markers ("1. ", "- ") are layout, not a stated number.
    text = _LIST_MARKER.sub("", " ".join(text.split()))
    return Claim(text, tuple(dict.fromkeys(k for k in keys if k)))


def _normal_key(key: str) -> str:
    return key.strip().strip("[]()").strip().upper()


# --- grounding ---------------------------------------------------------------------------------


def ground(claims: Sequence[Claim], ctx: ClinicalContext, *, coded: str | None = None) -> GroundingResult:
    """Keep the claims the cited resources support; drop the rest with a specific reason, a
    verdict (unsupported / contradicted) and a severity.

    `coded`: the coded part as written (its markdown); a supported claim that states nothing it
    does not (only a coded line's name, key, status or date) is dropped as redundant.
    """
    facts = ctx.by_key()
    keys = frozenset(facts)
    known = coded_terms(f"{ctx.patient_summary}\n{coded}", keys) if coded is not None else None
    record = _record_of(ctx)
    as_of = next((f.date for f in ctx.facts if f.kind == "patient" and f.date), None) or record.as_of
    kept: list[Claim] = []
    dropped: list[DroppedClaim] = []
    seen: set[str] = set()
    for claim in claims:
        problem = _form_problem(claim, facts, seen)
        if problem is not None:
            dropped.append(problem)
            continue
        cited = [facts[key] for key in claim.citations]
        verdict = verify(claim.text, [_evidence(fact, record) for fact in cited], as_of=as_of)
        if verdict.supported and known is not None and not statement_terms(claim.text, keys) - known:
            dropped.append(DroppedClaim(claim, f"{ADDS_NOTHING} [{', '.join(claim.citations)}]", "redundant"))
        elif verdict.supported:
            kept.append(claim)
        else:
            where = f"[{', '.join(claim.citations)}]"
            dropped.append(
                DroppedClaim(
                    claim,
                    f"{verdict.reason} {where}",
                    verdict="contradicted" if verdict.outcome == "contradicted" else "unsupported",
                    severity=verdict.severity or "low",
                )
            )
    return GroundingResult(kept=kept, dropped=dropped)


def ground_output(output: str, ctx: ClinicalContext) -> GroundingResult:
    """`parse_claims` then `ground`: unreadable parts are dropped along with unsupported claims."""
    claims, unreadable = parse_claims(output)
    result = ground(claims, ctx)
    return GroundingResult(kept=result.kept, dropped=unreadable + result.dropped)


def _form_problem(claim: Claim, facts: Mapping[str, Fact], seen: set[str]) -> DroppedClaim | None:
    """What makes a claim unusable before its content is checked: empty, too long, a repeat, no
    citation, a citation that is not in the record."""
    text = claim.text.strip()
    words = len(text.split())
    fingerprint = " ".join(re.findall(r"\d+(?:\.\d+)?|[a-z]+", _INLINE_KEY.sub(" ", text.lower())))
    reason: str | None = None
    if not text:
        reason = "is empty"
    elif len(_WORD_OR_NUMBER.findall(_INLINE_KEY.sub(" ", text))) < _MIN_WORDS:
        reason = f"is not a statement (fewer than {_MIN_WORDS} words)"
    elif words > MAX_WORDS:
        reason = f"has {words} words, more than the {MAX_WORDS}-word limit"
    elif fingerprint in seen:
        reason = "repeats an earlier claim"
    elif not claim.citations:
        reason = "cites no source"
    else:
        unknown = [key for key in claim.citations if key not in facts]
        if unknown:
            verb = "which is" if len(unknown) == 1 else "which are"
            return DroppedClaim(claim, f"cites {_join(unknown)}, {verb} not in the record", severity="medium")
    seen.add(fingerprint)
    return DroppedClaim(claim, reason) if reason else None


def _record_of(ctx: ClinicalContext) -> RecordIndex:
    return RecordIndex.of(ctx.resources.values(), ctx.note_texts)


def _evidence(fact: Fact, record: RecordIndex) -> SourceEvidence:
    """The whole cited resource when the record holds it; else what the fact itself states."""
    found = record.evidence(fact.source.reference)
    if found is not None:
        return found
    return evidence_of_fact(fact)


def evidence_of_fact(fact: Fact) -> SourceEvidence:
    """Evidence from a fact alone (a context built without its resources): its text, label,
    value, date and status."""
    rtype = {
        "patient": "Patient", "condition": "Condition", "medication": "MedicationRequest",
        "allergy": "AllergyIntolerance", "encounter": "Encounter", "observation": "Observation",
        "procedure": "Procedure", "immunization": "Immunization", "note": "DocumentReference",
    }[fact.kind]  # fmt: skip
    text = " ".join(p for p in (fact.display, fact.value) if p)
    resource: dict[str, Any] = {"resourceType": rtype, "id": fact.source.id, "code": {"text": text}}
    base = evidence_of(resource, note_text=fact.text)
    status = {"active": "active", "resolved": "inactive", "inactive": "inactive", "stopped": "inactive",
              "completed": "inactive"}.get(fact.status or "")  # fmt: skip
    dates = dict(base.dates)
    if fact.date:
        dates["fact"] = frozenset(widen(fact.date))
    status = status if rtype in _HAS_STATUS else None
    return replace(base, dates=dates, status=status, is_note=fact.kind == "note")


_HAS_STATUS = frozenset({"Condition", "MedicationRequest", "AllergyIntolerance"})


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"
