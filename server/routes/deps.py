"""Typed FastAPI dependencies: the services built once in the lifespan, off ``app.state``,
and the check every route's path and query parameters pass (``storable_params``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from server.errors import InvalidRequest
from server.guards.auth import tenant_of
from server.metrics import GatewayMetrics
from server.models.registry import Registry
from server.store import ANONYMOUS_KEY, Store, storable
from server.training.online import AlignJobs


def get_registry(request: Request) -> Registry:
    return request.app.state.registry


def get_metrics(request: Request) -> GatewayMetrics:
    return request.app.state.metrics


def get_store(request: Request) -> Store:
    return request.app.state.store


def get_align_jobs(request: Request) -> AlignJobs:
    return request.app.state.align_jobs


def get_tenant(request: Request) -> str | None:
    """The key id whose stored data this caller sees (None: all, the admin key)."""
    return tenant_of(getattr(request.state, "key_id", None) or ANONYMOUS_KEY)


RegistryDep = Annotated[Registry, Depends(get_registry)]
AlignJobsDep = Annotated[AlignJobs, Depends(get_align_jobs)]
StoreDep = Annotated[Store, Depends(get_store)]
MetricsDep = Annotated[GatewayMetrics, Depends(get_metrics)]
TenantDep = Annotated[str | None, Depends(get_tenant)]


def storable_params(request: Request) -> None:
    """Every route's path and query parameters are text the store can keep (they are
    looked up in it: a NUL reached PostgreSQL as a 503): a 400 naming the parameter
    (``metadata[k]`` filters: ``metadata``)."""
    params = [*request.path_params.items(), *request.query_params.multi_items()]
    for name, value in params:
        for text in (name, value):
            found = storable.problem(text) if isinstance(text, str) else None
            if found:
                param = name.split("[", 1)[0]
                raise InvalidRequest(f"`{param}` {found}.", param=param)
