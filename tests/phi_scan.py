"""pytest plugin: fail the run when a log line carries PHI of the loaded Synthea fixtures.

Every log line of the run is checked against the personal data of the bundles in
tests/fixtures/synthea: patient names (given + family; the family name alone as well when it has
at least 5 characters and a digit, since Synthea appends digits to names, which makes such a
match in a log all but impossible by chance), birth dates (YYYY-MM-DD as written), address lines,
city + postal code, telecom values, and note text (each line of at least 30 characters of the
text/plain DocumentReference attachments). Names, dates, addresses and phones match on word
boundaries, case-insensitive; note lines match literally.

Log lines come from three places, so that neither a handler reset (`basicConfig(force=True)`)
nor structlog's PrintLogger escapes the scan:
- a `logging` record factory wrapper, which sees every record created, with its args and extra;
- the captured stdout / stderr / log sections of every test report, and whatever a test read
  back with `capsys` / `capfd`;
- `*.log` files left under the run's temporary folder.

The run fails on any hit. Reports name the kind of PHI and where it was seen, never the value.
Tests of this plugin plant PHI on purpose; their own output is left out of the scan.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "synthea"
NOTE_LINE_MIN = 30
FAMILY_ALONE_MIN = 5
# Output of these test modules carries planted PHI by design.
EXCLUDED_MODULES = ("test_phi_scan.py",)
# Attributes every LogRecord has; anything else on a record came from `extra`.
_STANDARD_RECORD_KEYS = frozenset(vars(logging.LogRecord("n", 0, "p", 0, "m", None, None))) | {
    "message",
    "asctime",
}
KINDS = ("name", "birth_date", "address", "city_postal_code", "telecom", "note_text")


@dataclass(frozen=True)
class Hit:
    kind: str
    where: str
    source: str


def _load_bundle(path: Path) -> dict[str, Any]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        data: dict[str, Any] = json.load(handle)
    return data


def _resources(bundle: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for entry in bundle.get("entry") or []:
        resource = entry.get("resource")
        if isinstance(resource, dict):
            yield resource


def _note_lines(document: dict[str, Any]) -> Iterator[str]:
    for content in document.get("content") or []:
        attachment = content.get("attachment") or {}
        if not str(attachment.get("contentType", "")).startswith("text/plain") or not attachment.get("data"):
            continue
        try:
            text = base64.b64decode(attachment["data"]).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            continue
        for line in text.splitlines():
            line = line.strip()
            if len(line) >= NOTE_LINE_MIN:
                yield line


def extract_phi(bundle: dict[str, Any]) -> dict[str, set[str]]:
    """The PHI values of one Synthea bundle, by kind (city + postal code as "city\\tcode")."""
    values: dict[str, set[str]] = {kind: set() for kind in KINDS}
    for resource in _resources(bundle):
        kind = resource.get("resourceType")
        if kind == "Patient":
            for name in resource.get("name") or []:
                family = str(name.get("family") or "").strip()
                given = " ".join(str(g).strip() for g in name.get("given") or [] if str(g).strip())
                if given and family:
                    values["name"].add(f"{given} {family}")
                if len(family) >= FAMILY_ALONE_MIN and any(c.isdigit() for c in family):
                    values["name"].add(family)
            if resource.get("birthDate"):
                values["birth_date"].add(str(resource["birthDate"]))
            for address in resource.get("address") or []:
                values["address"].update(
                    str(line).strip() for line in address.get("line") or [] if str(line).strip()
                )
                if address.get("city") and address.get("postalCode"):
                    values["city_postal_code"].add(f"{address['city']}\t{address['postalCode']}")
            for telecom in resource.get("telecom") or []:
                if telecom.get("value"):
                    values["telecom"].add(str(telecom["value"]))
        elif kind == "DocumentReference":
            values["note_text"].update(_note_lines(resource))
    return values


def fixture_phi(folder: Path = FIXTURES) -> dict[str, set[str]]:
    values: dict[str, set[str]] = {kind: set() for kind in KINDS}
    for path in sorted(folder.glob("*.json*")):
        for kind, found in extract_phi(_load_bundle(path)).items():
            values[kind].update(found)
    return values


def _bounded(value: str) -> str:
    return rf"(?<!\w){re.escape(value)}(?!\w)"


class PhiScanner:
    """One combined pattern for all values; a match's group says which kind of PHI it was."""

    def __init__(self, values: dict[str, set[str]]) -> None:
        self.value_count = sum(len(v) for v in values.values())
        groups: list[str] = []
        for kind in KINDS:
            found = sorted(values.get(kind, ()), key=len, reverse=True)
            if not found:
                continue
            if kind == "note_text":
                alternatives = [re.escape(v) for v in found]
            elif kind == "city_postal_code":
                # "Boston, MA 02108" and the like: the city, then the code within a few characters.
                alternatives = [
                    rf"{_bounded(city)}[^\n]{{0,40}}?{_bounded(code)}"
                    for city, code in (v.split("\t") for v in found)
                ]
            else:
                alternatives = [_bounded(v) for v in found]
            groups.append(f"(?P<{kind}>{'|'.join(alternatives)})")
        self._pattern = re.compile("|".join(groups), re.IGNORECASE) if groups else None

    def kinds_in(self, text: str) -> set[str]:
        if self._pattern is None or not text:
            return set()
        return {m.lastgroup for m in self._pattern.finditer(text) if m.lastgroup}


def _record_text(record: logging.LogRecord) -> str:
    try:
        message = record.getMessage()
    except Exception:  # a bad format string must not hide the raw parts from the scan
        message = str(record.msg)
    parts = [message]
    if record.args:
        parts.append(repr(record.args))
    extra = {k: v for k, v in vars(record).items() if k not in _STANDARD_RECORD_KEYS}
    if extra:
        parts.append(repr(extra))
    return "\n".join(parts)


@dataclass(eq=False)  # pluggy keeps plugins in sets: identity hashing
class PhiScanPlugin:
    scanner: PhiScanner
    lines: int = 0
    tests: set[str] = field(default_factory=set)
    hits: set[Hit] = field(default_factory=set)
    current: str = "(session)"
    _pending: list[tuple[str, logging.LogRecord]] = field(default_factory=list)
    _previous_factory: Any = None

    # -- collection ---------------------------------------------------------------------------

    def _excluded(self, where: str) -> bool:
        module = where.split("::", 1)[0]
        return module.endswith(EXCLUDED_MODULES)

    def scan(self, text: str, where: str, source: str) -> None:
        if self._excluded(where):
            return
        self.lines += text.count("\n") + (0 if text.endswith("\n") or not text else 1)
        for kind in self.scanner.kinds_in(text):
            self.hits.add(Hit(kind, where, source))

    def _flush_records(self) -> None:
        pending, self._pending = self._pending, []
        for where, record in pending:
            self.scan(_record_text(record), where, f"logging record ({record.name})")

    def install(self) -> None:
        previous = logging.getLogRecordFactory()
        self._previous_factory = previous

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            # `extra` is set on the record after the factory returns: read it at the next flush.
            self._pending.append((self.current, record))
            if len(self._pending) > 5000:
                self._flush_records()
            return record

        logging.setLogRecordFactory(factory)
        original_readouterr = pytest.CaptureFixture.readouterr
        plugin = self

        def readouterr(fixture: Any) -> Any:
            result = original_readouterr(fixture)
            plugin.scan(
                result.out if isinstance(result.out, str) else repr(result.out),
                plugin.current,
                "capsys stdout",
            )
            plugin.scan(
                result.err if isinstance(result.err, str) else repr(result.err),
                plugin.current,
                "capsys stderr",
            )
            return result

        self._original_readouterr = original_readouterr
        pytest.CaptureFixture.readouterr = readouterr  # type: ignore[method-assign,assignment]

    def uninstall(self) -> None:
        if self._previous_factory is not None:
            logging.setLogRecordFactory(self._previous_factory)
            pytest.CaptureFixture.readouterr = self._original_readouterr  # type: ignore[method-assign]
            self._previous_factory = None

    # -- hooks --------------------------------------------------------------------------------

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logstart(self, nodeid: str) -> None:
        self._flush_records()
        self.current = nodeid

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self._flush_records()
        if not self._excluded(report.nodeid):
            self.tests.add(report.nodeid)
        for title, content in report.sections:
            self.scan(content, report.nodeid, title)

    def pytest_runtest_logfinish(self, nodeid: str) -> None:
        self._flush_records()
        self.current = "(session)"

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        self._flush_records()
        try:
            basetemp = session.config._tmp_path_factory.getbasetemp()  # type: ignore[attr-defined]
        except (AttributeError, OSError):
            basetemp = None
        if basetemp is not None:
            for path in sorted(Path(basetemp).rglob("*.log")):
                if path.is_file():
                    self.scan(
                        path.read_text(encoding="utf-8", errors="replace"),
                        "(log file)",
                        str(path.relative_to(basetemp)),
                    )
        if self.hits and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def figure(self) -> str:
        return (
            f"PHI scan: {self.lines} log lines from {len(self.tests)} tests, "
            f"{self.scanner.value_count} values checked, {len(self.hits)} hits"
        )

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.hits:
            terminalreporter.section("PHI in logs", red=True)
            for hit in sorted(self.hits, key=lambda h: (h.where, h.kind, h.source)):
                terminalreporter.write_line(
                    f"PHI in logs: {hit.kind} of a fixture patient in {hit.source} of {hit.where}"
                )
        terminalreporter.write_line(self.figure())

    def pytest_unconfigure(self) -> None:
        self.uninstall()


PLUGIN_NAME = "chartbrief-phi-scan"


def pytest_configure(config: pytest.Config) -> None:
    plugin = PhiScanPlugin(PhiScanner(fixture_phi()))
    plugin.install()
    config.pluginmanager.register(plugin, PLUGIN_NAME)


def scan_texts(texts: Iterable[str], values: dict[str, set[str]] | None = None) -> set[str]:
    """The kinds of fixture PHI found in some texts (for checks outside a pytest run)."""
    scanner = PhiScanner(fixture_phi() if values is None else values)
    found: set[str] = set()
    for text in texts:
        found |= scanner.kinds_in(text)
    return found
