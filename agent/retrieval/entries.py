"""What the similar-case index stores per image, and what a search returns per study.

Pure pydantic types shared by both index backends, the ingest step and the CLI. An entry holds
identifiers only (UIDs, FHIR references, a source label): never a patient's name or birth date,
since index files are copied around more freely than the record they point into.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from agent.inference.protocols import ModelIdentity

IndexBackendName = Literal["file", "pgvector"]


def _now() -> datetime:
    return datetime.now(UTC)


class IndexEntry(BaseModel):
    """One indexed image: the identifiers needed to open it again, and where it came from."""

    model_config = ConfigDict(frozen=True)

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    modality: str | None = None
    patient_ref: str | None = Field(None, description="FHIR 'Patient/id' when known")
    imaging_study_ref: str | None = Field(None, description="FHIR 'ImagingStudy/id' when known")
    source: str = Field("unknown", description="'dicomweb', 'dicom-dir' or another short label")
    dicomweb_url: str | None = Field(None, description="DICOMweb root the image came from (no credentials)")
    label: str | None = Field(None, description="Optional caption or class text; never patient names")
    added_at: datetime = Field(default_factory=_now)

    def wado_rs_url(self) -> str | None:
        """Return the WADO-RS URL of this instance when it came from DICOMweb."""
        if not self.dicomweb_url:
            return None
        root = self.dicomweb_url.rstrip("/")
        return f"{root}/studies/{self.study_uid}/series/{self.series_uid}/instances/{self.sop_instance_uid}"


#: The entry fields in storage order: the columns of both backends' entry tables.
ENTRY_COLUMNS: tuple[str, ...] = tuple(IndexEntry.model_fields)


class StudyHit(BaseModel):
    """One similar study: its best image's cosine score and everything needed to open it."""

    study_uid: str
    score: float = Field(description="Cosine similarity of the study's best-matching image")
    series_uid: str
    sop_instance_uid: str
    modality: str | None = None
    patient_ref: str | None = None
    imaging_study_ref: str | None = None
    source: str = "unknown"
    study_url: str | None = Field(None, description="WADO-RS URL of the study when it came from DICOMweb")
    instance_url: str | None = Field(None, description="WADO-RS URL of the best-matching instance")
    label: str | None = None
    images_matched: int = Field(1, description="How many of the study's images were among the candidates")

    @classmethod
    def from_entry(cls, entry: IndexEntry, score: float, images_matched: int = 1) -> StudyHit:
        """Build a hit from the best-matching entry of a study."""
        root = entry.dicomweb_url.rstrip("/") if entry.dicomweb_url else None
        return cls(
            study_uid=entry.study_uid,
            score=score,
            series_uid=entry.series_uid,
            sop_instance_uid=entry.sop_instance_uid,
            modality=entry.modality,
            patient_ref=entry.patient_ref,
            imaging_study_ref=entry.imaging_study_ref,
            source=entry.source,
            study_url=f"{root}/studies/{entry.study_uid}" if root else None,
            instance_url=entry.wado_rs_url(),
            label=entry.label,
            images_matched=images_matched,
        )


class IndexInfo(BaseModel):
    """What an index holds and which model made its vectors."""

    backend: IndexBackendName
    location: str = Field(description="Folder path, or table name (never a password)")
    model_id: str | None = Field(None, description="None while the index is empty and unclaimed")
    revision: str | None = None
    test_model: bool = False
    dim: int | None = None
    count: int = Field(0, description="Live (not deleted) images")
    studies: int = 0
    deleted: int = Field(0, description="Tombstoned images still taking space until rebuild")
    details: dict[str, int | float | str | None] = Field(default_factory=dict)


class IndexedModel(BaseModel):
    """The model identity an index records: enough to refuse vectors from another model."""

    model_id: str
    revision: str | None = None
    test_model: bool = False
    dim: int

    @classmethod
    def of(cls, identity: ModelIdentity, dim: int) -> IndexedModel:
        """Record a loaded model's identity with its embedding size."""
        return cls(model_id=identity.model_id, revision=identity.revision, test_model=identity.test_model, dim=dim)

    def same_model(self, other: IndexedModel) -> bool:
        """Return whether vectors of ``other`` can share an index with these.

        Revisions (weight fingerprints) decide when both are known, since one checkpoint can be
        configured under several names or paths; otherwise the configured id must match.
        """
        if self.dim != other.dim:
            return False
        if self.revision and other.revision:
            return self.revision == other.revision
        return self.model_id == other.model_id

    def describe(self) -> str:
        """Return a short human description: id, revision and dim."""
        revision = f" revision {self.revision[:12]}" if self.revision else ""
        return f"{self.model_id!r}{revision} ({self.dim}-d)"


def studies_from_hits(
    hits: Iterable[tuple[IndexEntry, float]], k: int, exclude_study_uid: str | None = None
) -> list[StudyHit]:
    """Aggregate image hits into the top ``k`` studies, each scored by its best image.

    Args:
        hits: (entry, cosine) pairs in any order.
        k: how many studies to return.
        exclude_study_uid: a study to leave out (the query's own study).

    Returns:
        Studies by descending score; ties broken by study UID so results are stable.
    """
    best: dict[str, tuple[IndexEntry, float]] = {}
    matched: dict[str, int] = {}
    for entry, score in hits:
        if entry.study_uid == exclude_study_uid:
            continue
        matched[entry.study_uid] = matched.get(entry.study_uid, 0) + 1
        current = best.get(entry.study_uid)
        if current is None or score > current[1]:
            best[entry.study_uid] = (entry, score)
    ranked = sorted(best.values(), key=lambda pair: (-pair[1], pair[0].study_uid))[:k]
    return [StudyHit.from_entry(entry, score, matched[entry.study_uid]) for entry, score in ranked]


def distinct_studies(entries: Sequence[IndexEntry], exclude_study_uid: str | None) -> int:
    """Return how many distinct studies (other than the excluded one) the entries cover."""
    return len({e.study_uid for e in entries if e.study_uid != exclude_study_uid})
