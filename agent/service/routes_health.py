"""Liveness and readiness: is the process up, and can it reach what a run needs."""

from __future__ import annotations

from fastapi import APIRouter

from agent import __version__

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def health() -> dict[str, str]:
    """Report that the process is up."""
    return {"status": "ok", "version": __version__}
