"""Generated questions: records read from bundles, gold ids on a hand-checked bundle, phrasing variety.

Real: the bundle-folder source that reads the records (``urn:uuid:`` references resolved as the
agent sees them). The bundle is written by the test (tests/eval/hand_bundle.py), so every gold id
below was checked by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.eval.generated import (
    KINDS,
    LAB_LAY_PHRASINGS,
    LAB_PHRASINGS,
    LAY_GROUPS,
    PHRASINGS,
    TREND_LAY_PHRASINGS,
    GeneratedQuestion,
    RecordQuestions,
    generate,
    short_lab_name,
)
from agent.eval.records import PatientRecord, bundle_files, link_only, read_records
from tests.eval.hand_bundle import AS_OF, EXPECTED, PATIENT_ID, hand_bundle, write_hand_bundle


async def _record(tmp_path: Path) -> PatientRecord:
    file = write_hand_bundle(tmp_path / "data")
    folder = tmp_path / "live"
    link_only(folder, file)
    (record,) = await read_records(folder, file)
    return record


def _by_kind(made: RecordQuestions, kind: str) -> list[GeneratedQuestion]:
    return [q for q in made.questions if q.kind == kind]


# -- reading records ------------------------------------------------------------------------------------


async def test_records_resolve_urn_uuid_references(tmp_path: Path) -> None:
    record = await _record(tmp_path)
    assert record.patient_id == PATIENT_ID and record.file.name == "hand.json"
    encounter = next(r for r in record.of_type("Encounter") if r["id"] == "enc-new")
    assert encounter["reasonReference"] == [{"reference": "Condition/cond-diabetes"}]
    assert {r["resourceType"] for r in record.resources} >= {"Observation", "Claim", "Immunization", "Procedure"}
    assert all(r["resourceType"] != "Patient" for r in record.resources)


async def test_each_patient_of_a_collection_bundle_is_a_record_with_its_own_resources(tmp_path: Path) -> None:
    two = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"resource": {"resourceType": "Patient", "id": "a"}},
            {"resource": {"resourceType": "Patient", "id": "b"}},
            {"resource": {"resourceType": "Condition", "id": "ca", "subject": {"reference": "Patient/a"}}},
            {"resource": {"resourceType": "Condition", "id": "cb", "subject": {"reference": "Patient/b"}}},
        ],
    }
    file = tmp_path / "data" / "two.json"
    file.parent.mkdir()
    file.write_text(json.dumps(two), encoding="utf-8")
    link = link_only(tmp_path / "live", file)
    assert link.is_symlink() and link.resolve() == file.resolve()
    records = await read_records(tmp_path / "live", file)
    assert [(r.patient_id, [c["id"] for c in r.resources]) for r in records] == [("a", ["ca"]), ("b", ["cb"])]


def test_bundle_files_are_sorted_by_name_and_link_only_leaves_one_entry(tmp_path: Path) -> None:
    for name in ("b.json", "a.json", "notes.txt"):
        (tmp_path / name).write_text("{}", encoding="utf-8")
    assert [f.name for f in bundle_files(tmp_path)] == ["a.json", "b.json"]
    live = tmp_path / "live"
    link_only(live, tmp_path / "a.json")
    link_only(live, tmp_path / "b.json")
    assert [p.name for p in live.iterdir()] == ["b.json"]


# -- gold on the hand-checked bundle ----------------------------------------------------------------------


async def test_gold_ids_per_kind_on_the_hand_checked_bundle(tmp_path: Path) -> None:
    made = generate(await _record(tmp_path), ordinal=0)

    assert made.as_of == AS_OF  # the newest clinical date plus a day; the later Claim does not count
    assert made.not_applicable == ()
    for kind in ("meds", "allergies", "conditions", "imaging", "bp", "encounter"):
        (question,) = _by_kind(made, kind)
        assert set(question.gold) == EXPECTED[kind], kind
    for kind in ("vaccines", "procedures"):
        (question,) = _by_kind(made, kind)
        year = next(y for y in ("2019", "2020") if y in question.text)
        assert set(question.gold) == EXPECTED[kind][year], kind


async def test_lab_questions_name_labs_the_records_way_and_take_the_newest_valid_value(tmp_path: Path) -> None:
    made = generate(await _record(tmp_path), ordinal=1)

    named = {q.text: set(q.gold) for q in _by_kind(made, "lab") if not q.phrasing.endswith(("3", "4", "5"))}
    assert len(named) == 2
    # the most measured lab first: glucose (the entered-in-error value is not the newest)
    glucose = next(text for text in named if "Glucose" in text)
    assert named[glucose] == EXPECTED["glucose_latest"] and "Serum" not in glucose and "[" not in glucose
    other = next(text for text in named if text != glucose)
    expected = EXPECTED["a1c_latest"] if "Hemoglobin A1c" in other else EXPECTED["creatinine_latest"]
    assert named[other] == expected  # the value-less A1c is not a result
    # the lay question (ordinal 1 picks the second lay group present: sugar control) takes each lab's newest
    (lay,) = [q for q in _by_kind(made, "lab") if q.text not in named]
    assert "sugar control" in lay.text
    assert set(lay.gold) == EXPECTED["glucose_latest"] | EXPECTED["a1c_latest"]


async def test_trend_questions_take_the_three_newest_values(tmp_path: Path) -> None:
    made = generate(await _record(tmp_path), ordinal=0)

    trend = _by_kind(made, "lab_trend")
    assert len(trend) == 2  # glucose by name, and its lay group: the only lab with 3 values
    assert all(set(q.gold) == EXPECTED["glucose_trend"] for q in trend)
    assert any("sugar control" in q.text for q in trend)


async def test_bp_without_a_panel_is_the_newest_systolic_and_diastolic(tmp_path: Path) -> None:
    record = await _record(tmp_path)
    resources = [r for r in record.resources if not str(r.get("id")).startswith("bp-")]
    resources += [
        {**r, "id": rid, "code": {"coding": [{"system": "http://loinc.org", "code": code}]}, "effectiveDateTime": when}
        for r in record.of_type("Observation")[:1]
        for rid, code, when in (
            ("sys-old", "8480-6", "2019-01-01"),
            ("sys-new", "8480-6", "2020-01-01"),
            ("dia-new", "8462-4", "2020-01-01"),
        )
    ]
    made = generate(PatientRecord(record.file, record.patient, tuple(resources)))
    (bp,) = _by_kind(made, "bp")
    assert set(bp.gold) == {"Observation/sys-new", "Observation/dia-new"}


async def test_a_record_without_data_for_a_kind_reports_it_not_applicable(tmp_path: Path) -> None:
    bare = generate(PatientRecord(tmp_path / "x.json", {"resourceType": "Patient", "id": "p0"}, ()))
    assert bare.questions == () and bare.not_applicable == KINDS and bare.as_of is None


# -- wording ------------------------------------------------------------------------------------------------


def test_every_kind_has_three_phrasings_and_lay_terms() -> None:
    for kind in KINDS:
        assert len(set(PHRASINGS[kind])) >= 3, kind
    assert len(LAB_PHRASINGS) >= 3 and len(LAB_LAY_PHRASINGS) >= 3 and len(TREND_LAY_PHRASINGS) >= 3
    every = " ".join(t for kind in KINDS for t in PHRASINGS[kind]) + " " + " ".join(g.phrase for g in LAY_GROUPS)
    for lay in (
        "kidney function",
        "sugar control",
        "cholesterol",
        "shots",
        "jabs",
        "operations",
        "pills",
        "is {he} taking",
        "allergic to",
        "wrong with",
        "health problems",
        "scan",
        "x-ray",
        "see the doctor",
    ):
        assert lay in every, lay


async def test_phrasings_rotate_across_records_and_pronouns_follow_gender(tmp_path: Path) -> None:
    record = await _record(tmp_path)
    seen: dict[str, set[str]] = {kind: set() for kind in KINDS}
    for ordinal in range(6):
        for question in generate(record, ordinal).questions:
            seen[question.kind].add(question.phrasing)
    assert all(len(seen[kind]) >= 3 for kind in KINDS), seen
    texts = [q.text for q in generate(record).questions]
    assert any(" her " in f" {t} " for t in texts) and not any(" his " in f" {t} " for t in texts)
    unknown = PatientRecord(record.file, {"resourceType": "Patient", "id": PATIENT_ID}, record.resources)
    assert any("the patient" in q.text for q in generate(unknown).questions)
    assert generate(record, 3) == generate(record, 3)  # deterministic


@pytest.mark.parametrize(
    ("long", "short"),
    [
        ("Glucose [Mass/volume] in Serum or Plasma", "Glucose"),
        ("Hemoglobin A1c/Hemoglobin.total in Blood", "Hemoglobin A1c"),
        ("Glomerular filtration rate/1.73 sq M.predicted", "Glomerular filtration rate"),
        ("Glucose [Mass/volume] in Urine by Test strip", "Glucose in Urine"),
        ("Leukocytes [#/volume] in Blood by Automated count", "Leukocytes"),
        ("Bilirubin.total [Mass/volume] in Serum or Plasma", "Bilirubin total"),
        ("Microalbumin/Creatinine [Mass/Ratio] in Urine", "Microalbumin/Creatinine in Urine"),
        ("NT-proBNP", "NT-proBNP"),
    ],
)
def test_lab_names_are_shortened_as_a_clinician_says_them(long: str, short: str) -> None:
    assert short_lab_name(long) == short


def test_hand_bundle_is_a_transaction_with_urn_uuid_references() -> None:
    bundle = hand_bundle()
    assert bundle["type"] == "transaction"
    assert all(e["fullUrl"].startswith("urn:uuid:") for e in bundle["entry"])
