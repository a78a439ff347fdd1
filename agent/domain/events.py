"""Data-access events the sources emit, and the observer that receives them.

Sources never write to the database themselves: they tell an :class:`AccessObserver` (the run's
trace recorder) what they did, so the same source works in a run, a test or a tool.
"""

from __future__ import annotations

from typing import Protocol

from pydantic import BaseModel, Field


class FhirRequestEvent(BaseModel):
    """One FHIR interaction: an HTTP request, or a read from a bundle folder."""

    backend: str = Field(description="'http' or 'bundle-dir'")
    method: str
    path: str = Field(description="Path and query relative to the base, e.g. 'Condition?patient=p1'")
    status: int | None = Field(None, description="HTTP status; None when no response came back")
    resource_ids: list[str] = Field(default_factory=list, description="'Type/id' of each resource returned")
    duration_ms: float = 0.0
    error: str | None = None


class DicomRetrievalEvent(BaseModel):
    """One DICOM retrieval or search: a QIDO/WADO request, or a file read."""

    backend: str = Field(description="'dicomweb' or 'dicom-dir'")
    action: str = Field(
        description="'search' (QIDO-RS / folder scan), 'retrieve' (WADO-RS / file read), 'metadata' or 'frames'"
    )
    server: str | None = Field(None, description="DICOMweb origin contacted (scheme://host:port), never credentials")
    study_uid: str | None = None
    series_uid: str | None = None
    sop_instance_uid: str | None = None
    transfer_syntax: str | None = None
    bytes: int | None = None
    status: int | None = None
    duration_ms: float = 0.0
    error: str | None = None


class AccessObserver(Protocol):
    """Receives every data access a source makes."""

    def fhir_request(self, event: FhirRequestEvent) -> None:
        """Record one FHIR interaction."""

    def dicom_retrieval(self, event: DicomRetrievalEvent) -> None:
        """Record one DICOM search or retrieval."""


class NullObserver:
    """An observer that keeps nothing: for tools and tests that do not trace."""

    def fhir_request(self, event: FhirRequestEvent) -> None:
        """Drop the event."""

    def dicom_retrieval(self, event: DicomRetrievalEvent) -> None:
        """Drop the event."""


class ListObserver:
    """An observer that keeps events in memory: for tests."""

    def __init__(self) -> None:
        self.fhir: list[FhirRequestEvent] = []
        self.dicom: list[DicomRetrievalEvent] = []

    def fhir_request(self, event: FhirRequestEvent) -> None:
        """Keep the event."""
        self.fhir.append(event)

    def dicom_retrieval(self, event: DicomRetrievalEvent) -> None:
        """Keep the event."""
        self.dicom.append(event)
