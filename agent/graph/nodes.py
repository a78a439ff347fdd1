"""The ask graph's nodes: resolve patient -> plan -> access check -> fetch -> findings -> reason -> cite.

Each node is wrapped by :func:`traced` so its start, end, duration and failure land in the trace
(and, when someone streams the run, as progress events); data accesses inside it are recorded by
the sources through the run's observer.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Literal, TypeVar

from langgraph.errors import GraphBubbleUp
from langgraph.runtime import Runtime
from langgraph.types import interrupt

from agent.audit.recorder import MODEL_CALL, NOTE
from agent.domain.imaging import PreparedImage
from agent.domain.plan import Plan
from agent.errors import AmbiguousPatientError, MedagentError, ModelOutputError, PatientNotFoundError
from agent.graph import planning
from agent.graph.citations import check_citations
from agent.graph.events import StreamEvent
from agent.graph.image_analysis import (
    ImageAnalysis,
    classifier_findings,
    embed_once,
    similar_cases,
    zero_shot_findings,
)
from agent.graph.imaging_fetch import (
    RUN_FAILURES,
    VOLUME_MODALITIES,
    choose_studies,
    fetch_study_images,
    study_instance_uid,
)
from agent.graph.limits import call_with_timeout
from agent.graph.prompts import SYSTEM_PROMPT, build_user_prompt, format_earlier
from agent.graph.record_fetch import fetch_records, of_types, url_attachment_texts
from agent.graph.state import AskState, RunContext
from agent.history.context import build_context
from agent.inference.protocols import GenerationRequest, GenerationResult, ModelIdentity
from agent.sources.patient_resolution import PatientQuery
from agent.sources.patient_resolution import resolve_patient as find_the_patient

__all__ = ["study_instance_uid"]  # re-exported: the index ingest names studies the same way

#: Answers a user may give to "which patient?" before the run fails.
MAX_CHOICES = 3

NodeFn = Callable[[AskState, Runtime[RunContext]], Awaitable[dict[str, Any]]]
T = TypeVar("T")


def traced(name: str) -> Callable[[NodeFn], NodeFn]:
    """Record the node in the run's trace (start, end, duration, error) and stream its progress.

    An interrupt (a question for the user) is not a failure: the node is recorded as finished
    with ``outputs.interrupted`` and the interrupt goes on up to LangGraph.
    """

    def wrap(fn: NodeFn) -> NodeFn:
        @functools.wraps(fn)
        async def node(state: AskState, runtime: Runtime[RunContext]) -> dict[str, Any]:
            ctx = runtime.context
            ctx.emit(StreamEvent(type="progress", node=name, status="started"))
            paused: GraphBubbleUp | None = None
            update: dict[str, Any] = {}
            try:
                with ctx.recorder.node(name, inputs=sorted(state)) as record:
                    try:
                        update = await fn(state, runtime)
                        record["outputs"] = describe_update(update)
                    except GraphBubbleUp as exc:
                        paused = exc
                        record["outputs"] = {"interrupted": True}
            except Exception:
                ctx.emit(StreamEvent(type="progress", node=name, status="failed"))
                raise
            if paused is not None:
                ctx.emit(StreamEvent(type="progress", node=name, status="interrupted"))
                raise paused
            ctx.emit(StreamEvent(type="progress", node=name, status="finished"))
            return update

        return node

    return wrap


def describe_update(update: dict[str, Any]) -> dict[str, Any]:
    """Describe a node's state update by reference: resource ids, counts and sizes, never clinical text."""
    described: dict[str, Any] = {}
    for key, value in update.items():
        if isinstance(value, dict) and value.get("resourceType") and value.get("id"):
            described[key] = f"{value['resourceType']}/{value['id']}"
        elif isinstance(value, list):
            described[key] = {"count": len(value)}
        elif isinstance(value, str):
            described[key] = {"chars": len(value)}
        elif isinstance(value, Plan):
            described[key] = value.model_dump(mode="json", exclude={"codes"})
        elif value is None or isinstance(value, bool | int):
            described[key] = value
        else:
            described[key] = type(value).__name__
    return described


# -- resolve ------------------------------------------------------------------------------------
@traced("resolve_patient")
async def resolve_patient(state: AskState, runtime: Runtime[RunContext]) -> dict[str, Any]:
    """Find the one Patient the request names (logical id or ``identifier=SYSTEM|VALUE``); never guess.

    Several matches fail the run, unless a person can answer (a thread): then the graph asks which
    patient and resumes with ``{"patient_id": ...}``, which must be one of the candidates.
    """
    ctx = runtime.context
    query = PatientQuery.parse(state["patient_id"])
    try:
        patient = await find_the_patient(ctx.fhir, query)
    except AmbiguousPatientError as exc:
        if not ctx.interactive:
            raise
        candidates = exc.details.get("candidates", [])
        ctx.recorder.event(
            NOTE,
            "interrupt",
            meta={"reason": "ambiguous_patient", "candidates": len(candidates)},
            content={"candidates": candidates},
        )
        ids = {candidate.get("id") for candidate in candidates}
        question = "Which patient?"
        for _ in range(MAX_CHOICES):
            choice = interrupt({"kind": "ambiguous_patient", "question": question, "candidates": candidates})
            chosen = choice.get("patient_id") if isinstance(choice, dict) else None
            if chosen in ids:
                break
            # asked again (each interrupt of a node is answered in turn when it re-runs)
            question = "That is not one of the candidates. Which patient?"
        else:
            raise PatientNotFoundError(
                f"no candidate was chosen in {MAX_CHOICES} answers", details={"chosen": chosen}
            ) from exc
        patient = await find_the_patient(ctx.fhir, PatientQuery.parse(str(chosen)))
        ctx.recorder.event(NOTE, "resumed", meta={"reason": "ambiguous_patient", "patient": f"Patient/{chosen}"})
        return {"patient": patient, "patient_id": str(chosen)}
    return {"patient": patient}


# -- plan ---------------------------------------------------------------------------------------
@traced("plan")
async def plan(state: AskState, runtime: Runtime[RunContext]) -> dict[str, Any]:
    """Decide which record types, codes and studies the question needs (see :mod:`agent.graph.planning`).

    A plan given by the caller is recorded and used as is (no model call). Otherwise MedGemma
    plans from a manifest of the record (when ``agent.planner`` is ``model``), with one repair
    attempt; every invalid output is recorded, never fatal; the fallback is the question's terms.
    """
    ctx = runtime.context
    types = list(ctx.history_types)
    given = state.get("plan")
    update: dict[str, Any] = {}
    if given is not None:
        chosen = given
    elif _modes(ctx).planner == "model":
        try:
            fetched = await fetch_records(ctx, state["patient"]["id"], types)
        except MedagentError as exc:
            # No manifest to plan from: plan from the question; the fetch step tries again and warns.
            ctx.recorder.event(NOTE, "manifest_unavailable", status="failed", meta={"error": exc.metadata_dict()})
            chosen = planning.terms_plan(state["question"], types)
        else:
            manifest = planning.build_manifest(fetched.resources, types)
            chosen = await _model_plan(ctx, state["question"], manifest, types)
            update["prefetched"] = fetched.resources
    else:
        chosen = planning.terms_plan(state["question"], types)
    modes = _modes(ctx)._asdict()
    ctx.recorder.event(
        NOTE, "plan_chosen", meta={"source": chosen.source, "plan": chosen.model_dump(mode="json"), "modes": modes}
    )
    update["plan"] = chosen
    return update


def _modes(ctx: RunContext) -> planning.PlanningModes:
    """Return the run's planning modes (``auto`` decided by whether the reasoner is a test model)."""
    identity = getattr(ctx.reasoner, "identity", None)
    return planning.planning_modes(ctx.settings.agent, test_model=bool(getattr(identity, "test_model", False)))


async def _model_plan(ctx: RunContext, question: str, manifest: dict[str, Any], types: list[str]) -> Plan:
    """Ask the reasoner for a plan, repair once, then fall back to the question's terms."""
    system = planning.plan_system_prompt(types)
    user = planning.plan_user_prompt(question, manifest)
    for attempt, source in enumerate(("model", "repair")):
        result = await _generate(ctx, "medgemma.plan", system, user, max_new_tokens=256, attempt=attempt)
        try:
            return planning.parse_plan(result.text, types, source)
        except ModelOutputError as exc:
            ctx.recorder.event(NOTE, "plan_invalid", status="failed", meta={"attempt": attempt, "error": exc.message})
            user = planning.repair_user_prompt(question, manifest, result.text, exc.message)
    return planning.terms_plan(question, types)


@traced("access_check")
async def access_check(state: AskState, runtime: Runtime[RunContext]) -> dict[str, Any]:
    """Keep the plan within what the asker's role may read (``agent.restricted_types``).

    In a thread the graph asks first (resume with ``{"confirm": true, "purpose": "..."}`` to read
    them anyway, recorded with the purpose); otherwise, or when declined, those types are dropped.
    """
    ctx = runtime.context
    chosen = state["plan"]
    assert chosen is not None
    restricted = set(ctx.settings.agent.restricted_types.get(ctx.user_role or "", []))
    wanted = [kind for kind in chosen.resource_types if kind in restricted]
    if not wanted:
        return {"denied_types": []}
    if ctx.interactive:
        ctx.recorder.event(NOTE, "interrupt", meta={"reason": "restricted_types", "types": wanted})
        answer = interrupt(
            {
                "kind": "restricted_types",
                "question": f"Your role ({ctx.user_role}) may not read {', '.join(wanted)}. "
                "Confirm with a purpose of use to read them, or decline.",
                "types": wanted,
            }
        )
        if isinstance(answer, dict) and answer.get("confirm") and str(answer.get("purpose") or "").strip():
            ctx.recorder.event(
                NOTE, "access_confirmed", meta={"types": wanted, "purpose": str(answer["purpose"])[:200]}
            )
            return {"denied_types": []}
    ctx.recorder.event(NOTE, "access_denied", meta={"role": ctx.user_role, "types": wanted})
    return {"denied_types": wanted}


# -- fetch --------------------------------------------------------------------------------------
@traced("fetch_history")
async def fetch(state: AskState, runtime: Runtime[RunContext]) -> dict[str, Any]:
    """Fetch the plan's record types and the study's images at the same time, then build the cited context.

    The node keeps its historical name (``fetch_history``): it fetches the patient's history, records
    and imaging. The two halves are traced as their own steps (``fetch_records``, ``fetch_images`` notes with
    ``phase`` started/finished, which overlap); if one fails the other is cancelled and the run
    fails naming it as the failing step.
    """
    ctx = runtime.context
    chosen = state["plan"]
    assert chosen is not None
    patient = state["patient"]
    denied = set(state.get("denied_types") or [])
    all_types = list(ctx.history_types)
    modes = _modes(ctx)
    scope = all_types if modes.fetch == "all" else [t for t in all_types if t in chosen.resource_types]
    wants_images = (modes.images == "always" or chosen.needs_images) and "ImagingStudy" not in denied
    record_types = [t for t in scope if t not in denied and not (wants_images and t == "ImagingStudy")]
    prefetched = state.get("prefetched")
    steps: dict[str, Callable[[], Coroutine[Any, Any, Any]]] = {
        "fetch_records": lambda: _history_step(ctx, patient["id"], record_types, prefetched, all_types)
    }
    if wants_images:
        steps["fetch_images"] = lambda: _imaging_step(ctx, patient["id"], chosen, prefetched, all_types)
    results = await _run_parallel(ctx, steps)
    resources, missing = results["fetch_records"]
    update: dict[str, Any] = {"image_errors": [], "imaging_study": None, "prior_study": None}
    if "fetch_images" in results:
        studies, current, prior, errors, imaging_missing = results["fetch_images"]
        missing = {**missing, **imaging_missing}
        resources = resources + [s for s in studies if s not in resources]
        update.update({"imaging_study": current, "prior_study": prior, "image_errors": errors})
    elif "ImagingStudy" in record_types:
        studies = [r for r in resources if r.get("resourceType") == "ImagingStudy"]
        update["imaging_study"] = choose_studies(studies, chosen.studies, prior=False)[0]
    history = build_context(
        patient,
        resources,
        as_of=ctx.as_of,
        missing=missing,
        question=state["question"],
        token_budget=ctx.settings.models.context_token_budget,
        attachment_texts=await url_attachment_texts(ctx, resources),
        plan_terms=chosen.codes,
    )
    for reference in history.unreadable:
        ctx.warn(f"{reference} is malformed and was left out of the record read", reason="unreadable_resource")
    ctx.recorder.event(
        NOTE,
        "context",
        meta={
            "sources": [ref.reference for ref in history.sources],
            # versions make the Provenance export point at exactly what the model read
            "versions": {ref.reference: ref.version for ref in history.sources if ref.version},
            "omitted": history.omitted,
            "missing": missing,
        },
        content={"text": history.text},
    )
    update.update(
        {
            "resources": resources,
            "context_text": history.text,
            "sources": [ref.reference for ref in history.sources],
            "prefetched": None,  # used: not kept in the thread's state
            "images_ready": bool(ctx.images.get("current")),
        }
    )
    return update


async def _run_parallel(ctx: RunContext, steps: dict[str, Callable[[], Coroutine[Any, Any, Any]]]) -> dict[str, Any]:
    """Run traced sub-steps at once; on the first failure cancel the others and raise it, naming its step."""
    failures: list[tuple[str, BaseException]] = []

    async def step(name: str, make: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        # Sub-steps are notes, not nodes: they overlap, and node records nest (one open node at a time).
        first = ctx.recorder.event(NOTE, name, meta={"phase": "started"})
        started = time.perf_counter()

        def finished(status: str, **meta: Any) -> None:
            elapsed = (time.perf_counter() - started) * 1000
            meta.update({"phase": "finished", "started_record": first})
            ctx.recorder.event(NOTE, name, status=status, duration_ms=elapsed, meta=meta)

        try:
            result = await make()
        except asyncio.CancelledError:
            finished("cancelled")
            raise
        except Exception as exc:
            error = exc.metadata_dict() if isinstance(exc, MedagentError) else {"code": "internal_error"}
            finished("failed", error=error)
            failures.append((name, exc))
            raise
        finished("ok")
        return result

    tasks: dict[str, asyncio.Task[Any]] = {}
    try:
        async with asyncio.TaskGroup() as group:
            for name, make in steps.items():
                tasks[name] = group.create_task(step(name, make))
    except BaseExceptionGroup:
        name, error = failures[0]
        ctx.recorder.current_node = name
        raise error from None
    ctx.recorder.current_node = "fetch_history"
    return {name: task.result() for name, task in tasks.items()}


async def _history_step(
    ctx: RunContext, patient_id: str, types: list[str], prefetched: list[dict[str, Any]] | None, all_types: list[str]
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    if prefetched is not None:
        ctx.recorder.event(NOTE, "history_reused", meta={"types": types})
        return of_types(prefetched, types, all_types), {}
    try:
        fetched = await fetch_records(ctx, patient_id, types)
    except MedagentError as exc:
        # Every type failed: the run still answers from the patient alone, and says so.
        ctx.warn(f"the record could not be read ({exc.code}): the answer rests on no history", reason="history_failed")
        return [], {kind: exc.code for kind in types}
    return fetched.resources, fetched.missing


async def _imaging_step(
    ctx: RunContext, patient_id: str, chosen: Plan, prefetched: list[dict[str, Any]] | None, all_types: list[str]
) -> tuple[list[dict[str, Any]], dict[str, Any] | None, dict[str, Any] | None, list[dict[str, Any]], dict[str, str]]:
    """Find the patient's studies, choose the current one (and prior), and prepare their images.

    Imaging never fails the run: a study search that fails, a study that cannot be located,
    read or decoded becomes a warning (see :func:`fetch_study_images`) and the run answers
    without it. Returns the studies (and resources read with them), the current and prior study,
    the skipped instances, and the types that could not be read (``{"ImagingStudy": code}``).
    """
    missing: dict[str, str] = {}
    extra: list[dict[str, Any]] = []
    if prefetched is not None:
        studies = [r for r in prefetched if r.get("resourceType") == "ImagingStudy"]
    else:
        try:
            fetched = await fetch_records(ctx, patient_id, ["ImagingStudy"], reference_rounds=0)
        except RUN_FAILURES:
            raise
        except MedagentError as exc:
            # The record half still answers; the context says ImagingStudy is missing. Worded
            # like the record half's failed types (agent/graph/record_fetch.py).
            missing["ImagingStudy"] = exc.code
            ctx.warn(
                f"ImagingStudy could not be fetched ({exc.code}): the answer does not reflect it",
                reason="type_failed",
                error=exc.metadata_dict(),
            )
            fetched = None
        found = fetched.resources if fetched is not None else []
        studies = [r for r in found if r.get("resourceType") == "ImagingStudy"]
        extra = [r for r in found if r.get("resourceType") != "ImagingStudy"]
    current, prior = choose_studies(studies, chosen.studies, chosen.prior_study)
    errors: list[dict[str, Any]] = []
    if current is not None:
        roles = [("current", current)] + ([("prior", prior)] if prior is not None else [])
        prepared = await asyncio.gather(*(fetch_study_images(ctx, study, role) for role, study in roles))
        for (role, _), (images, skipped) in zip(roles, prepared, strict=True):
            ctx.images[role] = images
            errors += skipped
    elif chosen.prior_study or chosen.needs_images:
        ctx.recorder.event(NOTE, "no_study", meta={"wanted": chosen.studies})
    return studies + extra, current, prior, errors, missing


def route_after_fetch(state: AskState) -> Literal["image_findings", "reason"]:
    """Score images when the current study gave any."""
    return "image_findings" if state.get("images_ready") else "reason"


# -- findings -----------------------------------------------------------------------------------
@traced("image_findings")
async def image_findings(state: AskState, runtime: Runtime[RunContext]) -> dict[str, Any]:
    """Embed the current study's images once; derive zero-shot labels, classifier scores and similar cases."""
    ctx = runtime.context
    images = ctx.images.get("current", [])
    if not images:
        return {"findings": [], "similar_cases": []}
    modality = (images[0].ref.modality or "").upper()
    embeddings = await asyncio.to_thread(embed_once, ctx.scorer, images, ctx.recorder)
    analysis = ImageAnalysis()
    label_set = ctx.label_sets.get(modality)
    if label_set is None:
        # Zero-shot labels are per domain; scoring chest X-ray labels on, say, CT slices would
        # produce confident nonsense, so the step is skipped and says why.
        ctx.recorder.event(NOTE, "no_label_set", meta={"modality": modality, "known": sorted(ctx.label_sets)})
    else:
        analysis.findings += await asyncio.to_thread(
            zero_shot_findings, ctx.scorer, images, embeddings, label_set, ctx.recorder
        )
    if ctx.classifier is not None:
        analysis.findings += classifier_findings(ctx.classifier, ctx.scorer, images, embeddings, ctx.recorder)
    k = ctx.settings.imaging.similar_cases
    if ctx.image_index is not None and k > 0:
        study_uid = images[0].ref.study_uid
        analysis.similar_cases = await asyncio.to_thread(
            similar_cases, ctx.image_index, ctx.scorer, embeddings, study_uid, k, ctx.recorder, modality
        )
    elif k > 0 and ctx.image_index_problem:
        ctx.recorder.event(NOTE, "similar_cases_unavailable", meta={"reason": ctx.image_index_problem})
    for finding in analysis.findings:
        ctx.emit(StreamEvent(type="finding", data=finding.model_dump(mode="json")))
    # Similar cases become citeable: the citation checker accepts exactly what the run put before the model.
    sources = list(state.get("sources", [])) + [case.citation for case in analysis.similar_cases]
    return {"findings": analysis.findings, "similar_cases": analysis.similar_cases, "sources": sources}


# -- reason -------------------------------------------------------------------------------------
def _model_meta(identity: ModelIdentity, **extra: Any) -> dict[str, Any]:
    return {**identity.model_dump(), **extra}


def _study_citation(study: dict[str, Any] | None) -> str | None:
    return f"ImagingStudy/{study['id']}" if study and study.get("id") else None


@traced("reason")
async def reason(state: AskState, runtime: Runtime[RunContext]) -> dict[str, Any]:
    """Ask MedGemma the question over the cited context, the findings, the images and the thread so far."""
    ctx = runtime.context
    chosen = state.get("plan")
    findings = state.get("findings", [])
    # Findings cover every chosen image; MedGemma sees only the first few (frontal first), since
    # each image is 256 prompt tokens and seconds of vision-tower time.
    limit = ctx.settings.models.reasoner_max_images
    images = ctx.images.get("current", [])[:limit]
    prior_images = ctx.images.get("prior", [])[:limit] if images else []
    user_text = build_user_prompt(
        state["question"],
        state["context_text"],
        findings,
        ctx.scorer.identity.model_id if findings else None,
        attached=[image.ref for image in images],
        similar=state.get("similar_cases", []),
        study_citation=_study_citation(state.get("imaging_study")),
        prior_attached=[image.ref for image in prior_images],
        prior_citation=_study_citation(state.get("prior_study")),
        earlier=format_earlier([dict(t) for t in state.get("turns") or []], ctx.settings.agent.thread_turns),
        task=chosen.task if chosen else "answer",
    )
    labels = image_labels(images, "current") + image_labels(prior_images, "prior")
    result = await _generate(
        ctx,
        "medgemma.generate",
        SYSTEM_PROMPT,
        user_text,
        images=[image.image for image in images + prior_images],
        image_labels=labels,
        image_refs=[image.ref.sop_instance_uid for image in images + prior_images],
        stream=True,
    )
    return {"raw_answer": result.text}


def image_labels(images: list[PreparedImage], which: str) -> list[str]:
    """Label each image for the prompt: CT/MR slices as ``SLICE n`` (in volume order), others by study."""
    if images and (images[0].ref.modality or "").upper() in VOLUME_MODALITIES:
        return [f"{which} SLICE {number}" for number in range(1, len(images) + 1)]
    return [which] * len(images)


async def _generate(
    ctx: RunContext,
    name: str,
    system: str,
    user_text: str,
    *,
    images: list[Any] | None = None,
    image_labels: list[str] | None = None,
    image_refs: list[str] | None = None,
    max_new_tokens: int | None = None,
    stream: bool = False,
    attempt: int | None = None,
) -> GenerationResult:
    """Make one traced model call, bounded by ``models.call_timeout_s``; stream tokens when asked and possible."""
    fields: dict[str, Any] = {
        "system": system,
        "user_text": user_text,
        "images": images or [],
        "max_new_tokens": max_new_tokens or ctx.settings.models.max_new_tokens,
    }
    if image_labels:
        fields["image_labels"] = image_labels
    request = GenerationRequest(**fields)
    started = time.perf_counter()
    timeout = ctx.settings.models.call_timeout_s
    streaming = stream and ctx.listener is not None and hasattr(ctx.reasoner, "stream")
    try:
        if streaming:
            stop = threading.Event()
            result = await call_with_timeout(lambda: _stream_generation(ctx, request, stop), timeout, name, stop.set)
        else:
            result = await call_with_timeout(lambda: ctx.reasoner.generate(request), timeout, name)
    except MedagentError as exc:
        ctx.recorder.event(
            MODEL_CALL,
            name,
            status="failed",
            duration_ms=(time.perf_counter() - started) * 1000,
            meta=_model_meta(ctx.reasoner.identity, error=exc.metadata_dict()),
        )
        raise
    if stream and not streaming:
        ctx.emit(StreamEvent(type="token", text=result.text))  # no token stream: the whole answer at once
    extra: dict[str, Any] = {"attempt": attempt} if attempt is not None else {}
    ctx.recorder.event(
        MODEL_CALL,
        name,
        status="ok",
        duration_ms=result.latency_s * 1000,
        meta=_model_meta(
            ctx.reasoner.identity,
            parameters=result.parameters,
            prompt_chars=len(system) + len(user_text),
            prompt_tokens=result.prompt_tokens,
            output_tokens=result.output_tokens,
            images=len(images or []),
            image_refs=image_refs or [],
            streamed=streaming,
            **extra,
        ),
        content={"system": system, "prompt": user_text, "output": result.text},
    )
    return result


def _stream_generation(ctx: RunContext, request: GenerationRequest, stop: threading.Event) -> GenerationResult:
    """Run the reasoner's token stream (in a worker thread), sending each delta as it comes.

    When the run gives up on the call (timeout, cancellation) ``stop`` is set and the stream is
    closed at the next delta, which ends the generation behind it.

    Raises:
        ModelOutputError: the stream was stopped before it ended.
    """
    with ctx.reasoner.stream(request) as deltas:
        for delta in deltas:
            if stop.is_set():
                break
            ctx.emit(StreamEvent(type="token", text=delta))
        if not deltas.done:
            raise ModelOutputError("the answer stream was stopped before it ended")
        return deltas.result


# -- cite ---------------------------------------------------------------------------------------
@traced("check_citations")
async def check_answer_citations(state: AskState, runtime: Runtime[RunContext]) -> dict[str, Any]:
    """Keep only citations of resources this run fetched; record the dangling ones; close the turn."""
    ctx = runtime.context
    checked = check_citations(state["raw_answer"], state.get("sources", []))
    ctx.recorder.event(
        NOTE,
        "citations",
        meta={
            "valid": [c.reference for c in checked.citations if c.valid],
            "dangling": checked.dangling,
            "uncited_sentences": checked.uncited_sentences,
        },
        content={"answer": checked.answer},
    )
    for citation in checked.citations:
        ctx.emit(StreamEvent(type="citation", data=citation.model_dump(mode="json")))
    turn = {
        "question": state["question"],
        "answer": checked.answer,
        "cited": [c.reference for c in checked.citations if c.valid],
    }
    return {
        "answer": checked.answer,
        "citations": checked.citations,
        "dangling": checked.dangling,
        "uncited_sentences": checked.uncited_sentences,
        "turns": [turn],
    }
