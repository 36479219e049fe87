"""CDS Hooks card latency for a patient with a ready summary: p50 / p95 against the local FHIR server.

Starts the local FHIR server, loads one Synthea patient, writes a chartbrief DocumentReference
for it (and records the versions it read, as chartbrief does), then sends `--requests` signed
patient-view hooks to the app in-process and prints the latencies with the configured budget. No
prefetch: the card's reads, and its searches for changes since the summary, go to the FHIR server
with the hook's fhirAuthorization token. The CDS client is a test EHR serving its JWKS on 127.0.0.1.

    .venv/bin/python bench/cds_latency.py [--requests 30]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fhir_adapters.client import FhirClient  # noqa: E402
from service.dev.devserver import LOAD_TIMEOUT_SECONDS, LocalFhirServer, synthea_files  # noqa: E402
from service.dev.sandbox import load_files  # noqa: E402
from service.logging import configure_logging  # noqa: E402
from tests.api.conftest import NO_FHIR, REDIRECT_URI, running_app  # noqa: E402
from tests.api.test_cds_hooks import call, hook, settings_for, signed  # noqa: E402
from tests.integration.test_cds_hooks_fhir import SMALL, recorded_summary  # noqa: E402
from tests.smart_ehr.server import TestEhr  # noqa: E402


async def measure(base: str, tmp: Path, requests: int) -> None:
    files = [f for f in synthea_files() if f.name == SMALL]
    async with FhirClient(base, timeout=LOAD_TIMEOUT_SECONDS) as client:
        (patient,) = await load_files(client, files)
    _, row = await recorded_summary(base, patient.id)
    auth = {"access_token": "bench-token", "token_type": "Bearer"}
    with TestEhr(NO_FHIR, redirect_uris=[REDIRECT_URI]) as ehr:
        settings = settings_for(tmp, ehr, fhir_servers=(base,))
        async with running_app(settings) as (client, app):
            app.state.runtime.store.record(row)
            await call(
                client, hook(patient.id, fhirServer=base, fhirAuthorization=auth), signed(ehr)
            )  # warm-up
            seconds: list[float] = []
            for _ in range(requests):
                started = time.perf_counter()
                response = await call(
                    client, hook(patient.id, fhirServer=base, fhirAuthorization=auth), signed(ehr)
                )
                seconds.append(time.perf_counter() - started)
                assert response.status_code == 200 and response.json()["cards"], response.text
                detail = response.json()["cards"][0]["detail"]
                assert "Changed in the record" not in detail and "not checked" not in detail, detail
    quantiles = statistics.quantiles(seconds, n=20)
    print(
        f"cds card latency over {requests} requests: p50 {1000 * statistics.median(seconds):.0f} ms, "
        f"p95 {1000 * quantiles[18]:.0f} ms, max {1000 * max(seconds):.0f} ms; "
        f"budget {settings.cds.budget_seconds:.1f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=30)
    args = parser.parse_args()
    configure_logging(fmt="console", level="WARNING")
    with LocalFhirServer() as server, tempfile.TemporaryDirectory() as tmp:
        asyncio.run(measure(server.base_url, Path(tmp), args.requests))


if __name__ == "__main__":
    main()
