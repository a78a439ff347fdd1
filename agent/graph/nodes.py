"""The ask graph's nodes: resolve patient -> fetch history -> fetch images -> findings -> reason -> cite.

Each node is wrapped by :func:`traced` so its start, end, duration and failure land in the trace;
data accesses inside it are recorded by the sources through the run's observer.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Literal

from langgraph.runtime import Runtime

from agent.audit.recorder import MODEL_CALL, NOTE
from agent.domain.imaging import PreparedImage
from agent.domain.refs import InstanceRef
from agent.errors import DicomDecodeError, MedagentError, SourceUnavailableError
from agent.graph.citations import check_citations
from agent.graph.image_analysis import (
    ImageAnalysis,
    classifier_findings,
    embed_once,
    similar_cases,
    zero_shot_findings,
)
from agent.graph.prompts import SYSTEM_PROMPT, build_user_prompt
from agent.graph.state import AskState, RunContext
from agent.history.context import build_context
from agent.history.fhir_values import fetch_attachment_text, parse_when
from agent.inference.protocols import GenerationRequest, ModelIdentity
from agent.sources.capabilities import discover
from agent.sources.fhir_validation import flag_invalid
from agent.sources.history_fetch import fetch_history as fetch_patient_history
from agent.sources.imaging_selection import choose_instances
from agent.sources.patient_resolution import PatientQuery
from agent.sources.patient_resolution import resolve_patient as find_the_patient
from agent.sources.pixels import prepare_instance
from agent.sources.study_location import open_dicom_source_for_study
from agent.sources.volumes import prepare_volume

#: Modalities whose chosen instances are slices of one volume, prepared together.
VOLUME_MODALITIES = frozenset({"CT", "MR"})

NodeFn = Callable[[AskState, Runtime[RunContext]], Awaitable[dict[str, Any]]]


def traced(name: str) -> Callable[[NodeFn], NodeFn]:
    """Record the node in the run's trace (start, end, duration, error)."""

    def wrap(fn: NodeFn) -> NodeFn:
        @functools.wraps(fn)
        async def node(state: AskState, runtime: Runtime[RunContext]) -> dict[str, Any]:
            with runtime.context.recorder.node(name, inputs=sorted(state)) as record:
                update = await fn(state, runtime)
                record["outputs"] = describe_update(update)
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
        elif value is None:
            described[key] = None
        else:
            described[key] = type(value).__name__
    return described


@traced("resolve_patient")
async def resolve_patient(state: AskState, runtime: Runtime[RunContext]) -> dict[str, Any]:
    """Find the one Patient the request names (logical id or ``identifier=SYSTEM|VALUE``); never guess."""
    query = PatientQuery.parse(state["patient_id"])
    patient = await find_the_patient(runtime.context.fhir, query)
    return {"patient": patient}


@traced("fetch_history")
async def fetch_history(state: AskState, runtime: Runtime[RunContext]) -> dict[str, Any]:
    """Fetch the patient's history (as the server's capabilities allow) and build the cited context."""
    ctx = runtime.context
    patient = state["patient"]
    source = ctx.settings.fhir.base_url or str(ctx.settings.fhir.effective_bundle_dir())
    capabilities = ctx.capabilities_cache.get(source)
    if capabilities is None:
        capabilities = ctx.capabilities_cache[source] = await discover(ctx.fhir)
    fetched = await fetch_patient_history(
        ctx.fhir,
        patient["id"],
        types=ctx.history_types,
        capabilities=capabilities,
        concurrency=ctx.settings.fhir.concurrency,
    )
    resources, missing = fetched.resources, fetched.missing
    if missing and len(missing) == len(ctx.history_types):
        raise next(iter(fetched.errors.values()))
    ctx.recorder.event(
        NOTE,
        "history_fetch",
        meta={
            "strategy": fetched.strategy,
            "fallback": fetched.fallback,
            "requests": fetched.requests,
            "unresolved": fetched.unresolved,
            "server": capabilities.fhir_version,
        },
    )
    if missing:
        ctx.recorder.event(NOTE, "partial_history", status="failed", meta={"missing": missing})
    # Validation is CPU work (about 0.3 ms a resource): off the event loop, so other runs go on.
    _, invalid = await asyncio.to_thread(flag_invalid, resources)
    if invalid:
        # kept as received (raw JSON) and used; the flags tell the auditor which ones were off-spec
        ctx.recorder.event(NOTE, "invalid_resources", meta={"problems": invalid})
    history = build_context(
        patient,
        resources,
        as_of=ctx.as_of,
        missing=missing,
        question=state["question"],
        token_budget=ctx.settings.models.context_token_budget,
        attachment_texts=await _url_attachment_texts(ctx, resources),
    )
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
    studies = [r for r in resources if r.get("resourceType") == "ImagingStudy"]
    return {
        "resources": resources,
        "context_text": history.text,
        "sources": [ref.reference for ref in history.sources],
        "imaging_study": _newest_study(studies),
    }


#: Largest attachment fetched by URL for a note (bytes).
MAX_ATTACHMENT_BYTES = 2_000_000


async def _url_attachment_texts(ctx: RunContext, resources: list[dict[str, Any]]) -> dict[str, str]:
    """Fetch the text of notes given by URL (Binary on the same server), for the context builder."""
    texts: dict[str, str] = {}
    for resource in resources:
        if resource.get("resourceType") != "DocumentReference":
            continue
        for number, content in enumerate(resource.get("content") or []):
            attachment = content.get("attachment") if isinstance(content, dict) else None
            if isinstance(attachment, dict) and attachment.get("url") and not attachment.get("data"):
                text = await fetch_attachment_text(ctx.fhir, attachment, MAX_ATTACHMENT_BYTES)
                if text is not None:
                    texts[f"DocumentReference/{resource['id']}#{number}"] = text
    return texts


def _newest_study(studies: list[dict[str, Any]]) -> dict[str, Any] | None:
    epoch = datetime.min.replace(tzinfo=UTC)
    dated = [(parse_when(study.get("started")) or epoch, study) for study in studies]
    return max(dated, key=lambda item: item[0])[1] if dated else None


def route_after_history(state: AskState) -> Literal["fetch_images", "reason"]:
    """Go to imaging when the patient has a study, else straight to reasoning."""
    return "fetch_images" if state.get("imaging_study") else "reason"


def study_instance_uid(imaging_study: dict[str, Any]) -> str:
    """Return the DICOM StudyInstanceUID of an ImagingStudy (identifier system urn:dicom:uid).

    Raises:
        SourceUnavailableError: the ImagingStudy carries no DICOM study UID.
    """
    for identifier in imaging_study.get("identifier") or []:
        if identifier.get("system") == "urn:dicom:uid" and identifier.get("value"):
            return str(identifier["value"]).removeprefix("urn:oid:")
    raise SourceUnavailableError(
        f"ImagingStudy/{imaging_study.get('id')} has no DICOM study UID (identifier system urn:dicom:uid)"
    )


@traced("fetch_images")
async def fetch_images(state: AskState, runtime: Runtime[RunContext]) -> dict[str, Any]:
    """Retrieve and prepare the chosen instances of the newest study.

    An instance that cannot be decoded is recorded and skipped; if none can be, the run fails
    with the decoder's error (which names the transfer syntax).
    """
    ctx = runtime.context
    study = state["imaging_study"]
    assert study is not None
    uid = study_instance_uid(study)
    # The study's own DICOMweb Endpoint (on an allowed origin) wins over the configured source.
    async with open_dicom_source_for_study(study, ctx.dicom, ctx.settings.dicom, ctx.recorder, fhir=ctx.fhir) as dicom:
        if dicom is not ctx.dicom:
            ctx.recorder.event(NOTE, "imaging_source", meta={"endpoint": getattr(dicom, "base_url", None)})
        refs = await dicom.list_instances(uid)
        modality = refs[0].modality if refs else None
        chosen = choose_instances(refs, modality, ctx.settings.dicom.max_instances)
        # The chosen instances are fetched at once (network-bound), then prepared (CPU-bound).
        datasets = await asyncio.gather(*(dicom.retrieve(ref) for ref in chosen))
    items = list(zip(datasets, chosen, strict=True))
    if (modality or "").upper() in VOLUME_MODALITIES and len(chosen) > 1:
        images, errors = await asyncio.to_thread(_prepare_volume, ctx, items, modality)
    else:
        images, errors = await asyncio.to_thread(_prepare_each, items)
    for error in errors:
        ctx.recorder.event(NOTE, "instance_skipped", status="failed", meta=error)
    if chosen and not images and errors:
        # None could be decoded: the run fails with the first decoder error (it names the transfer syntax).
        raise DicomDecodeError(errors[0]["message"], details=errors[0]["details"])
    for image in images:
        ctx.recorder.event(
            NOTE,
            "pixel_preparation",
            meta={
                "sop_instance_uid": image.ref.sop_instance_uid,
                "steps": image.steps,
                "defaults": image.defaults,
            },
        )
    return {"images": images, "image_errors": errors}


def _prepare_each(items: list[tuple[Any, InstanceRef]]) -> tuple[list[PreparedImage], list[dict[str, Any]]]:
    """Prepare instances one by one; an undecodable one is reported and skipped, the others go on."""
    images: list[PreparedImage] = []
    errors: list[dict[str, Any]] = []
    for dataset, ref in items:
        try:
            images.append(prepare_instance(dataset, ref))
        except DicomDecodeError as exc:
            errors.append({"sop_instance_uid": ref.sop_instance_uid, **exc.to_dict()})
    return images, errors


def _prepare_volume(
    ctx: RunContext, items: list[tuple[Any, InstanceRef]], modality: str | None
) -> tuple[list[PreparedImage], list[dict[str, Any]]]:
    """Prepare CT/MR slices as one volume: ordered by position, HU windows (CT) or volume min-max (MR)."""
    volume = prepare_volume(items, modality=modality, max_slices=ctx.settings.dicom.max_instances)
    ctx.recorder.event(
        NOTE,
        "volume_preparation",
        meta={"modality": modality, "slices": len(volume.images), "steps": volume.steps, "defaults": volume.defaults},
    )
    return volume.images, volume.skipped


def route_after_images(state: AskState) -> Literal["image_findings", "reason"]:
    """Score images when there are any."""
    return "image_findings" if state.get("images") else "reason"


def _model_meta(identity: ModelIdentity, **extra: Any) -> dict[str, Any]:
    return {**identity.model_dump(), **extra}


@traced("image_findings")
async def image_findings(state: AskState, runtime: Runtime[RunContext]) -> dict[str, Any]:
    """Embed the images once; derive zero-shot labels, classifier scores and similar prior cases."""
    ctx = runtime.context
    images = state["images"]
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
            similar_cases, ctx.image_index, ctx.scorer, embeddings, study_uid, k, ctx.recorder
        )
    elif k > 0 and ctx.image_index_problem:
        ctx.recorder.event(NOTE, "similar_cases_unavailable", meta={"reason": ctx.image_index_problem})
    # Similar cases become citeable: the citation checker accepts exactly what the run put before the model.
    sources = list(state.get("sources", [])) + [case.citation for case in analysis.similar_cases]
    return {"findings": analysis.findings, "similar_cases": analysis.similar_cases, "sources": sources}


def _record_failed_call(
    ctx: RunContext, name: str, identity: ModelIdentity, started: float, exc: MedagentError
) -> None:
    ctx.recorder.event(
        MODEL_CALL,
        name,
        status="failed",
        duration_ms=(time.perf_counter() - started) * 1000,
        meta=_model_meta(identity, error=exc.metadata_dict()),
    )


def _study_citation(study: dict[str, Any] | None) -> str | None:
    return f"ImagingStudy/{study['id']}" if study and study.get("id") else None


@traced("reason")
async def reason(state: AskState, runtime: Runtime[RunContext]) -> dict[str, Any]:
    """Ask MedGemma the question over the cited context, the findings and the images."""
    ctx = runtime.context
    findings = state.get("findings", [])
    # Findings cover every chosen image; MedGemma sees only the first few (frontal first), since
    # each image is 256 prompt tokens and seconds of vision-tower time.
    images = state.get("images", [])[: ctx.settings.models.reasoner_max_images]
    user_text = build_user_prompt(
        state["question"],
        state["context_text"],
        findings,
        ctx.scorer.identity.model_id if findings else None,
        attached=[image.ref for image in images],
        similar=state.get("similar_cases", []),
        study_citation=_study_citation(state.get("imaging_study")),
    )
    request = GenerationRequest(
        system=SYSTEM_PROMPT,
        user_text=user_text,
        images=[image.image for image in images],
        max_new_tokens=ctx.settings.models.max_new_tokens,
    )
    started = time.perf_counter()
    try:
        result = await asyncio.to_thread(ctx.reasoner.generate, request)
    except MedagentError as exc:
        _record_failed_call(ctx, "medgemma.generate", ctx.reasoner.identity, started, exc)
        raise
    ctx.recorder.event(
        MODEL_CALL,
        "medgemma.generate",
        status="ok",
        duration_ms=result.latency_s * 1000,
        meta=_model_meta(
            ctx.reasoner.identity,
            parameters=result.parameters,
            prompt_chars=len(SYSTEM_PROMPT) + len(user_text),
            prompt_tokens=result.prompt_tokens,
            output_tokens=result.output_tokens,
            images=len(images),
            image_refs=[image.ref.sop_instance_uid for image in images],
        ),
        content={"system": SYSTEM_PROMPT, "prompt": user_text, "output": result.text},
    )
    return {"raw_answer": result.text}


@traced("check_citations")
async def check_answer_citations(state: AskState, runtime: Runtime[RunContext]) -> dict[str, Any]:
    """Keep only citations of resources this run fetched; record the dangling ones."""
    checked = check_citations(state["raw_answer"], state.get("sources", []))
    runtime.context.recorder.event(
        NOTE,
        "citations",
        meta={
            "valid": [c.reference for c in checked.citations if c.valid],
            "dangling": checked.dangling,
            "uncited_sentences": checked.uncited_sentences,
        },
        content={"answer": checked.answer},
    )
    return {"answer": checked.answer, "citations": checked.citations, "dangling": checked.dangling}
