"""Generate evaluation questions from a patient record, each with gold resource ids computed from that record.

Where it sits: ``medagent eval --data DIR`` (agent/eval/record_eval.py) reads each patient record
of a folder (agent/eval/records.py), asks the questions made here through the agent and scores
the run's sources against the gold ids. Nothing here is written for particular files: every
question and every gold id comes from what the record holds, so the evaluation works on records
nobody here has seen, and it can fail.

Gold rules (a resource with status or verificationStatus ``entered-in-error`` is never gold):

- ``lab``: laboratory Observations (category ``laboratory``) with a ``value[x]``, grouped by code
  (the LOINC code when there is one). Technical questions name one lab by the record's own text,
  shortened (``Glucose [Mass/volume] in Serum or Plasma`` -> ``Glucose``); gold: that lab's
  newest Observation. A lay question names a group ("kidney function") from :data:`LAY_GROUPS`;
  gold: the newest Observation of every lab of the group the record has.
- ``lab_trend``: the same for labs with at least 3 values; gold: the 3 newest (per lab, for a lay group).
- ``bp``: the newest blood pressure panel (LOINC 85354-9, or the older 55284-4); with no panel,
  the newest systolic (8480-6) and the newest diastolic (8462-4) Observation.
- ``meds``: every MedicationRequest with status ``active`` or ``on-hold`` (a paused drug is still
  part of what the patient is on: leaving it out of "current medications" hides an interaction
  or a restart).
- ``allergies``: every AllergyIntolerance.
- ``conditions``: every Condition with clinicalStatus active/recurrence/relapse, no abatement,
  and not refuted.
- ``imaging``: the newest ImagingStudy (``started``, else its series' earliest ``started``).
- ``vaccines`` / ``procedures``: a year in which the record has some (picked by a stable hash of
  the patient id); gold: every Immunization (``occurrenceDateTime``) / Procedure
  (``performedDateTime`` or ``performedPeriod.start``) dated in that year, as written.
- ``encounter``: the newest Encounter (``period.start``) and every Condition its
  ``reasonReference`` points at that the record holds.

"Newest" orders by date, then id (so ties resolve the same way every time); undated resources
come last. Questions are asked as of the record's newest clinical date plus one day, so
"current" and "last" mean what they meant when the record was written.

Which labs: the most frequently measured one first, then others in the order of a stable hash of
(patient id, code), never a fixed list. Wording: each kind has at least three phrasings, some in
lay terms, rotated across records by the record's position.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from agent.eval.records import PatientRecord, Resource
from agent.history.fhir_values import concept_key, concept_text, parse_when

Kind = Literal[
    "lab", "lab_trend", "bp", "meds", "allergies", "conditions", "imaging", "vaccines", "procedures", "encounter"
]
KINDS: tuple[Kind, ...] = (
    "lab",
    "lab_trend",
    "bp",
    "meds",
    "allergies",
    "conditions",
    "imaging",
    "vaccines",
    "procedures",
    "encounter",
)

LOINC = "http://loinc.org"
BP_PANELS = frozenset({"85354-9", "55284-4"})
BP_SYSTOLIC, BP_DIASTOLIC = "8480-6", "8462-4"
#: Labs asked about by name per record (latest value), and with >= 3 values (trend).
LATEST_LABS, TREND_LABS = 2, 1
TREND_LENGTH = 3
_CURRENT_MED_STATUSES = frozenset({"active", "on-hold"})
_ONGOING_STATUSES = frozenset({"active", "recurrence", "relapse"})
#: Types whose dates say nothing about the patient's care (billing, directories).
_NOT_CLINICAL = frozenset(
    {"Claim", "ExplanationOfBenefit", "Coverage", "Account", "Invoice", "Provenance", "AuditEvent"}
    | {"Organization", "Practitioner", "PractitionerRole", "Location", "Device", "Medication"}
)
#: Date fields read for the record's newest clinical date (a Period counts by its start and end).
_CLINICAL_DATE_FIELDS = (
    "effectiveDateTime",
    "effectivePeriod",
    "effectiveInstant",
    "issued",
    "performedDateTime",
    "performedPeriod",
    "occurrenceDateTime",
    "authoredOn",
    "onsetDateTime",
    "onsetPeriod",
    "abatementDateTime",
    "recordedDate",
    "started",
    "period",
    "date",
)
_EARLIEST = datetime.min.replace(tzinfo=UTC)


@dataclass(frozen=True)
class LayGroup:
    """Labs a patient calls by one lay name: group membership by LOINC code.

    The evaluation may know clinical vocabulary (it is the test); the agent must not depend on it.
    """

    phrase: str
    codes: frozenset[str]


LAY_GROUPS: tuple[LayGroup, ...] = (
    # creatinine (serum, blood), eGFR (MDRD, by race, CKD-EPI, CKD-EPI 2021), urea nitrogen (serum, blood)
    LayGroup(
        "kidney function",
        frozenset({"2160-0", "38483-4", "33914-3", "48642-3", "48643-1", "62238-1", "98979-8", "3094-0", "6299-2"}),
    ),
    # HbA1c (two methods), glucose (blood, serum/plasma, capillary by meter)
    LayGroup("sugar control", frozenset({"4548-4", "17856-6", "2339-0", "2345-7", "41653-7"})),
    # total, HDL, LDL (direct, calculated, other), triglycerides
    LayGroup("cholesterol", frozenset({"2093-3", "2085-9", "18262-6", "13457-7", "2089-1", "2571-8"})),
    # hemoglobin, hematocrit, leukocytes, erythrocytes, platelets
    LayGroup("blood count", frozenset({"718-7", "4544-3", "20570-8", "6690-2", "789-8", "777-3"})),
    # ALT, AST, alkaline phosphatase, total bilirubin, albumin
    LayGroup("liver function", frozenset({"1742-6", "1920-8", "6768-6", "1975-2", "1751-7"})),
    # sodium, potassium, chloride, bicarbonate/CO2 (serum/plasma and blood codes)
    LayGroup(
        "electrolyte balance",
        frozenset({"2951-2", "2947-0", "2823-3", "6298-4", "2075-0", "2069-3", "2028-9", "20565-8"}),
    ),
)

# Placeholders: {he} {him} {his} (pronouns from Patient.gender), {lab}, {lay}, {year}.
LAB_PHRASINGS = (
    "What is {his} most recent {lab}?",
    "Latest {lab} result for {him}?",
    "What was {his} last {lab} value, and when was it measured?",
)
LAB_LAY_PHRASINGS = (
    "How is {his} {lay} these days?",
    "What do {his} latest labs say about {his} {lay}?",
    "Any recent results on {his} {lay}?",
)
TREND_PHRASINGS = (
    "What is the trend of {his} {lab} over the last three measurements?",
    "How has {his} {lab} changed recently?",
    "Show {his} last 3 {lab} values.",
)
TREND_LAY_PHRASINGS = (
    "Is {his} {lay} getting better or worse?",
    "How has {his} {lay} been trending?",
    "Has {his} {lay} changed over the last few tests?",
)
PHRASINGS: dict[Kind, tuple[str, ...]] = {
    "lab": LAB_PHRASINGS + LAB_LAY_PHRASINGS,
    "lab_trend": TREND_PHRASINGS + TREND_LAY_PHRASINGS,
    "bp": (
        "What was {his} last blood pressure?",
        "Latest BP reading?",
        "How high was {his} blood pressure at the last check?",
    ),
    "meds": (
        "What medications is {he} currently on?",
        "What is {he} taking at the moment?",
        "Which pills does {he} take now?",
        "List {his} current prescriptions.",
    ),
    "allergies": (
        "What is {he} allergic to?",
        "Does {he} have any allergies?",
        "List {his} recorded allergies and intolerances.",
    ),
    "conditions": (
        "What are {his} ongoing conditions?",
        "What's wrong with {him}?",
        "What health problems does {he} have right now?",
        "List {his} active problems.",
    ),
    "imaging": (
        "What was {his} most recent imaging study?",
        "When was {his} last scan and what was it?",
        "Has {he} had an x-ray or any other imaging lately?",
    ),
    "vaccines": (
        "Which vaccines did {he} receive in {year}?",
        "What shots did {he} get in {year}?",
        "Any jabs in {year}?",
    ),
    "procedures": (
        "What procedures did {he} have in {year}?",
        "Did {he} have any operations in {year}?",
        "List the procedures done in {year}.",
    ),
    "encounter": (
        "What was the reason for {his} last encounter?",
        "Why did {he} last see the doctor?",
        "What was {his} most recent visit about?",
    ),
}
_PRONOUNS = {
    "male": {"he": "he", "him": "him", "his": "his"},
    "female": {"he": "she", "him": "her", "his": "her"},
}
_NEUTRAL = {"he": "the patient", "him": "the patient", "his": "the patient's"}


@dataclass(frozen=True)
class GeneratedQuestion:
    """One generated question and its gold ids.

    Attributes:
        patient_id: the Patient the question is about.
        kind: what is asked (one of :data:`KINDS`).
        phrasing: the template's name, ``<kind>:<n>`` (for the misses of one wording across records).
        text: the question as a user would type it.
        gold: the ``Type/id`` of every resource the answer rests on.
    """

    patient_id: str
    kind: Kind
    phrasing: str
    text: str
    gold: tuple[str, ...]


@dataclass(frozen=True)
class RecordQuestions:
    """Every question generated for one record, its reference date, and the kinds it has no gold for."""

    as_of: datetime | None
    questions: tuple[GeneratedQuestion, ...]
    not_applicable: tuple[Kind, ...]


# -- reading the record ----------------------------------------------------------------------------------


def ref(resource: Resource) -> str:
    """Return ``Type/id``."""
    return f"{resource.get('resourceType')}/{resource.get('id')}"


def _status_code(value: Any) -> str | None:
    """Return a status as a code, whether written as a code or as a CodeableConcept."""
    if isinstance(value, str):
        return value
    for coding in value.get("coding") or [] if isinstance(value, dict) else []:
        if isinstance(coding, dict) and isinstance(coding.get("code"), str):
            return str(coding["code"])
    return None


def entered_in_error(resource: Resource) -> bool:
    """Return whether the resource says it was recorded by mistake."""
    return "entered-in-error" in (
        _status_code(resource.get("status")),
        _status_code(resource.get("verificationStatus")),
    )


def _codes(concept: Any, system: str | None = None) -> set[str]:
    """Return the codes of a CodeableConcept (of one system, when given)."""
    if not isinstance(concept, dict):
        return set()
    return {
        str(c["code"])
        for c in concept.get("coding") or []
        if isinstance(c, dict) and c.get("code") and (system is None or c.get("system") == system)
    }


def _period_start(value: Any) -> Any:
    return value.get("start") or value.get("end") if isinstance(value, dict) else None


def _raw_date(resource: Resource) -> Any:
    """Return the raw date a resource is ordered by: when it happened, not when it was filed."""
    kind = resource.get("resourceType")
    if kind == "Procedure":
        return resource.get("performedDateTime") or _period_start(resource.get("performedPeriod"))
    if kind == "Immunization":
        return resource.get("occurrenceDateTime") or resource.get("occurrenceString")
    if kind == "Encounter":
        return _period_start(resource.get("period"))
    if kind == "ImagingStudy":
        series = [s.get("started") for s in resource.get("series") or [] if isinstance(s, dict)]
        return resource.get("started") or min((s for s in series if isinstance(s, str)), default=None)
    return (
        resource.get("effectiveDateTime")
        or _period_start(resource.get("effectivePeriod"))
        or resource.get("effectiveInstant")
        or resource.get("issued")
    )


def when(resource: Resource) -> datetime | None:
    """Return the date a resource is ordered by for "newest" (None when undated or unreadable)."""
    return parse_when(_raw_date(resource))


def newest_first(resources: Iterable[Resource]) -> list[Resource]:
    """Return resources newest first; equal dates by id, undated last."""
    return sorted(resources, key=lambda r: (when(r) or _EARLIEST, str(r.get("id"))), reverse=True)


def written_year(resource: Resource) -> str | None:
    """Return the year of a resource's date as written in the record (no time-zone shift)."""
    raw = _raw_date(resource)
    if isinstance(raw, str) and re.match(r"\d{4}", raw) and parse_when(raw) is not None:
        return raw[:4]
    return None


def record_as_of(resources: Iterable[Resource]) -> datetime | None:
    """Return the newest clinical date in the record plus one day (None for a record with no dates)."""
    dates: list[datetime] = []
    for resource in resources:
        if resource.get("resourceType") in _NOT_CLINICAL:
            continue
        for field in _CLINICAL_DATE_FIELDS:
            value = resource.get(field)
            raws = [value.get("start"), value.get("end")] if isinstance(value, dict) else [value]
            dates += [moment for moment in map(parse_when, raws) if moment is not None]
    return max(dates) + timedelta(days=1) if dates else None


def stable_hash(*parts: str) -> int:
    """Return a hash of the parts that is the same in every process (unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256("\x1f".join(parts).encode()).digest()[:8], "big")


# -- labs ---------------------------------------------------------------------------------------------------


def is_lab(resource: Resource) -> bool:
    """Return whether a resource is a laboratory Observation that carries a value."""
    if resource.get("resourceType") != "Observation" or entered_in_error(resource):
        return False
    categories = resource.get("category") or []
    lab = any("laboratory" in {c.casefold() for c in _codes(cat)} for cat in categories if isinstance(cat, dict))
    return lab and any(key.startswith("value") for key in resource)


def lab_key(resource: Resource) -> str:
    """Return the code a lab is grouped by: its LOINC code, else its first coding or text."""
    loinc = sorted(_codes(resource.get("code"), LOINC))
    return loinc[0] if loinc else concept_key(resource.get("code")) or "?"


def lab_series(resources: Iterable[Resource]) -> dict[str, list[Resource]]:
    """Return each lab code's Observations, newest first."""
    series: dict[str, list[Resource]] = {}
    for resource in resources:
        if is_lab(resource):
            series.setdefault(lab_key(resource), []).append(resource)
    return {key: newest_first(values) for key, values in series.items()}


_BRACKETS = re.compile(r"\s*\[[^\]]*\]")
_METHOD = re.compile(r"\s+by\s+.*$", re.IGNORECASE)
# The usual specimens say nothing a clinician would say; others (urine, stool) tell labs apart.
_USUAL_SPECIMEN = re.compile(
    r"\s+(?:in|of)\s+(?:serum or plasma|serum|plasma|(?:whole|capillary|venous|arterial) blood|blood)\b.*$",
    re.IGNORECASE,
)
# LOINC's denominators: "Hemoglobin A1c/Hemoglobin.total", "Glomerular filtration rate/1.73 sq M.predicted".
_DENOMINATOR = re.compile(r"/[^/]*\.[^/]*$")
_DOTTED = re.compile(r"(?<=[A-Za-z])\.(?=[a-z])")


def short_lab_name(text: str) -> str:
    """Return a lab's name as a clinician would say it, from the record's long name.

    ``Glucose [Mass/volume] in Serum or Plasma`` -> ``Glucose``;
    ``Hemoglobin A1c/Hemoglobin.total in Blood`` -> ``Hemoglobin A1c``;
    ``Glucose [Mass/volume] in Urine by Test strip`` -> ``Glucose in Urine``.
    """
    name = _BRACKETS.sub("", text)
    name = _METHOD.sub("", name)
    name = _USUAL_SPECIMEN.sub("", name)
    name = _DENOMINATOR.sub("", name)
    name = " ".join(_DOTTED.sub(" ", name).split())
    return name or text.strip()


def lab_name(observation: Resource) -> str:
    """Return the shortened name the record gives a lab: the code's text, else the LOINC display, else any."""
    raw = observation.get("code")
    code: dict[str, Any] = raw if isinstance(raw, dict) else {}
    loinc = [c for c in code.get("coding") or [] if isinstance(c, dict) and c.get("system") == LOINC]
    text = code.get("text") or next((c.get("display") for c in loinc if c.get("display")), None) or concept_text(code)
    return short_lab_name(str(text or lab_key(observation)))


def pick_labs(series: dict[str, list[Resource]], patient_id: str, count: int, *, min_values: int = 1) -> list[str]:
    """Return up to ``count`` lab codes: the most measured first, then the rest in stable-hash order.

    The most measured lab is what a clinician asks about most; the hash spreads the other
    questions over the record's rarer labs, differently for each patient.
    """
    eligible = [key for key, values in series.items() if len(values) >= min_values]
    if not eligible:
        return []
    first = min(eligible, key=lambda key: (-len(series[key]), key))
    rest = sorted((k for k in eligible if k != first), key=lambda key: stable_hash(patient_id, key))
    return [first, *rest][:count]


def lay_groups_present(series: dict[str, list[Resource]], *, min_values: int = 1) -> list[LayGroup]:
    """Return the lay groups with at least one lab of ``min_values`` values in the record, in table order."""
    return [
        group for group in LAY_GROUPS if any(len(series.get(code, [])) >= min_values for code in sorted(group.codes))
    ]


def lay_gold(group: LayGroup, series: dict[str, list[Resource]], take: int) -> tuple[str, ...]:
    """Return the ``take`` newest Observations of each lab of the group with at least ``take`` values."""
    ids: list[str] = []
    for code in sorted(group.codes):
        values = series.get(code, [])
        if len(values) >= take:
            ids += [ref(r) for r in values[:take]]
    return tuple(ids)


# -- gold per kind --------------------------------------------------------------------------------------------


def bp_gold(resources: Sequence[Resource]) -> tuple[str, ...]:
    """Return the newest BP panel, or with no panel the newest systolic and newest diastolic Observation."""
    observations = [r for r in resources if r.get("resourceType") == "Observation" and not entered_in_error(r)]
    panels = [r for r in observations if _codes(r.get("code"), LOINC) & BP_PANELS]
    if panels:
        return (ref(newest_first(panels)[0]),)
    gold = []
    for code in (BP_SYSTOLIC, BP_DIASTOLIC):
        parts = [r for r in observations if code in _codes(r.get("code"), LOINC)]
        if parts:
            gold.append(ref(newest_first(parts)[0]))
    return tuple(gold)


def current_medications(resources: Sequence[Resource]) -> tuple[str, ...]:
    """Return every MedicationRequest that is active or on hold."""
    return tuple(
        ref(r)
        for r in resources
        if r.get("resourceType") == "MedicationRequest" and r.get("status") in _CURRENT_MED_STATUSES
    )


def allergies(resources: Sequence[Resource]) -> tuple[str, ...]:
    """Return every AllergyIntolerance not entered in error."""
    return tuple(ref(r) for r in resources if r.get("resourceType") == "AllergyIntolerance" and not entered_in_error(r))


def ongoing_conditions(resources: Sequence[Resource]) -> tuple[str, ...]:
    """Return every Condition that is active, recurring or relapsed, not abated and not refuted."""
    return tuple(
        ref(r)
        for r in resources
        if r.get("resourceType") == "Condition"
        and _status_code(r.get("clinicalStatus")) in _ONGOING_STATUSES
        and not any(key.startswith("abatement") for key in r)
        and _status_code(r.get("verificationStatus")) not in ("refuted", "entered-in-error")
    )


def newest_of_type(resources: Sequence[Resource], resource_type: str) -> Resource | None:
    """Return the newest resource of one type that was not entered in error."""
    found = newest_first(r for r in resources if r.get("resourceType") == resource_type and not entered_in_error(r))
    return found[0] if found else None


def year_gold(resources: Sequence[Resource], resource_type: str, patient_id: str) -> tuple[str | None, tuple[str, ...]]:
    """Return a year in which the record has resources of a type (stable-hash pick) and all of them dated in it."""
    by_year: dict[str, list[str]] = {}
    for resource in resources:
        if resource.get("resourceType") == resource_type and not entered_in_error(resource):
            year = written_year(resource)
            if year is not None:
                by_year.setdefault(year, []).append(ref(resource))
    if not by_year:
        return None, ()
    years = sorted(by_year)
    year = years[stable_hash(patient_id, resource_type) % len(years)]
    return year, tuple(by_year[year])


def last_encounter_gold(resources: Sequence[Resource]) -> tuple[str, ...]:
    """Return the newest Encounter and every Condition of the record its reasonReference points at."""
    encounter = newest_of_type(resources, "Encounter")
    if encounter is None:
        return ()
    conditions = {ref(r) for r in resources if r.get("resourceType") == "Condition"}
    reasons = [
        reason.get("reference")
        for reason in encounter.get("reasonReference") or []
        if isinstance(reason, dict) and reason.get("reference") in conditions
    ]
    return (ref(encounter), *dict.fromkeys(str(r) for r in reasons))


# -- questions ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Asker:
    """Turns a template and its gold into a question for one record, rotating wordings by the record's position."""

    patient_id: str
    ordinal: int
    pronouns: dict[str, str]

    def ask(
        self, kind: Kind, templates: Sequence[str], turn: int, gold: Sequence[str], **values: str
    ) -> GeneratedQuestion:
        template = templates[(self.ordinal + turn) % len(templates)]
        text = template.format(**self.pronouns, **values)
        phrasing = f"{kind}:{PHRASINGS[kind].index(template)}"
        return GeneratedQuestion(self.patient_id, kind, phrasing, text[0].upper() + text[1:], tuple(gold))


def _lab_questions(asker: _Asker, series: dict[str, list[Resource]]) -> list[GeneratedQuestion]:
    questions = [
        asker.ask("lab", LAB_PHRASINGS, turn, [ref(series[key][0])], lab=lab_name(series[key][0]))
        for turn, key in enumerate(pick_labs(series, asker.patient_id, LATEST_LABS))
    ]
    groups = lay_groups_present(series)
    if groups:
        group = groups[asker.ordinal % len(groups)]
        questions.append(asker.ask("lab", LAB_LAY_PHRASINGS, 0, lay_gold(group, series, 1), lay=group.phrase))
    return questions


def _trend_questions(asker: _Asker, series: dict[str, list[Resource]]) -> list[GeneratedQuestion]:
    # Skip the most measured lab (the latest-value questions ask about it): trend the hash picks.
    picks = pick_labs(series, asker.patient_id, TREND_LABS + 1, min_values=TREND_LENGTH)
    keys = picks[1:] or picks
    questions = [
        asker.ask(
            "lab_trend",
            TREND_PHRASINGS,
            turn,
            [ref(r) for r in series[key][:TREND_LENGTH]],
            lab=lab_name(series[key][0]),
        )
        for turn, key in enumerate(keys[:TREND_LABS])
    ]
    groups = lay_groups_present(series, min_values=TREND_LENGTH)
    if groups:
        group = groups[asker.ordinal % len(groups)]
        gold = lay_gold(group, series, TREND_LENGTH)
        questions.append(asker.ask("lab_trend", TREND_LAY_PHRASINGS, 0, gold, lay=group.phrase))
    return questions


def _year_question(
    asker: _Asker, kind: Kind, resources: Sequence[Resource], resource_type: str
) -> list[GeneratedQuestion]:
    year, gold = year_gold(resources, resource_type, asker.patient_id)
    return [asker.ask(kind, PHRASINGS[kind], 0, gold, year=year)] if year else []


def _single(asker: _Asker, kind: Kind, gold: Sequence[str]) -> list[GeneratedQuestion]:
    return [asker.ask(kind, PHRASINGS[kind], 0, gold)] if gold else []


def generate(record: PatientRecord, ordinal: int = 0) -> RecordQuestions:
    """Return the questions for one record, with gold ids, its ``as_of``, and the kinds it has no gold for.

    Args:
        record: the patient record.
        ordinal: the record's position in the evaluation: wordings rotate with it, so every
            phrasing is asked across a few records.
    """
    resources = [r for r in record.resources if isinstance(r, dict)]
    pronouns = _PRONOUNS.get(str(record.patient.get("gender")), _NEUTRAL)
    asker = _Asker(record.patient_id, ordinal, pronouns)
    series = lab_series(resources)
    imaging = newest_of_type(resources, "ImagingStudy")
    makers: dict[Kind, Callable[[], list[GeneratedQuestion]]] = {
        "lab": lambda: _lab_questions(asker, series),
        "lab_trend": lambda: _trend_questions(asker, series),
        "bp": lambda: _single(asker, "bp", bp_gold(resources)),
        "meds": lambda: _single(asker, "meds", current_medications(resources)),
        "allergies": lambda: _single(asker, "allergies", allergies(resources)),
        "conditions": lambda: _single(asker, "conditions", ongoing_conditions(resources)),
        "imaging": lambda: _single(asker, "imaging", [ref(imaging)] if imaging else []),
        "vaccines": lambda: _year_question(asker, "vaccines", resources, "Immunization"),
        "procedures": lambda: _year_question(asker, "procedures", resources, "Procedure"),
        "encounter": lambda: _single(asker, "encounter", last_encounter_gold(resources)),
    }
    questions: list[GeneratedQuestion] = []
    not_applicable: list[Kind] = []
    for kind in KINDS:
        made = [q for q in makers[kind]() if q.gold]
        questions += made
        if not made:
            not_applicable.append(kind)
    return RecordQuestions(record_as_of(resources), tuple(questions), tuple(not_applicable))
