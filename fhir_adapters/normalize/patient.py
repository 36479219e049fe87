"""The patient's own line and the patient's name: sex and age, never the name or the birth date.

`patient_summary` is fact P1 of every context; `name_redactor` is what keeps the patient's name
out of every fact (notes repeat it). Pure.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date

from fhir_adapters.models import PatientRecord
from fhir_adapters.normalize.datatypes import JsonObject, day_of, nonblank, parse_day, path_of

NAME_PLACEHOLDER = "[name]"


@dataclass(frozen=True)
class PatientSummary:
    """What fact P1 says: `text` for the reader, the parts apart for the structured summary."""

    text: str
    sex: str | None
    age: str | None
    as_of: str | None
    deceased: bool


def patient_summary(
    patient: JsonObject, last_encounter: str | None, today: date | None = None
) -> PatientSummary:
    """Sex and age of the patient, never the name or the birth date.

    >>> patient_summary({"gender": "female", "birthDate": "2015-05-03"}, "2023-10-02").text
    'female, 8 years old (as of 2023-10-02)'
    >>> patient_summary({"gender": "male", "birthDate": "1933-12-14",
    ...                  "deceasedDateTime": "2001-12-25T10:00:00Z"}, "2001-12-20").text
    'male, died 2001-12-25 aged 68 years'
    >>> patient_summary({"gender": "male", "birthDate": "2020-10-20"}, None, date(2021, 3, 1)).text
    'male, 4 months old (as of 2021-03-01)'
    >>> patient_summary({"deceasedBoolean": True}, None).text
    'sex not recorded, age unknown, deceased'
    """
    sex = nonblank(patient.get("gender"))
    died = day_of(patient.get("deceasedDateTime"))
    deceased = bool(died) or patient.get("deceasedBoolean") is True
    as_of = died or (today.isoformat() if today else None) or last_encounter
    age = age_between(nonblank(patient.get("birthDate")), as_of)
    parts = [sex or "sex not recorded"]
    if died:
        parts.append(f"died {died} aged {age}" if age else f"died {died}")
    else:
        parts.append(f"{age} old (as of {as_of})" if age else "age unknown")
        if deceased:
            parts.append("deceased")
    return PatientSummary(", ".join(parts), sex, age, as_of if age else died, deceased)


def age_between(birth: str | None, as_of: str | None) -> str | None:
    """Age in whole years (whole months under two); 'about' when the birth date is partial.

    >>> age_between("2015-05-03", "2023-05-02"), age_between("2015-05-03", "2023-05-03")
    ('7 years', '8 years')
    >>> age_between("2023-01-31", "2023-02-28"), age_between("1970", "2020-06-01")
    ('0 months', 'about 50 years')
    >>> age_between(None, "2020-01-01") is None
    True
    """
    start, end = parse_day(birth), parse_day(as_of)
    if start is None or end is None or end < start:
        return None
    months = (end.year - start.year) * 12 + end.month - start.month - (end.day < start.day)
    about = "about " if birth and len(birth) < 10 else ""
    if months < 24:
        return f"{about}{months} month{'s' if months != 1 else ''}"
    years = months // 12
    return f"{about}{years} year{'s' if years != 1 else ''}"


def last_encounter_day(record: PatientRecord) -> str | None:
    """The latest full day an encounter started or ended: the default date ages are given at."""
    days = [
        day
        for encounter in record.of_type("Encounter")
        for day in (
            day_of(path_of(encounter, "period", "end")),
            day_of(path_of(encounter, "period", "start")),
        )
        if day and len(day) == 10
    ]
    return max(days) if days else None


def name_redactor(patient: JsonObject) -> Callable[[str], str]:
    """A function replacing the patient's name parts (given, family, text) by `[name]`.

    Names are matched as written, in capitals and capitalized, not in lower case: a patient
    called May or Hope must not turn "may" and "hope" in a note into `[name]`. Titles ("Mr.")
    are not name parts.

    >>> redact = name_redactor({"name": [{"given": ["Beatris270", "May"], "family": "Bogan287",
    ...                                   "text": "Ms. Beatris270 Bogan287"}]})
    >>> redact("Beatris270\\n is a 8 year-old. BOGAN287 may have asthma. Ms. May agrees.")
    '[name]\\n is a 8 year-old. [name] may have asthma. Ms. [name] agrees.'
    """
    tokens: set[str] = set()
    for name in patient.get("name") or []:
        if not isinstance(name, dict):
            continue
        words = [*(name.get("given") or []), name.get("family"), name.get("text")]
        for word in words:
            if not isinstance(word, str):
                continue
            for token in word.split():
                if token.endswith(".") or len(token.strip(",")) < 2:
                    continue
                token = token.strip(",")
                tokens.update({token, token.upper(), token[:1].upper() + token[1:].lower()})
    if not tokens:
        return lambda text: text
    alternatives = "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True))
    pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)")
    return lambda text: pattern.sub(NAME_PLACEHOLDER, text)
