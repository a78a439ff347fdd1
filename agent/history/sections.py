"""The record's sections and their lines: which resources group into one line, and how a line reads.

Where it sits: the context builder (:mod:`agent.history.context`) turns every fetched resource
into :class:`Line` candidates through :data:`SECTIONS`, ranks them against the question and
renders the ones that fit the budget. Repeated events of one concept (the readings of a lab, the
orders of a drug, the doses of a vaccine, the episodes of a condition, the times a procedure was
done) form one *series* line: the latest item with its date and citation, the items the question
points at (in its time window, the active ones, the last three of a trend), and how many there
are in all. So a long record still shows every concept it holds, and a "latest X" or "trend of
X" question finds X in the record's own words, whatever X is.

Each line carries its *search text*: what it says plus the codes (LOINC, SNOMED CT, RxNorm, CVX),
categories and the section's own words ("vaccine", "procedure", ...), so matching uses what the
record carries, not a word list of expected questions.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
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

Resource = dict[str, Any]
NOTE_CHARS = 600
_EPOCH = datetime.min.replace(tzinfo=UTC)


@dataclass
class Item:
    """One resource of a line, with its clinical date and whether it is current."""

    resource: Resource
    when: datetime | None
    active: bool


@dataclass
class Line:
    """A candidate line of the context: one series (newest item first) or one resource."""

    section: str
    items: list[Item]
    search: str = ""
    codes: set[str] = field(default_factory=set)

    @property
    def latest(self) -> Item:
        """Return the newest item."""
        return self.items[0]

    @property
    def when(self) -> datetime | None:
        """Return the newest item's date."""
        return self.items[0].when


class Renderer:
    """Renders lines, collecting the references each rendered text cites."""

    def __init__(self, as_of: datetime, index: dict[str, Resource], attachment_texts: dict[str, str]) -> None:
        self.as_of = as_of
        self.index = index
        self.attachment_texts = attachment_texts
        self.refs: list[ResourceRef] = []

    def cite(self, resource: Resource) -> str:
        """Return the resource's tag and remember it for the text being rendered."""
        ref = ResourceRef.of(resource)
        self.refs.append(ref)
        return ref.tag

    def dated(self, when: datetime | None) -> str:
        """Return the date with its age against the as-of date."""
        return dated(when, self.as_of)

    def referenced(self, reference: Any) -> Resource | None:
        """Return a fetched resource a Reference points at, or None."""
        if isinstance(reference, dict):
            return self.index.get(str(reference.get("reference", "")))
        return None


@dataclass(frozen=True)
class SectionSpec:
    """How one section of the context is made.

    Attributes:
        key: the section's key (``omitted`` counts, per-section caps).
        title: its heading.
        types: the resource types it shows.
        words: the section's own words, added to every line's search text ("vaccine", ...).
        series: group resources of one concept into a series line (else one line a resource).
        name: the concept's label (series lines).
        when: the item's clinical date.
        active: whether the item is current (active order, ongoing condition, ...).
        describe: the item's text without its name, for the first item of a line.
        brief: a short text for further items of a series (default: the date).
        core: whether a line belongs in every context (the flowsheet, the active problem list).
        count_word: how further items are counted ("readings", "orders", ...).
    """

    key: str
    title: str
    types: tuple[str, ...]
    words: tuple[str, ...]
    series: bool
    name: Callable[[Resource, Renderer], str]
    when: Callable[[Resource], datetime | None]
    describe: Callable[[Resource, Renderer], str]
    active: Callable[[Resource], bool] = lambda resource: False
    brief: Callable[[Resource, Renderer], str] | None = None
    core: Callable[[Line], bool] = lambda line: False
    count_word: str = "times"


# -- small readers ----------------------------------------------------------------------------
def _status_code(value: Any) -> str | None:
    if isinstance(value, dict):
        for coding in value.get("coding") or []:
            if isinstance(coding, dict) and coding.get("code"):
                return str(coding["code"]).lower()
        return str(value.get("text") or "").lower() or None
    return str(value).lower() if value else None


def _period_start(resource: Resource, *names: str) -> datetime | None:
    for name in names:
        value = resource.get(name)
        if isinstance(value, dict):
            value = value.get("start") or value.get("end")
        when = parse_when(value)
        if when is not None:
            return when
    return None


def codings(resource: Resource) -> Iterable[dict[str, Any]]:
    """Yield every Coding of the resource's main concepts and categories (for matching)."""
    for name in (
        "code",
        "medicationCodeableConcept",
        "vaccineCode",
        "category",
        "type",
        "reasonCode",
        "bodySite",
        "relationship",
    ):
        value = resource.get(name)
        for concept in value if isinstance(value, list) else [value]:
            if isinstance(concept, dict):
                yield from (c for c in concept.get("coding") or [] if isinstance(c, dict))
                if "code" in concept and "system" in concept:  # a bare Coding (Encounter.class)
                    yield concept
    for condition in resource.get("condition") or []:  # FamilyMemberHistory.condition[].code
        if isinstance(condition, dict):
            yield from (c for c in (condition.get("code") or {}).get("coding") or [] if isinstance(c, dict))


def search_text(resource: Resource) -> str:
    """Return the words a resource carries for matching: displays, texts, codes and categories."""
    parts: list[str] = []
    for coding in codings(resource):
        parts += [str(coding.get("display") or ""), str(coding.get("code") or "")]
    for name in ("code", "medicationCodeableConcept", "vaccineCode", "description", "type", "category"):
        value = resource.get(name)
        for concept in value if isinstance(value, list) else [value]:
            if isinstance(concept, dict) and concept.get("text"):
                parts.append(str(concept["text"]))
    return " ".join(part for part in parts if part)


def _codes(resource: Resource) -> set[str]:
    return {str(c["code"]).lower() for c in codings(resource) if c.get("code")}


# -- per-type text ----------------------------------------------------------------------------
def _concept_name(field_name: str, fallback: str) -> Callable[[Resource, Renderer], str]:
    def name(resource: Resource, _: Renderer) -> str:
        return concept_text(resource.get(field_name)) or fallback

    return name


def _condition_active(resource: Resource) -> bool:
    status = _status_code(resource.get("clinicalStatus"))
    if status is None:
        return resource.get("abatementDateTime") is None and resource.get("abatementPeriod") is None
    return status in ("active", "recurrence", "relapse")


def _condition(resource: Resource, r: Renderer) -> str:
    status = concept_text(resource.get("clinicalStatus")) or "unknown status"
    onset = _period_start(resource, "onsetDateTime", "onsetPeriod", "recordedDate")
    text = f"{status}, onset {r.dated(onset)}"
    abated = _period_start(resource, "abatementDateTime", "abatementPeriod")
    if abated is not None:
        text += f", resolved {r.dated(abated)}"
    return text


def _medication_name(resource: Resource, r: Renderer) -> str:
    name = concept_text(resource.get("medicationCodeableConcept"))
    if name is None:
        medication = r.referenced(resource.get("medicationReference"))
        if medication is not None:
            name = concept_text(medication.get("code"))
        name = name or (resource.get("medicationReference") or {}).get("display") or "unnamed medication"
    return str(name)


def _medication_key(resource: Resource) -> str | None:
    key = concept_key(resource.get("medicationCodeableConcept"))
    if key is None:
        reference = resource.get("medicationReference")
        key = str(reference.get("reference") or reference.get("display")) if isinstance(reference, dict) else None
    return key


def _medication(resource: Resource, r: Renderer) -> str:
    status = resource.get("status", "unknown")
    text = f"{status}, ordered {r.dated(parse_when(resource.get('authoredOn')))}"
    instructions = resource.get("dosageInstruction") or []
    if instructions and isinstance(instructions[0], dict) and instructions[0].get("text"):
        text += f"; {instructions[0]['text']}"
    if resource.get("medicationCodeableConcept") is None:
        medication = r.referenced(resource.get("medicationReference"))
        if medication is not None:
            # the Medication resource was fetched (followed reference or _include): cite it too
            text += f" {r.cite(medication)}"
    return text


def _medication_brief(resource: Resource, r: Renderer) -> str:
    return f"{resource.get('status', 'unknown')} {_day(parse_when(resource.get('authoredOn')))}"


def _allergy(resource: Resource, r: Renderer) -> str:
    reactions = []
    for reaction in resource.get("reaction") or []:
        if not isinstance(reaction, dict):
            continue
        manifestation = first_concept_text(reaction.get("manifestation"))
        if manifestation:
            severity = reaction.get("severity")
            reactions.append(f"{manifestation}{f' ({severity})' if severity else ''}")
    status = concept_text(resource.get("clinicalStatus")) or "unknown status"
    criticality = f", criticality {resource['criticality']}" if resource.get("criticality") else ""
    reaction_text = f", reaction: {', '.join(reactions)}" if reactions else ""
    return f"{status}{criticality}{reaction_text}, recorded {r.dated(parse_when(resource.get('recordedDate')))}"


def observation_value(resource: Resource) -> str | None:
    """Return an Observation's value as text: quantity, concept, string, or its components."""
    value = quantity_text(resource.get("valueQuantity"))
    if value is None and resource.get("valueCodeableConcept"):
        value = concept_text(resource["valueCodeableConcept"])
    if value is None and resource.get("valueString") is not None:
        value = str(resource["valueString"])
    if value is None and resource.get("component"):
        parts = []
        for component in resource["component"]:
            if not isinstance(component, dict):
                continue
            part = quantity_text(component.get("valueQuantity")) or concept_text(component.get("valueCodeableConcept"))
            if part:
                parts.append(f"{concept_text(component.get('code')) or '?'} {part}")
        value = "; ".join(parts) or None
    return value


def _observation(resource: Resource, r: Renderer) -> str:
    value = observation_value(resource) or "no value"
    flag = first_concept_text(resource.get("interpretation"))
    extras = ", ".join(x for x in (flag, range_text(resource.get("referenceRange"))) if x)
    when = _observation_when(resource)
    return f"{value}{f' ({extras})' if extras else ''} on {r.dated(when)}"


def _observation_brief(resource: Resource, r: Renderer) -> str:
    return f"{observation_value(resource) or 'no value'} on {_day(_observation_when(resource))}"


def _day(when: datetime | None) -> str:
    """Return the bare date of a further item of a series (the line's first item carries the age)."""
    return when.date().isoformat() if when is not None else "undated"


def _observation_when(resource: Resource) -> datetime | None:
    return _period_start(resource, "effectiveDateTime", "effectivePeriod", "effectiveInstant", "issued")


def _on_date(when: Callable[[Resource], datetime | None]) -> Callable[[Resource, Renderer], str]:
    def brief(resource: Resource, r: Renderer) -> str:
        return _day(when(resource))

    return brief


def _procedure_when(resource: Resource) -> datetime | None:
    return _period_start(resource, "performedDateTime", "performedPeriod", "performedString")


def _reason(resource: Resource, r: Renderer, *, cite: int = 0) -> str:
    """Return ', reason: X' from reasonCode / reasonReference, citing up to ``cite`` fetched reasons.

    Real records repeat one reason many times (a procedure of a pregnancy pointing at every
    pregnancy Condition): the text names it once and cites only the first few.
    """
    reason = first_concept_text(resource.get("reasonCode"))
    tags = ""
    for reference in resource.get("reasonReference") or []:
        target = r.referenced(reference)
        if target is not None:
            reason = reason or concept_text(target.get("code"))
            if cite > 0:
                tags += f" {r.cite(target)}"
                cite -= 1
        elif isinstance(reference, dict) and reference.get("display"):
            reason = reason or str(reference["display"])
    return f", reason: {reason}{tags}" if reason or tags else ""


def _procedure(resource: Resource, r: Renderer) -> str:
    status = resource.get("status")
    status_text = f" ({status})" if status and status != "completed" else ""
    return f"{r.dated(_procedure_when(resource))}{status_text}{_reason(resource, r)}"


def _immunization_when(resource: Resource) -> datetime | None:
    return _period_start(resource, "occurrenceDateTime", "recorded")


def _immunization(resource: Resource, r: Renderer) -> str:
    status = resource.get("status")
    return f"{r.dated(_immunization_when(resource))}{f' ({status})' if status and status != 'completed' else ''}"


def _encounter_when(resource: Resource) -> datetime | None:
    return _period_start(resource, "period")


def _encounter(resource: Resource, r: Renderer) -> str:
    klass = resource.get("class")
    class_text = (klass.get("display") or klass.get("code")) if isinstance(klass, dict) else None
    kind = first_concept_text(resource.get("type"))
    label = " ".join(x for x in (class_text, kind) if x) or "encounter"
    return f"{r.dated(_encounter_when(resource))} {label}{_reason(resource, r, cite=2)}"


def _report_when(resource: Resource) -> datetime | None:
    return _period_start(resource, "effectiveDateTime", "effectivePeriod", "issued")


def _report(resource: Resource, r: Renderer) -> str:
    conclusion = resource.get("conclusion")
    # Report conclusions are free text written by people: fenced like notes.
    body = f" conclusion: «{' '.join(str(conclusion).split())[:NOTE_CHARS]}»" if conclusion else ""
    return f"{r.dated(_report_when(resource))} ({resource.get('status', '?')}){body}"


def _imaging_when(resource: Resource) -> datetime | None:
    return parse_when(resource.get("started"))


def _imaging(resource: Resource, r: Renderer) -> str:
    series = [s for s in resource.get("series") or [] if isinstance(s, dict)]
    modalities = sorted({str(s["modality"].get("code")) for s in series if isinstance(s.get("modality"), dict)})
    sites = sorted({concept_text(s.get("bodySite")) or "" for s in series} - {""})
    description = resource.get("description") or "imaging study"
    series_count = resource.get("numberOfSeries", len(series))
    site_text = f", {'/'.join(sites)}" if sites else ""
    kinds = "/".join(modalities) or "?"
    return f"{r.dated(_imaging_when(resource))} {description} ({kinds}{site_text}, {series_count} series)"


def _care_plan_name(resource: Resource, _: Renderer) -> str:
    return resource.get("title") or first_concept_text(resource.get("category")) or "care plan"


def _care_plan(resource: Resource, r: Renderer) -> str:
    period = resource.get("period") or {}
    text = f"{resource.get('status', 'unknown')}, from {r.dated(parse_when(period.get('start')))}"
    if parse_when(period.get("end")) is not None:
        text += f" to {r.dated(parse_when(period.get('end')))}"
    activities = [
        concept_text((a.get("detail") or {}).get("code"))
        for a in resource.get("activity") or []
        if isinstance(a, dict) and isinstance(a.get("detail"), dict)
    ]
    named = [a for a in activities if a]
    if named:
        text += f"; activities: {', '.join(named[:4])}{' …' if len(named) > 4 else ''}"
    for reference in resource.get("addresses") or []:
        target = r.referenced(reference)
        if target is not None:
            # one condition named and cited: real plans repeat the same one per episode
            text += f"; for {concept_text(target.get('code')) or 'a condition'} {r.cite(target)}"
            break
    return text


def _goal_name(resource: Resource, _: Renderer) -> str:
    return concept_text(resource.get("description")) or "goal"


def _goal(resource: Resource, r: Renderer) -> str:
    achievement = concept_text(resource.get("achievementStatus"))
    due = None
    for target in resource.get("target") or []:
        if isinstance(target, dict) and target.get("dueDate"):
            due = parse_when(target["dueDate"])
    text = str(resource.get("lifecycleStatus", "unknown"))
    if achievement:
        text += f", {achievement}"
    if due is not None:
        text += f", due {r.dated(due)}"
    return text


def _device_name(resource: Resource, _: Renderer) -> str:
    names = resource.get("deviceName") or []
    named = next((n.get("name") for n in names if isinstance(n, dict) and n.get("name")), None)
    return concept_text(resource.get("type")) or named or "device"


def _device_when(resource: Resource) -> datetime | None:
    return parse_when(resource.get("manufactureDate")) or parse_when(resource.get("expirationDate"))


def _device(resource: Resource, r: Renderer) -> str:
    text = str(resource.get("status", "unknown status"))
    if resource.get("manufactureDate"):
        text += f", made {r.dated(parse_when(resource['manufactureDate']))}"
    if resource.get("distinctIdentifier") or resource.get("udiCarrier"):
        text += ", UDI on record"
    return text


def _family_name(resource: Resource, _: Renderer) -> str:
    return concept_text(resource.get("relationship")) or "relative"


def _family_when(resource: Resource) -> datetime | None:
    return parse_when(resource.get("date"))


def _family(resource: Resource, r: Renderer) -> str:
    conditions = []
    for condition in resource.get("condition") or []:
        if not isinstance(condition, dict):
            continue
        name = concept_text(condition.get("code"))
        if name:
            onset = condition.get("onsetAge") or {}
            age = f" at {onset['value']:g}" if isinstance(onset.get("value"), int | float) else ""
            conditions.append(f"{name}{age}")
    deceased = ", deceased" if resource.get("deceasedBoolean") or resource.get("deceasedAge") else ""
    return f"{', '.join(conditions) or 'no condition recorded'}{deceased}"


def _order_when(resource: Resource) -> datetime | None:
    return _period_start(resource, "occurrenceDateTime", "occurrencePeriod", "authoredOn")


def _order(resource: Resource, r: Renderer) -> str:
    return f"{resource.get('status', 'unknown')}, {r.dated(_order_when(resource))}{_reason(resource, r)}"


def _note_name(resource: Resource, _: Renderer) -> str:
    return concept_text(resource.get("type")) or "note"


def _note(resource: Resource, r: Renderer) -> str:
    texts = []
    for number, content in enumerate(resource.get("content") or []):
        if not isinstance(content, dict):
            continue
        text = attachment_text(content.get("attachment"), NOTE_CHARS)
        if text is None:
            text = r.attachment_texts.get(f"DocumentReference/{resource['id']}#{number}")
            if text is not None and len(text) > NOTE_CHARS:
                text = text[:NOTE_CHARS] + "…"
        if text:
            texts.append(text)
    body = " ".join(texts) if texts else "(no inline text extracted)"
    return f"{r.dated(parse_when(resource.get('date')))}: «{body}»"


def _is(*values: str, field_name: str = "status") -> Callable[[Resource], bool]:
    def active(resource: Resource) -> bool:
        return _status_code(resource.get(field_name)) in values

    return active


def _any_active(line: Line) -> bool:
    return any(item.active for item in line.items)


def _always(line: Line) -> bool:
    return True


SECTIONS: tuple[SectionSpec, ...] = (
    SectionSpec(
        "conditions",
        "Conditions",
        ("Condition",),
        ("condition", "diagnosis", "diagnose", "problem", "disease", "illness", "wrong"),
        True,
        _concept_name("code", "unnamed condition"),
        lambda res: _period_start(res, "onsetDateTime", "onsetPeriod", "recordedDate"),
        _condition,
        active=_condition_active,
        core=_any_active,
        count_word="episodes",
    ),
    SectionSpec(
        "medications",
        "Medications",
        ("MedicationRequest",),
        ("medication", "medicine", "drug", "prescription", "prescribed", "pill", "tablet", "meds", "taking", "rx"),
        True,
        _medication_name,
        lambda res: parse_when(res.get("authoredOn")),
        _medication,
        active=_is("active", "on-hold"),
        brief=_medication_brief,
        core=_any_active,
        count_word="orders",
    ),
    SectionSpec(
        "allergies",
        "Allergies",
        ("AllergyIntolerance",),
        ("allergy", "allergic", "intolerance", "reaction"),
        False,
        _concept_name("code", "unnamed substance"),
        lambda res: parse_when(res.get("recordedDate")),
        _allergy,
        active=lambda res: _status_code(res.get("clinicalStatus")) in (None, "active"),
        core=_always,
    ),
    SectionSpec(
        "observations",
        "Labs and vitals (latest first)",
        ("Observation",),
        ("lab", "test", "result", "level", "vital", "reading", "measurement", "observation"),
        True,
        _concept_name("code", "unnamed observation"),
        _observation_when,
        _observation,
        brief=_observation_brief,
        core=_always,
        count_word="readings",
    ),
    SectionSpec(
        "procedures",
        "Procedures",
        ("Procedure",),
        ("procedure", "surgery", "surgical", "operation", "operated"),
        True,
        _concept_name("code", "unnamed procedure"),
        _procedure_when,
        _procedure,
        brief=_on_date(_procedure_when),
    ),
    SectionSpec(
        "immunizations",
        "Immunizations",
        ("Immunization",),
        ("immunization", "immunisation", "vaccine", "vaccination", "vaccinated", "shot", "jab", "booster"),
        True,
        _concept_name("vaccineCode", "unnamed vaccine"),
        _immunization_when,
        _immunization,
        brief=_on_date(_immunization_when),
        count_word="doses",
    ),
    SectionSpec(
        "encounters",
        "Encounters",
        ("Encounter",),
        ("visit", "encounter", "appointment", "admission", "admitted", "seen", "consultation", "doctor"),
        False,
        lambda res, r: "",
        _encounter_when,
        _encounter,
    ),
    SectionSpec(
        "reports",
        "Reports",
        ("DiagnosticReport",),
        ("report", "panel"),
        True,
        _concept_name("code", "report"),
        _report_when,
        _report,
        brief=_on_date(_report_when),
        count_word="reports",
    ),
    SectionSpec(
        "imaging",
        "Imaging studies",
        ("ImagingStudy",),
        ("imaging", "image", "scan", "x-ray", "xray", "radiograph", "study", "ultrasound", "mri", "ct"),
        False,
        lambda res, r: "",
        _imaging_when,
        _imaging,
    ),
    SectionSpec(
        "care_plans",
        "Care plans",
        ("CarePlan",),
        ("care plan", "plan", "care"),
        False,
        _care_plan_name,
        lambda res: _period_start(res, "period", "created"),
        _care_plan,
        active=_is("active", "on-hold"),
        core=_any_active,
    ),
    SectionSpec(
        "goals",
        "Goals",
        ("Goal",),
        ("goal", "target"),
        False,
        _goal_name,
        lambda res: parse_when(res.get("startDate") or res.get("statusDate")),
        _goal,
        active=_is("active", "accepted", "planned", "on-hold", field_name="lifecycleStatus"),
        core=_any_active,
    ),
    SectionSpec(
        "devices",
        "Devices and implants",
        ("Device",),
        ("device", "implant", "implanted", "stent", "pacemaker", "prosthesis"),
        False,
        _device_name,
        _device_when,
        _device,
        active=_is("active"),
        core=_always,
    ),
    SectionSpec(
        "family_history",
        "Family history",
        ("FamilyMemberHistory",),
        ("family", "mother", "father", "sister", "brother", "parent", "sibling", "hereditary", "inherited"),
        False,
        _family_name,
        _family_when,
        _family,
        core=_always,
    ),
    SectionSpec(
        "orders",
        "Orders and referrals",
        ("ServiceRequest",),
        ("order", "ordered", "referral", "referred", "request"),
        True,
        _concept_name("code", "unnamed order"),
        _order_when,
        _order,
        active=_is("active", "draft", "on-hold"),
        brief=_on_date(_order_when),
    ),
    SectionSpec(
        "notes",
        "Notes (untrusted text)",
        ("DocumentReference",),
        ("note", "letter", "document", "summary", "wrote", "written"),
        False,
        _note_name,
        lambda res: parse_when(res.get("date")),
        _note,
    ),
)
SECTION_BY_TYPE: dict[str, SectionSpec] = {kind: spec for spec in SECTIONS for kind in spec.types}


def _series_key(spec: SectionSpec, resource: Resource) -> str:
    if spec.key == "medications":
        key = _medication_key(resource)
    else:
        field_name = "vaccineCode" if spec.key == "immunizations" else "code"
        key = concept_key(resource.get(field_name))
    return key or f"{resource['resourceType']}/{resource['id']}"


def make_lines(resources: Iterable[Resource], renderer: Renderer) -> tuple[list[Line], list[str]]:
    """Return the candidate lines of every section, newest item first, and the resources that could not be read.

    A resource whose fields are not what FHIR says (a string where an object belongs, say) is
    left out and named in the second list, so the caller can warn; one bad resource never
    costs the rest of the record.
    """
    groups: dict[tuple[str, str], list[Item]] = defaultdict(list)
    unreadable: list[str] = []
    for resource in resources:
        spec = SECTION_BY_TYPE.get(str(resource.get("resourceType")))
        if spec is None or _status_code(resource.get("status")) == "entered-in-error":
            continue  # an entry recorded by mistake is not a fact about the patient
        try:
            item = Item(resource, spec.when(resource), spec.active(resource))
            key = _series_key(spec, resource) if spec.series else f"{resource['resourceType']}/{resource['id']}"
            # rendered once here, to a scratch renderer, so that a field of the wrong shape is
            # found now, for this resource alone, and never while its whole line is written
            scratch = Renderer(renderer.as_of, renderer.index, renderer.attachment_texts)
            spec.name(resource, scratch), spec.describe(resource, scratch)
            if spec.brief is not None:
                spec.brief(resource, scratch)
        except (AttributeError, KeyError, TypeError, ValueError):
            unreadable.append(f"{resource.get('resourceType')}/{resource.get('id')}")
            continue
        groups[(spec.key, key)].append(item)
    lines: list[Line] = []
    for (section, _), items in groups.items():
        items.sort(key=lambda item: item.when or _EPOCH, reverse=True)
        spec = next(s for s in SECTIONS if s.key == section)
        words = " ".join(spec.words)
        texts = {search_text(item.resource) for item in items}
        codes = set().union(*(_codes(item.resource) for item in items))
        lines.append(Line(section, items, f"{' '.join(sorted(texts))} {words}".lower(), codes))
    return lines, unreadable


def spec_of(line: Line) -> SectionSpec:
    """Return the section a line belongs to."""
    return next(spec for spec in SECTIONS if spec.key == line.section)


def render_line(line: Line, featured: list[Item], renderer: Renderer, *, trend: bool, note: str = "") -> str:
    """Render a line with these of its items (the newest first); the renderer collects the citations.

    Args:
        line: the line.
        featured: the items to show, newest first; the first is described in full, the others briefly.
        renderer: collects the references the text cites.
        trend: add the direction of the two newest numeric readings (observations).
        note: a closing remark, e.g. how many matching items are not listed.
    """
    spec = spec_of(line)
    first = featured[0]
    name = spec.name(first.resource, renderer)
    body = spec.describe(first.resource, renderer)
    text = f"{name}: {body}" if name else body
    text += f" {renderer.cite(first.resource)}"
    brief = spec.brief or (lambda res, r: _day(spec.when(res)))
    for item in featured[1:]:
        text += f"; {brief(item.resource, renderer)} {renderer.cite(item.resource)}"
    if trend and len(line.items) > 1:
        text += _trend(line.items[0].resource, line.items[1].resource)
    if len(line.items) > len(featured):
        oldest = line.items[-1].when
        since = f" since {oldest.year}" if oldest is not None else ""
        text += f"; {len(line.items)} {spec.count_word} in all{since}"
    return text + note


def _trend(latest: Resource, previous: Resource) -> str:
    a = (latest.get("valueQuantity") or {}).get("value")
    b = (previous.get("valueQuantity") or {}).get("value")
    if not isinstance(a, int | float) or not isinstance(b, int | float):
        return ""
    if a > b:
        return "; rising vs the previous reading"
    if a < b:
        return "; falling vs the previous reading"
    return "; unchanged vs the previous reading"
