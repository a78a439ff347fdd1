"""Run one ``ask`` end to end: open the trace, load models, build sources, run the graph.

This is the single entry point the CLI, the demo and the API share. The trace is opened first
and fails closed: if it cannot be written, nothing is read from any source. Whatever happens
afterwards, the run ends with a ``run_finished`` record (ok, failed, cancelled, or interrupted
when a run in a thread waits for the user's answer) naming the
failing step and error code, and the error is re-raised for the caller to map (exit code, HTTP
status) with ``details["run_id"]`` set.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any

from langgraph.errors import GraphRecursionError
from langgraph.types import Command

from agent.audit.recorder import MODEL_LOAD, TraceRecorder, settings_fingerprint
from agent.domain.answer import AskResult
from agent.domain.plan import Plan
from agent.errors import InternalError, MedagentError, RunCancelledError, StepLimitError
from agent.graph.builder import build_ask_graph
from agent.graph.events import StreamEvent
from agent.graph.state import TURN_DEFAULTS, RunContext
from agent.graph.threads import open_checkpointer
from agent.inference.labels import LABEL_SETS_BY_MODALITY
from agent.runtime import AgentRuntime, ModelCache
from agent.sources.factory import make_dicom_source, make_fhir_source

if TYPE_CHECKING:
    from agent.inference.factory import LoadedModels

__all__ = ["AgentRuntime", "ModelCache", "resume_ask", "run_ask"]

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
    plan: Plan | None = None,
    listener: Callable[[StreamEvent], None] | None = None,
) -> AskResult:
    """Answer a question about a patient, recording every step.

    Args:
        thread_id: continue (or start) a conversation: the graph runs on the configured
            checkpointer, the prompt includes the thread's earlier turns, and ambiguity or a
            restricted record type interrupts with a question (see :func:`resume_ask`) instead of
            failing. The result is then a result with ``thread_id`` and ``interrupt``.
        plan: use this plan (recorded as given; no planner call): benchmarks and evaluation.
        listener: receives stream events (progress, tokens, findings, citations); it may be
            called from a worker thread.

    Raises:
        MedagentError: any failure, after it has been recorded; ``details["run_id"]`` names the run
            (absent only when the trace itself could not be opened).
    """
    graph_input: dict[str, Any] = {**TURN_DEFAULTS, "patient_id": patient_id, "question": question, "plan": plan}
    return await _execute(
        runtime,
        graph_input,
        patient_ref=patient_reference(patient_id),
        request={"question": question, "patient_id": patient_id},
        who={"user_id": user_id, "user_role": user_role, "purpose_of_use": purpose_of_use},
        trigger=trigger,
        thread_id=thread_id,
        as_of=as_of,
        listener=listener,
    )


async def resume_ask(
    runtime: AgentRuntime,
    *,
    thread_id: str,
    resume: Any,
    trigger: str = "resume",
    user_id: str | None = None,
    user_role: str | None = None,
    purpose_of_use: str | None = None,
    as_of: datetime | None = None,
    listener: Callable[[StreamEvent], None] | None = None,
) -> AskResult:
    """Answer the question an interrupted run of a thread asked, and let the run go on.

    The resumed run is a new run in the trace, linked to the interrupted one by ``thread_id``
    (each run has exactly one ``run_finished``: the first ``interrupted``, this one its own
    outcome). ``resume`` is ``{"patient_id": ...}`` for an ambiguous patient, or
    ``{"confirm": bool, "purpose": "..."}`` for restricted record types.
    """
    return await _execute(
        runtime,
        Command(resume=resume),
        patient_ref=None,
        request={"resume": resume},
        who={"user_id": user_id, "user_role": user_role, "purpose_of_use": purpose_of_use},
        trigger=trigger,
        thread_id=thread_id,
        as_of=as_of,
        listener=listener,
    )


async def _execute(runtime: AgentRuntime, graph_input: Any, **run: Any) -> AskResult:
    """Run once a run slot is free (``db.max_concurrent_runs``); the wait is not part of the trace."""
    async with runtime.run_slot():
        return await _execute_now(runtime, graph_input, **run)


async def _execute_now(
    runtime: AgentRuntime,
    graph_input: Any,
    *,
    patient_ref: str | None,
    request: dict[str, Any],
    who: dict[str, str | None],
    trigger: str,
    thread_id: str | None,
    as_of: datetime | None,
    listener: Callable[[StreamEvent], None] | None,
) -> AskResult:
    settings = runtime.settings
    runtime.ensure_schema()
    recorder = runtime.new_recorder()
    recorder.start_run(
        kind="ask",
        trigger=trigger,
        patient_ref=patient_ref,
        settings_fingerprint=settings_fingerprint(settings.masked()),
        thread_id=thread_id,
        request=request,
        **who,
    )
    fhir = make_fhir_source(settings.fhir, recorder)
    dicom = make_dicom_source(settings.dicom, recorder)
    try:
        with ends_failed_run(recorder, "run"):
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
                user_role=who.get("user_role"),
                interactive=thread_id is not None,
                listener=listener,
            )
            config: dict[str, Any] = {"recursion_limit": settings.agent.max_steps}
            if thread_id is None:
                if runtime.graph is None:
                    runtime.graph = build_ask_graph()
                state = await _invoke(runtime.graph, graph_input, context, config)
            else:
                config["configurable"] = {"thread_id": thread_id}
                async with open_checkpointer(settings.agent, settings.audit.content_key) as checkpointer:
                    state = await _invoke(build_ask_graph(checkpointer), graph_input, context, config)
            recorder.current_node = None
            pending = state.get("__interrupt__")
            if pending:
                value = pending[0].value
                recorder.finish_run("interrupted", reason=f"waiting for the user: {value.get('kind', 'question')}")
                return AskResult(
                    run_id=recorder.run_id,
                    status="interrupted",
                    thread_id=str(thread_id),
                    interrupt=value,
                    models=_models(loaded),
                )
            recorder.finish_run("ok")
            result = AskResult(
                run_id=recorder.run_id,
                status="ok",
                answer=state.get("answer", ""),
                sources=state.get("sources", []),
                citations=state.get("citations", []),
                findings=[f.model_dump(mode="json") for f in state.get("findings", [])],
                similar_cases=[c.model_dump(mode="json") for c in state.get("similar_cases", [])],
                models=_models(loaded),
                test_models=loaded.used_test_models,
                warnings=context.warnings + [f"not read (role): {kind}" for kind in state.get("denied_types", [])],
            )
            if thread_id is not None:
                result.thread_id = thread_id
            return result
    finally:
        await fhir.aclose()
        await dicom.aclose()
        if settings.audit.otlp_endpoint and recorder.finished_status is not None:
            await asyncio.to_thread(_send_spans, runtime, recorder.run_id, settings.audit.otlp_endpoint)


async def _invoke(graph: Any, graph_input: Any, context: RunContext, config: dict[str, Any]) -> dict[str, Any]:
    """Run the graph; a run past its step budget fails with :class:`StepLimitError`."""
    try:
        state: dict[str, Any] = await graph.ainvoke(graph_input, config=config, context=context)
    except GraphRecursionError as exc:
        limit = config["recursion_limit"]
        raise StepLimitError(
            f"the run took more than {limit} steps (agent.max_steps)", details={"max_steps": limit}
        ) from exc
    return state


def _models(loaded: LoadedModels) -> dict[str, str]:
    return {"reasoner": loaded.reasoner.identity.model_id, "scorer": loaded.scorer.identity.model_id}


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


@contextmanager
def ends_failed_run(recorder: TraceRecorder, what: str) -> Iterator[None]:
    """End the run when the block raises, then re-raise: as failed, as cancelled, or as an internal error.

    A cancellation (or Ctrl-C) is recorded as ``cancelled``; an exception that is not a
    :class:`~agent.errors.MedagentError` is logged without its message and re-raised as
    :class:`~agent.errors.InternalError` (see :func:`finish_unexpected`).
    """
    try:
        yield
    except MedagentError as exc:
        finish_failed(recorder, exc)
        raise
    except (asyncio.CancelledError, KeyboardInterrupt):
        finish_failed(recorder, RunCancelledError(f"the {what} was cancelled"))
        raise
    except Exception as exc:
        raise finish_unexpected(recorder, exc, what) from exc


def finish_failed(recorder: TraceRecorder, error: MedagentError) -> None:
    """End the run as failed (or cancelled) with the error, once, and name the run in the error."""
    error.details.setdefault("run_id", recorder.run_id)
    if recorder.finished_status is None:
        recorder.finish_run("cancelled" if isinstance(error, RunCancelledError) else "failed", error=error)


def finish_unexpected(recorder: TraceRecorder, exc: Exception, what: str) -> InternalError:
    """Log an unexpected exception (type and place only), end the run failed, and return the error to raise.

    An exception's message can quote clinical data, and logs hold no PHI.
    """
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    log.error(
        "internal error in %s %s: %s at %s",
        what,
        recorder.run_id,
        type(exc).__name__,
        f"{where.filename}:{where.lineno}" if where else "?",
    )
    error = InternalError(f"internal error ({type(exc).__name__}); see the service log")
    finish_failed(recorder, error)
    return error


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
