"""Check the model's citations against what the run actually fetched.

The model is asked to cite facts as ``[Type/id]``. Every bracket group is parsed (one or several
references, separated by commas or semicolons); a reference is valid only if it names a resource
that was in the context. Invalid ones are removed from the shown answer and reported as dangling,
so a citation the user sees always points at something real.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from pydantic import BaseModel

from agent.domain.answer import Citation

_GROUP = re.compile(r"\[([^\[\]\n]{1,400})\]")
_REFERENCE = re.compile(r"^([A-Z][A-Za-z]{1,63})/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?$")
_SENTENCE = re.compile(r"[^.!?\n]+[.!?]?")


class CitationCheck(BaseModel):
    """The shown answer and the verdict on every citation."""

    answer: str
    citations: list[Citation]
    dangling: list[str]
    uncited_sentences: int


def check_citations(text: str, sources: Iterable[str]) -> CitationCheck:
    """Keep citations that name fetched resources, drop the rest from the text.

    Args:
        text: the model's answer.
        sources: ``Type/id`` of every resource in the context.
    """
    allowed = set(sources)
    seen: dict[str, Citation] = {}

    def replace(match: re.Match[str]) -> str:
        parts = [part.strip() for part in re.split(r"[,;]", match.group(1))]
        refs = [_REFERENCE.match(part) for part in parts]
        if not parts or not all(refs):
            return match.group(0)  # not a citation group (e.g. "[see above]"): leave as written
        kept = []
        for ref in refs:
            assert ref is not None
            reference = f"{ref.group(1)}/{ref.group(2)}"
            valid = reference in allowed
            seen.setdefault(reference, Citation(reference=reference, valid=valid))
            if valid:
                kept.append(reference)
        return f"[{', '.join(kept)}]" if kept else ""

    shown = _GROUP.sub(replace, text)
    shown = re.sub(r"[ \t]+([.,;:])", r"\1", shown)
    shown = re.sub(r"[ \t]{2,}", " ", shown).strip()
    uncited = sum(1 for sentence in _SENTENCE.findall(shown) if sentence.strip() and not _GROUP.search(sentence))
    citations = list(seen.values())
    return CitationCheck(
        answer=shown,
        citations=citations,
        dangling=[c.reference for c in citations if not c.valid],
        uncited_sentences=uncited,
    )
