"""Citation checking: real citations kept, made-up ones removed from the answer and reported."""

from __future__ import annotations

from agent.graph.citations import check_citations

SOURCES = ["Patient/p1", "Condition/c1", "Observation/o1"]


def test_valid_citations_are_kept() -> None:
    result = check_citations("Heart failure is active [Condition/c1].", SOURCES)
    assert result.answer == "Heart failure is active [Condition/c1]."
    assert [(c.reference, c.valid) for c in result.citations] == [("Condition/c1", True)]
    assert result.dangling == []


def test_made_up_citations_are_removed_and_reported() -> None:
    text = "BNP rose [Observation/o1, Observation/fake]. Lives alone [Patient/p2]. Stable [Condition/c1/_history/3]."
    result = check_citations(text, SOURCES)
    assert result.answer == "BNP rose [Observation/o1]. Lives alone. Stable [Condition/c1]."
    assert result.dangling == ["Observation/fake", "Patient/p2"]
    assert {c.reference: c.valid for c in result.citations} == {
        "Observation/o1": True,
        "Observation/fake": False,
        "Patient/p2": False,
        "Condition/c1": True,
    }
    assert result.uncited_sentences == 1


def test_brackets_that_are_not_citations_are_left_alone() -> None:
    result = check_citations("See [the note above] and [1].", SOURCES)
    assert result.answer == "See [the note above] and [1]."
    assert result.citations == []
