"""Build the compact, dated, cited patient context the reasoner reads.

Every line ends with the ``[Type/id]`` tags of the resources it rests on; the set of tags that
appear is the run's *sources*, the only references a citation may name. Free text from notes is
fenced and labelled as untrusted data so it cannot pose as instructions. Sections are capped;
what is left out is said, never silently dropped.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from agent.domain.refs import ResourceRef
from agent.history.fhir_values import (
    attachment_text,
    concept_key,
    concept_text,
    dated,
    first_concept_text,
    parse_when,
    quantity_text,
    range_text,
)

#: How many lines each section shows before summarising the rest by count.
SECTION_LIMITS = {
    "conditions": 20,
    "medications": 20,
    "allergies": 10,
    "observations": 25,
    "encounters": 5,
    "reports": 5,
    "notes": 3,
    "imaging": 5,
}
NOTE_CHARS = 600


@dataclass
class HistoryContext:
    """The context text and the references it cites."""

    text: str
    sources: list[ResourceRef] = field(default_factory=list)
    omitted: dict[str, int] = field(default_factory=dict)


def _tag(resource: dict[str, Any]) -> str:
    return f"[{resource['resourceType']}/{resource['id']}]"


def _status(resource: dict[str, Any], field_name: str) -> str | None:
    value = resource.get(field_name)
    if isinstance(value, dict):
        return concept_text(value)
    return str(value) if value else None


class _Builder:
    def __init__(self, as_of: datetime) -> None:
        self.as_of = as_of
        self.lines: list[str] = []
        self.cited: dict[str, ResourceRef] = {}
        self.omitted: dict[str, int] = {}

    def cite(self, resource: dict[str, Any]) -> str:
        ref = ResourceRef.of(resource)
        self.cited.setdefault(ref.reference, ref)
        return ref.tag

    def section(self, title: str, key: str, rows: list[tuple[datetime | None, str]]) -> None:
        """Add a section, newest first, capped, with the rest counted."""
        if not rows:
            return
        epoch = datetime.min.replace(tzinfo=UTC)
        rows = sorted(rows, key=lambda row: row[0] or epoch, reverse=True)
        limit = SECTION_LIMITS[key]
        self.lines.append(f"## {title} ({len(rows)})")
        self.lines.extend(f"- {text}" for _, text in rows[:limit])
        if len(rows) > limit:
            self.omitted[key] = len(rows) - limit
            self.lines.append(f"- … {len(rows) - limit} older {key} not shown")
        self.lines.append("")


def build_context(
    patient: dict[str, Any], resources: Iterable[dict[str, Any]], *, as_of: datetime | None = None
) -> HistoryContext:
    """Return the dated, cited text of a patient's record as of a date.

    Args:
        patient: the Patient resource.
        resources: every other resource fetched for the patient (any order, any types).
        as_of: the date relative times are computed against (default: now, UTC).
    """
    as_of = as_of or datetime.now(UTC)
    by_type: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for resource in resources:
        if isinstance(resource, dict) and resource.get("resourceType") and resource.get("id"):
            by_type[resource["resourceType"]].append(resource)

    builder = _Builder(as_of)
    builder.lines.append(f"As of {as_of.date().isoformat()}.")
    builder.lines.append(_patient_line(patient, as_of, builder))
    builder.lines.append("")
    builder.section("Conditions", "conditions", [_condition(r, builder) for r in by_type["Condition"]])
    builder.section(
        "Medications", "medications", [_medication(r, builder) for r in by_type["MedicationRequest"]]
    )
    builder.section("Allergies", "allergies", [_allergy(r, builder) for r in by_type["AllergyIntolerance"]])
    builder.section("Labs and vitals (latest first)", "observations", _observations(by_type["Observation"], builder))
    builder.section("Encounters", "encounters", [_encounter(r, builder) for r in by_type["Encounter"]])
    builder.section("Reports", "reports", [_report(r, builder) for r in by_type["DiagnosticReport"]])
    builder.section("Imaging studies", "imaging", [_imaging(r, builder) for r in by_type["ImagingStudy"]])
    builder.section("Notes (untrusted text)", "notes", [_note(r, builder) for r in by_type["DocumentReference"]])
    return HistoryContext(
        text="\n".join(builder.lines).strip() + "\n", sources=list(builder.cited.values()), omitted=builder.omitted
    )


def _patient_line(patient: dict[str, Any], as_of: datetime, builder: _Builder) -> str:
    born = parse_when(patient.get("birthDate"))
    age = ""
    if born is not None:
        years = as_of.year - born.year - ((as_of.month, as_of.day) < (born.month, born.day))
        age = f", age {years}"
    gender = patient.get("gender", "unknown sex")
    return f"Patient: {gender}{age} {builder.cite(patient)}"


def _condition(resource: dict[str, Any], b: _Builder) -> tuple[datetime | None, str]:
    name = concept_text(resource.get("code")) or "unnamed condition"
    status = _status(resource, "clinicalStatus") or "unknown status"
    onset = parse_when(resource.get("onsetDateTime") or (resource.get("onsetPeriod") or {}).get("start"))
    text = f"{name}: {status}, onset {_dated(onset, b)}"
    abated = parse_when(resource.get("abatementDateTime"))
    if abated is not None:
        text += f", resolved {_dated(abated, b)}"
    return onset, f"{text} {b.cite(resource)}"


def _dated(when: datetime | None, b: _Builder) -> str:
    """Return the date with its relative age against the builder's as-of date."""
    return dated(when, b.as_of)


def _medication(resource: dict[str, Any], b: _Builder) -> tuple[datetime | None, str]:
    med = concept_text(resource.get("medicationCodeableConcept"))
    if med is None:
        ref = (resource.get("medicationReference") or {}).get("display")
        med = ref or "unnamed medication"
    status = resource.get("status", "unknown")
    when = parse_when(resource.get("authoredOn"))
    dosage = ""
    instructions = resource.get("dosageInstruction") or []
    if instructions and isinstance(instructions[0], dict) and instructions[0].get("text"):
        dosage = f"; {instructions[0]['text']}"
    return when, f"{med}: {status}, ordered {_dated(when, b)}{dosage} {b.cite(resource)}"


def _allergy(resource: dict[str, Any], b: _Builder) -> tuple[datetime | None, str]:
    substance = concept_text(resource.get("code")) or "unnamed substance"
    reactions = []
    for reaction in resource.get("reaction") or []:
        manifestation = first_concept_text(reaction.get("manifestation"))
        if manifestation:
            severity = reaction.get("severity")
            reactions.append(f"{manifestation}{f' ({severity})' if severity else ''}")
    status = _status(resource, "clinicalStatus") or "unknown status"
    reaction_text = f", reaction: {', '.join(reactions)}" if reactions else ""
    when = parse_when(resource.get("recordedDate"))
    return when, f"{substance}: {status}{reaction_text} {b.cite(resource)}"


def _observation_value(resource: dict[str, Any]) -> str | None:
    value = quantity_text(resource.get("valueQuantity"))
    if value is None and resource.get("valueCodeableConcept"):
        value = concept_text(resource["valueCodeableConcept"])
    if value is None and resource.get("valueString") is not None:
        value = str(resource["valueString"])
    if value is None and resource.get("component"):
        parts = []
        for component in resource["component"]:
            part = quantity_text(component.get("valueQuantity"))
            if part:
                parts.append(f"{concept_text(component.get('code')) or '?'} {part}")
        value = "; ".join(parts) or None
    return value


def _observations(resources: list[dict[str, Any]], b: _Builder) -> list[tuple[datetime | None, str]]:
    """Group by test: the latest value with flag and range, the previous value and the trend."""
    groups: dict[str, list[tuple[datetime | None, dict[str, Any]]]] = defaultdict(list)
    for resource in resources:
        key = concept_key(resource.get("code")) or resource["id"]
        groups[key].append((parse_when(resource.get("effectiveDateTime") or resource.get("issued")), resource))
    rows = []
    epoch = datetime.min.replace(tzinfo=UTC)
    for series in groups.values():
        series.sort(key=lambda item: item[0] or epoch, reverse=True)
        when, latest = series[0]
        name = concept_text(latest.get("code")) or "unnamed observation"
        value = _observation_value(latest) or "no value"
        flag = first_concept_text(latest.get("interpretation"))
        extras = ", ".join(x for x in (flag, range_text(latest.get("referenceRange"))) if x)
        text = f"{name}: {value}{f' ({extras})' if extras else ''} on {_dated(when, b)} {b.cite(latest)}"
        if len(series) > 1:
            prev_when, previous = series[1]
            prev_value = _observation_value(previous) or "no value"
            trend = _trend(latest, previous)
            text += f"; previous {prev_value} on {_dated(prev_when, b)} {b.cite(previous)}{trend}"
            if len(series) > 2:
                text += f"; {len(series) - 2} earlier"
        rows.append((when, text))
    return rows


def _trend(latest: dict[str, Any], previous: dict[str, Any]) -> str:
    a = (latest.get("valueQuantity") or {}).get("value")
    b = (previous.get("valueQuantity") or {}).get("value")
    if not isinstance(a, int | float) or not isinstance(b, int | float):
        return ""
    if a > b:
        return ", rising"
    if a < b:
        return ", falling"
    return ", unchanged"


def _encounter(resource: dict[str, Any], b: _Builder) -> tuple[datetime | None, str]:
    period = resource.get("period") or {}
    when = parse_when(period.get("start"))
    klass = resource.get("class")
    class_text = (klass.get("display") or klass.get("code")) if isinstance(klass, dict) else None
    kind = class_text or first_concept_text(resource.get("type")) or "encounter"
    reason = first_concept_text(resource.get("reasonCode"))
    reason_text = f", reason: {reason}" if reason else ""
    return when, f"{_dated(when, b)} {kind}{reason_text} {b.cite(resource)}"


def _report(resource: dict[str, Any], b: _Builder) -> tuple[datetime | None, str]:
    when = parse_when(resource.get("effectiveDateTime") or resource.get("issued"))
    name = concept_text(resource.get("code")) or "report"
    conclusion = resource.get("conclusion")
    # Report conclusions are free text written by people: fenced like notes.
    body = f' conclusion: «{" ".join(str(conclusion).split())[:NOTE_CHARS]}»' if conclusion else ""
    return when, f"{_dated(when, b)} {name} ({resource.get('status', '?')}){body} {b.cite(resource)}"


def _imaging(resource: dict[str, Any], b: _Builder) -> tuple[datetime | None, str]:
    when = parse_when(resource.get("started"))
    modalities = sorted(
        {
            str(series.get("modality", {}).get("code"))
            for series in resource.get("series") or []
            if isinstance(series.get("modality"), dict)
        }
    )
    description = resource.get("description") or "imaging study"
    series_count = resource.get("numberOfSeries", len(resource.get("series") or []))
    return when, (
        f"{_dated(when, b)} {description} ({'/'.join(modalities) or '?'}, {series_count} series) {b.cite(resource)}"
    )


def _note(resource: dict[str, Any], b: _Builder) -> tuple[datetime | None, str]:
    when = parse_when(resource.get("date"))
    kind = concept_text(resource.get("type")) or "note"
    texts = []
    for content in resource.get("content") or []:
        text = attachment_text(content.get("attachment"), NOTE_CHARS)
        if text:
            texts.append(text)
    body = " ".join(texts) if texts else "(no inline text extracted)"
    return when, f"{_dated(when, b)} {kind} {b.cite(resource)}: «{body}»"
