"""The narrative of a prompt that reads the notes (`reads: notes`): what only the notes say.

The coded part already states every problem, medication, allergy and result without a model, so
the model is never asked to restate them. It is asked, one note at a time, what that note says:
why the patient came, what was found, what was done or planned. A small model follows a short
prompt about one note far better than a long one about the whole record, and the number of notes
read is bounded by time (`NarrativeSettings.max_notes`, `seconds_budget`), not by one window.

    notes, newest first ──► note_views(): lines already shown in a newer note removed
          │                 (Synthea and many EHRs repeat whole sections from visit to visit)
          ▼
    plan_notes(): the newest notes with something new, up to max_notes, each as one short
          │       request; every other note is counted with its reason (UnreadNote)
          ▼
    run_calls(): the map step, one call per note, until the time budget is spent
          │
          ▼
    statements_of(): the reduce step - each note's statements, citing that note, repeats across
                     notes merged (the newest kept); then grounding checks each against its note,
                     and `quotations()` gives a read note's key lines verbatim where the model
                     offered nothing verifiable for it

Pure apart from `run_calls`, which drives the engine. Never logs note or statement text.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace

from fhir_adapters.models import ClinicalContext, Fact
from service.config import LlmSettings, NarrativeSettings
from service.grounding import Claim, DroppedClaim, parse_claims
from service.llm.base import Engine, Generation, GenerationRequest
from service.prompts import (
    MIN_FACT_BUDGET,
    PromptError,
    PromptTemplate,
    defuse,
    message_overhead,
    note_block,
    render,
    request_of,
    shorten_note,
)

# Lines this long (in words) are templated prose: a repeat that differs only in its numbers (an
# age, a count) is still a repeat. Shorter lines are compared exactly (a changed value matters).
_PROSE_WORDS = 8
_DIGITS = re.compile(r"\d+")
_HEADER = re.compile(r"^\s*#{1,6}\s*(?P<title>.+?)\s*#*\s*$")
_LABEL = re.compile(r"^\s*(?P<label>[A-Za-z][A-Za-z /&-]{1,40}):\s*(?P<rest>.*)$")
_ITEM = re.compile(r"^\s*(?:[-*\u2022]|\d{1,2}[.)])\s+(?P<text>.+)$")
_NAME_PLACEHOLDER = "[name]"
_NOTHING = frozenset({"no complaints", "none", "n/a", "na", "no known allergies", "nkda", "not applicable"})

# The sections whose lines a quotation may take, by the words their titles hold.
_COMPLAINT = ("chief complaint", "reason for visit", "cc", "presenting complaint")
_ASSESSMENT = ("assessment", "impression", "a/p", "diagnosis")
_PLAN = ("plan", "recommendation", "disposition", "follow up", "follow-up")
QUOTE_MAX_WORDS = 40


# --- what each note adds ------------------------------------------------------------------------


@dataclass(frozen=True)
class NoteView:
    """A note as the model would be shown it: its lines that no newer note already showed."""

    fact: Fact
    body: str
    lines: int  # non-blank lines of the note
    repeated: int  # of those, lines already shown in a newer note

    @property
    def adds_text(self) -> bool:
        return bool(self.body.strip())


def _line_keys(line: str) -> tuple[str, ...]:
    words = " ".join(line.lower().split()).strip(" .;:,")
    if not words:
        return ()
    keys = [words]
    if len(words.split()) >= _PROSE_WORDS:
        keys.append(_DIGITS.sub("#", words))
    return tuple(keys)


def note_views(facts: Sequence[Fact]) -> list[NoteView]:
    """The notes among `facts`, newest first, each without the lines a newer note already showed.

    Section headings stay only above lines that stay.

    >>> from fhir_adapters.models import SourceRef
    >>> def note(key, day, text):
    ...     return Fact(key, "note", text, SourceRef("DocumentReference", key, "1"), date=day)
    >>> old = note("N1", "2020-01-01", "# Social\\nNever smoked.\\n# Plan\\nStart metformin.")
    >>> new = note("N2", "2021-01-01", "# Social\\nNever smoked.\\n# Plan\\nRecheck HbA1c.")
    >>> for view in note_views([old, new]):
    ...     print(view.fact.key, view.body.splitlines())
    N2 ['# Social', 'Never smoked.', '# Plan', 'Recheck HbA1c.']
    N1 ['# Plan', 'Start metformin.']
    """
    notes = sorted((f for f in facts if f.kind == "note"), key=lambda f: (f.date or "", f.key), reverse=True)
    shown: set[str] = set()
    views: list[NoteView] = []
    for fact in notes:
        kept: list[str] = []
        pending_header: str | None = None
        total = repeated = 0
        for raw in fact.text.splitlines():
            line = raw.rstrip()
            if not line.strip():
                continue
            if _HEADER.match(line):
                pending_header = line.strip()
                continue
            total += 1
            keys = _line_keys(line)
            if any(k in shown for k in keys):
                repeated += 1
                continue
            shown.update(keys)
            if pending_header is not None:
                kept.append(pending_header)
                pending_header = None
            kept.append(line)
        views.append(NoteView(fact, "\n".join(kept), total, repeated))
    return views


# --- the plan -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnreadNote:
    """A note the model did not read, and why; named in the document and the structured JSON."""

    key: str
    reference: str
    date: str | None
    title: str
    reason: str  # "repeats newer notes" | "over the note limit" | "time budget" | "no room"

    def to_json(self) -> dict[str, str | None]:
        return {"key": self.key, "reference": self.reference, "date": self.date, "title": self.title,
                "reason": self.reason}  # fmt: skip


@dataclass(frozen=True)
class NoteCall:
    """One model call: a note (its key) or, for a record-wide prompt, the record (`key` None)."""

    key: str | None
    request: GenerationRequest
    truncated: bool = False


@dataclass(frozen=True)
class NotePlan:
    calls: tuple[NoteCall, ...]
    views: dict[str, NoteView]  # the notes given a call, by key (for quotations)
    unread: tuple[UnreadNote, ...]
    notes: int  # notes in the record
    repeated_lines: int  # lines left out of the notes read because a newer note showed them
    max_notes: int

    @property
    def read_keys(self) -> tuple[str, ...]:
        return tuple(c.key for c in self.calls if c.key is not None)


REPEATS = "repeats newer notes"
OVER_LIMIT = "over the note limit"
TIME_BUDGET = "time budget"
NO_ROOM = "no room in the context window"


def unread_note(view: NoteView, reason: str) -> UnreadNote:
    fact = view.fact
    return UnreadNote(fact.key, fact.source.reference, fact.date, fact.display or "Clinical note", reason)


def plan_notes(
    tpl: PromptTemplate,
    ctx: ClinicalContext,
    engine: Engine,
    llm: LlmSettings,
    narrative: NarrativeSettings,
) -> NotePlan:
    """One short request per note worth reading: the newest notes that add text, up to `max_notes`.

    Each request holds the patient line and one note (shortened on a word boundary if the note
    alone would overflow the context window); its output may only cite that note.
    """
    max_tokens = llm.max_tokens or tpl.max_tokens
    patient_summary = " ".join(defuse(ctx.patient_summary).split())
    views = note_views(ctx.facts)
    calls: list[NoteCall] = []
    chosen: dict[str, NoteView] = {}
    unread: list[UnreadNote] = []
    repeated = 0
    for view in views:
        if not view.adds_text:
            unread.append(unread_note(view, REPEATS))
            continue
        if len(calls) >= narrative.max_notes:
            unread.append(unread_note(view, OVER_LIMIT))
            continue
        call = _note_call(tpl, view, patient_summary, engine, max_tokens, llm)
        if call is None:
            unread.append(unread_note(view, NO_ROOM))
            continue
        calls.append(call)
        chosen[view.fact.key] = view
        repeated += view.repeated
    return NotePlan(
        calls=tuple(calls),
        views=chosen,
        unread=tuple(unread),
        notes=len(views),
        repeated_lines=repeated,
        max_notes=narrative.max_notes,
    )


def _note_call(
    tpl: PromptTemplate,
    view: NoteView,
    patient_summary: str,
    engine: Engine,
    max_tokens: int,
    llm: LlmSettings,
) -> NoteCall | None:
    key = view.fact.key
    empty = render(tpl, {"patient_summary": patient_summary, "note": ""}, citation_keys=[key])
    budget = engine.n_ctx - max_tokens - message_overhead(empty, engine.count_tokens)
    if budget < MIN_FACT_BUDGET:
        raise PromptError(
            f"context window too small for prompt {tpl.id}/{tpl.version}: n_ctx {engine.n_ctx} leaves "
            f"{budget} tokens for a note after max_tokens {max_tokens}; raise CHARTBRIEF_LLM__N_CTX "
            "or lower CHARTBRIEF_LLM__MAX_TOKENS"
        )
    block = note_block(view.fact, view.body)
    truncated = False
    if engine.count_tokens(block) > budget:
        shortened = shorten_note(view.fact, budget, engine.count_tokens, body=view.body)
        if shortened is None:
            return None
        block, truncated = shortened, True
    rendered = render(tpl, {"patient_summary": patient_summary, "note": block}, citation_keys=[key])
    return NoteCall(key, request_of(rendered, max_tokens, llm), truncated)


@dataclass(frozen=True)
class NotesRead:
    """Which notes reached the model, and why the others did not: named in the document."""

    total: int
    read: tuple[str, ...]
    unread: tuple[UnreadNote, ...]
    max_notes: int

    @classmethod
    def from_json(cls, data: object) -> NotesRead | None:
        """From the structured JSON of a stored draft (None when it has no notes part)."""
        if not isinstance(data, dict):
            return None
        unread = [
            UnreadNote(str(u.get("key", "")), str(u.get("reference", "")), u.get("date"),
                       str(u.get("title", "Clinical note")), str(u.get("reason", "")))
            for u in data.get("unread") or [] if isinstance(u, dict)
        ]  # fmt: skip
        read = tuple(str(k) for k in data.get("read") or [])
        total, limit = data.get("total"), data.get("max_notes")
        return cls(
            total=total if isinstance(total, int) else len(read) + len(unread),
            read=read,
            unread=tuple(unread),
            max_notes=limit if isinstance(limit, int) else 0,
        )

    def to_json(self) -> dict[str, object]:
        return {
            "total": self.total,
            "read": list(self.read),
            "unread": [u.to_json() for u in self.unread],
            "max_notes": self.max_notes,
        }

    def summary_line(self) -> str:
        """One line: how many notes were read, and the unread ones by reason, kind and dates."""
        parts = [f"_Notes read by the model: {len(self.read)} of {self.total}"]
        by_reason: dict[str, list[UnreadNote]] = {}
        for note in self.unread:
            by_reason.setdefault(note.reason, []).append(note)
        described = []
        for reason, group in by_reason.items():
            days = sorted(n.date for n in group if n.date)
            titles = sorted({n.title for n in group})
            span = f" ({days[0]} to {days[-1]})" if len(days) > 1 else (f" ({days[0]})" if days else "")
            why = f"{reason} of {self.max_notes}" if reason == "over the note limit" else reason
            described.append(f"{len(group)} {why}: {', '.join(titles)}{span}")
        if described:
            parts.append(". Not read: " + "; ".join(described))
        return "".join(parts) + "._"


# --- the map step -------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoteOutput:
    key: str | None
    generation: Generation
    constrained: bool = True  # the request had an output schema (JSON expected, not plain lines)


@dataclass(frozen=True)
class Narration:
    """What the model wrote, call by call, and the calls the time budget left out."""

    outputs: tuple[NoteOutput, ...] = ()
    late: tuple[str, ...] = ()  # keys of planned notes not given to the model (time budget)

    @property
    def prompt_tokens(self) -> int:
        return sum(o.generation.prompt_tokens for o in self.outputs)

    @property
    def completion_tokens(self) -> int:
        return sum(o.generation.completion_tokens for o in self.outputs)

    @property
    def seconds(self) -> float:
        return sum(o.generation.seconds for o in self.outputs)

    @property
    def finish_reason(self) -> str | None:
        reasons = [o.generation.finish_reason for o in self.outputs]
        if "length" in reasons:
            return "length"
        return reasons[-1] if reasons else None


async def run_calls(
    engine: Engine, calls: Sequence[NoteCall], *, seconds_budget: float, stream: bool = False
) -> AsyncIterator[str | Narration]:
    """Run the calls in order; yields pieces of output when `stream`, and last the `Narration`.

    The first call always runs; no further call starts once `seconds_budget` is spent.
    """
    started = time.perf_counter()
    outputs: list[NoteOutput] = []
    late: list[str] = []
    for number, call in enumerate(calls):
        if outputs and time.perf_counter() - started >= seconds_budget:
            late = [c.key for c in calls[number:] if c.key is not None]
            break
        if not stream:
            generated = await engine.generate(call.request)
            outputs.append(NoteOutput(call.key, generated, call.request.json_schema is not None))
            continue
        if outputs:
            yield "\n"
        began = time.perf_counter()
        pieces: list[str] = []
        async for piece in engine.stream(call.request):
            pieces.append(piece)
            yield piece
        text = "".join(pieces)
        generation = Generation(
            text=text,
            # A stream reports no token counts; the engine's own counter gives comparable figures.
            prompt_tokens=sum(engine.count_tokens(m["content"]) for m in call.request.messages),
            completion_tokens=engine.count_tokens(text) if text else 0,
            seconds=time.perf_counter() - began,
            finish_reason=None,
        )
        outputs.append(NoteOutput(call.key, generation, call.request.json_schema is not None))
    yield Narration(tuple(outputs), tuple(late))


async def narrate(engine: Engine, calls: Sequence[NoteCall], *, seconds_budget: float) -> Narration:
    """`run_calls` without streaming: the narration."""
    result = Narration()
    async for item in run_calls(engine, calls, seconds_budget=seconds_budget):
        if isinstance(item, Narration):
            result = item
    return result


# --- the reduce step ----------------------------------------------------------------------------


_SENTENCE_END = re.compile(r"(?<=[a-z0-9)\]%])[.!?]\s+(?=[A-Z])")


def sentences(text: str) -> list[str]:
    """A statement split into its sentences (abbreviations such as "mg." or "Dr." aside).

    >>> sentences("Presenting with sinusitis. Given amoxicillin 500 mg. Follow up in 2 weeks.")
    ['Presenting with sinusitis.', 'Given amoxicillin 500 mg.', 'Follow up in 2 weeks.']
    >>> sentences("Seen by Dr. Lee for cough.")
    ['Seen by Dr. Lee for cough.']
    """
    parts: list[str] = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        before = text[start : match.start()].split()
        if before and before[-1].lower().rstrip(".") in _ABBREVIATIONS:
            continue
        parts.append(text[start : match.start() + 1].strip())
        start = match.end()
    parts.append(text[start:].strip())
    return [p for p in parts if p]


_ECHO = re.compile(r"^\s*(?:\|\s*)+(?:#|$)|^\s*#{1,6}\s")
_ABBREVIATIONS = frozenset({"dr", "mr", "mrs", "ms", "st", "vs", "approx", "no", "e.g", "i.e", "etc"})


def _same(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def statements_of(narration: Narration) -> tuple[list[Claim], list[DroppedClaim]]:
    """Every call's statements as claims; a note's statements cite that note (its call could cite
    nothing else), and a statement repeated by an older note is kept once, for the newest."""
    claims: list[Claim] = []
    dropped: list[DroppedClaim] = []
    seen: set[str] = set()
    for output in narration.outputs:
        lines = not output.constrained
        found, unreadable = parse_claims(output.generation.text, cite=output.key, lines=lines)
        dropped.extend(unreadable)
        if output.key is not None:
            # One claim per sentence: each is checked on its own, so an invented sentence does not
            # take a true one down with it.
            found = [replace(claim, text=part) for claim in found for part in sentences(claim.text)]
        for claim in found:
            if output.key is not None and _ECHO.match(claim.text):
                # A line of the prompt's quoted note, echoed with its markup: not a statement.
                dropped.append(DroppedClaim(claim, "echoes a line of the note as shown to the model"))
                continue
            same = _same(claim.text)
            if output.key is not None and same in seen:
                continue
            seen.add(same)
            claims.append(claim)
    return claims, dropped


# --- quotations ---------------------------------------------------------------------------------


@dataclass
class _Section:
    title: str
    lines: list[str] = field(default_factory=list)


def _sections(body: str) -> list[_Section]:
    sections = [_Section("")]
    for raw in body.splitlines():
        line = raw.strip()
        if not line:
            continue
        header = _HEADER.match(line)
        if header:
            sections.append(_Section(header.group("title").lower()))
            continue
        label = _LABEL.match(line)
        title = label.group("label").lower() if label else ""
        short_label = len(title.split()) <= 3 and bool(label and label.group("rest").strip())
        if label and (_kind_of(title) is not None or short_label):
            sections.append(_Section(label.group("label").lower()))
            if label.group("rest").strip():
                sections[-1].lines.append(label.group("rest").strip())
            continue
        sections[-1].lines.append(line)
    return sections


def _kind_of(title: str) -> str | None:
    for kind, words in (("complaint", _COMPLAINT), ("assessment", _ASSESSMENT), ("plan", _PLAN)):
        if any(title == w or title.startswith(w + " ") or f" {w}" in f" {title}" for w in words):
            return kind
    return None


def _joined(lines: Sequence[str]) -> list[str]:
    """Lines of a section as quotable sentences: a line ending in ':' takes the items below it."""
    out: list[str] = []
    lead: str | None = None
    items: list[str] = []

    def flush() -> None:
        nonlocal lead, items
        if lead is not None and items:
            out.append(f"{lead} {'; '.join(items)}.")
        elif lead is not None:
            out.append(lead)
        elif items:
            out.append("; ".join(items))
        lead, items = None, []

    for line in lines:
        item = _ITEM.match(line)
        if item:
            items.append(item.group("text").strip().rstrip("."))
            continue
        flush()
        if line.endswith(":"):
            lead = line
        else:
            out.append(line)
    flush()
    return out


def quotations(view: NoteView, *, limit: int = 3) -> list[Claim]:
    """A note's key lines, verbatim: its chief complaint, assessment and plan, citing the note.

    Lines that say nothing ("No complaints.") or carry the name placeholder are left out, and so
    is a line longer than `QUOTE_MAX_WORDS` words (a quotation is never cut).

    >>> from fhir_adapters.models import SourceRef
    >>> text = "# Chief Complaint\\nNo complaints.\\n# Assessment and Plan\\nPresenting with sinusitis.\\n" \\
    ...        "## Plan\\nThe following procedures were conducted:\\n- throat culture (procedure)"
    >>> fact = Fact("N1", "note", text, SourceRef("DocumentReference", "d", "1"))
    >>> for quote in quotations(NoteView(fact, text, 5, 0)):
    ...     print(quote.text)
    Presenting with sinusitis.
    The following procedures were conducted: throat culture (procedure).
    """
    quotes: list[Claim] = []
    for section in _sections(view.body):
        if _kind_of(section.title) is None:
            continue
        for sentence in _joined(section.lines):
            plain = sentence.strip()
            if (
                not plain
                or _same(plain) in _NOTHING
                or _NAME_PLACEHOLDER in plain
                or len(plain.split()) > QUOTE_MAX_WORDS
                or len(plain.split()) < 2
            ):
                continue
            quotes.append(Claim(plain, (view.fact.key,), origin="quote"))
            if len(quotes) >= limit:
                return quotes
    return quotes


__all__ = [
    "Narration",
    "NoteCall",
    "NoteOutput",
    "NotePlan",
    "NoteView",
    "NotesRead",
    "UnreadNote",
    "unread_note",
    "narrate",
    "note_views",
    "plan_notes",
    "quotations",
    "run_calls",
    "statements_of",
]
