"""What a `chartbrief batch run` was asked to do, and the error a batch stops with.

Everything else in the package takes a checked `BatchRequest`; the checks here need neither the
database nor the FHIR server, so a wrong combination of options fails before anything is opened.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from fhir_adapters.errors import ChartbriefError

FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


class BatchError(ChartbriefError):
    """A batch cannot start or go on: the message says why and what to do (no PHI)."""


@dataclass(frozen=True)
class BatchRequest:
    """What `chartbrief batch run` was asked to do."""

    patients_file: Path | None = None
    group_id: str | None = None
    bulk: bool = False
    resume: bool = False
    wait: bool = True  # PostgreSQL: wait for the workers and report (False: enqueue and return)

    def check(self) -> None:
        if self.patients_file is not None and (self.group_id is not None or self.bulk):
            raise BatchError("--patients cannot be combined with --group or --bulk")
        if self.group_id is not None and not FHIR_ID.fullmatch(self.group_id):
            raise BatchError(f"--group {self.group_id!r} is not a FHIR id ([A-Za-z0-9-.]{{1,64}})")

    @property
    def label(self) -> str:
        """The selection's kind; incremental kinds take their watermark from the last run of the same kind."""
        if self.patients_file is not None:
            return f"file:{self.patients_file.name}"[:200]
        if self.bulk:
            return "bulk" if self.group_id is None else f"bulk-group:{self.group_id}"
        if self.group_id is not None:
            return f"group:{self.group_id}"
        return "changed"
