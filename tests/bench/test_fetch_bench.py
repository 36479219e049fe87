"""The `fetch` section of `make bench` in its tiny configuration, and the delay proxy it measures through.

The section runs against the session's local FHIR server (the Synthea fixtures loaded) on the
smallest patient. What is checked: both clients read the same resources with the same requests,
every figure is there, and the proxy really delayed every request it counted. How fast either
client is, is the benchmark's to report, not this test's to judge.
"""

from __future__ import annotations

import doctest
import json
import threading

import httpx
import pytest

from bench import delay_proxy
from bench.delay_proxy import CONTROL_PATH, DelayProxy, DelayProxyProcess, rewrite_urls
from bench.performance import fetch
from bench.performance.common import BenchContext
from service.dev.sandbox import LoadedPatient

UPSTREAM = "http://127.0.0.1:8080/fhir"
PROXY = "http://127.0.0.1:9999/fhir"


# ---------------------------------------------------------------------------
# URL rewriting (no server)
# ---------------------------------------------------------------------------


def test_the_bench_modules_doctests_pass() -> None:
    # bench/ is not among pytest's doctest paths: its examples are run here.
    for module in (delay_proxy, fetch):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_rewrite_moves_next_links_and_full_urls_under_the_proxy() -> None:
    bundle = {
        "resourceType": "Bundle",
        "link": [
            {"relation": "self", "url": f"{UPSTREAM}/Observation?patient=1&_count=2"},
            {"relation": "next", "url": f"{UPSTREAM}/Observation?patient=1&_count=2&_page=2"},
        ],
        "entry": [{"fullUrl": f"{UPSTREAM}/Observation/7", "resource": {"resourceType": "Observation"}}],
    }
    body = rewrite_urls(json.dumps(bundle).encode(), UPSTREAM, PROXY)
    rewritten = json.loads(body)
    assert rewritten["link"][1]["url"] == f"{PROXY}/Observation?patient=1&_count=2&_page=2"
    assert rewritten["link"][0]["url"] == f"{PROXY}/Observation?patient=1&_count=2"
    assert rewritten["entry"][0]["fullUrl"] == f"{PROXY}/Observation/7"
    assert UPSTREAM.encode() not in body


def test_rewrite_leaves_other_servers_and_longer_bases_alone() -> None:
    other = [
        "http://127.0.0.1:80801/fhir/Patient/1",  # a longer port
        "http://127.0.0.1:8080/fhirx/Patient/1",  # a longer path
        "https://127.0.0.1:8080/fhir/Patient/1",  # another scheme
        "http://example.org/fhir/Patient/1",
    ]
    body = json.dumps({"urls": other}).encode()
    assert rewrite_urls(body, UPSTREAM, PROXY) == body


def test_rewrite_handles_escaped_slashes_and_the_bare_base() -> None:
    body = b'{"a": "http:\\/\\/127.0.0.1:8080\\/fhir\\/Patient\\/1", "b": "http://127.0.0.1:8080/fhir"}'
    rewritten = json.loads(rewrite_urls(body, UPSTREAM + "/", PROXY))
    assert rewritten == {"a": f"{PROXY}/Patient/1", "b": PROXY}


def test_the_proxy_refuses_a_negative_delay_and_a_relative_upstream() -> None:
    with pytest.raises(ValueError, match="delay"):
        DelayProxy(UPSTREAM, delay=-0.1)
    with pytest.raises(ValueError, match="absolute"):
        DelayProxy("/fhir")


# ---------------------------------------------------------------------------
# The proxy in front of the real server
# ---------------------------------------------------------------------------


@pytest.mark.integration
def test_the_proxy_pages_through_itself_counts_and_delays(
    fhir_base: str, loaded_patients: dict[str, LoadedPatient]
) -> None:
    patient = max(loaded_patients.values(), key=lambda p: p.resources)
    delay = 0.02
    with DelayProxy(fhir_base, delay=delay) as proxy:
        assert proxy.base_url.startswith("http://127.0.0.1:")
        with httpx.Client(timeout=30) as http:
            first = http.get(f"{proxy.base_url}/Observation", params={"patient": patient.id, "_count": "2"})
            assert first.status_code == 200
            bundle = first.json()
            nexts = [link["url"] for link in bundle.get("link", []) if link.get("relation") == "next"]
            assert nexts, "the largest patient has more than 2 Observations: the first page links a next one"
            assert nexts[0].startswith(proxy.base_url)
            assert all(e["fullUrl"].startswith(proxy.base_url) for e in bundle["entry"] if "fullUrl" in e)
            second = http.get(nexts[0])
            assert second.status_code == 200
            assert second.json()["resourceType"] == "Bundle"
            missing = http.get(f"{proxy.base_url}/Patient/does-not-exist-here")
            assert missing.status_code == 404
        assert proxy.requests == 3
        assert proxy.delayed_seconds >= 3 * delay
        assert proxy.max_in_flight == 1
        proxy.reset()
        assert proxy.requests == 0
        thread = proxy._thread
    assert thread is not None and not thread.is_alive()
    assert not any(t.name == "delay-proxy" for t in threading.enumerate())


@pytest.mark.integration
def test_the_proxy_process_reports_its_counters_and_stops(fhir_base: str) -> None:
    with DelayProxyProcess(fhir_base, delay=0.01) as proxy:
        with httpx.Client(timeout=30) as http:
            assert http.get(f"{proxy.base_url}/metadata").status_code == 200
            assert http.get(f"{proxy.base_url}/metadata").status_code == 200
        assert proxy.requests == 2  # the counter reads themselves are not counted
        assert proxy.delayed_seconds >= 0.02
        proxy.reset()
        assert proxy.requests == 0
        process = proxy._process
        origin = proxy.base_url.split("/fhir")[0]
    assert process is not None and process.poll() is not None
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{origin}{CONTROL_PATH}/stats", timeout=2)


# ---------------------------------------------------------------------------
# The section
# ---------------------------------------------------------------------------


@pytest.mark.integration
def test_fetch_section_reads_the_same_record_with_both_clients(
    fhir_base: str, loaded_patients: dict[str, LoadedPatient], tmp_path
) -> None:
    patients = list(loaded_patients.values())
    smallest = min(patients, key=lambda p: p.resources)
    ctx = BenchContext(
        fhir_base=fhir_base, patients=patients, largest=smallest, repetitions=1, tiny=True, work_dir=tmp_path
    )
    section = fetch.run(ctx)

    assert section.key == "fetch" and section.skipped is None
    assert section.targets == {"fetch_speedup_50ms": ">= 3"}
    for name in ("fetch_speedup_50ms", "fetch_speedup_direct"):
        value = section.ratios[name]
        assert value is not None and value > 0, name
    figures = section.figures
    assert figures["patient_id"] == smallest.id
    # The same resources, type by type, and the record chartbrief built holds them.
    assert figures["count_differences"] == {}
    assert figures["chartbrief_counts"] == figures["fhirclient_counts"]
    assert figures["chartbrief_counts"]["Patient"] == 1
    assert figures["plain_counts_match"] is True
    assert figures["first_pages_sequential_s"] > 0 and figures["first_pages_concurrent_s"] > 0
    assert figures["chartbrief_resources"] == figures["fhirclient_resources"] > 1
    for rtype, kept in figures["chartbrief_kept"].items():
        assert kept <= figures["chartbrief_counts"][rtype], rtype
    assert not any("NOT read the same" in note for note in section.notes)
    # The same reads make the same requests; the proxy saw and delayed every one of them.
    requests = figures["chartbrief_requests"]
    assert requests == figures["fhirclient_requests"] >= 1 + len(fetch.SEARCHED_TYPES)
    delay = figures["delay_ms"] / 1000
    assert figures["chartbrief_delay_slept_s"] >= requests * delay
    assert figures["fhirclient_delay_slept_s"] >= requests * delay
    # fhirclient waits for each request in turn, so the delays add up in its time (a lower bound);
    # chartbrief waits at least for the Patient read.
    assert figures["fhirclient_proxied_s"] >= requests * delay
    assert figures["chartbrief_proxied_s"] >= delay
    assert figures["fhirclient_max_in_flight"] == 1
    assert 1 <= figures["chartbrief_max_in_flight"] <= figures["max_concurrency"]
    # What the report writer needs: four bars and four rows, all of it JSON.
    assert len(section.bars) == 4 and all(bar.value > 0 and bar.unit == "s" for bar in section.bars)
    assert [(row["client"], row["link"].startswith("+")) for row in section.table] == [
        ("chartbrief", False),
        ("fhirclient", False),
        ("chartbrief", True),
        ("fhirclient", True),
    ]
    json.dumps(section.to_json())
