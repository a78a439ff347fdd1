"""A similar prior case from the similar-case index, as the reasoner sees and cites it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class SimilarCase(BaseModel):
    """One study of another patient whose images resemble this study's, and how to cite and open it.

    ``citation`` is ``ImagingStudy/id`` when the index knows the study's FHIR resource, else
    ``DicomStudy/<StudyInstanceUID>``; either form passes the citation checker once the run has
    put the case before the model.
    """

    citation: str
    study_uid: str
    score: float = Field(description="Cosine similarity of the best-matching image pair")
    modality: str | None = None
    imaging_study_ref: str | None = None
    study_url: str | None = None
    label: str | None = Field(None, description="The index entry's caption or class (untrusted text)")

    @classmethod
    def from_hit(cls, hit: Any) -> SimilarCase:
        """Build a case from a :class:`agent.retrieval.entries.StudyHit`."""
        citation = hit.imaging_study_ref or f"DicomStudy/{hit.study_uid}"
        return cls(
            citation=citation,
            study_uid=hit.study_uid,
            score=float(hit.score),
            modality=hit.modality,
            imaging_study_ref=hit.imaging_study_ref,
            study_url=hit.study_url,
            label=hit.label,
        )
