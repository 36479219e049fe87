"""structlog set-up: console in development, JSON in production, and a guard against PHI.

Logs carry ids and counts. A processor drops any event key that names personal or secret
content (names, birth dates, note or prompt text, tokens) and replaces it with a marker, so a
careless `log.info(..., name=...)` cannot leak it. Configure once at the process edge.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

# Event keys that must never reach a log sink. Matching is on the key, case-insensitive,
# also as a suffix ("patient_name", "access_token").
PHI_KEYS: frozenset[str] = frozenset(
    {
        "name",
        "given",
        "family",
        "birthdate",
        "birth_date",
        "dob",
        "address",
        "phone",
        "telecom",
        "text",
        "note",
        "note_text",
        "prompt",
        "completion",
        "content",
        "markdown",
        "token",
        "access_token",
        "refresh_token",
        "id_token",
        "authorization",
        "password",
        "secret",
        "client_secret",
    }
)
REDACTED = "[redacted]"


def _is_phi_key(key: str) -> bool:
    k = key.lower()
    return k in PHI_KEYS or any(k.endswith("_" + p) for p in PHI_KEYS)


def drop_phi(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Replace the value of any PHI-named key with a marker.

    >>> drop_phi(None, "info", {"event": "read", "patient_id": "p1", "patient_name": "X"})
    {'event': 'read', 'patient_id': 'p1', 'patient_name': '[redacted]'}
    """
    for key in list(event_dict):
        if key != "event" and _is_phi_key(key):
            event_dict[key] = REDACTED
    return event_dict


def configure_logging(*, fmt: str = "console", level: str = "INFO") -> None:
    """Route structlog (and stdlib logging) to stderr, keeping stdout for command output."""
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, level), format="%(message)s", force=True)
    for noisy in ("httpx", "httpcore", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    renderer: Any = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            drop_phi,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
