"""The graph's state and the run context nodes receive.

Nodes return partial updates of :class:`AskState`. Everything with side effects (sources, models,
the trace recorder, settings) reaches a node through :class:`RunContext` (LangGraph's runtime
context), never through imports, so the same graph runs on any source or model backend.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any, TypedDict

from agent.audit.recorder import NOTE, TraceRecorder
from agent.config import CLINICAL_TYPES, Settings
from agent.domain.answer import Citation
from agent.domain.imaging import Finding, PreparedImage
from agent.domain.plan import Plan
from agent.domain.similar import SimilarCase
from agent.graph.events import StreamEvent
from agent.inference.labels import LabelSet
from agent.inference.protocols import ImageScorer, Reasoner
from agent.sources.protocols import DicomSource, FhirSource

#: The resource types a patient's history is fetched from: the clinical types, then imaging studies.
HISTORY_TYPES: tuple[str, ...] = (*CLINICAL_TYPES, "ImagingStudy")


class Turn(TypedDict):
    """One finished turn of a thread, as later turns see it: compact, never raw chat."""

    question: str
    answer: str
    cited: list[str]


class AskState(TypedDict, total=False):
    """What flows between nodes of the ask graph (and, in a thread, what the checkpointer keeps).

    Images are not state: they are large, not serialisable, and used within the run that
    prepared them, so they live in :attr:`RunContext.images`.
    """

    question: str
    patient_id: str
    patient: dict[str, Any]
    #: what to fetch; given by the caller, or made by the plan node
    plan: Plan | None
    #: the record as fetched for the planner's manifest, reused by the fetch step
    prefetched: list[dict[str, Any]] | None
    #: record types the plan wanted but the user's role may not read (dropped)
    denied_types: list[str]
    resources: list[dict[str, Any]]
    context_text: str
    sources: list[str]
    imaging_study: dict[str, Any] | None
    prior_study: dict[str, Any] | None
    #: whether the current study gave images (they are in RunContext.images)
    images_ready: bool
    image_errors: list[dict[str, Any]]
    findings: list[Finding]
    similar_cases: list[SimilarCase]
    raw_answer: str
    answer: str
    citations: list[Citation]
    dangling: list[str]
    uncited_sentences: int
    #: the thread's finished turns (appended by each run's last node)
    turns: Annotated[list[Turn], operator.add]


#: Per-turn keys a new turn of a thread starts afresh (the checkpointer would carry them over).
TURN_DEFAULTS: dict[str, Any] = {
    "plan": None,
    "prefetched": None,
    "denied_types": [],
    "resources": [],
    "context_text": "",
    "sources": [],
    "imaging_study": None,
    "prior_study": None,
    "images_ready": False,
    "image_errors": [],
    "findings": [],
    "similar_cases": [],
    "raw_answer": "",
    "answer": "",
    "citations": [],
    "dangling": [],
    "uncited_sentences": 0,
}


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
    #: the prepared images of this run by role ("current", "prior"); never checkpointed
    images: dict[str, list[PreparedImage]] = field(default_factory=dict)
    #: the asker's role, for the access policy (``agent.restricted_types``)
    user_role: str | None = None
    #: whether a person can answer questions (a thread): ambiguity interrupts instead of failing
    interactive: bool = False
    #: where stream events go (progress, tokens, ...); None when nobody listens
    listener: Callable[[StreamEvent], None] | None = None
    #: what this run could not read and went on without, in words for the answer (never clinical text)
    warnings: list[str] = field(default_factory=list)

    def warn(self, message: str, *, reason: str, **meta: Any) -> None:
        """Note something the run could not read and carried on without: in the answer and the trace.

        A run degrades instead of dying (DESIGN.md): only an unresolvable patient, an unwritable
        trace or no model answer fail it. Everything else lands here, so the reader of the answer
        knows what is missing and the auditor sees the same words in the trace (``warning`` notes,
        status ``degraded``). ``message`` names resources by reference and errors by code; it must
        never carry clinical free text.
        """
        if message not in self.warnings:
            self.warnings.append(message)
        self.recorder.event(NOTE, "warning", status="degraded", meta={"reason": reason, "message": message, **meta})

    def emit(self, event: StreamEvent) -> None:
        """Send an event to the listener, if there is one."""
        if self.listener is not None:
            self.listener(event)
