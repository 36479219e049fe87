"""Dates as people and FHIR write them, read to ISO forms: "2019-03-04", "March 4, 2019",
"Mar 4, 2019", "4 March 2019", "03/04/2019" (month or day first), "March 2019", a bare year.

Pure: no IO.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_MONTHS = {
    name: number
    for number, names in enumerate(
        (
            ("january", "jan"), ("february", "feb"), ("march", "mar"), ("april", "apr"), ("may",),
            ("june", "jun"), ("july", "jul"), ("august", "aug"), ("september", "sep", "sept"),
            ("october", "oct"), ("november", "nov"), ("december", "dec"),
        ),
        1,
    )
    for name in names
}  # fmt: skip
_MONTH = r"(?P<mon>" + "|".join(sorted(_MONTHS, key=len, reverse=True)) + r")\.?"
_DATE_PATTERNS = (
    re.compile(r"\b(?P<y>\d{4})-(?P<m>\d{1,2})-(?P<d>\d{1,2})(?:T[0-9:.]+(?:Z|[+-]\d{2}:?\d{2})?)?(?!\d)"),
    re.compile(r"\b(?P<a>\d{1,2})/(?P<b>\d{1,2})/(?P<y>\d{4})\b"),
    re.compile(r"\b(?P<y>\d{4})/(?P<m>\d{1,2})/(?P<d>\d{1,2})\b"),
    re.compile(rf"\b{_MONTH}\s+(?P<d>\d{{1,2}})(?:st|nd|rd|th)?,?\s+(?P<y>\d{{4}})\b", re.IGNORECASE),
    re.compile(
        rf"\b(?P<d>\d{{1,2}})(?:st|nd|rd|th)?\s+(?:of\s+)?{_MONTH},?\s+(?P<y>\d{{4}})\b", re.IGNORECASE
    ),
    re.compile(rf"\b{_MONTH},?\s+(?:of\s+)?(?P<y>\d{{4}})\b", re.IGNORECASE),
    re.compile(r"\b(?P<y>\d{4})-(?P<m>0[1-9]|1[0-2])\b(?!-)"),
    re.compile(r"(?<![A-Za-z0-9.,/])(?P<y>(?:19|20)\d{2})(?!\d|[.,/]\d|%)"),
)


@dataclass(frozen=True)
class StatedDate:
    shown: str
    candidates: frozenset[str]  # ISO forms it may mean: "2023-04-01" (or "2023-01-04"), "2023-04", "2023"


def _iso(year: str, month: int | None, day: int | None) -> str | None:
    if month is None:
        return year
    if not 1 <= month <= 12:
        return None
    if day is None:
        return f"{year}-{month:02d}"
    return f"{year}-{month:02d}-{day:02d}" if 1 <= day <= 31 else None


def find_dates(text: str) -> tuple[list[StatedDate], str]:
    """The dates in `text`, and the text with them blanked out (so their digits are not numbers)."""
    found: list[StatedDate] = []
    for pattern in _DATE_PATTERNS:

        def take(match: re.Match[str]) -> str:
            groups = match.groupdict()
            year = groups["y"]
            day = int(groups["d"]) if groups.get("d") else None
            if groups.get("mon"):
                candidates = {_iso(year, _MONTHS[groups["mon"].lower()], day)}
            elif groups.get("a"):  # 04/01/2023: month first (US) or day first
                a, b = int(groups["a"]), int(groups["b"])
                candidates = {_iso(year, a, b), _iso(year, b, a)}
            else:
                candidates = {_iso(year, int(groups["m"]) if groups.get("m") else None, day)}
            valid = frozenset(c for c in candidates if c)
            if not valid:
                return match.group(0)
            found.append(StatedDate(match.group(0), valid))
            return " " * len(match.group(0))

        text = pattern.sub(take, text)
    return found, text


def day_of(value: object) -> str | None:
    """The local date a FHIR date or dateTime states (no time-zone conversion), or None.

    >>> day_of("2019-03-04T23:30:00-05:00"), day_of("2019-03"), day_of(None)
    ('2019-03-04', '2019-03', None)
    """
    if not isinstance(value, str) or not re.match(r"\d{4}", value):
        return None
    return value[:10]


def widen(iso: str) -> set[str]:
    """A date and the month and year it falls in: what a claim may state of it.

    >>> sorted(widen("2019-03-04"))
    ['2019', '2019-03', '2019-03-04']
    """
    return {iso, iso[:7], iso[:4]}
