"""Liveness and readiness: is the process up, and can it reach what a run needs."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from agent import __version__
from agent.service.deps import RuntimeDep
from agent.service.readiness import Readiness, readiness

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def health() -> dict[str, str]:
    """Report that the process is up (liveness; checks nothing else)."""
    return {"status": "ok", "version": __version__}


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness, "description": "Not ready"}})
async def ready(runtime: RuntimeDep) -> JSONResponse:
    """Check the database, FHIR, DICOMweb and models; 200 when all are ok, else 503 with each check's detail."""
    report = await readiness(runtime)
    return JSONResponse(report.model_dump(mode="json"), status_code=200 if report.status == "ready" else 503)
