"""The two source interfaces the graph depends on.

Each has a real HTTP implementation (any FHIR R4 server; any DICOMweb server) and a local-folder
implementation (the embedded default). Every call reports to the run's
:class:`~agent.domain.events.AccessObserver`, including calls that fail.
"""

from __future__ import annotations

from typing import Any, Protocol

from pydicom.dataset import Dataset

from agent.domain.refs import InstanceRef, StudyRef


class FhirSource(Protocol):
    """Read and search FHIR R4 resources (raw JSON dicts)."""

    async def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        """Return one resource.

        Raises:
            PatientNotFoundError: for a missing Patient (other types: SourceUnavailableError with 404).
            SourceUnavailableError: server unreachable, timed out or answered an error.
            InvalidResourceError: the body is not a FHIR resource of that type.
        """
        ...

    async def search(self, resource_type: str, params: dict[str, str]) -> list[dict[str, Any]]:
        """Return every matching resource, following `next` links (bounded by settings)."""
        ...

    async def get(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        """Return the body of one GET on a path relative to the base (``metadata``, an operation, ``Binary/<id>``).

        Raises:
            ValueError: the path is not a plain relative FHIR path.
            SourceUnavailableError: unreachable, timed out, 404 or another error answer.
            InvalidResourceError: the body is not a FHIR resource.
        """
        ...

    async def get_all_pages(self, path: str, params: dict[str, str]) -> list[dict[str, Any]]:
        """Return every Bundle page of an operation such as ``Patient/<id>/$everything``, following ``next`` links.

        Raises:
            SourceUnavailableError: unreachable, timed out, 404 or another error answer on any page.
            InvalidResourceError: a page is not a Bundle.
        """
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


class DicomSource(Protocol):
    """Find studies, and find and fetch the DICOM instances of a study."""

    async def search_studies(
        self,
        *,
        patient_id: str | None = None,
        study_uid: str | None = None,
        modality: str | None = None,
        limit: int | None = None,
    ) -> list[StudyRef]:
        """Return the studies matching every given filter (all studies when none is given).

        Raises:
            SourceUnavailableError: server unreachable or error.
        """
        ...

    async def list_instances(self, study_uid: str) -> list[InstanceRef]:
        """Return the instances of a study (with modality and view position when known).

        Raises:
            StudyNotFoundError: the study is not found (a kind of SourceUnavailableError).
            SourceUnavailableError: server unreachable or error.
        """
        ...

    async def find_study_uid(self, *, series_uid: str | None = None, sop_instance_uid: str | None = None) -> str | None:
        """Return the StudyInstanceUID of the study holding a series or an instance (exactly one given).

        For ImagingStudy resources that name no study UID but list their series or instances.

        Returns:
            The study's UID, or None when the source holds no such series or instance.

        Raises:
            ValueError: not exactly one of the two is given.
            SourceUnavailableError: server unreachable or error.
            InvalidResourceError: a malformed UID.
        """
        ...

    async def retrieve(self, ref: InstanceRef) -> Dataset:
        """Return one instance with its pixel data (not yet decoded)."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...
