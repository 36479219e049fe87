"""`make demo`: the whole job on the embedded defaults, end to end, on this machine.

Starts a local FHIR R4 server (sekmet, from .venv-fhir), loads three Synthea patients (one with
clinical notes, one large, one small), summarizes each with the default local model, writes the
results back to that server, prints each summary with its figures, writes a JSON report, and
stops the server. Every figure printed comes from this run.

    .venv/bin/python bench/demo.py [--report .demo/report.json] [--fhir-base URL] [FILE ...]

With --fhir-base it uses that server instead of starting one (e.g. HAPI's public sandbox).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fhir_adapters.client import FhirClient  # noqa: E402
from service.cli.summarize import render_text  # noqa: E402
from service.config import Settings  # noqa: E402
from service.dev.devserver import LOAD_TIMEOUT_SECONDS, SYNTHEA_DIR, LocalFhirServer  # noqa: E402
from service.dev.sandbox import LoadFailure, load_files  # noqa: E402
from service.llm import create_engine  # noqa: E402
from service.logging import configure_logging  # noqa: E402
from service.pipeline import summarize_patient  # noqa: E402
from service.runtime import open_services  # noqa: E402

# One with clinical notes, one large (80 encounters, 1,235 entries), one small (61 entries).
DEFAULT_FILES = [
    "Beatris270_Bogan287_5b3645de-a2d0-d016-0839-bab3757c4c58.json.gz",
    "Allen322_Ferry570_ad134528-56a5-35fd-c37f-466ff119c625.json.gz",
    "Luigi_Wiegand_e27d88b0-c5e5-4042-ad49-184f6a900ee3.json",
]


async def run(fhir_base: str, files: list[Path], report_path: Path) -> dict[str, Any]:
    started = time.perf_counter()
    report_path.parent.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("CHARTBRIEF_DB__URL", f"sqlite:///{report_path.parent / 'chartbrief.db'}")
    settings = Settings(fhir={"base_url": fhir_base})  # type: ignore[arg-type]
    configure_logging(fmt=settings.log_format, level="WARNING")

    failures: list[LoadFailure] = []
    t0 = time.perf_counter()
    async with FhirClient(fhir_base, timeout=LOAD_TIMEOUT_SECONDS) as client:
        loaded = await load_files(client, files, failures=failures)
    load_seconds = time.perf_counter() - t0
    for f in failures:
        print(f"not loaded: {f.source_file}: {f.reason}", file=sys.stderr)
    print(f"loaded {len(loaded)} patients into {fhir_base} in {load_seconds:.1f}s\n")

    t0 = time.perf_counter()
    engine = create_engine(settings.llm)
    model_load_seconds = time.perf_counter() - t0
    results = []
    try:
        async with open_services(settings, engine=engine) as svc:
            for patient in loaded:
                result = await summarize_patient(svc, patient.id)
                print("=" * 100)
                print(f"{patient.source_file}\n")
                print(render_text(result))
                print()
                entry = result.to_json()
                entry.pop("markdown")
                entry["source_file"] = patient.source_file
                entry["resources_loaded"] = patient.resources
                results.append(entry)
    finally:
        await engine.aclose()

    total = time.perf_counter() - started
    summaries = [r for r in results if r["document_reference"]]
    report = {
        "fhir_base": fhir_base,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "model": results[0]["model"] if results else None,
        "prompt": results[0]["prompt"] if results else None,
        "seconds_total": round(total, 2),
        "seconds_load_patients": round(load_seconds, 2),
        "seconds_model_load": round(model_load_seconds, 2),
        "patients": results,
        "failed_to_load": [{"source_file": f.source_file, "reason": f.reason} for f in failures],
        "totals": {
            "patients": len(results),
            "written": len(summaries),
            "claims_kept": sum(r["claims_kept"] for r in results),
            "claims_dropped": sum(r["claims_dropped"] for r in results),
            "prompt_tokens": sum(r["prompt_tokens"] for r in results),
            "completion_tokens": sum(r["completion_tokens"] for r in results),
        },
    }
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    print("=" * 100)
    print(
        f"{len(results)} patients summarized, {len(summaries)} written back; claims kept "
        f"{report['totals']['claims_kept']}, dropped {report['totals']['claims_dropped']}; "
        f"{total:.1f}s in all (loading {load_seconds:.1f}s, model load {model_load_seconds:.1f}s)"
    )
    print(f"report: {report_path}")
    if failures or len(summaries) != len(results):
        raise SystemExit(1)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--report", type=Path, default=REPO / ".demo" / "report.json")
    parser.add_argument("--fhir-base", default=None, help="use this FHIR server instead of starting one")
    parser.add_argument("files", nargs="*", type=Path, help="Synthea bundles (default: three fixtures)")
    args = parser.parse_args()
    files = args.files or [SYNTHEA_DIR / name for name in DEFAULT_FILES]
    if args.fhir_base:
        asyncio.run(run(args.fhir_base.rstrip("/"), files, args.report))
        return
    with LocalFhirServer() as server:
        print(f"local FHIR server at {server.base_url} (sekmet, simulator off)")
        asyncio.run(run(server.base_url, files, args.report))


if __name__ == "__main__":
    main()
