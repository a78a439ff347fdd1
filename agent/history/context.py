"""Build the compact, dated, cited patient context the reasoner reads.

Where it sits: the graph's fetch step calls :func:`build_context` with everything fetched for
the patient, the question and the plan's codes; the text goes into the model's prompt.

Every line ends with the ``[Type/id]`` tags of the resources it rests on; the set of tags that
appear is the run's *sources*, the only references a citation may name. Free text from notes is
fenced and labelled as untrusted data so it cannot pose as instructions.

Selection, within a token budget (see :mod:`agent.history.sections` for what a line is):

1. lines the question points at: its terms found in the line's own words and codes (the plan's
   codes matched exactly), and, when it names a time ("in 2019", "since March"), the lines with
   facts inside that window, which then list every such fact;
2. the core of any record: one flowsheet line per observation series (latest value, date, trend,
   count), the active problems, active medications, allergies, active care plans and goals,
   devices, family history, the last encounter and the last imaging study;
3. the rest, newest first, a few per section.

What does not fit is counted (per section, and in a closing line for sections with nothing
shown), so nothing is dropped silently; a list line that cannot show all its matching facts
says how many it left out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from agent.domain.refs import ResourceRef
from agent.history.fhir_values import parse_when
from agent.history.focus import QuestionFocus, day_window, question_focus
from agent.history.relevance import mentions
from agent.history.sections import SECTIONS, Item, Line, Renderer, make_lines, render_line, spec_of

#: Lines each section shows from the third tier (neither asked about nor core) before counting the rest.
SECTION_LIMITS = {
    "conditions": 20,
    "medications": 20,
    "allergies": 10,
    "observations": 25,
    "procedures": 8,
    "immunizations": 6,
    "encounters": 5,
    "reports": 5,
    "imaging": 5,
    "care_plans": 5,
    "goals": 5,
    "devices": 10,
    "family_history": 10,
    "orders": 5,
    "notes": 3,
}
#: Characters per token, the proxy used for the budget (MedGemma's tokenizer averages close to 4
#: characters per token on English clinical text; the benchmark counts with the real tokenizer).
CHARS_PER_TOKEN = 4
_EPOCH = datetime.min.replace(tzinfo=UTC)
# What a "… N more not shown (…)" line or a section heading costs at most, in characters.
_OMITTED_LINE = 50
_HEADING_EXTRA = 8
_CLOSING_LINE = 60


@dataclass
class HistoryContext:
    """The context text, the references it cites, what was left out and what could not be read."""

    text: str
    sources: list[ResourceRef] = field(default_factory=list)
    omitted: dict[str, int] = field(default_factory=dict)
    #: ``Type/id`` of resources whose fields could not be read (left out; the caller warns)
    unreadable: list[str] = field(default_factory=list)


@dataclass
class _Candidate:
    line: Line
    tier: int
    rank: float
    #: renderings, the fullest first; each with the references it cites
    variants: list[tuple[str, list[ResourceRef]]]
    chosen: int | None = None


def build_context(
    patient: dict[str, Any],
    resources: Iterable[dict[str, Any]],
    *,
    as_of: datetime | None = None,
    missing: dict[str, str] | None = None,
    question: str | None = None,
    token_budget: int | None = None,
    attachment_texts: dict[str, str] | None = None,
    plan_terms: Iterable[str] = (),
) -> HistoryContext:
    """Return the dated, cited text of a patient's record as of a date.

    Args:
        patient: the Patient resource.
        resources: every other resource fetched for the patient (any order, any types).
        as_of: the date relative times are computed against (default: now, UTC).
        missing: resource types that could not be fetched (type -> error code): the context
            says the record is partial, so neither the model nor the reader takes absence as
            evidence.
        question: facts the question points at come first and survive the budget first.
        token_budget: upper bound on the context's size, in tokens (estimated at
            :data:`CHARS_PER_TOKEN` characters each); None keeps every asked-about and core
            line, and a few of the rest per section.
        attachment_texts: text of attachments given by URL, fetched beforehand
            (``"DocumentReference/<id>#<content index>"`` -> text).
        plan_terms: the plan's codes and terms (matched against the record's codes and words).
    """
    as_of = as_of or datetime.now(UTC)
    usable = [r for r in resources if isinstance(r, dict) and r.get("resourceType") and r.get("id")]
    index = {f"{r['resourceType']}/{r['id']}": r for r in usable}
    renderer = Renderer(as_of, index, attachment_texts or {})
    focus = question_focus(question, as_of, plan_terms)
    lines, unreadable = make_lines(usable, renderer)
    newest = _newest_per_section(lines)
    if focus.last_visit and newest.get("encounters") is not None and newest["encounters"].when is not None:
        focus.window = day_window(newest["encounters"].when, "at the last visit")

    head = [f"As of {as_of.date().isoformat()}."]
    if missing:
        kinds = ", ".join(f"{kind} ({code})" for kind, code in sorted(missing.items()))
        head.append(f"PARTIAL RECORD: these could not be fetched, so their absence means nothing: {kinds}.")
    if unreadable:
        head.append(f"UNREADABLE: {len(unreadable)} malformed resource(s) left out.")
    renderer.refs = []
    head.append(_patient_line(patient, renderer, as_of))
    patient_refs = list(renderer.refs)
    head.append("")

    candidates = _candidates(lines, focus, question, renderer, newest)
    _admit(candidates, head, token_budget)
    text, sources, omitted = _render(candidates, head, focus)
    while token_budget is not None and len(text) > token_budget * CHARS_PER_TOKEN:
        # the admission's estimates were short: give up the least wanted line (or its fuller form)
        shown = [c for c in candidates if c.chosen is not None]
        if not shown:
            break
        last = shown[-1]
        last.chosen = last.chosen + 1 if last.chosen is not None and last.chosen + 1 < len(last.variants) else None
        text, sources, omitted = _render(candidates, head, focus)
    return HistoryContext(
        text=text,
        sources=_unique(patient_refs + sources),
        omitted=omitted,
        unreadable=unreadable,
    )


def _unique(refs: list[ResourceRef]) -> list[ResourceRef]:
    seen: dict[str, ResourceRef] = {}
    for ref in refs:
        seen.setdefault(ref.reference, ref)
    return list(seen.values())


def _patient_line(patient: dict[str, Any], renderer: Renderer, as_of: datetime) -> str:
    born = parse_when(patient.get("birthDate"))
    age = ""
    if born is not None:
        years = as_of.year - born.year - ((as_of.month, as_of.day) < (born.month, born.day))
        age = f", age {years}"
    deceased = parse_when(patient.get("deceasedDateTime"))
    died = f", died {renderer.dated(deceased)}" if deceased is not None else ""
    gender = patient.get("gender", "unknown sex")
    return f"Patient: {gender}{age}{died} {renderer.cite(patient)}"


def _newest_per_section(lines: list[Line]) -> dict[str, Line]:
    newest: dict[str, Line] = {}
    for line in lines:
        current = newest.get(line.section)
        if current is None or (line.when or _EPOCH) > (current.when or _EPOCH):
            newest[line.section] = line
    return newest


def _term_weights(lines: list[Line], terms: set[str]) -> dict[str, float]:
    """Weigh each term by how few lines hold it: a word on every line says little about any one."""
    weights: dict[str, float] = {}
    for term in terms:
        df = sum(1 for line in lines if mentions(line.search, term))
        if df:
            weights[term] = 1 / math.sqrt(df)
    return weights


def _candidates(
    lines: list[Line], focus: QuestionFocus, question: str | None, renderer: Renderer, newest: dict[str, Line]
) -> list[_Candidate]:
    weights = _term_weights(lines, focus.terms)
    asked = (question or "").lower()
    named_sections = {spec.key for spec in SECTIONS if any(mentions(asked, word) for word in spec.words)}
    newest_ids = {id(line) for key, line in newest.items() if key in ("encounters", "imaging")}
    candidates = []
    for line in lines:
        spec = spec_of(line)
        score = sum(weight for term, weight in weights.items() if mentions(line.search, term))
        score += 5 * len(line.codes & focus.codes)
        in_window = [item for item in line.items if focus.window.holds(item.when)] if focus.window else []
        active = [item for item in line.items if item.active]
        core = spec.core(line) or id(line) in newest_ids
        if focus.window is not None:
            wanted = in_window and (score > 0 or not named_sections or line.section in named_sections)
            tier = 0 if wanted else 1 if score > 0 or core else 2
        else:
            tier = 0 if score > 0 else 1 if core else 2
        rank = score + (2 if in_window else 0) + (0.5 if active and (focus.wants_current or score > 0) else 0)
        featured = _featured(line, focus, score > 0, in_window, active)
        candidates.append(_Candidate(line, tier, rank, _variants(line, featured, in_window, active, renderer)))
    candidates.sort(key=lambda c: (c.tier, -c.rank, -(c.line.when or _EPOCH).timestamp()))
    return candidates


def _featured(line: Line, focus: QuestionFocus, matched: bool, in_window: list[Item], active: list[Item]) -> list[Item]:
    """Return the items a line shows: the newest, the current ones, those in the window, a trend's last three."""
    chosen: list[Item] = [line.latest, *active, *in_window]
    if line.section == "observations" or matched:
        # a reading's meaning is in its change (and a question about a series often compares):
        # the previous item too, the last three for a trend
        chosen += line.items[1 : 3 if matched and focus.wants_trend else 2]
    if matched and focus.wants_first and len(line.items) > 1:
        chosen.append(line.items[-1])
    unique = list({id(item): item for item in chosen}.values())
    order = {id(item): number for number, item in enumerate(line.items)}
    unique.sort(key=lambda item: order[id(item)])
    # the newest comes first whatever else is shown: it is what the line's name describes
    return unique


def _variants(
    line: Line, featured: list[Item], in_window: list[Item], active: list[Item], renderer: Renderer
) -> list[tuple[str, list[ResourceRef]]]:
    """Return the line's renderings: with every featured item, then (if that is more) the newest alone."""
    trend = line.section == "observations"
    variants = []
    renderer.refs = []
    variants.append((render_line(line, featured, renderer, trend=trend), list(renderer.refs)))
    if len(featured) > 1:
        listed = {id(featured[0])}
        wanted = [item for item in {id(i): i for i in [*active, *in_window]}.values() if id(item) not in listed]
        note = f" ({len(wanted)} more matching not listed)" if wanted else ""
        renderer.refs = []
        variants.append((render_line(line, featured[:1], renderer, trend=trend, note=note), list(renderer.refs)))
    return variants


def _admit(candidates: list[_Candidate], head: list[str], token_budget: int | None) -> None:
    """Choose which lines (and which rendering of each) the context shows, within the budget.

    Three passes, so breadth comes before depth: the lines the question points at, each as full
    as fits; then every other line in its most compact form, in priority order (the flowsheet
    and the active lists first); then, with what is left, those lines made fuller in the same
    order (a previous reading, every active order).
    """
    budget = token_budget * CHARS_PER_TOKEN if token_budget is not None else None
    shown_per_section: dict[str, int] = {}
    # estimates (headings, count lines, the closing line); _render trims whatever they missed
    spent = sum(len(line) + 1 for line in head) + _CLOSING_LINE

    def fits(cost: int) -> bool:
        return budget is None or spent + cost <= budget

    def admit(candidate: _Candidate, numbers: Iterable[int]) -> None:
        nonlocal spent
        section = candidate.line.section
        opened = section in shown_per_section
        overhead = 0 if opened else len(spec_of(candidate.line).title) + _HEADING_EXTRA + _OMITTED_LINE
        for number in numbers:
            cost = len(candidate.variants[number][0]) + 3 + overhead
            if fits(cost):
                candidate.chosen = number
                spent += cost
                shown_per_section[section] = shown_per_section.get(section, 0) + 1
                return

    asked = [c for c in candidates if c.tier == 0]
    rest = [c for c in candidates if c.tier > 0]
    for candidate in asked:
        admit(candidate, range(len(candidate.variants)))
    for candidate in rest:
        section = candidate.line.section
        if candidate.tier == 2 and shown_per_section.get(section, 0) >= SECTION_LIMITS[section]:
            continue
        admit(candidate, [len(candidate.variants) - 1])
    for candidate in rest:
        if not candidate.chosen:
            continue  # not shown, or already at its fullest
        current = len(candidate.variants[candidate.chosen][0])
        for number in range(candidate.chosen):
            extra = len(candidate.variants[number][0]) - current
            if fits(extra):
                candidate.chosen = number
                spent += extra
                break


def _render(
    candidates: list[_Candidate], head: list[str], focus: QuestionFocus
) -> tuple[str, list[ResourceRef], dict[str, int]]:
    """Write the sections in a fixed order, relevant lines first within each; count what is left out."""
    reason = "less relevant to the question or older" if not focus.empty else "older"
    out = list(head)
    sources: list[ResourceRef] = []
    omitted: dict[str, int] = {}
    untouched: list[str] = []
    for spec in SECTIONS:
        mine = [c for c in candidates if c.line.section == spec.key]
        if not mine:
            continue
        shown = [c for c in mine if c.chosen is not None]
        items = sum(len(c.line.items) for c in mine)
        left_out = len(mine) - len(shown)
        if left_out:
            omitted[spec.key] = left_out
        if not shown:
            untouched.append(f"{spec.title.split(' (')[0].lower()} ({items})")
            continue
        out.append(f"## {spec.title} ({items})")
        for candidate in shown:
            assert candidate.chosen is not None
            text, refs = candidate.variants[candidate.chosen]
            out.append(f"- {text}")
            sources += refs
        if left_out:
            out.append(f"- … {left_out} more {spec.key.replace('_', ' ')} not shown ({reason})")
        out.append("")
    if untouched:
        out.append(f"Also in the record, not shown ({reason}): {', '.join(untouched)}.")
    return "\n".join(out).strip() + "\n", sources, omitted
