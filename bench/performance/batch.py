"""Section `batch`: the nightly batch over the fixture patients, as cron would run it.

`chartbrief batch run --json` runs three times, each as a fresh process, on a fresh SQLite
database in the run's work folder: first everyone (all new), then a rerun with nothing changed,
then a run after two patients' records changed (`bench.batch.touch`). The first run waits
SETTLE_SECONDS after the loading, which the watermark's overlap would otherwise count as a
change. The ratios are the reruns' wall seconds over the first run's: a night with nothing to do
should cost next to nothing (no generation, no model load), a night with two changes about two
patients' worth.

The figures of each run are the batch's own report (selected, summarized, skipped unchanged,
failed, tokens and CPU seconds per summary) plus what this side sees: the process's wall and CPU
seconds. `cli_import_seconds` (a fresh process that only imports the CLI) shows how much of a
rerun is process start and imports alone.

With `ctx.tiny` only the one or two smallest patients are run, named in a `--patients` file (the
reruns then read those patients and find them unchanged, where the default selection would find
no changed patient at all), with answers capped at TINY_MAX_TOKENS.

What it must not do: print or keep patient data (ids and counts only).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from bench.batch import touch
from bench.performance.common import REPO, Bar, BenchContext, Section, ratio
from service.config import BatchSettings

CHARTBRIEF = [sys.executable, "-m", "service.cli.main"]
TOUCHED = 2
TINY_PATIENTS = 2
TINY_MAX_TOKENS = 64
UNCHANGED_TARGET = 0.02
EXIT_BATCH_FAILURES = 5  # the run finished, some patients failed: still a report to read
RUN_TIMEOUT_SECONDS = 6 * 3600
# A run re-selects what changed up to this long before the last run's start (a server clock reads
# whole seconds): the first run starts later than that after the fixtures were loaded, as a real
# night does, so the nothing-changed rerun finds nothing changed.
SETTLE_SECONDS = BatchSettings.model_fields["watermark_overlap_seconds"].default + 1
REPORT_FIGURES = (
    "selected",
    "summarized",
    "skipped_unchanged",
    "failed",
    "seconds",
    "patients_per_minute",
    "tokens",
    "tokens_per_summary",
    "cpu_seconds",
    "cpu_seconds_per_summary",
)

T = TypeVar("T")


def run_coroutine(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to its end, in a thread of its own when this thread already runs a loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coroutine)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="bench-batch")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    result: T = box["value"]
    return result


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def batch_run(fhir_base: str, env: dict[str, str], extra: list[str]) -> dict[str, Any]:
    """One `chartbrief batch run --json` process: its report, wall and CPU seconds."""
    cpu_before = children_cpu_seconds()
    started = time.perf_counter()
    done = subprocess.run(  # noqa: S603 - our own CLI
        [*CHARTBRIEF, "batch", "run", "--fhir-base", fhir_base, "--json", *extra],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
        timeout=RUN_TIMEOUT_SECONDS,
    )
    wall = time.perf_counter() - started
    if done.returncode not in (0, EXIT_BATCH_FAILURES):
        raise RuntimeError(f"chartbrief batch run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    report: dict[str, Any] = json.loads(done.stdout)
    return {
        "wall_seconds": round(wall, 2),
        "process_cpu_seconds": round(children_cpu_seconds() - cpu_before, 2),
        "exit_code": done.returncode,
        **{name: report.get(name) for name in REPORT_FIGURES},
        "selection": report.get("selection"),
    }


def import_seconds(env: dict[str, str]) -> float:
    """A fresh process that imports the CLI and exits: the floor under any `chartbrief` command
    (the section reports the median of three)."""
    started = time.perf_counter()
    subprocess.run(  # noqa: S603 - our own package
        [sys.executable, "-c", "import service.cli.main"], env=env, check=True, cwd=REPO, timeout=300
    )
    return time.perf_counter() - started


def chosen_patients(ctx: BenchContext) -> list[Any]:
    if not ctx.tiny:
        return list(ctx.patients)
    return sorted(ctx.patients, key=lambda p: p.resources)[:TINY_PATIENTS]


def run(ctx: BenchContext) -> Section:
    section = Section(key="batch", title="Nightly batch: first run, nothing changed, two patients changed")
    work = ctx.work_dir / "batch"
    work.mkdir(parents=True, exist_ok=True)
    database = work / f"batch-{time.time_ns()}.db"
    env = os.environ | {"CHARTBRIEF_DB__URL": f"sqlite:///{database}", "CHARTBRIEF_LOG_LEVEL": "WARNING"}
    patients = chosen_patients(ctx)
    if not patients:
        section.skipped = "no fixture patients were loaded"
        return section
    extra: list[str] = []
    if ctx.tiny:
        env["CHARTBRIEF_LLM__MAX_TOKENS"] = str(TINY_MAX_TOKENS)
        selection = work / "patients.txt"
        selection.write_text("".join(f"{p.id}\n" for p in patients))
        extra = ["--patients", str(selection)]
        section.notes.append(
            f"tiny run: {len(patients)} patient(s) named in a --patients file, answers capped at "
            f"{TINY_MAX_TOKENS} tokens; the reruns read those patients and find them unchanged"
        )

    time.sleep(SETTLE_SECONDS)
    first = batch_run(ctx.fhir_base, env, extra)
    unchanged = batch_run(ctx.fhir_base, env, extra)
    touched = patients[:TOUCHED]
    run_coroutine(touch(ctx.fhir_base, touched))
    changed = batch_run(ctx.fhir_base, env, extra)
    startup = statistics.median(import_seconds(env) for _ in range(3))

    runs = {
        f"first run ({len(patients)} patients)": first,
        "nothing changed": unchanged,
        f"{len(touched)} patient(s) changed": changed,
    }
    section.ratios = {
        "unchanged_rerun_fraction": ratio(unchanged["wall_seconds"], first["wall_seconds"], 4),
        "two_changed_rerun_fraction": ratio(changed["wall_seconds"], first["wall_seconds"], 4),
    }
    section.targets = {"unchanged_rerun_fraction": f"<= {UNCHANGED_TARGET}"}
    per_minute = first["summarized"] / first["wall_seconds"] * 60 if first["wall_seconds"] else None
    section.figures = {
        "patients": len(patients),
        "touched": len(touched),
        "patients_per_minute": round(per_minute, 2) if per_minute is not None else None,
        "cli_import_seconds": round(startup, 2),
        "first_run": first,
        "unchanged_rerun": unchanged,
        "two_changed_rerun": changed,
        "tokens_per_summary": first["tokens_per_summary"],
        "cpu_seconds_per_summary": first["cpu_seconds_per_summary"],
        "model": "the default (SmolLM2-135M-Instruct GGUF), in-process",
        "cpus": os.cpu_count(),
    }
    section.table = [
        {
            "run": name,
            "wall s": r["wall_seconds"],
            "process CPU s": r["process_cpu_seconds"],
            "selected": r["selected"],
            "summarized": r["summarized"],
            "unchanged": r["skipped_unchanged"],
            "failed": r["failed"],
            "tokens/summary": r["tokens_per_summary"],
            "CPU s/summary": r["cpu_seconds_per_summary"],
        }
        for name, r in runs.items()
    ]
    section.bars = [Bar(name, r["wall_seconds"], "s") for name, r in runs.items()]
    section.notes.append(
        f"patients per minute = summaries of the first run / its wall seconds (process start included); "
        f"a fresh process that only imports the CLI takes {startup:.2f} s"
    )
    if len(patients) > len(touched):
        section.notes.append(
            f"the two-changed rerun is expected near {len(touched)}/{len(patients)} = "
            f"{len(touched) / len(patients):.2f} of the first run"
        )
    fraction = section.ratios["unchanged_rerun_fraction"]
    if fraction is not None and fraction > UNCHANGED_TARGET:
        section.notes.append(
            f"the nothing-changed rerun took {unchanged['wall_seconds']} s, {fraction:.1%} of the first run "
            f"(target {UNCHANGED_TARGET:.0%}); process start and imports alone take {startup:.2f} s"
        )
    return section


def standalone(section_run: Any, argv: list[str] | None = None) -> None:
    """Run one section on its own (`python -m bench.performance.batch [--tiny]`): a local FHIR
    server with every fixture loaded (`--tiny`: the smallest), the section's JSON on stdout."""
    import argparse
    import tempfile

    from fhir_adapters.client import FhirClient
    from service.dev.devserver import LOAD_TIMEOUT_SECONDS, LocalFhirServer, synthea_files
    from service.dev.sandbox import LoadedPatient, load_files
    from service.logging import configure_logging

    parser = argparse.ArgumentParser(description=section_run.__module__)
    parser.add_argument("--tiny", action="store_true", help="the smallest fixture, one repetition")
    parser.add_argument("--repetitions", type=int, default=3)
    args = parser.parse_args(argv)
    configure_logging(level="WARNING")
    files = sorted(synthea_files(), key=lambda p: p.stat().st_size)[: 1 if args.tiny else None]
    with LocalFhirServer() as server, tempfile.TemporaryDirectory() as tmp:

        async def load() -> list[LoadedPatient]:
            async with FhirClient(server.base_url, timeout=LOAD_TIMEOUT_SECONDS) as client:
                return await load_files(client, files)

        patients = asyncio.run(load())
        ctx = BenchContext(
            fhir_base=server.base_url,
            patients=patients,
            largest=max(patients, key=lambda p: p.resources),
            repetitions=args.repetitions,
            tiny=args.tiny,
            work_dir=Path(tmp),
        )
        section: Section = section_run(ctx)
    print(json.dumps(section.to_json(), indent=2))  # noqa: T201 - the command's output


if __name__ == "__main__":
    standalone(run)
