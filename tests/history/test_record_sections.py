"""Every clinical type a clinician asks about is rendered dated and cited; selection holds on long records."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from agent.history.context import build_context

AS_OF = datetime(2020, 6, 15, tzinfo=UTC)
PATIENT = {"resourceType": "Patient", "id": "p1", "gender": "male", "birthDate": "1950-01-01"}
SNOMED = "http://snomed.info/sct"


def _concept(code: str, display: str, system: str = SNOMED) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


def _line(text: str, tag: str) -> str:
    return next(line for line in text.splitlines() if tag in line)


def test_new_types_are_rendered_dated_and_cited() -> None:
    condition = {"resourceType": "Condition", "id": "c1", "code": _concept("44054006", "Diabetes")}
    resources = [
        condition,
        {
            "resourceType": "Procedure",
            "id": "pr1",
            "status": "completed",
            "code": _concept("80146002", "Appendectomy"),
            "performedPeriod": {"start": "2015-03-02T10:00:00Z"},
        },
        {
            "resourceType": "Immunization",
            "id": "im1",
            "status": "completed",
            "vaccineCode": _concept("140", "Influenza, seasonal", "http://hl7.org/fhir/sid/cvx"),
            "occurrenceDateTime": "2019-10-01",
        },
        {
            "resourceType": "CarePlan",
            "id": "cp1",
            "status": "active",
            "category": [_concept("698360004", "Diabetes self management plan")],
            "period": {"start": "2016-01-01"},
            "activity": [{"detail": {"code": _concept("160670007", "Diabetic diet")}}],
            "addresses": [{"reference": "Condition/c1"}],
        },
        {
            "resourceType": "Goal",
            "id": "g1",
            "lifecycleStatus": "active",
            "description": {"text": "HbA1c below 7.0"},
            "target": [{"dueDate": "2020-12-01"}],
        },
        {
            "resourceType": "Device",
            "id": "d1",
            "status": "active",
            "type": _concept("705643001", "Coronary artery stent"),
            "manufactureDate": "2014-05-01",
        },
        {
            "resourceType": "FamilyMemberHistory",
            "id": "f1",
            "relationship": {"text": "mother"},
            "condition": [{"code": {"text": "Breast cancer"}, "onsetAge": {"value": 52}}],
        },
        {
            "resourceType": "ServiceRequest",
            "id": "s1",
            "status": "active",
            "code": _concept("306206005", "Referral to cardiology"),
            "authoredOn": "2020-05-01",
        },
        {
            "resourceType": "Encounter",
            "id": "e1",
            "class": {"code": "AMB"},
            "type": [{"text": "Follow-up"}],
            "period": {"start": "2020-06-01"},
            "reasonReference": [{"reference": "Condition/c1"}],
        },
    ]
    text = build_context(PATIENT, resources, as_of=AS_OF).text
    assert "- Appendectomy: 2015-03-02 (5 years ago) [Procedure/pr1]" in text
    assert "- Influenza, seasonal: 2019-10-01 (8 months ago) [Immunization/im1]" in text
    care_plan = _line(text, "[CarePlan/cp1]")
    assert "Diabetes self management plan: active, from 2016-01-01" in care_plan
    assert "activities: Diabetic diet; for Diabetes [Condition/c1]" in care_plan
    assert "- HbA1c below 7.0: active, due 2020-12-01 (in 6 months) [Goal/g1]" in text
    assert "- Coronary artery stent: active, made 2014-05-01 (6 years ago) [Device/d1]" in text
    assert "- mother: Breast cancer at 52 [FamilyMemberHistory/f1]" in text
    assert "- Referral to cardiology: active, 2020-05-01 (45 days ago) [ServiceRequest/s1]" in text
    assert "- 2020-06-01 (14 days ago) AMB Follow-up, reason: Diabetes [Condition/c1] [Encounter/e1]" in text
    for heading in ("Procedures", "Immunizations", "Care plans", "Goals", "Devices", "Family history", "Orders"):
        assert f"## {heading}" in text


def _observation(oid: str, code: str, name: str, value: float, when: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": oid,
        "code": _concept(code, name, "http://loinc.org"),
        "category": [{"coding": [{"code": "laboratory"}]}],
        "valueQuantity": {"value": value, "unit": "mg/dL"},
        "effectiveDateTime": when,
    }


def test_every_series_keeps_a_flowsheet_line_whatever_the_question() -> None:
    # 40 series of 6 readings: a question about none of them still sees every one of them
    resources = [
        _observation(f"o{n}-{k}", f"{1000 + n}-1", f"Analyte number {n}", n + k, f"201{k}-01-01")
        for n in range(40)
        for k in range(6)
    ]
    context = build_context(PATIENT, resources, as_of=AS_OF, question="Any allergies?", token_budget=3000)
    for n in range(40):
        assert f"[Observation/o{n}-5]" in context.text, n  # the newest reading of every series
    assert "6 readings in all since 2010" in context.text


def test_a_lab_is_found_by_its_own_name_and_a_trend_shows_three_readings() -> None:
    resources = [
        _observation(f"o{n}-{k}", f"{1000 + n}-1", f"Analyte number {n}", n + k, f"201{k}-01-01")
        for n in range(40)
        for k in range(6)
    ]
    resources += [
        _observation(f"x{k}", "2947-0", "Sodium [Moles/volume] in Blood", 140 + k, f"201{k}-02-01") for k in range(6)
    ]
    context = build_context(PATIENT, resources, as_of=AS_OF, question="What is the trend of sodium?", token_budget=600)
    line = _line(context.text, "Sodium")
    assert all(f"[Observation/x{k}]" in line for k in (5, 4, 3))
    assert context.text.index("Sodium") < context.text.index("Analyte number")


def test_the_plan_codes_select_a_series_the_question_does_not_name() -> None:
    resources = [_observation(f"o{n}", f"{1000 + n}-1", f"Analyte number {n}", n, "2019-01-01") for n in range(200)] + [
        _observation("cr", "2160-0", "Creatinine", 1.2, "2015-01-01")
    ]
    question = "How is he doing?"
    plain = build_context(PATIENT, resources, as_of=AS_OF, question=question, token_budget=300)
    planned = build_context(PATIENT, resources, as_of=AS_OF, question=question, token_budget=300, plan_terms=["2160-0"])
    assert "[Observation/cr]" in planned.text
    assert plain.text != planned.text


def _med(mid: str, name: str, status: str, when: str) -> dict[str, Any]:
    return {
        "resourceType": "MedicationRequest",
        "id": mid,
        "status": status,
        "medicationCodeableConcept": _concept(mid, name, "http://www.nlm.nih.gov/research/umls/rxnorm"),
        "authoredOn": when,
    }


def test_current_medications_lists_every_active_order_first() -> None:
    active = [_med(f"a{n}", f"Active drug {n}", "active", f"200{n}-01-01") for n in range(6)]
    stopped = [_med(f"s{n}", f"Old drug {n}", "stopped", f"2019-0{n + 1}-01") for n in range(8)]
    context = build_context(
        PATIENT, stopped + active, as_of=AS_OF, question="What are his current medications?", token_budget=220
    )
    assert all(f"[MedicationRequest/a{n}]" in context.text for n in range(6))
    assert "more medications not shown" in context.text  # the stopped ones are counted, not dropped silently


def _vaccine(vid: str, when: str) -> dict[str, Any]:
    return {
        "resourceType": "Immunization",
        "id": vid,
        "status": "completed",
        "vaccineCode": _concept("140", "Influenza", "http://hl7.org/fhir/sid/cvx"),
        "occurrenceDateTime": when,
    }


def test_a_year_question_lists_every_matching_item_or_says_how_many_are_left_out() -> None:
    doses = [_vaccine(f"v{year}-{month}", f"{year}-{month:02d}-01") for year in range(2010, 2020) for month in (3, 9)]
    text = build_context(PATIENT, doses, as_of=AS_OF, question="Which shots did he get in 2014?").text
    assert "[Immunization/v2014-3]" in text and "[Immunization/v2014-9]" in text
    assert "[Immunization/v2013-9]" not in text
    tight = build_context(PATIENT, doses, as_of=AS_OF, question="Which shots did he get in 2014?", token_budget=85)
    assert "(2 more matching not listed)" in tight.text


def test_the_last_visit_selects_what_happened_that_day() -> None:
    resources = [
        {
            "resourceType": "Encounter",
            "id": "e1",
            "class": {"code": "AMB"},
            "period": {"start": "2020-05-02T09:00:00Z"},
        },
        {"resourceType": "Encounter", "id": "e0", "class": {"code": "AMB"}, "period": {"start": "2018-01-01"}},
        _observation("bp-old", "9999-9", "Some analyte", 1, "2018-01-01"),
        _observation("bp-new", "9999-9", "Some analyte", 2, "2020-05-02T09:10:00Z"),
        *[_observation(f"o{n}", f"{1000 + n}-1", f"Analyte number {n}", n, "2019-01-01") for n in range(100)],
    ]
    context = build_context(
        PATIENT, resources, as_of=AS_OF, question="What was measured at the last visit?", token_budget=200
    )
    assert "[Observation/bp-new]" in context.text and "[Encounter/e1]" in context.text


def test_a_malformed_resource_is_left_out_and_named_the_rest_is_read() -> None:
    bad = _observation("bad", "2160-0", "Creatinine", 1.0, "2019-01-01")
    bad["referenceRange"] = [{"low": "not a quantity"}]
    good = _observation("good", "2345-7", "Glucose", 99, "2019-01-01")
    context = build_context(PATIENT, [bad, good], as_of=AS_OF)
    assert context.unreadable == ["Observation/bad"]
    assert "[Observation/good]" in context.text and "Observation/bad" not in context.text
    assert "UNREADABLE: 1 malformed resource(s) left out." in context.text


def test_billing_resources_are_not_clinical_context() -> None:
    claim = {"resourceType": "Claim", "id": "cl1", "status": "active", "created": "2019-01-01"}
    text = build_context(PATIENT, [claim], as_of=AS_OF).text
    assert "Claim" not in text
