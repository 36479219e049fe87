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
from starlette.concurrency import run_in_threadpool

from service.api.deps import Runtime, RuntimeDep

log = structlog.get_logger(__name__)

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _database_ok(runtime: Runtime) -> bool:
    try:
        with runtime.store.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        log.warning("api.db_unreachable", error=type(exc).__name__)
        return False
    return True


def model_state(runtime: Runtime) -> str:
    if runtime.engine is not None:
        return "loaded"
    return "failed" if runtime.engine_error else "loading"


@router.get("/readyz", summary="Ready to serve: database reachable and model loaded")
async def readyz(runtime: RuntimeDep) -> JSONResponse:
    database = "ok" if await run_in_threadpool(_database_ok, runtime) else "unreachable"
    model = model_state(runtime)
    ready = database == "ok" and model == "loaded"
    body: dict[str, Any] = {
        "status": "ready" if ready else "not-ready",
        "checks": {"database": database, "model": model},
    }
    if runtime.engine is not None:
        body["model"] = {"name": runtime.engine.identity.name, "sha256": runtime.engine.identity.sha256}
    elif runtime.engine_error:
        body["model_error"] = runtime.engine_error
    return JSONResponse(body, status_code=200 if ready else 503)
