"""`/healthz` (the process answers) and `/readyz` (the database answers and the model is loaded).

Both are cheap and unauthenticated; they say nothing about patients, and nothing about the
deployment beyond ready or not, why, and which model answers (name, quantization, sha256 prefix; never a
path or a file name).
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
    # Anyone can call this: it says whether and why not, and the model's name, quantization and sha256
    # prefix (which model answers), never a path or a file name.
    database = "ok" if await in_thread(_database_ok, db) else "unreachable"
    ready = database == "ok" and model.state == "loaded"
    body: dict[str, Any] = {
        "status": "ready" if ready else "not-ready",
        "checks": {"database": database, "model": model.state},
    }
    if model.engine is not None:
        # Which model answers (name, quantization, sha256 prefix), never its path or file name.
        identity = model.engine.identity
        body["model"] = {
            "name": identity.name,
            "quantization": identity.quantization,
            "sha256": identity.sha256[:12],
        }
    if not ready:
        body["reason"] = _reason(database, model.state)
    return JSONResponse(body, status_code=200 if ready else 503)


def _reason(database: str, model: str) -> str:
    if database != "ok":
        return "the database cannot be reached (CHARTBRIEF_DB__URL)"
    if model == "failed":
        return "the model could not be loaded; check the CHARTBRIEF_LLM__ settings (the log names the error)"
    return "the model is still loading"
