"""A re-implementation of the EHR Navigator agent's call pattern, the baseline of ``medagent bench agent``.

Google's EHR Navigator notebook answers a question over FHIR in steps, each a model call or a
tool call: build a manifest of what the record holds (tool), ask the model which resource types
the question needs (model), then for each chosen type fetch its resources (tool) and ask the
model to extract the relevant facts from their raw JSON (model), and finally ask the model to
synthesise an answer from the extracted facts (model). That is ``2 + 2 * types + 1`` calls, of
which ``types + 2`` go to the model. The prompts here are written for this project; the pattern
(what is called, in what order, over what input) is the baseline's.

Random weights make the identify step's choice meaningless, so the caller gives the types (the
ones the gold facts need: an oracle); the identify call still runs, since its cost is part of the
pattern. What the extraction calls saw is kept, so the baseline's fact recall is its best case: a
gold fact counts if any extraction call had its resource in the prompt.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from agent.graph.state import HISTORY_TYPES
from agent.inference.protocols import GenerationRequest, Reasoner
from agent.sources.protocols import FhirSource

#: The types the manifest covers: the same record types the agent fetches.
MANIFEST_TYPES: tuple[str, ...] = HISTORY_TYPES
#: Distinct concept names listed per type in the manifest.
MANIFEST_NAMES_PER_TYPE = 20

NAVIGATOR_SYSTEM = (
    "You are a clinical assistant that navigates a patient's electronic health record stored as "
    "FHIR R4 resources. Work only from the data you are given."
)
IDENTIFY_PROMPT = (
    "Question: {question}\n\nThe patient's record holds these resource types (count, example concepts):\n"
    "{manifest}\n\nWhich resource types are needed to answer the question? Reply with a JSON list of "
    'type names only, for example ["Observation", "Condition"].'
)
EXTRACT_PROMPT = (
    "Question: {question}\n\nBelow are all of the patient's {resource_type} resources as FHIR JSON, one "
    "per line.\n\n{resources}\n\nExtract every fact relevant to the question as a short bullet list. "
    "Give dates and values with units, and end each bullet with the resource it came from as "
    "[{resource_type}/id]. If nothing is relevant, reply 'none'."
)
SYNTHESIS_PROMPT = (
    "Question: {question}\n\nFacts extracted from the patient's record, by resource type:\n\n{facts}\n\n"
    "Answer the question using only these facts, citing each fact's [Type/id]."
)

StepKind = Literal["tool", "model"]


@dataclass
class NavigatorStep:
    """One call of the pattern: a tool call (FHIR) or a model call, with its cost."""

    kind: StepKind
    name: str
    seconds: float
    resource_type: str | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    seen: list[str] = field(default_factory=list)
    prompt: str = ""


@dataclass
class NavigatorRun:
    """A whole answer by the Navigator pattern: every step, the answer, the wall time."""

    answer: str
    steps: list[NavigatorStep]
    wall_s: float
    identified: str

    @property
    def model_steps(self) -> list[NavigatorStep]:
        """Return the model calls."""
        return [s for s in self.steps if s.kind == "model"]

    @property
    def prompt_tokens(self) -> int:
        """Return the prompt tokens over every model call."""
        return sum(s.prompt_tokens for s in self.model_steps)

    @property
    def model_seconds(self) -> float:
        """Return the time spent inside model calls."""
        return sum(s.seconds for s in self.model_steps)

    @property
    def seen(self) -> set[str]:
        """Return the ``Type/id`` of every resource any fact-extraction call had in its prompt."""
        return {ref for s in self.steps if s.name == "extract_facts" for ref in s.seen}


def _concept_name(resource: dict[str, Any]) -> str | None:
    for key in ("code", "medicationCodeableConcept", "type"):
        value = resource.get(key)
        concept = value[0] if isinstance(value, list) and value else value
        if isinstance(concept, dict):
            if isinstance(concept.get("text"), str):
                return str(concept["text"])
            for coding in concept.get("coding") or []:
                if isinstance(coding, dict) and isinstance(coding.get("display"), str):
                    return str(coding["display"])
    description = resource.get("description")
    return description if isinstance(description, str) else None


def manifest_text(resources_by_type: dict[str, list[dict[str, Any]]]) -> str:
    """Return the manifest: per type present, its count and its most frequent concept names."""
    lines = []
    for resource_type, resources in resources_by_type.items():
        if not resources:
            continue
        names = Counter(name for r in resources if (name := _concept_name(r)))
        listed = ", ".join(name for name, _ in names.most_common(MANIFEST_NAMES_PER_TYPE))
        lines.append(f"- {resource_type} ({len(resources)}): {listed}")
    return "\n".join(lines)


class Navigator:
    """Runs the pattern with one reasoner and a fixed number of generated tokens per model call."""

    def __init__(self, reasoner: Reasoner, *, max_new_tokens: int) -> None:
        """Keep the reasoner and the generation length every model call uses."""
        self.reasoner = reasoner
        self.max_new_tokens = max_new_tokens

    def _generate(self, steps: list[NavigatorStep], name: str, user_text: str, **extra: Any) -> str:
        result = self.reasoner.generate(
            GenerationRequest(system=NAVIGATOR_SYSTEM, user_text=user_text, max_new_tokens=self.max_new_tokens)
        )
        # The adapter's own latency is the model's compute, measured as the agent's trace measures it.
        steps.append(
            NavigatorStep(
                kind="model",
                name=name,
                seconds=result.latency_s,
                prompt_tokens=result.prompt_tokens,
                output_tokens=result.output_tokens,
                prompt=f"{NAVIGATOR_SYSTEM}\n\n{user_text}",
                **extra,
            )
        )
        return result.text

    async def run(self, fhir: FhirSource, patient_id: str, question: str, *, types: Sequence[str]) -> NavigatorRun:
        """Answer ``question`` about ``patient_id`` the Navigator way, over the given (oracle) types.

        Args:
            fhir: where the record is read from.
            patient_id: the patient's logical id.
            question: the question.
            types: the resource types to fetch and extract from (the identify call's choice is
                recorded but not followed: with random weights it is noise).
        """
        started = time.perf_counter()
        steps: list[NavigatorStep] = []

        tool_started = time.perf_counter()
        everything = {t: await fhir.search(t, {"patient": patient_id}) for t in MANIFEST_TYPES}
        steps.append(NavigatorStep(kind="tool", name="manifest", seconds=time.perf_counter() - tool_started))

        identified = self._generate(
            steps, "identify_types", IDENTIFY_PROMPT.format(question=question, manifest=manifest_text(everything))
        )

        facts: list[str] = []
        for resource_type in types:
            tool_started = time.perf_counter()
            resources = await fhir.search(resource_type, {"patient": patient_id})
            steps.append(
                NavigatorStep(
                    kind="tool",
                    name="fetch",
                    resource_type=resource_type,
                    seconds=time.perf_counter() - tool_started,
                )
            )
            raw = "\n".join(json.dumps(resource) for resource in resources)
            extracted = self._generate(
                steps,
                "extract_facts",
                EXTRACT_PROMPT.format(question=question, resource_type=resource_type, resources=raw),
                resource_type=resource_type,
                seen=[f"{r.get('resourceType')}/{r.get('id')}" for r in resources],
            )
            facts.append(f"{resource_type}:\n{extracted}")

        answer = self._generate(
            steps, "synthesise", SYNTHESIS_PROMPT.format(question=question, facts="\n\n".join(facts))
        )
        return NavigatorRun(answer=answer, steps=steps, wall_s=time.perf_counter() - started, identified=identified)
