"""The graph's state and the run context nodes receive.

Nodes return partial updates of :class:`AskState`. Everything with side effects (sources, models,
the trace recorder, settings) reaches a node through :class:`RunContext` (LangGraph's runtime
context), never through imports, so the same graph runs on any source or model backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypedDict

from agent.audit.recorder import TraceRecorder
from agent.config import Settings
from agent.domain.answer import Citation
from agent.domain.imaging import Finding, PreparedImage
from agent.domain.similar import SimilarCase
from agent.inference.labels import LabelSet
from agent.inference.protocols import ImageScorer, Reasoner
from agent.sources.protocols import DicomSource, FhirSource

#: The resource types a patient's history is fetched from.
HISTORY_TYPES: tuple[str, ...] = (
    "Condition",
    "Observation",
    "MedicationRequest",
    "AllergyIntolerance",
    "Encounter",
    "DiagnosticReport",
    "DocumentReference",
    "ImagingStudy",
)


class AskState(TypedDict, total=False):
    """What flows between nodes of the ask graph."""

    question: str
    patient_id: str
    patient: dict[str, Any]
    resources: list[dict[str, Any]]
    context_text: str
    sources: list[str]
    imaging_study: dict[str, Any] | None
    images: list[PreparedImage]
    image_errors: list[dict[str, Any]]
    findings: list[Finding]
    similar_cases: list[SimilarCase]
    raw_answer: str
    answer: str
    citations: list[Citation]
    dangling: list[str]


@dataclass
class RunContext:
    """The adapters and settings of one run."""

    fhir: FhirSource
    dicom: DicomSource
    scorer: ImageScorer
    reasoner: Reasoner
    recorder: TraceRecorder
    settings: Settings
    label_sets: dict[str, LabelSet] = field(default_factory=dict)
    as_of: datetime | None = None
    #: server capabilities by FHIR source, shared across the runs of one process
    capabilities_cache: dict[str, Any] = field(default_factory=dict)
    history_types: tuple[str, ...] = field(default=HISTORY_TYPES)
    #: a trained linear probe (``agent.inference.classifier.LinearProbe``) when one is configured
    classifier: Any | None = None
    #: the similar-case index (``agent.retrieval.protocols.ImageIndex``) when one is available
    image_index: Any | None = None
    #: why there is no similar-case index this run (recorded in the trace), when there is none
    image_index_problem: str | None = None
