"""`chartbrief monitor`: how clinicians judge the drafts, per model file and prompt version, week by week.

Pure aggregation over plain records (`service.governance.records` reads them): no IO, no clock.

Each written summary (a row of `summaries` with a DocumentReference) ends up in exactly one state:

- `approved`: approved as the AI wrote it;
- `edited`: a clinician changed the text, then approved it;
- `rejected`: marked entered-in-error;
- `superseded`: replaced by a newer draft before anyone reviewed it;
- `pending`: never reviewed.

Rates (approval, edit, rejection) are shares of the reviewed ones (approved + edited + rejected), so
they add up to 1; pending and superseded drafts are counted beside them. Time to review runs from the
draft's creation to the first approval or rejection. Edit size is what difflib finds changed between the
AI draft and the clinician's text, in words and in characters (only the sizes are ever stored).
A draft's creation is its summary row's `created_at`; for a review of a draft this database did not
write, the DocumentReference's date kept with the review.
Weeks are ISO weeks of the draft's creation (`2026-W49`), so a week's row follows that week's drafts.

What it must not do: read or return any clinical text other than the clinicians' own rejection reasons
(shown to monitoring staff, grouped; never logged).
"""

from __future__ import annotations

import difflib
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from service.db.audit import RejectionRecord
from service.governance.records import ReviewOutcomeRecord, SummaryRecord

State = Literal["approved", "edited", "rejected", "superseded", "pending"]
STATES: tuple[State, ...] = ("approved", "edited", "rejected", "superseded", "pending")
UNKNOWN = "unknown"
# How many distinct rejection reasons a group lists (the rest are counted, not shown).
MAX_REASONS = 10
_WORD = re.compile(r"\S+")


# -- edit size ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EditSize:
    words_changed: int
    chars_changed: int
    draft_words: int


def edit_size(draft: str, edited: str) -> EditSize:
    """How much a clinician changed: words (and their characters) replaced, removed or added.

    A replaced run counts as the longer of its two sides, so changing one word is 1, not 2.
    Diffing words (not characters) keeps it fast on long texts and close to what a reader sees.

    >>> edit_size("Allergy to penicillin.", "Allergy to penicillin.")
    EditSize(words_changed=0, chars_changed=0, draft_words=3)
    >>> edit_size("Allergy to penicillin.", "Allergy to amoxicillin.")
    EditSize(words_changed=1, chars_changed=12, draft_words=3)
    >>> edit_size("a b c", "a c d e")
    EditSize(words_changed=3, chars_changed=3, draft_words=3)
    """
    before, after = _WORD.findall(draft), _WORD.findall(edited)
    matcher = difflib.SequenceMatcher(a=before, b=after, autojunk=False)
    words = chars = 0
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        words += max(i2 - i1, j2 - j1)
        chars += max(sum(map(len, before[i1:i2])), sum(map(len, after[j1:j2])))
    return EditSize(words_changed=words, chars_changed=chars, draft_words=len(before))


# -- figures -----------------------------------------------------------------------------------------


def iso_week(when: datetime) -> str:
    """`2026-W49` (ISO 8601 week, the year the week belongs to).

    >>> iso_week(datetime(2027, 1, 1))
    '2026-W53'
    """
    year, week, _day = when.isocalendar()
    return f"{year}-W{week:02d}"


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def _percentile(values: Sequence[float], share: float) -> float:
    """Nearest-rank percentile of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(share * len(ordered) + 0.5)))
    return ordered[rank - 1]


def _spread(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"n": 0, "median": None, "mean": None, "p90": None, "max": None}
    return {
        "n": len(values),
        "median": round(float(statistics.median(values)), 2),
        "mean": round(float(statistics.fmean(values)), 2),
        "p90": round(float(_percentile(values, 0.9)), 2),
        "max": round(float(max(values)), 2),
    }


def _reason_key(reason: str) -> str:
    return " ".join(reason.split()).casefold()


@dataclass
class _Bucket:
    """The figures of one group of drafts, filled draft by draft."""

    states: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATES, 0))
    words_changed: list[float] = field(default_factory=list)
    chars_changed: list[float] = field(default_factory=list)
    share_changed: list[float] = field(default_factory=list)
    review_seconds: list[float] = field(default_factory=list)
    reasons: dict[str, list[str]] = field(default_factory=dict)  # grouping key -> texts as written
    rejected_without_reason: int = 0

    def add(self, draft: _Draft) -> None:
        self.states[draft.state] += 1
        if draft.state == "edited" and draft.words_changed is not None:
            self.words_changed.append(draft.words_changed)
            self.chars_changed.append(draft.chars_changed or 0)
            if draft.draft_words:
                self.share_changed.append(min(1.0, draft.words_changed / draft.draft_words))
        if draft.review_seconds is not None:
            self.review_seconds.append(draft.review_seconds)
        if draft.state == "rejected":
            given = [r for r in draft.reasons if r.strip()]
            if not given:
                self.rejected_without_reason += 1
            for reason in given:
                self.reasons.setdefault(_reason_key(reason), []).append(" ".join(reason.split()))

    def to_json(self) -> dict[str, Any]:
        reviewed = self.states["approved"] + self.states["edited"] + self.states["rejected"]
        ranked = sorted(self.reasons.values(), key=lambda texts: (-len(texts), texts[0].casefold()))
        return {
            "summaries": sum(self.states.values()),
            "reviewed": reviewed,
            **self.states,
            "approval_rate": _rate(self.states["approved"], reviewed),
            "edit_rate": _rate(self.states["edited"], reviewed),
            "rejection_rate": _rate(self.states["rejected"], reviewed),
            "edit_words_changed": _spread(self.words_changed),
            "edit_chars_changed": _spread(self.chars_changed),
            "edit_share_of_words_changed": _spread(self.share_changed),
            "time_to_review_seconds": _spread(self.review_seconds),
            "rejection_reasons": [
                {"reason": texts[0], "count": len(texts)} for texts in ranked[:MAX_REASONS]
            ],
            "rejection_reasons_not_shown": sum(len(t) for t in ranked[MAX_REASONS:]),
            "rejections_without_reason": self.rejected_without_reason,
        }


@dataclass(frozen=True)
class _Draft:
    """One draft as monitoring sees it: its group, week and review state."""

    model_sha256: str
    model_name: str
    prompt: str  # "summary/v1"
    week: str
    state: State
    review_seconds: float | None = None
    words_changed: int | None = None
    chars_changed: int | None = None
    draft_words: int | None = None
    reasons: tuple[str, ...] = ()


def _review_of(
    actions: Sequence[ReviewOutcomeRecord],
) -> tuple[State | None, datetime | None, ReviewOutcomeRecord | None]:
    """The draft's state from its actions (oldest first), when it was decided, and its edit (if any)."""
    rejected = next((a for a in actions if a.action == "reject"), None)
    approved = next((a for a in actions if a.action == "approve"), None)
    edits = [a for a in actions if a.action == "edit" and a.words_changed is not None]
    last_edit = edits[-1] if edits else None
    if rejected is not None and (approved is None or rejected.at <= approved.at):
        return "rejected", rejected.at, None
    if approved is not None:
        return ("edited" if edits else "approved"), approved.at, last_edit
    return None, None, None


def _drafts(
    summary_rows: Iterable[SummaryRecord],
    outcomes: Iterable[ReviewOutcomeRecord],
    rejections: Iterable[RejectionRecord],
    since: datetime | None,
) -> list[_Draft]:
    by_summary: dict[str, list[ReviewOutcomeRecord]] = defaultdict(list)
    by_document: dict[str, list[ReviewOutcomeRecord]] = defaultdict(list)
    for outcome in sorted(outcomes, key=lambda o: (o.at, o.id)):
        if outcome.summary_id:
            by_summary[outcome.summary_id].append(outcome)
        else:
            by_document[outcome.document_reference].append(outcome)
    reasons: dict[str, list[str]] = defaultdict(list)
    for rejection in rejections:
        reasons[rejection.document_reference].append(rejection.reason or "")
    written = [s for s in summary_rows if s.document_reference]
    superseded = {s.superseded for s in written if s.superseded}
    known_documents = {s.document_reference for s in written}

    drafts: list[_Draft] = []
    for row in written:
        doc = row.document_reference or ""
        actions = by_summary.get(row.id, []) + by_document.get(doc, [])
        actions.sort(key=lambda o: (o.at, o.id))
        created = row.created_at
        if since is not None and created < since:
            continue
        drafts.append(
            _draft(
                model_sha256=row.model_sha256,
                model_name=row.model_name,
                prompt=f"{row.prompt_id}/{row.prompt_version}",
                created=created,
                actions=actions,
                reasons=reasons.get(doc, []),
                superseded=doc in superseded,
            )
        )
    # Reviews of drafts this database did not write (another instance's): counted, model unknown.
    for doc, actions in by_document.items():
        if doc in known_documents:
            continue
        created = next((a.draft_created_at for a in actions if a.draft_created_at), None) or actions[0].at
        if since is not None and created < since:
            continue
        drafts.append(
            _draft(
                model_sha256=UNKNOWN,
                model_name=UNKNOWN,
                prompt=UNKNOWN,
                created=created,
                actions=actions,
                reasons=reasons.get(doc, []),
                superseded=False,
            )
        )
    return drafts


def _draft(
    *,
    model_sha256: str,
    model_name: str,
    prompt: str,
    created: datetime,
    actions: Sequence[ReviewOutcomeRecord],
    reasons: Sequence[str],
    superseded: bool,
) -> _Draft:
    state, decided, edit = _review_of(actions)
    if state is None:
        state = "superseded" if superseded else "pending"
    return _Draft(
        model_sha256=model_sha256,
        model_name=model_name,
        prompt=prompt,
        week=iso_week(created),
        state=state,
        review_seconds=max(0.0, (decided - created).total_seconds()) if decided else None,
        words_changed=edit.words_changed if edit else None,
        chars_changed=edit.chars_changed if edit else None,
        draft_words=edit.draft_words if edit else None,
        reasons=tuple(reasons) if state == "rejected" else (),
    )


def monitor_report(
    summary_rows: Iterable[SummaryRecord],
    outcomes: Iterable[ReviewOutcomeRecord],
    rejections: Iterable[RejectionRecord],
    *,
    since: datetime | None = None,
) -> dict[str, Any]:
    """The whole report: `overall`, `by_model_prompt`, `by_week` (each group with the same figures)."""
    summary_rows = list(summary_rows)
    outcomes = list(outcomes)
    card_outcomes = [o for o in outcomes if o.action in CDS_ACTIONS]
    drafts = _drafts(summary_rows, [o for o in outcomes if o.action not in CDS_ACTIONS], rejections, since)
    overall = _Bucket()
    groups: dict[tuple[str, str, str], _Bucket] = defaultdict(_Bucket)
    weeks: dict[tuple[str, str, str, str], _Bucket] = defaultdict(_Bucket)
    for draft in drafts:
        overall.add(draft)
        groups[(draft.model_sha256, draft.model_name, draft.prompt)].add(draft)
        weeks[(draft.week, draft.model_sha256, draft.model_name, draft.prompt)].add(draft)
    return {
        "since": since.isoformat() if since else None,
        "overall": overall.to_json(),
        "by_model_prompt": [
            {"model_sha256": sha, "model_name": name, "prompt": prompt, **bucket.to_json()}
            for (sha, name, prompt), bucket in sorted(groups.items())
        ],
        "by_week": [
            {"week": week, "model_sha256": sha, "model_name": name, "prompt": prompt, **bucket.to_json()}
            for (week, sha, name, prompt), bucket in sorted(weeks.items())
        ],
        "cds_feedback": cds_feedback(summary_rows, card_outcomes, since),
    }


CDS_ACTIONS = {"cds_accepted": "accepted", "cds_overridden": "overridden"}


def cds_feedback(
    summary_rows: Iterable[SummaryRecord], outcomes: Iterable[ReviewOutcomeRecord], since: datetime | None
) -> list[dict[str, Any]]:
    """CDS Hooks card outcomes per model and prompt (a card names its summary row), with the
    override reason codes counted."""
    rows = {r.id: r for r in summary_rows}
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    for outcome in outcomes:
        if since is not None and outcome.at < since:
            continue
        row = rows.get(outcome.summary_id or "")
        key = (row.model_sha256, row.model_name, f"{row.prompt_id}/{row.prompt_version}") if row else (
            UNKNOWN, UNKNOWN, UNKNOWN
        )
        group = groups.setdefault(key, {"accepted": 0, "overridden": 0, "reasons": defaultdict(int)})
        group[CDS_ACTIONS[outcome.action]] += 1
        for code in outcome.override_reasons:
            group["reasons"][code] += 1
    return [
        {
            "model_sha256": sha,
            "model_name": name,
            "prompt": prompt,
            "accepted": g["accepted"],
            "overridden": g["overridden"],
            "override_reasons": [
                {"reason": code, "count": n}
                for code, n in sorted(g["reasons"].items(), key=lambda i: (-i[1], i[0]))
            ],
        }
        for (sha, name, prompt), g in sorted(groups.items())
    ]


# -- the terminal view -------------------------------------------------------------------------------


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * float(value):.0f}%"


def _duration(seconds: Any) -> str:
    if seconds is None:
        return "-"
    value = float(seconds)
    if value < 120:
        return f"{value:.0f}s"
    if value < 7200:
        return f"{value / 60:.0f}m"
    if value < 172800:
        return f"{value / 3600:.1f}h"
    return f"{value / 86400:.1f}d"


def _number(value: Any) -> str:
    return "-" if value is None else f"{float(value):g}"


def table_rows(groups: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """The cells of the terminal table, one list per group (the same columns as `TABLE_COLUMNS`)."""
    rows = []
    for g in groups:
        sha = str(g["model_sha256"])
        rows.append(
            [
                str(g.get("week", "")),
                f"{g['model_name']} {sha[:12]}" if sha != UNKNOWN else UNKNOWN,
                str(g["prompt"]),
                str(g["summaries"]),
                str(g["reviewed"]),
                _pct(g["approval_rate"]),
                _pct(g["edit_rate"]),
                _pct(g["rejection_rate"]),
                str(g["pending"]),
                str(g["superseded"]),
                _number(g["edit_words_changed"]["median"]),
                _duration(g["time_to_review_seconds"]["median"]),
            ]
        )
    return rows


TABLE_COLUMNS = (
    "week",
    "model",
    "prompt",
    "drafts",
    "reviewed",
    "approved",
    "edited",
    "rejected",
    "pending",
    "superseded",
    "edit words (median)",
    "time to review (median)",
)
