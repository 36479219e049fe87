"""The PHI-in-logs scan finds fixture PHI in every log channel, and passes a run that logs ids only.

The inner runs are separate pytest processes with the plugin loaded, so their planted PHI and
their logging set-up never reach the outer run (whose scan leaves this module's output out).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.phi_scan import FIXTURES, PhiScanner, _load_bundle, extract_phi, fixture_phi, scan_texts

ROOT = Path(__file__).resolve().parent.parent
BUNDLE = next(FIXTURES.glob("Beatris270_Bogan287_*.json*"))
NAME = "Beatris270 Bogan287"
PATIENT_ID = "5b3645de-a2d0-d016-0839-bab3757c4c58"


def test_extraction_of_one_fixture_has_its_name_birth_date_address_phone_and_notes() -> None:
    values = extract_phi(_load_bundle(BUNDLE))
    assert {NAME, "Bogan287"} <= values["name"]
    assert values["birth_date"] == {"2015-05-03"}
    assert "274 Dooley Avenue" in values["address"]
    assert values["city_postal_code"] == {"Lawrence\t01843"}
    assert values["telecom"] == {"555-339-8605"}
    assert values["note_text"] and all(len(line) >= 30 for line in values["note_text"])


def test_every_fixture_patient_contributes_a_name_and_a_birth_date() -> None:
    values = fixture_phi()
    bundles = sorted(FIXTURES.glob("*.json*"))
    assert len(bundles) >= 6
    assert len(values["birth_date"]) == len(bundles)
    for path in bundles:
        given, family = path.name.split("_")[:2]
        assert f"{given} {family}" in values["name"], path.name
    # Family names without digits ("Trantow") are only matched with the given name.
    assert "Trantow" not in values["name"]


def test_scan_matches_on_word_boundaries_case_insensitive() -> None:
    scanner = PhiScanner(fixture_phi())
    assert scanner.kinds_in(f"summary for {NAME} ready") == {"name"}
    assert scanner.kinds_in("patient BEATRIS270 BOGAN287") == {"name"}
    assert scanner.kinds_in("family=Bogan287,") == {"name"}
    assert scanner.kinds_in("ref Bogan2871 and xBogan287") == set()
    assert scanner.kinds_in("born 2015-05-03") == {"birth_date"}
    assert scanner.kinds_in("t=2015-05-031") == set()
    assert scanner.kinds_in("lives at 274 Dooley Avenue") == {"address"}
    assert scanner.kinds_in("Lawrence, MA 01843") == {"city_postal_code"}
    assert scanner.kinds_in("01843 Lawrence") == set()
    assert scanner.kinds_in("Lawrence" + " " * 50 + "01843") == set()
    assert scanner.kinds_in("call 555-339-8605") == {"telecom"}


def test_scan_finds_a_note_line_literally() -> None:
    note = sorted(extract_phi(_load_bundle(BUNDLE))["note_text"])[0]
    assert scan_texts([f"prompt: ...{note}..."]) == {"note_text"}
    assert scan_texts([note[:-5]]) == set()


def test_scan_passes_ids_and_counts() -> None:
    assert scan_texts([f"event=summary patient_id={PATIENT_ID} claims=4 duration_ms=1200"]) == set()


INNER_LEAKS = f'''
import logging
import sys

from service.logging import configure_logging
import structlog

NAME = "{NAME}"


def test_logging_with_pytest_handlers_removed():
    # Only the record factory can see this: basicConfig(force=True) drops every root handler.
    logging.basicConfig(force=True, handlers=[logging.NullHandler()])
    logging.getLogger("chartbrief.inner").warning("summary done", extra={{"who": NAME}})


def test_structlog():
    configure_logging(fmt="json")
    structlog.get_logger().info("summary for " + NAME)
    structlog.reset_defaults()


def test_stderr():
    print("patient", NAME, file=sys.stderr)
'''

INNER_CLEAN = f'''
import logging
import sys

from service.logging import configure_logging
import structlog


def test_ids_only():
    logging.getLogger("chartbrief.inner").warning("summary done %s", "{PATIENT_ID}")
    configure_logging(fmt="json")
    structlog.get_logger().info("summary", patient_id="{PATIENT_ID}", claims=3)
    structlog.reset_defaults()
    print("patient_id={PATIENT_ID}", file=sys.stderr)
'''


@pytest.fixture
def inner_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    )


@pytest.mark.usefixtures("inner_env")
def test_inner_run_logging_a_patient_name_fails_naming_kind_and_source(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_inner=INNER_LEAKS)
    result = pytester.runpytest_subprocess("-p", "tests.phi_scan", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=3)
    out = result.stdout.str()
    assert (
        "name of a fixture patient in logging record (chartbrief.inner) of test_inner.py::test_logging_with_pytest_handlers_removed"
        in out
    )
    assert "name of a fixture patient in Captured stderr call of test_inner.py::test_structlog" in out
    assert "name of a fixture patient in Captured stderr call of test_inner.py::test_stderr" in out
    result.stdout.re_match_lines([r"PHI scan: \d+ log lines from 3 tests, \d+ values checked, [1-9]\d* hits"])
    # The report names where, never the value.
    summary = out.split("PHI in logs", 1)[1]
    assert "Beatris270" not in summary and "Bogan287" not in summary


@pytest.mark.usefixtures("inner_env")
def test_inner_run_logging_ids_only_passes(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_inner=INNER_CLEAN)
    result = pytester.runpytest_subprocess("-p", "tests.phi_scan", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.OK
    result.assert_outcomes(passed=1)
    result.stdout.re_match_lines(
        [r"PHI scan: [1-9]\d* log lines from 1 tests, [1-9]\d* values checked, 0 hits"]
    )
