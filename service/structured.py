"""The part of a summary that never depends on the model: coded sections, each line cited.

`build_structured` reads only the facts of a `ClinicalContext` and writes lines whose words,
numbers and dates all come from the facts they cite, so this part is true to the record even
when every model statement is dropped. Sections: active problems, active medications,
allergies, recent encounters, latest key labs and vitals; above them, when the notes disagree
with the coded data, the conflicts (`service.conflicts`), each citing both sides.

What it must not do: call a model, do IO, or state anything the record does not hold. An empty
section says what is missing ("No allergies recorded"); it never invents a negative finding
such as "no known allergies".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fhir_adapters.models import ClinicalContext, Fact
from service.conflicts import Conflict, find_conflicts

ACTIVE_CONDITION = frozenset({"active", "recurrence", "relapse"})
ACTIVE_MEDICATION = frozenset({"active", "on-hold"})

# LOINC codes a clinician looks at first; shown before other labs, in this order.
KEY_LAB_CODES: tuple[str, ...] = (
    "4548-4",  # Hemoglobin A1c
    "2339-0",  # Glucose [Mass/volume] in Blood
    "2345-7",  # Glucose [Mass/volume] in Serum or Plasma
    "2160-0",  # Creatinine [Mass/volume] in Serum or Plasma
    "38483-4",  # Creatinine [Mass/volume] in Blood
    "33914-3",  # eGFR (MDRD)
    "62238-1",  # eGFR (CKD-EPI)
    "98979-8",  # eGFR (CKD-EPI 2021)
    "2823-3",  # Potassium
    "6298-4",  # Potassium [Moles/volume] in Blood
    "2951-2",  # Sodium
    "2947-0",  # Sodium [Moles/volume] in Blood
    "6299-2",  # Urea nitrogen [Mass/volume] in Blood
    "3094-0",  # Urea nitrogen [Mass/volume] in Serum or Plasma
    "718-7",  # Hemoglobin
    "6690-2",  # Leukocytes
    "777-3",  # Platelets
    "18262-6",  # LDL cholesterol (direct)
    "13457-7",  # LDL cholesterol (calculated)
    "2093-3",  # Total cholesterol
    "2085-9",  # HDL cholesterol
    "2571-8",  # Triglycerides
    "6301-6",  # INR
    "1742-6",  # ALT
    "1920-8",  # AST
    "14959-1",  # Microalbumin/creatinine ratio
)
_KEY_LAB_RANK = {code: rank for rank, code in enumerate(KEY_LAB_CODES)}

TITLES = (
    "Active problems",
    "Active medications",
    "Allergies",
    "Recent encounters",
    "Latest key labs and vitals",
)
CONFLICTS_TITLE = "Conflicts in the record"


@dataclass(frozen=True)
class Line:
    text: str
    citations: tuple[str, ...] = ()

    def to_markdown(self) -> str:
        """`- text [C1, C2]` (no brackets when the line cites nothing).

        >>> Line("Hypertension (since 2011-01-01)", ("C3",)).to_markdown()
        '- Hypertension (since 2011-01-01) [C3]'
        """
        cited = f" [{', '.join(self.citations)}]" if self.citations else ""
        return f"- {self.text}{cited}"


@dataclass(frozen=True)
class Section:
    title: str
    lines: tuple[Line, ...]


@dataclass(frozen=True)
class StructuredSummary:
    sections: tuple[Section, ...]
    conflicts: tuple[Conflict, ...] = ()

    def to_markdown(self) -> str:
        """The conflicts first (when there are any), then each section as a `##` heading and a
        bullet list; each line ends with its citations, a conflict cites each side where it is stated."""
        blocks = []
        if self.conflicts:
            bullets = "\n".join(f"- Conflict: {c.text}" for c in self.conflicts)
            blocks.append(f"## {CONFLICTS_TITLE}\n\n{bullets}")
        for section in self.sections:
            bullets = "\n".join(line.to_markdown() for line in section.lines)
            blocks.append(f"## {section.title}\n\n{bullets}")
        return "\n\n".join(blocks) + "\n"

    def to_json(self) -> dict[str, Any]:
        return {
            "sections": [
                {
                    "title": section.title,
                    "lines": [
                        {"text": line.text, "citations": list(line.citations)} for line in section.lines
                    ],
                }
                for section in self.sections
            ],
            "conflicts": [conflict.to_json() for conflict in self.conflicts],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StructuredSummary:
        """The inverse of `to_json` (for summaries read back from storage)."""
        return cls(
            tuple(
                Section(
                    str(section["title"]),
                    tuple(Line(str(line["text"]), tuple(line["citations"])) for line in section["lines"]),
                )
                for section in data["sections"]
            ),
            tuple(Conflict.from_json(c) for c in data.get("conflicts") or []),
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


def build_structured(
    ctx: ClinicalContext, *, max_encounters: int = 5, max_labs: int = 12
) -> StructuredSummary:
    """The five coded sections of a summary and the notes' conflicts with them, from the facts alone. Pure."""
    if max_encounters < 0 or max_labs < 0:
        raise ValueError(
            f"max_encounters and max_labs must not be negative, got {max_encounters}, {max_labs}"
        )
    return StructuredSummary(
        (
            Section(TITLES[0], problem_lines(ctx.of_kind("condition"))),
            Section(TITLES[1], medication_lines(ctx.of_kind("medication"))),
            Section(TITLES[2], allergy_lines(ctx.of_kind("allergy"))),
            Section(TITLES[3], encounter_lines(ctx, max_encounters)),
            Section(TITLES[4], lab_and_vital_lines(ctx.of_kind("observation"), max_labs)),
        ),
        find_conflicts(ctx),
    )


def problem_lines(conditions: list[Fact]) -> tuple[Line, ...]:
    """Conditions that are active, recurring or relapsed; one line per name.

    A condition without a clinical status is listed too, marked, rather than silently dropped.
    """
    shown = [f for f in conditions if f.status in ACTIVE_CONDITION or f.status is None]
    lines = _merged(
        shown,
        lambda f: (
            f"{f.display}"
            + (f" ({f.status})" if f.status in ("recurrence", "relapse") else "")
            + (" (clinical status not recorded)" if f.status is None else "")
            + (f" (since {f.date})" if f.date else "")
        ),
    )
    return lines or (Line("No active problems recorded"),)


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
    """Active allergies (or ones whose status is missing, marked); never an invented "NKA"."""
    shown = [f for f in allergies if f.status in ("active", None)]
    lines = _merged(
        shown,
        lambda f: (
            f"{f.display}"
            + (f": {f.value}" if f.value else "")
            + (" (clinical status not recorded)" if f.status is None else "")
        ),
    )
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


def lab_and_vital_lines(observations: list[Fact], max_labs: int) -> tuple[Line, ...]:
    """Latest vital signs, then up to `max_labs` laboratory results (key tests first), with dates."""
    vitals = [f for f in observations if f.category == "vital-signs"]
    labs = [f for f in observations if f.category == "laboratory"]
    # Facts come newest first; a stable sort by rank keeps that order among equals.
    labs.sort(key=lambda f: _KEY_LAB_RANK.get(_loinc(f.code), len(KEY_LAB_CODES)))
    shown = [*vitals, *labs[:max_labs]]
    lines = tuple(Line(f"{f.display}: {f.value} ({f.date or 'date not recorded'})", (f.key,)) for f in shown)
    return lines or (Line("No labs or vital signs recorded"),)


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
    "CONFLICTS_TITLE",
    "KEY_LAB_CODES",
    "TITLES",
    "Line",
    "Section",
    "StructuredSummary",
    "build_structured",
]
