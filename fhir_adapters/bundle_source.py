"""Bundle files as a FHIR source: a folder of Bundles (Synthea's, or any) read like a FHIR server.

`BundleSource` serves the resources of one Bundle through the `FhirSource` protocol of
`fhir_adapters.fetch`, the way a server would after loading it: `fullUrl` references
(`urn:uuid:...`) rewritten to `Type/id`, searches by `patient` (Observations newest first for
`_sort=-date`), Binary resources of the bundle by url. `fetch_record` then builds from it exactly
the `PatientRecord` it builds from a server: the same validation and skips, the same decoded
notes from DocumentReference attachments and DiagnosticReport.presentedForm, de-duplicated the
same way. `BundleFolder` finds every bundle under a folder (.json and .json.gz, recursively)
and the patients each holds; `read_record` reads one patient's record from its file.

Errors: `BundleError` (a `ValueError`) names the file and the field at fault - a missing folder,
a file that is not JSON or not a Bundle, a Bundle without a Patient, a patient id found twice.
An unknown id asked of a `BundleSource` is `FhirNotFound`, as from a server.

What it must not do: write files, reach the network (an attachment url outside the bundle is
not read), or log anything but ids and counts (file names carry patient names in Synthea).
"""

from __future__ import annotations

import copy
import gzip
import json
import re
import zlib
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from fhir_adapters.auth.scopes import SEARCHED_TYPES
from fhir_adapters.errors import ChartbriefError, FhirBadRequest, FhirNotFound
from fhir_adapters.fetch import fetch_record, refers_to_patient
from fhir_adapters.models import PatientRecord
from fhir_adapters.text import decode_base64

log = structlog.get_logger(__name__)

JsonObject = dict[str, Any]
SearchParams = Mapping[str, str | Sequence[str]]

BUNDLE_SUFFIXES = (".json", ".json.gz")
_GZIP_MAGIC = b"\x1f\x8b"
_SEARCH_PARAMS = frozenset({"patient", "_sort"})
# The element whose date orders a `_sort=date` search, by type (the first one present wins).
_SORT_DATES: tuple[tuple[str, ...], ...] = (
    ("effectiveDateTime",),
    ("effectivePeriod", "start"),
    ("effectiveInstant",),
    ("issued",),
    ("date",),
    ("period", "start"),
    ("authoredOn",),
    ("onsetDateTime",),
    ("recordedDate",),
    ("occurrenceDateTime",),
    ("performedDateTime",),
    ("performedPeriod", "start"),
)


class BundleError(ChartbriefError, ValueError):
    """A bundle file or folder cannot be used; the message names the file and what is wrong."""


class BundleSource:
    """The resources of one Bundle, served through the `FhirSource` protocol (read-only)."""

    def __init__(self, resources: list[JsonObject]) -> None:
        self._by_type: dict[str, dict[str, JsonObject]] = {}
        for resource in resources:
            rid = resource.get("id")
            if isinstance(rid, str) and rid:
                self._by_type.setdefault(str(resource.get("resourceType")), {})[rid] = resource
            else:
                # Kept so that `fetch` reports it ("missing id") like a server's bad entry.
                self._by_type.setdefault(str(resource.get("resourceType")), {})[f"#{id(resource)}"] = resource

    @classmethod
    def from_bundle(cls, bundle: JsonObject) -> BundleSource:
        """Load a Bundle as a server would: ids from `fullUrl` when missing, references rewritten."""
        return cls(server_view(bundle))

    def patient_ids(self) -> list[str]:
        """The ids of the bundle's Patients, in the bundle's order."""
        return [rid for rid in self._by_type.get("Patient", {}) if not rid.startswith("#")]

    async def read(self, resource_type: str, id: str) -> JsonObject:
        found = self._by_type.get(resource_type, {}).get(id)
        if found is None:
            where = f"{resource_type}/{id}"
            raise FhirNotFound(f"{where} is not in the bundle", status=404, url=where)
        return copy.deepcopy(found)

    async def search(self, resource_type: str, params: SearchParams) -> AsyncIterator[JsonObject]:
        for resource in await self.search_all(resource_type, params):
            yield resource

    async def search_all(
        self, resource_type: str, params: SearchParams, *, limit: int | None = None
    ) -> list[JsonObject]:
        unknown = sorted(set(params) - _SEARCH_PARAMS)
        if unknown:
            raise FhirBadRequest(f"a bundle source searches by patient and _sort only, not {unknown}")
        found = list(self._by_type.get(resource_type, {}).values())
        patient = params.get("patient")
        if isinstance(patient, str):
            element = SEARCHED_TYPES.get(resource_type, "subject")
            found = [r for r in found if refers_to_patient(_reference(r.get(element)), patient)]
        sort = params.get("_sort")
        if sort in ("date", "-date"):
            found.sort(key=lambda r: sort_date(r) or "", reverse=sort == "-date")
        if limit is not None:
            found = found[:limit]
        return [copy.deepcopy(r) for r in found]

    async def binary(self, url: str) -> tuple[bytes, str]:
        match = re.fullmatch(r"(?:.*/)?Binary/([^/?#]+)", url)
        binary = self._by_type.get("Binary", {}).get(match.group(1)) if match else None
        if binary is None:
            # A bundle has no server behind it: an attachment outside it cannot be read.
            raise FhirNotFound("attachment url is not a Binary of the bundle", url=url)
        data = binary.get("data")
        return decode_base64(data) if isinstance(data, str) else b"", str(binary.get("contentType") or "")


def server_view(bundle: JsonObject) -> list[JsonObject]:
    """The bundle's resources as a server stores them after a transaction. Pure (copies).

    An entry without an id takes the last segment of its `fullUrl`; every reference to a
    `fullUrl` becomes `Type/id`.

    >>> view = server_view({"entry": [
    ...     {"fullUrl": "urn:uuid:p1", "resource": {"resourceType": "Patient"}},
    ...     {"fullUrl": "urn:uuid:c1", "resource": {"resourceType": "Condition", "id": "c1",
    ...      "subject": {"reference": "urn:uuid:p1"}}}]})
    >>> view[0]["id"], view[1]["subject"]["reference"]
    ('p1', 'Patient/p1')
    """
    resources: list[JsonObject] = []
    targets: dict[str, str] = {}
    for entry in bundle.get("entry") or []:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict):
            continue
        resource = copy.deepcopy(resource)
        full_url = entry.get("fullUrl")
        if not (isinstance(resource.get("id"), str) and resource["id"]) and isinstance(full_url, str):
            resource["id"] = re.split(r"[/:]", full_url)[-1]
        if isinstance(full_url, str) and isinstance(resource.get("id"), str):
            targets[full_url] = f"{resource.get('resourceType')}/{resource['id']}"
        resources.append(resource)
    for resource in resources:
        _rewrite(resource, targets)
    return resources


def sort_date(resource: JsonObject) -> str | None:
    """The date a `_sort=date` search orders a resource by.

    >>> sort_date({"effectivePeriod": {"start": "2020-01-02"}}), sort_date({"id": "x"})
    ('2020-01-02', None)
    """
    for path in _SORT_DATES:
        node: Any = resource
        for step in path:
            node = node.get(step) if isinstance(node, dict) else None
        if isinstance(node, str) and node:
            return node
    return None


def read_bundle(path: Path) -> JsonObject:
    """One Bundle file (plain or gzip-compressed JSON), checked to be a Bundle with a list of entries.

    Compression is told by the content as well as the name, so a renamed file still reads. A file
    that cannot be used raises `BundleError` naming the file and what is wrong with it.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise BundleError(f"{path}: cannot be read ({exc.strerror or type(exc).__name__})") from exc
    if raw[:2] == _GZIP_MAGIC or path.name.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise BundleError(f"{path}: not a valid gzip file") from exc
    try:
        bundle = json.loads(raw)
    except UnicodeDecodeError as exc:
        raise BundleError(f"{path}: not UTF-8 text") from exc
    except json.JSONDecodeError as exc:
        raise BundleError(
            f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from exc
    if not isinstance(bundle, dict):
        raise BundleError(f"{path}: not a FHIR Bundle (the JSON is {_json_kind(bundle)}, not an object)")
    if bundle.get("resourceType") != "Bundle":
        found = bundle.get("resourceType")
        what = "no resourceType" if found is None else f"resourceType is {found!r}, not 'Bundle'"
        raise BundleError(f"{path}: not a FHIR Bundle ({what})")
    if not isinstance(bundle.get("entry"), list):
        raise BundleError(f"{path}: Bundle.entry is missing or not a list")
    return bundle


def _json_kind(value: object) -> str:
    """What a JSON document is, in JSON's words.

    >>> _json_kind([1]), _json_kind("x"), _json_kind(None), _json_kind(True), _json_kind(2.5)
    ('an array', 'a string', 'null', 'a boolean', 'a number')
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    return "a number"


def bundle_files(root: Path) -> list[Path]:
    """Every .json and .json.gz file under `root`, recursively, in path order."""
    if not root.exists():
        raise BundleError(f"{root}: no such folder")
    if not root.is_dir():
        raise BundleError(f"{root}: not a folder")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(BUNDLE_SUFFIXES))


@dataclass(frozen=True)
class BundleFile:
    path: Path
    patients: tuple[str, ...]


@dataclass(frozen=True)
class BundleFolder:
    """The bundles under a folder and the patients in each; records are read from the files on demand
    (one file at a time, so a folder of thousands of patients never sits in memory at once)."""

    root: Path
    files: tuple[BundleFile, ...]

    @classmethod
    def scan(cls, root: Path) -> BundleFolder:
        """Index every bundle under `root`; every bundle must hold a Patient, every id be unique."""
        paths = bundle_files(root)
        if not paths:
            raise BundleError(f"{root}: no .json or .json.gz bundle in this folder or below")
        files: list[BundleFile] = []
        owner: dict[str, Path] = {}
        for path in paths:
            patients = tuple(BundleSource.from_bundle(read_bundle(path)).patient_ids())
            if not patients:
                raise BundleError(f"{path}: no Patient resource with an id in Bundle.entry")
            for pid in patients:
                if pid in owner:
                    raise BundleError(f"{path}: Patient/{pid} is also in {owner[pid]}")
                owner[pid] = path
            files.append(BundleFile(path, patients))
        log.info("bundles.scanned", files=len(files), patients=len(owner))
        return cls(root, tuple(files))

    def patient_ids(self) -> list[str]:
        return [pid for f in self.files for pid in f.patients]

    def file_of(self, patient_id: str) -> Path:
        for f in self.files:
            if patient_id in f.patients:
                return f.path
        raise BundleError(f"{self.root}: no bundle holds Patient/{patient_id}")

    def source(self, patient_id: str) -> BundleSource:
        return BundleSource.from_bundle(read_bundle(self.file_of(patient_id)))

    async def read_record(
        self, patient_id: str, *, observation_limit: int = 200, max_concurrency: int = 10
    ) -> PatientRecord:
        """The patient's record, built by `fetch_record` from its bundle as from a server."""
        return await fetch_record(
            self.source(patient_id),
            patient_id,
            observation_limit=observation_limit,
            max_concurrency=max_concurrency,
        )

    def __iter__(self) -> Iterator[BundleFile]:
        return iter(self.files)


def _reference(target: object) -> str | None:
    value = target.get("reference") if isinstance(target, dict) else None
    return value if isinstance(value, str) else None


def _rewrite(node: Any, targets: dict[str, str]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str) and value in targets:
                node[key] = targets[value]
            else:
                _rewrite(value, targets)
    elif isinstance(node, list):
        for item in node:
            _rewrite(item, targets)


__all__ = [
    "BUNDLE_SUFFIXES",
    "BundleError",
    "BundleFile",
    "BundleFolder",
    "BundleSource",
    "bundle_files",
    "read_bundle",
    "server_view",
    "sort_date",
]
