"""Reading a question: time windows against the as-of date, intents, terms and the plan's codes."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from agent.history.focus import question_focus, time_window

AS_OF = datetime(2020, 6, 15, 10, 0, tzinfo=UTC)


def _day(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.mark.parametrize(
    ("question", "start", "end"),
    [
        ("Which vaccines did she get in 2019?", "2019-01-01", "2020-01-01"),
        ("What happened in March 2018?", "2018-03-01", "2018-04-01"),
        ("Any procedures since March?", "2020-03-01", "2020-06-16"),
        ("Any procedures since October?", "2019-10-01", "2020-06-16"),
        ("Labs since 2017?", "2017-01-01", "2020-06-16"),
        ("Admissions since June 2019", "2019-06-01", "2020-06-16"),
        ("Conditions before 2010", "0001-01-01", "2010-01-01"),
        ("What did she have this year?", "2020-01-01", "2020-06-16"),
        ("Between 2012 and 2014, what was done? 2014", "2012-01-01", "2015-01-01"),
    ],
)
def test_time_windows(question: str, start: str, end: str) -> None:
    window = time_window(question, AS_OF)
    assert window is not None
    assert (window.start, window.end) == (_day(start), _day(end))


def test_past_spans_count_back_from_the_as_of_day() -> None:
    last_year = time_window("How was her blood pressure over the last year?", AS_OF)
    assert last_year is not None and last_year.end == _day("2020-06-16")
    assert 366 <= (last_year.end - last_year.start).days <= 367
    six_months = time_window("Any labs in the past 6 months?", AS_OF)
    assert six_months is not None and 183 <= (six_months.end - six_months.start).days <= 185
    assert six_months.holds(_day("2020-01-01")) and not six_months.holds(_day("2019-11-01"))


def test_no_time_words_no_window() -> None:
    assert time_window("What is the latest creatinine?", AS_OF) is None


def test_intents_and_terms() -> None:
    focus = question_focus("What are her current medications?", AS_OF)
    assert focus.wants_current and not focus.wants_trend
    assert "medication" in focus.terms and "current" not in focus.terms
    trend = question_focus("How has his creatinine changed over time?", AS_OF)
    assert trend.wants_trend and "creatinine" in trend.terms and "time" not in trend.terms
    assert question_focus("What was the baseline HbA1c?", AS_OF).wants_first
    assert question_focus("What was done at the last visit?", AS_OF).last_visit


def test_plan_codes_and_terms_join_the_focus() -> None:
    focus = question_focus("How is she doing?", AS_OF, ["http://loinc.org|4548-4", "LOINC|2160-0", "38341003", "renal"])
    assert focus.codes == {"4548-4", "2160-0", "38341003"}
    assert "renal" in focus.terms


def test_plural_words_match_singular_record_words() -> None:
    focus = question_focus("List her allergies and surgeries", AS_OF)
    assert {"allergy", "surgery"} <= focus.terms
