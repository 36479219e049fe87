"""The claim verifier: is a sentence supported by the FHIR resources it cites?

`verify(text, sources)` (check.py) over `SourceEvidence` (evidence.py) built from raw resources,
with record-wide facts from a `RecordIndex` (record.py). Pure, fast and deterministic; no model.
"""

from service.verify.check import Verdict, verify
from service.verify.evidence import SourceEvidence, evidence_of
from service.verify.record import RecordIndex

__all__ = ["RecordIndex", "SourceEvidence", "Verdict", "evidence_of", "verify"]
