"""The FHIR side as this deployment configures it: the client and the write options, from `Settings`.

`fhir_adapters` takes plain values and never reads settings; this is the one place that turns
`Settings.fhir` into a `FhirClient` and `Settings.writer` into `WriteOptions`. A caller that
talks to another server than the configured one (an EHR launch's `iss`) passes `base_url` and
keeps every other setting.

What it must not do: open a connection (the client does that on its first request), or send the
configured static bearer token to any server but the configured one.
"""

from __future__ import annotations

from fhir_adapters.write.draft import WriteOptions
from service.config import WriterSettings


def write_options(settings: WriterSettings) -> WriteOptions:
    """How drafts are written, from `Settings.writer`."""
    return WriteOptions(
        identifier_system=settings.identifier_system,
        loinc_type=settings.loinc_type,
        include_structured_json=settings.include_structured_json,
    )
