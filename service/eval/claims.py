"""`chartbrief eval claims`: the claim verifier scored on a labelled corpus.

A corpus line (JSONL) names a bundle file, a patient, one sentence, the `Type/id`s it cites and a
gold label (supported / unsupported / contradicted) with a `kind` ("rule:variant"). Every cited
resource is resolved in its bundle and the sentence verified against exactly those resources,
whatever a prompt would have packed: a claim about any resource of the record must be checkable.
The verifier sees only the sentence, the cited resources and the record they live in; `kind` and
`why` are used for the breakdown alone.

"Not supported" (unsupported or contradicted) is the positive class. The figures:
`supported_kept` (of supported claims, the share kept), `unsupported_kept` (of the rest, the share
kept - lower is better), precision and recall of "not supported", contradicted recall, and the
same per kind prefix; every misjudged line with the verifier's reason.

IO only in `load_corpus` and `load_bundles`; scoring is pure.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fhir_adapters.bundle_source import BundleError, read_bundle
from fhir_adapters.bundle_source import bundle_files as folder_bundle_files
from fhir_adapters.errors import ChartbriefError
from service.verify import RecordIndex, Verdict, verify

LABELS = ("supported", "unsupported", "contradicted")
OUTCOMES = ("kept", "dropped", "contradicted")


class CorpusError(ChartbriefError, ValueError):
    """A corpus line or bundle that cannot be used; the message names the file, line and field."""


@dataclass(frozen=True)
class LabelledClaim:
    line: int
    bundle: str
    patient: str
    text: str
    cites: tuple[str, ...]
    label: str
    kind: str


@dataclass(frozen=True)
class Judged:
    claim: LabelledClaim
    outcome: str  # kept | dropped | contradicted | not_evaluable
    reason: str
    severity: str | None

    @property
    def kept(self) -> bool:
        return self.outcome == "kept"

    @property
    def right(self) -> bool:
        return self.kept == (self.claim.label == "supported")


@dataclass
class Score:
    evaluated: int = 0
    not_evaluable: int = 0
    confusion: dict[str, dict[str, int]] = field(default_factory=dict)
    supported_kept: float = 0.0
    unsupported_kept: float = 0.0
    precision_not_supported: float = 0.0
    recall_not_supported: float = 0.0
    contradicted_recall: float = 0.0
    severities: dict[str, int] = field(default_factory=dict)
    by_kind: dict[str, dict[str, Any]] = field(default_factory=dict)
    misjudged: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def load_corpus(path: Path) -> list[LabelledClaim]:
    """Read a JSONL corpus; a bad line raises CorpusError naming the line and the field."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise CorpusError(f"{path}: cannot be read ({exc.strerror or type(exc).__name__})") from exc
    claims = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{path}:{number}: is not JSON ({exc.msg})") from exc
        claims.append(_labelled(row, f"{path}:{number}", number))
    if not claims:
        raise CorpusError(f"{path}: holds no claims")
    return claims


def _labelled(row: object, where: str, number: int) -> LabelledClaim:
    if not isinstance(row, dict):
        raise CorpusError(f"{where}: a line must be a JSON object")
    for name in ("bundle", "patient", "text", "label"):
        if not isinstance(row.get(name), str) or not row[name]:
            raise CorpusError(f"{where}: field '{name}' must be a non-empty string")
    cites = row.get("cites")
    if not isinstance(cites, list) or not cites or not all(isinstance(c, str) and "/" in c for c in cites):
        raise CorpusError(f"{where}: field 'cites' must be a non-empty list of 'Type/id' strings")
    if row["label"] not in LABELS:
        raise CorpusError(f"{where}: field 'label' must be one of {', '.join(LABELS)}, got {row['label']!r}")
    return LabelledClaim(
        number,
        row["bundle"],
        row["patient"],
        row["text"],
        tuple(cites),
        row["label"],
        str(row.get("kind") or "unknown:unknown"),
    )


def bundle_files(folder: Path) -> dict[str, Path]:
    """Every bundle under `folder` (recursively, .json and .json.gz), by file name."""
    try:
        paths = folder_bundle_files(folder)
    except BundleError as exc:
        raise CorpusError(str(exc)) from exc
    files: dict[str, Path] = {}
    for path in paths:
        if path.name != "manifest.json":
            files.setdefault(path.name, path)
    return files


def load_bundles(folder: Path, names: Iterable[str]) -> dict[str, RecordIndex]:
    """The records of the named bundle files, each as the verifier sees it."""
    files = bundle_files(folder)
    records: dict[str, RecordIndex] = {}
    for name in sorted(set(names)):
        path = files.get(name)
        if path is None:
            raise CorpusError(f"bundle {name}: not found under {folder}")
        try:
            bundle = read_bundle(path)
        except BundleError as exc:
            raise CorpusError(str(exc)) from exc
        resources = [e["resource"] for e in bundle["entry"] if isinstance(e, dict) and "resource" in e]
        records[name] = RecordIndex.of(resources)
    return records


def judge(claim: LabelledClaim, record: RecordIndex) -> Judged:
    """The verifier's verdict on one labelled claim, from its text, citations and record only."""
    sources = [record.evidence(ref) for ref in claim.cites]
    missing = [ref for ref, found in zip(claim.cites, sources, strict=True) if found is None]
    if missing:
        return Judged(claim, "not_evaluable", f"cites {', '.join(missing)}, not in the bundle", None)
    verdict: Verdict = verify(claim.text, [s for s in sources if s is not None], as_of=record.as_of)
    outcome = {"supported": "kept", "unsupported": "dropped", "contradicted": "contradicted"}[verdict.outcome]
    return Judged(claim, outcome, verdict.reason, verdict.severity)


def score(judged: Sequence[Judged]) -> Score:
    """The figures of a judged corpus (see the module docstring)."""
    result = _figures(judged)
    by_kind: dict[str, list[Judged]] = defaultdict(list)
    for j in judged:
        by_kind[j.claim.kind.split(":")[0]].append(j)
    result.by_kind = {
        kind: {k: v for k, v in asdict(_figures(items)).items() if k not in ("by_kind", "misjudged")}
        for kind, items in sorted(by_kind.items())
    }
    result.misjudged = [
        {
            "line": j.claim.line,
            "kind": j.claim.kind,
            "label": j.claim.label,
            "outcome": j.outcome,
            "text": j.claim.text,
            "cites": list(j.claim.cites),
            "reason": j.reason or "kept: every check passed",
        }
        for j in judged
        if j.outcome == "not_evaluable" or not j.right
    ]
    return result


def _figures(judged: Sequence[Judged]) -> Score:
    evaluable = [j for j in judged if j.outcome != "not_evaluable"]
    confusion = {label: dict.fromkeys(OUTCOMES, 0) for label in LABELS}
    for j in evaluable:
        confusion[j.claim.label][j.outcome] += 1
    supported = [j for j in evaluable if j.claim.label == "supported"]
    negative = [j for j in evaluable if j.claim.label != "supported"]
    contradicted = [j for j in evaluable if j.claim.label == "contradicted"]
    flagged = [j for j in evaluable if not j.kept]
    return Score(
        evaluated=len(evaluable),
        not_evaluable=len(judged) - len(evaluable),
        confusion=confusion,
        supported_kept=_share(sum(j.kept for j in supported), len(supported)),
        unsupported_kept=_share(sum(j.kept for j in negative), len(negative)),
        precision_not_supported=_share(sum(j.claim.label != "supported" for j in flagged), len(flagged)),
        recall_not_supported=_share(sum(not j.kept for j in negative), len(negative)),
        contradicted_recall=_share(sum(j.outcome == "contradicted" for j in contradicted), len(contradicted)),
        severities=dict(Counter(j.severity or "none" for j in flagged)),
    )


def _share(part: int, whole: int) -> float:
    return round(part / whole, 4) if whole else 0.0


def evaluate(corpus: Path, bundles: Path) -> tuple[Score, list[Judged]]:
    claims = load_corpus(corpus)
    records = load_bundles(bundles, (c.bundle for c in claims))
    judged = [judge(c, records[c.bundle]) for c in claims]
    return score(judged), judged


def render_text(result: Score) -> str:
    """The terminal view: headline figures, the confusion matrix, per kind, the misjudged lines."""
    lines = [
        f"claims evaluated: {result.evaluated}  not evaluable: {result.not_evaluable}",
        f"supported kept: {result.supported_kept:.1%}   "
        f"unsupported-or-contradicted kept: {result.unsupported_kept:.1%}",
        f"not-supported precision: {result.precision_not_supported:.1%}  "
        f"recall: {result.recall_not_supported:.1%}  contradicted recall: {result.contradicted_recall:.1%}",
        "",
        f"{'gold / verifier':<16}" + "".join(f"{o:>14}" for o in OUTCOMES),
    ]
    lines += [
        f"{label:<16}" + "".join(f"{result.confusion[label][o]:>14}" for o in OUTCOMES) for label in LABELS
    ]
    lines += ["", f"{'kind':<24}{'n':>5}{'supported kept':>16}{'unsupp. kept':>14}"]
    for kind, figures in result.by_kind.items():
        lines.append(
            f"{kind:<24}{figures['evaluated']:>5}{figures['supported_kept']:>16.0%}"
            f"{figures['unsupported_kept']:>14.0%}"
        )
    if result.misjudged:
        lines += ["", f"misjudged ({len(result.misjudged)}):"]
        lines += [
            f"  line {m['line']} [{m['kind']}] gold {m['label']}, verifier {m['outcome']}: {m['text']}"
            f"\n      reason: {m['reason']}"
            for m in result.misjudged
        ]
    return "\n".join(lines) + "\n"


def write_report(result: Score, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "claims.json"
    path.write_text(json.dumps(result.to_json(), indent=2) + "\n", encoding="utf-8")
    return path


__all__ = [
    "CorpusError",
    "Judged",
    "LabelledClaim",
    "Score",
    "evaluate",
    "judge",
    "load_corpus",
    "render_text",
    "score",
    "write_report",
]
