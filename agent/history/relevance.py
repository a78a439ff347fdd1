"""Which facts matter to the question: terms of the question, widened by clinical synonyms.

A deliberately small, transparent matcher: the question's words (lower-cased, plural 's'
dropped) plus synonym groups (a question about heart failure also wants BNP, furosemide and
ejection fraction; a lay "sugar control" wants HbA1c and glucose). The groups only widen what a
question looks for, mostly for lay words: the context builder keeps a line for every series of
the record whatever the question says, so recall at the default budget does not rest on them.
The plan's terms come in through ``extra_terms``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

#: Groups of terms that mean the same clinical concern; any one in the question pulls in all.
SYNONYM_GROUPS: tuple[frozenset[str], ...] = tuple(
    frozenset(group)
    for group in (
        {
            "heart failure",
            "hf",
            "chf",
            "cardiac failure",
            "bnp",
            "nt-probnp",
            "natriuretic",
            "furosemide",
            "ejection fraction",
            "edema",
            "oedema",
            "weight",
            "cardiomegaly",
            "effusion",
        },
        {"kidney", "renal", "ckd", "creatinine", "egfr", "gfr", "glomerular", "urea", "bun", "potassium"},
        {"diabetes", "diabetic", "glucose", "hba1c", "a1c", "hemoglobin a1c", "metformin", "insulin", "sugar"},
        {"cholesterol", "lipid", "ldl", "hdl", "triglyceride", "statin", "low density", "high density"},
        {"blood pressure", "bp", "hypertension", "systolic", "diastolic", "lisinopril", "amlodipine"},
        {
            "lung",
            "pulmonary",
            "copd",
            "breathing",
            "dyspnea",
            "spo2",
            "oxygen",
            "saturation",
            "inhaler",
            "tiotropium",
            "x-ray",
            "xray",
            "chest",
            "pneumonia",
            "opacity",
        },
        {"anemia", "anaemia", "hemoglobin", "haemoglobin", "hgb", "iron"},
        {
            "heart rate",
            "pulse",
            "atrial fibrillation",
            "af",
            "afib",
            "arrhythmia",
            "apixaban",
            "anticoagulant",
            "warfarin",
            "metoprolol",
        },
        {"nodule", "lung nodule", "ct", "mass", "lesion"},
        {"allergy", "allergies", "allergic", "reaction"},
        {"medication", "medications", "drug", "drugs", "prescription", "dose"},
    )
)

_STOP = frozenset(
    {
        "a",
        "an",
        "and",
        "any",
        "are",
        "as",
        "at",
        "be",
        "been",
        "by",
        "did",
        "do",
        "does",
        "for",
        "from",
        "has",
        "have",
        "how",
        "i",
        "in",
        "is",
        "it",
        "its",
        "latest",
        "me",
        "most",
        "of",
        "on",
        "or",
        "our",
        "recent",
        "show",
        "tell",
        "than",
        "that",
        "the",
        "their",
        "there",
        "these",
        "this",
        "to",
        "was",
        "were",
        "what",
        "when",
        "which",
        "who",
        "why",
        "with",
    }
)
_WORD = re.compile(r"[a-z0-9][a-z0-9\-]*")


def singular(word: str) -> str:
    """Return a plural English word in the singular (roughly: enough to match a record's words)."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"  # allergies -> allergy, surgeries -> surgery
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def _words(text: str) -> list[str]:
    """Return the words of a text, each as written and (if different) in the singular."""
    words: list[str] = []
    for word in _WORD.findall(text.lower()):
        words.append(word)
        singular_form = singular(word)
        if singular_form != word:
            words.append(singular_form)
    return words


def question_terms(question: str | None, extra_terms: Iterable[str] = ()) -> set[str]:
    """Return the terms a relevant fact may contain: the question's words plus their synonym groups."""
    if not question and not extra_terms:
        return set()
    text = (question or "").lower()
    terms = {word for word in _words(text) if word not in _STOP and len(word) > 1}
    terms |= {term.lower() for term in extra_terms}
    for group in SYNONYM_GROUPS:
        if any(mentions(text, term) for term in group) or terms & group:
            terms |= group
    return terms


def mentions(text: str, term: str) -> bool:
    """Return whether ``text`` (lower-cased) contains ``term`` as a whole word or phrase."""
    # The substring test rejects almost every (row, term) pair at C speed; only the rest pay for
    # the whole-word regex. Relevance runs for every row of a long history, once per term.
    return term in text and _whole_word(term).search(text) is not None


@functools.lru_cache(maxsize=4096)
def _whole_word(term: str) -> re.Pattern[str]:
    return re.compile(rf"(?<![a-z0-9]){re.escape(term)}(?![a-z0-9])")


def relevance(text: str, terms: set[str]) -> int:
    """Return how many of ``terms`` the text contains (whole words or phrases)."""
    if not terms:
        return 0
    lowered = text.lower()
    return sum(1 for term in terms if mentions(lowered, term))
