"""Readiness: can this process serve a run now? Database, FHIR, DICOMweb and models, each checked.

Where it sits: ``GET /readyz`` (routes_health). The checks read nothing clinical, so they need no
trace run: the migration revision, the FHIR CapabilityStatement (public by the FHIR spec), a QIDO
search for a study UID that cannot exist (the answer holds no patient), and the model list of a
remote endpoint. A local model that is not loaded yet counts as ready when its files are there.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import BaseModel, Field

from agent.audit.db import current_revision, head_revision
from agent.runtime import AgentRuntime
from agent.sources.http_auth import client_kwargs, http_auth
from agent.sources.http_clients import async_client

#: A syntactically valid UID under the "2.25" (UUID) root that no study carries.
PROBE_STUDY_UID = "2.25.0"
CHECK_TIMEOUT_S = 5.0


class Check(BaseModel):
    """The outcome of one readiness check."""

    ok: bool
    detail: str = Field(description="What was checked, or why it failed (never credentials)")
    ms: float = 0.0


class Readiness(BaseModel):
    """All checks; ``status`` is ready only when every one is ok."""

    status: Literal["ready", "not_ready"]
    checks: dict[str, Check]


async def readiness(runtime: AgentRuntime) -> Readiness:
    """Run every check concurrently, each bounded by its own timeout."""
    names = ("database", "fhir", "dicom", "models")
    results = await asyncio.gather(
        _timed(asyncio.to_thread(_database, runtime)),
        _timed(_fhir(runtime)),
        _timed(_dicom(runtime)),
        _timed(_models(runtime)),
    )
    checks = dict(zip(names, results, strict=True))
    return Readiness(status="ready" if all(c.ok for c in checks.values()) else "not_ready", checks=checks)


async def _timed(check: Any) -> Check:
    started = time.perf_counter()
    try:
        ok, detail = await asyncio.wait_for(check, CHECK_TIMEOUT_S)
    except TimeoutError:
        ok, detail = False, f"no answer within {CHECK_TIMEOUT_S:.0f} s"
    except Exception as exc:  # a probe must report, never raise
        ok, detail = False, f"{type(exc).__name__}"
    return Check(ok=ok, detail=detail, ms=round((time.perf_counter() - started) * 1000, 1))


def _database(runtime: AgentRuntime) -> tuple[bool, str]:
    current, head = current_revision(runtime.engine), head_revision()
    if current == head:
        return True, f"schema at {head}"
    if runtime.settings.db.auto_migrate:
        return True, f"schema at {current}; migrates to {head} on first run"
    return False, f"schema at {current}, code needs {head}: run `medagent db upgrade`"


async def _get(url: str, group: Any, params: dict[str, str] | None = None) -> httpx.Response:
    kwargs = client_kwargs(group)
    headers, auth = http_auth(kwargs["username"], kwargs["password"], kwargs["bearer_token"])
    async with async_client(timeout=min(CHECK_TIMEOUT_S, kwargs["timeout_s"]), headers=headers, auth=auth) as c:
        return await c.get(url, params=params)


async def _fhir(runtime: AgentRuntime) -> tuple[bool, str]:
    fhir = runtime.settings.fhir
    if not fhir.base_url:
        return _folder(fhir.effective_bundle_dir(), "FHIR bundle folder")
    reply = await _get(fhir.base_url.rstrip("/") + "/metadata", fhir)
    return reply.status_code == 200, f"GET /metadata: HTTP {reply.status_code}"


async def _dicom(runtime: AgentRuntime) -> tuple[bool, str]:
    dicom = runtime.settings.dicom
    if not dicom.dicomweb_url:
        return _folder(dicom.effective_dicom_dir(), "DICOM folder")
    reply = await _get(dicom.dicomweb_url.rstrip("/") + "/studies", dicom, {"StudyInstanceUID": PROBE_STUDY_UID})
    return reply.status_code in (200, 204), f"QIDO-RS studies: HTTP {reply.status_code}"


def _folder(path: Path, what: str) -> tuple[bool, str]:
    if path.is_dir():
        return True, f"{what} present"
    return False, f"{what} missing"


async def _models(runtime: AgentRuntime) -> tuple[bool, str]:
    models = runtime.settings.models
    if runtime.models.is_loaded(runtime.settings):
        return True, "loaded"
    if models.backend == "remote" and models.remote_url:
        headers = (
            {"Authorization": f"Bearer {models.remote_api_key.get_secret_value()}"} if models.remote_api_key else {}
        )
        async with async_client(timeout=CHECK_TIMEOUT_S, headers=headers) as client:
            reply = await client.get(models.remote_url.rstrip("/") + "/models")
        if reply.status_code != 200:
            return False, f"GET /models: HTTP {reply.status_code}"
        served = {str(m.get("id")) for m in reply.json().get("data", []) if isinstance(m, dict)}
        if models.remote_model and models.remote_model not in served:
            return False, "the remote endpoint does not serve the configured model"
        return True, "remote endpoint serves the model"
    if models.use_test_models:
        return True, "test models (built on first use)"
    missing = [name for name in (models.medgemma, models.medsiglip) if not _model_files_present(name)]
    if missing:
        return False, f"not loaded, and no local files for: {', '.join(missing)}"
    return True, "not loaded yet; files present (loads on first request)"


def _model_files_present(name: str) -> bool:
    """Return whether a model folder, or the Hub cache's copy of a hub id, is on disk."""
    if Path(name).expanduser().is_dir():
        return True
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json")
    except Exception:
        return False
    return isinstance(found, str)
