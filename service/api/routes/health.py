"""`/healthz` (the process answers) and `/readyz` (the database answers and the model is loaded).

Both are cheap and unauthenticated; they say nothing about patients.
"""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from service.api.deps import DatabaseDep, ModelDep
from service.db.store import in_thread

log = structlog.get_logger(__name__)

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _database_ok(db: sessionmaker[Session]) -> bool:
    try:
        with db() as session:
            session.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        log.warning("api.db_unreachable", error=type(exc).__name__)
        return False
    return True


@router.get("/readyz", summary="Ready to serve: database reachable and model loaded")
async def readyz(db: DatabaseDep, model: ModelDep) -> JSONResponse:
    database = "ok" if await in_thread(_database_ok, db) else "unreachable"
    ready = database == "ok" and model.state == "loaded"
    body: dict[str, Any] = {
        "status": "ready" if ready else "not-ready",
        "checks": {"database": database, "model": model.state},
    }
    if model.engine is not None:
        body["model"] = {"name": model.engine.identity.name, "sha256": model.engine.identity.sha256}
    elif model.error:
        body["model_error"] = model.error
    return JSONResponse(body, status_code=200 if ready else 503)
