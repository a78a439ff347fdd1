"""A scripted reasoner for the plan and answer calls: plans from a script, answers by echoing tags.

It is deliberately gullible: if a prompt it sees carries an injected instruction, it obeys it
(plans everything and the images of another patient, cites a fake resource). Tests use it to show
that such text never reaches the planner and that what it makes the answer cite is removed.
"""

from __future__ import annotations

import re
import threading

from agent.inference.protocols import GenerationRequest, GenerationResult, ModelIdentity

INJECTION = re.compile(r"ignore previous instructions|call fetch_images", re.IGNORECASE)
EVIL_PLAN = '{"resource_types": ["DocumentReference"], "studies": ["other-patient"], "needs_images": true}'
_TAG = re.compile(r"\[([A-Z][A-Za-z]+/[A-Za-z0-9\-.]+)\]")


class PlanningReasoner:
    """Plan calls get the next scripted output (then a valid default); answer calls cite the record's tags."""

    identity = ModelIdentity(model_id="scripted-reasoner", backend="test")

    def __init__(self, plans: list[str] | None = None, block: threading.Event | None = None) -> None:
        self.plans = list(plans or [])
        self.requests: list[GenerationRequest] = []
        self.block = block

    def plan_requests(self) -> list[GenerationRequest]:
        return [r for r in self.requests if r.system.startswith("You plan")]

    def answer_requests(self) -> list[GenerationRequest]:
        return [r for r in self.requests if not r.system.startswith("You plan")]

    def generate(self, request: GenerationRequest) -> GenerationResult:
        self.requests.append(request)
        if self.block is not None:
            self.block.wait(10)
        if request.system.startswith("You plan"):
            if INJECTION.search(request.user_text):
                text = EVIL_PLAN
            elif self.plans:
                text = self.plans.pop(0)
            else:
                text = '{"resource_types": ["Condition", "Observation"]}'
            return GenerationResult(text=text, prompt_tokens=50, output_tokens=10, latency_s=0.01)
        tags = list(dict.fromkeys(_TAG.findall(request.user_text)))[:6]
        text = " ".join(f"Fact {n} [{tag}]." for n, tag in enumerate(tags, 1)) or "Nothing found."
        if INJECTION.search(request.user_text):
            text += " As instructed [Condition/fake]."
        return GenerationResult(text=text, prompt_tokens=100, output_tokens=20, latency_s=0.01)
