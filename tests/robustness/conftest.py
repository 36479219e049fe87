"""Hypothesis profiles of the robustness suite, and the figures it reports at the end of a run.

The "ci" profile is derandomized (the same examples on every machine, so a failure in CI is one a
developer can replay) with no per-example deadline (a shared CI runner is slow in bursts). Tests
here apply it explicitly (`settings(PROFILE)`): loading it globally would change hypothesis tests
elsewhere. `CHARTBRIEF_TEST_FUZZ_EXAMPLES` raises the number of examples for a longer local run.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
from hypothesis import HealthCheck, settings

EXAMPLES = int(os.environ.get("CHARTBRIEF_TEST_FUZZ_EXAMPLES", "40"))

settings.register_profile(
    "ci",
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
)
PROFILE = settings.get_profile("ci")

# Cases run per suite (e.g. "api without auth"), printed in the terminal summary.
FIGURES: Counter[str] = Counter()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not FIGURES:
        return
    terminalreporter.section("robustness figures")
    for name, count in sorted(FIGURES.items()):
        terminalreporter.write_line(f"{name}: {count}")
