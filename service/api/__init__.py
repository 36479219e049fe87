"""chartbrief's web service: SMART launch, the clinician review screen, the REST API, health.

`create_app(settings)` builds the FastAPI application; nothing here runs at import time.
"""

from __future__ import annotations

from service.api.app import create_app

__all__ = ["create_app"]
