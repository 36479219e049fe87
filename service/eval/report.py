"""The `eval run` report: figures aggregated from per-patient measures, as report.json and a
self-contained report.html.

`build_report()` is pure: it sums the per-patient figures of each configuration overall, by sex,
by age band, and by model and prompt version, so every group's counts add up to the overall ones.
`render_html()` draws the plots with matplotlib (PNG in memory, embedded as base64) into a Jinja2
template with inline styles: the file opens anywhere, offline. `machine()` names the computer
the figures were measured on.

What it must not do: fetch anything (no URL in the page is loaded), run models, or log content.
The report holds claim text and is for the operator, like any output of a summary.
"""

from __future__ import annotations

import base64
import io
import json
import os
import platform
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2
from matplotlib.figure import Figure

from service.eval.measures import AGE_BANDS, UNKNOWN, PatientEvaluation
from service.eval.run import RunResult

JsonObject = dict[str, Any]
TEMPLATES = Path(__file__).parent / "templates"
SEVERITIES = ("high", "medium", "low")
_TOP_REASONS = 15


# --- figures ------------------------------------------------------------------------------------


def aggregate(patients: Sequence[PatientEvaluation]) -> JsonObject:
    """The summed figures of a group of patients; shares are of the group's totals."""
    kept = sum(len(p.kept) for p in patients)
    dropped = sum(len(p.dropped) for p in patients)
    expected = sum(len(p.key_facts) for p in patients)
    found = sum(p.key_facts_found for p in patients)
    severities = Counter(d.severity for p in patients for d in p.dropped)
    adds = sum(p.adds_information for p in patients)
    seconds = sum(p.seconds for p in patients)
    with_notes = [p for p in patients if p.notes]
    return {
        "patients": len(patients),
        "claims": kept + dropped,
        "claims_kept": kept,
        "claims_dropped": dropped,
        "claims_contradicted": sum(p.claims_contradicted for p in patients),
        "kept_share": round(kept / (kept + dropped), 4) if kept + dropped else 0.0,
        "dropped_by_severity": {s: severities.get(s, 0) for s in SEVERITIES},
        "adds_information": adds,
        "adds_information_model_written": sum(p.adds_information_model_written for p in patients),
        "quoted": sum(p.quoted for p in patients),
        "restating": kept - adds,
        "patients_with_notes": len(with_notes),
        "notes_read": sum(p.notes_read for p in patients),
        # The narrative's aim: what only the notes say, per patient who has notes.
        "adds_information_per_patient_with_notes": _mean([p.adds_information for p in with_notes]),
        "model_written_per_patient_with_notes": _mean([p.adds_information_model_written for p in with_notes]),
        "least_adds_information_with_notes": min((p.adds_information for p in with_notes), default=0),
        "key_facts": expected,
        "key_facts_found": found,
        "coverage": round(found / expected, 4) if expected else 1.0,
        "coverage_misses": expected - found,
        "conflicts": sum(p.conflicts for p in patients),
        "prompt_tokens": sum(p.prompt_tokens for p in patients),
        "completion_tokens": sum(p.completion_tokens for p in patients),
        "seconds": round(seconds, 3),
        "seconds_per_patient": round(seconds / len(patients), 3) if patients else 0.0,
        "top_reasons": top_reasons(patients),
    }


def _mean(values: Sequence[int]) -> float:
    return round(sum(values) / len(values), 2) if values else 0.0


def reason_kind(reason: str) -> str:
    """A drop reason without the values it quotes, so that alike reasons count together.

    >>> reason_kind("states 1901-01-01 not found in cited sources [C1, C2]")
    'states … not found in cited sources'
    >>> reason_kind("cites Z99, which is not in the record")
    'cites … which is not in the record'
    """
    text = re.sub(r"\s*\[[^\]]*\]", "", reason)
    text = re.sub(r"^(\w+) .*? (not found|not in|which is|which are)\b", r"\1 … \2", text)
    text = re.sub(r"^(\w+) [^,]*,", r"\1 …,", text)
    return re.sub(r"\d+", "N", text).strip()


def top_reasons(patients: Iterable[PatientEvaluation]) -> list[JsonObject]:
    counts = Counter((reason_kind(d.reason), d.verdict) for p in patients for d in p.dropped)
    return [
        {"reason": reason, "verdict": verdict, "count": n}
        for (reason, verdict), n in counts.most_common(_TOP_REASONS)
    ]


def by_group(
    patients: Sequence[PatientEvaluation], key: Callable[[PatientEvaluation], str], order: Sequence[str]
) -> JsonObject:
    """`aggregate` per group; the groups of `order` always appear (empty or not), others after."""
    groups: dict[str, list[PatientEvaluation]] = {name: [] for name in order}
    for patient in patients:
        groups.setdefault(key(patient), []).append(patient)
    return {name: aggregate(members) for name, members in groups.items()}


def configuration_json(run: RunResult) -> JsonObject:
    model, prompt = run.model, run.prompt
    return {
        "name": run.configuration.name,
        "label": f"{model.file_name} · {prompt.id}/{prompt.version}",
        "model": {
            "name": model.name,
            "file": model.file_name,
            "sha256": model.sha256,
            "quantization": model.quantization,
            "runtime": model.runtime,
            "sampling": model.sampling,
        },
        "model_sha256": model.sha256,
        "prompt": {"id": prompt.id, "version": prompt.version, "sha256": prompt.sha256},
        "prompt_id": prompt.id,
        "prompt_version": prompt.version,
        "prompt_sha256": prompt.sha256,
    }


def run_json(run: RunResult) -> JsonObject:
    """One configuration's part of the report: its patients and every breakdown."""
    return {
        "configuration": configuration_json(run),
        "patients": [p.to_json() for p in run.patients],
        "overall": aggregate(run.patients),
        "by_sex": by_group(run.patients, lambda p: p.sex, ("female", "male")),
        "by_age_band": by_group(run.patients, lambda p: p.age_band, AGE_BANDS),
    }


def build_report(
    runs: Sequence[RunResult], *, source: str, machine: JsonObject, generated: str | None = None
) -> JsonObject:
    """report.json: the first configuration's figures at the top level (`patients`, `overall`,
    `by_sex`, `by_age_band`, `configuration`), every configuration in `runs`, and `compare` when
    there is a second. Pure."""
    if not runs:
        raise ValueError("a report needs at least one configuration's run")
    parts = [run_json(run) for run in runs]
    first = parts[0]
    return {
        "generated": generated or datetime.now(UTC).isoformat(timespec="seconds"),
        "source": source,
        "machine": machine,
        "configuration": first["configuration"],
        "patients": first["patients"],
        "overall": first["overall"],
        "by_sex": first["by_sex"],
        "by_age_band": first["by_age_band"],
        "by_model_and_prompt": [_model_and_prompt(part) for part in parts],
        "runs": parts,
        "compare": parts[1] if len(parts) > 1 else None,
    }


def _model_and_prompt(part: JsonObject) -> JsonObject:
    c = part["configuration"]
    return {
        "configuration": c["name"],
        "model_file": c["model"]["file"],
        "model_sha256": c["model_sha256"],
        "prompt_version": f"{c['prompt_id']}/{c['prompt_version']}",
        "overall": part["overall"],
    }


def machine() -> JsonObject:
    """The computer the figures were measured on: CPU model, cores, memory, system."""
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count() or 0,
        "memory_gib": _memory_gib(),
        "system": f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": platform.python_version(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or UNKNOWN


def _memory_gib() -> float | None:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    return round(total / 2**30, 1)


# --- plots --------------------------------------------------------------------------------------


def png_data_uri(figure: Figure) -> str:
    """The figure as a `data:image/png;base64,...` URI (rendered in memory, no display)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=96, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def claims_plot(parts: Sequence[JsonObject]) -> str:
    """Claims kept, dropped as unsupported and contradicted, per configuration and age band."""
    groups = [*AGE_BANDS, "overall"]
    figure = Figure(figsize=(8, 3.2))
    axes = figure.subplots(1, len(parts), squeeze=False)[0]
    for ax, part in zip(axes, parts, strict=True):
        rows = [part["by_age_band"].get(band, {}) for band in AGE_BANDS] + [part["overall"]]
        kept = [r.get("claims_kept", 0) for r in rows]
        contradicted = [r.get("claims_contradicted", 0) for r in rows]
        unsupported = [r.get("claims_dropped", 0) - c for r, c in zip(rows, contradicted, strict=True)]
        x = range(len(groups))
        ax.bar(x, kept, label="kept", color="#2e7d32")
        ax.bar(x, unsupported, bottom=kept, label="dropped (unsupported)", color="#9e9e9e")
        ax.bar(
            x,
            contradicted,
            bottom=[k + u for k, u in zip(kept, unsupported, strict=True)],
            label="dropped (contradicted)",
            color="#c62828",
        )
        ax.set_xticks(list(x), groups)
        ax.set_title(f"{part['configuration']['name']}: {part['configuration']['label']}", fontsize=8)
        ax.set_ylabel("claims")
    axes[0].legend(fontsize=7)
    return png_data_uri(figure)


def shares_plot(parts: Sequence[JsonObject]) -> str:
    """Kept share and key-fact coverage by sex and age band, configurations side by side."""
    figure = Figure(figsize=(8, 3.2))
    left, right = figure.subplots(1, 2)
    for ax, field, title in (
        (left, "kept_share", "claims kept (share)"),
        (right, "coverage", "key-fact coverage"),
    ):
        labels = [*part_groups(parts[0])]
        width = 0.8 / len(parts)
        for index, part in enumerate(parts):
            rows = {**part["by_sex"], **part["by_age_band"]}
            values = [rows.get(label, {}).get(field, 0.0) for label in labels]
            ax.bar(
                [i + index * width for i in range(len(labels))],
                values,
                width,
                label=part["configuration"]["name"],
            )
        ax.set_xticks(
            [i + width * (len(parts) - 1) / 2 for i in range(len(labels))], labels, rotation=30, fontsize=7
        )
        ax.set_ylim(0, 1.05)
        ax.set_title(title, fontsize=9)
    left.legend(fontsize=7)
    return png_data_uri(figure)


def part_groups(part: JsonObject) -> list[str]:
    return [*part["by_sex"], *part["by_age_band"]]


# --- HTML ---------------------------------------------------------------------------------------


def render_html(report: JsonObject) -> str:
    """report.html: tables, plots as embedded PNG, every patient with its claims and misses."""
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    parts: list[JsonObject] = report["runs"]
    template = environment.get_template("report.html")
    return template.render(
        report=report,
        parts=parts,
        figures=FIGURES,
        plots={"claims": claims_plot(parts), "shares": shares_plot(parts)},
        side_by_side=paired_patients(parts),
    )


# The figures the tables show, in order: (key in `aggregate`, label).
FIGURES: tuple[tuple[str, str], ...] = (
    ("patients", "patients"),
    ("claims_kept", "claims kept"),
    ("claims_dropped", "claims dropped"),
    ("claims_contradicted", "of which contradicted"),
    ("kept_share", "kept share"),
    ("adds_information", "statements adding information"),
    ("adds_information_per_patient_with_notes", "adding information, per patient with notes"),
    ("model_written_per_patient_with_notes", "of which model-written, per patient with notes"),
    ("least_adds_information_with_notes", "fewest adding information, of patients with notes"),
    ("quoted", "statements quoted from notes"),
    ("restating", "statements only restating the coded part"),
    ("notes_read", "notes read by the model"),
    ("coverage", "key-fact coverage"),
    ("coverage_misses", "key facts missing"),
    ("conflicts", "conflicts found"),
    ("prompt_tokens", "prompt tokens"),
    ("completion_tokens", "completion tokens"),
    ("seconds", "seconds"),
    ("seconds_per_patient", "seconds per patient"),
)


def paired_patients(parts: Sequence[JsonObject]) -> list[JsonObject]:
    """Each patient with its figures under every configuration, for the side-by-side table."""
    rows: dict[str, JsonObject] = {}
    for part in parts:
        for patient in part["patients"]:
            row = rows.setdefault(
                patient["patient"],
                {
                    "patient": patient["patient"],
                    "sex": patient["sex"],
                    "age_band": patient["age_band"],
                    "runs": [],
                },
            )
            row["runs"].append(patient)
    return list(rows.values())


def write_report(report: JsonObject, out: Path) -> tuple[Path, Path]:
    """Write report.json and report.html into `out` (created when missing)."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out / "report.json", out / "report.html"
    json_path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    html_path.write_text(render_html(report), encoding="utf-8")
    return json_path, html_path


__all__ = [
    "FIGURES",
    "aggregate",
    "build_report",
    "by_group",
    "machine",
    "reason_kind",
    "render_html",
    "run_json",
    "write_report",
]
