"""Questions over the three fixture patients, each with the facts needed to answer it.

Where it sits: ``medagent bench fhir`` (agent/bench/fhir.py) builds each patient's context with
the question and counts how many of the gold facts end up among the context's sources (fact
recall). Gold facts are not stored as ids: each :class:`Fact` names a resource by what a reader
would look for (type, code or name, and which one of a series), and :func:`resolve_fact` finds
its id in the bundle at run time, so regenerated fixtures with new ids keep the set valid.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Fact:
    """One resource a question needs, named by its content.

    Attributes:
        type: the resource type, e.g. ``"Observation"``.
        code: a code of its main concept (LOINC, SNOMED, RxNorm...); or None to match by ``name``.
        name: the concept's text, a coding display, an ImagingStudy description or an Encounter
            type text (compared case-insensitively, whole string); used when ``code`` is None.
        on: a date prefix (``"2023-01"``) the resource's clinical date must start with.
        nth: which match, newest first (0 = the latest, 1 = the one before).
    """

    type: str
    code: str | None = None
    name: str | None = None
    on: str | None = None
    nth: int = 0


@dataclass(frozen=True)
class Question:
    """A question about one fixture patient and the facts needed to answer it."""

    patient: str
    text: str
    facts: tuple[Fact, ...]


def _obs(code: str, *nths: int, on: str | None = None) -> tuple[Fact, ...]:
    return tuple(Fact("Observation", code, on=on, nth=n) for n in (nths or (0,)))


def _med(code: str) -> Fact:
    return Fact("MedicationRequest", code)


def _cond(code: str) -> Fact:
    return Fact("Condition", code)


def _enc(name: str) -> Fact:
    return Fact("Encounter", name=name)


NT_PROBNP, CREATININE, HEMOGLOBIN, SPO2, WEIGHT, HEART_RATE = (
    "33762-6",
    "2160-0",
    "718-7",
    "59408-5",
    "29463-7",
    "8867-4",
)
HBA1C, BP_PANEL, SMOKING, PROGRESS_NOTE = "4548-4", "85354-9", "72166-2", "11506-3"

QUESTIONS: tuple[Question, ...] = (
    # -- cxr: heart failure and COPD, two chest X-rays --------------------------------------------
    Question("cxr", "What is the latest NT-proBNP and how has it changed?", _obs(NT_PROBNP, 0, 1)),
    Question(
        "cxr",
        "Is his kidney function getting worse? Creatinine trend?",
        (*_obs(CREATININE, 0, 1), _cond("14669001")),
    ),
    Question("cxr", "What is his current oxygen saturation?", _obs(SPO2)),
    Question("cxr", "Has his body weight gone up since the last visit?", _obs(WEIGHT, 0, 1)),
    Question("cxr", "What is his heart rate now?", _obs(HEART_RATE)),
    Question("cxr", "Is he anaemic? What is the latest hemoglobin?", _obs(HEMOGLOBIN)),
    Question(
        "cxr",
        "Which anticoagulant is he on for atrial fibrillation?",
        (_med("1364445"), _med("855332"), _cond("49436004")),
    ),
    Question("cxr", "Does he have a penicillin allergy?", (Fact("AllergyIntolerance", "70618"),)),
    Question("cxr", "Which diuretic does he take, furosemide?", (_med("313988"),)),
    Question("cxr", "Which beta blocker is prescribed, metoprolol?", (_med("866412"),)),
    Question("cxr", "Is he on an ACE inhibitor such as lisinopril?", (_med("314076"),)),
    Question("cxr", "Which inhaler does he use for his COPD?", (_med("745679"), _cond("13645005"))),
    Question(
        "cxr",
        "What did the current chest X-ray show?",
        (Fact("DiagnosticReport", "36643-5"), Fact("ImagingStudy", name="XR CHEST PA AND LATERAL")),
    ),
    Question("cxr", "What did the prior chest X-ray report say?", (Fact("DiagnosticReport", "36554-4"),)),
    Question("cxr", "Does he have heart failure, and with what ejection fraction?", (_cond("703272007"),)),
    Question("cxr", "Has he had pneumonia before?", (_cond("385093006"),)),
    Question("cxr", "Why was he admitted to hospital?", (_enc("Inpatient admission"), _cond("385093006"))),
    Question("cxr", "When was his last cardiology follow-up?", (_enc("Cardiology follow-up"),)),
    Question("cxr", "Why did he come to the emergency department?", (_enc("Emergency department visit"),)),
    Question("cxr", "What does the latest progress note say?", (Fact("DocumentReference", PROGRESS_NOTE),)),
    Question("cxr", "Does he have hypertension?", (_cond("38341003"),)),
    Question(
        "cxr",
        "Compare the current chest X-ray with the prior one.",
        (Fact("ImagingStudy", name="XR CHEST PA AND LATERAL"), Fact("ImagingStudy", name="XR CHEST PA")),
    ),
    Question(
        "cxr",
        "What were his heart rate and oxygen saturation at the January 2023 admission?",
        (*_obs(HEART_RATE, on="2023-01"), *_obs(SPO2, on="2023-01")),
    ),
    Question("cxr", "Was warfarin stopped?", (_med("855332"),)),
    Question("cxr", "Is his oxygen saturation trending down?", _obs(SPO2, 0, 1)),
    Question("cxr", "What was the NT-proBNP at the 2021 baseline?", _obs(NT_PROBNP, on="2021-02")),
    # -- ct: solitary lung nodule, hypothyroidism, contrast allergy --------------------------------
    Question("ct", "What is her smoking status?", _obs(SMOKING)),
    Question(
        "ct",
        "Is the lung nodule new or has it grown since the previous CT?",
        (
            _cond("427359005"),
            Fact("DiagnosticReport", "24627-2", nth=0),
            Fact("DiagnosticReport", "24627-2", nth=1),
        ),
    ),
    Question("ct", "What did the latest CT chest report conclude?", (Fact("DiagnosticReport", "24627-2"),)),
    Question("ct", "Does she have a contrast allergy?", (Fact("AllergyIntolerance", "293637006"),)),
    Question("ct", "Which thyroid medication does she take?", (_med("966247"), _cond("40930008"))),
    Question("ct", "What is the hemoglobin trend?", _obs(HEMOGLOBIN, 0, 1)),
    Question("ct", "Is her creatinine normal before a contrast scan?", _obs(CREATININE)),
    Question("ct", "Has she lost weight?", _obs(WEIGHT, 0, 1)),
    Question("ct", "Which antibiotic was given for bronchitis?", (_med("308460"), _cond("10509002"))),
    Question("ct", "Why was she seen by pulmonology?", (_enc("Pulmonology follow-up"),)),
    Question("ct", "What was the primary care visit for?", (_enc("Primary care visit"), _cond("10509002"))),
    Question("ct", "What does the progress note say?", (Fact("DocumentReference", PROGRESS_NOTE),)),
    Question("ct", "Which CT imaging studies are there?", (Fact("ImagingStudy", name="CT CHEST WO CONTRAST"),)),
    Question("ct", "Was her first hemoglobin in 2020 normal?", _obs(HEMOGLOBIN, on="2020-02")),
    Question("ct", "Is hypothyroidism on her problem list?", (_cond("40930008"),)),
    # -- noimg: type 2 diabetes, hypertension, hyperlipidaemia -------------------------------------
    Question(
        "noimg",
        "How well controlled is the diabetes? Latest HbA1c?",
        (*_obs(HBA1C, 0, 1), _cond("44054006")),
    ),
    Question("noimg", "What was the HbA1c when diabetes was found in 2019?", _obs(HBA1C, on="2019-09")),
    Question("noimg", "What is the latest blood pressure?", (*_obs(BP_PANEL), _cond("38341003"))),
    Question("noimg", "Is the patient on a statin for hyperlipidemia?", (_med("259255"), _cond("55822004"))),
    Question("noimg", "What dose of metformin is prescribed?", (_med("860975"),)),
    Question(
        "noimg",
        "Is the kidney function safe for metformin? Latest creatinine?",
        (*_obs(CREATININE), _med("860975")),
    ),
    Question("noimg", "Does the patient have a sulfa allergy?", (Fact("AllergyIntolerance", "91939003"),)),
    Question("noimg", "What is the current body weight?", _obs(WEIGHT)),
    Question("noimg", "Is the patient on lisinopril?", (_med("314076"),)),
    Question("noimg", "Which antibiotic was given for sinusitis?", (_med("308182"), _cond("15805002"))),
    Question("noimg", "When was the last diabetes review?", (_enc("Diabetes review"),)),
    Question("noimg", "What happened at the annual review?", (_enc("Annual review"),)),
    Question("noimg", "What does the progress note say?", (Fact("DocumentReference", PROGRESS_NOTE),)),
    Question("noimg", "How has the blood pressure changed?", _obs(BP_PANEL, 0, 1)),
    Question("noimg", "Is hyperlipidemia documented?", (_cond("55822004"),)),
    Question("noimg", "Has HbA1c improved since 2020?", (*_obs(HBA1C, 0), *_obs(HBA1C, on="2020-03"))),
)


def _concepts(resource: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for field in ("code", "medicationCodeableConcept", "type"):
        value = resource.get(field)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict):
                yield item


def _matches(resource: dict[str, Any], fact: Fact) -> bool:
    codes: set[str] = set()
    names: set[str] = set()
    for concept in _concepts(resource):
        if isinstance(concept.get("text"), str):
            names.add(concept["text"].lower())
        for coding in concept.get("coding") or []:
            if isinstance(coding, dict):
                codes.add(str(coding.get("code")))
                if isinstance(coding.get("display"), str):
                    names.add(coding["display"].lower())
    if isinstance(resource.get("description"), str):
        names.add(resource["description"].lower())
    if fact.code is not None:
        return fact.code in codes
    return fact.name is not None and fact.name.lower() in names


def clinical_date(resource: dict[str, Any]) -> str:
    """Return the resource's clinical date as an ISO string ("" when it has none)."""
    for field in ("effectiveDateTime", "authoredOn", "onsetDateTime", "started", "date", "recordedDate", "issued"):
        if isinstance(resource.get(field), str):
            return str(resource[field])
    period = resource.get("period")
    if isinstance(period, dict) and isinstance(period.get("start"), str):
        return str(period["start"])
    return ""


def resolve_fact(fact: Fact, resources: list[dict[str, Any]]) -> str | None:
    """Return the ``Type/id`` the fact names among a patient's resources, or None when none does."""
    found = [
        r
        for r in resources
        if r.get("resourceType") == fact.type
        and _matches(r, fact)
        and (fact.on is None or clinical_date(r).startswith(fact.on))
    ]
    found.sort(key=clinical_date, reverse=True)
    if fact.nth >= len(found):
        return None
    return f"{fact.type}/{found[fact.nth]['id']}"
