"""The evaluation's questions: the FHIR benchmark's, each with a kind and, for a value answer, the fact holding it.

Where it sits: ``medagent eval`` (agent/eval/harness.py) runs the agent on each question and
scores the run against the gold facts. The questions and their facts are those of
:data:`agent.bench.fhir_questions.QUESTIONS` (MedAgentBench-like kinds over the three fixture
patients), so the two benchmarks cannot drift apart. Expected values are never written down: a
value question names the gold fact that carries the value, and the value is read from the fixture
resource at run time, so regenerated fixtures keep the set valid.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from agent.bench.fhir_questions import QUESTIONS as FHIR_QUESTIONS
from agent.bench.fhir_questions import Fact, Question

Kind = Literal["lookup", "latest_value", "trend", "medication", "allergy", "imaging", "two_type"]
KINDS: tuple[Kind, ...] = ("lookup", "latest_value", "trend", "medication", "allergy", "imaging", "two_type")
IMAGING_TYPES = frozenset({"ImagingStudy", "DiagnosticReport"})


@dataclass(frozen=True)
class EvalQuestion:
    """One evaluation question: the question and gold facts, its kind, and the fact holding the answer value.

    Attributes:
        question: patient key, text and gold facts.
        kind: what sort of question it is (MedAgentBench-like categories).
        value_fact: for questions answered by one measured value, the gold fact whose
            ``valueQuantity`` is the expected answer; None when the answer is not a single value.
    """

    question: Question
    kind: Kind
    value_fact: Fact | None = None

    @property
    def patient(self) -> str:
        """Return the fixture patient's key (``cxr``, ``ct``, ``noimg``)."""
        return self.question.patient

    @property
    def text(self) -> str:
        """Return the question's text."""
        return self.question.text

    @property
    def facts(self) -> tuple[Fact, ...]:
        """Return the gold facts."""
        return self.question.facts

    @property
    def gold_types(self) -> list[str]:
        """Return the record types the gold facts need, in first-seen order (the oracle plan's types)."""
        return list(dict.fromkeys(fact.type for fact in self.facts))


def kind_of(question: Question) -> Kind:
    """Classify a question by the record types its gold facts need.

    Imaging comes first (a report or study is what the question is about), then questions that
    need two record types, then the single-type kinds: allergy, medication, Observation trends
    (two of a series) and latest values (one), and plain lookups for the rest.
    """
    types = {fact.type for fact in question.facts}
    if types & IMAGING_TYPES:
        return "imaging"
    if len(types) >= 2:
        return "two_type"
    if types == {"AllergyIntolerance"}:
        return "allergy"
    if types == {"MedicationRequest"}:
        return "medication"
    if types == {"Observation"}:
        return "trend" if len(question.facts) >= 2 else "latest_value"
    return "lookup"


def _value_fact(question: Question, kind: Kind) -> Fact | None:
    # A single Observation asked for by value ("what is", "latest", "was ... normal") is answered
    # by its number; trends and panels (blood pressure has components) are not one value.
    if kind != "latest_value":
        return None
    return question.facts[0]


def build_questions(source: Iterable[Question] = FHIR_QUESTIONS) -> tuple[EvalQuestion, ...]:
    """Return the evaluation questions built from the FHIR benchmark's questions."""
    built = []
    for question in source:
        kind = kind_of(question)
        built.append(EvalQuestion(question, kind, _value_fact(question, kind)))
    return tuple(built)


EVAL_QUESTIONS: tuple[EvalQuestion, ...] = build_questions()


def expected_value(resource: dict[str, Any]) -> str | None:
    """Return the value an Observation states as a plain number string, or None when it has none.

    Panels (blood pressure) carry their values in components and have no single value.
    """
    quantity = resource.get("valueQuantity")
    if isinstance(quantity, dict) and isinstance(quantity.get("value"), int | float):
        return normalise_number(str(quantity["value"]))
    return None


def normalise_number(text: str) -> str:
    """Return a number's canonical spelling: no sign noise, no trailing zeros (``"1.40"`` -> ``"1.4"``)."""
    value = float(text.replace(",", ""))
    if value.is_integer():
        return str(int(value))
    return f"{value:.6f}".rstrip("0").rstrip(".")
