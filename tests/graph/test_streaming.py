"""Streaming a run: progress per node, answer tokens as the reasoner yields them, findings, citations, the end."""

from __future__ import annotations

import json
import shutil
from collections.abc import Generator
from pathlib import Path

from agent.config import DEFAULT_FIXTURES
from agent.graph.events import StreamEvent
from agent.inference.protocols import GenerationRequest, GenerationResult, GenerationStream
from agent.streaming import stream_ask
from tests.graph.scripted import PlanningReasoner
from tests.graph.test_ask_flow import PATIENTS, FakeScorer, _runtime

CXR = PATIENTS["cxr"]["patient_id"]


class StreamingReasoner(PlanningReasoner):
    """Streams its answer word by word, as the real backends do (GenerationStream)."""

    def stream(self, request: GenerationRequest) -> GenerationStream:
        final = self.generate(request)
        words = final.text.split(" ")

        def chunks() -> Generator[str, None, GenerationResult]:
            for n, word in enumerate(words):
                yield word if n == 0 else f" {word}"
            return final

        return GenerationStream(chunks())


async def _collect(**ask: object) -> list[StreamEvent]:
    return [event async for event in stream_ask(**ask)]  # type: ignore[arg-type]


async def test_events_come_in_order_and_tokens_make_the_answer(tmp_path: Path) -> None:
    reasoner = StreamingReasoner()
    runtime = _runtime(tmp_path, FakeScorer(), reasoner)
    events = await _collect(runtime=runtime, patient_id=CXR, question="What does the chest X-ray show?")

    progress = [(e.node, e.status) for e in events if e.type == "progress"]
    nodes = [node for node, status in progress if status == "finished"]
    assert nodes == ["resolve_patient", "plan", "access_check", "fetch_history", "image_findings", "reason",
                     "check_citations"]  # fmt: skip
    assert all((node, "started") in progress for node in nodes)
    tokens = [e.text for e in events if e.type == "token"]
    assert len(tokens) > 1  # streamed piece by piece, not as one block
    final = events[-1]
    assert final.type == "final" and final.status == "ok"
    raw = reasoner.answer_requests()[0]
    assert "".join(t or "" for t in tokens) == reasoner.generate(raw).text  # the tokens are the model's text
    # findings arrive before the answer's tokens; citations after them
    kinds = [e.type for e in events]
    assert kinds.index("finding") < kinds.index("token") < kinds.index("citation") < kinds.index("final")
    cited = {e.data["reference"] for e in events if e.type == "citation"}
    assert cited == {c["reference"] for c in final.data["citations"]}


async def test_a_reasoner_without_a_stream_sends_the_answer_as_one_token(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path, FakeScorer(), PlanningReasoner())
    events = await _collect(runtime=runtime, patient_id=PATIENTS["noimg"]["patient_id"], question="Status?")
    tokens = [e for e in events if e.type == "token"]
    assert len(tokens) == 1 and tokens[0].text and events[-1].type == "final"


async def test_failures_and_interrupts_end_the_stream_with_their_event(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path, FakeScorer(), PlanningReasoner())
    failed = await _collect(runtime=runtime, patient_id="no-such-patient", question="?")
    assert failed[-1].type == "error" and failed[-1].data["code"] == "patient_not_found"
    assert failed[-1].data["details"]["run_id"] and failed[-1].data["exit_code"] == 3
    assert ("resolve_patient", "failed") in [(e.node, e.status) for e in failed if e.type == "progress"]

    bundles = tmp_path / "fhir"
    shutil.copytree(DEFAULT_FIXTURES / "fhir", bundles)
    twins = [
        {"resourceType": "Patient", "id": f"twin-{n}", "identifier": [{"system": "urn:test:mrn", "value": "D"}]}
        for n in (1, 2)
    ]
    (bundles / "twins.json").write_text(
        json.dumps({"resourceType": "Bundle", "type": "collection", "entry": [{"resource": t} for t in twins]})
    )
    runtime.settings.fhir.bundle_dir = bundles
    runtime.settings.agent.checkpointer_url = None
    asked = await _collect(runtime=runtime, patient_id="identifier=urn:test:mrn|D", question="?", thread_id="s-1")
    assert asked[-1].type == "interrupt" and asked[-1].data["kind"] == "ambiguous_patient"
    assert asked[-1].data["thread_id"] == "s-1"
    resumed = await _collect(runtime=runtime, thread_id="s-1", resume={"patient_id": "twin-1"})
    assert resumed[-1].type == "final" and "Patient/twin-1" in resumed[-1].data["sources"]
