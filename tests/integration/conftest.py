"""Integration tests use the session fixtures of tests/conftest.py (one real FHIR server per run)."""

from tests.conftest import EXTERNAL_BASE_ENV, run_in_private_loop

__all__ = ["EXTERNAL_BASE_ENV", "run_in_private_loop"]
