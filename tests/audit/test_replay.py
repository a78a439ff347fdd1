"""Replay from the trace alone, the re-run request, and the diff of two runs.

The traces come from the whole ask flow on the bundled fixtures (see tests/audit/test_export.py);
replay must give back exactly what run_ask returned, without calling a model or a server.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.audit.reader import load_run
from agent.audit.render import render_run
from agent.audit.replay import diff_runs, replay, rerun_request
from agent.domain.answer import Citation
from agent.errors import AuditError
from agent.inference.protocols import GenerationRequest, GenerationResult
from tests.audit.test_export import QUESTION, run_case
from tests.graph.test_ask_flow import PATIENTS, ScriptedReasoner


class OtherReasoner(ScriptedReasoner):
    """Cites the last condition in the prompt instead of the first, and nothing made up."""

    def generate(self, request: GenerationRequest) -> GenerationResult:
        self.requests.append(request)
        conditions = [t.strip("[]") for t in request.user_text.split() if t.startswith("[Condition/")]
        text = f"Heart failure is documented [{conditions[-1]}]."
        return GenerationResult(text=text, prompt_tokens=90, output_tokens=12, latency_s=0.01)


@pytest.mark.parametrize("kind", ["cxr", "noimg"])
async def test_replay_gives_back_what_run_ask_returned(tmp_path: Path, kind: str) -> None:
    case = await run_case(tmp_path, kind)
    result = case.result
    assert result is not None
    replayed = replay(case.trace)
    assert replayed.answer == result.answer
    assert replayed.sources == result.sources
    assert replayed.citations == result.citations
    assert replayed.findings == result.findings
    assert replayed.models == result.models
    assert (replayed.status, replayed.answer_source, replayed.warnings) == ("ok", "recorded", [])
    assert replayed.question == QUESTION
    assert replayed.timeline == render_run(case.trace)
    returned = {ref for e in case.trace.events if e.kind == "fhir_request" for ref in e.meta["resource_ids"]}
    assert replayed.fhir_resources == sorted(returned)


async def test_replay_without_the_citation_record_rechecks_the_model_output(tmp_path: Path) -> None:
    case = await run_case(tmp_path, "cxr")
    assert case.result is not None
    events = [e for e in case.trace.events if e.name != "citations"]
    replayed = replay(case.trace.model_copy(update={"events": events}))
    assert replayed.answer_source == "recomputed"
    assert (replayed.answer, replayed.citations) == (case.result.answer, case.result.citations)
    assert replayed.dangling == ["Observation/00000000-made-up"]
    assert any("never shown" in w for w in replayed.warnings)


async def test_the_recorded_answer_wins_over_a_different_recheck(tmp_path: Path) -> None:
    case = await run_case(tmp_path, "cxr")
    assert case.result is not None
    edited = [
        e.model_copy(update={"content": {"answer": "An answer the checker would not produce."}})
        if e.name == "citations"
        else e
        for e in case.trace.events
    ]
    replayed = replay(case.trace.model_copy(update={"events": edited}))
    assert (replayed.answer, replayed.answer_source) == ("An answer the checker would not produce.", "recorded")
    # the citations are then the record's own lists (valid first, then dangling)
    assert [c.valid for c in replayed.citations] == sorted((c.valid for c in case.result.citations), reverse=True)
    assert any("differs from the model output" in w for w in replayed.warnings)


async def test_replay_of_a_failed_run_has_its_error_and_no_answer(tmp_path: Path) -> None:
    case = await run_case(tmp_path, "unknown")
    replayed = replay(case.trace)
    assert (replayed.status, replayed.answer, replayed.answer_source) == ("failed", "", "none")
    assert replayed.error is not None and replayed.error["code"] == "patient_not_found"
    assert replayed.sources == [] and replayed.citations == []
    assert rerun_request(case.trace) == ("no-such-patient", QUESTION)


async def test_unreadable_content_is_said_not_guessed(tmp_path: Path) -> None:
    case = await run_case(tmp_path, "cxr")
    assert case.result is not None
    metadata_only = load_run(case.runtime.engine, case.trace.run.run_id, include_content=False)
    # encrypted content read without its key comes back as {"encrypted": true}
    encrypted = case.trace.model_copy(
        update={
            "events": [
                e.model_copy(update={"content": {"encrypted": True}}) if e.content is not None else e
                for e in case.trace.events
            ]
        }
    )
    for trace in (metadata_only, encrypted):
        replayed = replay(trace)
        assert (replayed.answer, replayed.answer_source, replayed.question) == ("", "unavailable", None)
        assert replayed.sources == case.result.sources  # metadata: still there
        # citations fall back to the record's metadata: valid ones, then dangling ones
        assert replayed.citations == [
            *[c for c in case.result.citations if c.valid],
            *[c for c in case.result.citations if not c.valid],
        ]
        assert any("not readable" in w for w in replayed.warnings)
        with pytest.raises(AuditError, match="not readable"):
            rerun_request(trace)
        assert replayed.unreadable == ["question", "answer", "findings"]
    run_id = case.trace.run.run_id
    assert diff_runs(replay(case.trace), replay(metadata_only)) == [
        f"answer not comparable: not readable in run {run_id}",
        f"findings not comparable: not readable in run {run_id}",
    ]


async def test_rerun_request_gives_the_recorded_patient_and_question(tmp_path: Path) -> None:
    case = await run_case(tmp_path, "noimg")
    assert rerun_request(case.trace) == (PATIENTS["noimg"]["patient_id"], QUESTION)
    no_start = case.trace.model_copy(update={"events": case.trace.events[1:]})
    with pytest.raises(AuditError, match="no run_started"):
        rerun_request(no_start)


async def test_identical_runs_have_no_differences(tmp_path: Path) -> None:
    first = await run_case(tmp_path, "cxr")
    second = await run_case(tmp_path, "cxr", runtime=first.runtime)
    assert first.trace.run.run_id != second.trace.run.run_id
    assert diff_runs(replay(first.trace), replay(second.trace)) == []


async def test_a_different_answer_is_reported(tmp_path: Path) -> None:
    first = await run_case(tmp_path, "cxr")
    second = await run_case(tmp_path / "other", "cxr", reasoner=OtherReasoner())
    a, b = replay(first.trace), replay(second.trace)
    lines = diff_runs(a, b)
    assert any(line.startswith("answer changed:") for line in lines)
    assert "citation removed: Observation/00000000-made-up (dangling)" in lines
    new = next(c.reference for c in b.citations)
    if new not in {c.reference for c in a.citations}:
        assert f"citation added: {new} (valid)" in lines
    assert not any(line.startswith(("source", "FHIR resource", "reasoner", "scorer")) for line in lines)


async def test_diff_names_sources_resources_citations_and_models(tmp_path: Path) -> None:
    case = await run_case(tmp_path, "noimg")
    a = replay(case.trace)
    dropped, fetched = a.sources[-1], a.fhir_resources[0]
    reasoner_id = a.models["reasoner"]
    b = a.model_copy(
        update={
            "sources": [*a.sources[:-1], "Observation/new"],
            "fhir_resources": a.fhir_resources[1:],
            "citations": [Citation(reference=c.reference, valid=not c.valid) for c in a.citations],
            "model_revisions": {**a.model_revisions, "reasoner": "abc123"},
            "status": "failed",
        }
    )
    lines = diff_runs(a, b)
    assert "status changed: ok -> failed" in lines
    assert "source added: Observation/new" in lines and f"source removed: {dropped}" in lines
    assert f"FHIR resource returned removed: {fetched}" in lines
    assert a.citations and all(f"citation {c.reference} changed" in "\n".join(lines) for c in a.citations)
    assert "reasoner revision changed: - -> abc123" in lines
    c = a.model_copy(update={"models": {**a.models, "reasoner": "google/medgemma-4b-it"}})
    assert diff_runs(a, c) == [f"reasoner model changed: {reasoner_id} -> google/medgemma-4b-it"]
