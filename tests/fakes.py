"""In-memory stand-ins for the IO seams, for tests.

`FakeFhirSource` implements the `FhirSource` protocol of `fhir_adapters.fetch` over a Synthea
transaction Bundle, the way a FHIR server would after loading it: every resource has an id and
`meta.versionId`, `urn:uuid:` references are rewritten to `Type/id`, and an unknown id raises
the real client's `FhirNotFound`. It records every call and the highest number of calls that
were in flight at once, so tests can check concurrency bounds.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import functools
import gzip
import json
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from fhir_adapters.bundle_source import sort_date
from fhir_adapters.errors import FhirBadRequest, FhirError, FhirNotFound

JsonObject = dict[str, Any]
SearchParams = Mapping[str, str | Sequence[str]]

SYNTHEA_DIR = Path(__file__).parent / "fixtures" / "synthea"

# Where each type names its patient (the date `_sort=date` orders by is `sort_date`).
_PATIENT_ELEMENTS = ("subject", "patient")
_SUPPORTED_PARAMS = frozenset({"patient", "_sort", "_count"})


def synthea_path(prefix: str) -> Path:
    """The fixture file whose name starts with `prefix` ("Beatris270")."""
    matches = sorted(SYNTHEA_DIR.glob(f"{prefix}*.json*"))
    if len(matches) != 1:
        raise FileNotFoundError(
            f"expected one Synthea fixture starting with {prefix!r}, found {len(matches)}"
        )
    return matches[0]


def load_synthea(prefix: str) -> JsonObject:
    """A Synthea Bundle from tests/fixtures/synthea (plain or gzip-compressed JSON). A fresh copy."""
    return copy.deepcopy(_load_synthea(prefix))


@functools.cache
def _load_synthea(prefix: str) -> JsonObject:
    path = synthea_path(prefix)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    bundle: JsonObject = json.loads(raw)
    return bundle


def bundle_resources(bundle: JsonObject, resource_type: str) -> list[JsonObject]:
    """The resources of one type in a Bundle, as written (for computing expectations independently)."""
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == resource_type]


def bundle_patient(bundle: JsonObject) -> JsonObject:
    (patient,) = bundle_resources(bundle, "Patient")
    return patient


class FakeFhirSource:
    """A FHIR server in a dict. Async methods yield to the event loop so calls really overlap."""

    def __init__(self, *, delay: float = 0.0) -> None:
        self._store: dict[str, dict[str, JsonObject]] = {}
        self._refused: dict[str, FhirError] = {}
        self._strays: dict[str, list[JsonObject]] = {}
        self._next_id = 0
        self.delay = delay
        self.supports_sort = True  # False: `_sort` is refused with a 400, as some servers do
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self.in_flight = 0
        self.max_in_flight = 0

    # -- building ------------------------------------------------------------

    @classmethod
    def from_bundle(cls, bundle: JsonObject, *, delay: float = 0.0) -> FakeFhirSource:
        """Load a transaction Bundle as a server would: ids kept or assigned, urn:uuid refs rewritten."""
        source = cls(delay=delay)
        entries = [e for e in bundle.get("entry") or [] if isinstance(e.get("resource"), dict)]
        resources = [copy.deepcopy(e["resource"]) for e in entries]
        targets: dict[str, str] = {}
        for entry, resource in zip(entries, resources, strict=True):
            rid = source._assign_id(resource)
            full_url = entry.get("fullUrl")
            if isinstance(full_url, str):
                targets[full_url] = f"{resource['resourceType']}/{rid}"
        for resource in resources:
            _rewrite_references(resource, targets)
            source._put(resource)
        return source

    def add(self, resource: JsonObject) -> JsonObject:
        """Store one more resource (an id and versionId are assigned when missing); returns it."""
        stored = copy.deepcopy(resource)
        self._assign_id(stored)
        self._put(stored)
        return copy.deepcopy(stored)

    def add_binary(self, content: bytes, content_type: str, *, id: str | None = None) -> str:
        """Store a Binary resource and return its relative URL (`Binary/<id>`)."""
        binary = {
            "resourceType": "Binary",
            "contentType": content_type,
            "data": base64.b64encode(content).decode("ascii"),
        }
        if id is not None:
            binary["id"] = id
        stored = self.add(binary)
        return f"Binary/{stored['id']}"

    def add_stray(self, resource: JsonObject) -> None:
        """A resource every search of its type returns, whatever the parameters (a misbehaving server)."""
        self._strays.setdefault(resource["resourceType"], []).append(copy.deepcopy(resource))

    def refuse(self, resource_type: str, error: FhirError) -> None:
        """Make every search of `resource_type` raise `error` (e.g. a 403 for a missing scope)."""
        self._refused[resource_type] = error

    def resources(self, resource_type: str) -> list[JsonObject]:
        """Copies of the stored resources of one type."""
        return [copy.deepcopy(r) for r in self._store.get(resource_type, {}).values()]

    def _assign_id(self, resource: JsonObject) -> str:
        rid = resource.get("id")
        if not isinstance(rid, str) or not rid:
            self._next_id += 1
            rid = f"fake-{self._next_id}"
            resource["id"] = rid
        meta = resource.setdefault("meta", {})
        meta.setdefault("versionId", "1")
        return rid

    def _put(self, resource: JsonObject) -> None:
        self._store.setdefault(resource["resourceType"], {})[resource["id"]] = resource

    # -- the FhirSource protocol ----------------------------------------------

    async def read(self, resource_type: str, id: str) -> JsonObject:
        async with self._call("read", resource_type, {"id": id}):
            resource = self._store.get(resource_type, {}).get(id)
            if resource is None:
                raise FhirNotFound(
                    f"FHIR server answered 404 to GET {resource_type}/{id}",
                    status=404,
                    url=f"{resource_type}/{id}",
                )
            return copy.deepcopy(resource)

    async def search(self, resource_type: str, params: SearchParams) -> AsyncIterator[JsonObject]:
        for resource in await self.search_all(resource_type, params):
            yield resource

    async def search_all(
        self, resource_type: str, params: SearchParams, *, limit: int | None = None
    ) -> list[JsonObject]:
        async with self._call("search", resource_type, {**params, "_limit": limit}):
            if resource_type in self._refused:
                raise self._refused[resource_type]
            supported = _SUPPORTED_PARAMS if self.supports_sort else _SUPPORTED_PARAMS - {"_sort"}
            unknown = set(params) - supported
            if unknown:
                raise FhirBadRequest(f"fake server does not support {sorted(unknown)}", status=400)
            found = list(self._store.get(resource_type, {}).values())
            patient = params.get("patient")
            if patient is not None:
                found = [r for r in found if _mentions_patient(r, str(patient))]
            sort = params.get("_sort")
            if sort in ("date", "-date"):
                found.sort(key=lambda r: sort_date(r) or "", reverse=sort == "-date")
            found += self._strays.get(resource_type, [])
            if limit is not None:
                found = found[:limit]
            return [copy.deepcopy(r) for r in found]

    async def binary(self, url: str) -> tuple[bytes, str]:
        async with self._call("binary", "Binary", {"url": url}):
            match = re.search(r"(?:^|/)Binary/([^/?#]+)$", url)
            binary = self._store.get("Binary", {}).get(match.group(1)) if match else None
            if binary is None:
                raise FhirNotFound(f"FHIR server answered 404 to GET {url}", status=404, url=url)
            return base64.b64decode(binary.get("data") or ""), str(binary.get("contentType"))

    def _call(self, kind: str, resource_type: str, details: dict[str, Any]) -> _InFlight:
        self.calls.append((kind, resource_type, details))
        return _InFlight(self)


class _InFlight:
    """Counts overlapping calls; the pause lets other tasks start before this one ends."""

    def __init__(self, source: FakeFhirSource) -> None:
        self._source = source

    async def __aenter__(self) -> None:
        self._source.in_flight += 1
        self._source.max_in_flight = max(self._source.max_in_flight, self._source.in_flight)
        await asyncio.sleep(self._source.delay)

    async def __aexit__(self, *exc: object) -> None:
        self._source.in_flight -= 1


def _rewrite_references(node: Any, targets: dict[str, str]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str) and value in targets:
                node[key] = targets[value]
            else:
                _rewrite_references(value, targets)
    elif isinstance(node, list):
        for item in node:
            _rewrite_references(item, targets)


def _mentions_patient(resource: JsonObject, patient_id: str) -> bool:
    for element in _PATIENT_ELEMENTS:
        target = resource.get(element)
        if isinstance(target, dict) and target.get("reference") == f"Patient/{patient_id}":
            return True
    return False
