"""Make one synthetic patient with ten years of dense history, for the FHIR benchmark.

Where it sits: ``medagent bench fhir`` (agent/bench/fhir.py) loads this patient into the test FHIR
engine and times how the agent assembles its context against a sequential per-type baseline. The
shape follows what Synthea exports: a transaction Bundle whose entries ``PUT`` to ``Type/<uuid>``
and whose references are ``urn:uuid:`` full URLs; vital-sign panels with ``hasMember``; lab
panels as DiagnosticReports with ``result`` references; MedicationRequests naming a Medication
by reference or inline; notes as base64 text attachments. Some optional fields are left out and
some resources carry extensions no profile defines, as real exports do.

Everything is invented, and the output is deterministic: ids are uuid5 of the seed and a counter,
and every choice comes from a ``random.Random(seed)``, so the same arguments give the same bytes.

Usage::

    python tools/make_large_patient.py --out /tmp/large.json [--observations 5000] [--seed 7]
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://medagent.example.org/bench/large-patient")
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
UCUM = "http://unitsofmeasure.org"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
CONDITION_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
UNKNOWN_EXTENSION = "http://vendor.example.org/fhir/StructureDefinition/source-system-row"

#: The history spans ten years ending here (no clock is read, so output never drifts).
HISTORY_END = datetime(2026, 10, 31, 9, 0, tzinfo=UTC)
HISTORY_YEARS = 10

# (LOINC, display, unit, mean, spread, low, high): vitals measured at every visit.
VITALS = [
    ("8867-4", "Heart rate", "/min", 78, 12, 60, 100),
    ("9279-1", "Respiratory rate", "/min", 16, 2, 12, 20),
    ("8310-5", "Body temperature", "Cel", 36.8, 0.4, 36.1, 37.8),
    ("59408-5", "Oxygen saturation in Arterial blood by Pulse oximetry", "%", 95, 2, 94, 100),
    ("29463-7", "Body weight", "kg", 92, 4, None, None),
]
# Labs drawn at some visits, grouped into one lab-panel report per visit.
LABS = [
    ("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", "%", 7.6, 0.8, 4.0, 5.6),
    ("2160-0", "Creatinine [Mass/volume] in Serum or Plasma", "mg/dL", 1.4, 0.3, 0.7, 1.3),
    ("33762-6", "NT-proBNP [Mass/volume] in Serum or Plasma", "pg/mL", 900, 500, 0, 125),
    ("718-7", "Hemoglobin [Mass/volume] in Blood", "g/dL", 13.2, 1.1, 13.5, 17.5),
    ("2093-3", "Cholesterol [Mass/volume] in Serum or Plasma", "mg/dL", 190, 30, 0, 200),
    ("2089-1", "Cholesterol in LDL [Mass/volume] in Serum or Plasma", "mg/dL", 105, 25, 0, 100),
    ("2085-9", "Cholesterol in HDL [Mass/volume] in Serum or Plasma", "mg/dL", 44, 8, 40, 60),
    ("2571-8", "Triglyceride [Mass/volume] in Serum or Plasma", "mg/dL", 160, 50, 0, 150),
    ("2823-3", "Potassium [Moles/volume] in Serum or Plasma", "mmol/L", 4.4, 0.4, 3.5, 5.1),
    ("2951-2", "Sodium [Moles/volume] in Serum or Plasma", "mmol/L", 139, 3, 135, 145),
    ("2345-7", "Glucose [Mass/volume] in Serum or Plasma", "mg/dL", 150, 35, 70, 99),
]
CONDITIONS = [
    ("44054006", "Diabetes mellitus type 2", None),
    ("38341003", "Hypertensive disorder, systemic arterial", None),
    ("703272007", "Heart failure with reduced ejection fraction", None),
    ("433144002", "Chronic kidney disease stage 3", None),
    ("55822004", "Hyperlipidemia", None),
    ("49436004", "Atrial fibrillation", None),
    ("10509002", "Acute bronchitis", 21),
    ("68566005", "Urinary tract infectious disease", 10),
    ("195662009", "Acute viral pharyngitis", 7),
    ("271737000", "Anemia", 200),
]
MEDICATIONS = [
    ("860975", "24 HR Metformin hydrochloride 500 MG Extended Release Oral Tablet", "1 tablet twice daily"),
    ("314076", "lisinopril 10 MG Oral Tablet", "1 tablet daily"),
    ("313988", "Furosemide 40 MG Oral Tablet", "1 tablet every morning"),
    ("866412", "24 HR metoprolol succinate 25 MG Extended Release Oral Tablet", "1 tablet daily"),
    ("259255", "atorvastatin 80 MG Oral Tablet", "1 tablet at night"),
    ("1364445", "apixaban 5 MG Oral Tablet", "1 tablet twice daily"),
]
ALLERGIES = [("764146007", "Penicillin", "Hives"), ("91939003", "Allergy to sulfonamide", "Rash")]
VISIT_REASONS = [
    ("44054006", "Diabetes review"),
    ("703272007", "Heart failure follow-up"),
    ("38341003", "Blood pressure check"),
    ("433144002", "Kidney function review"),
]


class _Ids:
    """Stable ids: uuid5 of the seed and a per-type counter."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.counts: dict[str, int] = {}

    def new(self, kind: str) -> str:
        n = self.counts[kind] = self.counts.get(kind, 0) + 1
        return str(uuid.uuid5(NAMESPACE, f"{self.seed}/{kind}/{n}"))


def _urn(resource_id: str) -> str:
    return f"urn:uuid:{resource_id}"


def _instant(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _concept(system: str, code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


def _category(code: str, display: str) -> list[dict[str, Any]]:
    return [{"coding": [{"system": OBS_CATEGORY, "code": code, "display": display}]}]


def _interpretation(value: float, low: float | None, high: float | None) -> list[dict[str, Any]] | None:
    if low is None or high is None:
        return None
    code, display = ("H", "High") if value > high else ("L", "Low") if value < low else ("N", "Normal")
    return [{"coding": [{"system": INTERPRETATION, "code": code, "display": display}]}]


class _Builder:
    """Collects bundle entries; every resource gets a PUT entry under its urn:uuid full URL."""

    def __init__(self, seed: int) -> None:
        self.ids = _Ids(seed)
        self.rng = random.Random(seed)
        self.entries: list[dict[str, Any]] = []
        self.observations = 0

    def add(self, resource: dict[str, Any]) -> str:
        rtype = resource["resourceType"]
        resource["id"] = resource.get("id") or self.ids.new(rtype)
        if self.rng.random() < 0.05:
            # Real exports carry vendor extensions no profile defines; readers must ignore them.
            resource["extension"] = [{"url": UNKNOWN_EXTENSION, "valueString": f"row-{self.rng.randrange(10**6)}"}]
        self.entries.append(
            {
                "fullUrl": _urn(resource["id"]),
                "resource": resource,
                "request": {"method": "PUT", "url": f"{rtype}/{resource['id']}"},
            }
        )
        if rtype == "Observation":
            self.observations += 1
        return _urn(resource["id"])

    def quantity_observation(
        self,
        patient: str,
        encounter: str,
        when: datetime,
        spec: tuple[str, str, str, float, float, float | None, float | None],
        category: tuple[str, str],
        drift: float,
    ) -> str:
        code, display, unit, mean, spread, low, high = spec
        value = round(self.rng.gauss(mean * drift, spread), 1 if mean < 50 else 0)
        value = max(value, 0.1)
        resource: dict[str, Any] = {
            "resourceType": "Observation",
            "status": "final",
            "category": _category(*category),
            "code": _concept(LOINC, code, display),
            "subject": {"reference": patient},
            "encounter": {"reference": encounter},
            "effectiveDateTime": _instant(when),
            "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit},
        }
        # Optional parts are sometimes missing, as in real feeds (no range, no flag).
        if low is not None and high is not None and self.rng.random() < 0.9:
            resource["referenceRange"] = [
                {
                    "low": {"value": low, "unit": unit, "system": UCUM, "code": unit},
                    "high": {"value": high, "unit": unit, "system": UCUM, "code": unit},
                }
            ]
            flag = _interpretation(value, low, high)
            if flag and self.rng.random() < 0.85:
                resource["interpretation"] = flag
        return self.add(resource)


def make_large_patient(observations: int = 5000, seed: int = 7) -> dict[str, Any]:
    """Return a transaction Bundle holding one patient with ten years of history.

    Args:
        observations: exactly how many Observations the bundle holds (panels and members count).
        seed: the seed for ids and every random choice; the same seed gives the same bundle.

    Raises:
        ValueError: ``observations`` is below 10.
    """
    if observations < 10:
        raise ValueError("observations must be at least 10")
    b = _Builder(seed)
    patient = b.add(
        {
            "resourceType": "Patient",
            "identifier": [{"system": "http://hospital.example.org/mrn", "value": f"MRN-BENCH-{seed}"}],
            "name": [{"family": "Benchmark", "given": ["Lena"]}],
            "gender": "female",
            "birthDate": "1952-04-17",
        }
    )
    start = HISTORY_END - timedelta(days=365 * HISTORY_YEARS)
    practitioner = b.add(
        {"resourceType": "Practitioner", "name": [{"family": "Okafor", "given": ["Ada"], "prefix": ["Dr"]}]}
    )
    for index, (code, display, resolves_after) in enumerate(CONDITIONS):
        onset = start + timedelta(days=int(index * 300 + b.rng.randrange(90)))
        condition: dict[str, Any] = {
            "resourceType": "Condition",
            "clinicalStatus": _concept(CONDITION_CLINICAL, "resolved" if resolves_after else "active", ""),
            "code": _concept(SNOMED, code, display),
            "subject": {"reference": patient},
            "onsetDateTime": _instant(onset),
        }
        condition["clinicalStatus"]["coding"][0].pop("display")
        condition["clinicalStatus"].pop("text")
        if resolves_after:
            condition["abatementDateTime"] = _instant(onset + timedelta(days=resolves_after))
        b.add(condition)
    for code, display, reaction in ALLERGIES:
        b.add(
            {
                "resourceType": "AllergyIntolerance",
                "patient": {"reference": patient},
                "code": _concept(SNOMED, code, display),
                "reaction": [{"manifestation": [_concept(SNOMED, "247472004", reaction)], "severity": "moderate"}],
                "recordedDate": _instant(start + timedelta(days=30)),
            }
        )
    medications = [
        b.add({"resourceType": "Medication", "code": _concept(RXNORM, code, display)})
        for code, display, _ in MEDICATIONS
    ]

    # About 12 Observations per visit (panel + 6 members + some labs): visits are spread over
    # the ten years, so the count sets the visit density, not the time span.
    visits = max(2, observations // 12)
    days = sorted(b.rng.sample(range(365 * HISTORY_YEARS), min(visits, 365 * HISTORY_YEARS)))
    visit = 0
    while b.observations < observations:
        day = days[visit % len(days)] if visit < len(days) else days[-1]
        when = start + timedelta(days=day, hours=int(b.rng.randrange(8)), minutes=int(b.rng.randrange(60)))
        visit += 1
        drift = 1 + 0.15 * day / (365 * HISTORY_YEARS)  # values worsen slowly over the decade
        reason_code, reason = VISIT_REASONS[visit % len(VISIT_REASONS)]
        encounter = b.add(
            {
                "resourceType": "Encounter",
                "status": "finished",
                "class": {"system": ACT_CODE, "code": "AMB", "display": "ambulatory"},
                "type": [{"text": reason}],
                "subject": {"reference": patient},
                "participant": [{"individual": {"reference": practitioner}}],
                "period": {"start": _instant(when), "end": _instant(when + timedelta(minutes=30))},
                "reasonCode": [_concept(SNOMED, reason_code, reason)],
            }
        )
        remaining = observations - b.observations
        members = []
        for spec in VITALS[: max(0, min(len(VITALS), remaining - 2))]:
            members.append(b.quantity_observation(patient, encounter, when, spec, ("vital-signs", "Vital Signs"), 1))
        if observations - b.observations >= 2:
            systolic = round(b.rng.gauss(138 * drift, 12))
            members.append(
                b.add(
                    {
                        "resourceType": "Observation",
                        "status": "final",
                        "category": _category("vital-signs", "Vital Signs"),
                        "code": _concept(LOINC, "85354-9", "Blood pressure panel with all children optional"),
                        "subject": {"reference": patient},
                        "effectiveDateTime": _instant(when),
                        "component": [
                            {
                                "code": _concept(LOINC, "8480-6", "Systolic blood pressure"),
                                "valueQuantity": {"value": systolic, "unit": "mm[Hg]", "system": UCUM},
                            },
                            {
                                "code": _concept(LOINC, "8462-4", "Diastolic blood pressure"),
                                "valueQuantity": {"value": round(systolic * 0.6), "unit": "mm[Hg]", "system": UCUM},
                            },
                        ],
                    }
                )
            )
        if members and b.observations < observations:
            b.add(
                {
                    "resourceType": "Observation",
                    "status": "final",
                    "category": _category("vital-signs", "Vital Signs"),
                    "code": _concept(LOINC, "85353-1", "Vital signs, weight, height, head circumference, oxygen panel"),
                    "subject": {"reference": patient},
                    "encounter": {"reference": encounter},
                    "effectiveDateTime": _instant(when),
                    "hasMember": [{"reference": m} for m in members],
                }
            )
        labs = b.rng.sample(LABS, b.rng.randrange(3, 7))
        results = [
            b.quantity_observation(patient, encounter, when, spec, ("laboratory", "Laboratory"), drift)
            for spec in labs[: max(0, observations - b.observations)]
        ]
        if results:
            b.add(
                {
                    "resourceType": "DiagnosticReport",
                    "status": "final",
                    "code": _concept(LOINC, "24323-8", "Comprehensive metabolic 2000 panel - Serum or Plasma"),
                    "subject": {"reference": patient},
                    "encounter": {"reference": encounter},
                    "effectiveDateTime": _instant(when),
                    "issued": _instant(when + timedelta(hours=4)),
                    "result": [{"reference": r} for r in results],
                }
            )
        if visit % 4 == 0:
            medication_index = visit // 4 % len(MEDICATIONS)
            code, display, dosage = MEDICATIONS[medication_index]
            order: dict[str, Any] = {
                "resourceType": "MedicationRequest",
                "status": "active" if day > 365 * (HISTORY_YEARS - 1) else "completed",
                "intent": "order",
                "subject": {"reference": patient},
                "encounter": {"reference": encounter},
                "authoredOn": _instant(when),
                "requester": {"reference": practitioner},
                "dosageInstruction": [{"text": dosage}],
            }
            if visit % 8 == 0:
                order["medicationReference"] = {"reference": medications[medication_index]}
            else:
                order["medicationCodeableConcept"] = _concept(RXNORM, code, display)
            b.add(order)
        if visit % 10 == 0:
            note = f"{reason}. Patient reports feeling {b.rng.choice(['well', 'tired', 'short of breath'])}."
            b.add(
                {
                    "resourceType": "DocumentReference",
                    "status": "current",
                    "type": _concept(LOINC, "11506-3", "Progress note"),
                    "subject": {"reference": patient},
                    "date": _instant(when + timedelta(hours=1)),
                    "content": [
                        {
                            "attachment": {
                                "contentType": "text/plain",
                                "data": base64.b64encode(note.encode()).decode(),
                            }
                        }
                    ],
                    "context": {"encounter": [{"reference": encounter}]},
                }
            )
    return {"resourceType": "Bundle", "type": "transaction", "entry": b.entries}


def main(argv: list[str] | None = None) -> int:
    """Write the bundle to ``--out`` and print what it holds."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the transaction Bundle (JSON)")
    parser.add_argument("--observations", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    bundle = make_large_patient(args.observations, args.seed)
    args.out.write_text(json.dumps(bundle, indent=1) + "\n", encoding="utf-8")
    counts: dict[str, int] = {}
    for entry in bundle["entry"]:
        rtype = entry["resource"]["resourceType"]
        counts[rtype] = counts.get(rtype, 0) + 1
    print(f"wrote {args.out}: " + ", ".join(f"{n} {t}" for t, n in sorted(counts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
