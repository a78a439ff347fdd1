"""What a question points at in a record: terms, codes, a time window, and whether it asks for a list.

Where it sits: the context builder (:mod:`agent.history.context`) reads the question (and the
plan's codes) once through :func:`question_focus`, then ranks every line of the record by it.
Nothing here knows a particular record: the terms are matched later against what the record
itself carries (code displays, codes, categories), so a question about any lab the record holds
finds it by the record's own words. The clinical synonym layer (:mod:`agent.history.relevance`)
only widens the terms (a lay "kidney function" also looks for creatinine); recall at the default
budget never depends on it, because every series of the record keeps at least one compact line.

Time words are read against the context's as-of date: "in 2015", "in March 2019", "last year",
"this year", "past 6 months", "since March", "since 2018", "at the last visit". They select by
date: readings and events inside the window are listed, not just counted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from agent.history.relevance import question_terms, singular

_MONTHS = {
    name: number
    for number, names in enumerate(
        (
            ("january", "jan"),
            ("february", "feb"),
            ("march", "mar"),
            ("april", "apr"),
            ("may",),
            ("june", "jun"),
            ("july", "jul"),
            ("august", "aug"),
            ("september", "sep", "sept"),
            ("october", "oct"),
            ("november", "nov"),
            ("december", "dec"),
        ),
        start=1,
    )
    for name in names
}
_MONTH = (
    r"(january|february|march|april|may|june|july|august|september|october|november|december"
    r"|jan|feb|mar|apr|jun|jul|aug|sept?|oct|nov|dec)"
)
_YEAR = r"(19[0-9]{2}|20[0-9]{2})"
_UNITS = {"day": 1, "week": 7, "month": 30.44, "year": 365.25}
_NUMBER_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "ten": 10, "twelve": 12, "a": 1}

_IN_MONTH_YEAR = re.compile(rf"\b(?:in|during|on)\s+{_MONTH}\s+(?:of\s+)?{_YEAR}\b", re.I)
_SINCE_MONTH_YEAR = re.compile(rf"\b(?:since|after|from)\s+{_MONTH}\s+(?:of\s+)?{_YEAR}\b", re.I)
_SINCE_YEAR = re.compile(rf"\b(?:since|after|from)\s+{_YEAR}\b", re.I)
_SINCE_MONTH = re.compile(rf"\b(?:since|after)\s+{_MONTH}\b(?!\s+(?:of\s+)?{_YEAR})", re.I)
_BEFORE_YEAR = re.compile(rf"\b(?:before|until|prior to)\s+{_YEAR}\b", re.I)
_YEAR_ANY = re.compile(rf"\b{_YEAR}\b")
_PAST = re.compile(
    r"\b(?:last|past|previous|recent)\s+(\d+|one|two|three|four|five|six|ten|twelve|a)?\s*(day|week|month|year)s?\b",
    re.I,
)
_THIS_YEAR = re.compile(r"\bthis\s+year\b", re.I)
_LAST_VISIT = re.compile(
    r"\b(?:at|during|from|in)\s+(?:the|her|his|their)\s+(?:last|latest|most recent|recent)\s+"
    r"(?:visit|appointment|encounter|admission|check-?up)\b",
    re.I,
)
_CURRENT = re.compile(r"\b(current|currently|active|ongoing|now|still|present|existing|taking)\b", re.I)
_TREND = re.compile(
    r"\b(trend\w*|over time|chang\w*|progress\w*|course|history|going (?:up|down)|improv\w*|wors\w*|"
    r"last (?:three|3|few|several) (?:values|readings|results|measurements)|readings|values|results)\b",
    re.I,
)
_FIRST = re.compile(r"\b(first|baseline|initial|earliest|when .* (found|diagnosed|started))\b", re.I)

#: Words that say how to read the record, not what to look for: kept out of the match terms.
INTENT_WORDS = frozenset(
    {
        "current",
        "currently",
        "active",
        "ongoing",
        "now",
        "still",
        "present",
        "existing",
        "trend",
        "trending",
        "change",
        "changed",
        "over",
        "time",
        "last",
        "past",
        "previous",
        "since",
        "year",
        "month",
        "week",
        "day",
        "ago",
        "value",
        "result",
        "level",
        "reading",
        "recent",
        "patient",
        "she",
        "he",
        "her",
        "his",
        "him",
        "they",
        "them",
        "get",
        "got",
        "had",
        "been",
        "during",
        "after",
        "before",
        "visit",
        *_MONTHS,
    }
)


@dataclass(frozen=True)
class TimeWindow:
    """A half-open span of time ``[start, end)`` a question asks about, and how it was said."""

    start: datetime
    end: datetime
    label: str

    def holds(self, when: datetime | None) -> bool:
        """Return whether a dated fact falls inside the window (undated ones never do)."""
        return when is not None and self.start <= when < self.end


@dataclass
class QuestionFocus:
    """What the question points at.

    Attributes:
        terms: words, phrases and codes a relevant line contains (question words, widened by the
            synonym layer, plus the plan's codes and terms).
        codes: the plan's codes, matched exactly against the codes a record line carries.
        window: the time span the question names, if any.
        wants_current: a list of what is current ("current medications", "ongoing conditions").
        wants_trend: several readings of a series ("trend", "how has it changed").
        wants_first: the earliest or baseline reading.
        last_visit: the question is about the latest encounter ("at the last visit"); the window
            is set to that encounter's day once the record is known.
    """

    terms: set[str] = field(default_factory=set)
    codes: set[str] = field(default_factory=set)
    window: TimeWindow | None = None
    wants_current: bool = False
    wants_trend: bool = False
    wants_first: bool = False
    last_visit: bool = False

    @property
    def empty(self) -> bool:
        """Return whether the question points at nothing in particular (e.g. no question at all)."""
        return not self.terms and not self.codes and self.window is None


def question_focus(question: str | None, as_of: datetime, plan_terms: Iterable[str] = ()) -> QuestionFocus:
    """Read a question (and the plan's codes or terms) into a :class:`QuestionFocus`.

    Args:
        question: the clinician's question; None for a summary of the whole record.
        as_of: the date relative time words are read against.
        plan_terms: the plan's ``codes``: codes (``4548-4``, ``http://loinc.org|4548-4``,
            ``LOINC|4548-4``) or clinical terms the planner chose.
    """
    codes: set[str] = set()
    words: list[str] = []
    for item in plan_terms:
        text = str(item).strip()
        if not text:
            continue
        code = text.rsplit("|", 1)[-1].strip().lower()
        if re.fullmatch(r"[0-9][0-9a-z\-.]*", code):
            codes.add(code)
        else:
            words.append(text.lower())
    text = question or ""
    terms = {
        term
        for term in question_terms(text, words)
        if term not in INTENT_WORDS and singular(term) not in INTENT_WORDS and not _YEAR_ANY.fullmatch(term)
    }
    return QuestionFocus(
        terms=terms,
        codes=codes,
        window=time_window(text, as_of),
        wants_current=bool(_CURRENT.search(text)),
        wants_trend=bool(_TREND.search(text)),
        wants_first=bool(_FIRST.search(text)),
        last_visit=bool(_LAST_VISIT.search(text)),
    )


def _month_start(year: int, month: int) -> datetime:
    return datetime(year, month, 1, tzinfo=UTC)


def _next_month(year: int, month: int) -> datetime:
    return _month_start(year + month // 12, month % 12 + 1)


def time_window(question: str, as_of: datetime) -> TimeWindow | None:
    """Return the time span a question names, read against ``as_of``; None when it names none.

    The first form that matches wins, most specific first: a month of a year, "since" a month or
    a year, "before" a year, a past span ("last 6 months", "last year" = the past 12 months),
    "this year", then a bare year ("in 2015"; several years give the span from the first to the
    last).
    """
    end_of_today = datetime(as_of.year, as_of.month, as_of.day, tzinfo=UTC) + timedelta(days=1)
    if match := _IN_MONTH_YEAR.search(question):
        month, year = _MONTHS[match.group(1).lower()], int(match.group(2))
        return TimeWindow(_month_start(year, month), _next_month(year, month), match.group(0).strip())
    if match := _SINCE_MONTH_YEAR.search(question):
        month, year = _MONTHS[match.group(1).lower()], int(match.group(2))
        return TimeWindow(_month_start(year, month), end_of_today, match.group(0).strip())
    if match := _SINCE_YEAR.search(question):
        return TimeWindow(_month_start(int(match.group(1)), 1), end_of_today, match.group(0).strip())
    if match := _SINCE_MONTH.search(question):
        month = _MONTHS[match.group(1).lower()]
        year = as_of.year if month <= as_of.month else as_of.year - 1
        return TimeWindow(_month_start(year, month), end_of_today, match.group(0).strip())
    if match := _BEFORE_YEAR.search(question):
        return TimeWindow(datetime(1, 1, 1, tzinfo=UTC), _month_start(int(match.group(1)), 1), match.group(0).strip())
    if match := _PAST.search(question):
        amount_text = (match.group(1) or "1").lower()
        amount = int(amount_text) if amount_text.isdigit() else _NUMBER_WORDS.get(amount_text, 1)
        days = amount * _UNITS[match.group(2).lower()]
        return TimeWindow(end_of_today - timedelta(days=days + 1), end_of_today, match.group(0).strip())
    if _THIS_YEAR.search(question):
        return TimeWindow(_month_start(as_of.year, 1), end_of_today, "this year")
    years = sorted({int(year) for year in _YEAR_ANY.findall(question)})
    if years:
        label = f"in {years[0]}" if len(years) == 1 else f"{years[0]}-{years[-1]}"
        return TimeWindow(_month_start(years[0], 1), _month_start(years[-1] + 1, 1), label)
    return None


def day_window(when: datetime, label: str) -> TimeWindow:
    """Return the window of one calendar day (the day of the last visit)."""
    start = datetime(when.year, when.month, when.day, tzinfo=UTC)
    return TimeWindow(start, start + timedelta(days=1), label)
