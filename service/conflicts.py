"""Where a clinical note and the coded record disagree, stated neutrally with both sides cited. Pure.

A clinician reading a summary needs to know when the chart disagrees with itself: a note says
"No Known Allergies" while AllergyIntolerance resources are active, or "No Active Medications"
while MedicationRequests are active. `find_conflicts` reads the facts of a `ClinicalContext`
and returns one `Conflict` per disagreement, each a short sentence saying what the record
holds and what the note says, citing the coded facts and the note.

What is compared, per topic (allergies, medications):

- the note side is the **latest dated note that says something about the topic** (a "none"
  statement or a list under an `Allergies` / `Medications` heading). Older notes are the past
  word, not the current one: a 2015 note saying "no active medications" does not disagree
  with a drug ordered in 2021. Undated notes, and notes entered in error or superseded, are
  not used (nothing says when, or whether, they were the word on the patient);
- a note saying there are no known allergies (or no known *drug* allergies: then only
  allergens coded in RxNorm count) is in conflict with the allergies the record holds as
  active or without a clinical status. Allergies entered in error or refuted never become
  facts, and inactive or resolved ones do not count;
- a note saying the patient takes no medications is in conflict with the active
  MedicationRequests;
- a coded item recorded on or after the note's day is **not** in conflict with it: the note
  was written before the item existed (same day counts as after, since a visit's note may
  precede what the visit recorded). A coded item without a date is counted;
- a note listing a medication (or an allergy) by exactly the record's name, when every fact
  of that name is stopped, completed or cancelled (inactive or resolved), ordered or recorded
  on or before the note's day. The record holds no stop date, so the sentence says only what
  each side holds. A listed name the record does not hold at all is not reported: a record
  read by chartbrief may lack outside prescriptions, and a name matched loosely would be a
  guess.

Conservative on purpose: a false conflict costs a clinician's attention, so a "none" phrase is
taken only when it ends its sentence and has no "except", "but" or family member in it, and
names are matched whole, ignoring only case and spacing.

What it must not do: any IO or logging (note text is patient data), call a model, or state
anything the cited facts do not hold.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from fhir_adapters.models import ClinicalContext, Fact

ConflictKind = Literal["allergies", "medications"]
KINDS: tuple[ConflictKind, ...] = ("allergies", "medications")

ACTIVE_ALLERGY = frozenset({"active"})  # plus a missing clinical status
INACTIVE_ALLERGY = frozenset({"inactive", "resolved"})
ACTIVE_MEDICATION = frozenset({"active"})
ENDED_MEDICATION = frozenset({"stopped", "completed", "cancelled"})
UNUSABLE_NOTE = frozenset({"entered-in-error", "superseded"})
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
MAX_NAMES = 3  # names spelled out in a sentence; the rest are counted

_SENTENCE_END = r"(?=\s*(?:[.;!]|$))"
_NO_ALLERGIES = (
    re.compile(rf"\bno\s+known\s+allergies{_SENTENCE_END}", re.IGNORECASE | re.MULTILINE),
    re.compile(rf"\bno\s+allergies{_SENTENCE_END}", re.IGNORECASE | re.MULTILINE),
    re.compile(rf"\bdenies\s+(?:any\s+)?(?:known\s+)?allergies{_SENTENCE_END}", re.IGNORECASE | re.MULTILINE),
    re.compile(rf"\bNKA\b{_SENTENCE_END}", re.MULTILINE),
)
_NO_DRUG_ALLERGIES = (
    re.compile(
        rf"\bno\s+known\s+(?:drug|medication)\s+allergies{_SENTENCE_END}", re.IGNORECASE | re.MULTILINE
    ),
    re.compile(rf"\bNKDA\b{_SENTENCE_END}", re.MULTILINE),
)
_NO_MEDICATIONS = (
    re.compile(
        rf"\bno\s+(?:known\s+|active\s+|current\s+|regular\s+)?medications{_SENTENCE_END}",
        re.IGNORECASE | re.MULTILINE,
    ),
    re.compile(rf"\btakes\s+no\s+medications{_SENTENCE_END}", re.IGNORECASE | re.MULTILINE),
    re.compile(
        rf"\bnot\s+(?:currently\s+)?(?:taking|on)\s+any\s+medications{_SENTENCE_END}",
        re.IGNORECASE | re.MULTILINE,
    ),
)
_NONE_SECTION = re.compile(r"^\s*(?:[-*]\s*)?(?:none(?:\s+known)?|nil)\s*\.?\s*$", re.IGNORECASE)
# Words that make a "none" phrase about something else than the patient's whole list.
_HEDGES = re.compile(
    r"\b(?:except|other\s+than|besides|apart\s+from|but|however|mother|father|sister|brother|"
    r"sibling|family|parents?|son|daughter|husband|wife|partner)\b",
    re.IGNORECASE,
)
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s*(?P<title>[^\n#]+?)\s*#*\s*$", re.MULTILINE)
_LABEL = re.compile(
    r"^\s*(?P<title>allergies|medications)\s*:\s*(?P<body>\S[^\n]*)$", re.IGNORECASE | re.MULTILINE
)
_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d{1,2}[.)])\s+")
_SECTION_TITLES: dict[ConflictKind, frozenset[str]] = {
    "allergies": frozenset({"allergies", "allergy", "allergies and intolerances"}),
    "medications": frozenset({"medications", "current medications", "active medications"}),
}


@dataclass(frozen=True)
class Conflict:
    """One disagreement between a note and the coded record.

    `record` says what the coded facts hold (citing `record_keys`), `note` what the note says
    (citing `note_keys`); `text` is the sentence with each side's keys where it is stated.

    >>> c = Conflict("allergies", "Record lists 2 active allergies", ("A1", "A2"),
    ...              "the note of 2023-10-02 says no known allergies", ("N1",))
    >>> c.text
    'Record lists 2 active allergies [A1, A2]; the note of 2023-10-02 says no known allergies [N1].'
    >>> c.citations
    ('A1', 'A2', 'N1')
    """

    kind: str
    record: str
    record_keys: tuple[str, ...]
    note: str
    note_keys: tuple[str, ...]

    @property
    def citations(self) -> tuple[str, ...]:
        return (*self.record_keys, *self.note_keys)

    @property
    def text(self) -> str:
        return f"{self.record} {_cited(self.record_keys)}; {self.note} {_cited(self.note_keys)}."

    def to_json(self) -> dict[str, Any]:
        """`{kind, text, citations}` plus the two sides, so a stored summary can show them again."""
        return {
            "kind": self.kind,
            "text": self.text,
            "citations": list(self.citations),
            "record": {"text": self.record, "citations": list(self.record_keys)},
            "note": {"text": self.note, "citations": list(self.note_keys)},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Conflict:
        """The inverse of `to_json`."""
        record, note = data["record"], data["note"]
        return cls(
            str(data["kind"]),
            str(record["text"]),
            tuple(str(k) for k in record["citations"]),
            str(note["text"]),
            tuple(str(k) for k in note["citations"]),
        )


def find_conflicts(ctx: ClinicalContext) -> tuple[Conflict, ...]:
    """Every disagreement between the latest notes and the coded facts (see the module docstring)."""
    notes = _usable_notes(ctx.of_kind("note"))
    allergies, medications = ctx.of_kind("allergy"), ctx.of_kind("medication")
    found: list[Conflict] = []
    allergy_note = _latest_speaking(notes, "allergies")
    if allergy_note is not None:
        found += _allergy_conflicts(allergy_note, allergies)
    medication_note = _latest_speaking(notes, "medications")
    if medication_note is not None:
        found += _medication_conflicts(medication_note, medications)
    return tuple(found)


# -- what a note says ----------------------------------------------------------------------------


@dataclass(frozen=True)
class NoteStatement:
    """What one note says about one topic: nothing known, nothing known of drugs, or a list."""

    none: bool = False
    none_of_drugs: bool = False
    listed: tuple[str, ...] = ()

    @property
    def says_something(self) -> bool:
        return self.none or self.none_of_drugs or bool(self.listed)


def note_statement(text: str, kind: ConflictKind) -> NoteStatement:
    """What a note's text says about allergies or medications, read conservatively.

    >>> note_statement("# Allergies\\nNo Known Allergies.\\n\\n# Medications\\n- none", "allergies")
    NoteStatement(none=True, none_of_drugs=False, listed=())
    >>> note_statement("# Medications\\nAmlodipine 5 MG Oral Tablet; aspirin 81 mg\\n", "medications").listed
    ('amlodipine 5 mg oral tablet', 'aspirin 81 mg')
    >>> note_statement("No known allergies except penicillin.", "allergies").says_something
    False
    >>> note_statement("Allergies: NKDA", "allergies")
    NoteStatement(none=False, none_of_drugs=True, listed=())
    >>> note_statement("No medications were given during the visit.", "medications").says_something
    False
    """
    if kind == "allergies":
        none = _says(text, _NO_ALLERGIES)
        none_of_drugs = not none and _says(text, _NO_DRUG_ALLERGIES)
    else:
        none, none_of_drugs = _says(text, _NO_MEDICATIONS), False
    listed: list[str] = []
    for body in _sections(text, kind):
        if _NONE_SECTION.match(body):
            none = True
        elif not _says(body, (*_NO_ALLERGIES, *_NO_DRUG_ALLERGIES, *_NO_MEDICATIONS)):
            listed += _items(body, kind)
    if none or none_of_drugs:
        # A note that says "none" and lists names in one breath is not read as either.
        if listed:
            return NoteStatement()
        return NoteStatement(none=none, none_of_drugs=none_of_drugs)
    return NoteStatement(listed=tuple(dict.fromkeys(listed)))


def _says(text: str, patterns: Iterable[re.Pattern[str]]) -> bool:
    for pattern in patterns:
        for match in pattern.finditer(text):
            hedged = _HEDGES.search(_sentence_around(text, match.start(), match.end()))
            if not hedged and not _HEDGES.search(_heading_above(text, match.start())):
                return True
    return False


def _heading_above(text: str, position: int) -> str:
    """The title of the markdown heading the position falls under ('' when there is none)."""
    titles = [h["title"] for h in _HEADING.finditer(text, 0, position)]
    return titles[-1] if titles else ""


def _sentence_around(text: str, start: int, end: int) -> str:
    left = max(text.rfind(".", 0, start), text.rfind("\n", 0, start))
    stops = [i for i in (text.find(".", end), text.find("\n", end)) if i != -1]
    return text[left + 1 : min(stops) if stops else len(text)]


def _sections(text: str, kind: ConflictKind) -> list[str]:
    """The bodies of a note's sections about `kind`: under a markdown heading, or after a label."""
    titles = _SECTION_TITLES[kind]
    bodies: list[str] = []
    headings = list(_HEADING.finditer(text))
    for i, heading in enumerate(headings):
        if _normal(heading["title"]) in titles:
            end = headings[i + 1].start() if i + 1 < len(headings) else len(text)
            bodies.append(text[heading.end() : end].strip())
    for label in _LABEL.finditer(text):
        if _normal(label["title"]) in titles:
            bodies.append(label["body"].strip())
    return [b for b in bodies if b]


def _items(body: str, kind: ConflictKind) -> list[str]:
    # Drug names may hold commas ("nitrofurantoin, macrocrystals 50 mg"); allergen lists use them.
    separators = r"[;\n]" if kind == "medications" else r"[;,\n]"
    items = (_normal(_BULLET.sub("", part)) for part in re.split(separators, body))
    return [item for item in items if item]


def _normal(text: str) -> str:
    return " ".join(text.casefold().split()).strip(" .")


# -- which note, which facts ---------------------------------------------------------------------


def _usable_notes(notes: Sequence[Fact]) -> list[Fact]:
    """Dated notes that stand, newest first (facts come newest first; ties keep key order)."""
    usable = [n for n in notes if n.date and n.status not in UNUSABLE_NOTE]
    return sorted(usable, key=lambda n: n.date or "", reverse=True)


def _latest_speaking(notes: Sequence[Fact], kind: ConflictKind) -> tuple[Fact, NoteStatement] | None:
    for note in notes:
        statement = note_statement(note.text, kind)
        if statement.says_something:
            return note, statement
    return None


def before(earlier: str | None, later: str | None) -> bool:
    """True when date `earlier` is known to fall before `later`, compared at their common precision.

    >>> before("2017-08-30", "2023-10-02"), before("2023-10-02", "2023-10-02"), before("2023", "2023-10-02")
    (True, False, False)
    """
    if not earlier or not later:
        return False
    n = min(len(earlier), len(later))
    return earlier[:n] < later[:n]


def _allergy_conflicts(found: tuple[Fact, NoteStatement], allergies: Sequence[Fact]) -> list[Conflict]:
    note, statement = found
    day = note.date
    if statement.none or statement.none_of_drugs:
        active = [
            f
            for f in allergies
            if (f.status is None or f.status in ACTIVE_ALLERGY)
            and (f.date is None or before(f.date, day))
            and (statement.none or (f.code or "").startswith(f"{RXNORM}|"))
        ]
        if not active:
            return []
        noun = "drug allergies" if statement.none_of_drugs and not statement.none else "allergies"
        what = "active drug allerg" if noun == "drug allergies" else "active allerg"
        return [
            Conflict(
                "allergies",
                f"Record lists {_count(len(active), what + 'y', 'ies')}{_names(active)}",
                _keys(active),
                f"the note of {day} says no known {noun}",
                (note.key,),
            )
        ]
    ended = _ended(statement.listed, allergies, INACTIVE_ALLERGY, day)
    if not ended:
        return []
    return [
        Conflict(
            "allergies",
            _ended_sentence(ended, "allergies"),
            _keys(ended),
            f"the note of {day} lists {'it' if len(ended) == 1 else 'them'} under allergies",
            (note.key,),
        )
    ]


def _medication_conflicts(found: tuple[Fact, NoteStatement], medications: Sequence[Fact]) -> list[Conflict]:
    note, statement = found
    day = note.date
    if statement.none:
        active = [
            f
            for f in medications
            if f.status in ACTIVE_MEDICATION and (f.date is None or before(f.date, day))
        ]
        if not active:
            return []
        return [
            Conflict(
                "medications",
                f"Record lists {_count(len(active), 'active medication', 's')}{_names(active)}",
                _keys(active),
                f"the note of {day} says no active medications",
                (note.key,),
            )
        ]
    ended = _ended(statement.listed, medications, ENDED_MEDICATION, day)
    if not ended:
        return []
    return [
        Conflict(
            "medications",
            _ended_sentence(ended, "medications"),
            _keys(ended),
            f"the note of {day} lists {'it' if len(ended) == 1 else 'them'} under medications",
            (note.key,),
        )
    ]


def _ended(
    listed: Sequence[str], facts: Sequence[Fact], ended: frozenset[str], day: str | None
) -> list[Fact]:
    """Facts named in the note whose every record of that name has ended, on or before the note."""
    by_name: dict[str, list[Fact]] = {}
    for fact in facts:
        if fact.display:
            by_name.setdefault(_normal(fact.display), []).append(fact)
    out: list[Fact] = []
    for name in listed:
        same = by_name.get(name, [])
        if not same or not all(f.status in ended for f in same):
            continue  # absent from the record, or active (or of unknown status) in it
        if all(f.date and not before(day, f.date) for f in same):
            out += [f for f in same if f not in out]
    return sorted(out, key=lambda f: _key_order(f.key))


def _ended_sentence(facts: Sequence[Fact], many: str) -> str:
    statuses = " or ".join(sorted({f.status or "" for f in facts}))
    if len(facts) == 1:
        return f"Record has {facts[0].display} as {statuses}"
    return f"Record has {len(facts)} {many} as {statuses}{_names(facts)}"


# -- wording -------------------------------------------------------------------------------------


def _count(n: int, one: str, plural_ending: str) -> str:
    """`1 active allergy`, `2 active allergies`: `one` plus the ending, or `one`'s stem plus it."""
    if n == 1:
        return f"{n} {one}"
    return f"{n} {one[:-1]}ies" if plural_ending == "ies" else f"{n} {one}{plural_ending}"


def _names(facts: Sequence[Fact]) -> str:
    names = list(dict.fromkeys(f.display or f.text for f in facts))
    shown = ", ".join(names[:MAX_NAMES])
    more = f", +{len(names) - MAX_NAMES} more" if len(names) > MAX_NAMES else ""
    return f" ({shown}{more})"


def _keys(facts: Iterable[Fact]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(f.key for f in facts))


def _key_order(key: str) -> tuple[str, int]:
    prefix = key.rstrip("0123456789")
    digits = key[len(prefix) :]
    return (prefix, int(digits) if digits else 0)


def _cited(keys: Sequence[str]) -> str:
    return f"[{', '.join(keys)}]"


__all__ = [
    "KINDS",
    "Conflict",
    "ConflictKind",
    "NoteStatement",
    "before",
    "find_conflicts",
    "note_statement",
]
