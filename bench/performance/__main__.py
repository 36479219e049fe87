"""`make bench`: every performance comparison side by side, on this machine, in one run.

    .venv/bin/python -m bench.performance [--repetitions 3] [--out bench/results] [--only decode,fetch]
                                          [--tiny]

Starts a local FHIR server, loads the fixture patients, then runs each section: context packing,
engine overhead, decode speed, prefix reuse, fetching a record, the nightly batch, footprint and
start, and GPU (skipped with the reason when this build or machine has none). Each figure is a
ratio against a baseline measured in the same run; absolute times come with it. Writes
<out>/<timestamp>.json (top-level `ratios` and `machine`), <timestamp>.md and one PNG per section.

`--tiny` is the smoke run of `make test`: the smallest patient, one repetition, a few tokens. It
proves the code runs and writes a well-formed report; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from bench.performance.common import REPO, BenchContext, Section
from bench.performance.machine import gpu_offload, machine, machine_line
from bench.performance.report import report_json, write
from fhir_adapters.client import FhirClient
from service.config import Settings
from service.dev.devserver import LOAD_TIMEOUT_SECONDS, LocalFhirServer, synthea_files
from service.dev.sandbox import LoadedPatient, load_files
from service.logging import configure_logging

TINY_LLM = {"n_ctx": 768, "max_tokens": 24}
SECTIONS = ("packing", "overhead", "decode", "prefix", "fetch", "batch", "footprint", "gpu")
SMALLEST = "Luigi_Wiegand_e27d88b0-c5e5-4042-ad49-184f6a900ee3.json"
# Its record-wide prompt is about 2,000 tokens: long enough to weigh, short enough to repeat.
MID_SIZED = "Kermit_Trantow_f1a650a5-737e-4fd7-828e-03c3348b9524.json"


def load(base: str, files: list[Path]) -> list[LoadedPatient]:
    async def go() -> list[LoadedPatient]:
        async with FhirClient(base, timeout=LOAD_TIMEOUT_SECONDS) as client:
            return await load_files(client, files)

    return asyncio.run(go())


def gpu_section(ctx: BenchContext, settings: Settings) -> list[Section]:
    if not gpu_offload():
        return [
            Section(
                "gpu",
                "GPU",
                skipped="this llama-cpp-python build has no GPU offload (llama_supports_gpu_offload() is "
                "false); "
                "build the image with the CUDA argument and run on a CUDA machine (docs/PERFORMANCE.md)",
            )
        ]
    from bench.performance import engine

    gpu = settings.model_copy(update={"llm": settings.llm.model_copy(update={"n_gpu_layers": -1})})
    out = []
    for s in engine.run(ctx, gpu)[:2]:
        s.key, s.title = f"gpu_{s.key}", f"GPU (n_gpu_layers=-1): {s.title}"
        s.ratios = {f"gpu_{k}": v for k, v in s.ratios.items()}
        s.targets = {f"gpu_{k}": v for k, v in s.targets.items()}
        out.append(s)
    return out


def runners(settings: Settings) -> dict[str, Callable[[BenchContext], list[Section]]]:
    from bench.performance import batch, engine, fetch, footprint, packing
    from service.llm import create_engine

    engine_sections: dict[str, Section] = {}

    def model_section(key: str) -> Callable[[BenchContext], list[Section]]:
        def go(ctx: BenchContext) -> list[Section]:
            if not engine_sections:  # overhead, decode and prefix share their engines: one run
                engine_sections.update({s.key: s for s in engine.run(ctx, settings)})
            return [engine_sections[key]]

        return go

    def packing_run(ctx: BenchContext) -> list[Section]:
        model = create_engine(settings.llm)
        try:
            return [packing.run(ctx, model, settings)]
        finally:
            asyncio.run(model.aclose())

    return {
        "packing": packing_run,
        "overhead": model_section("overhead"),
        "decode": model_section("decode"),
        "prefix": model_section("prefix"),
        "fetch": lambda ctx: [fetch.run(ctx)],
        "batch": lambda ctx: [batch.run(ctx)],
        "footprint": lambda ctx: [footprint.run(ctx)],
        "gpu": lambda ctx: gpu_section(ctx, settings),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.performance", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument(
        "--repetitions", type=int, default=3, help="runs per timed figure (the median is reported)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--only", default="", help=f"comma-separated sections of {', '.join(SECTIONS)}")
    parser.add_argument("--tiny", action="store_true", help="the smoke run: smallest inputs, one repetition")
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()] or list(SECTIONS)
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        parser.error(f"--only: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    repetitions = 1 if args.tiny else max(1, args.repetitions)
    configure_logging(level="WARNING")
    started = datetime.now(UTC)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    info = machine()
    print(f"machine: {machine_line(info)}", flush=True)
    files = synthea_files()
    if args.tiny:
        files = [f for f in files if f.name == SMALLEST]
    sections: list[Section] = []
    failures: list[str] = []
    with LocalFhirServer() as server, tempfile.TemporaryDirectory(prefix="chartbrief-bench-") as tmp:
        patients = load(server.base_url, files)
        by_file = {p.source_file: p for p in patients}
        largest = max(patients, key=lambda p: p.resources)
        ctx = BenchContext(
            fhir_base=server.base_url,
            patients=patients,
            largest=largest,
            repetitions=repetitions,
            tiny=args.tiny,
            work_dir=Path(tmp),
            overhead_patient=by_file.get(MID_SIZED, patients[0]),
        )
        settings = Settings(fhir={"base_url": server.base_url})  # type: ignore[arg-type]
        if args.tiny:  # short prompts and answers: the smoke run proves the code, not the speed
            settings = settings.model_copy(update={"llm": settings.llm.model_copy(update=TINY_LLM)})
        run = runners(settings)
        for key in SECTIONS:
            if key not in chosen:
                continue
            began = time.perf_counter()
            print(f"--- {key}", flush=True)
            try:
                got = run[key](ctx)
            except Exception:  # a broken section fails the run, after the others have reported
                failures.append(key)
                traceback.print_exc()
                continue
            for s in got:
                sections.append(s)
                shown = s.skipped or ", ".join(f"{k} {v}" for k, v in s.ratios.items())
                print(f"{s.key}: {shown} ({time.perf_counter() - began:.0f} s)", flush=True)
    command = (
        "make bench"
        if not argv and not args.only and not args.tiny
        else "python -m bench.performance " + shlex.join(argv or sys.argv[1:])
    )
    report = report_json(started.isoformat(timespec="seconds"), info, sections, command)
    report["failed_sections"] = failures
    written = write(args.out, stamp, report, sections)
    for name, path in written.items():
        print(f"{name}: {path}")
    if failures:
        print(f"failed sections: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
