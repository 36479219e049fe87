"""Is one sentence supported by the resources it cites? `verify()` answers supported, unsupported or
contradicted, with the reason and how much a mistake there would matter.

The checks, in order (the first that fails decides):

1. **Negation and inversion.** "No known allergies", "is not taking X", "has never been diagnosed
   with X", "there was no visit on D", "is alive": where a cited resource records what the
   sentence denies, the sentence is *contradicted*. A note is its own source: "the note says no
   known allergies" is supported when the note says so, and "the note lists an allergy to X" is
   contradicted when it says "No Known Allergies". Words that are part of a cited name are not
   cues ("Concussion with no loss of consciousness", "Documentation of current medications").
2. **Dates** must be dates of the cited resources (ISO or written; a month or year is supported by
   a day inside it); "resolved on", "born on", "died on", "onset" look at that date only.
3. **Ages** are computed from the Patient's birth date at the date the sentence names (or read
   from a cited note: "a 72 year-old").
4. **Numbers with units** must be values of the cited resources, unit-aware (a weight in lb is
   checked against kilograms by conversion), blood pressure systolic/diastolic by position.
5. **Status words** ("active", "currently", "takes", "resolved", "stopped", "no longer") must
   agree with the clinical status of the cited Condition, MedicationRequest or AllergyIntolerance.
6. **"Latest" / "last measured" / "most recent"** only of the latest resource of its code.
7. **Every word that carries meaning** (names of conditions, drugs with strength and form,
   allergens, vaccines, procedures, visit types, severities, criticality, frequency) must be
   stated by ONE cited resource - each part of a sentence citing several resources by one of
   them; in a note, as a phrase of the note (so "lisinopril 20 mg" is not supported by a note
   that lists "lisinopril 10 mg" and mentions 20 elsewhere).

Severity of a mistake: high for a contradicted or wrong allergy, medication or condition and for a
wrong dose or strength; medium for a wrong date, value, age, sex or visit; low for wording.

Pure, fast and deterministic: no IO, no model, no logging of the sentence.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from typing import Literal

from service.verify.dates import StatedDate, find_dates
from service.verify.evidence import SourceEvidence
from service.verify.quantities import Quantity, read_quantities, same_value
from service.verify.words import FRAME, STOP, contains_run, stem, stems, tokens

Outcome = Literal["supported", "unsupported", "contradicted"]
Severity = Literal["high", "medium", "low"]


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    reason: str = ""
    severity: Severity | None = None

    @property
    def supported(self) -> bool:
        return self.outcome == "supported"


SUPPORTED = Verdict("supported")

_CLAUSE_BREAK = re.compile(r"[;:!?()]|,(?!\d{3})|\.(?!\d)")
_INLINE_KEY = re.compile(r"\[([A-Za-z]{1,3}[0-9]+)\]")
_AGE = re.compile(
    r"\b(?:aged?\s+(?P<a>\d{1,3})|(?P<n>\d{1,3})[\s-]+(?P<unit>year|month|week|day)s?[\s-]+old)\b", re.I
)

_NEGATION = frozenset(
    stems(
        "no not never denies denied deny none neither nor without negative doesnt isnt "
        "wasnt hasnt didnt arent werent cannot".split()
    )
)
_ACTIVE_CUES = frozenset(stems("active currently current ongoing still takes taking".split()))
_INACTIVE_CUES = frozenset(
    stems(
        "resolved stopped discontinued previously formerly former inactive past ended "
        "remission longer".split()
    )
)
_LATEST_CUES = frozenset(stems("latest last recent newest".split()))
_ALIVE_CUES = frozenset(stems("alive living".split()))
_GENDER_WORDS = {
    "male": "male",
    "man": "male",
    "boy": "male",
    "female": "female",
    "woman": "female",
    "girl": "female",
}
_MONTH_WORDS = frozenset(
    stems(
        "january february march april may june july august september october november "
        "december jan feb mar apr jun jul aug sep sept oct nov dec".split()
    )
)
_CUES = _NEGATION | _ACTIVE_CUES | _INACTIVE_CUES | _LATEST_CUES | _ALIVE_CUES | frozenset(stems(["most"]))

# A note's negative statement of a topic, and the words by which a sentence is about that topic.
_NOTE_TOPICS: tuple[tuple[str, frozenset[str], tuple[str, ...], tuple[str, ...]], ...] = (
    (
        "allergies",
        frozenset(stems(["allergy", "allergic", "allergies"])),
        ("no known allergies", "no known drug allergies", "nkda", "nka", "no allergies"),
        (),
    ),
    ("complaints", frozenset(stems(["complained", "complaint", "complaints"])), ("no complaints",), ()),
    (
        "medications",
        frozenset(stems(["medications", "medication", "taking"])),
        ("no active medications", "no medications", "no current medications"),
        (),
    ),
    (
        "smoking",
        frozenset(stems(["smoker", "smokes", "smoking", "smoked"])),
        ("never smoked", "non smoker", "nonsmoker", "does not smoke", "never smoker"),
        ("active smoker", "current smoker", "currently smokes", "every day smoker", "smokes"),
    ),
)
_ROLE_CUES = {
    "abatement": frozenset(stems(["resolved", "abated", "ended", "remission"])),
    "birth": frozenset(stems(["born", "birth"])),
    "death": frozenset(stems(["died", "death", "deceased"])),
    "onset": frozenset(stems(["onset", "began", "started"])),
}
_HIGH_TYPES = frozenset({"MedicationRequest", "AllergyIntolerance"})


@dataclass
class _Claim:
    """A sentence taken apart: dates, ages, quantities, and its word tokens with their stems."""

    dates: list[StatedDate]
    ages: list[tuple[int, str]]
    quantities: list[Quantity]
    pairs: list[tuple[Quantity, Quantity]]
    words: list[str]  # tokens of the text without dates and ages (numbers kept)
    word_stems: list[str]

    @classmethod
    def of(cls, text: str) -> _Claim:
        text = _INLINE_KEY.sub(" ", text)
        dates, rest = find_dates(text)
        ages = [
            (int(m.group("a") or m.group("n")), (m.group("unit") or "year").lower())
            for m in _AGE.finditer(rest)
        ]
        rest = _AGE.sub(" ", rest)
        quantities, pairs, _words_only = read_quantities(rest)
        # Punctuation ends a phrase: "takes metformin; HbA1c 7.2%" is two parts, each checked on
        # its own. "|" marks the boundary (a decimal point is not one).
        words = [t for part in _CLAUSE_BREAK.split(rest) for t in [*tokens(part), "|"]][:-1]
        return cls(dates, ages, quantities, pairs, words, stems(words))


def verify(text: str, sources: Sequence[SourceEvidence], *, as_of: str | None = None) -> Verdict:
    """The verdict on one sentence against the resources it cites (see the module docstring).

    `as_of` is the date an age without a date is stated at (the record's last date).
    """
    if not sources:
        return Verdict("unsupported", "cites no source", "medium")
    claim = _Claim.of(text)
    named = _named_positions(claim.word_stems, sources)
    cues = {s for i, s in enumerate(claim.word_stems) if i not in named and s in _CUES}
    if "longer" in cues:  # "no longer taking": a status, not a negation
        cues.discard("no")
    types = {s.resource_type for s in sources}
    for check in (_note_topics, _negation, _alive):
        verdict = check(claim, sources, cues)
        if verdict is not None:
            return verdict
    consumed_dates = _age_dates(claim, sources)
    return (
        _dates_problem(claim, sources, consumed_dates)
        or _ages_problem(claim, sources, as_of)
        or _numbers_problem(claim, sources)
        or _gender_problem(claim, sources)
        or _status_problem(claim, sources, cues)
        or _latest_problem(sources, cues)
        or _words_problem(claim, sources, named, types)
        or SUPPORTED
    )


# --- cues that are names -------------------------------------------------------------------------


def _named_positions(word_stems: list[str], sources: Sequence[SourceEvidence]) -> set[int]:
    """Positions of the sentence's words that belong to a phrase of two or more words stated by a
    cited resource ("no loss of consciousness"); cue words there are part of a name."""
    content = [(i, s) for i, s in enumerate(word_stems) if s not in STOP]
    named: set[int] = set()
    for start in range(len(content)):
        for end in range(len(content), start + 1, -1):
            run = [s for _, s in content[start:end]]
            if not set(run) & _CUES:
                continue
            if any(contains_run(source.sequence, run) for source in sources):
                named.update(i for i, _ in content[start:end])
                break
    return named


# --- negation, inversion, notes as sources --------------------------------------------------------


def _content(claim: _Claim, sources: Sequence[SourceEvidence]) -> list[str]:
    implied = frozenset().union(*(s.implied for s in sources))
    return [
        s
        for s in claim.word_stems
        if s not in STOP
        and s not in FRAME
        and s not in implied
        and s not in _CUES
        and s not in _MONTH_WORDS
        and s not in _GENDER_WORDS
        and s != "|"
        and not s[:1].isdigit()
        and s not in _UNIT_STEMS
    ]


def _negation(claim: _Claim, sources: Sequence[SourceEvidence], cues: set[str]) -> Verdict | None:
    if not cues & _NEGATION:
        return None
    patient = next((s for s in sources if s.resource_type == "Patient"), None)
    genders = {_GENDER_WORDS[w] for w in claim.words if w in _GENDER_WORDS}
    if patient is not None and genders and patient.gender:
        if patient.gender in genders:
            return Verdict("contradicted", f"the Patient's recorded sex is {patient.gender}", "medium")
        return None  # "is not male" of a female patient: true, the remaining checks decide
    content = _content(claim, sources)
    current_only = not cues & frozenset(stems(["never"])) and bool(
        cues & _ACTIVE_CUES | {"among"} & set(claim.words)
    )
    for source in sources:
        if source.is_note:
            if set(content) <= source.stems:
                return Verdict(
                    "contradicted",
                    f"the note states what the sentence denies ({source.label})",
                    _severity_of({source.resource_type}, content_topic(content)),
                )
            continue
        if content and not set(content) <= source.stems:
            continue
        if current_only and source.status == "inactive":
            return None  # "is not taking X" of a stopped order: true; the remaining checks decide
        return Verdict(
            "contradicted",
            f"the cited {source.resource_type} records it ({source.label})",
            "high" if source.resource_type in _HIGH_TYPES | {"Condition"} else "medium",
        )
    return Verdict("unsupported", "denies something the cited sources do not state", "low")


def content_topic(content: Sequence[str]) -> str | None:
    for topic, about, _negative, _positive in _NOTE_TOPICS:
        if set(content) & about:
            return topic
    return None


def _alive(_claim: _Claim, sources: Sequence[SourceEvidence], cues: set[str]) -> Verdict | None:
    if not cues & _ALIVE_CUES:
        return None
    patient = next((s for s in sources if s.resource_type == "Patient"), None)
    if patient is not None and patient.deceased:
        return Verdict("contradicted", f"the Patient's death is recorded ({patient.deceased})", "high")
    return None


def _note_topics(claim: _Claim, sources: Sequence[SourceEvidence], cues: set[str]) -> Verdict | None:
    """A sentence about a note's allergies, complaints, medications or smoking that the note's
    own negative (or positive) statement inverts."""
    said = set(claim.word_stems)
    for source in sources:
        if not source.is_note:
            continue
        for topic, about, negative, positive in _NOTE_TOPICS:
            if not said & about:
                continue
            negated = bool(cues & _NEGATION)
            if not negated and any(_says(source, phrase) for phrase in negative):
                if not any(_phrase_in_claim(claim, phrase) for phrase in negative):
                    return Verdict(
                        "contradicted",
                        f"the note says {negative[0]}",
                        "high" if topic in ("allergies", "medications") else "medium",
                    )
            if negated and positive and any(_says(source, phrase) for phrase in positive):
                return Verdict("contradicted", f"the note says {positive[0]}", "medium")
    return None


def _says(source: SourceEvidence, phrase: str) -> bool:
    return contains_run(source.sequence, [s for s in stems(tokens(phrase)) if s not in STOP])


def _phrase_in_claim(claim: _Claim, phrase: str) -> bool:
    return contains_run(
        [s for s in claim.word_stems if s not in STOP], [s for s in stems(tokens(phrase)) if s not in STOP]
    )


# --- dates, ages, numbers, sex ---------------------------------------------------------------------


def _age_dates(claim: _Claim, sources: Sequence[SourceEvidence]) -> set[int]:
    """Indexes of stated dates that only say when an age held (checked with the age)."""
    if claim.ages and len(claim.dates) == 1 and any(s.resource_type == "Patient" for s in sources):
        if not any(s.resource_type != "Patient" for s in sources):
            return {0}
    return set()


def _dates_problem(claim: _Claim, sources: Sequence[SourceEvidence], consumed: set[int]) -> Verdict | None:
    stated = [d for i, d in enumerate(claim.dates) if i not in consumed]
    if not stated:
        return None
    role = _date_role(claim) if len(stated) == 1 else None
    missing = []
    for when in stated:
        pools = [s.dates.get(role, frozenset()) if role and role in s.dates else s.all_dates for s in sources]
        if role and not any(role in s.dates for s in sources) and role in ("death", "abatement"):
            pools = [frozenset()]
        if not any(when.candidates & pool for pool in pools):
            missing.append(when.shown)
    if missing:
        what = {"death": "no such date of death", "abatement": "no such resolution date"}.get(role or "", "")
        return Verdict(
            "unsupported", f"states {_join(missing)}, {what or 'not a date of the cited sources'}", "medium"
        )
    return None


def _date_role(claim: _Claim) -> str | None:
    said = set(claim.word_stems)
    for role, cue in _ROLE_CUES.items():
        if said & cue:
            return role
    return None


def _ages_problem(claim: _Claim, sources: Sequence[SourceEvidence], as_of: str | None) -> Verdict | None:
    for age, unit in claim.ages:
        patient = next((s for s in sources if s.resource_type == "Patient" and s.birth_date), None)
        notes = [s for s in sources if s.is_note]
        if any(contains_run(n.sequence, [str(age), stem(unit)]) for n in notes):
            continue
        if patient is None or patient.birth_date is None:
            return Verdict(
                "unsupported", f"states an age of {age} {unit}s the cited sources do not", "medium"
            )
        when = next(iter(sorted(claim.dates[0].candidates)), None) if claim.dates else None
        when = when or (patient.deceased if patient.deceased not in (None, "yes") else None) or as_of
        actual = _age_at(patient.birth_date, when) if when else None
        if actual is None or actual.get(unit) != age:
            shown = f"{actual['year']} years" if actual else "unknown"
            return Verdict(
                "unsupported", f"states an age of {age} {unit}s; by the birth date it is {shown}", "medium"
            )
    return None


def _age_at(birth: str, when: str) -> dict[str, int] | None:
    try:
        born, then = date.fromisoformat(birth[:10]), date.fromisoformat(when[:10])
    except ValueError:
        return None
    years = then.year - born.year - ((then.month, then.day) < (born.month, born.day))
    months = (then.year - born.year) * 12 + then.month - born.month - (then.day < born.day)
    days = (then - born).days
    return {"year": years, "month": months, "week": days // 7, "day": days}


def _numbers_problem(claim: _Claim, sources: Sequence[SourceEvidence]) -> Verdict | None:
    rounding = all(s.resource_type == "Observation" for s in sources)
    missing = []
    for stated in claim.quantities:
        if not any(same_value(stated, q, rounding=rounding) for s in sources for q in s.quantities):
            missing.append(stated.value + (f" {stated.unit}" if stated.unit else ""))
    for systolic, diastolic in claim.pairs:
        if not any(_pair_in(systolic, diastolic, s) for s in sources):
            missing.append(f"{systolic.value}/{diastolic.value}")
    if missing:
        types = {s.resource_type for s in sources}
        severity: Severity = "high" if types & {"MedicationRequest"} else "medium"
        return Verdict("unsupported", f"states {_join(missing)}, not a value of the cited sources", severity)
    return None


def _pair_in(systolic: Quantity, diastolic: Quantity, source: SourceEvidence) -> bool:
    by_role = {q.role: q for q in source.quantities if q.role in ("systolic", "diastolic")}
    if len(by_role) == 2:
        return same_value(systolic, by_role["systolic"], rounding=True) and same_value(
            diastolic, by_role["diastolic"], rounding=True
        )
    # Without component codes, by position: the systolic value stated before the diastolic one.
    values = list(source.quantities)
    return any(
        same_value(systolic, a, rounding=False)
        and any(same_value(diastolic, b, rounding=False) for b in values[i + 1 :])
        for i, a in enumerate(values)
    )


def _gender_problem(claim: _Claim, sources: Sequence[SourceEvidence]) -> Verdict | None:
    patient = next((s for s in sources if s.resource_type == "Patient"), None)
    genders = {_GENDER_WORDS[w] for w in claim.words if w in _GENDER_WORDS}
    if patient is None or not genders or set(claim.word_stems) & _NEGATION:
        return None  # a negated sex ("is not male") was judged with the negation
    if patient.gender not in genders:
        return Verdict(
            "unsupported", f"the Patient's recorded sex is {patient.gender or 'not recorded'}", "medium"
        )
    return None


# --- status, latest, words -------------------------------------------------------------------------


def _status_problem(claim: _Claim, sources: Sequence[SourceEvidence], cues: set[str]) -> Verdict | None:
    said = _asserted_status(claim, cues)
    if said is None:
        return None
    for source in sources:
        if source.status is not None and source.status != said:
            word = "active" if source.status == "active" else "no longer active"
            return Verdict(
                "unsupported",
                f"the cited {source.resource_type} is {word} ({source.label})",
                _severity_of({source.resource_type}),
            )
    return None


def _asserted_status(claim: _Claim, cues: set[str]) -> str | None:
    if cues & _INACTIVE_CUES or (cues & _NEGATION and cues & _ACTIVE_CUES):
        return "inactive"  # "resolved", "stopped", and "is not taking"
    if cues & _ACTIVE_CUES:
        return "active"
    text = " ".join(claim.words)
    if re.search(
        r"\b(?:is|are) (?:prescribed|on|allergic)\b|\bhas an? (?:\w+ )?allergy\b|\bcurrently\b", text
    ):
        return "active"
    return None


def _latest_problem(sources: Sequence[SourceEvidence], cues: set[str]) -> Verdict | None:
    if not cues & _LATEST_CUES:
        return None
    for source in sources:
        if source.latest is False:
            return Verdict(
                "unsupported", f"the cited {source.resource_type} is not the latest of its kind", "medium"
            )
    return None


def _words_problem(
    claim: _Claim, sources: Sequence[SourceEvidence], named: set[int], types: set[str]
) -> Verdict | None:
    runs = _runs(claim, sources, named)
    coded = [s for s in sources if not s.is_note]
    notes = [s for s in sources if s.is_note]
    missing: list[str] = []
    for words, run_stems, phrase in runs:
        if any(set(run_stems) <= s.stems for s in coded):
            continue
        if any(contains_run(n.sequence, phrase) for n in notes):
            continue
        # Name the words the closest source lacks, or the whole phrase a note does not hold.
        closest = max(coded, key=lambda s: len(set(run_stems) & s.stems), default=None)
        if closest is not None and set(run_stems) & closest.stems:
            missing.extend(w for w, st in zip(words, run_stems, strict=True) if st not in closest.stems)
        else:
            missing.append(" ".join(words))
    if missing:
        return Verdict(
            "unsupported", f"says {_join(missing)}, not stated by the cited sources", _severity_of(types)
        )
    checkable = runs or claim.quantities or claim.pairs or claim.dates or claim.ages
    if (
        not checkable
        and not set(claim.words) & set(_GENDER_WORDS)
        and not set(claim.word_stems) & _ALIVE_CUES
    ):
        return Verdict("unsupported", "states nothing the cited sources could support", "low")
    return None


_UNIT_STEMS = frozenset(
    stems("mg ml mcg g kg lb lbs cm mm hr h l dl ul actuat mmhg meq mmol iu u fl pg ng min m2 sq".split())
)


def _runs(
    claim: _Claim, sources: Sequence[SourceEvidence], named: set[int]
) -> list[tuple[list[str], list[str], list[str]]]:
    """Consecutive meaningful words of the sentence: (words, their stems without numbers and
    units - checked against a coded source -, the whole phrase with its numbers - checked against
    a note)."""
    implied = frozenset().union(*(s.implied for s in sources))
    skip = STOP | FRAME | implied | _MONTH_WORDS | frozenset(_GENDER_WORDS)
    runs: list[tuple[list[str], list[str], list[str]]] = []
    words: list[str] = []
    phrase: list[str] = []
    for i, (word, s) in enumerate(zip(claim.words, claim.word_stems, strict=True)):
        numeric = word[:1].isdigit() or (s in _UNIT_STEMS and bool(phrase))
        if not numeric and (s in skip or (s in _CUES and i not in named) or len(word) < 2):
            if phrase:
                runs.append((words, [stem(w) for w in words], phrase))
            words, phrase = [], []
            continue
        phrase.append(s)
        if not numeric and s not in _UNIT_STEMS:
            words.append(word)
    if phrase:
        runs.append((words, [stem(w) for w in words], phrase))
    return [run for run in runs if run[0] or len(run[2]) > 1]


def _severity_of(types: set[str], topic: str | None = None) -> Severity:
    if types & _HIGH_TYPES or topic in ("allergies", "medications"):
        return "high"
    return "medium"


def _join(items: Sequence[str]) -> str:
    items = list(dict.fromkeys(items))[:4]
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"
