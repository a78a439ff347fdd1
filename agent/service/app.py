"""FastAPI app: ``POST /v1/ask``, ``GET /v1/runs``, ``GET /v1/runs/{id}``; OpenAPI at /docs.

Built by :func:`create_app` from settings; the process's :class:`~agent.runner.AgentRuntime`
(trace engine, loaded models) lives on ``app.state`` and reaches handlers as a dependency.
Errors are problem+json with a safe message and the run id, so a failed run can be looked up.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse

from agent import __version__
from agent.audit.export_fhir import export_fhir
from agent.audit.export_json import export_json
from agent.audit.export_otel import export_otel
from agent.audit.keys import verifiers_for
from agent.audit.reader import RunFilter, RunSummary, RunTrace, list_runs, load_run
from agent.audit.replay import ReplayResult, replay
from agent.audit.verify import VerifyReport, verify_trace
from agent.config import Settings
from agent.domain.answer import AskResult
from agent.errors import MedagentError
from agent.jobs.lifecycle import run_job_queue
from agent.runner import run_ask
from agent.runtime import AgentRuntime
from agent.service import (
    routes_cds,
    routes_health,
    routes_notifications,
    routes_records,
    routes_summaries,
    routes_threads,
    routes_ui,
)
from agent.service.auth import PrincipalDep, require, require_content_access
from agent.service.content_reads import record_content_read
from agent.service.deps import ERROR_RESPONSES, PROBLEM_JSON, RuntimeDep
from agent.service.middleware import install_middleware
from agent.service.schemas import AskRequest, Problem


def create_app(settings: Settings, runtime: AgentRuntime | None = None) -> FastAPI:
    """Build the app for these settings (tests pass their own runtime)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with run_job_queue(app.state.runtime) as queue:
            app.state.job_queue = queue
            yield
            app.state.job_queue = None

    app = FastAPI(
        lifespan=lifespan,
        title="medagent",
        version=__version__,
        description=(
            "Clinical decision support over a patient's FHIR R4 record and DICOM imaging, with "
            "MedSigLIP findings, MedGemma answers and a verifiable trace of every step. Not a diagnostic device."
        ),
    )
    app.state.runtime = runtime or AgentRuntime(settings=settings)
    app.state.job_queue = None
    install_middleware(app, settings)

    @app.exception_handler(MedagentError)
    async def _medagent_error(_: Request, exc: MedagentError) -> JSONResponse:
        problem = Problem(
            title=exc.code.replace("_", " "),
            status=exc.http_status,
            detail=exc.message,
            code=exc.code,
            run_id=exc.details.get("run_id"),
        )
        return JSONResponse(problem.model_dump(), status_code=exc.http_status, media_type=PROBLEM_JSON)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        # where and what, never the input: pydantic's messages do not quote the value (it may be PHI)
        fields = [
            f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', 'invalid')}" for err in exc.errors()
        ]
        problem = Problem(
            title="invalid request",
            status=422,
            detail=f"invalid fields: {'; '.join(fields)}"[:2000],
            code="invalid_request",
        )
        return JSONResponse(problem.model_dump(), status_code=422, media_type=PROBLEM_JSON)

    @app.post("/v1/ask", response_model=AskResult, responses=ERROR_RESPONSES, tags=["ask"])
    async def ask(body: AskRequest, runtime: RuntimeDep, principal: PrincipalDep) -> AskResult:
        """Answer a question about a patient; the answer's citations are checked against the sources.

        Needs the clinician role. The caller and their purpose of use (``X-Purpose-Of-Use``,
        default TREAT) are recorded in the run's trace.
        """
        require(principal, "clinician")
        return await run_ask(
            runtime,
            patient_id=body.patient_id,
            question=body.question,
            trigger="api",
            as_of=body.as_of,
            user_id=principal.user,
            user_role="clinician",
            purpose_of_use=principal.purpose_of_use or "TREAT",
        )

    @app.get("/v1/runs", response_model=list[RunSummary], tags=["audit"])
    async def runs(
        runtime: RuntimeDep,
        principal: PrincipalDep,
        limit: int = 50,
        patient: str | None = None,
        user: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        status: str | None = None,
        trigger: str | None = None,
    ) -> list[RunSummary]:
        """List recorded runs, newest first, filtered by patient id, user, start time, status or trigger (auditor)."""
        require(principal, "auditor", "admin")
        runtime.ensure_schema()
        filters = RunFilter(
            patient_ref=f"Patient/{patient}" if patient else None,
            user_id=user,
            since=since,
            until=until,
            status=status,
            trigger=trigger,
        )
        return list_runs(runtime.engine, limit=min(max(limit, 1), 500), filters=filters)

    @app.get("/v1/runs/{run_id}", response_model=RunTrace, responses=ERROR_RESPONSES, tags=["audit"])
    async def run(run_id: str, runtime: RuntimeDep, principal: PrincipalDep, content: bool = False) -> RunTrace:
        """Return a run's trace: every node, FHIR request, DICOM retrieval and model call, in order (auditor).

        Metadata only by default; ``content=true`` adds prompts, outputs and answers (clinician too).
        """
        require(principal, "auditor", "admin")
        require_content_access(principal, content)
        runtime.ensure_schema()
        trace = load_run(runtime.engine, run_id, include_content=content, cipher=runtime.cipher)
        if content:
            await record_content_read(
                runtime, principal, run_id=run_id, patient_ref=trace.run.patient_ref, what="trace"
            )
        return trace

    @app.get("/v1/runs/{run_id}/verify", response_model=VerifyReport, responses=ERROR_RESPONSES, tags=["audit"])
    async def verify_run(run_id: str, runtime: RuntimeDep, principal: PrincipalDep) -> VerifyReport:
        """Verify one run's records, content, Merkle root and the checkpoints over it (auditor)."""
        require(principal, "auditor", "admin")
        runtime.ensure_schema()
        return verify_trace(runtime.engine, verifiers=verifiers_for(runtime.signer), run_id=run_id)

    @app.post("/v1/audit/verify", response_model=VerifyReport, tags=["audit"])
    async def verify_all(runtime: RuntimeDep, principal: PrincipalDep) -> VerifyReport:
        """Verify the whole trace: hash chain, content, run rows, Merkle roots and signed checkpoints (auditor)."""
        require(principal, "auditor", "admin")
        runtime.ensure_schema()
        return await asyncio.to_thread(verify_trace, runtime.engine, verifiers=verifiers_for(runtime.signer))

    @app.get("/v1/runs/{run_id}/export", responses=ERROR_RESPONSES, tags=["audit"])
    async def export(
        run_id: str,
        runtime: RuntimeDep,
        principal: PrincipalDep,
        format: Literal["fhir", "otel", "json"] = "json",
        content: bool = False,
    ) -> dict[str, Any]:
        """Export a run as a FHIR Bundle (BALP AuditEvents + Provenance), OTLP JSON spans, or plain JSON (auditor)."""
        require(principal, "auditor", "admin")
        require_content_access(principal, content)
        runtime.ensure_schema()
        trace = load_run(runtime.engine, run_id, include_content=content, cipher=runtime.cipher)
        if content:
            patient = trace.run.patient_ref
            await record_content_read(runtime, principal, run_id=run_id, patient_ref=patient, what=f"export:{format}")
        if format == "fhir":
            return export_fhir(trace)
        if format == "otel":
            return export_otel(trace, include_content=content)
        return export_json(trace)

    @app.get("/v1/runs/{run_id}/replay", response_model=ReplayResult, responses=ERROR_RESPONSES, tags=["audit"])
    async def replay_run(run_id: str, runtime: RuntimeDep, principal: PrincipalDep) -> ReplayResult:
        """Rebuild the run's answer, sources, citations and timeline from the trace alone (auditor and clinician)."""
        require(principal, "auditor", "admin")
        require_content_access(principal, True)  # the replayed answer is clinical content
        runtime.ensure_schema()
        trace = load_run(runtime.engine, run_id, cipher=runtime.cipher)
        await record_content_read(runtime, principal, run_id=run_id, patient_ref=trace.run.patient_ref, what="replay")
        return replay(trace)

    app.openapi = lambda: _openapi_with_problem_json(app)  # type: ignore[method-assign]
    routers = (routes_health, routes_threads, routes_records, routes_summaries, routes_notifications, routes_cds)
    for module in (*routers, routes_ui):
        app.include_router(module.router)
    return app


#: Routes that answer without credentials (probes, the UI's static files).
UNAUTHENTICATED_PATHS = frozenset({"/healthz", "/readyz", "/", "/ui/", "/ui/static/{path}"})


def _openapi_with_problem_json(app: FastAPI) -> dict[str, Any]:
    """Return the spec with every error response documented as the problem+json the handlers send.

    FastAPI documents extra responses as ``application/json`` and 422s as its own validation schema;
    the app answers errors as RFC 9457 ``application/problem+json`` with :class:`Problem`.
    """
    if app.openapi_schema is None:
        spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        problem = {"$ref": "#/components/schemas/Problem"}
        spec.setdefault("components", {}).setdefault("schemas", {}).setdefault(
            "Problem", Problem.model_json_schema(ref_template="#/components/schemas/{model}")
        )
        for route, path in spec.get("paths", {}).items():
            for operation in path.values():
                responses = operation.setdefault("responses", {})
                if route not in UNAUTHENTICATED_PATHS:  # auth and rate limits apply to every other route
                    for status in ("401", "403", "422", "429"):
                        responses.setdefault(status, {"description": ERROR_RESPONSES[int(status)]["description"]})
                for status, response in responses.items():
                    schema = response.get("content", {}).get("application/json", {}).get("schema")
                    if status == "422" or schema == problem or (status[0] in "45" and "content" not in response):
                        response["content"] = {PROBLEM_JSON: {"schema": problem}}
        for unused in ("HTTPValidationError", "ValidationError"):
            spec["components"]["schemas"].pop(unused, None)
        app.openapi_schema = spec
    return app.openapi_schema
