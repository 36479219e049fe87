"""Pure parts of the `patient-view` service: discovery document, request checks, the card.

Nothing here reads the network or the database: the route hands in the request body, the latest
chartbrief DocumentReference (or None) and the Patient, and gets back the CDS Hooks answer.

State of a summary: `approved` when the DocumentReference's docStatus is final, `draft` for
preliminary; `stale` when the record changed after the summary was written: a resource the summary
reads was updated since (service.cds.freshness asks the FHIR server, and the card names the changed
types), or, when the server could not be asked, the Patient's meta.lastUpdated is later than the
document's date. The review screen's claim-by-claim check stays the authority.

What it must not do: put a token, a name or a birth date in a card's uuid, or invent a summary
line that the stored document does not hold.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from fhir_adapters.errors import ChartbriefError
from service.structured import CONFLICTS_TITLE, FLAGGED, SYNOPSIS

SERVICE_ID = "chartbrief-summary"
HOOK = "patient-view"
FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
State = Literal["approved", "draft", "stale"]


class HookRequestError(ChartbriefError, ValueError):
    """A hook request the spec answers with 400 (malformed) or 412 (missing prefetch/authorization)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def discovery(identifier_system: str) -> dict[str, Any]:
    """The `GET /cds-services` document: one patient-view service with its prefetch templates."""
    return {
        "services": [
            {
                "hook": HOOK,
                "id": SERVICE_ID,
                "title": "chartbrief summary",
                "description": "The latest chartbrief summary of the patient: its synopsis, whether it is "
                "approved, a draft or out of date, and its flagged values and conflicts.",
                "prefetch": {
                    "patient": "Patient/{{context.patientId}}",
                    "summary": "DocumentReference?patient={{context.patientId}}"
                    f"&identifier={identifier_system}|&_sort=-date&_count=1",
                },
                "usageRequirements": "Register with a JWKS URL; chartbrief checks iss, aud, exp and jti.",
            }
        ]
    }


@dataclass(frozen=True)
class HookRequest:
    hook_instance: str
    patient_id: str
    fhir_server: str | None
    access_token: str | None
    prefetch: dict[str, Any]


def parse_request(body: Any) -> HookRequest:
    """The fields chartbrief uses, or `HookRequestError` naming the field that is wrong."""
    if not isinstance(body, dict):
        raise HookRequestError("the request body must be a JSON object")
    if body.get("hook") != HOOK:
        raise HookRequestError(f"hook must be {HOOK!r}")
    instance = body.get("hookInstance")
    if not isinstance(instance, str) or not instance:
        raise HookRequestError("hookInstance is required")
    context = body.get("context")
    patient = context.get("patientId") if isinstance(context, dict) else None
    if not isinstance(patient, str) or not FHIR_ID.fullmatch(patient):
        raise HookRequestError("context.patientId is required and must be a FHIR id")
    server = body.get("fhirServer")
    auth = body.get("fhirAuthorization")
    token = None
    if auth is not None:
        if not isinstance(auth, dict) or not isinstance(auth.get("access_token"), str):
            raise HookRequestError(
                "fhirAuthorization.access_token is required when fhirAuthorization is sent"
            )
        if not isinstance(server, str):
            raise HookRequestError("fhirServer is required with fhirAuthorization")
        token = auth["access_token"]
    prefetch = body.get("prefetch") or {}
    if not isinstance(prefetch, dict):
        raise HookRequestError("prefetch must be an object")
    return HookRequest(instance, patient, server if isinstance(server, str) else None, token, prefetch)


def latest_from_prefetch(prefetch: Mapping[str, Any]) -> tuple[bool, dict[str, Any] | None]:
    """(given, document): whether the summary prefetch was sent, and its first DocumentReference."""
    bundle = prefetch.get("summary")
    if not isinstance(bundle, dict):
        return False, None
    if bundle.get("resourceType") == "DocumentReference":
        return True, bundle
    for entry in bundle.get("entry") or []:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict) and resource.get("resourceType") == "DocumentReference":
            return True, resource
    return True, None


def stored_summary(doc: Mapping[str, Any]) -> dict[str, Any]:
    for content in doc.get("content") or []:
        attachment = content.get("attachment") if isinstance(content, dict) else None
        if isinstance(attachment, dict) and str(attachment.get("contentType", "")).startswith(
            "application/json"
        ):
            try:
                data = json.loads(base64.b64decode(str(attachment.get("data", "")), validate=True))
            except (binascii.Error, ValueError):
                return {}
            return data if isinstance(data, dict) else {}
    return {}


def _lines(data: Mapping[str, Any], title: str) -> list[str]:
    for section in data.get("sections") or []:
        if isinstance(section, dict) and section.get("title") == title:
            return [
                str(line.get("text", "")) for line in section.get("lines") or [] if isinstance(line, dict)
            ]
    return []


@dataclass(frozen=True)
class Freshness:
    """`checked`: every type was asked and answered. `changed`: resource type -> changed resources
    found (capped per type). `reason`: why it was not checked."""

    checked: bool
    changed: Mapping[str, int] = field(default_factory=dict)
    reason: str = ""

    @property
    def stale(self) -> bool:
        return bool(self.changed)


def describe(changed: Mapping[str, int]) -> str:
    """The changes as the card names them.

    >>> describe({"Observation": 2, "Condition": 1})
    '2 Observation, 1 Condition'
    """
    return ", ".join(f"{n} {kind}" for kind, n in changed.items())


def instant_of(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def state_of(
    doc: Mapping[str, Any], patient: Mapping[str, Any] | None, freshness: Freshness | None = None
) -> State:
    """`stale` from the FHIR server's answer when it was asked, else from the Patient's lastUpdated.

    >>> summary = {"docStatus": "final", "date": "2026-03-01T10:00:00Z"}
    >>> later = {"meta": {"lastUpdated": "2026-03-02T08:00:00Z"}}
    >>> state_of(summary, later), state_of(summary, later, Freshness(checked=True))
    ('stale', 'approved')
    >>> state_of(summary, None, Freshness(checked=True, changed={"Observation": 1}))
    'stale'
    """
    if freshness is not None and freshness.checked:
        stale = freshness.stale
    else:
        written = instant_of(doc.get("date"))
        changed = instant_of(((patient or {}).get("meta") or {}).get("lastUpdated"))
        stale = bool(written and changed and changed > written)
    if stale:
        return "stale"
    return "approved" if doc.get("docStatus") == "final" else "draft"


def age_text(doc: Mapping[str, Any], now: datetime) -> str:
    written = instant_of(doc.get("date"))
    if written is None:
        return "of unknown age"
    minutes = max(0, int((now - written).total_seconds() // 60))
    if minutes < 120:
        return f"{minutes} min old"
    if minutes < 48 * 60:
        return f"{minutes // 60} h old"
    return f"{minutes // 1440} days old"


def card_uuid(summary_id: str | None) -> str:
    """A card id that names the summary row it shows (`<row id>.<random>`), so feedback finds it."""
    return f"{summary_id or 'none'}.{uuid.uuid4().hex[:12]}"


def summary_card(
    doc: Mapping[str, Any],
    patient: Mapping[str, Any] | None,
    *,
    summary_id: str | None,
    launch_url: str,
    now: datetime,
    queued: bool,
    freshness: Freshness | None = None,
) -> dict[str, Any]:
    data = stored_summary(doc)
    state = state_of(doc, patient, freshness)
    synopsis = next(iter(_lines(data, SYNOPSIS)), "") or "chartbrief summary"
    flagged = _lines(data, FLAGGED)
    conflicts = [
        f"{c.get('record', '')} / {c.get('note', '')}"
        for c in data.get("conflicts") or []
        if isinstance(c, dict)
    ] or _lines(data, CONFLICTS_TITLE)
    detail = [f"**State:** {state}, {age_text(doc, now)}."]
    if freshness is not None and freshness.stale:
        detail.append(f"Changed in the record since it was written: {describe(freshness.changed)}.")
    elif freshness is not None and not freshness.checked:
        detail.append(f"Whether the record changed since it was written was not checked: {freshness.reason}.")
    if state == "stale" and queued:
        detail.append("The record changed since; an updated summary is being prepared.")
    if flagged:
        detail.append("**Flagged values**\n\n" + "\n".join(f"- {line}" for line in flagged))
    if conflicts:
        detail.append("**Conflicts**\n\n" + "\n".join(f"- {line}" for line in conflicts))
    warn = state == "stale" or bool(flagged) or bool(conflicts)
    return {
        "uuid": card_uuid(summary_id),
        "summary": synopsis[:140],
        "detail": "\n\n".join(detail),
        "indicator": "warning" if warn else "info",
        "source": {"label": "chartbrief"},
        "links": [{"label": "Open the chartbrief review", "url": launch_url, "type": "smart"}],
    }


def preparing_card(launch_url: str, *, queued: bool) -> dict[str, Any]:
    text = "A chartbrief summary is being prepared" if queued else "No chartbrief summary yet"
    detail = (
        "It will be ready on a later visit to this chart."
        if queued
        else "chartbrief is busy; open it to make one."
    )
    return {
        "uuid": card_uuid(None),
        "summary": text,
        "detail": detail,
        "indicator": "info",
        "source": {"label": "chartbrief"},
        "links": [{"label": "Open chartbrief", "url": launch_url, "type": "smart"}],
    }
