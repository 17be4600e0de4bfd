"""Liveness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.routes.deps import MetricsDep, RegistryDep

router = APIRouter()


@router.get("/health")
async def health(registry: RegistryDep) -> JSONResponse:
    """200 while every model can serve: ``ok``, or ``degraded`` when a model runs on fewer
    replicas than it should (Ray backend) but on at least one; 503 once any model is down."""
    models = registry.all()
    status = {m.name: m.engine.status for m in models}
    serving = bool(models) and all(v in ("ok", "degraded") for v in status.values())
    overall = "unavailable" if not serving else "ok"
    if serving and "degraded" in status.values():
        overall = "degraded"
    return JSONResponse({"status": overall, "models": status}, status_code=200 if serving else 503)


@router.get("/metrics")
async def metrics(metrics: MetricsDep, registry: RegistryDep) -> Response:
    registry.served()  # takes up what other front ends of a cluster promoted meanwhile
    metrics.promotions(registry.aliases.items())
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
