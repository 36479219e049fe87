"""Attachment charsets: only text codecs decode a note; any other codec name skips that attachment."""

from __future__ import annotations

import base64
import zlib
from typing import Any

import pytest

from fhir_adapters.fetch import fetch_record
from fhir_adapters.text import UnsupportedContent, decode_text, ensure_supported
from tests.fakes import FakeFhirSource, bundle_patient, load_synthea

# Codec names Python knows that are not text encodings: bytes-to-bytes and str-to-str transforms.
NOT_TEXT = ["zlib", "zlib_codec", "base64", "bz2", "hex", "quopri", "uu", "rot13", "rot_13"]


@pytest.mark.parametrize("charset", NOT_TEXT)
def test_a_non_text_codec_is_unsupported_content_naming_the_charset(charset: str) -> None:
    with pytest.raises(UnsupportedContent, match=f"charset {charset} is not a text encoding"):
        ensure_supported(f"text/plain; charset={charset}")
    with pytest.raises(UnsupportedContent):
        decode_text(zlib.compress(b"hello"), f"text/plain; charset={charset}")


@pytest.mark.parametrize("charset", ["utf-8", "UTF-16", "latin-1", "cp1252", "ascii", "shift_jis"])
def test_text_codecs_still_decode(charset: str) -> None:
    assert decode_text("Stable.".encode(charset), f"text/plain; charset={charset}") == "Stable."


async def test_a_zlib_charset_on_one_attachment_skips_it_by_name_and_keeps_the_rest() -> None:
    bundle = load_synthea("Beatris270")
    source = FakeFhirSource.from_bundle(bundle)
    patient_id = str(bundle_patient(bundle)["id"])
    good = "Seen today for follow up; doing well."

    def doc(id: str, attachment: dict[str, Any]) -> dict[str, Any]:
        return {
            "resourceType": "DocumentReference",
            "id": id,
            "status": "current",
            "subject": {"reference": f"Patient/{patient_id}"},
            "date": "2024-01-15T10:00:00Z",
            "content": [{"attachment": attachment}],
        }

    crafted = base64.b64encode(zlib.compress(b"x" * 1000)).decode("ascii")
    source.add(doc("doc-zlib", {"contentType": "text/plain; charset=zlib", "data": crafted}))
    url = source.add_binary(zlib.compress(b"y" * 1000), "text/plain; charset=zlib", id="zbin")
    source.add(doc("doc-zlib-url", {"url": url}))
    source.add(doc("doc-ok", {"contentType": "text/plain", "data": base64.b64encode(good.encode()).decode()}))

    record = await fetch_record(source, patient_id)

    reasons = {s.resource: s.reason for s in record.skipped}
    assert reasons["DocumentReference/doc-zlib#content[0]"] == "charset zlib is not a text encoding"
    assert reasons["DocumentReference/doc-zlib-url#content[0]"] == "charset zlib is not a text encoding"
    assert good in [n.text for n in record.notes]
    assert not any(n.source.id.startswith("doc-zlib") for n in record.notes)
