"""What chartbrief reads and writes on a FHIR server, declared once; every scope list comes from it.

`READS` is what `fetch_record` reads (the searched types with the element naming the patient,
and the types read by reference only); `WRITES` is what the writer sends. The EHR launch's
patient scopes, the review's update scopes, SMART Backend Services' system scopes, the
batch's change types and the Bulk export's types are all derived here, so a type fetch starts
reading is asked for everywhere at once. A test checks the lists against this declaration.

SMART v2 interaction letters (STANDARDS.md): c create, r read, u update, d delete, s search.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Context = Literal["patient", "system"]


@dataclass(frozen=True)
class Read:
    """One type chartbrief reads.

    `patient_element` names the patient in a search by patient (`subject` or `patient`); None =
    not searched by patient. `searched_itself` marks a type searched on its own fields instead
    (the Patient: the batch searches it by `_lastUpdated`). A type neither searched by patient
    nor by itself is read by id or reference only.
    """

    resource_type: str
    patient_element: str | None
    why: str
    searched_itself: bool = False

    @property
    def searched(self) -> bool:
        """True when chartbrief searches this type, so its scope needs `s` beside `r`."""
        return self.patient_element is not None or self.searched_itself

    @property
    def letters(self) -> str:
        return "rs" if self.searched else "r"


@dataclass(frozen=True)
class Write:
    """One type chartbrief writes; `review` = only approve, edit, reject and supersede need it."""

    resource_type: str
    letter: Literal["c", "u"]
    why: str
    review: bool = False


# The record a summary is written from (fetch_record reads exactly these).
READS: tuple[Read, ...] = (
    Read("Patient", None, "demographics and the patient banner", searched_itself=True),
    Read("Encounter", "subject", "recent visits and their reasons"),
    Read("DocumentReference", "subject", "clinical notes, and chartbrief's own earlier drafts"),
    Read("Condition", "subject", "problems and social history"),
    Read("MedicationRequest", "subject", "active medicines"),
    Read("AllergyIntolerance", "patient", "allergies"),
    Read("Observation", "subject", "vitals, labs and smoking status"),
    Read("Procedure", "subject", "procedures"),
    Read("Immunization", "patient", "immunizations"),
    Read("DiagnosticReport", "subject", "reports and the notes they carry"),
    Read("Medication", None, "the drug a MedicationRequest names by reference"),
    Read("Binary", None, "note text stored apart from its DocumentReference"),
)

# What a summary's write-back sends (fhir_adapters.write.draft and fhir_adapters.write.review).
WRITES: tuple[Write, ...] = (
    Write("DocumentReference", "c", "the AI draft"),
    Write("Provenance", "c", "who and what wrote the draft (AI Transparency on FHIR)"),
    Write("Device", "c", "the model that wrote it"),
    Write("DocumentReference", "u", "approve, edit, reject, supersede", review=True),
    Write("Provenance", "u", "the review recorded on the draft's Provenance", review=True),
)

# The batch also reads a Group's members when asked to summarize a Group.
BATCH_READS: tuple[Read, ...] = (Read("Group", None, "the members of a Group a batch is asked for"),)

# The types searched with `patient=<id>`, and the element naming the patient in each.
SEARCHED_TYPES: dict[str, str] = {r.resource_type: r.patient_element for r in READS if r.patient_element}

# Every type whose `_lastUpdated` marks a patient's summary inputs as changed: the searched ones.
CHANGE_TYPES: tuple[str, ...] = tuple(r.resource_type for r in READS if r.searched)


def split_scopes(scope: str | Iterable[str]) -> tuple[str, ...]:
    """Scopes as a tuple, order kept, duplicates dropped.

    >>> split_scopes("launch  openid launch")
    ('launch', 'openid')
    >>> split_scopes(["openid", "fhirUser"])
    ('openid', 'fhirUser')
    """
    items = scope.split() if isinstance(scope, str) else [s.strip() for s in scope]
    return tuple(dict.fromkeys(s for s in items if s))


def read_scopes(context: Context) -> tuple[str, ...]:
    """`patient/Condition.rs`, ... for every type a summary reads.

    >>> read_scopes("patient")[:2]
    ('patient/Patient.rs', 'patient/Encounter.rs')
    >>> "system/Binary.r" in read_scopes("system")
    True
    """
    return tuple(f"{context}/{r.resource_type}.{r.letters}" for r in READS)


def write_scopes(context: Context, *, review: bool) -> tuple[str, ...]:
    """The create scopes of a write-back, and with `review` also the updates review needs.

    >>> write_scopes("patient", review=False)
    ('patient/DocumentReference.c', 'patient/Provenance.c', 'patient/Device.c')
    """
    return tuple(f"{context}/{w.resource_type}.{w.letter}" for w in WRITES if review or not w.review)


def review_scopes(context: Context = "patient") -> tuple[str, ...]:
    """Only the update scopes approve, edit, reject and supersede need.

    >>> review_scopes()
    ('patient/DocumentReference.u', 'patient/Provenance.u')
    """
    return tuple(f"{context}/{w.resource_type}.{w.letter}" for w in WRITES if w.review)


# An EHR launch: read the record, create the draft (review's updates are added at launch time,
# `service.api.routes.launch.launch_scopes`). `launch` asks for the EHR's context.
LAUNCH_RESOURCE_SCOPES: tuple[str, ...] = (*read_scopes("patient"), *write_scopes("patient", review=False))
DEFAULT_SCOPES = " ".join(("launch", "openid", "fhirUser", *LAUNCH_RESOURCE_SCOPES))
# A standalone launch has no EHR context to hand over: the user picks the patient at the EHR.
STANDALONE_SCOPES = " ".join(("launch/patient", "openid", "fhirUser", *LAUNCH_RESOURCE_SCOPES))

# SMART Backend Services for the nightly batch: read every record, write and supersede drafts.
DEFAULT_SYSTEM_SCOPES = " ".join(
    (
        *read_scopes("system"),
        *(f"system/{r.resource_type}.{r.letters}" for r in BATCH_READS),
        *write_scopes("system", review=True),
    )
)
