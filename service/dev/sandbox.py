"""Load Synthea patient bundles into a FHIR R4 sandbox server (HAPI, sekmet or any other).

Synthea 3.x bundles point at practitioners, organizations and locations through conditional
references (`Practitioner?identifier=http://hl7.org/fhir/sid/us-npi|9999950899`) whose targets
live in separate files that are rarely published, so a fresh server rejects the whole
transaction. This loader first creates a minimal placeholder for every such target, with a
conditional create on its identifier (a re-run finds the placeholder instead of adding another),
then posts the bundle as one transaction and reports the server id the Patient received.

Synthea 2.4 bundles carry their providers inline; those entries get an `ifNoneExist` on their
identifier so that patients sharing a provider share one server resource.

Pure parts (`conditional_targets`, `target_resource`, `as_transaction`, ...) take and return
plain JSON; files are read by `fhir_adapters.bundle_source.read_bundle`; `ensure_targets`,
`load_bundle` and `load_files` talk to the server through the FHIR client.

What it must not do: log a file name, a patient name or any resource content (Synthea file
names contain the patient's name: logs carry counts and server ids only); rewrite clinical
content; or hide a failed load (every skipped file is reported with its reason).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl, quote

import structlog

from fhir_adapters.bundle_source import BundleError, read_bundle
from fhir_adapters.errors import ChartbriefError, FhirError, FhirTransportError

JsonObject = dict[str, Any]

# Resource types a placeholder can be made for: the ones Synthea references conditionally.
TARGET_TYPES = ("Practitioner", "Organization", "Location")
# Conditional creates in flight at once; enough to hide latency, few enough not to flood a sandbox.
TARGET_CONCURRENCY = 8
PLACEHOLDER_TAG = {
    "system": "urn:chartbrief:sandbox",
    "code": "conditional-target",
    "display": "Placeholder created by the chartbrief sandbox loader from a conditional reference",
}

_NAME_PREFIXES = frozenset({"dr.", "dr", "mr.", "mrs.", "ms.", "miss", "prof.", "prof"})
_NAME_SUFFIXES = frozenset({"jr.", "sr.", "ii", "iii", "iv", "md", "m.d.", "phd", "ph.d.", "do", "rn", "np"})
_TYPE_NAME = re.compile(r"^[A-Z][A-Za-z]+$")

_log = structlog.get_logger(__name__)


class SandboxError(ChartbriefError):
    """A Bundle that cannot be loaded as it is (unusable type, entries without requests, no Patient).

    A file that cannot be read as a Bundle at all is the `BundleError` of `read_bundle`.
    """


@dataclass(frozen=True)
class ConditionalTarget:
    """A resource that a bundle references as `Type?identifier=system|value`."""

    resource_type: str
    system: str
    value: str
    display: str | None = None

    @property
    def criteria(self) -> str:
        """The search criteria (`identifier=system|value`) for If-None-Exist and searches."""
        return identifier_criteria(self.system, self.value)

    @property
    def search_value(self) -> str:
        """The `identifier` search parameter's value, unencoded (for a client's params mapping)."""
        return f"{_escape_token(self.system)}|{_escape_token(self.value)}"


@dataclass(frozen=True)
class LoadedPatient:
    """One bundle loaded: the server id its Patient got and how many entries were posted."""

    id: str
    name: str
    source_file: str
    resources: int


@dataclass(frozen=True)
class LoadFailure:
    """A bundle file that was skipped, and why (`reason` may name the file: show it, do not log it)."""

    source_file: str
    reason: str


class SandboxClient(Protocol):
    """The part of `fhir_adapters.client.FhirClient` the loader uses."""

    async def create(self, resource: JsonObject, *, if_none_exist: str | None = None) -> JsonObject: ...

    async def transaction(self, bundle: JsonObject, *, idempotent: bool = False) -> JsonObject: ...


# ---------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------


def _escape_token(text: str) -> str:
    r"""Escape FHIR search's special characters in one part of a token value.

    >>> _escape_token(r"a|b,c$d\e")
    'a\\|b\\,c\\$d\\\\e'
    """
    out = text.replace("\\", "\\\\")
    for special in ("|", ",", "$"):
        out = out.replace(special, "\\" + special)
    return out


def identifier_criteria(system: str, value: str) -> str:
    """`identifier=system|value` as a query string, escaped and percent-encoded where needed.

    >>> identifier_criteria("http://hl7.org/fhir/sid/us-npi", "9999950899")
    'identifier=http://hl7.org/fhir/sid/us-npi|9999950899'
    >>> identifier_criteria("urn:x", "a&b c")
    'identifier=urn:x|a%26b%20c'
    """
    token = f"{_escape_token(system)}|{_escape_token(value)}"
    return "identifier=" + quote(token, safe=":/|")


def parse_conditional_reference(reference: str) -> tuple[str, str, str] | None:
    """(type, system, value) of `Type?identifier=system|value`, or None for any other reference.

    >>> parse_conditional_reference("Practitioner?identifier=http://hl7.org/fhir/sid/us-npi|9999950899")
    ('Practitioner', 'http://hl7.org/fhir/sid/us-npi', '9999950899')
    >>> parse_conditional_reference("urn:uuid:1b2c") is None
    True
    >>> parse_conditional_reference("Organization?name=Acme") is None
    True
    """
    resource_type, sep, query = reference.partition("?")
    if not sep or not _TYPE_NAME.match(resource_type):
        return None
    params = parse_qsl(query, keep_blank_values=True)
    if len(params) != 1 or params[0][0] != "identifier":
        return None
    system, bar, value = params[0][1].partition("|")
    if not bar or not system or not value:
        return None
    return resource_type, system, value


def _references(node: Any) -> Iterator[JsonObject]:
    """Every Reference-shaped object (a dict with a string `reference`) anywhere in `node`."""
    if isinstance(node, dict):
        if isinstance(node.get("reference"), str):
            yield node
        for child in node.values():
            yield from _references(child)
    elif isinstance(node, list):
        for child in node:
            yield from _references(child)


def conditional_references(bundle: JsonObject) -> list[str]:
    """Every distinct conditional reference (`Type?...`) in the bundle, understood or not, in order."""
    seen: dict[str, None] = {}
    for ref in _references(bundle.get("entry") or []):
        value = ref["reference"]
        if "?" in value and not value.startswith(("http://", "https://", "urn:", "#")):
            seen.setdefault(value, None)
    return list(seen)


def conditional_targets(bundle: JsonObject) -> list[ConditionalTarget]:
    """Every distinct `Type?identifier=system|value` target of the bundle, in first-seen order.

    The display is the one the bundle uses most often for that target (Synthea leaves it out on
    some references); None when no reference carries one.
    """
    displays: dict[tuple[str, str, str], Counter[str]] = {}
    for ref in _references(bundle.get("entry") or []):
        parsed = parse_conditional_reference(ref["reference"])
        if parsed is None:
            continue
        counts = displays.setdefault(parsed, Counter())
        display = ref.get("display")
        if isinstance(display, str) and display.strip():
            counts[display.strip()] += 1
    targets: list[ConditionalTarget] = []
    for (resource_type, system, value), counts in displays.items():
        # most_common keeps first-seen order among ties, so the choice is deterministic
        best = counts.most_common(1)[0][0] if counts else None
        targets.append(ConditionalTarget(resource_type, system, value, best))
    return targets


def practitioner_name(display: str) -> JsonObject:
    """A HumanName from a display like "Dr. Elisa944 Rojo930" (best effort; `text` is always kept).

    >>> practitioner_name("Dr. Elisa944 Rojo930")
    {'text': 'Dr. Elisa944 Rojo930', 'family': 'Rojo930', 'given': ['Elisa944'], 'prefix': ['Dr.']}
    >>> practitioner_name("Ana María Pérez MD")
    {'text': 'Ana María Pérez MD', 'family': 'Pérez', 'given': ['Ana', 'María'], 'suffix': ['MD']}
    >>> practitioner_name("Smith")
    {'text': 'Smith', 'family': 'Smith'}
    """
    words = display.split()
    prefix: list[str] = []
    suffix: list[str] = []
    while len(words) > 1 and words[0].lower() in _NAME_PREFIXES:
        prefix.append(words.pop(0))
    while len(words) > 1 and words[-1].lower().rstrip(",") in _NAME_SUFFIXES:
        suffix.insert(0, words.pop().rstrip(","))
    name: JsonObject = {"text": " ".join(display.split())}
    if words:
        name["family"] = words[-1]
    if len(words) > 1:
        name["given"] = words[:-1]
    if prefix:
        name["prefix"] = prefix
    if suffix:
        name["suffix"] = suffix
    return name


def target_resource(target: ConditionalTarget) -> JsonObject:
    """A minimal valid Practitioner / Organization / Location carrying the target's identifier.

    Raises ValueError for any other resource type (no placeholder can be made safely).
    """
    if target.resource_type not in TARGET_TYPES:
        raise ValueError(
            f"cannot create a placeholder {target.resource_type} for a conditional reference: "
            f"only {', '.join(TARGET_TYPES)} are supported"
        )
    resource: JsonObject = {
        "resourceType": target.resource_type,
        "meta": {"tag": [dict(PLACEHOLDER_TAG)]},
        "identifier": [{"system": target.system, "value": target.value}],
    }
    if target.resource_type == "Practitioner":
        resource["active"] = True
        if target.display:
            resource["name"] = [practitioner_name(target.display)]
    elif target.resource_type == "Organization":
        resource["active"] = True
        if target.display:
            resource["name"] = target.display
    else:
        resource["status"] = "active"
        if target.display:
            resource["name"] = target.display
    return resource


def _first_identifier(resource: JsonObject) -> tuple[str, str] | None:
    for identifier in resource.get("identifier") or []:
        if isinstance(identifier, dict):
            system, value = identifier.get("system"), identifier.get("value")
            if isinstance(system, str) and system and isinstance(value, str) and value:
                return system, value
    return None


def with_shared_providers(bundle: JsonObject) -> JsonObject:
    """A copy where plain POSTs of Practitioner/Organization/Location become conditional creates.

    Synthea 2.4 writes each patient's providers inline; without this every load would add another
    copy of the same provider, and a later conditional reference to it would match several.
    An identifier used by two entries of the same bundle is left alone (the server could not
    tell them apart inside one transaction).
    """
    criteria: list[tuple[int, str]] = []
    for index, entry in enumerate(bundle.get("entry") or []):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        request = entry.get("request") if isinstance(entry, dict) else None
        if not isinstance(resource, dict) or not isinstance(request, dict):
            continue
        if (
            resource.get("resourceType") not in TARGET_TYPES
            or str(request.get("method", "")).upper() != "POST"
        ):
            continue
        identifier = _first_identifier(resource)
        if identifier is None or request.get("ifNoneExist"):
            continue
        criteria.append((index, f"{resource['resourceType']}?{identifier_criteria(*identifier)}"))
    uses = Counter(c for _, c in criteria)
    entries = list(bundle.get("entry") or [])
    for index, criterion in criteria:
        if uses[criterion] > 1:
            continue
        entry = dict(entries[index])
        entry["request"] = {**entry["request"], "ifNoneExist": criterion.partition("?")[2]}
        entries[index] = entry
    return {**bundle, "entry": entries}


def as_transaction(bundle: JsonObject, source_file: str) -> JsonObject:
    """The bundle as a transaction: transactions pass, batches and collections are converted.

    A batch becomes a transaction because a patient's record should load whole or not at all,
    and only a transaction resolves the `urn:uuid:` references between entries. A collection
    (Synthea with `exporter.fhir.transaction_bundle = false`) gets a POST request per entry.
    Any other type is refused with a SandboxError naming the file.
    """
    bundle_type = bundle.get("type")
    entries = bundle.get("entry")
    if not isinstance(entries, list) or not entries:
        raise SandboxError(f"{source_file}: the Bundle has no entries")
    if bundle_type in ("transaction", "batch"):
        for index, entry in enumerate(entries):
            request = entry.get("request") if isinstance(entry, dict) else None
            if not isinstance(request, dict) or not request.get("method") or not request.get("url"):
                raise SandboxError(
                    f"{source_file}: Bundle.entry[{index}] has no request.method and request.url"
                )
        return {**bundle, "type": "transaction"}
    if bundle_type == "collection":
        converted: list[JsonObject] = []
        for index, entry in enumerate(entries):
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
                raise SandboxError(
                    f"{source_file}: Bundle.entry[{index}] has no resource with a resourceType"
                )
            new_entry: JsonObject = {
                "resource": resource,
                "request": {"method": "POST", "url": resource["resourceType"]},
            }
            if entry.get("fullUrl"):
                new_entry["fullUrl"] = entry["fullUrl"]
            converted.append(new_entry)
        return {"resourceType": "Bundle", "type": "transaction", "entry": converted}
    raise SandboxError(
        f"{source_file}: Bundle.type is {bundle_type!r}; "
        "only transaction, batch and collection bundles can be loaded"
    )


def patient_entry_index(bundle: JsonObject, source_file: str) -> int:
    """Index of the bundle's first Patient entry; SandboxError naming the file when there is none."""
    for index, entry in enumerate(bundle.get("entry") or []):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict) and resource.get("resourceType") == "Patient":
            return index
    raise SandboxError(f"{source_file}: the Bundle has no Patient entry")


def display_name(patient: JsonObject) -> str:
    """The patient's name as one line (official name first), or "" when it has none.

    >>> display_name({"name": [{"family": "B"}, {"use": "official", "given": ["A1"], "family": "C2"}]})
    'A1 C2'
    >>> display_name({"name": [{"text": "Ann Lee"}]})
    'Ann Lee'
    """
    names = [n for n in patient.get("name") or [] if isinstance(n, dict)]
    if not names:
        return ""
    name = next((n for n in names if n.get("use") == "official"), names[0])
    if isinstance(name.get("text"), str) and name["text"].strip():
        return " ".join(name["text"].split())
    parts = [str(g) for g in name.get("given") or []]
    if isinstance(name.get("family"), str):
        parts.append(name["family"])
    return " ".join(parts)


def _id_from_location(location: str, resource_type: str) -> str | None:
    """The id in `[base/]Type/id[/_history/v]`, absolute or relative.

    >>> _id_from_location("Patient/123/_history/1", "Patient")
    '123'
    >>> _id_from_location("http://h/fhir/Patient/ab-9/_history/1", "Patient")
    'ab-9'
    """
    segments = [s for s in location.split("?")[0].split("/") if s]
    for position in range(len(segments) - 2, -1, -1):
        if segments[position] == resource_type:
            return segments[position + 1]
    return None


def created_id(response: JsonObject, index: int, resource_type: str) -> str | None:
    """The server id of the resource written by request entry `index` of a transaction-response."""
    entries = response.get("entry") or []
    if index >= len(entries) or not isinstance(entries[index], dict):
        return None
    entry = entries[index]
    resource = entry.get("resource")
    if isinstance(resource, dict) and resource.get("resourceType") == resource_type and resource.get("id"):
        return str(resource["id"])
    answer = entry.get("response") or {}
    location = answer.get("location") if isinstance(answer, dict) else None
    if isinstance(location, str):
        return _id_from_location(location, resource_type)
    return None


# ---------------------------------------------------------------------------
# IO
# ---------------------------------------------------------------------------


async def ensure_targets(
    client: SandboxClient, targets: Sequence[ConditionalTarget], *, concurrency: int = TARGET_CONCURRENCY
) -> dict[ConditionalTarget, str]:
    """Create each target unless one with its identifier exists; return the server id of each.

    Conditional create (If-None-Exist) makes this idempotent: a second call finds what the first
    made. Two targets with the same identifier must not be created at the same time (a server
    may then make both), which `conditional_targets` guarantees by returning distinct ones.
    """
    limit = asyncio.Semaphore(concurrency)

    async def one(target: ConditionalTarget) -> str:
        async with limit:
            created = await client.create(target_resource(target), if_none_exist=target.criteria)
        return str(created["id"])

    # return_exceptions: let every create finish before failing, so none is left running unobserved
    outcomes = await asyncio.gather(*(one(t) for t in targets), return_exceptions=True)
    ids: dict[ConditionalTarget, str] = {}
    for target, outcome in zip(targets, outcomes, strict=True):
        if isinstance(outcome, BaseException):
            raise outcome
        ids[target] = outcome
    return ids


async def load_bundle(client: SandboxClient, bundle: JsonObject, *, source_file: str) -> LoadedPatient:
    """Create the bundle's conditional targets, post it as one transaction, return its Patient.

    Posting the same bundle twice makes a second copy of the patient (Synthea uses plain POSTs);
    only the shared providers are created once.
    """
    transaction = with_shared_providers(as_transaction(bundle, source_file))
    patient_index = patient_entry_index(transaction, source_file)
    targets = conditional_targets(transaction)
    unsupported = [t for t in targets if t.resource_type not in TARGET_TYPES]
    if unsupported:
        kinds = sorted({t.resource_type for t in unsupported})
        raise SandboxError(
            f"{source_file}: conditional references to {', '.join(kinds)} cannot be satisfied "
            f"(placeholders exist for {', '.join(TARGET_TYPES)} only)"
        )
    unparsed = sum(1 for r in conditional_references(transaction) if parse_conditional_reference(r) is None)
    if unparsed:
        # Left as they are: the server may still resolve them (e.g. against data loaded earlier).
        _log.warning("sandbox.conditional_references_not_understood", count=unparsed)
    started = time.perf_counter()
    await ensure_targets(client, targets)
    response = await client.transaction(transaction)
    patient_id = created_id(response, patient_index, "Patient")
    if patient_id is None:
        raise SandboxError(
            f"{source_file}: the server's transaction-response does not say where the Patient went"
        )
    entries = len(transaction["entry"])
    _log.info(
        "sandbox.loaded",
        patient_id=patient_id,
        resources=entries,
        targets=len(targets),
        elapsed_ms=round((time.perf_counter() - started) * 1000, 1),
    )
    patient = transaction["entry"][patient_index]["resource"]
    return LoadedPatient(
        id=patient_id, name=display_name(patient), source_file=source_file, resources=entries
    )


async def load_files(
    client: SandboxClient, paths: Sequence[Path], *, failures: list[LoadFailure] | None = None
) -> list[LoadedPatient]:
    """Load each file in turn; a file that cannot be loaded is skipped, counted and reported.

    Files load one after another so that two bundles never create the same provider at once.
    Skipped files are appended to `failures` when given (each with a reason fit to show a
    person). An unreachable server stops the run: every further file would fail the same way.
    """
    loaded: list[LoadedPatient] = []
    skipped = 0
    for position, path in enumerate(paths):
        try:
            patient = await load_bundle(client, read_bundle(path), source_file=path.name)
        except FhirTransportError:
            raise
        except (BundleError, SandboxError, FhirError, ValueError) as exc:
            skipped += 1
            # The position, not the name: file names carry patient names.
            _log.warning(
                "sandbox.file_skipped",
                file_index=position,
                error=type(exc).__name__,
                status=getattr(exc, "status", None),
            )
            if failures is not None:
                failures.append(LoadFailure(path.name, _reason(exc)))
            continue
        loaded.append(patient)
    _log.info("sandbox.files_loaded", loaded=len(loaded), skipped=skipped, files=len(paths))
    return loaded


def _reason(exc: Exception) -> str:
    if isinstance(exc, FhirError):
        return f"{exc} - {exc.diagnostics}"
    return str(exc)
