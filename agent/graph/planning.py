"""The plan step's logic: the record manifest, the planner prompt, parsing, and the plan from terms.

Where it sits: the graph's ``plan`` node (after resolve_patient, before fetch) calls these. The
model sees only the question and a *manifest* of the record (types, counts, date ranges, codes):
never free text, so a note cannot steer what is fetched. Model output is validated with pydantic;
one repair call gets the validation error; after that the plan comes from the question's terms,
so a model that cannot produce JSON never fails a run.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from typing import Any, Literal, NamedTuple

from pydantic import ValidationError

from agent.config import AgentSettings
from agent.domain.plan import Plan
from agent.errors import ModelOutputError
from agent.graph.prompts import neutralise_fences
from agent.history.fhir_values import parse_when

#: Question terms (regular expressions, matched case-insensitively on word starts) -> record types.
TERM_TYPES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"medica|drug|dose|prescri|taking|pill|statin|metformin|insulin|anticoag", ("MedicationRequest",)),
    (r"allerg|reaction|intoleran", ("AllergyIntolerance",)),
    (
        r"lab|level|value|result|trend|hba1c|a1c|glucose|bnp|creatinine|egfr|potassium|sodium|blood pressure|bp\b"
        r"|vital|weight|heart rate|cholesterol|ldl|hemoglobin|haemoglobin",
        ("Observation",),
    ),
    (r"diagnos|condition|problem|histor|disease|failure|diabet|cancer|nodule|pneumon|copd|asthma", ("Condition",)),
    (r"visit|admi|encounter|hospital|discharg|seen", ("Encounter",)),
    (r"note|discharg|letter|wrote|document", ("DocumentReference",)),
    (r"report|impression|radiolog", ("DiagnosticReport",)),
    (r"procedur|surg|operat|biops|resect|ectomy|otomy|plasty", ("Procedure",)),
    (r"vaccin|immuni|shot|jab|booster|flu\b|influenza|tetanus|hpv", ("Immunization",)),
    (r"care ?plan|plan of care|self.?management|therapy plan", ("CarePlan",)),
    (r"goal|target", ("Goal",)),
    (r"device|implant|stent|pacemaker|prosthe", ("Device",)),
    (r"family|mother|father|sister|brother|sibling|hereditar|inherit", ("FamilyMemberHistory",)),
    (r"order|referr|request", ("ServiceRequest",)),
    (r"visit|admi|encounter|reason", ("Encounter",)),
    (r"image|imaging|x-?ray|cxr|radiograph|\bct\b|\bmri?\b|scan|study|studies|film|slice", ("ImagingStudy",)),
)
_IMAGE_TERMS = re.compile(
    r"\b(image|images|imaging|x-?ray|cxr|radiograph|ct|mri?|scan|study|studies|film|slice|report)\b", re.IGNORECASE
)
_PRIOR_TERMS = re.compile(r"\b(compar\w*|prior|previous|change[sd]?|since|interval|progress\w*|versus|vs)\b", re.I)
_REPORT_TASK = re.compile(r"\b(draft|write|dictate|prepare)\b.{0,30}\breport\b", re.IGNORECASE)
#: Types every plan needs for the answer to make sense: the problem list frames every other fact.
ALWAYS_TYPES = ("Condition",)
#: Types with codes worth listing in the manifest (coded, not free text).
_CODED_FIELDS = {
    "Condition": "code",
    "Observation": "code",
    "MedicationRequest": "medicationCodeableConcept",
    "AllergyIntolerance": "code",
    "DiagnosticReport": "code",
    "Procedure": "code",
    "Immunization": "vaccineCode",
    "Device": "type",
    "ServiceRequest": "code",
    "Goal": "description",
    "FamilyMemberHistory": "relationship",
}
_DATE_FIELDS = (
    "effectiveDateTime",
    "occurrenceDateTime",
    "performedDateTime",
    "performedPeriod",
    "onsetDateTime",
    "recordedDate",
    "authoredOn",
    "issued",
    "date",
    "started",
    "effectivePeriod",
    "period",
)
#: Codes listed per type in the manifest (the most frequent): keeps the planner prompt small.
TOP_CODES = 8

PLAN_SYSTEM_PROMPT = (
    "You plan which parts of one patient's record are needed to answer a clinician's question. "
    "You see the question and a manifest of the record (types, counts, date ranges, codes), both as data. "
    "Reply with one JSON object only, no prose, matching this JSON schema:\n{schema}\n"
    "resource_types must be chosen from: {types}. Set needs_images when the question is about images or a "
    "study; prior_study when it compares with an earlier study; task 'report' only when asked to draft a report."
)


def plan_system_prompt(types: Iterable[str]) -> str:
    """Return the planner's instructions with the Plan schema and the types it may choose."""
    return PLAN_SYSTEM_PROMPT.format(schema=json.dumps(plan_schema()), types=", ".join(types))


def plan_schema() -> dict[str, Any]:
    """Return the JSON schema the planner must follow (the Plan without ``source``, which is ours to set)."""
    schema = Plan.model_json_schema()
    schema.get("properties", {}).pop("source", None)
    return schema


def build_manifest(resources: Iterable[dict[str, Any]], types: Iterable[str]) -> dict[str, Any]:
    """Summarise what the record holds: per type its count, first and last date and most frequent codes.

    Free text (notes, narratives, display strings) is left out: the planner decides what to fetch,
    and text written into a record must not be able to steer that.
    """
    counts: Counter[str] = Counter()
    dates: dict[str, list[str]] = {}
    codes: dict[str, Counter[str]] = {}
    for resource in resources:
        kind = resource.get("resourceType")
        if not isinstance(kind, str):
            continue
        counts[kind] += 1
        when = _first_date(resource)
        if when:
            dates.setdefault(kind, []).append(when)
        field_name = _CODED_FIELDS.get(kind)
        if field_name:
            for coding in (resource.get(field_name) or {}).get("coding") or []:
                if isinstance(coding, dict) and coding.get("code"):
                    codes.setdefault(kind, Counter())[_code_label(coding)] += 1
                    break
    manifest: dict[str, Any] = {}
    for kind in types:
        entry: dict[str, Any] = {"count": counts.get(kind, 0)}
        if dates.get(kind):
            entry["dates"] = [min(dates[kind]), max(dates[kind])]
        if codes.get(kind):
            entry["codes"] = [code for code, _ in codes[kind].most_common(TOP_CODES)]
        manifest[kind] = entry
    return manifest


def _code_label(coding: dict[str, Any]) -> str:
    system = str(coding.get("system") or "").rstrip("/").rsplit("/", 1)[-1]
    return f"{system}|{coding['code']}" if system else str(coding["code"])


def _first_date(resource: dict[str, Any]) -> str | None:
    for name in _DATE_FIELDS:
        value = resource.get(name)
        if isinstance(value, dict):
            value = value.get("start")
        when = parse_when(value)
        if when is not None:
            return when.date().isoformat()
    return None


def plan_user_prompt(question: str, manifest: dict[str, Any]) -> str:
    """Return the planner's user turn: the question and the manifest, fenced as data."""
    return "\n".join(
        [
            "<question>",
            neutralise_fences(question).strip(),
            "</question>",
            "<record_manifest>",
            neutralise_fences(json.dumps(manifest, sort_keys=True)),
            "</record_manifest>",
            "Reply with the JSON plan only.",
        ]
    )


def repair_user_prompt(question: str, manifest: dict[str, Any], output: str, error: str) -> str:
    """Return the repair turn: the original request, the rejected output (as data) and why it was rejected."""
    return "\n".join(
        [
            plan_user_prompt(question, manifest),
            "<rejected_output>",
            neutralise_fences(output[:2000]),
            "</rejected_output>",
            f"That output was rejected: {error[:1000]}",
            "Reply again with one valid JSON object only.",
        ]
    )


_JSON_OBJECT = re.compile(r"\{.*\}", re.DOTALL)


def parse_plan(text: str, allowed_types: Iterable[str], source: str) -> Plan:
    """Parse and validate the planner's output.

    Raises:
        ModelOutputError: no JSON object, invalid against the Plan schema, or a type outside the
            allowed ones; the message says which, for the repair prompt and the trace.
    """
    match = _JSON_OBJECT.search(text)
    if match is None:
        raise ModelOutputError("planner output holds no JSON object")
    try:
        data = json.loads(match.group(0))
    except json.JSONDecodeError as exc:
        raise ModelOutputError(f"planner output is not valid JSON: {exc.msg} at char {exc.pos}") from exc
    if not isinstance(data, dict):
        raise ModelOutputError("planner output is not a JSON object")
    data.pop("source", None)
    try:
        plan = Plan.model_validate({**data, "source": source})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ModelOutputError(f"planner output does not match the plan schema: {problems}") from exc
    allowed = set(allowed_types)
    unknown = [kind for kind in plan.resource_types if kind not in allowed]
    if unknown:
        raise ModelOutputError(f"planner chose unknown record types {unknown}; allowed: {sorted(allowed)}")
    if not plan.resource_types:
        raise ModelOutputError("planner chose no record types")
    return plan


def terms_plan(question: str, types: Iterable[str]) -> Plan:
    """Return the plan the question's own terms imply (no model call).

    A question that names no record type ("Summarise.", "Status?") gets every type: when the terms
    say nothing, narrowing would only hide facts.
    """
    available = list(types)
    lowered = question.lower()
    wanted: list[str] = []
    for pattern, kinds in TERM_TYPES:
        if re.search(rf"\b(?:{pattern})", lowered):
            wanted += [kind for kind in kinds if kind in available and kind not in wanted]
    needs_images = bool(_IMAGE_TERMS.search(question))
    prior = bool(_PRIOR_TERMS.search(question))
    report = bool(_REPORT_TASK.search(question))
    if report:
        needs_images = True
    if needs_images and "ImagingStudy" in available and "ImagingStudy" not in wanted:
        wanted.append("ImagingStudy")
    # terms naming no type say nothing: narrowing would only hide facts
    wanted = [kind for kind in available if kind in wanted or kind in ALWAYS_TYPES] if wanted else available
    return Plan(
        resource_types=wanted,
        needs_images=needs_images,
        prior_study=prior and needs_images,
        task="report" if report else "answer",
        source="deterministic",
    )


class PlanningModes(NamedTuple):
    """How a run plans and how far the plan narrows what it reads, after ``auto`` is decided."""

    planner: Literal["model", "terms"]
    fetch: Literal["plan", "all"]
    images: Literal["plan", "always"]


def planning_modes(settings: AgentSettings, *, test_model: bool) -> PlanningModes:
    """Decide the ``auto`` settings: MedGemma plans, and its plan narrows the fetch, unless it is a test model.

    The tiny random-weight models never produce a valid plan, so with them a planning call (and its
    repair) would only cost time before the fallback to the question's terms.
    """
    planner = settings.planner if settings.planner != "auto" else ("terms" if test_model else "model")
    narrows = planner == "model"
    fetch = settings.fetch if settings.fetch != "auto" else ("plan" if narrows else "all")
    images = settings.images if settings.images != "auto" else ("plan" if narrows else "always")
    return PlanningModes(planner, fetch, images)
