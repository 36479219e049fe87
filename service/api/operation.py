"""The `$summarize` FHIR operation, described once: its parameters, how a request names them, and
the OperationDefinition and CapabilityStatement that tell a FHIR client about it.

`PARAMETERS` is the one table. The parser of a Parameters body (POST) and of query parameters
(GET), the OperationDefinition and the CapabilityStatement are all read from it, so what the
service accepts and what it says it accepts cannot drift apart.

    POST /fhir/Patient/{id}/$summarize   Parameters{encounter?, dryRun?, promptVersion?}
    GET  /fhir/Patient/{id}/$summarize?encounter=..&_dryRun=true&promptVersion=..

GET never changes state: it is always a dry run, and `dryRun=false` on a GET is refused.

Everything here is pure. What it must not do: accept a parameter it does not list, accept a value
of another type than the table says, or let a GET write anything.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, Literal

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from service.errors import BadRequest

JsonObject = dict[str, Any]
Use = Literal["in", "out"]

OPERATION_ID = "chartbrief-summarize"
# How a prompt is named (`service.prompts.load_prompt` reads it; the caller checks it exists).
PROMPT_SPEC = re.compile(r"^[a-z0-9][a-z0-9_-]*/v[0-9]+$")
OPERATION_CODE = "summarize"
FHIR_VERSION = "4.0.1"


@dataclass(frozen=True)
class OperationParameter:
    """One row of the operation's parameter table.

    `value_keys`: the `value[x]` names a Parameters body may use for it (the first is the declared
    FHIR type); `query_names`: how a GET names it (empty: not allowed on GET).
    """

    name: str
    use: Use
    fhir_type: str
    min: int
    max: str
    documentation: str
    value_keys: tuple[str, ...] = ()
    query_names: tuple[str, ...] = ()

    @property
    def get_allowed(self) -> bool:
        return bool(self.query_names)


PARAMETERS: tuple[OperationParameter, ...] = (
    OperationParameter(
        name="encounter",
        use="in",
        fhir_type="Reference",
        min=0,
        max="1",
        documentation=(
            "The Encounter the summary focuses on: a reference 'Encounter/{id}' (valueReference), "
            "or the same as valueString; on GET, ?encounter=Encounter/{id} or the bare id."
        ),
        value_keys=("valueReference", "valueString"),
        query_names=("encounter",),
    ),
    OperationParameter(
        name="dryRun",
        use="in",
        fhir_type="boolean",
        min=0,
        max="1",
        documentation=(
            "true: build the summary and return the resources as they would be written, writing "
            "nothing. Default false on POST; GET is always a dry run and refuses false."
        ),
        value_keys=("valueBoolean",),
        query_names=("_dryRun", "dryRun"),
    ),
    OperationParameter(
        name="promptVersion",
        use="in",
        fhir_type="string",
        min=0,
        max="1",
        documentation=(
            "The prompt to write the summary with, as 'task/vN' (e.g. 'summary/v1'); it must be a "
            "prompt this service has. Default: the service's configured prompt."
        ),
        value_keys=("valueString",),
        query_names=("promptVersion",),
    ),
    OperationParameter(
        name="return",
        use="out",
        fhir_type="Bundle",
        min=1,
        max="1",
        documentation=(
            "A collection Bundle: the DocumentReference (the draft summary), the Device (the model) "
            "and the Provenance, as written or, on a dry run, as they would be written."
        ),
    ),
)

INPUTS = {p.name: p for p in PARAMETERS if p.use == "in"}
QUERY_NAMES = {q: p for p in PARAMETERS for q in p.query_names}


@dataclass(frozen=True)
class SummarizeRequest:
    """The operation's inputs, checked: `encounter` is a bare Encounter id."""

    encounter: str | None = None
    dry_run: bool = False
    prompt_version: str | None = None


def is_fhir_id(value: str) -> bool:
    return 0 < len(value) <= 64 and all(c.isascii() and (c.isalnum() or c in "-.") for c in value)


def encounter_id(value: str) -> str:
    """The Encounter id of 'Encounter/{id}' (or a bare id), or `BadRequest` naming the parameter.

    >>> encounter_id("Encounter/e-1"), encounter_id("e-1")
    ('e-1', 'e-1')
    """
    kind, slash, rid = value.strip().rpartition("/")
    if slash and kind != "Encounter":
        raise BadRequest(
            f"parameter 'encounter' must reference an Encounter ('Encounter/{{id}}'), got {kind!r}"
        )
    if not is_fhir_id(rid):
        raise BadRequest("parameter 'encounter' does not hold a valid Encounter id ([A-Za-z0-9-.]{1,64})")
    return rid


def _prompt_version(value: str) -> str:
    if PROMPT_SPEC.match(value) is None:
        raise BadRequest("parameter 'promptVersion' must look like 'summary/v1'")
    return value


def _boolean(name: str, value: str) -> bool:
    if value == "true":
        return True
    if value == "false":
        return False
    raise BadRequest(f"parameter {name!r} must be true or false")


def _validated_parameters(body: object) -> list[JsonObject]:
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise BadRequest("the request body must be a FHIR Parameters resource")
    try:
        get_fhir_model_class("Parameters").model_validate(body)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ())) or 'Parameters'}: {err.get('msg')}"
            for err in exc.errors()[:3]
        )
        raise BadRequest(f"the Parameters resource is not valid: {problems}"[:500]) from exc
    entries = body.get("parameter") or []
    return [e for e in entries if isinstance(e, dict)]


def parse_parameters(body: object) -> SummarizeRequest:
    """A POST body (a Parameters resource) as the operation's inputs; `BadRequest` names the parameter."""
    seen: dict[str, Any] = {}
    for entry in _validated_parameters(body):
        name = str(entry.get("name", ""))
        spec = INPUTS.get(name)
        if spec is None:
            raise BadRequest(f"unknown parameter {name!r} (this operation takes {', '.join(INPUTS)})")
        if name in seen:
            raise BadRequest(f"parameter {name!r} is given more than once (at most {spec.max})")
        values = [k for k in entry if k.startswith("value")]
        if entry.get("resource") is not None or entry.get("part") or len(values) != 1:
            accepted = " or ".join(spec.value_keys)
            raise BadRequest(f"parameter {name!r} must carry exactly one value ({accepted})")
        key = values[0]
        if key not in spec.value_keys:
            raise BadRequest(f"parameter {name!r} must be {' or '.join(spec.value_keys)}, not {key}")
        seen[name] = entry[key]
    request = SummarizeRequest()
    if "encounter" in seen:
        value = seen["encounter"]
        reference = value.get("reference") if isinstance(value, dict) else value
        if not isinstance(reference, str) or not reference:
            raise BadRequest("parameter 'encounter' must hold a reference 'Encounter/{id}'")
        request = _with(request, encounter=encounter_id(reference))
    if "dryRun" in seen:
        request = _with(request, dry_run=bool(seen["dryRun"]))
    if "promptVersion" in seen:
        request = _with(request, prompt_version=_prompt_version(str(seen["promptVersion"])))
    return request


def parse_query(items: Iterable[tuple[str, str]]) -> SummarizeRequest:
    """GET's query parameters as the operation's inputs: always a dry run (`dryRun=false` refused)."""
    seen: dict[str, str] = {}
    for query_name, value in items:
        spec = QUERY_NAMES.get(query_name)
        if spec is None:
            names = ", ".join(QUERY_NAMES)
            raise BadRequest(f"unknown parameter {query_name!r} (this operation takes {names} on GET)")
        if spec.name in seen:
            raise BadRequest(f"parameter {spec.name!r} is given more than once (at most {spec.max})")
        seen[spec.name] = value
    if "dryRun" in seen and not _boolean("dryRun", seen["dryRun"]):
        raise BadRequest(
            "parameter 'dryRun' cannot be false on GET: a GET changes nothing; use POST to write"
        )
    encounter = encounter_id(seen["encounter"]) if "encounter" in seen else None
    prompt = _prompt_version(seen["promptVersion"]) if "promptVersion" in seen else None
    return SummarizeRequest(encounter=encounter, dry_run=True, prompt_version=prompt)


def _with(request: SummarizeRequest, **changes: Any) -> SummarizeRequest:
    return replace(request, **changes)


# -- what a FHIR client reads about the operation -------------------------------------------------------


def definition_url(base_url: str) -> str:
    """The OperationDefinition's canonical URL under the service's public base URL.

    >>> definition_url("https://cb.example/")
    'https://cb.example/fhir/OperationDefinition/chartbrief-summarize'
    """
    return f"{base_url.rstrip('/')}/fhir/OperationDefinition/{OPERATION_ID}"


def operation_definition(base_url: str) -> JsonObject:
    """The OperationDefinition of `Patient/{id}/$summarize`, its parameters read from `PARAMETERS`."""
    return {
        "resourceType": "OperationDefinition",
        "id": OPERATION_ID,
        "url": definition_url(base_url),
        "name": "ChartbriefSummarize",
        "title": "Summarize a patient's record (AI draft, source-checked)",
        "status": "active",
        "kind": "operation",
        "description": (
            "Builds a source-checked clinical summary of the patient's record and writes it as a "
            "preliminary, AI-asserted DocumentReference with its Device and Provenance (or, on a dry "
            "run, returns them unwritten). A retry with the same inputs writes nothing new."
        ),
        "affectsState": True,
        "code": OPERATION_CODE,
        "resource": ["Patient"],
        "system": False,
        "type": False,
        "instance": True,
        "parameter": [
            {
                "name": p.name,
                "use": p.use,
                "min": p.min,
                "max": p.max,
                "documentation": p.documentation
                + ("" if p.use == "out" or p.get_allowed else " Not allowed on GET."),
                "type": p.fhir_type,
                **(
                    {"targetProfile": ["http://hl7.org/fhir/StructureDefinition/Encounter"]}
                    if p.fhir_type == "Reference"
                    else {}
                ),
            }
            for p in PARAMETERS
        ],
    }


def capability_statement(base_url: str, *, date: str, version: str) -> JsonObject:
    """What this FHIR face serves: the Patient-level `$summarize` operation, JSON only."""
    base = base_url.rstrip("/")
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": date,
        "kind": "instance",
        "software": {"name": "chartbrief", "version": version},
        "implementation": {"description": "chartbrief FHIR operation face", "url": f"{base}/fhir"},
        "fhirVersion": FHIR_VERSION,
        "format": ["json"],
        "rest": [
            {
                "mode": "server",
                "security": {
                    "description": (
                        "Authorization: Bearer <token>: a JWT of the configured issuer with "
                        "DocumentReference scopes, or a chartbrief API key (the REST API's rules)."
                    )
                },
                "resource": [
                    {
                        "type": "Patient",
                        "operation": [{"name": OPERATION_CODE, "definition": definition_url(base)}],
                    }
                ],
            }
        ],
    }


__all__ = [
    "INPUTS",
    "OPERATION_CODE",
    "OPERATION_ID",
    "PARAMETERS",
    "OperationParameter",
    "SummarizeRequest",
    "capability_statement",
    "definition_url",
    "encounter_id",
    "operation_definition",
    "parse_parameters",
    "parse_query",
]
