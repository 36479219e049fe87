"""What a statement states, as comparable terms: the test of whether it adds anything to the
coded part of a summary (grounding drops a statement that adds nothing; the evaluation counts the
ones that add something). Pure.
"""

from __future__ import annotations

import re

_MONTHS = {m: i for i, m in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split(), 1)}
_MONTH = (
    r"(?P<mon>jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?"
    r"|sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\.?"
)
_KEY = re.compile(r"\[?\b([A-Za-z]{1,3}[0-9]+)\b\]?")
_ISO_DATE = re.compile(r"\b(\d{4}-\d{2}-\d{2})(?:T[0-9:.]+(?:Z|[+-]\d{2}:?\d{2})?)?")
_WRITTEN_DATE = re.compile(
    rf"\b{_MONTH}\s+(?P<d>\d{{1,2}})(?:st|nd|rd|th)?,?\s+(?P<y>\d{{4}})\b", re.IGNORECASE
)
_DAY_FIRST_DATE = re.compile(
    rf"\b(?P<d>\d{{1,2}})(?:st|nd|rd|th)?\s+(?:of\s+)?{_MONTH},?\s+(?P<y>\d{{4}})\b", re.IGNORECASE
)
_US_DATE = re.compile(r"\b(?P<m>\d{1,2})/(?P<d>\d{1,2})/(?P<y>\d{4})\b")
_MONTH_YEAR = re.compile(rf"\b{_MONTH},?\s+(?:of\s+)?(?P<y>\d{{4}})\b", re.IGNORECASE)
_YEAR = re.compile(r"(?<![\w.])((?:19|20)\d{2})(?!\w|\.\d)")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
# Words that frame a statement without adding to it: grammar, the record's own vocabulary
# (statuses, "diagnosed", "ordered"), and the section words of the coded part.
_FILLER = frozenset(
    """
    the and for with from has have had having was were are is been being this that these those
    its his her hers him she they them their who which what when also not but any all per via
    patient patients pt has shows showed noted recorded documented listed history historical
    diagnosed diagnosis since ordered prescribed taking takes take took currently current active
    inactive resolved stopped completed superseded status date dated hold recurrence relapse
    condition conditions problem problems medication medications allergy allergies allergic
    encounter encounters visit visits lab labs vital vitals result results latest recent recently
    most last record records recorded summary known clinical clinically ongoing year years old aged
    month months day days since until started start onset as of on at in to by an a
    """.split()
)


def _written_iso(match: re.Match[str]) -> str:
    return f"{match['y']}-{_MONTHS[match['mon'][:3].lower()]:02d}-{int(match['d']):02d}"


def _number(raw: str) -> str:
    whole, _, fraction = raw.partition(".")
    fraction = fraction.rstrip("0")
    whole = whole.lstrip("0") or "0"
    return f"{whole}.{fraction}" if fraction else whole


def statement_terms(text: str, keys: frozenset[str]) -> frozenset[str]:
    """What a text states, as comparable terms: `date:YYYY[-MM[-DD]]`, `num:7.2` and word stems;
    citation keys, filler words and status words carry no information and are left out.

    >>> text = "Hypertension [C1], active since March 4, 2019 (7.20 mmHg)"
    >>> sorted(statement_terms(text, frozenset({"C1"})))
    ['date:2019-03-04', 'hypert', 'mmhg', 'num:7.2']
    """
    text = _KEY.sub(lambda m: " " if m.group(1).upper() in keys else m.group(0), text)
    terms: set[str] = set()

    def take(iso: str) -> str:
        terms.add(f"date:{iso}")
        return " "

    text = _ISO_DATE.sub(lambda m: take(m.group(1)), text)
    text = _WRITTEN_DATE.sub(lambda m: take(_written_iso(m)), text)
    text = _DAY_FIRST_DATE.sub(lambda m: take(_written_iso(m)), text)
    text = _US_DATE.sub(lambda m: take(f"{m['y']}-{int(m['m']):02d}-{int(m['d']):02d}"), text)
    text = _MONTH_YEAR.sub(lambda m: take(f"{m['y']}-{_MONTHS[m['mon'][:3].lower()]:02d}"), text)
    text = _YEAR.sub(lambda m: take(m.group(1)), text)
    terms.update(f"num:{_number(n)}" for n in _NUMBER.findall(text))
    terms.update(w[:6] for w in re.findall(r"[a-z]+", text.lower()) if len(w) >= 3 and w not in _FILLER)
    return frozenset(terms)


def coded_terms(text: str, keys: frozenset[str]) -> frozenset[str]:
    """The terms of the coded part, with every date also as its month and year (a statement that
    says "in 2019" restates a coded 2019-03-04)."""
    terms = set(statement_terms(text, keys))
    for term in list(terms):
        if term.startswith("date:"):
            iso = term[5:]
            terms.update({f"date:{iso[:7]}", f"date:{iso[:4]}"})
    return frozenset(terms)


__all__ = ["coded_terms", "statement_terms"]
