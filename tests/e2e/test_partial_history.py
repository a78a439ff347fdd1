"""A history type the server keeps failing: the run goes on, the context says the record is partial."""

from __future__ import annotations

import json
from pathlib import Path

from agent.audit.reader import load_run
from agent.config import DEFAULT_FIXTURES, get_settings
from agent.inference.factory import LoadedModels
from agent.runner import AgentRuntime, ModelCache, run_ask
from tests.graph.test_ask_flow import FakeScorer, ScriptedReasoner
from tests.support.fault_proxy import Fault, FaultProxy
from tests.support.servers import FhirServerHandle

NOIMG = next(p for p in json.loads((DEFAULT_FIXTURES / "manifest.json").read_text())["patients"] if p["key"] == "noimg")


async def test_failing_type_is_marked_partial_and_traced(fhir_server: FhirServerHandle, tmp_path: Path) -> None:
    reasoner = ScriptedReasoner()
    with FaultProxy(fhir_server.base_url) as proxy:
        # every attempt at the Observation search fails (first try + 1 retry)
        proxy.add_rule(r"^Observation\?", [Fault.status_code(503), Fault.status_code(503)])
        settings = get_settings(
            fhir={"base_url": proxy.base_url, "max_retries": 1, "backoff_base_s": 0.01},
            db={"url": f"sqlite:///{tmp_path / 'trace.db'}"},
        )
        loaded = LoadedModels(scorer=FakeScorer(), reasoner=reasoner, used_test_models=False)
        runtime = AgentRuntime(settings=settings, models=ModelCache(loader=lambda _s: loaded))
        result = await run_ask(runtime, patient_id=NOIMG["patient_id"], question="HbA1c trend?")

    assert result.status == "ok"
    assert not any(source.startswith("Observation/") for source in result.sources)
    prompt = reasoner.requests[0].user_text
    assert "PARTIAL RECORD" in prompt and "Observation (source_unavailable)" in prompt
    trace = load_run(runtime.engine, result.run_id)
    partial = next(e for e in trace.events if e.name == "partial_history")
    assert partial.meta["missing"] == {"Observation": "source_unavailable"}
    failed = [e for e in trace.events if e.kind == "fhir_request" and e.meta["path"].startswith("Observation?")]
    assert [e.meta["status"] for e in failed] == [503, 503]  # both attempts recorded
    assert "attempt 1/2" in failed[0].meta["error"]
