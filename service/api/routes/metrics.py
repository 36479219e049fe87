"""`/metrics`: the process's Prometheus metrics (`service.metrics`), for hospital IT's monitoring.

On the main port it answers only a caller with `CHARTBRIEF_METRICS__BEARER_TOKEN` (compared in
constant time); without that token configured it is off (404), and when the metrics have a port
of their own (`CHARTBRIEF_METRICS__PORT`) the main port has none. No figure carries a patient id.
"""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.deps import get_runtime

router = APIRouter(tags=["health"])


@router.get("/metrics", summary="Prometheus metrics (bearer token)", include_in_schema=False)
async def metrics(request: Request) -> Response:
    runtime = get_runtime(request)
    settings = runtime.settings.metrics
    token = settings.bearer_token.get_secret_value() if settings.bearer_token is not None else ""
    if settings.port is not None or not token:
        return JSONResponse({"error": "not found"}, status_code=404)
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        return JSONResponse(
            {"error": "the metrics need CHARTBRIEF_METRICS__BEARER_TOKEN as a bearer token"},
            status_code=401,
            headers={"WWW-Authenticate": 'Bearer realm="chartbrief-metrics"'},
        )
    return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)
