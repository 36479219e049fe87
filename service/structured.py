"""The part of a summary that never depends on the model: coded sections, each line cited.

`build_structured` reads only the facts of a `ClinicalContext` (and, for trends, panels and
flags, the raw resources they came from) and writes lines whose words, numbers and dates all come
from the record, so this part is true to the record even when every model statement is dropped.

Sections, in the order a clinician reads: a one-line synopsis; active problems (disorders);
active medications; allergies; flagged results; then, when the notes disagree with the coded
data, the conflicts (`service.conflicts`); below them social history and other findings, recent
encounters, trends and the remaining labs and vitals (panels within range on one line).
Administrative items ("Medication review due") are left out and counted. Values are flagged by
`service.ranges`: the observation's own interpretation or reference range, else a versioned
adult table whose identity travels in the JSON.

What it must not do: call a model, do IO beyond reading the shipped range table, or state
anything the record does not hold. An empty section says what is missing ("No allergies
recorded"); it never invents a negative finding such as "no known allergies".
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fhir_adapters.models import ClinicalContext, Fact, Skipped
from service.coded import (
    KEY_LAB_CODES,
    TREND_CODES,
    age_years_at,
    condition_group,
    direction,
    history,
    is_non_allergen,
    panels,
    patient_sex,
    resource_of,
)
from service.conflicts import Conflict, find_conflicts
from service.ranges import Flag, RangeTable, flag_observation, load_table
from service.safety import md_escape

ACTIVE_CONDITION = frozenset({"active", "recurrence", "relapse"})
ACTIVE_MEDICATION = frozenset({"active", "on-hold"})

_KEY_LAB_RANK = {code: rank for rank, code in enumerate(KEY_LAB_CODES)}


SYNOPSIS = "Synopsis"
PROBLEMS = "Active problems"
MEDICATIONS = "Active medications"
ALLERGIES = "Allergies"
FLAGGED = "Flagged results"
SOCIAL = "Social history and other findings"
ENCOUNTERS = "Recent encounters"
TRENDS = "Trends"
LABS = "Latest labs and vitals"
TITLES = (SYNOPSIS, PROBLEMS, MEDICATIONS, ALLERGIES, FLAGGED, SOCIAL, ENCOUNTERS, TRENDS, LABS)
CONFLICTS_TITLE = "Conflicts in the record"
# The conflicts are shown right after this section (in the document and on the review screen).
CONFLICTS_AFTER = FLAGGED
ADULT_RANGES = "reference ranges apply to adults"
ADULT_RANGES_ONLY = "Reference ranges apply to adults; not flagged (patient under 18)"


@dataclass(frozen=True)
class Line:
    """One cited line; a line made of `parts` (the synopsis) cites each part where it is stated."""

    text: str
    citations: tuple[str, ...] = ()
    parts: tuple[Line, ...] = ()

    def to_markdown(self) -> str:
        """`- text [C1, C2]` (no brackets when the line cites nothing).

        >>> Line("Hypertension (since 2011-01-01)", ("C3",)).to_markdown()
        '- Hypertension (since 2011-01-01) [C3]'
        >>> Line.joined([Line("female, 50 years old", ("P1",)), Line("no allergies recorded")]).to_markdown()
        '- female, 50 years old [P1]; no allergies recorded'
        """
        if self.parts:
            return "- " + "; ".join(part.to_markdown()[2:] for part in self.parts)
        cited = f" [{', '.join(self.citations)}]" if self.citations else ""
        # The text comes from the record: literal in the markdown, whatever characters it holds.
        return f"- {md_escape(self.text)}{cited}"

    @classmethod
    def joined(cls, parts: list[Line]) -> Line:
        keys = tuple(dict.fromkeys(k for part in parts for k in part.citations))
        return cls("; ".join(part.text for part in parts), keys, tuple(parts))

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"text": self.text, "citations": list(self.citations)}
        if self.parts:
            data["parts"] = [part.to_json() for part in self.parts]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Line:
        parts = tuple(cls.from_json(p) for p in data.get("parts") or [])
        return cls(str(data["text"]), tuple(data["citations"]), parts)


@dataclass(frozen=True)
class Section:
    title: str
    lines: tuple[Line, ...]


@dataclass(frozen=True)
class NotRead:
    """Resources of one type left out of the summary for one reason: refused, unreadable,
    malformed, or excluded (an AI-written draft). `count` 0 = the whole type (its search was
    refused), so the summary is written without any of it."""

    resource_type: str
    reason: str
    count: int = 0

    @property
    def whole_type(self) -> bool:
        return self.count == 0

    def text(self) -> str:
        """`Procedure: none read (search refused by the server (status 403))`, `2 Binary: ...`."""
        if self.whole_type:
            return f"{self.resource_type}: none read ({self.reason})"
        return f"{self.count} {self.resource_type}: {self.reason}"

    def to_json(self) -> dict[str, Any]:
        return {"resource_type": self.resource_type, "reason": self.reason, "count": self.count}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NotRead:
        return cls(str(data["resource_type"]), str(data["reason"]), int(data.get("count") or 0))


def _keys(keys: tuple[str, ...]) -> str:
    return f"[{', '.join(keys)}]"


def not_read(skipped: list[Skipped]) -> tuple[NotRead, ...]:
    """What was skipped while reading, one entry per type and reason, whole types first. Pure.

    >>> for n in not_read([Skipped("Binary/1", "could not be read (status 404)"),
    ...     Skipped("Procedure", "search refused by the server (status 403)"),
    ...     Skipped("Binary/2", "could not be read (status 404)")]):
    ...     print(n.text())
    Procedure: none read (search refused by the server (status 403))
    2 Binary: could not be read (status 404)
    """
    whole = [NotRead(s.resource_type, s.reason) for s in skipped if s.whole_type]
    counts: dict[tuple[str, str], int] = {}
    for s in skipped:
        if not s.whole_type:
            counts[(s.resource_type, s.reason)] = counts.get((s.resource_type, s.reason), 0) + 1
    return (*dict.fromkeys(whole), *(NotRead(t, r, n) for (t, r), n in counts.items()))


@dataclass(frozen=True)
class StructuredSummary:
    sections: tuple[Section, ...]
    conflicts: tuple[Conflict, ...] = ()
    # id, version and sha256 of the reference-range table the flags were read against.
    reference_ranges: dict[str, str] = field(default_factory=dict)
    # What the record held that this summary could not use, and why.
    not_read: tuple[NotRead, ...] = ()

    @property
    def missing_types(self) -> tuple[str, ...]:
        """The resource types the summary is written without (their search was refused)."""
        return tuple(n.resource_type for n in self.not_read if n.whole_type)

    def incomplete_line(self) -> str | None:
        """The warning a reader must see first when whole resource types are missing."""
        if not self.missing_types:
            return None
        return (
            f"**Incomplete record:** the FHIR server refused the search for {', '.join(self.missing_types)}; "
            "this summary is written without them."
        )

    def not_read_line(self) -> str | None:
        """`_Not shown (could not be used): ..._`, or None when everything read was used."""
        if not self.not_read:
            return None
        return (
            "_Not shown (could not be used): " + "; ".join(md_escape(n.text()) for n in self.not_read) + "._"
        )

    def to_markdown(self) -> str:
        """Each section as a `##` heading and a bullet list, the conflicts (when there are any)
        after the flagged results; each line ends with its citations, a conflict cites each side
        where it is stated."""
        blocks = []
        conflicts_shown = not self.conflicts
        for section in self.sections:
            bullets = "\n".join(line.to_markdown() for line in section.lines)
            blocks.append(f"## {section.title}\n\n{bullets}")
            if section.title == CONFLICTS_AFTER and not conflicts_shown:
                blocks.append(self._conflicts_block())
                conflicts_shown = True
        if not conflicts_shown:
            blocks.insert(0, self._conflicts_block())
        warning, shown = self.incomplete_line(), self.not_read_line()
        if warning:
            blocks.insert(0, warning)
        if shown:
            blocks.append(shown)
        return "\n\n".join(blocks) + "\n"

    def _conflicts_block(self) -> str:
        bullets = "\n".join(
            f"- Conflict: {md_escape(c.record)} {_keys(c.record_keys)}; "
            f"{md_escape(c.note)} {_keys(c.note_keys)}."
            for c in self.conflicts
        )
        return f"## {CONFLICTS_TITLE}\n\n{bullets}"

    def to_json(self) -> dict[str, Any]:
        return {
            "sections": [
                {"title": section.title, "lines": [line.to_json() for line in section.lines]}
                for section in self.sections
            ],
            "conflicts": [conflict.to_json() for conflict in self.conflicts],
            "reference_ranges": dict(self.reference_ranges),
            "not_read": [n.to_json() for n in self.not_read],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StructuredSummary:
        """The inverse of `to_json` (for summaries read back from storage, older ones too)."""
        return cls(
            tuple(
                Section(str(section["title"]), tuple(Line.from_json(line) for line in section["lines"]))
                for section in data["sections"]
            ),
            tuple(Conflict.from_json(c) for c in data.get("conflicts") or []),
            {str(k): str(v) for k, v in (data.get("reference_ranges") or {}).items()},
            tuple(NotRead.from_json(n) for n in data.get("not_read") or []),
        )

    def cited_keys(self) -> set[str]:
        """Every citation key some line or conflict cites."""
        keys = {key for section in self.sections for line in section.lines for key in line.citations}
        return keys | {key for conflict in self.conflicts for key in conflict.citations}

    def section(self, title: str) -> Section:
        for section in self.sections:
            if section.title == title:
                return section
        raise KeyError(f"no section titled {title!r}; sections are {[s.title for s in self.sections]}")


@functools.lru_cache(maxsize=4)
def default_table() -> RangeTable:
    """The shipped reference-range table (read once per process: it is never edited)."""
    return load_table()


def build_structured(
    ctx: ClinicalContext,
    *,
    max_encounters: int = 5,
    max_labs: int = 12,
    show_administrative: bool = False,
    table: RangeTable | None = None,
) -> StructuredSummary:
    """The coded sections of a summary and the notes' conflicts with them, from the record alone. Pure."""
    if max_encounters < 0 or max_labs < 0:
        raise ValueError(
            f"max_encounters and max_labs must not be negative, got {max_encounters}, {max_labs}"
        )
    table = table or default_table()
    conditions = [f for f in ctx.of_kind("condition") if f.status in ACTIVE_CONDITION or f.status is None]
    groups: dict[str, list[Fact]] = {"problem": [], "social": [], "administrative": []}
    for f in conditions:
        groups[condition_group(f.code, f.display)].append(f)
    if show_administrative:
        groups["problem"] += groups.pop("administrative")
    observations = [f for f in ctx.of_kind("observation") if f.category in ("vital-signs", "laboratory")]
    flags = {f.key: _flag(ctx, f, table) for f in observations}
    problems = problem_lines(groups["problem"]) + _hidden_line(groups.get("administrative", []))
    return StructuredSummary(
        (
            Section(SYNOPSIS, (synopsis_line(ctx, groups["problem"]),)),
            Section(PROBLEMS, problems),
            Section(MEDICATIONS, medication_lines(ctx.of_kind("medication"))),
            Section(ALLERGIES, allergy_lines(ctx.of_kind("allergy"))),
            Section(FLAGGED, flagged_lines(ctx, observations, flags, table)),
            Section(SOCIAL, social_lines(ctx, groups["social"])),
            Section(ENCOUNTERS, encounter_lines(ctx, max_encounters)),
            Section(TRENDS, trend_lines(ctx, observations)),
            Section(LABS, lab_and_vital_lines(ctx, observations, flags, max_labs)),
        ),
        find_conflicts(ctx),
        table.identity(),
        not_read(ctx.skipped),
    )


def synopsis_line(ctx: ClinicalContext, problems: list[Fact]) -> Line:
    """Who, the main disorders, how many medications, allergies, and the last encounter."""
    parts: list[Line] = []
    patient = next(iter(ctx.of_kind("patient")), None)
    parts.append(Line(ctx.patient_summary, (patient.key,) if patient else ()))
    merged = _merged(problems, lambda f: f.display or f.text)
    main = merged[:3]
    if main:
        more = len(merged) - len(main)
        suffix = f" (+{more} more)" if more > 0 else ""
        keys = tuple(k for line in main for k in line.citations)
        parts.append(Line("main problems: " + ", ".join(li.text for li in main) + suffix, keys))
    else:
        parts.append(Line("no active problems recorded"))
    meds = [f for f in ctx.of_kind("medication") if f.status in ACTIVE_MEDICATION]
    names = _merged(meds, lambda f: f.display or f.text)
    if names:
        noun = "medication" if len(names) == 1 else "medications"
        parts.append(Line(f"{len(names)} active {noun}", tuple(f.key for f in meds)))
    else:
        parts.append(Line("no active medications recorded"))
    active = [f for f in ctx.of_kind("allergy") if f.status in ("active", None)]
    allergens = [f for f in active if not is_non_allergen(f.code, f.display)]
    named = _merged(allergens, lambda f: f.display or f.text)
    if named:
        rest = f" (+{len(named) - 3} more)" if len(named) > 3 else ""
        shown = ", ".join(li.text for li in named[:3]) + rest
        parts.append(Line(f"allergies: {shown}", tuple(f.key for f in allergens)))
    elif active:
        # An allergy is recorded, its allergen is not: never "no allergies recorded".
        parts.append(Line("allergy recorded without a named allergen", tuple(f.key for f in active)))
    else:
        parts.append(Line("no allergies recorded"))
    encounters = ctx.of_kind("encounter")
    if encounters:
        last = encounters[0]
        reason = f", reason: {last.value}" if last.value else ""
        when = last.date or "date not recorded"
        parts.append(Line(f"last encounter {when}: {last.display}{reason}", (last.key,)))
    return Line.joined(parts)


def problem_lines(conditions: list[Fact]) -> tuple[Line, ...]:
    """Conditions that are active, recurring or relapsed; one line per name.

    A condition without a clinical status is listed too, marked, rather than silently dropped.
    """
    lines = _merged(conditions, _condition_text)
    return lines or (Line("No active problems recorded"),)


def _condition_text(f: Fact) -> str:
    return (
        f"{f.display}"
        + (f" ({f.status})" if f.status in ("recurrence", "relapse") else "")
        + (" (clinical status not recorded)" if f.status is None else "")
        + (f" (since {f.date})" if f.date else "")
    )


def _hidden_line(administrative: list[Fact]) -> tuple[Line, ...]:
    if not administrative:
        return ()
    n = len({(f.display or f.text).casefold() for f in administrative})
    return (Line(f"{n} administrative item{'s' if n != 1 else ''} not shown"),)


def social_lines(ctx: ClinicalContext, findings: list[Fact]) -> tuple[Line, ...]:
    """Social and other findings recorded as conditions, then the latest social-history answers
    (smoking status). Shown because they matter; apart, because they are not problems."""
    lines = list(_merged(findings, _condition_text))
    for f in ctx.of_kind("observation"):
        if f.category == "social-history":
            lines.append(Line(f"{f.display}: {f.value} ({f.date or 'date not recorded'})", (f.key,)))
    return tuple(lines) or (Line("No social history or other findings recorded"),)


def medication_lines(medications: list[Fact]) -> tuple[Line, ...]:
    """Medication requests that are active or on hold."""
    shown = [f for f in medications if f.status in ACTIVE_MEDICATION]
    lines = _merged(
        shown,
        lambda f: (
            f"{f.display}"
            + (" (on hold)" if f.status == "on-hold" else "")
            + (f" (ordered {f.date})" if f.date else "")
        ),
    )
    return lines or (Line("No active medications recorded"),)


def allergy_lines(allergies: list[Fact]) -> tuple[Line, ...]:
    """Active allergies (or ones whose status is missing, marked); never an invented "NKA".

    A record that names no allergen ("Allergy to substance") is shown as such, not as an allergen.
    """
    shown = [f for f in allergies if f.status in ("active", None)]
    named = [f for f in shown if not is_non_allergen(f.code, f.display)]
    unnamed = [f for f in shown if is_non_allergen(f.code, f.display)]
    lines = _merged(
        named,
        lambda f: (
            f"{f.display}"
            + (f": {f.value}" if f.value else "")
            + (" (clinical status not recorded)" if f.status is None else "")
        ),
    )
    lines += _merged(unnamed, lambda f: f"Allergy recorded without a named allergen: {f.display}")
    if lines:
        return lines
    if allergies:
        inactive = tuple(f.key for f in allergies)
        return (Line(f"No active allergies recorded ({len(inactive)} inactive or resolved)", inactive),)
    return (Line("No allergies recorded"),)


def encounter_lines(ctx: ClinicalContext, max_encounters: int) -> tuple[Line, ...]:
    """The latest encounters (facts are newest first); the focus encounter is always shown."""
    encounters = ctx.of_kind("encounter")
    focus = ctx.encounter.reference if ctx.encounter else None
    shown = encounters[:max_encounters]
    focus_fact = next((f for f in encounters if f.source.reference == focus), None)
    if focus_fact is not None and focus_fact not in shown:
        shown = [*shown, focus_fact]
    lines = tuple(
        Line(
            f"{f.date or 'date not recorded'}: {f.display}"
            + (f", reason: {f.value}" if f.value else "")
            + (" (this encounter)" if f is focus_fact else ""),
            (f.key,),
        )
        for f in shown
    )
    return lines or (Line("No encounters recorded"),)


def _flag(ctx: ClinicalContext, fact: Fact, table: RangeTable) -> Flag | None:
    resource = resource_of(ctx, fact)
    return flag_observation(resource, table, age_years=age_years_at(ctx, fact.date), sex=patient_sex(ctx))


def _value_text(f: Fact) -> str:
    return f"{f.display}: {f.value} ({f.date or 'date not recorded'})"


def flagged_lines(
    ctx: ClinicalContext, observations: list[Fact], flags: dict[str, Flag | None], table: RangeTable
) -> tuple[Line, ...]:
    """Latest vitals and labs outside their range, vitals first, key labs next; each names the
    source of its range. For a child, says the adult table does not apply."""
    lines = []
    for f in _ordered(observations):
        flag = flags[f.key]
        if flag is not None and flag.abnormal:
            lines.append(Line(f"{_value_text(f)} \u2014 {flag.text()}", (f.key,)))
    flagged = bool(lines)
    # A child's result that its own interpretation or reference range covers was checked: only
    # the others went unflagged for want of a range that applies to children.
    ages = [age_years_at(ctx, f.date) for f in observations if flags[f.key] is None]
    young = [age for age in ages if age is not None and age < table.min_age_years]
    patient = next(iter(ctx.of_kind("patient")), None)
    now = age_years_at(ctx, patient.date if patient else None)
    if young and now is not None and now < table.min_age_years:
        lines.append(Line(ADULT_RANGES_ONLY))
    elif young:
        n = len(young)
        noun = "result" if n == 1 else "results"
        lines.append(Line(f"{n} {noun} taken before age 18 not flagged: {ADULT_RANGES}"))
    if not flagged and observations and not young:
        lines.insert(0, Line("No latest result outside its reference range"))
    return tuple(lines) or (Line("No labs or vital signs recorded"),)


def trend_lines(ctx: ClinicalContext, observations: list[Fact]) -> tuple[Line, ...]:
    """The last values of key vitals and labs with their dates and a direction. Earlier values
    are read from the raw Observations; the line cites the latest value's fact."""
    rank = {code: i for i, code in enumerate(TREND_CODES)}
    keyed = [f for f in observations if _loinc(f.code) in rank]
    keyed.sort(key=lambda f: rank[_loinc(f.code)])
    lines = []
    for f in keyed:
        points = history(ctx, f)
        if len(points) < 2:
            continue
        values = " -> ".join(f"{p.value} ({p.day})" for p in points)
        lines.append(Line(f"{f.display}: {values}, {direction(points)}", (f.key,)))
    return tuple(lines) or (Line("No repeated key vitals or labs to show a trend"),)


def lab_and_vital_lines(
    ctx: ClinicalContext, observations: list[Fact], flags: dict[str, Flag | None], max_labs: int
) -> tuple[Line, ...]:
    """The latest vitals not flagged, then up to `max_labs` lab lines: a panel on one line citing
    every component, then single results (key tests first). Flagged values are listed above."""
    vitals = [f for f in observations if f.category == "vital-signs" and not _abnormal(flags[f.key])]
    labs = _ordered([f for f in observations if f.category == "laboratory"])
    grouped, singles = panels(ctx, labs)
    lines = [Line(_value_text(f), (f.key,)) for f in vitals]
    lab_lines = [_panel_line(p.name, p.day, p.facts, flags) for p in grouped]
    lab_lines += [Line(_value_text(f), (f.key,)) for f in singles if not _abnormal(flags[f.key])]
    lines += lab_lines[:max_labs]
    return tuple(lines) or (Line("No labs or vital signs recorded"),)


def _panel_line(name: str, day: str | None, facts: tuple[Fact, ...], flags: dict[str, Flag | None]) -> Line:
    within = sum(1 for f in facts if (flag := flags[f.key]) is not None and not flag.abnormal)
    flagged = sum(1 for f in facts if _abnormal(flags[f.key]))
    unranged = len(facts) - within - flagged
    counts = []
    if within:
        counts.append(f"{within} result{'s' if within != 1 else ''} within range")
    if unranged:
        counts.append(f"{unranged} without a reference range")
    if flagged:
        counts.append(f"{flagged} flagged (listed above)")
    return Line(f"{name} {day or 'date not recorded'}: {', '.join(counts)}", tuple(f.key for f in facts))


def _abnormal(flag: Flag | None) -> bool:
    return flag is not None and flag.abnormal


def _ordered(observations: list[Fact]) -> list[Fact]:
    """Vitals first, then labs with key tests first; facts come newest first, a stable sort keeps it."""
    return sorted(
        observations,
        key=lambda f: (f.category != "vital-signs", _KEY_LAB_RANK.get(_loinc(f.code), len(KEY_LAB_CODES))),
    )


def _merged(facts: list[Fact], render: Callable[[Fact], str]) -> tuple[Line, ...]:
    """One line per name, rendered from its newest fact and citing every fact of that name.

    The same problem or drug recorded twice (an active and a relapsed episode, two orders) is
    one line for the reader; each record stays citable.
    """
    groups: dict[str, list[Fact]] = {}
    for fact in facts:
        groups.setdefault((fact.display or fact.text).casefold(), []).append(fact)
    return tuple(Line(render(group[0]), tuple(f.key for f in group)) for group in groups.values())


def _loinc(code: str | None) -> str:
    if not code or "|" not in code:
        return ""
    system, _, value = code.partition("|")
    return value if system == "http://loinc.org" else ""


__all__ = [
    "ACTIVE_CONDITION",
    "ACTIVE_MEDICATION",
    "CONFLICTS_AFTER",
    "CONFLICTS_TITLE",
    "KEY_LAB_CODES",
    "TITLES",
    "TREND_CODES",
    "Line",
    "Section",
    "StructuredSummary",
    "build_structured",
]
