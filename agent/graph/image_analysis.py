"""The findings stage's model work: one MedSigLIP embedding pass feeds three finding sources.

The image tower is by far the most expensive part of MedSigLIP (seconds per image on a CPU), so
each chosen image is embedded exactly once, and the same embeddings then give:

- zero-shot label scores for the modality's versioned label set (text embeddings are cached);
- the trained classifier's class probabilities, when one is configured (``imaging.classifier_path``);
- the most similar archived studies of the same modality (other patients' or this patient's earlier
  ones) from the similar-case index, when one exists.

Every source records its own trace event (model, parameters, latency, image references, output),
and a source that cannot run says why in the trace instead of failing the run, except a
configured classifier made for another model: that is a configuration error the user must fix.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from agent.audit.recorder import INDEX_SEARCH, MODEL_CALL, NOTE, TraceRecorder
from agent.domain.imaging import Finding, PreparedImage
from agent.domain.similar import SimilarCase
from agent.errors import MedagentError
from agent.inference.labels import LabelSet
from agent.inference.protocols import ImageScorer

#: Studies asked of the index per wanted case, so the modality filter still leaves enough.
OVERFETCH = 4


@dataclass
class ImageAnalysis:
    """What the findings stage produced for one study."""

    findings: list[Finding] = field(default_factory=list)
    similar_cases: list[SimilarCase] = field(default_factory=list)


def embed_once(scorer: ImageScorer, images: list[PreparedImage], recorder: TraceRecorder) -> torch.Tensor:
    """Embed every image in one batched call and record it as a model call."""
    started = time.perf_counter()
    try:
        embeddings = scorer.embed_images([image.image for image in images])
    except MedagentError as exc:
        record_failed_call(recorder, "medsiglip.embed_images", scorer, started, exc)
        raise
    recorder.event(
        MODEL_CALL,
        "medsiglip.embed_images",
        status="ok",
        duration_ms=(time.perf_counter() - started) * 1000,
        meta={
            **scorer.identity.model_dump(),
            **_image_meta(images),
            "embedding_dim": int(embeddings.shape[1]),
        },
    )
    return embeddings


def zero_shot_findings(
    scorer: ImageScorer,
    images: list[PreparedImage],
    embeddings: torch.Tensor,
    label_set: LabelSet,
    recorder: TraceRecorder,
) -> list[Finding]:
    """Score the label set on the embeddings (sigmoid of the model's own scale and bias)."""
    started = time.perf_counter()
    try:
        raw = scorer.score_embeddings(embeddings, label_set)
    except MedagentError as exc:
        record_failed_call(recorder, "medsiglip.zero_shot", scorer, started, exc)
        raise
    findings = _as_findings(images, raw, scorer.identity.model_id, "zero-shot", label_set.key)
    recorder.event(
        MODEL_CALL,
        "medsiglip.zero_shot",
        status="ok",
        duration_ms=(time.perf_counter() - started) * 1000,
        meta={
            **scorer.identity.model_dump(),
            "parameters": {"label_set": label_set.key, "labels": len(label_set.labels)},
            **_image_meta(images),
        },
        content={"output": [finding.model_dump(mode="json") for finding in findings]},
    )
    return findings


def classifier_findings(
    classifier: Any,
    scorer: ImageScorer,
    images: list[PreparedImage],
    embeddings: torch.Tensor,
    recorder: TraceRecorder,
) -> list[Finding]:
    """Apply the configured linear probe to the embeddings.

    Raises:
        ConfigError: the probe was trained on another model's embeddings (scores would be noise).
    """
    classifier.check_embedding_model(scorer.identity, int(embeddings.shape[1]))
    started = time.perf_counter()
    raw = classifier.predict(embeddings)
    key = classifier.label_set.key
    findings = _as_findings(images, raw, scorer.identity.model_id, "classifier", key)
    recorder.event(
        MODEL_CALL,
        "classifier.predict",
        status="ok",
        duration_ms=(time.perf_counter() - started) * 1000,
        meta={
            "model_id": f"linear probe {key}",
            "backend": "medagent-probe",
            "embedding_model": scorer.identity.model_id,
            "classes": list(classifier.classes),
            **_image_meta(images),
        },
        content={"output": [finding.model_dump(mode="json") for finding in findings]},
    )
    return findings


def similar_cases(
    index: Any,
    scorer: ImageScorer,
    embeddings: torch.Tensor,
    study_uid: str,
    k: int,
    recorder: TraceRecorder,
    modality: str | None = None,
) -> list[SimilarCase]:
    """Search the index with every image of the study; merge per study by best score.

    The query study itself is excluded, and so are studies of another modality (when both are
    known): a CT that happens to embed near a chest X-ray is no reference for reading it. Each
    image's search asks for more than ``k`` studies so the filter still leaves ``k`` when it can.
    An index made by another model, or one that cannot be
    read, yields no cases and a trace note naming the reason: similar cases are context, not a
    precondition of an answer.
    """
    from agent.retrieval.entries import IndexedModel

    model = IndexedModel.of(scorer.identity, int(embeddings.shape[1]))
    started = time.perf_counter()
    try:
        best: dict[str, Any] = {}
        for row in embeddings.numpy():
            for hit in index.search(row[None, :], k * OVERFETCH, exclude_study_uid=study_uid, model=model):
                if modality and hit.modality and hit.modality.upper() != modality.upper():
                    continue
                if hit.study_uid not in best or hit.score > best[hit.study_uid].score:
                    best[hit.study_uid] = hit
    except MedagentError as exc:
        recorder.event(NOTE, "similar_cases_unavailable", status="failed", meta={"error": exc.metadata_dict()})
        return []
    hits = sorted(best.values(), key=lambda hit: (-hit.score, hit.study_uid))[:k]
    cases = [SimilarCase.from_hit(hit) for hit in hits]
    recorder.event(
        INDEX_SEARCH,
        "similar_cases.search",
        status="ok",
        duration_ms=(time.perf_counter() - started) * 1000,
        meta={
            "index": index.info().model_dump(mode="json", include={"backend", "location", "count", "studies"}),
            "queries": int(embeddings.shape[0]),
            "k": k,
            "excluded_study": study_uid,
            "modality": modality,
            "results": [case.model_dump(mode="json", exclude={"label"}) for case in cases],
        },
    )
    return cases


def _as_findings(
    images: list[PreparedImage], raw: list[list[Any]], model_id: str, source: str, label_set: str
) -> list[Finding]:
    """Pair each image with its scores from one finding source."""
    return [
        Finding(image=image.ref, model_id=model_id, scores=scores, source=source, label_set=label_set)
        for image, scores in zip(images, raw, strict=True)
    ]


def _image_meta(images: list[PreparedImage]) -> dict[str, Any]:
    """Return what a model call's trace record says about its images: how many, and which instances."""
    return {"images": len(images), "image_refs": [image.ref.sop_instance_uid for image in images]}


def record_failed_call(
    recorder: TraceRecorder, name: str, scorer: ImageScorer, started: float, exc: MedagentError
) -> None:
    """Record a failed MedSigLIP call with its error (no clinical content)."""
    recorder.event(
        MODEL_CALL,
        name,
        status="failed",
        duration_ms=(time.perf_counter() - started) * 1000,
        meta={**scorer.identity.model_dump(), "error": exc.metadata_dict()},
    )
