"""Liveness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.routes.deps import MetricsDep, RegistryDep

router = APIRouter()


@router.get("/health")
async def health(registry: RegistryDep) -> JSONResponse:
    """200 only when every engine is up."""
    models = registry.all()
    status = {m.name: ("ok" if m.engine.healthy else "down") for m in models}
    healthy = bool(models) and all(v == "ok" for v in status.values())
    return JSONResponse(
        {"status": "ok" if healthy else "unavailable", "models": status},
        status_code=200 if healthy else 503,
    )


@router.get("/metrics")
async def metrics(metrics: MetricsDep) -> Response:
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
