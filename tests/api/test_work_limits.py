"""Bounded model work: summaries queued or running are capped in the process and per client, and the
one past a cap is refused with 429, Retry-After and an OperationOutcome before anything is fetched
or started - for API jobs, API streams, review-screen streams and regenerates alike; a place is
given back when the work ends, fails, or its client goes away.

The model here is held at a gate: work admitted stays queued or running until the test opens it,
so what is counted never depends on timing."""

from __future__ import annotations

import asyncio
import html
import json
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from service.api.limits import WorkAdmission
from service.config import ApiSettings
from service.db import apikeys
from service.db.models import AuditEvent
from service.dev.sandbox import LoadedPatient
from service.errors import TooManyRequests
from service.llm.base import Generation, GenerationRequest
from service.llm.fake import FAKE_IDENTITY, FakeEngine
from tests.api.conftest import (
    APP_BASE,
    REDIRECT_URI,
    app_settings,
    launch_session,
    query_of,
    read_events,
    running_app,
)
from tests.smart_ehr.server import TestEhr

SMALL = "Luigi_Wiegand_e27d88b0-c5e5-4042-ad49-184f6a900ee3.json"
NO_CLAIMS = '{"claims": []}'
WAIT = 60  # seconds: a bound on waiting for the app, never a measured figure


class GatedEngine(FakeEngine):
    """A FakeEngine that answers every request with no claims, once `gate` is open."""

    def __init__(self, tag: str) -> None:
        super().__init__(
            identity=replace(FAKE_IDENTITY, sampling=f"{FAKE_IDENTITY.sampling} test=limits-{tag}")
        )
        self.gate = asyncio.Event()
        self.waiting = 0

    async def _pass(self) -> None:
        self.waiting += 1
        try:
            await self.gate.wait()
        finally:
            self.waiting -= 1
        self.enqueue(NO_CLAIMS)

    async def generate(self, request: GenerationRequest) -> Generation:
        await self._pass()
        return await super().generate(request)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[str]:
        await self._pass()
        async for piece in super().stream(request):
            yield piece


def limited_settings(tmp_path: Path, ehr: TestEhr, fhir: str, total: int, per_client: int) -> Any:
    api = {
        "jwt_issuer": ehr.base_url,
        "jwks_url": ehr.jwks_url,
        "max_queued_work": total,
        "max_queued_work_per_client": per_client,
    }
    return app_settings(tmp_path, ehr, api=api, fhir={"base_url": fhir})


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def api_key(app: Any, name: str) -> str:
    _key_id, secret = apikeys.create(app.state.runtime.db, name, ["summaries.write"])
    return secret


def assert_throttled(response: httpx.Response, *, says: str) -> None:
    assert response.status_code == 429, response.text
    assert int(response.headers["retry-after"]) >= 1
    assert response.headers["content-type"].startswith("application/fhir+json")
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["code"] == "throttled"
    assert says in body["issue"][0]["diagnostics"]


def audit_rows(app: Any) -> list[AuditEvent]:
    with app.state.runtime.db() as s:
        return list(s.scalars(select(AuditEvent).order_by(AuditEvent.id)).all())


async def settle(condition: Any) -> None:
    """Let the app's tasks run until `condition()` holds (bounded: a test never hangs)."""
    async with asyncio.timeout(WAIT):
        while not condition():
            await asyncio.sleep(0.01)


@dataclass
class RawStream:
    """One streamed request played straight into the ASGI app, so the test decides when the client
    goes away (httpx's in-process transport only hands over a finished response)."""

    app: Any
    method: str
    path: str
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    chunks: list[bytes] = field(default_factory=list)
    status: int | None = None
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def start(self) -> None:
        path, _, query = self.path.partition("?")
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": self.method,
            "scheme": "https",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query.encode(),
            "root_path": "",
            "headers": [(b"host", b"testserver"), *self.headers],
            "client": ("127.0.0.1", 50000),
            "server": ("testserver", 443),
        }
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": self.body, "more_body": False}
            await self.gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.status = message["status"]
            elif message["type"] == "http.response.body":
                self.chunks.append(message.get("body", b""))

        self.task = asyncio.create_task(self.app(scope, receive, send))

    def saw(self, event: str) -> bool:
        return f"event: {event}".encode() in b"".join(self.chunks)

    async def disconnect(self) -> None:
        assert self.task is not None
        self.gone.set()
        async with asyncio.timeout(WAIT):
            await self.task


# -- the admission object on its own -----------------------------------------------------------


def test_a_place_is_refused_past_either_bound_and_given_back_once() -> None:
    now = [100.0]
    admission = WorkAdmission(max_total=3, max_per_client=2, estimate_seconds=30, clock=lambda: now[0])
    a1, _a2 = admission.admit("a", "job"), admission.admit("a", "api-stream")
    with pytest.raises(TooManyRequests) as per_client:
        admission.admit("a", "job")
    assert "this client" in per_client.value.message
    admission.admit("b", "review-stream")
    with pytest.raises(TooManyRequests) as total:
        admission.admit("c", "regenerate")
    assert "3 of at most 3" in total.value.message
    a1.release()
    a1.release()  # every exit path may give it back: only the first counts
    assert (admission.in_flight, admission.in_flight_for("a")) == (2, 1)
    admission.admit("c", "regenerate")


def test_retry_after_is_the_expected_wait_for_the_oldest_place_and_at_least_one_second() -> None:
    now = [0.0]
    admission = WorkAdmission(max_total=1, max_per_client=1, estimate_seconds=30, clock=lambda: now[0])
    first = admission.admit("a", "job")
    now[0] = 10.0
    with pytest.raises(TooManyRequests) as refused:
        admission.admit("b", "job")
    assert refused.value.retry_after == 20  # the configured 30 s less the 10 s it has run
    assert refused.value.headers["Retry-After"] == "20"
    now[0] = 12.0
    first.finish()  # measured: the estimate is now what this process saw (12 s)
    admission.admit("a", "job")
    now[0] = 100.0
    with pytest.raises(TooManyRequests) as overdue:
        admission.admit("b", "job")
    assert overdue.value.retry_after >= 1


def test_a_held_place_is_given_back_when_the_work_raises() -> None:
    admission = WorkAdmission(max_total=1, max_per_client=1, estimate_seconds=5)
    with pytest.raises(RuntimeError), admission.hold("a", "regenerate"):
        raise RuntimeError("the model failed")
    assert admission.in_flight == 0


def test_a_client_share_larger_than_the_whole_is_a_named_setting_error() -> None:
    with pytest.raises(ValueError, match="CHARTBRIEF_API__MAX_QUEUED_WORK_PER_CLIENT"):
        ApiSettings(max_queued_work=2, max_queued_work_per_client=3)


# -- the REST API --------------------------------------------------------------------------------


@pytest.mark.integration
async def test_sixty_jobs_over_a_bound_of_ten_start_ten_and_refuse_the_rest_with_429(
    ehr: TestEhr, tmp_path: Path, fhir_base: str, loaded_patients: dict[str, LoadedPatient]
) -> None:
    patient = loaded_patients[SMALL].id
    engine = GatedEngine("sixty")
    settings = limited_settings(tmp_path, ehr, fhir_base, total=10, per_client=10)
    async with running_app(settings, engine=engine) as (client, app):
        key = api_key(app, "integration")
        tasks_before = len(asyncio.all_tasks())
        answers = [
            await client.post("/api/summaries", json={"patient": patient}, headers=bearer(key))
            for _ in range(60)
        ]
        live_tasks = len(asyncio.all_tasks()) - tasks_before
        accepted = [r.json()["id"] for r in answers if r.status_code == 202]
        refused = [r for r in answers if r.status_code != 202]
        assert len(accepted) == 10
        assert live_tasks <= 10
        assert len(refused) == 50
        for response in refused:
            assert_throttled(response, says="10 of at most 10")
        assert engine.waiting <= 10
        denied = [r for r in audit_rows(app) if r.outcome == "denied"]
        assert len(denied) == 50 and all("10 of at most 10" in (r.detail or "") for r in denied)

        engine.gate.set()
        jobs = app.state.runtime.jobs
        async with asyncio.timeout(WAIT):
            for job_id in accepted:
                await jobs.wait(job_id)
        assert all(jobs.get(job_id).done for job_id in accepted)
        again = await client.post("/api/summaries", json={"patient": patient}, headers=bearer(key))
        assert again.status_code == 202  # the finished jobs gave their places back


@pytest.mark.integration
async def test_one_client_at_its_share_does_not_block_another(
    ehr: TestEhr, tmp_path: Path, fhir_base: str, loaded_patients: dict[str, LoadedPatient]
) -> None:
    patient = loaded_patients[SMALL].id
    engine = GatedEngine("share")
    settings = limited_settings(tmp_path, ehr, fhir_base, total=10, per_client=2)
    body = {"patient": patient}
    async with running_app(settings, engine=engine) as (client, app):
        key_a, key_b = api_key(app, "a"), api_key(app, "b")
        first = [await client.post("/api/summaries", json=body, headers=bearer(key_a)) for _ in range(3)]
        other = await client.post("/api/summaries", json=body, headers=bearer(key_b))
        # Two tokens with one subject are one client; another subject is another.
        tokens = [
            ehr.issue_token(scope="system/DocumentReference.c", audience=APP_BASE, subject=subject)
            for subject in ("svc-1", "svc-1", "svc-1", "svc-2")
        ]
        by_subject = [await client.post("/api/summaries", json=body, headers=bearer(t)) for t in tokens]
        engine.gate.set()
    assert [r.status_code for r in first] == [202, 202, 429]
    assert_throttled(first[2], says="this client already has 2 of at most 2")
    assert other.status_code == 202
    assert [r.status_code for r in by_subject] == [202, 202, 429, 202]


@pytest.mark.integration
async def test_the_api_stream_is_refused_while_full_and_its_place_freed_when_it_ends(
    ehr: TestEhr, tmp_path: Path, fhir_base: str, loaded_patients: dict[str, LoadedPatient]
) -> None:
    patient = loaded_patients[SMALL].id
    engine = GatedEngine("api-stream")
    settings = limited_settings(tmp_path, ehr, fhir_base, total=2, per_client=2)
    body = {"patient": patient}
    async with running_app(settings, engine=engine) as (client, app):
        key_a, key_b = api_key(app, "a"), api_key(app, "b")
        held = [await client.post("/api/summaries", json=body, headers=bearer(key_a)) for _ in range(2)]
        async with asyncio.timeout(WAIT):
            refused = await client.post("/api/summaries/stream", json=body, headers=bearer(key_b))
        assert [r.status_code for r in held] == [202, 202]
        assert_throttled(refused, says="2 of at most 2")
        assert "result" not in refused.text

        engine.gate.set()
        async with asyncio.timeout(WAIT):
            for response in held:
                await app.state.runtime.jobs.wait(response.json()["id"])
            streams = [
                await client.post("/api/summaries/stream", json=body, headers=bearer(key_b)) for _ in range(3)
            ]
    # One after another: each stream gave its place back when it ended, so the next one could run.
    for stream in streams:
        assert stream.status_code == 200
        assert "event: result" in stream.text


@pytest.mark.integration
async def test_a_client_that_leaves_an_api_stream_frees_its_place(
    ehr: TestEhr, tmp_path: Path, fhir_base: str, loaded_patients: dict[str, LoadedPatient]
) -> None:
    patient = loaded_patients[SMALL].id
    engine = GatedEngine("api-leave")
    settings = limited_settings(tmp_path, ehr, fhir_base, total=1, per_client=1)
    body = json.dumps({"patient": patient}).encode()
    async with running_app(settings, engine=engine) as (client, app):
        key = api_key(app, "leaver")
        headers = [
            (b"authorization", f"Bearer {key}".encode()),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        stream = RawStream(app, "POST", "/api/summaries/stream", headers, body)
        stream.start()
        await settle(lambda: stream.saw("structured") and engine.waiting == 1)
        while_streaming = await client.post("/api/summaries", json={"patient": patient}, headers=bearer(key))
        await stream.disconnect()  # the model is still at the gate: the summary was never finished
        after = await client.post("/api/summaries", json={"patient": patient}, headers=bearer(key))
        engine.gate.set()
    assert stream.status == 200 and not stream.saw("result")
    assert_throttled(while_streaming, says="this client already has 1 of at most 1")
    assert after.status_code == 202


# -- the review screen ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ehr_fhir(fhir_base: str) -> Iterator[TestEhr]:
    with TestEhr(fhir_base, redirect_uris=[REDIRECT_URI]) as server:
        yield server


def stream_url(page_html: str) -> str:
    match = re.search(r'data-stream-url="([^"]+)"', page_html)
    assert match is not None, "the review page names no stream"
    return html.unescape(match.group(1))


def review_cookies(client: httpx.AsyncClient) -> list[tuple[bytes, bytes]]:
    cookie = "; ".join(f"{c.name}={c.value}" for c in client.cookies.jar)
    return [(b"cookie", cookie.encode())]


@pytest.mark.integration
async def test_the_review_stream_and_regenerate_are_bounded_and_a_closed_tab_frees_its_place(
    ehr_fhir: TestEhr, tmp_path: Path, loaded_patients: dict[str, LoadedPatient]
) -> None:
    patient = loaded_patients[SMALL].id
    engine = GatedEngine("review")
    settings = app_settings(tmp_path, ehr_fhir, api={"max_queued_work": 1, "max_queued_work_per_client": 1})
    async with running_app(settings, engine=engine) as (client, app):
        await launch_session(client, ehr_fhir, patient)
        page = await client.get("/review")
        assert page.status_code == 200, page.text
        url = stream_url(page.text)
        csrf = query_of(url)["csrf_token"]

        tab = RawStream(app, "GET", url, review_cookies(client))
        tab.start()
        await settle(lambda: tab.saw("structured") and engine.waiting == 1)
        async with asyncio.timeout(WAIT):
            second_tab = await client.get(url)
            regenerate = await client.post(
                "/review/regenerate",
                data={"document_reference": "some-draft", "csrf_token": csrf},
                headers={"Origin": APP_BASE},
            )
        await tab.disconnect()  # the clinician closed the tab while the model was writing
        engine.gate.set()
        async with asyncio.timeout(WAIT):
            events = await read_events(client, url)
            again = await read_events(client, url)  # the first finished stream gave its place back
        (draft,) = [d for n, d in events if n == "draft"]
        async with asyncio.timeout(WAIT):
            regenerated = await client.post(
                "/review/regenerate",
                data={"document_reference": draft["id"], "csrf_token": csrf},
                headers={"Origin": APP_BASE},
            )
        assert app.state.runtime.admission.in_flight == 0
    for refused in (second_tab, regenerate):
        assert refused.status_code == 429, refused.text
        assert int(refused.headers["retry-after"]) >= 1
        assert "of at most 1" in refused.text
    assert not tab.saw("done")
    assert [n for n, _ in events][-1] == "done" and [n for n, _ in again][-1] == "done"
    assert regenerated.status_code == 303
    denied = [(r.action, r.outcome) for r in audit_rows(app) if r.outcome == "denied"]
    assert denied == [("summarize", "denied"), ("regenerate", "denied")]
