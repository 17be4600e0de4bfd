"""The web UI: ``/ui`` (chat and judge), ``/ui/arena`` (blind battles), ``/ui/leaderboard``
and ``/ui/feedback`` (overview and exports).

Static files shipped in the package (``server/ui/static``), no build step, no CDN. The pages
hold no data: everything they show comes from the API with the user's own key. A strict
Content-Security-Policy (scripts and styles from this origin only, no inline code) backs the
pages' rule of putting model and user text into the DOM as text only.
"""

from __future__ import annotations

import functools
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent.parent / "ui" / "static"
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' blob: data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}

router = APIRouter(prefix="/ui", include_in_schema=False)


@functools.cache
def _render(page: str) -> str:
    """``<page>.html`` with the pages' shared header (``header.html``) in place."""
    current = {f"{name}_current": "" for name in ("chat", "arena", "leaderboard", "feedback")}
    current[f"{page}_current"] = ' aria-current="page"'
    header = (STATIC / "header.html").read_text().format(**current)
    return (STATIC / f"{page}.html").read_text().replace("  <!-- header -->\n", header)


def _page(page: str) -> HTMLResponse:
    return HTMLResponse(_render(page), headers=SECURITY_HEADERS)


@router.get("")
async def chat_page() -> HTMLResponse:
    return _page("chat")


@router.get("/")
async def chat_page_slash() -> RedirectResponse:
    return RedirectResponse("/ui")


@router.get("/arena")
async def arena_page() -> HTMLResponse:
    return _page("arena")


@router.get("/leaderboard")
async def leaderboard_page() -> HTMLResponse:
    return _page("leaderboard")


@router.get("/feedback")
async def feedback_page() -> HTMLResponse:
    return _page("feedback")


def static_files() -> StaticFiles:
    return StaticFiles(directory=STATIC)
