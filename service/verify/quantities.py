"""Numbers with units, read from claims and from sources, and compared by value and unit.

Units are read from a known list (UCUM as FHIR writes them and the ways people write them:
`mm[Hg]` and `mmHg`, `Cel` and `°C`, `10*3/uL` and `x10^3/uL`, `[lb_av]` and `lb`), so the digits
inside a unit (`x10^3/uL`, `mL/min/1.73 m2`) are never taken for stated numbers. A stated value is
supported by a source value when both are the same number in the same unit, or when the stated
unit converts to the source's (pounds to kilograms, Fahrenheit to Celsius, inches to centimetres;
conversions through pint) and the converted source value, rounded as the claim rounds, is the
stated value. A wrong conversion is unsupported.

Pure: no IO.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from functools import lru_cache
from typing import Any

import pint

# Written form (lower case, as a regex) -> canonical unit. Longest forms are tried first.
_UNIT_FORMS: dict[str, str] = {
    r"x\s?10\^?\*?(\d+)\s?/\s?u?l": "x10^{0}/ul",
    r"10\*(\d+)\s?/\s?u?l": "x10^{0}/ul",
    r"ml\s?/\s?min\s?/\s?\{?1\.73[_\s]?(?:sq\.?\s?)?m2?\}?": "ml/min/1.73m2",
    r"mm\s?\[?hg\]?": "mmhg",
    r"°\s?c\b|\bdeg(?:rees?)?\s?c(?:elsius)?\b|\bcel\b|\bcelsius\b": "degc",
    r"°\s?f\b|\bdeg(?:rees?)?\s?f(?:ahrenheit)?\b|\[degf\]|\bfahrenheit\b": "degf",
    r"kg\s?/\s?m\^?2": "kg/m2",
    r"\{?breaths\}?\s?/\s?min|\{?beats\}?\s?/\s?min|/\s?min\b|\bbpm\b|per minute": "/min",
    r"mg\s?/\s?dl": "mg/dl",
    r"g\s?/\s?dl": "g/dl",
    r"mmol\s?/\s?l": "mmol/l",
    r"meq\s?/\s?l": "mmol/l",
    r"\[?iu\]?\s?/\s?l|\bu\s?/\s?l": "u/l",
    r"ng\s?/\s?ml": "ng/ml",
    r"pg\s?/\s?ml": "pg/ml",
    r"mg\s?/\s?ml": "mg/ml",
    r"mg\s?/\s?actuat": "mg/actuat",
    r"mcg\s?/\s?actuat": "mcg/actuat",
    r"mg\s?/\s?hr?": "mg/hr",
    r"mcg\s?/\s?(?:\d+(?:\.\d+)?\s?)?ml": "mcg/ml",
    r"\bfl\b": "fl",
    r"\bpg\b": "pg",
    r"\[lb_av\]|\blbs?\b|\bpounds?\b": "lb",
    r"\[in_i\]|\binch(?:es)?\b": "in",  # never a bare "in": "130/85 in 2022" is a date
    r"\bkg\b|\bkilograms?\b": "kg",
    r"\bmg\b|\bmilligrams?\b": "mg",
    r"\bmcg\b|\bµg\b|\bug\b|\bmicrograms?\b": "mcg",
    r"\bg\b|\bgrams?\b": "g",
    r"\bcm\b|\bcentimet(?:er|re)s?\b": "cm",
    r"\bmm\b": "mm",
    r"\bml\b|\bmillilit(?:er|re)s?\b": "ml",
    r"\bhr\b|\bhours?\b": "h",
    r"%|\bpercent\b": "%",
    r"\{score\}|\bpoints?\b": "{score}",
}


def _glued(form: str) -> str:
    """A unit may follow its number without a space ("40mg"): no word boundary before it."""
    return "(?<![a-z])" + form[2:] if form.startswith(r"\b") else form


_UNIT_PATTERN = re.compile(
    "|".join(f"(?P<u{i}>{_glued(form)})" for i, form in enumerate(_UNIT_FORMS)), re.IGNORECASE
)
_CANONICAL = list(_UNIT_FORMS.values())

# Canonical unit -> pint unit, for the units that convert into one another.
_PINT_NAMES = {
    "kg": "kilogram", "lb": "pound", "g": "gram", "mg": "milligram", "mcg": "microgram",
    "cm": "centimeter", "in": "inch", "mm": "millimeter", "degc": "degC", "degf": "degF",
}  # fmt: skip

_NUMBER = r"\d+(?:,\d{3})*(?:\.\d+)?"
# A number: not glued to letters before it ("B12", "A1c", "COVID-19", "PHQ-2"), not an ordinal.
_NUMBER_AT = re.compile(rf"(?<![A-Za-z0-9.,^*])(?<![A-Za-z]-)(?P<n>{_NUMBER})(?!\d)(?!st\b|nd\b|rd\b|th\b)")
_PAIR_AT = re.compile(rf"(?<![A-Za-z0-9.,])(?P<a>{_NUMBER})\s*/\s*(?P<b>{_NUMBER})(?!\d|\.\d)")


@dataclass(frozen=True)
class Quantity:
    """A number as written, its canonical unit (None when none was written) and its role
    ("systolic" / "diastolic" for blood pressure components, else None)."""

    value: str  # normalized: "7.2", "1000"
    unit: str | None = None
    role: str | None = None

    @property
    def decimals(self) -> int:
        return len(self.value.partition(".")[2])


def normal_number(raw: str) -> str:
    """A number's value as text: "1,000" -> "1000", "7.20" -> "7.2", "007" -> "7".

    >>> [normal_number(n) for n in ("1,000", "7.20", "007", "0.5", "10.0")]
    ['1000', '7.2', '7', '0.5', '10']
    """
    whole, _, fraction = raw.replace(",", "").partition(".")
    whole = whole.lstrip("0") or "0"
    fraction = fraction.rstrip("0")
    return f"{whole}.{fraction}" if fraction else whole


def canonical_unit(written: str | None) -> str | None:
    """The canonical form of a unit as a resource or a person writes it; None when unknown.

    >>> [canonical_unit(u) for u in ("mm[Hg]", "Cel", "10*3/uL", "[lb_av]", "kg/m2", "{score}")]
    ['mmhg', 'degc', 'x10^3/ul', 'lb', 'kg/m2', '{score}']
    """
    if not written:
        return None
    match = _UNIT_PATTERN.fullmatch(written.strip())
    return _unit_of(match) if match else None


def _unit_of(match: re.Match[str]) -> str:
    for name, text in match.groupdict().items():
        if text is not None and name.startswith("u"):
            index = int(name[1:])
            canonical = _CANONICAL[index]
            if "{0}" in canonical:
                inner = re.search(r"[\^*]\s?(\d+)", text) or re.search(r"10\s?(\d)", text)
                return canonical.format(inner.group(1) if inner else "3")
            return canonical
    raise AssertionError("a unit match names its group")


def read_quantities(text: str) -> tuple[list[Quantity], list[tuple[Quantity, Quantity]], str]:
    """The numbers of a text with the unit written right after each, the pairs ("120/80 mmHg"),
    and the text with numbers and units blanked out (what remains is words).

    >>> q, pairs, rest = read_quantities("platelets 352.58 x10^3/uL and BP 120/80 mmHg")
    >>> [(x.value, x.unit) for x in q], [(a.value, b.value, a.unit) for a, b in pairs]
    ([('352.58', 'x10^3/ul')], [('120', '80', 'mmhg')])
    """
    found: list[Quantity] = []
    pairs: list[tuple[Quantity, Quantity]] = []
    chars = list(text)

    def blank(start: int, end: int) -> None:
        chars[start:end] = " " * (end - start)

    for match in _PAIR_AT.finditer(text):
        unit, unit_end = _unit_after(text, match.end())
        a = Quantity(normal_number(match.group("a")), unit, "systolic")
        b = Quantity(normal_number(match.group("b")), unit, "diastolic")
        pairs.append((a, b))
        blank(match.start(), unit_end)
    rest = "".join(chars)
    taken = 0  # numbers inside a unit already read ("mL/min/1.73 m2") are not stated numbers
    for match in _NUMBER_AT.finditer(rest):
        if match.start() < taken:
            continue
        unit, unit_end = _unit_after(rest, match.end())
        taken = unit_end
        found.append(Quantity(normal_number(match.group("n")), unit))
        blank(match.start(), unit_end)
    rest = "".join(chars)
    # Units standing alone (a unit whose digits would otherwise read as numbers, "1.73 m2").
    rest = _UNIT_PATTERN.sub(
        lambda m: " " * len(m.group(0)) if "{0}" in _CANONICAL_OF(m) else m.group(0), rest
    )
    return found, pairs, rest


def _CANONICAL_OF(match: re.Match[str]) -> str:  # noqa: N802 - a small lookup used in one lambda
    for name, text in match.groupdict().items():
        if text is not None:
            return _CANONICAL[int(name[1:])]
    return ""


def _unit_after(text: str, position: int) -> tuple[str | None, int]:
    """The unit written right after a number (spaces allowed), and where it ends."""
    match = _UNIT_PATTERN.match(text, position + (len(text[position:]) - len(text[position:].lstrip(" "))))
    if match is None or match.start() - position > 2:
        return None, position
    return _unit_of(match), match.end()


@lru_cache(maxsize=1)
def _registry() -> pint.UnitRegistry[Any]:
    return pint.UnitRegistry()


def converted(value: str, unit: str, to_unit: str) -> Decimal | None:
    """`value` in `unit` expressed in `to_unit`, when the two convert; else None."""
    if unit == to_unit:
        return Decimal(value)
    source, target = _PINT_NAMES.get(unit), _PINT_NAMES.get(to_unit)
    if source is None or target is None:
        return None
    registry = _registry()
    try:
        quantity = registry.Quantity(float(value), source).to(target)
    except pint.DimensionalityError:
        return None
    return Decimal(repr(float(quantity.magnitude)))


def same_value(stated: Quantity, source: Quantity, *, rounding: bool) -> bool:
    """Whether a stated quantity is the source's: equal as written, or (with `rounding`) the
    source value rounded to as many decimals as the claim writes; a stated unit must be the
    source's or convert to it.

    >>> same_value(Quantity("180", "lb"), Quantity("81.6466", "kg"), rounding=True)
    True
    >>> same_value(Quantity("80", "lb"), Quantity("81.6466", "kg"), rounding=True)
    False
    >>> same_value(Quantity("95", "mmol/l"), Quantity("95", "mg/dl"), rounding=False)
    False
    """
    if stated.unit and source.unit and stated.unit != source.unit:
        value = converted(source.value, source.unit, stated.unit)
        if value is None:
            return False
        return _rounded(value, stated.decimals) == Decimal(stated.value)
    if stated.value == source.value:
        return True
    if not rounding or stated.decimals >= source.decimals:
        return False
    try:
        return _rounded(Decimal(source.value), stated.decimals) == Decimal(stated.value)
    except InvalidOperation:
        return False


def _rounded(value: Decimal, decimals: int) -> Decimal:
    return value.quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP)
