"""The nightly batch's figures, measured in one run on this machine.

Starts a local FHIR server, loads every Synthea fixture in tests/fixtures/synthea, then runs
`chartbrief batch run` three times as a hospital would, each as a fresh process:

1. the first run (everyone is new),
2. a run with nothing changed (should take seconds: no generation, no model load),
3. a run after two patients' records changed (exactly those two are summarized),

and prints wall times, patients per minute, tokens and CPU per summary, and the cost estimate,
writing them to a JSON report.

    .venv/bin/python bench/batch.py [--report .bench/batch.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fhir_adapters.client import FhirClient  # noqa: E402
from service.dev.devserver import LOAD_TIMEOUT_SECONDS, LocalFhirServer, synthea_files  # noqa: E402
from service.dev.sandbox import LoadedPatient, load_files  # noqa: E402
from service.logging import configure_logging  # noqa: E402

CHARTBRIEF = [sys.executable, "-m", "service.cli.main"]


def batch_run(fhir_base: str, env: dict[str, str]) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    done = subprocess.run(  # noqa: S603 - our own CLI
        [*CHARTBRIEF, "batch", "run", "--fhir-base", fhir_base, "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"batch run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, json.loads(done.stdout)


async def touch(fhir_base: str, patients: list[LoadedPatient]) -> None:
    """A new version of one Condition (or the Patient) of each: a change the next run must see."""
    async with FhirClient(fhir_base) as client:
        for p in patients:
            conditions = await client.search_all("Condition", {"patient": p.id}, limit=1)
            resource = conditions[0] if conditions else await client.read("Patient", p.id)
            resource.setdefault("extension", []).append(
                {"url": "urn:chartbrief:bench:touched", "valueBoolean": True}
            )
            await client.update(resource)


def row(name: str, seconds: float, report: dict[str, Any]) -> dict[str, Any]:
    return {
        "run": name,
        "wall_seconds": round(seconds, 2),
        "selected": report.get("selected"),
        "summarized": report.get("summarized"),
        "skipped_unchanged": report.get("skipped_unchanged"),
        "failed": report.get("failed"),
        "patients_per_minute": report.get("patients_per_minute"),
        "tokens_per_summary": report.get("tokens_per_summary"),
        "cpu_seconds_per_summary": report.get("cpu_seconds_per_summary"),
        "cost": report.get("cost") or report.get("cost_per_1000_summaries"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--report", type=Path, default=REPO / ".bench" / "batch.json")
    args = parser.parse_args()
    configure_logging(level="WARNING")
    files = synthea_files()
    with LocalFhirServer() as server, tempfile.TemporaryDirectory() as tmp:
        base = server.base_url

        async def load() -> list[LoadedPatient]:
            async with FhirClient(base, timeout=LOAD_TIMEOUT_SECONDS) as client:
                return await load_files(client, files)

        patients = asyncio.run(load())
        env = os.environ | {
            "CHARTBRIEF_DB__URL": f"sqlite:///{tmp}/batch.db",
            "CHARTBRIEF_LOG_LEVEL": "WARNING",
        }
        rows = []
        seconds, report = batch_run(base, env)
        rows.append(row(f"first run, everyone ({len(patients)} patients)", seconds, report))
        seconds, report = batch_run(base, env)
        rows.append(row("nothing changed", seconds, report))
        asyncio.run(touch(base, patients[:2]))
        seconds, report = batch_run(base, env)
        rows.append(row("2 patients changed", seconds, report))
    for r in rows:
        print(
            f"{r['run']:<36} {r['wall_seconds']:>7.1f} s  summarized {r['summarized']}, "
            f"unchanged {r['skipped_unchanged']}, failed {r['failed']}, "
            f"{r['patients_per_minute']} patients/min, {r['tokens_per_summary']} tokens and "
            f"{r['cpu_seconds_per_summary']} CPU s per summary"
        )
    print(f"cost estimate (first run): {rows[0]['cost']}")
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps({"cpus": os.cpu_count(), "runs": rows}, indent=2) + "\n")
    print(f"report: {args.report}")


if __name__ == "__main__":
    main()
