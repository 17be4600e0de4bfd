"""Arena routes: ``POST /v1/arena/battles``, ``GET /v1/arena/battles/{id}``,
``POST /v1/arena/battles/{id}/vote`` and ``GET /v1/leaderboard``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response

from server.evaluation import arena
from server.protocol import (
    ERROR_RESPONSES,
    SOURCE_PATTERN,
    BattlePublic,
    BattleRequest,
    ErrorResponse,
    Leaderboard,
    Text,
    VoteRequest,
)
from server.routes.deps import RegistryDep, StoreDep, TenantDep
from server.serving.generation import ClientDisconnected

# Ids and the anchor are text without NUL (PostgreSQL cannot compare one): a 400, not a 503.
BattleId = Annotated[Text, Path(max_length=128)]

router = APIRouter(prefix="/v1", responses={**ERROR_RESPONSES, 409: {"model": ErrorResponse}})


@router.post("/arena/battles", response_model=BattlePublic)
async def start_battle(
    body: BattleRequest, request: Request, registry: RegistryDep, store: StoreDep
) -> BattlePublic | Response:
    """Two served models (drawn at random, or the two named) answer the conversation; the
    answers come back as A and B with the models' names hidden until the vote."""
    try:
        return await arena.start_battle(body, request, registry, store)
    except ClientDisconnected:
        return Response(status_code=499)


@router.get("/arena/battles/{battle_id}")
async def get_battle(battle_id: BattleId, store: StoreDep, tenant: TenantDep) -> BattlePublic:
    return await arena.get_battle(battle_id, store, tenant)


@router.post("/arena/battles/{battle_id}/vote")
async def vote(
    battle_id: str, body: VoteRequest, request: Request, store: StoreDep
) -> BattlePublic:
    """The battle's one vote (a second: 409); the answer names the two models."""
    return await arena.vote(battle_id, body, request, store)


@router.get("/leaderboard")
async def get_leaderboard(
    store: StoreDep,
    tenant: TenantDep,
    source: Annotated[str | None, Query(pattern=SOURCE_PATTERN, max_length=128)] = None,
    anchor: Annotated[Text | None, Query(min_length=1, max_length=256)] = None,
) -> Leaderboard:
    """Bradley–Terry ratings (base 10, scale 400, the anchor at 1000, ties half to each
    side) with 95 % bootstrap intervals, battle counts and the pairwise win-rate matrix."""
    return await arena.leaderboard(store, owner=tenant, source=source, anchor=anchor)
