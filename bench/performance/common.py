"""What every section of `make bench` shares: the run's context, the shape of a section's result,
and the repetition helper that reports medians.

A section measures one comparison and returns a `Section`: its ratios (each against a baseline
measured in the same run), the absolute figures behind them, a table for the Markdown report and
the bars for its plot. A section that cannot run here (no GPU) returns `skipped` with the reason.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class BenchContext:
    fhir_base: str  # the local FHIR server, loaded with the fixture patients
    patients: list[Any]  # service.dev.sandbox.LoadedPatient, in fixture order
    largest: Any  # the LoadedPatient with the most resources
    repetitions: int  # each timed figure is the median of this many runs
    tiny: bool  # `make test`'s smoke run: the smallest inputs, one repetition
    work_dir: Path  # scratch space for databases and logs of this run
    overhead_patient: Any = None  # a mid-sized patient: its record-wide prompt is ~2,000 tokens


@dataclass(frozen=True)
class Bar:
    label: str
    value: float
    unit: str


@dataclass
class Section:
    key: str  # "fetch", "decode", ...
    title: str
    ratios: dict[str, float | None] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    table: list[dict[str, Any]] = field(default_factory=list)  # rows of the Markdown table
    bars: list[Bar] = field(default_factory=list)  # the section's plot
    targets: dict[str, str] = field(default_factory=dict)  # ratio -> the target, e.g. ">= 3"
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "ratios": self.ratios,
            "targets": self.targets,
            "figures": self.figures,
            "table": self.table,
            "notes": self.notes,
            "skipped": self.skipped,
        }


def median_seconds(repetitions: int, run: Callable[[], object]) -> tuple[float, list[float]]:
    """Run `run` `repetitions` times; the median and every time, in seconds."""
    times = []
    for _ in range(max(1, repetitions)):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times), times


async def amedian_seconds(
    repetitions: int, run: Callable[[], Awaitable[object]]
) -> tuple[float, list[float]]:
    """`median_seconds` for a coroutine function."""
    times = []
    for _ in range(max(1, repetitions)):
        started = time.perf_counter()
        await run()
        times.append(time.perf_counter() - started)
    return statistics.median(times), times


def ratio(numerator: float | None, denominator: float | None, digits: int = 3) -> float | None:
    """numerator / denominator, rounded; None when either is missing or the denominator is 0."""
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, digits)
