"""Words of claims and sources, made comparable: tokens, stems, aliases and the claim's own frame.

A claim is supported word by word: every word that carries meaning must be found in a cited
source. What "carries meaning" excludes the sentence frame ("the patient was diagnosed with",
"according to the note of"), which is listed here once, in three parts: words that never carry a
fact (`STOP`), words any claim may use (`FRAME`), and words a claim may use when it cites a given
resource type (`IMPLIED`: "vaccine" is implied by an Immunization, not by a Procedure).

Stems come from the Snowball English stemmer, so "allergic"/"allergy", "peanuts"/"peanut" and
"presenting"/"presented" meet. Aliases join abbreviations and their expansions in both directions
("LDL" and "low density lipoprotein", "hep" and "hepatitis").

Pure: no IO.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Sequence
from functools import lru_cache

import snowballstemmer

_STEMMER = snowballstemmer.stemmer("english")
_STEMMER_LOCK = threading.Lock()  # a Snowball stemmer keeps state while it stems

# Letters (with inner apostrophes), or digits with an optional decimal part; "40mg" is two tokens.
_TOKEN = re.compile(r"[a-z]+(?:'[a-z]+)*|\d+(?:\.\d+)?")


def tokens(text: str) -> list[str]:
    """Lower-case word and number tokens; possessives are dropped ("alzheimer's" -> "alzheimer").

    >>> tokens("Alzheimer's disease, 40mg; X-ray (procedure)")
    ['alzheimer', 'disease', '40', 'mg', 'x', 'ray', 'procedure']
    """
    found = _TOKEN.findall(text.lower().replace("\u2019", "'"))
    return [t[:-2] if t.endswith("'s") else t.replace("'", "") for t in found]


@lru_cache(maxsize=65536)
def stem(word: str) -> str:
    """The Snowball stem of one lower-case token (numbers are their own stem).

    >>> [stem(w) for w in ("allergic", "allergies", "peanuts", "presenting", "10")]
    ['allerg', 'allerg', 'peanut', 'present', '10']
    """
    if not word[:1].isalpha():
        return word
    with _STEMMER_LOCK:
        stemmed = str(_STEMMER.stemWord(word))
    # "allergi" (allergies) and "allerg" (allergic) are one family: unify a trailing "i".
    return stemmed[:-1] if len(stemmed) > 4 and stemmed.endswith("i") else stemmed


def stems(words: Iterable[str]) -> list[str]:
    return [stem(w) for w in words]


def _stem_set(text: str) -> frozenset[str]:
    return frozenset(stems(tokens(text)))


STOP = _stem_set(
    """
    a an the of on in at for to with and or as by from was were is are be been being has have had
    having this that these those which who whose it its their his her he she they them than then
    also into per via there here one since any all some
    """
)

# The frame of a sentence about a patient's record: allowed in any claim.
FRAME = _stem_set(
    """
    patient record records recorded recording shows show showed shown listed lists list
    includes included including include contains contain contained appears appear among
    according documented date dated day visit visits encounter encounters seen see
    known time times history noted note notes chart file entry entries value result results
    signs evidence
    """
)

_IMPLIED_TEXT = {
    "Patient": "born birth died death dead deceased sex gender year years old age aged month months",
    "Condition": "diagnosed diagnosis diagnoses condition conditions onset problem problems disorder "
    "finding disease suffers suffered",
    "MedicationRequest": "prescribed prescription prescriptions prescribe ordered order orders "
    "medication medications medicine medicines drug drugs takes taking take took started start "
    "written write",
    "AllergyIntolerance": "allergy allergies allergic intolerance intolerant allergen allergens "
    "reaction reactions react exposure exposed causes cause caused criticality substance",
    "Immunization": "vaccine vaccines vaccination vaccinated immunization immunized administered "
    "administer received receive given give shot",
    "Procedure": "underwent undergone undergo performed perform procedure procedures done",
    "Encounter": "healthcare appointment attended",
    "Observation": "measured measure measurement measurements level levels test tested reading "
    "readings serum plasma blood breaths beats per minute",
    "DocumentReference": "states stated state describes described describe says said mentions "
    "mentioned documents assessment plan presented presenting complained complaint complaints "
    "chief medications allergies prescribed performed conducted given administered ordered following",
}
IMPLIED: dict[str, frozenset[str]] = {kind: _stem_set(text) for kind, text in _IMPLIED_TEXT.items()}
IMPLIED["DiagnosticReport"] = IMPLIED["DocumentReference"]

# Abbreviation <-> expansion, both ways. Clinical shorthand a summary may use for a coded name.
ALIASES: tuple[tuple[str, str], ...] = (
    ("ldl", "low density lipoprotein"),
    ("hdl", "high density lipoprotein"),
    ("bmi", "body mass index"),
    ("bp", "blood pressure"),
    ("egfr", "estimated glomerular filtration rate"),
    ("estimated", "predicted"),
    ("gfr", "glomerular filtration rate"),
    ("wbc", "leukocytes"),
    ("white blood cell", "leukocytes"),
    ("rbc", "erythrocytes"),
    ("red blood cell", "erythrocytes"),
    ("hgb", "hemoglobin"),
    ("hb", "hemoglobin"),
    ("hct", "hematocrit"),
    ("plt", "platelets"),
    ("bun", "urea nitrogen"),
    ("alt", "alanine aminotransferase"),
    ("ast", "aspartate aminotransferase"),
    ("alp", "alkaline phosphatase"),
    ("spo2", "oxygen saturation"),
    ("o2", "oxygen"),
    ("temp", "temperature"),
    ("hep", "hepatitis"),
    ("flu", "influenza"),
    ("td", "tetanus diphtheria"),
    ("ipv", "polio"),
    ("pcv", "pneumococcal conjugate"),
    ("mmr", "measles mumps rubella"),
    ("hpv", "human papillomavirus"),
    ("covid", "sars cov"),
    ("xray", "x ray"),
    ("radiograph", "x ray"),
    ("checkup", "check up"),
    ("er", "emergency room"),
    ("ed", "emergency department"),
    ("emergency department", "emergency room"),
    ("a1c", "hemoglobin a1c"),
    ("hba1c", "hemoglobin a1c"),
    ("copd", "chronic obstructive pulmonary disease"),
    ("chf", "congestive heart failure"),
    ("ckd", "chronic kidney disease"),
    ("mi", "myocardial infarction"),
    ("uti", "urinary tract infection"),
    ("gerd", "gastroesophageal reflux disease"),
    ("dm", "diabetes mellitus"),
    ("htn", "hypertension"),
    ("high blood pressure", "hypertension"),
    ("heart attack", "myocardial infarction"),
    ("pediatric", "paediatric"),
    ("ped", "pediatric"),
    ("adol", "adolescent"),
    ("tylenol", "acetaminophen"),
    ("paracetamol", "acetaminophen"),
    ("outpatient", "ambulatory"),
    ("wellness", "check up"),
    ("weighed", "weight"),
    ("weighs", "weight"),
)
_ALIAS_STEMS = tuple((tuple(stems(tokens(a))), tuple(stems(tokens(b)))) for a, b in ALIASES)


def with_aliases(found: Iterable[str]) -> frozenset[str]:
    """A source's stems plus those of every alias whose other side is wholly among them.

    >>> sorted(with_aliases(stems(["low", "density", "lipoprotein"])))
    ['densit', 'ldl', 'lipoprotein', 'low']
    """
    result = set(found)
    for _ in range(2):  # an alias of an alias ("ed" -> "emergency department" -> "room")
        for left, right in _ALIAS_STEMS:
            if set(right) <= result:
                result.update(left)
            if set(left) <= result:
                result.update(right)
    return frozenset(result)


def contains_run(sequence: Sequence[str], run: Sequence[str]) -> bool:
    """Whether `run` occurs in `sequence` as consecutive items.

    >>> contains_run(["lisinopril", "10", "mg", "oral"], ["10", "mg"])
    True
    >>> contains_run(["lisinopril", "10", "mg"], ["20", "mg"])
    False
    """
    n = len(run)
    if n == 0:
        return True
    first = run[0]
    return any(
        sequence[i] == first and list(sequence[i : i + n]) == list(run) for i in range(len(sequence) - n + 1)
    )
