"""A folder of bundle files is a FHIR source like a server: the same record, the same notes, clear errors."""

from __future__ import annotations

import base64
import doctest
import gzip
import hashlib
import json
from pathlib import Path

import pytest

import fhir_adapters.bundle_source
from fhir_adapters.bundle_source import BundleError, BundleFolder, BundleSource, read_bundle
from fhir_adapters.errors import FhirNotFound
from fhir_adapters.fetch import fetch_record
from tests.fakes import FakeFhirSource, bundle_patient, load_synthea, synthea_path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _write(path: Path, bundle: dict, *, gz: bool = False) -> Path:
    raw = json.dumps(bundle).encode()
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def _patient_bundle(pid: str, *extra: dict) -> dict:
    entries = [
        {"fullUrl": f"urn:uuid:{pid}", "resource": {"resourceType": "Patient", "id": pid, "gender": "female"}}
    ]
    entries += [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in extra]
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def test_folder_finds_every_bundle_recursively_plain_and_gzip() -> None:
    folder = BundleFolder.scan(FIXTURES)

    names = [f.path.name for f in folder]
    assert len(names) == 20
    assert any(n.endswith(".json.gz") for n in names) and any(n.endswith(".json") for n in names)
    assert {f.path.parent.name for f in folder} == {"synthea", "synthea-more"}
    assert len(set(folder.patient_ids())) == 20
    assert all(len(f.patients) == 1 for f in folder)


async def test_record_from_bundle_files_is_the_record_fetch_builds_from_a_server() -> None:
    bundle = load_synthea("Beatris270")
    pid = bundle_patient(bundle)["id"]
    folder = BundleFolder.scan(synthea_path("Beatris270").parent)

    from_files = await folder.read_record(pid)
    from_server = await fetch_record(FakeFhirSource.from_bundle(bundle), pid)

    def ids(record):  # the fake server adds meta.versionId; a bundle file has none to give
        return {t: sorted(r["id"] for r in rs) for t, rs in record.resources.items()}

    assert ids(from_files) == ids(from_server)
    assert [n.sha256 for n in from_files.notes] == [n.sha256 for n in from_server.notes]
    assert [(n.source.reference, n.title, n.date) for n in from_files.notes] == [
        (n.source.reference, n.title, n.date) for n in from_server.notes
    ]
    assert from_files.skipped == from_server.skipped
    assert from_files.patient["id"] == pid


async def test_notes_are_decoded_and_a_report_repeating_a_note_is_kept_once() -> None:
    bundle = load_synthea("Beatris270")
    pid = bundle_patient(bundle)["id"]
    texts = []
    for entry in bundle["entry"]:
        resource = entry["resource"]
        if resource["resourceType"] == "DocumentReference":
            texts += [c["attachment"]["data"] for c in resource.get("content", [])]
        if resource["resourceType"] == "DiagnosticReport":
            texts += [a["data"] for a in resource.get("presentedForm", [])]
    decoded = [base64.b64decode(t).decode() for t in texts]
    distinct = {hashlib.sha256(" ".join(t.split()).encode()).hexdigest() for t in decoded if t.strip()}
    assert len(decoded) > len(distinct), "the fixture repeats its notes in DiagnosticReport.presentedForm"

    record = await BundleFolder.scan(synthea_path("Beatris270").parent).read_record(pid)

    assert len(record.notes) == len(distinct)
    assert {n.source.resource_type for n in record.notes} == {"DocumentReference"}
    assert all(n.text.strip() and n.content_type == "text/plain" for n in record.notes)


def _observation(oid: str, subject: str, when: str) -> dict:
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "code": {"text": "x"},
        "subject": {"reference": subject},
        "effectiveDateTime": when,
    }


async def test_searches_keep_the_patients_resources_and_sort_observations_newest_first() -> None:
    other = _observation("o-other", "Patient/someone-else", "2024-01-01")
    old = _observation("o-old", "urn:uuid:p1", "2001-01-01")
    new = _observation("o-new", "urn:uuid:p1", "2020-01-01")
    source = BundleSource.from_bundle(_patient_bundle("p1", old, other, new))

    found = await source.search_all("Observation", {"patient": "p1", "_sort": "-date"}, limit=5)
    assert [r["id"] for r in found] == ["o-new", "o-old"]
    assert found[0]["subject"]["reference"] == "Patient/p1"  # rewritten as a server would
    assert [r["id"] for r in await source.search_all("Observation", {"patient": "p1"}, limit=1)] == ["o-old"]
    with pytest.raises(FhirNotFound):
        await source.read("Patient", "nobody")


async def test_attachment_urls_are_read_from_the_bundles_binaries_and_never_from_the_network() -> None:
    binary = {
        "resourceType": "Binary",
        "id": "b1",
        "contentType": "text/plain",
        "data": base64.b64encode(b"Seen for cough.").decode(),
    }

    def doc(did: str, url: str) -> dict:
        return {
            "resourceType": "DocumentReference",
            "id": did,
            "status": "current",
            "subject": {"reference": "urn:uuid:p1"},
            "type": {"text": "Progress note"},
            "content": [{"attachment": {"contentType": "text/plain", "url": url}}],
        }

    source = BundleSource.from_bundle(
        _patient_bundle("p1", binary, doc("d1", "Binary/b1"), doc("d2", "https://elsewhere.example/Binary/9"))
    )
    record = await fetch_record(source, "p1")

    assert [n.text for n in record.notes] == ["Seen for cough."]
    assert [s.resource for s in record.skipped] == ["DocumentReference/d2#content[0]"]
    assert "could not be read" in record.skipped[0].reason


def test_a_bundle_without_a_patient_is_refused_naming_the_file(tmp_path: Path) -> None:
    _write(tmp_path / "a.json", _patient_bundle("p1"))
    (tmp_path / "sub").mkdir()
    organizations = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [{"resource": {"resourceType": "Organization", "id": "o"}}],
    }
    _write(tmp_path / "sub" / "orgs.json.gz", organizations, gz=True)

    with pytest.raises(BundleError, match=r"orgs\.json\.gz: no Patient resource"):
        BundleFolder.scan(tmp_path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", r"bad\.json: not valid JSON \(line 1, column 2: Expecting property name"),
        (b'{"resourceType": "Bundle\xe9"}', r"bad\.json: not UTF-8 text"),
        (
            b'{"resourceType": "Patient", "id": "x"}',
            r"bad\.json: not a FHIR Bundle \(resourceType is 'Patient', not 'Bundle'\)",
        ),
        (b'{"id": "x"}', r"bad\.json: not a FHIR Bundle \(no resourceType\)"),
        (b"[1, 2]", r"bad\.json: not a FHIR Bundle \(the JSON is an array, not an object\)"),
        (b'{"resourceType": "Bundle"}', r"bad\.json: Bundle\.entry is missing"),
        (b"\x1f\x8b\x08garbage", r"bad\.json: not a valid gzip file"),
    ],
)
def test_a_file_that_is_not_a_bundle_is_refused_naming_it(
    tmp_path: Path, content: bytes, message: str
) -> None:
    (tmp_path / "bad.json").write_bytes(content)
    with pytest.raises(BundleError, match=message):
        read_bundle(tmp_path / "bad.json")


def test_a_file_named_gz_that_is_not_gzip_is_refused_naming_it(tmp_path: Path) -> None:
    (tmp_path / "plain.json.gz").write_bytes(json.dumps(_patient_bundle("p1")).encode())
    with pytest.raises(BundleError, match=r"plain\.json\.gz: not a valid gzip file"):
        read_bundle(tmp_path / "plain.json.gz")


def test_a_missing_file_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"nowhere\.json: cannot be read \(No such file"):
        read_bundle(tmp_path / "nowhere.json")


def test_plain_gzipped_and_renamed_gzipped_files_read_alike(tmp_path: Path) -> None:
    plain = synthea_path("Kermit_Trantow")
    packed = tmp_path / "b.json.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    renamed = tmp_path / "b.json"
    renamed.write_bytes(packed.read_bytes())

    assert read_bundle(packed) == read_bundle(renamed) == read_bundle(plain) == load_synthea("Kermit_Trantow")


def test_bundle_source_doctests_pass() -> None:
    assert doctest.testmod(fhir_adapters.bundle_source).failed == 0


def test_a_missing_or_empty_folder_and_a_repeated_patient_are_refused(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no such folder"):
        BundleFolder.scan(tmp_path / "absent")
    with pytest.raises(BundleError, match="no .json or .json.gz bundle"):
        BundleFolder.scan(tmp_path)
    _write(tmp_path / "one.json", _patient_bundle("p1"))
    _write(tmp_path / "two.json", _patient_bundle("p1"))
    with pytest.raises(BundleError, match=r"two\.json: Patient/p1 is also in .*one\.json"):
        BundleFolder.scan(tmp_path)
