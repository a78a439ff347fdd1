"""Build the compact, dated, cited patient context the reasoner reads.

Every line ends with the ``[Type/id]`` tags of the resources it rests on; the set of tags that
appear is the run's *sources*, the only references a citation may name. Free text from notes is
fenced and labelled as untrusted data so it cannot pose as instructions. Sections are capped;
what is left out is said, never silently dropped.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

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
from agent.history.relevance import question_terms, relevance

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

T = TypeVar("T")


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


Row = tuple[datetime | None, str, list[ResourceRef]]
#: Characters per token, the proxy used for the budget (MedGemma's tokenizer averages close to 4
#: characters per token on English clinical text; the benchmark counts with the real tokenizer).
CHARS_PER_TOKEN = 4


class _Builder:
    """Accumulates lines; a resource becomes a source only if its line is actually shown."""

    def __init__(
        self,
        as_of: datetime,
        index: dict[str, dict[str, Any]] | None = None,
        attachment_texts: dict[str, str] | None = None,
    ) -> None:
        self.as_of = as_of
        #: text of URL attachments fetched before building ("Type/id#content index" -> text)
        self.attachment_texts = attachment_texts or {}
        #: years the question names, and whether it asks for a first / baseline value: older
        #: readings of a series are shown only when the question points at them
        self.question_years: set[int] = set()
        self.wants_first = False
        #: every fetched resource by "Type/id", to name what references point at
        self.index = index or {}
        self.lines: list[str] = []
        self.cited: dict[str, ResourceRef] = {}
        self.omitted: dict[str, int] = {}
        self._row_refs: list[ResourceRef] = []

    def cite(self, resource: dict[str, Any]) -> str:
        """Return the resource's tag and remember it for the row being built."""
        ref = ResourceRef.of(resource)
        self._row_refs.append(ref)
        return ref.tag

    def rows(self, items: Iterable[T], render: Callable[[T, _Builder], tuple[datetime | None, str]]) -> list[Row]:
        """Render each item into a row, keeping the references that row cites."""
        rows: list[Row] = []
        for item in items:
            self._row_refs = []
            when, text = render(item, self)
            rows.append((when, text, self._row_refs))
        return rows

    def shown(self, refs: list[ResourceRef]) -> None:
        """Record references whose line made it into the context."""
        for ref in refs:
            self.cited.setdefault(ref.reference, ref)

    def sections(self, sections: list[tuple[str, str, list[Row]]], terms: set[str], budget_chars: int | None) -> None:
        """Add the sections: relevant rows first, then newest; capped per section and by the budget.

        Rows that do not fit are counted in a closing line of their section (and in ``omitted``),
        so nothing is dropped silently.
        """
        epoch = datetime.min.replace(tzinfo=UTC)
        ranked: dict[str, list[tuple[int, Row]]] = {}
        for _, key, rows in sections:
            scored = [(relevance(row[1], terms), row) for row in rows]
            scored.sort(key=lambda item: (item[0], item[1][0] or epoch), reverse=True)
            ranked[key] = scored[: SECTION_LIMITS[key]]
        admitted: set[int] = set()
        if budget_chars is None:
            admitted = {id(row) for rows in ranked.values() for _, row in rows}
        else:
            # headers, blank lines and a possible "… N more not shown" line per section count too
            spent = sum(len(line) + 1 for line in self.lines) + sum(
                len(title) + 12 + 80 for title, _, rows in sections if rows
            )
            candidates = [(score, row) for rows in ranked.values() for score, row in rows]
            candidates.sort(key=lambda item: (item[0], item[1][0] or epoch), reverse=True)
            for _, row in candidates:
                cost = len(row[1]) + 3
                if spent + cost <= budget_chars:
                    admitted.add(id(row))
                    spent += cost
        for title, key, rows in sections:
            if not rows:
                continue
            shown = [row for _, row in ranked[key] if id(row) in admitted]
            self.lines.append(f"## {title} ({len(rows)})")
            for _, text, refs in shown:
                self.lines.append(f"- {text}")
                self.shown(refs)
            left_out = len(rows) - len(shown)
            if left_out:
                self.omitted[key] = left_out
                reason = "less relevant to the question or older" if terms else "older"
                self.lines.append(f"- … {left_out} more {key} not shown ({reason})")
            self.lines.append("")


def build_context(
    patient: dict[str, Any],
    resources: Iterable[dict[str, Any]],
    *,
    as_of: datetime | None = None,
    missing: dict[str, str] | None = None,
    question: str | None = None,
    token_budget: int | None = None,
    attachment_texts: dict[str, str] | None = None,
) -> HistoryContext:
    """Return the dated, cited text of a patient's record as of a date.

    Args:
        patient: the Patient resource.
        resources: every other resource fetched for the patient (any order, any types).
        as_of: the date relative times are computed against (default: now, UTC).
        missing: resource types that could not be fetched (type -> error code): the context
            says the record is partial, so neither the model nor the reader takes absence as
            evidence.
        question: facts whose text matches the question (and its clinical synonyms) come first
            and survive the budget first.
        token_budget: upper bound on the context's size, in tokens (estimated at
            :data:`CHARS_PER_TOKEN` characters each); None keeps every row up to the section caps.
        attachment_texts: text of attachments given by URL, fetched beforehand
            (``"DocumentReference/<id>#<content index>"`` -> text).
    """
    as_of = as_of or datetime.now(UTC)
    by_type: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for resource in resources:
        if isinstance(resource, dict) and resource.get("resourceType") and resource.get("id"):
            by_type[resource["resourceType"]].append(resource)

    index = {f"{r['resourceType']}/{r['id']}": r for rs in by_type.values() for r in rs}
    builder = _Builder(as_of, index, attachment_texts)
    builder.question_years, builder.wants_first = _question_time_hints(question)
    builder.lines.append(f"As of {as_of.date().isoformat()}.")
    if missing:
        kinds = ", ".join(f"{kind} ({code})" for kind, code in sorted(missing.items()))
        builder.lines.append(f"PARTIAL RECORD: these could not be fetched, so their absence means nothing: {kinds}.")
    patient_row = builder.rows([patient], _patient_line)[0]
    builder.lines.append(patient_row[1])
    builder.shown(patient_row[2])
    builder.lines.append("")
    sections = [
        ("Conditions", "conditions", builder.rows(by_type["Condition"], _condition)),
        ("Medications", "medications", builder.rows(by_type["MedicationRequest"], _medication)),
        ("Allergies", "allergies", builder.rows(by_type["AllergyIntolerance"], _allergy)),
        (
            "Labs and vitals (latest first)",
            "observations",
            builder.rows(_observation_series(by_type["Observation"]), _observation_row),
        ),
        ("Encounters", "encounters", builder.rows(by_type["Encounter"], _encounter)),
        ("Reports", "reports", builder.rows(by_type["DiagnosticReport"], _report)),
        ("Imaging studies", "imaging", builder.rows(by_type["ImagingStudy"], _imaging)),
        ("Notes (untrusted text)", "notes", builder.rows(by_type["DocumentReference"], _note)),
    ]
    budget_chars = token_budget * CHARS_PER_TOKEN if token_budget is not None else None
    builder.sections(sections, question_terms(question), budget_chars)
    return HistoryContext(
        text="\n".join(builder.lines).strip() + "\n",
        sources=list(builder.cited.values()),
        omitted=builder.omitted,
    )


def _patient_line(patient: dict[str, Any], builder: _Builder) -> tuple[datetime | None, str]:
    as_of = builder.as_of
    born = parse_when(patient.get("birthDate"))
    age = ""
    if born is not None:
        years = as_of.year - born.year - ((as_of.month, as_of.day) < (born.month, born.day))
        age = f", age {years}"
    gender = patient.get("gender", "unknown sex")
    return born, f"Patient: {gender}{age} {builder.cite(patient)}"


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
    medication_tag = ""
    if med is None:
        reference = resource.get("medicationReference") or {}
        medication = b.index.get(str(reference.get("reference", "")))
        if medication is not None:
            # the Medication resource was fetched (followed reference or _include): name it and cite it
            med = concept_text(medication.get("code"))
            medication_tag = f" {b.cite(medication)}"
        med = med or reference.get("display") or "unnamed medication"
    status = resource.get("status", "unknown")
    when = parse_when(resource.get("authoredOn"))
    dosage = ""
    instructions = resource.get("dosageInstruction") or []
    if instructions and isinstance(instructions[0], dict) and instructions[0].get("text"):
        dosage = f"; {instructions[0]['text']}"
    return when, f"{med}: {status}, ordered {_dated(when, b)}{dosage} {b.cite(resource)}{medication_tag}"


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


Series = list[tuple[datetime | None, dict[str, Any]]]


def _observation_series(resources: list[dict[str, Any]]) -> list[Series]:
    """Group observations by test code, newest first within each group."""
    groups: dict[str, Series] = defaultdict(list)
    for resource in resources:
        key = concept_key(resource.get("code")) or resource["id"]
        groups[key].append((parse_when(resource.get("effectiveDateTime") or resource.get("issued")), resource))
    epoch = datetime.min.replace(tzinfo=UTC)
    for series in groups.values():
        series.sort(key=lambda item: item[0] or epoch, reverse=True)
    return list(groups.values())


def _observation_row(series: Series, b: _Builder) -> tuple[datetime | None, str]:
    """Render a test's latest value with flag and range, the previous value and the trend."""
    when, latest = series[0]
    name = concept_text(latest.get("code")) or "unnamed observation"
    value = _observation_value(latest) or "no value"
    flag = first_concept_text(latest.get("interpretation"))
    extras = ", ".join(x for x in (flag, range_text(latest.get("referenceRange"))) if x)
    text = f"{name}: {value}{f' ({extras})' if extras else ''} on {_dated(when, b)} {b.cite(latest)}"
    if len(series) > 1:
        prev_when, previous = series[1]
        prev_value = _observation_value(previous) or "no value"
        text += f"; previous {prev_value} on {_dated(prev_when, b)} {b.cite(previous)}{_trend(latest, previous)}"
        earlier = series[2:]
        wanted: list[tuple[datetime | None, dict[str, Any]]] = [
            (earlier_when, reading)
            for earlier_when, reading in earlier
            if earlier_when is not None and earlier_when.year in b.question_years
        ]
        if b.wants_first and earlier and earlier[-1] not in wanted:
            wanted.append(earlier[-1])  # the earliest reading: a baseline question
        for earlier_when, reading in wanted[:4]:
            shown = _observation_value(reading) or "no value"
            text += f"; {shown} on {_dated(earlier_when, b)} {b.cite(reading)}"
        if len(earlier) > len(wanted[:4]):
            text += f"; {len(earlier) - len(wanted[:4])} earlier"
    return when, text


_YEAR = re.compile(r"\b(19[5-9]\d|20\d\d)\b")
_FIRST = re.compile(r"\b(first|baseline|initial|earliest|when .* (found|diagnosed|started))\b", re.IGNORECASE)


def _question_time_hints(question: str | None) -> tuple[set[int], bool]:
    """Return the years a question names and whether it asks for a first or baseline value."""
    if not question:
        return set(), False
    return {int(year) for year in _YEAR.findall(question)}, _FIRST.search(question) is not None


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
    body = f" conclusion: «{' '.join(str(conclusion).split())[:NOTE_CHARS]}»" if conclusion else ""
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
    for number, content in enumerate(resource.get("content") or []):
        text = attachment_text(content.get("attachment"), NOTE_CHARS)
        if text is None:
            text = b.attachment_texts.get(f"DocumentReference/{resource['id']}#{number}")
            if text is not None and len(text) > NOTE_CHARS:
                text = text[:NOTE_CHARS] + "…"
        if text:
            texts.append(text)
    body = " ".join(texts) if texts else "(no inline text extracted)"
    return when, f"{_dated(when, b)} {kind} {b.cite(resource)}: «{body}»"
