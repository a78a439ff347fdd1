"""Run one ``ask`` end to end: open the trace, load models, build sources, run the graph.

This is the single entry point the CLI, the demo and the API share. The trace is opened first
and fails closed: if it cannot be written, nothing is read from any source. Whatever happens
afterwards, the run ends with a ``run_finished`` record (ok, failed or cancelled) naming the
failing step and error code, and the error is re-raised for the caller to map (exit code, HTTP
status) with ``details["run_id"]`` set.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from datetime import datetime
from typing import TYPE_CHECKING

from agent.audit.recorder import MODEL_LOAD, TraceRecorder, settings_fingerprint
from agent.domain.answer import AskResult
from agent.errors import InternalError, MedagentError, RunCancelledError
from agent.graph.builder import build_ask_graph
from agent.graph.state import RunContext
from agent.inference.labels import LABEL_SETS_BY_MODALITY
from agent.runtime import AgentRuntime, ModelCache
from agent.sources.factory import make_dicom_source, make_fhir_source

if TYPE_CHECKING:
    from agent.inference.factory import LoadedModels

__all__ = ["AgentRuntime", "ModelCache", "run_ask"]

log = logging.getLogger(__name__)


async def run_ask(
    runtime: AgentRuntime,
    *,
    patient_id: str,
    question: str,
    trigger: str = "cli",
    user_id: str | None = None,
    user_role: str | None = None,
    purpose_of_use: str | None = None,
    thread_id: str | None = None,
    as_of: datetime | None = None,
) -> AskResult:
    """Answer a question about a patient, recording every step.

    Raises:
        MedagentError: any failure, after it has been recorded; ``details["run_id"]`` names the run
            (absent only when the trace itself could not be opened).
    """
    settings = runtime.settings
    runtime.ensure_schema()
    recorder = runtime.new_recorder()
    recorder.start_run(
        kind="ask",
        trigger=trigger,
        patient_ref=patient_reference(patient_id),
        settings_fingerprint=settings_fingerprint(settings.masked()),
        user_id=user_id,
        user_role=user_role,
        purpose_of_use=purpose_of_use,
        thread_id=thread_id,
        request={"question": question, "patient_id": patient_id},
    )
    fhir = make_fhir_source(settings.fhir, recorder)
    dicom = make_dicom_source(settings.dicom, recorder)
    try:
        loaded = _load_models(runtime, recorder)
        with recorder.node("load_imaging_extras"):
            extras = runtime.imaging_extras(settings)
        context = RunContext(
            fhir=fhir,
            dicom=dicom,
            scorer=loaded.scorer,
            reasoner=loaded.reasoner,
            recorder=recorder,
            settings=settings,
            label_sets=LABEL_SETS_BY_MODALITY,
            as_of=as_of,
            capabilities_cache=runtime.fhir_capabilities,
            classifier=extras.classifier,
            image_index=extras.index,
            image_index_problem=extras.index_problem,
        )
        if runtime.graph is None:
            runtime.graph = build_ask_graph()
        state = await runtime.graph.ainvoke({"patient_id": patient_id, "question": question}, context=context)
        recorder.current_node = None
        recorder.finish_run("ok")
        return AskResult(
            run_id=recorder.run_id,
            status="ok",
            answer=state.get("answer", ""),
            sources=state.get("sources", []),
            citations=state.get("citations", []),
            findings=[f.model_dump(mode="json") for f in state.get("findings", [])],
            similar_cases=[c.model_dump(mode="json") for c in state.get("similar_cases", [])],
            models={"reasoner": loaded.reasoner.identity.model_id, "scorer": loaded.scorer.identity.model_id},
            test_models=loaded.used_test_models,
            warnings=[f"image skipped: {e['message']}" for e in state.get("image_errors", [])],
        )
    except MedagentError as exc:
        _finish_failed(recorder, exc)
        raise
    except (asyncio.CancelledError, KeyboardInterrupt):
        _finish_failed(recorder, RunCancelledError("the run was cancelled"))
        raise
    except Exception as exc:
        # Type and place only: an exception's message can quote clinical data, and logs hold no PHI.
        where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        log.error(
            "internal error in run %s: %s at %s",
            recorder.run_id,
            type(exc).__name__,
            f"{where.filename}:{where.lineno}" if where else "?",
        )
        error = InternalError(f"internal error ({type(exc).__name__}); see the service log")
        _finish_failed(recorder, error)
        raise error from exc
    finally:
        await fhir.aclose()
        await dicom.aclose()
        if settings.audit.otlp_endpoint and recorder.finished_status is not None:
            await asyncio.to_thread(_send_spans, runtime, recorder.run_id, settings.audit.otlp_endpoint)


def _send_spans(runtime: AgentRuntime, run_id: str, endpoint: str) -> None:
    """Send the finished run's spans (metadata only) to the OTLP collector; a failure is logged, not raised.

    The trace in the database is the record; the collector is a copy for observability, so its
    outage must not fail a clinician's request.
    """
    from agent.audit.export_otel import export_otel, send_otlp
    from agent.audit.reader import load_run

    try:
        send_otlp(export_otel(load_run(runtime.engine, run_id, include_content=False)), endpoint)
    except MedagentError as exc:
        log.warning("OTLP export of run %s failed: %s", run_id, exc.code)


def patient_reference(requested: str) -> str:
    """Return the run's patient reference: ``Patient/<id>``, or the search for an identifier request."""
    if requested.startswith("identifier="):
        return f"Patient?{requested}"
    return f"Patient/{requested}"


def _finish_failed(recorder: TraceRecorder, error: MedagentError) -> None:
    error.details.setdefault("run_id", recorder.run_id)
    if recorder.finished_status is None:
        recorder.finish_run("cancelled" if isinstance(error, RunCancelledError) else "failed", error=error)


def _load_models(runtime: AgentRuntime, recorder: TraceRecorder) -> LoadedModels:
    """Load (or reuse) the models inside a traced step so a missing checkpoint is recorded."""
    with recorder.node("load_models"):
        started = time.perf_counter()
        loaded, fresh = runtime.models.get(runtime.settings)
        elapsed = (time.perf_counter() - started) * 1000
        for role, model in (("scorer", loaded.scorer), ("reasoner", loaded.reasoner)):
            recorder.event(
                MODEL_LOAD,
                role,
                status="ok",
                duration_ms=elapsed if fresh else 0.0,
                meta={**model.identity.model_dump(), "cached": not fresh},
            )
        return loaded
