"""Run the agent over the evaluation questions and score each run from its result and its trace.

Where it sits: ``medagent eval`` (agent/cli_eval.py) builds a runtime on the embedded fixtures
and calls :func:`run_eval`; each question goes through :func:`agent.runner.run_ask` exactly as a
user's would, and the trace (:func:`agent.audit.reader.load_run`) supplies the model calls and
prompt tokens. The scores:

- gold-fact recall in context: gold facts whose resource is among the run's sources (what the
  model was shown), resolved by content with :func:`agent.bench.fhir_questions.resolve_fact`;
- citation precision: valid cited ids that are gold, over every id cited (dangling ones too);
- dangling citations: cited ids that name nothing the run fetched;
- exact match, where the answer is a value: the expected number appears in the answer;
- model calls, prompt tokens and latency per question.

Retrieval and citation checking are deterministic code, so those figures are real even with the
tiny random-weight models; the answer scores are not, and the report says so.
"""

from __future__ import annotations

import inspect
import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.audit.reader import load_run
from agent.audit.recorder import MODEL_CALL
from agent.bench.fhir import FIXTURE_AS_OF, fixture_resources
from agent.bench.fhir_questions import resolve_fact
from agent.config import DEFAULT_FIXTURES
from agent.domain.answer import AskResult
from agent.errors import ConfigError, MedagentError
from agent.eval.questions import EVAL_QUESTIONS, KINDS, EvalQuestion, expected_value, normalise_number
from agent.runner import run_ask
from agent.runtime import AgentRuntime

# A number standing alone: not part of an id, a code or a longer number ("obs-14", "1ff02", "11.4").
_NUMBER = re.compile(r"(?<![\w.\-/])-?\d+(?:,\d{3})*(?:\.\d+)?(?![\w])")
_CITATION = re.compile(r"\[[A-Za-z]+/[^\]]*\]")
TEST_MODELS_NOTICE = (
    "Tiny random-weight test models were used: their answers are noise, so the answer scores "
    "(exact match, citation precision) are meaningless. Gold-fact recall in context, dangling-citation "
    "checking, model calls and prompt tokens come from the agent's own code and are real."
)


@dataclass
class QuestionResult:
    """One question's scores."""

    patient: str
    kind: str
    question: str
    gold: list[str]
    in_context: int
    cited: int
    cited_gold: int
    dangling: int
    exact_match: bool | None
    model_calls: int
    prompt_tokens: int
    latency_s: float
    run_id: str | None = None
    error: str | None = None

    @property
    def recall(self) -> float:
        """Return the share of gold facts among the run's sources."""
        return self.in_context / len(self.gold) if self.gold else 1.0


@dataclass
class EvalReport:
    """Every question's scores, and whether test models answered."""

    results: list[QuestionResult] = field(default_factory=list)
    test_models: bool = False

    def summary(self, kind: str | None = None) -> dict[str, Any]:
        """Return the figures over all questions, or over one kind.

        Recall is pooled over gold facts (a three-fact question weighs three times a one-fact
        one); precision is pooled over citations; exact match is over the questions that define
        one; calls, tokens and latency are per question (mean, and median latency).
        """
        rows = [r for r in self.results if kind is None or r.kind == kind]
        gold = sum(len(r.gold) for r in rows)
        cited = sum(r.cited for r in rows)
        matched = [r.exact_match for r in rows if r.exact_match is not None]
        count = len(rows)
        return {
            "questions": count,
            "failed": sum(r.error is not None for r in rows),
            "gold_facts": gold,
            "fact_recall": sum(r.in_context for r in rows) / gold if gold else None,
            "questions_complete": sum(r.in_context == len(r.gold) for r in rows),
            "citations": cited,
            "citation_precision": sum(r.cited_gold for r in rows) / cited if cited else None,
            "dangling_citations": sum(r.dangling for r in rows),
            "exact_match": sum(matched) / len(matched) if matched else None,
            "exact_match_questions": len(matched),
            "model_calls_per_question": sum(r.model_calls for r in rows) / count if count else None,
            "prompt_tokens_per_question": sum(r.prompt_tokens for r in rows) / count if count else None,
            "latency_median_s": statistics.median(r.latency_s for r in rows) if rows else None,
            "latency_total_s": sum(r.latency_s for r in rows),
        }

    def to_dict(self) -> dict[str, Any]:
        """Return the report as JSON-ready data: overall, per kind, per question."""
        return {
            "test_models": self.test_models,
            "notice": TEST_MODELS_NOTICE if self.test_models else None,
            "overall": self.summary(),
            "by_kind": {kind: self.summary(kind) for kind in KINDS if any(r.kind == kind for r in self.results)},
            "questions": [{**vars(r), "recall": r.recall} for r in self.results],
        }


def fixture_patient_ids() -> dict[str, str]:
    """Return each fixture patient's key -> logical id, from fixtures/manifest.json."""
    import json

    manifest = json.loads((DEFAULT_FIXTURES / "manifest.json").read_text(encoding="utf-8"))
    return {entry["key"]: entry["patient_id"] for entry in manifest["patients"]}


def answer_has_value(answer: str, expected: str) -> bool:
    """Return whether a number equal to ``expected`` appears in the answer (``1.40`` matches ``1.4``)."""
    prose = _CITATION.sub(" ", answer)
    return any(normalise_number(match.group()) == expected for match in _NUMBER.finditer(prose))


def oracle_plan_kwargs(question: EvalQuestion) -> dict[str, Any]:
    """Return ``{"plan": Plan(...)}`` naming the gold facts' record types, when ``run_ask`` takes a plan.

    The planning step may not exist in this build; then the agent plans nothing and the keyword
    is left out, so the same harness runs before and after it lands.
    """
    if "plan" not in inspect.signature(run_ask).parameters:
        return {}
    from agent.domain.plan import Plan

    return {"plan": Plan(resource_types=question.gold_types, needs_images=question.kind == "imaging")}


def score_run(
    question: EvalQuestion,
    result: AskResult,
    gold: list[str],
    value: str | None,
    calls: list[dict[str, Any]],
    latency_s: float,
) -> QuestionResult:
    """Score one finished run against its gold ids and expected value.

    Args:
        question: the question asked.
        result: what the run returned.
        gold: the gold facts' ``Type/id``.
        value: the expected number (normalised), or None when the question has none.
        calls: the ``meta`` of each model call the trace recorded.
        latency_s: the run's wall time.
    """
    sources = set(result.sources)
    gold_set = set(gold)
    return QuestionResult(
        patient=question.patient,
        kind=question.kind,
        question=question.text,
        gold=gold,
        in_context=sum(g in sources for g in gold),
        cited=len(result.citations),
        cited_gold=sum(c.valid and c.reference in gold_set for c in result.citations),
        dangling=sum(not c.valid for c in result.citations),
        exact_match=answer_has_value(result.answer, value) if value is not None else None,
        model_calls=len(calls),
        prompt_tokens=sum(int(meta.get("prompt_tokens") or 0) for meta in calls),
        latency_s=latency_s,
        run_id=result.run_id,
    )


def gold_for(question: EvalQuestion, resources: list[dict[str, Any]]) -> tuple[list[str], str | None]:
    """Return the question's gold ``Type/id`` list and its expected value, resolved in the fixtures.

    Raises:
        ConfigError: a gold fact names no fixture resource (the question set has rotted).
    """
    gold = []
    for fact in question.facts:
        key = resolve_fact(fact, resources)
        if key is None:
            raise ConfigError(f"gold fact {fact} of {question.text!r} names no fixture resource")
        gold.append(key)
    value = None
    if question.value_fact is not None:
        key = resolve_fact(question.value_fact, resources)
        resource = next(r for r in resources if f"{r.get('resourceType')}/{r.get('id')}" == key)
        value = expected_value(resource)
    return gold, value


async def run_eval(
    runtime: AgentRuntime,
    questions: Sequence[EvalQuestion] = EVAL_QUESTIONS,
    *,
    limit: int | None = None,
    oracle_plan: bool = False,
) -> EvalReport:
    """Ask every question through the agent on the runtime's sources and score each run.

    A run that fails is kept in the report with its error code and nothing recalled, so a
    failure lowers the figures instead of hiding from them.

    Args:
        runtime: the agent's runtime; its sources must serve the fixture patients.
        questions: the questions to ask.
        limit: ask only the first ``limit`` questions.
        oracle_plan: hand the agent the gold facts' record types as its plan (when the agent has
            a planning step), to measure retrieval without the planner's choices.

    Raises:
        ConfigError: a gold fact names no fixture resource.
    """
    patients = fixture_resources()
    ids = fixture_patient_ids()
    report = EvalReport()
    for question in list(questions)[:limit]:
        patient, resources = patients[question.patient]
        gold, value = gold_for(question, [patient, *resources])
        extra = oracle_plan_kwargs(question) if oracle_plan else {}
        started = time.perf_counter()
        try:
            result = await run_ask(
                runtime,
                patient_id=ids[question.patient],
                question=question.text,
                trigger="eval",
                as_of=FIXTURE_AS_OF,
                **extra,
            )
        except MedagentError as exc:
            report.results.append(_failed(question, gold, value, exc, time.perf_counter() - started))
            continue
        latency = time.perf_counter() - started
        report.test_models = report.test_models or result.test_models
        trace = load_run(runtime.engine, result.run_id, include_content=False)
        calls = [event.meta for event in trace.events if event.kind == MODEL_CALL]
        report.results.append(score_run(question, result, gold, value, calls, latency))
    return report


def _failed(
    question: EvalQuestion, gold: list[str], value: str | None, exc: MedagentError, latency_s: float
) -> QuestionResult:
    return QuestionResult(
        patient=question.patient,
        kind=question.kind,
        question=question.text,
        gold=gold,
        in_context=0,
        cited=0,
        cited_gold=0,
        dangling=0,
        exact_match=False if value is not None else None,
        model_calls=0,
        prompt_tokens=0,
        latency_s=latency_s,
        run_id=exc.details.get("run_id"),
        error=exc.code,
    )
