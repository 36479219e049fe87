"""The claim verifier, rule by rule: what it keeps, what it drops, what it flags as contradicted."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from service.verify import RecordIndex, verify

PATIENT = {"resourceType": "Patient", "id": "p", "gender": "female", "birthDate": "1970-03-15"}
DEAD = {"resourceType": "Patient", "id": "d", "gender": "male", "birthDate": "1933-12-14",
        "deceasedDateTime": "2001-12-25T10:00:00+00:00"}  # fmt: skip


def _coded(text: str, system: str = "http://snomed.info/sct", code: str = "1") -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code, "display": text}], "text": text}


def _status(code: str) -> dict[str, Any]:
    return {"coding": [{"code": code}]}


CONDITION = {"resourceType": "Condition", "id": "c1", "code": _coded("Essential hypertension (disorder)"),
             "clinicalStatus": _status("active"), "onsetDateTime": "2012-01-20T08:00:00-05:00",
             "recordedDate": "2012-01-20T08:00:00-05:00"}  # fmt: skip
RESOLVED = {"resourceType": "Condition", "id": "c2", "code": _coded("Acute viral pharyngitis (disorder)"),
            "clinicalStatus": _status("resolved"), "onsetDateTime": "2018-11-22T10:00:00Z",
            "abatementDateTime": "2018-12-06T10:00:00Z"}  # fmt: skip
CONCUSSION = {"resourceType": "Condition", "id": "c3", "code": _coded("Concussion with no loss of consciousness"),
              "clinicalStatus": _status("resolved"), "onsetDateTime": "2020-03-17T10:00:00Z"}  # fmt: skip
MED = {"resourceType": "MedicationRequest", "id": "m1", "status": "active", "authoredOn": "2015-06-10",
       "medicationCodeableConcept": _coded("lisinopril 10 MG Oral Tablet", "http://www.nlm.nih.gov/research/umls/rxnorm"),
       "dosageInstruction": [{"timing": {"repeat": {"frequency": 1, "period": 1, "periodUnit": "d"}},
                              "asNeededBoolean": False}]}  # fmt: skip
STOPPED = {"resourceType": "MedicationRequest", "id": "m2", "status": "stopped", "authoredOn": "2016-11-23",
           "medicationCodeableConcept": _coded("Acetaminophen 160 MG Chewable Tablet"),
           "dosageInstruction": [{"asNeededBoolean": True}]}  # fmt: skip
ALLERGY = {"resourceType": "AllergyIntolerance", "id": "a1", "code": _coded("Allergy to peanuts"),
           "clinicalStatus": _status("active"), "criticality": "low", "recordedDate": "1936-04-25",
           "reaction": [{"manifestation": [_coded("Wheal (finding)")], "severity": "mild"}]}  # fmt: skip
WEIGHT_OLD = {"resourceType": "Observation", "id": "w0", "code": _coded("Body Weight", "http://loinc.org", "29463-7"),
              "effectiveDateTime": "2018-02-01T09:00:00Z",
              "valueQuantity": {"value": 80.0, "unit": "kg", "code": "kg"}}  # fmt: skip
WEIGHT = {"resourceType": "Observation", "id": "w1", "code": _coded("Body Weight", "http://loinc.org", "29463-7"),
          "effectiveDateTime": "2019-03-04T09:00:00Z",
          "valueQuantity": {"value": 81.63749089546538, "unit": "kg", "code": "kg"}}  # fmt: skip
TEMPERATURE = {"resourceType": "Observation", "id": "t1", "code": _coded("Oral temperature", "http://loinc.org", "8331-1"),
               "effectiveDateTime": "2019-03-04T09:00:00Z",
               "valueQuantity": {"value": 37.0, "unit": "Cel", "code": "Cel"}}  # fmt: skip
BP = {"resourceType": "Observation", "id": "bp", "code": _coded("Blood Pressure", "http://loinc.org", "85354-9"),
      "effectiveDateTime": "2019-03-04T09:00:00Z",
      "component": [
          {"code": _coded("Systolic Blood Pressure", "http://loinc.org", "8480-6"),
           "valueQuantity": {"value": 145, "unit": "mm[Hg]", "code": "mm[Hg]"}},
          {"code": _coded("Diastolic Blood Pressure", "http://loinc.org", "8462-4"),
           "valueQuantity": {"value": 83, "unit": "mm[Hg]", "code": "mm[Hg]"}},
      ]}  # fmt: skip
LDL = {"resourceType": "Observation", "id": "ldl",
       "code": _coded("Low Density Lipoprotein Cholesterol", "http://loinc.org", "18262-6"),
       "effectiveDateTime": "2019-03-04T09:00:00Z",
       "valueQuantity": {"value": 146.54, "unit": "mg/dL", "code": "mg/dL"}}  # fmt: skip
ENCOUNTER = {"resourceType": "Encounter", "id": "e1", "class": {"code": "EMER"},
             "type": [_coded("Emergency room admission (procedure)")], "reasonCode": [_coded("Sprain of ankle")],
             "period": {"start": "2019-03-04T09:00:00Z", "end": "2019-03-04T11:00:00Z"}}  # fmt: skip
VACCINE = {"resourceType": "Immunization", "id": "i1", "status": "completed", "occurrenceDateTime": "2016-06-13",
           "vaccineCode": _coded("Hep B, adolescent or pediatric", "http://hl7.org/fhir/sid/cvx", "08")}  # fmt: skip
PROCEDURE = {"resourceType": "Procedure", "id": "r1", "status": "completed", "code": _coded("Chest X-ray"),
             "performedDateTime": "2015-08-25T10:00:00Z"}  # fmt: skip
NOTE_TEXT = """2019-03-04

# Chief Complaint
No complaints.

# History of Present Illness
[name] is a 48 year-old white female.

# Social History
Patient is an active smoker.

# Allergies
No Known Allergies.

# Medications
lisinopril 10 mg oral tablet; amlodipine 2.5 mg oral tablet

# Assessment and Plan
Patient is presenting with sprain of wrist.
"""
NOTE = {"resourceType": "DocumentReference", "id": "n1", "status": "current", "date": "2019-03-04T09:00:00Z",
        "type": _coded("History and physical note", "http://loinc.org", "34117-2"),
        "content": [{"attachment": {"contentType": "text/plain",
                                    "data": base64.b64encode(NOTE_TEXT.encode()).decode()}}]}  # fmt: skip

RECORD = RecordIndex.of(
    [PATIENT, CONDITION, RESOLVED, CONCUSSION, MED, STOPPED, ALLERGY, WEIGHT_OLD, WEIGHT, TEMPERATURE, BP, LDL,
     ENCOUNTER, VACCINE, PROCEDURE, NOTE]
)  # fmt: skip
DEAD_RECORD = RecordIndex.of([DEAD])


def _verdict(text: str, *refs: str, record: RecordIndex = RECORD) -> str:
    sources = [record.evidence(ref) for ref in refs]
    assert all(sources), refs
    return verify(text, [s for s in sources if s], as_of=record.as_of).outcome


CASES = [
    # names: case, word order, plurals, semantic tags, salts and forms, aliases
    ("The patient has a history of essential hypertension.", ["Condition/c1"], "supported"),
    ("Hypertension, essential, was diagnosed.", ["Condition/c1"], "supported"),
    ("The patient has a history of malignant hypertension.", ["Condition/c1"], "unsupported"),
    ("The patient has a history of rheumatoid arthritis.", ["Condition/c1"], "unsupported"),
    ("The patient is allergic to peanut.", ["AllergyIntolerance/a1"], "supported"),
    ("The patient has an allergy to shellfish.", ["AllergyIntolerance/a1"], "unsupported"),
    ("The peanut allergy has low criticality.", ["AllergyIntolerance/a1"], "supported"),
    ("The peanut allergy has high criticality.", ["AllergyIntolerance/a1"], "unsupported"),
    ("The allergy to peanuts causes mild wheal.", ["AllergyIntolerance/a1"], "supported"),
    ("The allergy to peanuts causes severe wheal.", ["AllergyIntolerance/a1"], "unsupported"),
    ("The patient takes lisinopril 10 mg oral tablet once daily.", ["MedicationRequest/m1"], "supported"),
    ("The patient takes lisinopril 20 mg.", ["MedicationRequest/m1"], "unsupported"),
    ("The patient takes lisinopril 10 mg twice daily.", ["MedicationRequest/m1"], "unsupported"),
    ("Lisinopril 10 mg is ordered as needed.", ["MedicationRequest/m1"], "unsupported"),
    ("Acetaminophen 160 mg was ordered as needed.", ["MedicationRequest/m2"], "supported"),
    ("The patient was given a pediatric hepatitis B vaccine on June 13, 2016.", ["Immunization/i1"], "supported"),
    ("The patient received a typhoid vaccine on 2016-06-13.", ["Immunization/i1"], "unsupported"),
    ("The patient underwent a chest x-ray on 2015-08-25.", ["Procedure/r1"], "supported"),
    ("The patient underwent a chest x-ray under general anesthesia on 2015-08-25.", ["Procedure/r1"], "unsupported"),
    ("On Mar 4, 2019 the patient had an emergency department visit for sprain of ankle.", ["Encounter/e1"],
     "supported"),
    ("On 2019-03-04 the patient had an inpatient admission.", ["Encounter/e1"], "unsupported"),
    ("The patient was seen for a sprain of wrist on 2019-03-04.", ["Encounter/e1"], "unsupported"),
    # numbers with units, unit-aware; blood pressure by position; rounding of a measured value
    ("The patient's body weight was 81.63749089546538 kg on 2019-03-04.", ["Observation/w1"], "supported"),
    ("The patient weighed 180 lb on March 4, 2019.", ["Observation/w1"], "supported"),
    ("The patient weighed 170 lb on March 4, 2019.", ["Observation/w1"], "unsupported"),
    ("Body weight was 81.6 kg.", ["Observation/w1"], "supported"),
    ("Body weight was 81.6 mg.", ["Observation/w1"], "unsupported"),
    ("Oral temperature was 98.6 °F on 2019-03-04.", ["Observation/t1"], "supported"),
    ("Oral temperature was 99.6 °F on 2019-03-04.", ["Observation/t1"], "unsupported"),
    ("Blood pressure was 145/83 mmHg on 2019-03-04.", ["Observation/bp"], "supported"),
    ("Blood pressure was 83/145 mmHg on 2019-03-04.", ["Observation/bp"], "unsupported"),
    ("LDL cholesterol was 146.54 mg/dL.", ["Observation/ldl"], "supported"),
    ("LDL cholesterol was 146.54 mmol/L.", ["Observation/ldl"], "unsupported"),
    # dates, written and ISO; the role of a date; "latest"
    ("The onset of essential hypertension was on January 20, 2012.", ["Condition/c1"], "supported"),
    ("The onset of essential hypertension was on 2012-02-20.", ["Condition/c1"], "unsupported"),
    ("Acute viral pharyngitis resolved on 2018-12-06.", ["Condition/c2"], "supported"),
    ("Acute viral pharyngitis resolved on 2018-11-22.", ["Condition/c2"], "unsupported"),
    ("The latest body weight was 81.63749089546538 kg.", ["Observation/w1"], "supported"),
    ("The latest body weight was 80 kg, on 2018-02-01.", ["Observation/w0"], "unsupported"),
    ("Body weight was 80 kg on 2018-02-01.", ["Observation/w0"], "supported"),
    # status words
    ("Essential hypertension is an active condition.", ["Condition/c1"], "supported"),
    ("The patient's essential hypertension has resolved.", ["Condition/c1"], "unsupported"),
    ("Acute viral pharyngitis is resolved.", ["Condition/c2"], "supported"),
    ("The patient currently has acute viral pharyngitis.", ["Condition/c2"], "unsupported"),
    ("The patient previously took acetaminophen 160 mg, which was stopped.", ["MedicationRequest/m2"], "supported"),
    ("The patient is prescribed acetaminophen 160 mg.", ["MedicationRequest/m2"], "unsupported"),
    ("The patient is no longer taking lisinopril 10 mg.", ["MedicationRequest/m1"], "unsupported"),
    # negation and inversion
    ("The patient has no known allergies.", ["AllergyIntolerance/a1"], "contradicted"),
    ("The patient denies any allergy to peanuts.", ["AllergyIntolerance/a1"], "contradicted"),
    ("The patient is not taking lisinopril 10 mg.", ["MedicationRequest/m1"], "contradicted"),
    ("The patient has never been prescribed acetaminophen 160 mg.", ["MedicationRequest/m2"], "contradicted"),
    ("The patient is not taking acetaminophen 160 mg.", ["MedicationRequest/m2"], "supported"),
    ("The patient denies hypertension.", ["Condition/c1"], "contradicted"),
    ("The patient has no history of acute viral pharyngitis.", ["Condition/c2"], "contradicted"),
    ("Concussion with no loss of consciousness was recorded on March 17, 2020.", ["Condition/c3"], "supported"),
    ("There was no visit on 2019-03-04.", ["Encounter/e1"], "contradicted"),
    ("The patient has never received a hepatitis B vaccine.", ["Immunization/i1"], "contradicted"),
    ("Blood pressure was not measured on 2019-03-04.", ["Observation/bp"], "contradicted"),
    # the Patient: age, sex, birth, death
    ("The patient is female.", ["Patient/p"], "supported"),
    ("The patient is male.", ["Patient/p"], "unsupported"),
    ("The patient is not female.", ["Patient/p"], "contradicted"),
    ("The patient is not male.", ["Patient/p"], "supported"),
    ("The patient was born on March 15, 1970.", ["Patient/p"], "supported"),
    ("The patient was born on 1970-03-16.", ["Patient/p"], "unsupported"),
    ("The patient was 48 years old at the visit on 2019-03-04.", ["Patient/p"], "supported"),
    ("The patient was 49 years old at the visit on 2019-03-04.", ["Patient/p"], "unsupported"),
    ("The patient died on 2021-07-08.", ["Patient/p"], "unsupported"),
    ("The patient is alive.", ["Patient/p"], "supported"),
    # several sources: each part by one of them
    ("The patient was diagnosed with essential hypertension on 2012-01-20 and takes lisinopril 10 mg.",
     ["Condition/c1", "MedicationRequest/m1"], "supported"),
    ("The patient was diagnosed with essential hypertension on 2012-01-20 and takes amlodipine 5 mg.",
     ["Condition/c1", "MedicationRequest/m1"], "unsupported"),
    ("Essential hypertension lisinopril was noted.", ["Condition/c1", "MedicationRequest/m1"], "unsupported"),
    # a note is its own source
    ("According to the note of 2019-03-04, the patient has no known allergies.", ["DocumentReference/n1"],
     "supported"),
    ("The note of 2019-03-04 lists an allergy to celery.", ["DocumentReference/n1"], "contradicted"),
    ("The note of 2019-03-04 lists lisinopril 10 mg oral tablet among the medications.", ["DocumentReference/n1"],
     "supported"),
    ("The note of 2019-03-04 lists lisinopril 2.5 mg oral tablet among the medications.", ["DocumentReference/n1"],
     "unsupported"),
    ("The note of 2019-03-04 records no active medications.", ["DocumentReference/n1"], "contradicted"),
    ("The note of 2019-03-04 states that the patient has never smoked.", ["DocumentReference/n1"], "contradicted"),
    ("The note of 2019-03-04 describes the patient as an active smoker.", ["DocumentReference/n1"], "supported"),
    ("The note of 2019-03-04 describes the patient as 48 years old.", ["DocumentReference/n1"], "supported"),
    ("The note of 2019-03-04 describes the patient as 52 years old.", ["DocumentReference/n1"], "unsupported"),
    ("At the visit on 2019-03-04, the patient complained of headache.", ["DocumentReference/n1"], "contradicted"),
    ("According to the note of 2019-03-04, the patient showed no signs of sprain of wrist.",
     ["DocumentReference/n1"], "contradicted"),
    ("The assessment in the note of 2019-03-05 was sprain of wrist.", ["DocumentReference/n1"], "unsupported"),
]


@pytest.mark.parametrize(("text", "refs", "expected"), CASES, ids=[c[0][:60] for c in CASES])
def test_verifier_judges_each_rule(text: str, refs: list[str], expected: str) -> None:
    assert _verdict(text, *refs) == expected


def test_a_recorded_death_contradicts_a_living_patient_and_supports_its_date() -> None:
    assert _verdict("The patient is still living.", "Patient/d", record=DEAD_RECORD) == "contradicted"
    assert _verdict("The patient died on December 25, 2001.", "Patient/d", record=DEAD_RECORD) == "supported"
    assert _verdict("The patient died aged 68 years old.", "Patient/d", record=DEAD_RECORD) == "supported"


def test_every_drop_names_its_reason_and_severity() -> None:
    evidence = RECORD.evidence("MedicationRequest/m1")
    assert evidence is not None

    wrong_dose = verify("The patient takes lisinopril 20 mg.", [evidence])
    negated = verify("The patient is not taking lisinopril.", [evidence])

    assert (wrong_dose.outcome, wrong_dose.severity) == ("unsupported", "high")
    assert "20 mg" in wrong_dose.reason
    assert (negated.outcome, negated.severity) == ("contradicted", "high")


def test_a_claim_without_sources_is_not_supported() -> None:
    assert verify("The patient has hypertension.", []).outcome == "unsupported"
