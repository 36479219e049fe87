"""Section `footprint`: what one `chartbrief serve` costs to start and to keep, with the default model.

Each start is a fresh `chartbrief serve` process on a free 127.0.0.1 port (the database, FHIR base
and an API key as bench/load.py sets them up). Measured:

- cold start: from the process's start until `GET /readyz` first answers 200 (database reachable,
  model loaded), polled every POLL_SECONDS;
- peak RSS of the process and its children (psutil, sampled every RSS_SAMPLE_SECONDS) until ready,
  and, on the first start, the peak while one summary goes through the API (`POST /api/summaries`,
  polled to its end as bench/load.py does);
- the baselines, each in a fresh process: the RSS of a bare `import service`, and the seconds to
  just import `service.api.app` (interpreter start included, as in the cold start).

The ratios are serve's RSS at ready over the bare baseline, and the ready seconds over the import
seconds. Timed figures are medians of `ctx.repetitions` starts (one with `ctx.tiny`, whose summary
is capped at TINY_MAX_TOKENS tokens).

What it must not do: reach anything but 127.0.0.1, leave a process running, or print patient data.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.load import HOST, PROMPT, create_key, one_job
from bench.performance.batch import run_coroutine
from bench.performance.common import REPO, Bar, BenchContext, Section, ratio
from service.dev.devserver import free_port

CHARTBRIEF = [sys.executable, "-m", "service.cli.main"]
POLL_SECONDS = 0.02
RSS_SAMPLE_SECONDS = 0.05
READY_TIMEOUT_SECONDS = 300.0
SUMMARY_TIMEOUT_SECONDS = 900.0
TINY_MAX_TOKENS = 64
MIB = 2**20


def tree_rss(process: psutil.Process) -> int:
    """RSS of a process and all its children, in bytes (processes that just ended count 0)."""
    total = 0
    for each in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += each.memory_info().rss
    return total


class PeakRss:
    """The peak RSS of a process tree, sampled in a thread; `mark()` starts a new peak."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self._peaks: list[int] = [0]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)

    def sample(self) -> None:
        with contextlib.suppress(psutil.Error):
            rss = tree_rss(self._process)
            with self._lock:
                self._peaks[-1] = max(self._peaks[-1], rss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(RSS_SAMPLE_SECONDS)

    def mark(self) -> int:
        """Sample once more, close the current peak (returned, bytes) and start the next."""
        self.sample()
        with self._lock:
            peak = self._peaks[-1]
            self._peaks.append(0)
        return peak

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@dataclass
class Start:
    ready_seconds: float
    rss_at_ready_mib: float
    summary: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def started_serve(
    env: dict[str, str], work: Path
) -> Iterator[tuple[str, subprocess.Popen[bytes], float, Path]]:
    """A `chartbrief serve` process: its URL, the process, the perf_counter of its start and its log
    (removed, with the process stopped, at the end)."""
    port = free_port()
    log_path = work / f"serve-{port}.log"
    with log_path.open("wb") as out:
        began = time.perf_counter()
        process = subprocess.Popen(  # noqa: S603 - our own CLI
            [*CHARTBRIEF, "serve", "--host", HOST, "--port", str(port)],
            env=env | {"CHARTBRIEF_SMART__PUBLIC_BASE_URL": f"http://{HOST}:{port}"},
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    try:
        yield f"http://{HOST}:{port}", process, began, log_path
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log_path.unlink(missing_ok=True)


def tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else ""


def wait_ready(url: str, process: subprocess.Popen[bytes], began: float, log: Path) -> float:
    """Seconds from `began` until /readyz answers 200."""
    last = "no answer"
    with httpx.Client(base_url=url, timeout=5) as http:
        while True:
            try:
                answer = http.get("/readyz")
            except httpx.TransportError as exc:
                last = type(exc).__name__
            else:
                if answer.status_code == 200:
                    return time.perf_counter() - began
                last = f"{answer.status_code} {answer.text[:300]}"
            if process.poll() is not None:
                raise RuntimeError(
                    f"chartbrief serve exited ({process.returncode}) before it was ready:\n{tail(log)}"
                )
            if time.perf_counter() - began > READY_TIMEOUT_SECONDS:
                raise RuntimeError(
                    f"chartbrief serve was not ready in {READY_TIMEOUT_SECONDS:.0f} s (/readyz: {last}):\n"
                    f"{tail(log)}"
                )
            time.sleep(POLL_SECONDS)


def one_summary(url: str, key: str, patient_id: str) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        timeout = httpx.Timeout(SUMMARY_TIMEOUT_SECONDS, connect=30.0)
        async with httpx.AsyncClient(base_url=url, timeout=timeout) as http:
            outcome = await one_job(http, key, patient_id, 0)
        return {
            "status": outcome.status,
            "result": outcome.result,
            "failed": outcome.failed,
            "complete_seconds": round(outcome.complete_seconds, 2) if outcome.complete_seconds else None,
        }

    return run_coroutine(go())


def measure_start(env: dict[str, str], work: Path, *, summary_for: tuple[str, str] | None = None) -> Start:
    """One cold start to ready, its RSS peak, and (given a key and a patient id) one summary."""
    with started_serve(env, work) as (url, process, began, log), PeakRss(process.pid) as rss:
        seconds = wait_ready(url, process, began, log)
        start = Start(round(seconds, 3), round(rss.mark() / MIB, 1))
        if summary_for is not None:
            key, patient_id = summary_for
            start.summary = one_summary(url, key, patient_id)
            start.summary["peak_rss_mib"] = round(rss.mark() / MIB, 1)
        if process.poll() is not None:
            raise RuntimeError(f"chartbrief serve died during the run:\n{tail(log)}")
    return start


def bare_import_rss(env: dict[str, str]) -> float:
    """RSS (MiB) of a fresh interpreter that has imported `service`, read while it waits."""
    child = subprocess.Popen(  # noqa: S603 - our own package
        [sys.executable, "-c", "import sys, service; print('imported', flush=True); sys.stdin.read()"],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=REPO,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        if child.stdout.readline().strip() != b"imported":
            raise RuntimeError("the baseline interpreter did not import service")
        rss = tree_rss(psutil.Process(child.pid))
        child.stdin.close()
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return rss / MIB


def app_import_seconds(env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(  # noqa: S603 - our own package
        [sys.executable, "-c", "import service.api.app"], env=env, check=True, cwd=REPO, timeout=300
    )
    return time.perf_counter() - started


def run(ctx: BenchContext) -> Section:
    section = Section(key="footprint", title="Footprint: chartbrief serve cold start and memory")
    if not ctx.patients:
        section.skipped = "no fixture patients were loaded"
        return section
    work = ctx.work_dir / "footprint"
    work.mkdir(parents=True, exist_ok=True)
    env = os.environ | {
        "CHARTBRIEF_DB__URL": f"sqlite:///{work / f'serve-{time.time_ns()}.db'}",
        "CHARTBRIEF_LOG_LEVEL": "WARNING",
        "CHARTBRIEF_FHIR__BASE_URL": ctx.fhir_base,
        "CHARTBRIEF_PROMPT": PROMPT,
    }
    if ctx.tiny:
        env["CHARTBRIEF_LLM__MAX_TOKENS"] = str(TINY_MAX_TOKENS)
    repetitions = 1 if ctx.tiny else max(1, ctx.repetitions)
    patient = min(ctx.patients, key=lambda p: p.resources) if ctx.tiny else ctx.largest
    key = create_key(env, "bench-footprint")

    baseline_rss = statistics.median(bare_import_rss(env) for _ in range(repetitions))
    import_times = [app_import_seconds(env) for _ in range(repetitions)]
    starts = [
        measure_start(env, work, summary_for=(key, patient.id) if i == 0 else None)
        for i in range(repetitions)
    ]
    ready = statistics.median(s.ready_seconds for s in starts)
    rss_ready = statistics.median(s.rss_at_ready_mib for s in starts)
    import_s = statistics.median(import_times)
    summary = starts[0].summary

    section.ratios = {
        "serve_rss_vs_python_baseline": ratio(rss_ready, baseline_rss, 2),
        "cold_start_vs_import_baseline": ratio(ready, import_s, 2),
    }
    section.figures = {
        "starts": repetitions,
        "ready_seconds": round(ready, 3),
        "ready_seconds_each": [s.ready_seconds for s in starts],
        "rss_at_ready_mib": rss_ready,
        "rss_at_ready_mib_each": [s.rss_at_ready_mib for s in starts],
        "rss_after_summary_mib": summary.get("peak_rss_mib"),
        "summary": {k: v for k, v in summary.items() if k != "peak_rss_mib"},
        "summary_patient_resources": patient.resources,
        "baseline_import_service_rss_mib": round(baseline_rss, 1),
        "baseline_import_app_seconds": round(import_s, 3),
        "baseline_import_app_seconds_each": [round(t, 3) for t in import_times],
        "prompt": PROMPT,
        "model": "the default (SmolLM2-135M-Instruct GGUF), in-process",
        "cpus": os.cpu_count(),
    }
    section.table = [
        {"measure": "ready (s, process start to /readyz 200)", "value": round(ready, 2)},
        {"measure": "import service.api.app (s, fresh process)", "value": round(import_s, 2)},
        {"measure": "peak RSS until ready (MiB)", "value": rss_ready},
        {"measure": "peak RSS during one summary (MiB)", "value": summary.get("peak_rss_mib")},
        {"measure": "RSS of a bare `import service` (MiB)", "value": round(baseline_rss, 1)},
    ]
    section.bars = [
        Bar("bare import service", round(baseline_rss, 1), "MiB"),
        Bar("serve, at ready", rss_ready, "MiB"),
        Bar("serve, after one summary", float(summary.get("peak_rss_mib") or 0.0), "MiB"),
    ]
    section.notes.append(
        f"one summary (prompt {PROMPT}) of the patient with {patient.resources} resources through "
        f"POST /api/summaries on the first start: {summary.get('result') or summary.get('failed')}"
    )
    if ctx.tiny:
        section.notes.append(f"tiny run: one start, the summary capped at {TINY_MAX_TOKENS} tokens")
    return section


if __name__ == "__main__":
    from bench.performance.batch import standalone

    standalone(run)
