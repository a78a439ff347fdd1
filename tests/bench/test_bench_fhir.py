"""``medagent bench fhir``: the generator, the gold question set and a small run of the benchmark."""

from __future__ import annotations

import importlib.util
import json
from types import ModuleType
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class

from agent.bench.fhir import fact_recall, fixture_resources, run_benchmark
from agent.bench.fhir_questions import QUESTIONS, Fact, resolve_fact
from agent.config import PROJECT_ROOT
from tests.support.plugin_servers import skip_or_fail_missing
from tests.support.servers import ServerToolMissingError


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "make_large_patient", PROJECT_ROOT / "tools" / "make_large_patient.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_large_patient_is_deterministic_valid_and_sized() -> None:
    make = _generator().make_large_patient
    bundle = make(observations=400, seed=3)
    assert json.dumps(bundle) == json.dumps(make(observations=400, seed=3))
    assert json.dumps(bundle) != json.dumps(make(observations=400, seed=4))
    assert bundle["type"] == "transaction"
    resources = [e["resource"] for e in bundle["entry"]]
    assert sum(r["resourceType"] == "Observation" for r in resources) == 400
    kinds = {r["resourceType"] for r in resources}
    assert {"Patient", "Condition", "MedicationRequest", "Medication", "Encounter", "DiagnosticReport"} <= kinds
    assert {"AllergyIntolerance", "DocumentReference"} <= kinds
    for entry in bundle["entry"]:
        resource = entry["resource"]
        assert entry["fullUrl"] == f"urn:uuid:{resource['id']}"
        assert entry["request"] == {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"}
    assert any("hasMember" in r for r in resources)
    assert any("medicationReference" in r for r in resources)
    assert any("extension" in r for r in resources)
    # Every reference points inside the bundle (urn:uuid full URLs), so a transaction resolves it.
    full_urls = {e["fullUrl"] for e in bundle["entry"]}
    text = json.dumps(bundle)
    for ref in {part.split('"')[0] for part in text.split('"reference": "')[1:]}:
        assert ref in full_urls
    # A sample of each type validates against the R4B models.
    seen: dict[str, int] = {}
    for resource in resources:
        if seen.setdefault(resource["resourceType"], 0) < 5:
            seen[resource["resourceType"]] += 1
            get_fhir_model_class(resource["resourceType"]).model_validate(resource)


def test_generator_refuses_tiny_sizes() -> None:
    with pytest.raises(ValueError, match="at least 10"):
        _generator().make_large_patient(observations=5)


def test_question_set_is_large_and_every_gold_fact_resolves() -> None:
    assert len(QUESTIONS) >= 50
    patients = fixture_resources()
    assert {q.patient for q in QUESTIONS} == set(patients)
    for question in QUESTIONS:
        patient, resources = patients[question.patient]
        keys = [resolve_fact(fact, [patient, *resources]) for fact in question.facts]
        assert None not in keys, question.text
        assert len(set(keys)) == len(keys), f"two facts name the same resource: {question.text}"


def test_resolve_fact_picks_newest_first_and_filters_by_date() -> None:
    resources: list[dict[str, Any]] = [
        {
            "resourceType": "Observation",
            "id": f"o{year}",
            "code": {"coding": [{"code": "X"}]},
            "effectiveDateTime": f"{year}-01-01",
        }
        for year in (2020, 2022, 2021)
    ]
    assert resolve_fact(Fact("Observation", "X"), resources) == "Observation/o2022"
    assert resolve_fact(Fact("Observation", "X", nth=1), resources) == "Observation/o2021"
    assert resolve_fact(Fact("Observation", "X", on="2020"), resources) == "Observation/o2020"
    assert resolve_fact(Fact("Observation", "X", nth=3), resources) is None
    assert resolve_fact(Fact("Observation", name="missing"), resources) is None


def test_tight_budget_recalls_less_than_the_default() -> None:
    default, tight = fact_recall(3000), fact_recall(600)
    assert 0 < tight["recall"] < default["recall"] <= 1


@pytest.mark.servers
@pytest.mark.slow
def test_small_benchmark_run_reports_sane_figures() -> None:
    lines: list[str] = []
    try:
        results = run_benchmark(observations=300, repeats=1, echo=lines.append)
    except ServerToolMissingError as exc:
        skip_or_fail_missing("FHIR server", exc)
    assert json.loads(lines[-1]) == results
    assert len(lines) >= 5
    assert results["speedup_vs_sequential"] > 0
    # one search is less work than twelve that read the same Observations and more besides
    assert 0 < results["observation_read_median_ms"] < results["sequential_median_ms"]
    assert results["speedup_bound_reading_everything"] > 1
    assert results["requests"] > 0
    assert results["sequential_requests"] >= 12  # Patient read + 11 searches, one page at least each
    assert 0 <= results["fact_recall"] <= 1
    assert 0 <= results["fact_recall_tight"] <= results["fact_recall"]
    assert results["token_reduction_vs_dump"] > 1
    assert results["token_counter"]
    assert results["resources_read"] >= results["sequential_resources_read"] - 1
