"""The FHIR side built from settings: the client keeps every setting, the token stays with its server."""

from __future__ import annotations

import pytest
import respx

from fhir_adapters.write.draft import WriteOptions
from service.config import FhirSettings, WriterSettings
from service.fhir import fhir_client, write_options

BASE = "http://127.0.0.1:8999/fhir"
OTHER = "http://127.0.0.1:8998/ehr"
EMPTY_BUNDLE = {"resourceType": "Bundle", "type": "searchset", "entry": []}


def test_a_client_needs_a_base_url_naming_the_setting() -> None:
    with pytest.raises(ValueError, match="CHARTBRIEF_FHIR__BASE_URL"):
        fhir_client(FhirSettings())


async def test_the_client_uses_the_configured_token_and_page_size() -> None:
    settings = FhirSettings(base_url=BASE + "/", bearer_token="s3cret-token", page_size=17)
    with respx.mock(base_url=BASE, assert_all_called=True) as router:
        route = router.get("/Patient").respond(json=EMPTY_BUNDLE)
        async with fhir_client(settings) as fhir:
            assert fhir.base_url == BASE
            await fhir.search_all("Patient")

    request = route.calls.last.request
    assert request.headers["Authorization"] == "Bearer s3cret-token"
    assert request.url.params["_count"] == "17"


async def test_another_base_url_keeps_the_settings_but_never_gets_the_configured_token() -> None:
    settings = FhirSettings(base_url=BASE, bearer_token="s3cret-token", page_size=17, max_attempts=1)
    with respx.mock(base_url=OTHER, assert_all_called=True) as router:
        route = router.get("/Patient").respond(json=EMPTY_BUNDLE)
        async with fhir_client(settings, base_url=OTHER) as fhir:
            assert fhir.base_url == OTHER and fhir.max_attempts == 1
            await fhir.search_all("Patient")

    request = route.calls.last.request
    assert "Authorization" not in request.headers
    assert request.url.params["_count"] == "17"


def test_write_options_are_the_writer_settings() -> None:
    settings = WriterSettings(identifier_system="urn:x", loinc_type="11506-3", include_structured_json=False)
    assert write_options(settings) == WriteOptions("urn:x", "11506-3", False)
    assert write_options(WriterSettings()) == WriteOptions()


def test_write_options_refuse_what_the_writer_cannot_write() -> None:
    with pytest.raises(ValueError, match="loinc_type"):
        WriteOptions(loinc_type="1-1")  # type: ignore[arg-type]  # the check a type checker cannot make
    with pytest.raises(ValueError, match="identifier_system"):
        WriteOptions(identifier_system=" ")
