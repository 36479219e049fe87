"""Check the model's claims against the facts they cite; keep the supported ones, drop the rest.

`parse_claims()` reads the model's JSON output (`{"claims": [{"text", "citations"}]}`), tolerating
text around it and recovering whole claims from output that was cut off. `ground()` keeps a claim
only when:

- it is not empty, not a repeat of an earlier claim and at most `MAX_WORDS` words;
- it cites at least one fact, and every cited key exists in the record;
- every date it states (ISO, "04/01/2023", "April 1, 2023", "April 2023", a bare year) appears in
  a cited fact (a year or month is supported by a full date inside it);
- every number it states (7.2, 120/80, 1,000) appears in a cited fact, compared by value ("7.20"
  = "7.2"; units are not compared);
- every medication it names - any significant word of a medication in the record - appears in
  a cited fact;
- it is about what it cites: it states a (supported) number or date, or shares a content word
  with the cited facts ("allergic" meets "allergy" through a crude five-letter stem);
- it says little beyond what it cites: at most a quarter of its content words (none in a short
  claim) may be absent from the cited facts, so a supported date or a shared word cannot carry
  unsupported diagnoses or allergens.

Each drop carries a specific reason, shown to the reviewing clinician. What this does not catch:
a condition or drug named in a claim but absent from the whole record, and wrong meaning built
from supported words ("no diabetes" citing a diabetes fact). The clinician's review is the last
check, and the summary says so.

Pure: no IO, no logging of claim text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from fhir_adapters.models import ClinicalContext, Fact

MAX_WORDS = 60
# Share of a claim's content words that may be absent from its cited sources (none in a claim of
# fewer than four: "Allergic to bee venom" citing a peanut allergy shares "allergic" and nothing else).
MAX_UNSUPPORTED_SHARE = 0.25
NOT_JSON = "model output was not valid JSON"
NO_CLAIMS = 'model output has no "claims" list'

_INLINE_KEY = re.compile(r"\[([A-Za-z]{1,3}[0-9]+)\]")
_LIST_MARKER = re.compile(r"^(?:\d{1,2}[.)]|[-*\u2022])\s+")
_MAX_JSON_STARTS = 200  # bounds the search for JSON in long garbage output


@dataclass(frozen=True)
class Claim:
    text: str
    citations: tuple[str, ...]


Severity = Literal["high", "medium", "low"]
Verdict = Literal["unsupported", "contradicted"]


@dataclass(frozen=True)
class DroppedClaim:
    """A claim that is not written as fact, why, and how much it matters.

    `verdict` is "contradicted" when the claim negates or inverts what a cited source records
    (shown to the reviewer as a warning, not only as a drop). `severity`: high for a contradicted
    or wrong allergy, medication or dose, medium for a wrong date or value, low for wording.
    """

    claim: Claim
    reason: str
    verdict: Verdict = "unsupported"
    severity: Severity = "low"

    @property
    def contradicted(self) -> bool:
        return self.verdict == "contradicted"


@dataclass(frozen=True)
class GroundingResult:
    kept: list[Claim]
    dropped: list[DroppedClaim]

    @property
    def support_rate(self) -> float:
        """Share of claims kept (0.0 when there were none)."""
        total = len(self.kept) + len(self.dropped)
        return len(self.kept) / total if total else 0.0


# --- parsing -----------------------------------------------------------------------------------


def parse_claims(output: str) -> tuple[list[Claim], list[DroppedClaim]]:
    """Claims from model output, and what could not be read as a claim.

    Output that is not valid JSON gives one DroppedClaim holding the raw text; whole claim
    objects inside it (output cut off at max_tokens) are still recovered.
    """
    raw = Claim(output.strip(), ())
    document = _first_json(output)
    if document is None:
        whole = [_claim_from(item) for item in _claim_objects(output)]
        recovered = [c for c in whole if isinstance(c, Claim)]
        if not recovered and _is_json(output):
            return [], [DroppedClaim(raw, NO_CLAIMS)]
        return recovered, [DroppedClaim(raw, NOT_JSON)]
    items = document.get("claims") if isinstance(document, dict) else document
    if not isinstance(items, list):
        return [], [DroppedClaim(raw, NO_CLAIMS)]
    claims: list[Claim] = []
    dropped: list[DroppedClaim] = []
    for number, item in enumerate(items, 1):
        parsed = _claim_from(item)
        if isinstance(parsed, Claim):
            claims.append(parsed)
        else:
            text = item if isinstance(item, str) else json.dumps(item, ensure_ascii=False)
            dropped.append(DroppedClaim(Claim(text, ()), f"claim {number} {parsed}"))
    return claims, dropped


def _first_json(output: str) -> dict[str, Any] | list[Any] | None:
    decoder = json.JSONDecoder()
    starts = [m.start() for m in re.finditer(r"[{\[]", output)][:_MAX_JSON_STARTS]
    for start in starts:
        try:
            value, _end = decoder.raw_decode(output, start)
        except ValueError:
            continue
        if isinstance(value, dict) and "claims" in value:
            return value
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            return value
    return None


def _is_json(output: str) -> bool:
    try:
        json.loads(output)
    except ValueError:
        return False
    return True


def _claim_objects(output: str) -> list[dict[str, Any]]:
    """Complete `{"text": ...}` objects found anywhere in (possibly cut-off) output."""
    decoder = json.JSONDecoder()
    found: list[dict[str, Any]] = []
    position = 0
    for _ in range(_MAX_JSON_STARTS):
        start = output.find("{", position)
        if start < 0:
            break
        try:
            value, end = decoder.raw_decode(output, start)
        except ValueError:
            position = start + 1
            continue
        if isinstance(value, dict) and "text" in value:
            found.append(value)
            position = end
        else:
            position = start + 1
    return found


def _claim_from(item: object) -> Claim | str:
    """A Claim, or why the item is not one."""
    if not isinstance(item, dict):
        return "is not an object with text and citations"
    text = item.get("text")
    if not isinstance(text, str):
        return "has no text"
    raw = item.get("citations")
    if isinstance(raw, str):
        raw = re.split(r"[,;\s]+", raw)
    keys = [_normal_key(k) for k in raw if isinstance(k, str)] if isinstance(raw, list) else []
    if not any(keys):
        # A model that ignores the schema may still cite inline: "... [C1]".
        keys = [_normal_key(k) for k in _INLINE_KEY.findall(text)]
    # List markers ("1. ", "- ") are layout, not a stated number.
    text = _LIST_MARKER.sub("", " ".join(text.split()))
    return Claim(text, tuple(dict.fromkeys(k for k in keys if k)))


def _normal_key(key: str) -> str:
    return key.strip().strip("[]()").strip().upper()


# --- grounding ---------------------------------------------------------------------------------


def ground(claims: Sequence[Claim], ctx: ClinicalContext) -> GroundingResult:
    """Keep the claims every cited fact supports; drop the rest with a specific reason."""
    facts = ctx.by_key()
    medication_words = medication_vocabulary(ctx.facts)
    kept: list[Claim] = []
    dropped: list[DroppedClaim] = []
    seen: set[str] = set()
    for claim in claims:
        reason = _problem(claim, facts, medication_words, seen)
        if reason is None:
            kept.append(claim)
        else:
            dropped.append(DroppedClaim(claim, reason))
    return GroundingResult(kept=kept, dropped=dropped)


def ground_output(output: str, ctx: ClinicalContext) -> GroundingResult:
    """`parse_claims` then `ground`: unreadable parts are dropped along with unsupported claims."""
    claims, unreadable = parse_claims(output)
    result = ground(claims, ctx)
    return GroundingResult(kept=result.kept, dropped=unreadable + result.dropped)


def _problem(
    claim: Claim, facts: Mapping[str, Fact], medication_words: frozenset[str], seen: set[str]
) -> str | None:
    text = claim.text.strip()
    if not text:
        return "is empty"
    words = len(text.split())
    if words > MAX_WORDS:
        return f"has {words} words, more than the {MAX_WORDS}-word limit"
    fingerprint = " ".join(re.findall(r"\d+(?:\.\d+)?|[a-z]+", _INLINE_KEY.sub(" ", text.lower())))
    if fingerprint in seen:
        return "repeats an earlier claim"
    seen.add(fingerprint)
    if not claim.citations:
        return "cites no source"
    unknown = [key for key in claim.citations if key not in facts]
    if unknown:
        verb = "which is" if len(unknown) == 1 else "which are"
        return f"cites {_join(unknown)}, {verb} not in the record"
    cited = [facts[key] for key in claim.citations]
    where = f"[{', '.join(claim.citations)}]"
    evidence = Evidence.of(cited)
    stated = Statement.of(text)
    missing = [d.shown for d in stated.dates if not evidence.supports_date(d)]
    missing += [n.shown for n in stated.numbers if not evidence.supports_number(n)]
    if missing:
        return f"states {_join(list(dict.fromkeys(missing)))} not found in cited sources {where}"
    unnamed = sorted(w for w in stated.words & medication_words if w not in evidence.words)
    if unnamed:
        return f"names {_join(unnamed)}, not in cited sources {where}"
    # A claim must be about what it cites: a supported number or date, or a shared content word.
    if not (stated.stems & evidence.stems or stated.numbers or stated.dates):
        return f"shares no words with cited sources {where}"
    # ... and must not say much more than it cites: a sentence that strings supported dates to
    # unsupported diagnoses is not grounded because its date is.
    unsupported = sorted(stated.stems - evidence.stems)
    if len(unsupported) > int(len(stated.stems) * MAX_UNSUPPORTED_SHARE):
        shown = [w for w in stated.content_words if w[:5] in unsupported][:4]
        return f"says {_join(shown)}, not found in cited sources {where}"
    return None


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


# --- dates and numbers -------------------------------------------------------------------------

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
_NUMBER = r"\d+(?:,\d{3})*(?:\.\d+)?"
_NUMBER_OR_PAIR = re.compile(
    rf"(?<![A-Za-z0-9.,])(?<![A-Za-z]-)(?P<a>{_NUMBER})(?:\s*/\s*(?P<b>{_NUMBER}))?(?!\d)(?!st\b|nd\b|rd\b|th\b)"
)


@dataclass(frozen=True)
class StatedDate:
    shown: str
    candidates: frozenset[str]  # ISO forms it may mean: "2023-04-01" (or "2023-01-04"), "2023-04", "2023"


@dataclass(frozen=True)
class StatedNumber:
    shown: str
    values: tuple[str, ...]  # one value, or two for a pair like 120/80


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


def normal_number(raw: str) -> str:
    """A number's value as text: "1,000" -> "1000", "7.20" -> "7.2", "007" -> "7".

    >>> [normal_number(n) for n in ("1,000", "7.20", "007", "0.5", "10.0")]
    ['1000', '7.2', '7', '0.5', '10']
    """
    whole, _, fraction = raw.replace(",", "").partition(".")
    whole = whole.lstrip("0") or "0"
    fraction = fraction.rstrip("0")
    return f"{whole}.{fraction}" if fraction else whole


def find_numbers(text: str) -> list[StatedNumber]:
    """Numbers and pairs (120/80) in text whose dates were already blanked out.

    Digits inside words (HbA1c, B12, COVID-19, C1) and ordinals (2nd) are not numbers.
    """
    found: list[StatedNumber] = []
    for match in _NUMBER_OR_PAIR.finditer(text):
        values = [normal_number(match.group("a"))]
        if match.group("b"):
            values.append(normal_number(match.group("b")))
        found.append(StatedNumber(" ".join(match.group(0).split()), tuple(values)))
    return found


def _words(text: str) -> frozenset[str]:
    return frozenset(re.findall(r"[a-z]+", text.lower()))


# Words too common in claims and facts to show that a claim is about the fact it cites.
_COMMON_WORDS = frozenset(
    """
    about after also active been before being current currently date does from have having into
    most other over patient patients prescribed recent recently record since some still that their
    there these they this those time very were what when which while will with without years
    history diagnosed diagnosis treated taking takes known noted shows showed reports reported
    presents presented including underwent received status condition visit visits encounter
    episode ongoing previously documented recorded listed includes latest last
    """.split()
)


def content_stems(words: Iterable[str]) -> frozenset[str]:
    """Crude stems of the content words, so "allergic" meets "allergy" and "hypertensive" meets
    "hypertension": the first five letters of each word of five letters or more.

    >>> sorted(content_stems(["allergic", "to", "the", "peanuts", "patient"]))
    ['aller', 'peanu']
    """
    return frozenset(w[:5] for w in words if len(w) >= 5 and w not in _COMMON_WORDS)


@dataclass(frozen=True)
class Statement:
    dates: list[StatedDate]
    numbers: list[StatedNumber]
    words: frozenset[str]
    stems: frozenset[str]
    content_words: tuple[str, ...] = ()  # in order of appearance, for messages

    @classmethod
    def of(cls, text: str) -> Statement:
        text = _INLINE_KEY.sub(" ", text)  # "[C1]" is a citation, not a stated number
        dates, rest = find_dates(text)
        words = _words(rest)  # month names belong to the stated dates, checked as dates
        stems = content_stems(words)
        ordered = tuple(dict.fromkeys(w for w in re.findall(r"[a-z]+", rest.lower()) if w[:5] in stems))
        return cls(dates=dates, numbers=find_numbers(rest), words=words, stems=stems, content_words=ordered)


@dataclass(frozen=True)
class Evidence:
    """What the cited facts say: their dates (with month and year prefixes), numbers and words."""

    dates: frozenset[str]
    numbers: frozenset[str]
    pairs: frozenset[tuple[str, str]]
    per_fact_numbers: tuple[frozenset[str], ...]
    words: frozenset[str]
    stems: frozenset[str]

    @classmethod
    def of(cls, facts: Iterable[Fact]) -> Evidence:
        dates: set[str] = set()
        numbers: set[str] = set()
        pairs: set[tuple[str, str]] = set()
        per_fact: list[frozenset[str]] = []
        words: set[str] = set()
        for fact in facts:
            text = " ".join(p for p in (fact.text, fact.display, fact.value, fact.date) if p)
            found, rest = find_dates(text)
            for date in found:
                for iso in date.candidates:
                    dates.update({iso, iso[:7], iso[:4]})
            fact_numbers: set[str] = set()
            for number in find_numbers(rest):
                fact_numbers.update(number.values)
                if len(number.values) == 2:
                    pairs.add((number.values[0], number.values[1]))
            numbers |= fact_numbers
            per_fact.append(frozenset(fact_numbers))
            words |= _words(text)
        return cls(
            dates=frozenset(dates),
            numbers=frozenset(numbers),
            pairs=frozenset(pairs),
            per_fact_numbers=tuple(per_fact),
            words=frozenset(words),
            stems=content_stems(words),
        )

    def supports_date(self, date: StatedDate) -> bool:
        # A bare year may also be a plain quantity ("2000 mg"): then a number match is enough.
        return bool(date.candidates & self.dates) or any(c in self.numbers for c in date.candidates)

    def supports_number(self, number: StatedNumber) -> bool:
        if len(number.values) == 1:
            return number.values[0] in self.numbers
        a, b = number.values
        # 120/80 is supported as written, or by one fact holding both (systolic 120, diastolic 80).
        return (a, b) in self.pairs or any(a in nums and b in nums for nums in self.per_fact_numbers)


# --- medication names --------------------------------------------------------------------------

# Words of medication names that say how a drug is given or packed, not which drug it is.
_GENERIC_MEDICATION_WORDS = frozenset(
    """
    oral tablet tablets capsule capsules injection injectable solution suspension syrup cream
    ointment topical extended release delayed chewable film coated disintegrating prefilled
    syringe pen auto injector inhaler inhalation metered dose actuat spray nasal patch transdermal
    powder vial drops ophthalmic otic rectal vaginal suppository lotion elixir liquid product
    hydrochloride sodium potassium acetate sulfate phosphate citrate maleate succinate tartrate
    besylate bromide chloride calcium magnesium hcl human unit units day days hour hours pack kit
    daily twice each with without release system medication medicine drug
    """.split()
)


def medication_vocabulary(facts: Iterable[Fact]) -> frozenset[str]:
    """Significant words of every medication name in the record ("metformin", "lisinopril")."""
    vocabulary: set[str] = set()
    for fact in facts:
        if fact.kind != "medication":
            continue
        name = fact.display or fact.text
        vocabulary.update(w for w in _words(name) if len(w) >= 4 and w not in _GENERIC_MEDICATION_WORDS)
    return frozenset(vocabulary)
