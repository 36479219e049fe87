"""The run's report: bench/results/<timestamp>.json, .md and one PNG per section.

The JSON has a top-level `ratios` object (every section's ratios, flat), the `machine` and each
section with its figures. The Markdown is what docs/PERFORMANCE.md includes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from bench.performance.common import Section
from bench.performance.machine import machine_line


def report_json(
    started: str, machine: dict[str, Any], sections: list[Section], command: str
) -> dict[str, Any]:
    ratios: dict[str, float | None] = {}
    for s in sections:
        ratios.update(s.ratios)
    return {
        "started": started,
        "command": command,
        "machine": machine,
        "ratios": ratios,
        "targets": {k: v for s in sections for k, v in s.targets.items()},
        "sections": {s.key: s.to_json() for s in sections},
    }


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value).replace("|", "\\|")


def table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cell(r.get(h, "")) for h in head) + " |" for r in rows]
    return lines


def markdown(report: dict[str, Any], sections: list[Section], plots: dict[str, str]) -> str:
    lines = [
        f"# chartbrief benchmark, {report['started']}",
        "",
        f"Machine: {machine_line(report['machine'])}.",
        "",
        f"Command: `{report['command']}`. Each timed figure is the median of its repetitions; every ratio "
        "is against a baseline measured in the same run.",
        "",
        "## Ratios",
        "",
        "| ratio | value | target |",
        "|---|---|---|",
    ]
    for key, value in report["ratios"].items():
        lines.append(
            f"| `{key}` | {_cell(value) if value is not None else 'n/a'} | {report['targets'].get(key, '')} |"
        )
    for s in sections:
        lines += ["", f"## {s.title}", ""]
        if s.skipped:
            lines += [f"Skipped: {s.skipped}"]
            continue
        lines += table(s.table)
        if s.key in plots:
            lines += ["", f"![{s.title}]({plots[s.key]})"]
        if s.notes:
            lines += [""] + [f"- {n}" for n in s.notes]
    lines += ["", f"llama.cpp build: `{report['machine']['llama_cpp_system_info']}`", ""]
    return "\n".join(lines)


def plot(section: Section, path: Path) -> bool:
    """A horizontal bar chart of the section's bars; False when it has none."""
    if not section.bars:
        return False
    fig = Figure(figsize=(7.5, 0.55 * len(section.bars) + 1.2), dpi=110)
    ax = fig.add_subplot()
    labels = [b.label for b in section.bars][::-1]
    values = [b.value for b in section.bars][::-1]
    bars = ax.barh(labels, values, color="#3b6ea5")
    shown = [f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}" for v in values]
    ax.bar_label(bars, labels=shown, padding=3, fontsize=8)
    units = {b.unit for b in section.bars}
    ax.set_xlabel(", ".join(sorted(units)))
    ax.set_title(section.title, fontsize=10)
    ax.margins(x=0.15)
    fig.tight_layout()
    fig.savefig(path)
    return True


def write(out_dir: Path, stamp: str, report: dict[str, Any], sections: list[Section]) -> dict[str, Path]:
    """Write the JSON, the Markdown and the plots; the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plots: dict[str, str] = {}
    written: dict[str, Path] = {}
    for s in sections:
        png = out_dir / f"{stamp}-{s.key}.png"
        if not s.skipped and plot(s, png):
            plots[s.key] = png.name
            written[f"plot:{s.key}"] = png
    json_path = out_dir / f"{stamp}.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path = out_dir / f"{stamp}.md"
    md_path.write_text(markdown(report, sections, plots))
    written["json"], written["markdown"] = json_path, md_path
    return written
