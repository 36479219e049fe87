"""bench/load.py in its smallest configuration: the report has every figure, and no answer was a 5xx.

Timings are the benchmark's to report, not this test's to judge.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
FIGURES = {
    "requests",
    "concurrency",
    "accepted",
    "completed",
    "refused_429",
    "server_errors_5xx",
    "acceptance_seconds",
    "completion_seconds",
    "serve_rss",
}


def test_the_load_benchmark_runs_and_reports_no_5xx(tmp_path: Path) -> None:
    report_path = tmp_path / "load.json"
    done = subprocess.run(  # noqa: S603 - our own benchmark
        [
            sys.executable, str(REPO / "bench" / "load.py"),
            "--engine", "fake", "--requests", "3", "--concurrency", "2", "--sessions", "1",
            "--patients", "1", "--keys", "1", "--report", str(report_path),
        ],
        capture_output=True, text=True, check=False, cwd=REPO, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["server_errors_5xx"] == 0
    scenarios = report["scenarios"]
    assert [s["scenario"].split(" (")[0] for s in scenarios] == ["api jobs", "api streams", "review sessions"]
    for s in scenarios:
        assert FIGURES <= set(s), s["scenario"]
        assert s["server_errors_5xx"] == 0 and s["failed"] == 0, s
        assert s["accepted"] + s["refused_in_the_end"] == s["requests"], s
        assert s["completed"] == s["accepted"], s
        assert s["serve_rss"]["peak_mib"] >= s["serve_rss"]["start_mib"] > 0
