"""The plan step inside the whole flow: model plan, repair, fallback to terms, a given plan, narrow fetches."""

from __future__ import annotations

from pathlib import Path

from agent.audit.reader import load_run
from agent.domain.plan import Plan
from agent.runner import run_ask
from tests.graph.scripted import PlanningReasoner
from tests.graph.test_ask_flow import PATIENTS, FakeScorer, _runtime

NOIMG = PATIENTS["noimg"]["patient_id"]
CXR = PATIENTS["cxr"]["patient_id"]


def _searched(trace: object) -> list[str]:
    return sorted({e.meta["path"].split("?")[0] for e in trace.events if e.kind == "fhir_request"})  # type: ignore[attr-defined]


async def test_model_plan_decides_what_the_answer_sees(tmp_path: Path) -> None:
    reasoner = PlanningReasoner(['{"resource_types": ["Observation"], "codes": ["4548-4"]}'])
    runtime = _runtime(tmp_path, FakeScorer(), reasoner)
    runtime.settings.agent.planner = "model"
    runtime.settings.agent.fetch = "plan"
    result = await run_ask(runtime, patient_id=NOIMG, question="How is the sugar control?")
    assert result.status == "ok"
    (plan_call,) = reasoner.plan_requests()
    assert "<record_manifest>" in plan_call.user_text and '"Observation": {"codes"' in plan_call.user_text
    # the answer's record holds only the planned type (plus the patient)
    assert {s.split("/")[0] for s in result.sources} == {"Patient", "Observation"}
    trace = load_run(runtime.engine, result.run_id)
    chosen = next(e for e in trace.events if e.name == "plan_chosen")
    assert chosen.meta["source"] == "model" and chosen.meta["plan"]["resource_types"] == ["Observation"]
    calls = [e.name for e in trace.events if e.kind == "model_call"]
    assert calls == ["medgemma.plan", "medgemma.generate"]
    # the manifest's fetch is reused: each type requested once in the whole run
    paths = [e.meta["path"] for e in trace.events if e.kind == "fhir_request"]
    searches = [path.split("?")[0] for path in paths if "?" in path]
    assert len(searches) == len(set(searches))


async def test_invalid_plan_is_repaired_once_then_falls_back_to_terms(tmp_path: Path) -> None:
    reasoner = PlanningReasoner(["sure! labs please", '{"resource_types": ["Observation"], "task": "diagnose"}'])
    runtime = _runtime(tmp_path, FakeScorer(), reasoner)
    runtime.settings.agent.planner = "model"
    result = await run_ask(runtime, patient_id=NOIMG, question="Current medications?")
    assert result.status == "ok"
    _, repair = reasoner.plan_requests()
    assert "<rejected_output>\nsure! labs please" in repair.user_text and "no JSON object" in repair.user_text
    trace = load_run(runtime.engine, result.run_id)
    invalid = [e for e in trace.events if e.name == "plan_invalid"]
    assert [e.meta["attempt"] for e in invalid] == [0, 1] and "task" in invalid[1].meta["error"]
    outputs = [e.content["output"] for e in trace.events if e.name == "medgemma.plan"]
    assert outputs == ["sure! labs please", '{"resource_types": ["Observation"], "task": "diagnose"}']
    chosen = next(e for e in trace.events if e.name == "plan_chosen")
    assert chosen.meta["source"] == "deterministic"
    assert chosen.meta["plan"]["resource_types"] == ["Condition", "MedicationRequest"]


async def test_repair_that_works_is_recorded_as_repair(tmp_path: Path) -> None:
    reasoner = PlanningReasoner(['{"resource_types": ["Labs"]}', '{"resource_types": ["Observation"]}'])
    runtime = _runtime(tmp_path, FakeScorer(), reasoner)
    runtime.settings.agent.planner = "model"
    result = await run_ask(runtime, patient_id=NOIMG, question="Sugar?")
    trace = load_run(runtime.engine, result.run_id)
    chosen = next(e for e in trace.events if e.name == "plan_chosen")
    assert chosen.meta["source"] == "repair"
    assert "unknown record types ['Labs']" in next(e for e in trace.events if e.name == "plan_invalid").meta["error"]


async def test_given_plan_makes_no_planner_call_and_narrows_the_fetch(tmp_path: Path) -> None:
    reasoner = PlanningReasoner()
    runtime = _runtime(tmp_path, FakeScorer(), reasoner)
    runtime.settings.agent.planner = "model"
    runtime.settings.agent.fetch = "plan"
    runtime.settings.agent.images = "plan"
    given = Plan(resource_types=["MedicationRequest"])
    result = await run_ask(runtime, patient_id=CXR, question="Summarise.", plan=given)
    assert reasoner.plan_requests() == [] and len(reasoner.answer_requests()) == 1
    assert reasoner.answer_requests()[0].images == [] and result.findings == []
    trace = load_run(runtime.engine, result.run_id)
    assert next(e for e in trace.events if e.name == "plan_chosen").meta["source"] == "given"
    assert _searched(trace) == ["MedicationRequest", "Patient/" + CXR, "metadata"] or _searched(trace) == sorted(
        ["MedicationRequest", f"Patient/{CXR}", "metadata", "Medication"]
    )
    assert not any(e.kind == "dicom_retrieval" for e in trace.events)


async def test_report_task_with_prior_study_labels_current_and_prior(tmp_path: Path) -> None:
    reasoner = PlanningReasoner()
    runtime = _runtime(tmp_path, FakeScorer(), reasoner)
    runtime.settings.agent.images = "plan"
    result = await run_ask(runtime, patient_id=CXR, question="Draft a report for this study, compared with the prior")
    sent = reasoner.answer_requests()[0]
    assert "FINDINGS:" in sent.user_text and "IMPRESSION:" in sent.user_text
    studies = sorted(PATIENTS["cxr"]["studies"], key=lambda s: s["started"])
    prior, current = studies[0], studies[-1]
    assert f"- current [ImagingStudy/{current['imaging_study_id']}]" in sent.user_text
    assert f"- prior [ImagingStudy/{prior['imaging_study_id']}]" in sent.user_text
    assert len(sent.images) == 2 and getattr(sent, "image_labels", ["current", "prior"]) == ["current", "prior"]
    # findings are of the current study only
    current_uids = {i["sop_instance_uid"] for i in current["instances"]}
    assert {f["image"]["sop_instance_uid"] for f in result.findings} <= current_uids  # type: ignore[index]


async def test_auto_plans_with_medgemma_and_the_plan_narrows_the_fetch_and_images(tmp_path: Path) -> None:
    reasoner = PlanningReasoner(['{"resource_types": ["Condition"], "needs_images": false}'])
    runtime = _runtime(tmp_path, FakeScorer(), reasoner)
    runtime.settings.agent.planner = "auto"  # the shipped default
    result = await run_ask(runtime, patient_id=CXR, question="Which problems are active?")
    assert result.status == "ok" and len(reasoner.plan_requests()) == 1
    assert {s.split("/")[0] for s in result.sources} == {"Patient", "Condition"}
    trace = load_run(runtime.engine, result.run_id)
    chosen = next(e for e in trace.events if e.name == "plan_chosen")
    assert chosen.meta["modes"] == {"planner": "model", "fetch": "plan", "images": "plan"}
    assert not [e for e in trace.events if e.kind == "dicom_retrieval"]  # the plan needs no images


async def test_auto_plans_from_terms_with_test_models(tmp_path: Path) -> None:
    from agent.inference.protocols import ModelIdentity

    reasoner = PlanningReasoner()
    reasoner.identity = ModelIdentity(model_id="tiny-gemma", backend="test", test_model=True)
    runtime = _runtime(tmp_path, FakeScorer(), reasoner)
    runtime.settings.agent.planner = "auto"
    result = await run_ask(runtime, patient_id=CXR, question="Which problems are active?")
    assert result.status == "ok" and reasoner.plan_requests() == []
    trace = load_run(runtime.engine, result.run_id)
    chosen = next(e for e in trace.events if e.name == "plan_chosen")
    assert chosen.meta["modes"] == {"planner": "terms", "fetch": "all", "images": "always"}
    assert [e for e in trace.events if e.kind == "dicom_retrieval"]  # a study: images always, as before
