"""Admin routes: serve and unload LoRA adapters, run online-alignment iterations."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from server.align_service import start_align
from server.errors import NotFound
from server.protocol import ERROR_RESPONSES, AdapterLoadRequest, AlignRequest, ModelCard
from server.routes.deps import AdminDep, AlignJobsDep, RegistryDep, StoreDep
from server.routes.openai import model_card

router = APIRouter(prefix="/admin", dependencies=[AdminDep], responses=ERROR_RESPONSES)


@router.post("/adapters", status_code=201, response_model=ModelCard)
async def load_adapter(body: AdapterLoadRequest, registry: RegistryDep) -> JSONResponse:
    served = await registry.load_adapter(body.name, body.path or body.name, base=body.base)
    return JSONResponse(model_card(served).model_dump(), status_code=201)


@router.delete("/adapters/{name:path}")
async def unload_adapter(name: str, registry: RegistryDep) -> dict[str, object]:
    await registry.unload_adapter(name)
    return {"id": name, "object": "model", "deleted": True}


@router.post("/align", status_code=202)
async def start_align_job(
    body: AlignRequest, registry: RegistryDep, store: StoreDep, jobs: AlignJobsDep
) -> JSONResponse:
    """Start one online iteration in the background; poll ``GET /admin/align/{job}``."""
    job = start_align(body, registry, store, jobs)
    return JSONResponse(job.public(), status_code=202)


@router.get("/align/{job_id}")
async def align_job_status(job_id: str, jobs: AlignJobsDep) -> dict[str, object]:
    job = jobs.get(job_id)
    if job is None:
        raise NotFound(f"No align job `{job_id}`.", param="job_id")
    return job.public()
