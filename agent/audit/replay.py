"""Replay a recorded run from its trace alone, and compare two runs.

This sits after :func:`agent.audit.reader.load_run`, in the review part of the flow: an auditor
asks "what did this run answer, from what, with which model?" and gets the answer, sources,
citations and findings rebuilt from the trace, without calling any model or server. The same
result shape for a fresh re-run (``medagent audit replay RUN_ID --rerun``, which re-asks the
recorded question through :func:`agent.runner.run_ask`) lets :func:`diff_runs` say what changed:
the answer, the sources, the citations, the records the sources returned, the models.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from agent.audit import recorder as kinds
from agent.audit.export_json import readable_content
from agent.audit.reader import RunTrace, TraceEvent
from agent.audit.render import render_run
from agent.domain.answer import Citation
from agent.errors import AuditError
from agent.graph.citations import check_citations

#: Name of the model call whose output is the raw answer, and of the image scorer's call.
REASONER_CALL = "medgemma.generate"
SCORER_CALL = "medsiglip.zero_shot"

_DIFF_TEXT_CHARS = 200

#: Where a replayed answer came from.
AnswerSource = Literal["recorded", "recomputed", "unavailable", "none"]


class ReplayResult(BaseModel):
    """A run as its trace shows it: what :class:`~agent.domain.answer.AskResult` held, and more."""

    run_id: str
    status: str
    patient_ref: str | None = None
    question: str | None = Field(None, description="The recorded question; None when content is unreadable.")
    answer: str = Field("", description="The answer shown to the user, dangling citations removed.")
    answer_source: AnswerSource = Field(
        "none",
        description="'recorded': the citation step's answer; 'recomputed': the model output re-checked "
        "against the context's sources; 'unavailable': recorded but not readable (no content, no key); "
        "'none': the run produced no answer.",
    )
    sources: list[str] = Field(default_factory=list, description="'Type/id' of each resource in the context")
    citations: list[Citation] = Field(default_factory=list)
    dangling: list[str] = Field(default_factory=list)
    findings: list[dict[str, Any]] = Field(default_factory=list)
    models: dict[str, str] = Field(default_factory=dict, description="Role -> model id loaded for the run")
    model_revisions: dict[str, str | None] = Field(default_factory=dict, description="Role -> weights revision")
    fhir_resources: list[str] = Field(
        default_factory=list, description="Sorted union of the 'Type/id' every FHIR request returned"
    )
    error: dict[str, Any] | None = None
    unreadable: list[str] = Field(
        default_factory=list,
        description="What the run recorded but this read could not see: 'question', 'answer', 'findings'.",
    )
    warnings: list[str] = Field(default_factory=list)
    timeline: str = Field("", description="The run rendered as `medagent audit show` prints it.")


def replay(trace: RunTrace) -> ReplayResult:
    """Rebuild a run's outcome from its trace, without calling any model or server.

    The answer is the one the citation step recorded. When that record is missing (the run
    stopped before it), the reasoner's recorded output is checked against the context's
    sources with :func:`agent.graph.citations.check_citations`, exactly as the run would have.
    Citations come from that same check whenever the reasoner's output is readable, so they
    keep the order the model wrote them in; from the citation record's metadata otherwise
    (valid ones first, then dangling ones: the interleaving is not recorded there).
    """
    run = trace.run
    warnings: list[str] = []
    answer_source: AnswerSource
    request = _content(_first(trace, kinds.RUN_STARTED))
    context = _last(trace, kinds.NOTE, "context")
    cited = _last(trace, kinds.NOTE, "citations")
    reasoned = _last(trace, kinds.MODEL_CALL, REASONER_CALL, status="ok")
    scored = _last(trace, kinds.MODEL_CALL, SCORER_CALL, status="ok")
    finished = _last(trace, kinds.RUN_FINISHED)

    sources = [str(source) for source in (context.meta.get("sources") or [])] if context is not None else []
    recorded_answer = (_content(cited) or {}).get("answer")
    raw_output = (_content(reasoned) or {}).get("output")

    recomputed = check_citations(raw_output, sources) if isinstance(raw_output, str) else None
    answer, answer_source = "", "none"
    citations: list[Citation] = []
    dangling: list[str] = []
    if isinstance(recorded_answer, str):
        answer, answer_source = recorded_answer, "recorded"
        if recomputed is not None and recomputed.answer == recorded_answer:
            # Same answer: the re-check also gives the citations in the order the model wrote them.
            citations, dangling = recomputed.citations, recomputed.dangling
        else:
            if recomputed is not None:
                warnings.append(
                    "the recorded answer differs from the model output re-checked against the sources (the "
                    "citation checker has changed since the run): the recorded answer and citations are shown"
                )
            citations, dangling = _recorded_citations(cited)
    elif recomputed is not None:
        answer, answer_source = recomputed.answer, "recomputed"
        citations, dangling = recomputed.citations, recomputed.dangling
        if cited is None:
            warnings.append("the run recorded no citation check: this answer was rebuilt and was never shown to a user")
    elif cited is not None or reasoned is not None:
        answer_source = "unavailable"
        citations, dangling = _recorded_citations(cited)
        warnings.append(
            "the answer is not readable: the trace was read without content, or it is encrypted and no key was given"
        )

    scores = (_content(scored) or {}).get("output")
    unreadable = [
        name
        for name, event, value in (
            ("question", _first(trace, kinds.RUN_STARTED), request),
            ("answer", cited or reasoned, recorded_answer if cited is not None else raw_output),
            ("findings", scored, scores),
        )
        if event is not None and value is None
    ]
    loads = [event for event in trace.events if event.kind == kinds.MODEL_LOAD]
    return ReplayResult(
        run_id=run.run_id,
        status=run.status,
        patient_ref=run.patient_ref,
        question=(request or {}).get("question"),
        answer=answer,
        answer_source=answer_source,
        sources=sources,
        citations=citations,
        dangling=dangling,
        findings=[item for item in scores if isinstance(item, dict)] if isinstance(scores, list) else [],
        models={event.name: str(event.meta.get("model_id")) for event in loads},
        model_revisions={event.name: event.meta.get("revision") for event in loads},
        fhir_resources=sorted(
            {str(ref) for e in trace.events if e.kind == kinds.FHIR_REQUEST for ref in e.meta.get("resource_ids") or []}
        ),
        error=finished.meta.get("error") if finished is not None else None,
        unreadable=unreadable,
        warnings=warnings,
        timeline=render_run(trace),
    )


def diff_runs(a: ReplayResult, b: ReplayResult) -> list[str]:
    """Return what differs from run ``a`` to run ``b``, one human-readable line per difference.

    Compared: status, question, answer text, sources, citations (and whether each is valid),
    the resources FHIR returned, image findings, and the model id and weights revision of each
    role. An empty list means the two runs agree on all of them.
    """
    lines: list[str] = []
    if a.status != b.status:
        lines.append(f"status changed: {a.status} -> {b.status}")
    if a.question is not None and b.question is not None and a.question != b.question:
        lines.append("question changed")
    if unreadable := _unreadable(a, b, "answer"):
        lines.append(unreadable)
    elif a.answer != b.answer:
        lines.append(f"answer changed: {_clip(a.answer)!r} -> {_clip(b.answer)!r}")
    lines += _set_diff("source", a.sources, b.sources)

    verdict_a = {c.reference: c.valid for c in a.citations}
    verdict_b = {c.reference: c.valid for c in b.citations}
    for reference in sorted(verdict_a.keys() | verdict_b.keys()):
        before, after = verdict_a.get(reference), verdict_b.get(reference)
        if before is None:
            lines.append(f"citation added: {reference} ({_validity(after)})")
        elif after is None:
            lines.append(f"citation removed: {reference} ({_validity(before)})")
        elif before != after:
            lines.append(f"citation {reference} changed: {_validity(before)} -> {_validity(after)}")

    lines += _set_diff("FHIR resource returned", a.fhir_resources, b.fhir_resources)
    if unreadable := _unreadable(a, b, "findings"):
        lines.append(unreadable)
    elif a.findings != b.findings:
        lines.append(f"image findings changed ({len(a.findings)} -> {len(b.findings)} image(s) scored)")
    for role in sorted(a.models.keys() | b.models.keys()):
        model_a, model_b = a.models.get(role), b.models.get(role)
        if model_a != model_b:
            lines.append(f"{role} model changed: {model_a or '-'} -> {model_b or '-'}")
        elif a.model_revisions.get(role) != b.model_revisions.get(role):
            lines.append(
                f"{role} revision changed: {a.model_revisions.get(role) or '-'} -> {b.model_revisions.get(role) or '-'}"
            )
    return lines


def rerun_request(trace: RunTrace) -> tuple[str, str]:
    """Return the ``(patient_id, question)`` the run was asked, to ask it again.

    Raises:
        AuditError: the run's request is not in the trace or cannot be read (read without
            content, or encrypted and no key was given).
    """
    started = _first(trace, kinds.RUN_STARTED)
    run_id = trace.run.run_id
    if started is None:
        raise AuditError(f"run {run_id} has no run_started record: its request is unknown")
    request = _content(started)
    if request is None:
        raise AuditError(
            f"the request of run {run_id} is not readable: the trace was read without content, "
            "or its content is encrypted and no key was given"
        )
    question = request.get("question")
    patient_id = request.get("patient_id")
    if not patient_id and trace.run.patient_ref and trace.run.patient_ref.startswith("Patient/"):
        patient_id = trace.run.patient_ref.removeprefix("Patient/")
    if not isinstance(question, str) or not patient_id:
        raise AuditError(f"the request of run {run_id} has no patient or no question to ask again")
    return str(patient_id), question


# -- helpers ----------------------------------------------------------------------------------
def _content(event: TraceEvent | None) -> dict[str, Any] | None:
    return readable_content(event) if event is not None else None


def _first(trace: RunTrace, kind: str) -> TraceEvent | None:
    return next((event for event in trace.events if event.kind == kind), None)


def _last(trace: RunTrace, kind: str, name: str | None = None, *, status: str | None = None) -> TraceEvent | None:
    for event in reversed(trace.events):
        if event.kind == kind and (name is None or event.name == name) and (status is None or event.status == status):
            return event
    return None


def _unreadable(a: ReplayResult, b: ReplayResult, what: str) -> str | None:
    """Return the line saying ``what`` cannot be compared, when either run could not read it."""
    runs = [run.run_id for run in (a, b) if what in run.unreadable]
    if not runs:
        return None
    return f"{what} not comparable: not readable in run {' and '.join(runs)}"


def _recorded_citations(cited: TraceEvent | None) -> tuple[list[Citation], list[str]]:
    """Return the citations as the citation record's metadata lists them: valid, then dangling."""
    if cited is None:
        return [], []
    valid = [str(ref) for ref in cited.meta.get("valid") or []]
    dangling = [str(ref) for ref in cited.meta.get("dangling") or []]
    return [Citation(reference=ref, valid=True) for ref in valid] + [
        Citation(reference=ref, valid=False) for ref in dangling
    ], dangling


def _set_diff(label: str, before: list[str], after: list[str]) -> list[str]:
    old, new = set(before), set(after)
    return [f"{label} added: {ref}" for ref in sorted(new - old)] + [
        f"{label} removed: {ref}" for ref in sorted(old - new)
    ]


def _validity(valid: bool | None) -> str:
    return "valid" if valid else "dangling"


def _clip(text: str) -> str:
    return text if len(text) <= _DIFF_TEXT_CHARS else text[:_DIFF_TEXT_CHARS] + "…"
