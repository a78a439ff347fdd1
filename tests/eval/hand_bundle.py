"""A small hand-written transaction bundle whose gold answers are known per question kind.

Written like real exports: ``urn:uuid:`` fullUrls and references, POST requests, a LOINC lab
named the long way (``... [Mass/volume] in Serum or Plasma``). The answers each test expects are
in :data:`EXPECTED`; every distractor beside them (a stopped drug, an abated condition, an
entered-in-error value, a value-less lab, an older study) is there to be left out.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

LOINC = "http://loinc.org"
PATIENT_ID = "hand-1"
LAB = [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}]
VITALS = [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}]

#: Gold per kind, hand-checked against the resources below.
EXPECTED: dict[str, Any] = {
    "meds": {"MedicationRequest/med-active", "MedicationRequest/med-hold"},
    "allergies": {"AllergyIntolerance/alg-peanut"},
    "conditions": {"Condition/cond-diabetes", "Condition/cond-asthma"},
    "imaging": {"ImagingStudy/img-new"},
    "bp": {"Observation/bp-new"},
    "encounter": {"Encounter/enc-new", "Condition/cond-diabetes"},
    "vaccines": {
        "2019": {"Immunization/imm-flu-2019", "Immunization/imm-tdap-2019"},
        "2020": {"Immunization/imm-flu-2020"},
    },
    "procedures": {"2019": {"Procedure/proc-2019"}, "2020": {"Procedure/proc-2020a", "Procedure/proc-2020b"}},
    "glucose_latest": {"Observation/glu-4"},
    "glucose_trend": {"Observation/glu-4", "Observation/glu-3", "Observation/glu-2"},
    "a1c_latest": {"Observation/a1c-new"},
    "creatinine_latest": {"Observation/creat-1"},
}
#: The newest clinical date (enc-new's end) plus one day.
AS_OF = datetime(2020, 6, 3, 10, 0, tzinfo=UTC)


def _urn(resource_id: str) -> str:
    return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, resource_id)}"


def _lab(rid: str, code: str, text: str, when: str, value: float | None, **extra: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": rid,
        "status": "final",
        "category": LAB,
        "code": {"coding": [{"system": LOINC, "code": code, "display": text}], "text": text},
        "subject": {"reference": _urn(PATIENT_ID)},
        "effectiveDateTime": when,
        **extra,
    }
    if value is not None:
        resource["valueQuantity"] = {"value": value, "unit": "mg/dL"}
    return resource


def _bp(rid: str, code: str, when: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": rid,
        "status": "final",
        "category": VITALS,
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": _urn(PATIENT_ID)},
        "effectiveDateTime": when,
    }


def _clinical(resource_type: str, rid: str, **fields: Any) -> dict[str, Any]:
    subject = "patient" if resource_type in ("AllergyIntolerance", "Immunization") else "subject"
    return {"resourceType": resource_type, "id": rid, subject: {"reference": _urn(PATIENT_ID)}, **fields}


def _status(system: str, code: str) -> dict[str, Any]:
    return {"coding": [{"system": f"http://terminology.hl7.org/CodeSystem/{system}", "code": code}]}


def hand_resources() -> list[dict[str, Any]]:
    """Return the record's resources, the Patient first."""
    glucose = "Glucose [Mass/volume] in Serum or Plasma"
    a1c = "Hemoglobin A1c/Hemoglobin.total in Blood"
    return [
        {"resourceType": "Patient", "id": PATIENT_ID, "gender": "female", "birthDate": "1960-02-01"},
        _lab("glu-1", "2345-7", glucose, "2018-03-01T09:00:00+00:00", 101),
        _lab("glu-2", "2345-7", glucose, "2019-03-01T09:00:00+00:00", 110),
        _lab("glu-3", "2345-7", glucose, "2020-03-01T09:00:00+00:00", 120),
        _lab("glu-4", "2345-7", glucose, "2020-05-01T09:00:00+00:00", 130),
        _lab("glu-error", "2345-7", glucose, "2020-05-20T09:00:00+00:00", 999, status="entered-in-error"),
        _lab("a1c-old", "4548-4", a1c, "2019-01-01T09:00:00+00:00", 7.9),
        _lab("a1c-new", "4548-4", a1c, "2020-04-01T09:00:00+00:00", 7.1),
        _lab("a1c-pending", "4548-4", a1c, "2020-05-25T09:00:00+00:00", None, dataAbsentReason={"text": "pending"}),
        _lab("creat-1", "2160-0", "Creatinine [Mass/volume] in Serum or Plasma", "2020-04-01T09:00:00+00:00", 1.1),
        _bp("bp-old", "85354-9", "2020-01-10T09:00:00+00:00"),
        _bp("bp-new", "85354-9", "2020-05-01T09:00:00+00:00"),
        _bp("bp-systolic-alone", "8480-6", "2020-05-30T09:00:00+00:00"),  # a panel exists: not the answer
        _clinical("MedicationRequest", "med-active", status="active", medicationCodeableConcept={"text": "Metformin"}),
        _clinical("MedicationRequest", "med-hold", status="on-hold", medicationCodeableConcept={"text": "Lisinopril"}),
        _clinical("MedicationRequest", "med-stopped", status="stopped", medicationCodeableConcept={"text": "Statin"}),
        _clinical("AllergyIntolerance", "alg-peanut", code={"text": "Peanut"}),
        _clinical(
            "AllergyIntolerance",
            "alg-error",
            code={"text": "Penicillin"},
            verificationStatus=_status("allergyintolerance-verification", "entered-in-error"),
        ),
        _clinical(
            "Condition",
            "cond-diabetes",
            clinicalStatus=_status("condition-clinical", "active"),
            code={"text": "Diabetes"},
        ),
        _clinical(
            "Condition", "cond-asthma", clinicalStatus=_status("condition-clinical", "relapse"), code={"text": "Asthma"}
        ),
        _clinical(
            "Condition",
            "cond-sprain",
            clinicalStatus=_status("condition-clinical", "active"),
            code={"text": "Sprain"},
            abatementDateTime="2019-06-01",
        ),
        _clinical(
            "Condition", "cond-flu", clinicalStatus=_status("condition-clinical", "resolved"), code={"text": "Flu"}
        ),
        _clinical("ImagingStudy", "img-old", status="available", started="2018-02-01T09:00:00+00:00"),
        _clinical(
            "ImagingStudy",
            "img-new",
            status="available",
            series=[{"uid": "1.2.3", "started": "2020-02-01T09:00:00+00:00"}],
        ),
        _clinical("Immunization", "imm-flu-2019", status="completed", occurrenceDateTime="2019-10-01T09:00:00+00:00"),
        _clinical("Immunization", "imm-tdap-2019", status="completed", occurrenceDateTime="2019-12-31T23:00:00-05:00"),
        _clinical("Immunization", "imm-flu-2020", status="completed", occurrenceDateTime="2020-01-15"),
        _clinical("Procedure", "proc-2019", status="completed", performedDateTime="2019-04-01T09:00:00+00:00"),
        _clinical(
            "Procedure", "proc-2020a", status="completed", performedPeriod={"start": "2020-02-01T09:00:00+00:00"}
        ),
        _clinical("Procedure", "proc-2020b", status="completed", performedDateTime="2020-03-01"),
        _clinical("Encounter", "enc-old", status="finished", period={"start": "2020-01-10T09:00:00+00:00"}),
        _clinical(
            "Encounter",
            "enc-new",
            status="finished",
            period={"start": "2020-06-01T09:00:00+00:00", "end": "2020-06-02T10:00:00+00:00"},
            reasonReference=[{"reference": _urn("cond-diabetes")}],
        ),
        # Billing is not clinical: its later date must not move as_of.
        _clinical("Claim", "claim-1", status="active", created="2021-01-01", billablePeriod={"start": "2021-01-01"}),
    ]


def hand_bundle(resources: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Return the resources as a transaction bundle, as Synthea writes one."""
    entries = [
        {"fullUrl": _urn(r["id"]), "resource": r, "request": {"method": "POST", "url": r["resourceType"]}}
        for r in resources or hand_resources()
    ]
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def write_hand_bundle(folder: Path, name: str = "hand.json") -> Path:
    """Write the bundle into a folder and return the file."""
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / name
    file.write_text(json.dumps(hand_bundle()), encoding="utf-8")
    return file
