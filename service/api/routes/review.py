"""The clinician's review screen: the summary as it is made, its sources, and the four actions.

```
GET  /review                the page; its script opens /review/stream
GET  /review?doc=<id>       one stored draft of the session's patient, rendered on the server
GET  /review/stream         server-sent events: status, structured, token..., narrative, draft, done
                            (it writes a draft, so it needs the CSRF token too, as a query parameter)
POST /review/approve        docStatus=final, the clinician as author and Provenance verifier
POST /review/edit           the clinician's text as a new version, then approve
POST /review/reject         entered-in-error; the optional reason is kept for monitoring only
POST /review/regenerate     a fresh draft that supersedes this one
```

The four actions are one route (`review_action`) and one table (`STEPS`): the same form checks,
CSRF check and failure handling for each, and an entry per action saying what it runs.

Every POST carries the session's CSRF token and a same-origin Origin (when the browser sends
one); every action is audited by `service.review`; a session only ever touches its own patient.
When a draft of exactly the same inputs, prompt and model is already in the chart, the stream
shows it instead of running the model again.

What it must not do: show a dropped statement as part of the summary, show model text before it
is checked except in the marked "not checked yet" box, or act for another patient.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session, sessionmaker
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask

from fhir_adapters.client import FhirClient
from fhir_adapters.errors import FhirAuthError
from fhir_adapters.write.review import ReviewConflict, ReviewError, ReviewForbidden, ReviewNotFound
from fhir_adapters.write.send import read_draft
from service import review as actions
from service.api.deps import AdmissionDep, CsrfSecretDep, DatabaseDep, ModelDep, SettingsDep, TemplatesDep
from service.api.errors import (
    BadRequest,
    Forbidden,
    TooManyRequests,
)
from service.api.limits import Place, WorkAdmission, WorkKind
from service.api.security import csrf_ok, same_origin_request
from service.api.sessions import ReviewSession, ReviewSessionDep, SessionServicesDep
from service.api.views import (
    DraftView,
    SourceView,
    banner_view,
    checked_draft_view,
    cited_keys,
    draft_view,
    model_line,
    narrative_view,
    source_views,
    stored_source_views,
)
from service.db import audit
from service.db.store import in_thread
from service.errors import UNEXPECTED, fault_of
from service.governance.recall_rules import recall_notice
from service.pipeline import Services, prepare_summary
from service.streaming import Finished, Prepared, Token, stream_summary

log = structlog.get_logger(__name__)

_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")

router = APIRouter(tags=["review screen"], include_in_schema=False)

NOTICES = {
    "approved": "Approved. The summary is now final in the chart, with you as its verifier.",
    "edited": "Your edit was saved as a new version and approved.",
    "rejected": "Rejected. The draft is marked entered-in-error and will not be used.",
    "regenerated": "A new draft was written; it replaces the previous one.",
    "unchanged": "The record has not changed since the last draft: there is nothing new to write.",
}
ERRORS = {
    "conflict": "The draft changed since you opened it (someone else may have acted on it). "
    "Review it again below.",
    "refused": "This draft cannot be changed in its current state.",
    "not-chartbrief": "That document is not a chartbrief draft: nothing was changed.",
    "stale": "Some statements in this draft are no longer supported by the current record: it was not "
    "approved. Regenerate it, or reject it.",
    "no-user": "The EHR did not say who you are (no fhirUser), so chartbrief cannot record your review. "
    "Launch again with the openid and fhirUser scopes.",
}
FormField = Annotated[str, Form()]
OptionalFormField = Annotated[str | None, Form()]


# -- rendering ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Page:
    """The templates, bound to the request they answer (fragments are rendered for one page)."""

    templates: Jinja2Templates
    request: Request

    def render(self, name: str, **context: Any) -> str:
        return self.templates.get_template(name).render(request=self.request, **context)


def _sse(event: str, **data: Any) -> dict[str, str]:
    return {"event": event, "data": json.dumps(data, ensure_ascii=False)}


def _new_sources(views: Iterable[SourceView], sent: set[str]) -> list[SourceView]:
    fresh = [v for v in views if v.key not in sent]
    sent.update(v.key for v in fresh)
    return fresh


async def _banner(session: ReviewSession, client: FhirClient) -> Any:
    if not session.data.need_patient_banner:
        return None
    return banner_view(await client.read("Patient", session.patient_id))


def _draft_fragments(page: _Page, session: ReviewSession, draft: DraftView) -> dict[str, str]:
    return {
        "id": draft.id,
        "html": page.render("_draft.html", draft=draft),
        "actions": page.render("_actions.html", draft=draft, csrf=session.csrf),
    }


async def _audit(
    db: sessionmaker[Session],
    request: Request,
    session: ReviewSession,
    action: str,
    outcome: audit.Outcome,
    resource: str | None,
    detail: str,
) -> None:
    """One audit row for what the session did or was refused, in a worker thread."""
    await in_thread(
        audit.record,
        db,
        actor=session.actor,
        action=action,
        outcome=outcome,
        patient_id=session.patient_id,
        resource=resource,
        detail=detail,
        request_id=request.state.request_id,
    )


# -- the page -------------------------------------------------------------------------------------


@router.get("/review", response_class=HTMLResponse, name="review_page")
async def review_page(
    request: Request,
    session: ReviewSessionDep,
    services: SessionServicesDep,
    templates: TemplatesDep,
    db: DatabaseDep,
    model: ModelDep,
    doc: str | None = None,
    notice: str | None = None,
    error: str | None = None,
) -> Response:
    svc = await services.open(session)
    banner = await _banner(session, svc.client)
    context: dict[str, Any] = {
        "banner": banner,
        "csrf": session.csrf,
        "notice": NOTICES.get(notice or ""),
        "error": ERRORS.get(error or ""),
        "stream_url": None,
        "draft": None,
        "structured": None,
        "narrative": None,
        "sources": [],
        "status_text": "",
        "model_line": model_line(model.engine.identity if model.engine is not None else None),
    }
    if session.fhir_user is None:
        context["error"] = ERRORS["no-user"]
    if doc is None:
        # The stream writes a draft to the chart, so it is guarded like a form: it needs the token.
        context["stream_url"] = f"{request.url_for('review_stream').path}?csrf_token={session.csrf}"
        context["status_text"] = "Reading the record..."
    else:
        context.update(await _stored_draft_context(db, request, session, svc, _clean_id(doc, "doc")))
    return templates.TemplateResponse(request, "review.html", context)


def _view_refusal(exc: Exception) -> tuple[audit.Outcome, str] | None:
    """A refused read in a one-patient session is an attempt to see what it may not; other failures
    are not the viewer's doing and leave no row."""
    if isinstance(exc, ReviewForbidden):
        return "denied", "another patient"
    if isinstance(exc, FhirAuthError):
        return "denied", "refused by the EHR"
    return None


async def _stored_draft_context(
    db: sessionmaker[Session], request: Request, session: ReviewSession, svc: Services, doc_id: str
) -> dict[str, Any]:
    async with audit.audited(
        db,
        actor=session.actor,
        action="view",
        failure=_view_refusal,
        patient_id=session.patient_id,
        resource=f"DocumentReference/{doc_id}",
        request_id=request.state.request_id,
    ) as entry:
        doc, key = await read_draft(
            svc.client,
            doc_id,
            identifier_system=svc.settings.writer.identifier_system,
            patient_id=session.patient_id,
        )
        prep = await prepare_summary(svc, session.patient_id, encounter_id=session.encounter_id)
        found = await actions.check_draft(svc, doc, key, prep.ctx)
        draft = checked_draft_view(draft_view(doc), found.problems, found.stale)
        # The audit trail is where someone looks for who planted what: the row says so.
        entry.detail = f"version {draft.version}" if found.genuine else "not a chartbrief draft"
    return {
        "draft": draft,
        "recall": recall_notice(doc) if draft.genuine else None,
        "structured": draft.structured,
        "narrative": draft.narrative,
        "sources": stored_source_views(draft.sources, prep.ctx),
        "status_text": "",
    }


# -- the stream -----------------------------------------------------------------------------------


async def _find_by_key(client: FhirClient, system: str, key: str) -> dict[str, Any] | None:
    found = await client.search_all("DocumentReference", {"identifier": f"{system}|{key}"})
    for doc in found:
        # A server that ignores the identifier parameter returns everything: check it here.
        if any(i.get("system") == system and i.get("value") == key for i in doc.get("identifier") or []):
            return doc
    return None


@router.get("/review/stream", name="review_stream")
async def review_stream(
    request: Request,
    session: ReviewSessionDep,
    services: SessionServicesDep,
    templates: TemplatesDep,
    db: DatabaseDep,
    csrf_secret: CsrfSecretDep,
    admission: AdmissionDep,
    csrf_token: str | None = None,
) -> Response:
    if not csrf_ok(csrf_secret, session.data.id, csrf_token):
        await _audit(db, request, session, "summarize", "denied", None, "CSRF check failed")
        raise Forbidden("this summary was not requested from chartbrief's own page; reload the page")
    place = await _take_place(admission, db, request, session, "summarize", None)
    try:
        svc = await services.open(session)
    except BaseException:
        place.release()
        raise
    events = _held(place, _review_events(_Page(templates, request), db, session, svc))
    # The background task covers a response whose body is never iterated (HEAD, a send that fails
    # first); the generator's own exit covers a browser that goes away mid-stream.
    return EventSourceResponse(events, ping=15, background=BackgroundTask(place.release))


def review_client(session: ReviewSession) -> str:
    """The session as a client of the work bounds: a digest, since the id itself is the cookie."""
    return "session:" + hashlib.sha256(session.data.id.encode("utf-8")).hexdigest()[:16]


async def _take_place(
    admission: WorkAdmission,
    db: sessionmaker[Session],
    request: Request,
    session: ReviewSession,
    action: str,
    resource: str | None,
) -> Place:
    """A place for the session's model work, or the 429 - audited with the counts, nothing else."""
    kind: WorkKind = "regenerate" if action == "regenerate" else "review-stream"
    try:
        return admission.admit(review_client(session), kind)
    except TooManyRequests as exc:
        await _audit(db, request, session, action, "denied", resource, exc.message)
        raise


async def _held(place: Place, events: AsyncGenerator[dict[str, str], None]) -> AsyncIterator[dict[str, str]]:
    """`events`, with `place` given back when they end, fail, or the browser goes away."""
    try:
        async with aclosing(events) as inner:
            async for item in inner:
                yield item
        place.finish()
    finally:
        place.release()


async def _review_events(
    page: _Page, db: sessionmaker[Session], session: ReviewSession, svc: Services
) -> AsyncGenerator[dict[str, str], None]:
    sent: set[str] = set()
    system = svc.settings.writer.identifier_system
    try:
        async with aclosing(
            stream_summary(svc, session.patient_id, encounter_id=session.encounter_id)
        ) as events:
            async for event in events:
                if isinstance(event, Prepared):
                    prep = event.prep
                    structured_sources = source_views(prep.ctx, prep.structured.cited_keys())
                    yield _sse(
                        "structured",
                        html=page.render("_structured.html", structured=prep.structured),
                        sources=page.render("_sources.html", sources=_new_sources(structured_sources, sent)),
                    )
                    existing = await _find_by_key(svc.client, system, prep.idempotency_key)
                    if existing is not None:
                        found = await actions.check_draft(svc, existing, prep.idempotency_key, prep.ctx)
                        for item in _existing_events(page, session, existing, found, prep.ctx, sent):
                            yield item
                        return
                    yield _sse("status", text="The model is writing the narrative...")
                elif isinstance(event, Token):
                    yield _sse("token", text=event.text)
                elif isinstance(event, Finished):
                    for item in await _finished_events(page, db, session, svc, event, sent):
                        yield item
    except Exception as exc:
        fault = fault_of(exc)
        if fault is UNEXPECTED:
            log.error("review.stream_failed", error=type(exc).__name__)
            yield _sse("failed", text="chartbrief failed while making the summary; the error was logged.")
            return
        log.warning("review.stream_failed", error=type(exc).__name__)
        yield _sse("failed", text=fault.says(exc))


def _existing_events(
    page: _Page,
    session: ReviewSession,
    doc: Mapping[str, Any],
    found: actions.DraftCheck,
    ctx: Any,
    sent: set[str],
) -> list[dict[str, str]]:
    draft = checked_draft_view(draft_view(doc), found.problems, found.stale)
    if not draft.genuine:
        # The writer would find this document by its identifier and take it for the summary, so
        # nothing can be written while it is there: say so instead of showing what it holds.
        return [
            _sse("draft", **_draft_fragments(page, session, draft)),
            _sse(
                "done",
                text=f"The chart holds {draft.reference} under this summary's identifier, but it is not "
                "a chartbrief draft: nothing was written. Ask for it to be removed.",
            ),
        ]
    events = []
    if draft.narrative is not None:
        events.append(
            _sse(
                "narrative",
                html=page.render("_narrative.html", narrative=draft.narrative),
                sources=page.render(
                    "_sources.html", sources=_new_sources(stored_source_views(draft.sources, ctx), sent)
                ),
            )
        )
    events.append(_sse("draft", **_draft_fragments(page, session, draft)))
    events.append(
        _sse("done", text="The chart already holds the summary of this record: showing the saved draft.")
    )
    return events


async def _finished_events(
    page: _Page,
    db: sessionmaker[Session],
    session: ReviewSession,
    svc: Services,
    event: Finished,
    sent: set[str],
) -> list[dict[str, str]]:
    result = event.result
    narrative = narrative_view(result.kept, result.dropped, result.notes_read)
    keys = cited_keys(None, narrative)
    events = [
        _sse(
            "narrative",
            html=page.render("_narrative.html", narrative=narrative),
            sources=page.render(
                "_sources.html", sources=_new_sources(source_views(event.prep.ctx, keys), sent)
            ),
        )
    ]
    if result.write is None:
        events.append(_sse("done", text="Summary made (not saved: dry run)."))
        return events
    doc_id = result.write.document_reference.split("/", 1)[1]
    detail = "new draft" if result.write.created else "draft already in the chart"
    await _audit(db, page.request, session, "summarize", "ok", result.write.document_reference, detail)
    draft = draft_view(await svc.client.read("DocumentReference", doc_id))
    events.append(_sse("draft", **_draft_fragments(page, session, draft)))
    kept, dropped = len(result.kept), len(result.dropped)
    events.append(
        _sse(
            "done",
            text=f"Draft saved to the chart as {draft.reference} (preliminary, not reviewed). "
            f"{kept} model statement(s) kept, {dropped} removed by the source check.",
        )
    )
    return events


# -- the actions ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActionForm:
    """What an action's form sent, once its document id is checked."""

    doc_id: str
    version: str | None
    markdown: str | None  # edit
    reason: str | None  # reject


@dataclass(frozen=True)
class ActionCall:
    """One action as the route runs it: the session, its `Services`, the form, the audit database."""

    svc: Services
    session: ReviewSession
    form: ActionForm
    db: sessionmaker[Session]
    request_id: str


@dataclass(frozen=True)
class Step:
    """A review action's entry: what it runs (returning where the clinician goes next) and the form
    fields it cannot do without."""

    run: Callable[[ActionCall], Awaitable[RedirectResponse]]
    required: tuple[str, ...] = ()
    model_work: bool = False  # runs the model: takes a place within the work bounds first


def _reviewed(action: actions.ReviewAction, notice: str) -> Step:
    """The route's entry for one of `service.review.ACTIONS`: run it, then show the same draft."""

    async def run(call: ActionCall) -> RedirectResponse:
        form = call.form
        await action(
            call.svc,
            form.doc_id,
            patient_id=call.session.patient_id,
            actor=call.session.actor,
            db=call.db,
            version=form.version or None,
            markdown=form.markdown.replace("\r\n", "\n") if form.markdown is not None else None,
            reason=form.reason or None,
            request_id=call.request_id,
            encounter_id=call.session.encounter_id,
        )
        return _back(form.doc_id, notice=notice)

    return Step(run, required=("markdown",) if action.measures_edit else ())


async def _regenerate(call: ActionCall) -> RedirectResponse:
    """A fresh draft; the clinician goes to it, or stays when the record gave nothing new."""
    result = await actions.regenerate(
        call.svc,
        call.session.patient_id,
        encounter_id=call.session.encounter_id,
        previous_doc=call.form.doc_id,
        actor=call.session.actor,
        request_id=call.request_id,
        db=call.db,
    )
    write = result.write
    if write is None or not write.created:
        return _back(call.form.doc_id, notice="unchanged")
    return _back(write.document_reference.split("/", 1)[1], notice="regenerated")


STEPS: dict[actions.Action, Step] = {
    "approve": _reviewed(actions.approve, "approved"),
    "edit": _reviewed(actions.edit, "edited"),
    "reject": _reviewed(actions.reject, "rejected"),
    "regenerate": Step(_regenerate, model_work=True),
}


def _back(doc_id: str, *, notice: str | None = None, error: str | None = None) -> RedirectResponse:
    query = f"?doc={doc_id}"
    if notice:
        query += f"&notice={notice}"
    if error:
        query += f"&error={error}"
    return RedirectResponse(f"/review{query}", status_code=303)


def _clean_id(value: str, field: str = "document_reference") -> str:
    """A DocumentReference id (optionally as `DocumentReference/<id>`), checked whole: `fullmatch`,
    because `$` would also accept an id followed by a newline."""
    doc_id = value.removeprefix("DocumentReference/")
    if not _FHIR_ID.fullmatch(doc_id):
        raise BadRequest(f"{field} is not a valid FHIR id (1-64 letters, digits, '-' or '.')")
    return doc_id


@router.post("/review/{action}", name="review_action")
async def review_action(
    action: actions.Action,
    request: Request,
    session: ReviewSessionDep,
    services: SessionServicesDep,
    settings: SettingsDep,
    csrf_secret: CsrfSecretDep,
    db: DatabaseDep,
    admission: AdmissionDep,
    document_reference: FormField,
    csrf_token: FormField,
    version: OptionalFormField = None,
    markdown: OptionalFormField = None,
    reason: OptionalFormField = None,
) -> Response:
    step = STEPS[action]
    sent = {"markdown": markdown}
    missing = [name for name in step.required if sent.get(name) is None]
    if missing:
        raise BadRequest("; ".join(f"{name}: Field required" for name in missing))
    doc_id = _clean_id(document_reference)
    origin_ok = same_origin_request(request.headers.get("origin"), settings.smart.public_base_url)
    if not origin_ok or not csrf_ok(csrf_secret, session.data.id, csrf_token):
        await _audit(
            db, request, session, action, "denied", f"DocumentReference/{doc_id}", "CSRF check failed"
        )
        raise Forbidden("this form was not sent from chartbrief's own page; reload the page and try again")
    if session.fhir_user is None:
        raise Forbidden(ERRORS["no-user"])
    form = ActionForm(doc_id=doc_id, version=version, markdown=markdown, reason=reason)
    place = None
    if step.model_work:
        place = await _take_place(admission, db, request, session, action, f"DocumentReference/{doc_id}")
    try:
        svc = await services.open(session)
        answer = await step.run(ActionCall(svc, session, form, db, request.state.request_id))
        if place is not None:
            place.finish()
        return answer
    except ReviewConflict:
        return _back(doc_id, error="conflict")
    except (ReviewForbidden, ReviewNotFound):
        raise  # the one handler says 403 / 404
    except actions.NotChartbriefDraft:
        return _back(doc_id, error="not-chartbrief")
    except actions.StaleDraft:
        return _back(doc_id, error="stale")
    except ReviewError:
        return _back(doc_id, error="refused")
    finally:
        if place is not None:
            place.release()
