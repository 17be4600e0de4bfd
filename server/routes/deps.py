"""Typed FastAPI dependencies: the services built once in the lifespan, off ``app.state``."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from typing import Annotated

from fastapi import Depends, Request

from server.errors import AuthenticationFailed
from server.metrics import GatewayMetrics
from server.registry import Registry
from server.store import Store
from server.training.online import AlignJobs


def get_registry(request: Request) -> Registry:
    return request.app.state.registry


def get_metrics(request: Request) -> GatewayMetrics:
    return request.app.state.metrics


def get_store(request: Request) -> Store:
    return request.app.state.store


def get_align_jobs(request: Request) -> AlignJobs:
    return request.app.state.align_jobs


RegistryDep = Annotated[Registry, Depends(get_registry)]
AlignJobsDep = Annotated[AlignJobs, Depends(get_align_jobs)]
StoreDep = Annotated[Store, Depends(get_store)]
MetricsDep = Annotated[GatewayMetrics, Depends(get_metrics)]


def require_admin(request: Request) -> None:
    """Admin routes: the bearer key ``ALIGNGATE_ADMIN_KEY`` when one is set (compared in
    constant time), else loopback clients only."""
    key = request.app.state.settings.admin_key
    if key is None:
        client = request.client.host if request.client else ""
        if not _is_loopback(client):
            raise AuthenticationFailed(
                "Admin routes need ALIGNGATE_ADMIN_KEY set on the server when reached from "
                "another host."
            )
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        hashlib.sha256(given.encode()).digest(), hashlib.sha256(key.encode()).digest()
    ):
        raise AuthenticationFailed("A valid admin key is required (Authorization: Bearer …).")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


AdminDep = Depends(require_admin)
