"""`chartbrief recall`: every summary a model file or a prompt version produced, and putting the unreviewed
ones under recall.

Where summaries are found:

- chartbrief's database: the `summaries` rows of that model sha256 or prompt version;
- the FHIR server, through what the writer put there (fhir_adapters.write.draft): the chartbrief Devices
  (identifier system `urn:chartbrief:model-sha256`, the model file's sha256 in `Device.version`), the
  AI-Provenance resources whose agent is such a Device (`Provenance?agent=Device/<id>`), the prompt they
  name (extension `urn:chartbrief:prompt`, `summary/v1 sha256:...`) and the DocumentReference they target.

The recall marker (`--mark`, built in `service.governance.recall_rules`), on a DocumentReference that is
`status=current, docStatus=preliminary`:

- `meta.tag` `urn:chartbrief:recall|under-recall` (searchable: `DocumentReference?_tag=...`), and
- an extension `urn:chartbrief:recall` with `criterion` (`model-sha256:<hex>` or `prompt:summary/v1`),
  `reason` (the operator's text) and `recorded` (when).

The document stays preliminary (awaiting review) and AI-labelled; the review screen shows the recall and
its reason above the draft. A second `--mark` for the same criterion changes nothing. Approved (final)
summaries are listed for a clinician to re-check and are never changed; rejected and superseded ones are
listed as they are. Every update is a PUT guarded by If-Match with the version just read; every change
is audited (`recall`, actor `system`), plus one `recall.run` row with the counts.

```
RecallError        bad input: no criterion or both, a sha prefix too short or not unique, --mark
                   without a reason or without a FHIR server (the CLI's exit 2)
```
FHIR errors pass through (`fhir_adapters.errors`). What this module must not do: change a final,
rejected or superseded document, write without If-Match, or log a reason or any clinical content (ids and
counts only).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
from sqlalchemy.orm import Session, sessionmaker

from fhir_adapters.errors import FhirConflict, FhirNotFound
from fhir_adapters.write.draft import MODEL_IDENTIFIER_SYSTEM
from service.db import audit
from service.governance.recall_rules import (
    Criterion,
    RecallError,
    State,
    author_devices,
    device_sha256,
    is_chartbrief_device,
    is_marked,
    markable,
    marked_document,
    prompt_of,
    resolve_model,
    review_state,
    subject_patient,
    target_document,
    version_of,
)
from service.governance.records import SummaryRecord, summaries

JsonObject = dict[str, Any]

_log = structlog.get_logger(__name__)
MAX_REASON_CHARS = 500
# Writes that lost an If-Match race are retried after a fresh read this many times in all.
MARK_ATTEMPTS = 2


class RecallClient(Protocol):
    """What recall needs of a FHIR client (`fhir_adapters.client.FhirClient` has it)."""

    base_url: str

    async def search_all(
        self, resource_type: str, params: Mapping[str, str] | None = None
    ) -> list[JsonObject]: ...

    async def read(self, resource_type: str, id: str) -> JsonObject: ...

    async def update(self, resource: JsonObject, *, if_match: str | None = None) -> JsonObject: ...


# -- the report ------------------------------------------------------------------------------------


@dataclass
class RecalledSummary:
    """One summary of the recalled model or prompt, where it was found, how it stands, what recall did."""

    document_reference: str | None
    patient_id: str | None
    fhir_base: str | None
    model_sha256: str | None = None
    prompt: str | None = None
    created: str | None = None
    found_in: list[str] = field(default_factory=list)  # database | fhir
    status: str | None = None
    doc_status: str | None = None
    version: str | None = None
    state: State = "not-checked"
    # marked | already-marked | to-mark (no --mark) | re-check (approved) | none | conflict
    action: str = "none"

    def to_json(self) -> dict[str, Any]:
        return {
            "document_reference": self.document_reference,
            "patient": self.patient_id,
            "fhir_base": self.fhir_base,
            "model_sha256": self.model_sha256,
            "prompt": self.prompt,
            "created": self.created,
            "found_in": sorted(self.found_in),
            "status": self.status,
            "docStatus": self.doc_status,
            "version": self.version,
            "state": self.state,
            "action": self.action,
        }


@dataclass
class RecallReport:
    criterion: Criterion
    fhir_base: str | None
    mark: bool
    summaries: list[RecalledSummary]

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for item in self.summaries:
            counts[item.action] = counts.get(item.action, 0) + 1
        return dict(sorted(counts.items()))

    def to_json(self) -> dict[str, Any]:
        return {
            "criterion": self.criterion.label,
            "fhir_base": self.fhir_base,
            "mark": self.mark,
            "total": len(self.summaries),
            "actions": self.counts(),
            "to_recheck": [s.document_reference for s in self.summaries if s.action == "re-check"],
            "summaries": [s.to_json() for s in self.summaries],
        }


# -- IO ------------------------------------------------------------------------------------------------


async def _chartbrief_devices(client: RecallClient) -> list[JsonObject]:
    found = await client.search_all("Device", {"identifier": f"{MODEL_IDENTIFIER_SYSTEM}|"})
    # Filter again: a server that ignores the parameter returns every Device.
    return [d for d in found if is_chartbrief_device(d) and d.get("id")]


async def _server_summaries(
    client: RecallClient, criterion: Criterion, devices: Sequence[JsonObject]
) -> dict[str, RecalledSummary]:
    """The server's summaries of the criterion, by `DocumentReference/<id>`, found through Provenance."""
    found: dict[str, RecalledSummary] = {}
    for device in devices:
        sha = device_sha256(device)
        if criterion.kind == "model" and not criterion.matches_sha(sha):
            continue
        device_ref = f"Device/{device['id']}"
        provenances = await client.search_all("Provenance", {"agent": device_ref})
        for prov in provenances:
            prompt = prompt_of(prov)
            doc_ref = target_document(prov)
            if prompt is None or doc_ref is None or device_ref not in author_devices(prov):
                continue  # not an AI-Provenance of this Device (a review Provenance, another agent)
            if criterion.kind == "prompt" and not criterion.matches_prompt(*prompt):
                continue
            found.setdefault(
                doc_ref,
                RecalledSummary(
                    document_reference=doc_ref,
                    patient_id=None,
                    fhir_base=client.base_url,
                    model_sha256=sha,
                    prompt="/".join(prompt),
                    created=str(prov.get("recorded")) if prov.get("recorded") else None,
                    found_in=["fhir"],
                ),
            )
    return found


def _from_row(row: SummaryRecord) -> RecalledSummary:
    return RecalledSummary(
        document_reference=row.document_reference,
        patient_id=row.patient_id,
        fhir_base=row.fhir_base,
        model_sha256=row.model_sha256,
        prompt=f"{row.prompt_id}/{row.prompt_version}",
        created=row.created_at.isoformat(timespec="seconds"),
        found_in=["database"],
        state="not-written" if not row.document_reference else "not-checked",
    )


async def _settle(
    client: RecallClient,
    db: sessionmaker[Session],
    item: RecalledSummary,
    criterion: Criterion,
    *,
    mark: bool,
    reason: str,
    when: str,
    actor: str,
) -> None:
    """Read the document, put it under recall if it is an unreviewed draft and --mark asks; else list it."""
    assert item.document_reference is not None
    rtype, _, rid = item.document_reference.partition("/")
    for attempt in range(1, MARK_ATTEMPTS + 1):
        try:
            doc = await client.read(rtype, rid)
        except FhirNotFound:
            item.state, item.action = "missing", "none"
            return
        item.status, item.doc_status, item.version = doc.get("status"), doc.get("docStatus"), version_of(doc)
        item.patient_id = item.patient_id or subject_patient(doc)
        item.state = review_state(doc)
        if item.state == "approved":
            item.action = "re-check"
            return
        if not markable(doc):
            item.action = "none"
            return
        if is_marked(doc, criterion):
            item.action = "already-marked"
            return
        if not mark:
            item.action = "to-mark"
            return
        version = version_of(doc)
        if version is None:
            # Without a version there is no safe If-Match: never overwrite blindly.
            item.action = "conflict"
            return
        try:
            saved = await client.update(
                marked_document(doc, criterion, reason, when), if_match=f'W/"{version}"'
            )
        except FhirConflict:
            _log.info("recall.conflict", document_reference=item.document_reference, attempt=attempt)
            item.action = "conflict"
            continue
        item.version, item.state, item.action = version_of(saved), "under-recall", "marked"
        audit.record(
            db,
            actor=actor,
            action="recall",
            outcome="ok",
            patient_id=item.patient_id,
            resource=item.document_reference,
            detail=f"under recall ({criterion.short_label}), version {version} -> {item.version}",
        )
        return
    audit.record(
        db,
        actor=actor,
        action="recall",
        outcome="error",
        patient_id=item.patient_id,
        resource=item.document_reference,
        detail="stale version: the draft kept changing, not marked",
    )


async def run_recall(
    criterion: Criterion,
    *,
    db: sessionmaker[Session],
    client: RecallClient | None,
    mark: bool = False,
    reason: str | None = None,
    when: str,
    actor: str = "system",
) -> RecallReport:
    """Find every summary of `criterion` (database and FHIR server), and with `mark` put the unreviewed
    ones under recall. `when` is the instant recorded in the marker (ISO 8601, zoned)."""
    text = " ".join((reason or "").split())[:MAX_REASON_CHARS]
    if mark and not text:
        raise RecallError("--mark needs --reason TEXT: the reviewing clinician is shown why")
    if mark and client is None:
        raise RecallError(
            "--mark needs the FHIR server: pass --fhir-base URL or set CHARTBRIEF_FHIR__BASE_URL"
        )
    rows = summaries(db)
    devices = await _chartbrief_devices(client) if client is not None else []
    known = [r.model_sha256 for r in rows] + [s for s in map(device_sha256, devices) if s]
    criterion = resolve_model(criterion, known)

    items: dict[tuple[str | None, str], RecalledSummary] = {}
    server = client.base_url if client is not None else None
    if client is not None:
        for doc_ref, item in (await _server_summaries(client, criterion, devices)).items():
            items[(server, doc_ref)] = item
    for row in rows:
        if not criterion.matches_summary(row):
            continue
        key = (row.fhir_base, row.document_reference or f"summary:{row.id}")
        if key in items:
            item = items[key]
            item.found_in.append("database")
            item.patient_id = item.patient_id or row.patient_id
            item.created = _from_row(row).created
        else:
            items[key] = _from_row(row)

    for (base, _ref), item in sorted(items.items(), key=lambda kv: (kv[0][0] or "", kv[0][1])):
        if client is None or base != server or item.document_reference is None:
            continue  # another server's summary, or a dry run: listed as found
        await _settle(client, db, item, criterion, mark=mark, reason=text, when=when, actor=actor)

    report = RecallReport(
        criterion=criterion,
        fhir_base=server,
        mark=mark,
        summaries=sorted(items.values(), key=lambda s: (s.created or "", s.document_reference or "")),
    )
    counts = report.counts()
    audit.record(
        db,
        actor=actor,
        action="recall.run",
        outcome="ok",
        resource=None,
        detail=(
            f"{criterion.short_label}: {len(report.summaries)} found, {counts.get('marked', 0)} marked, "
            f"{counts.get('re-check', 0)} approved to re-check"
        ),
    )
    _log.info(
        "recall.done",
        criterion=criterion.kind,
        found=len(report.summaries),
        **{k.replace("-", "_"): v for k, v in counts.items()},
    )
    return report
