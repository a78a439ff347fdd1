"""References to the things a run reads: FHIR resources and DICOM instances.

A :class:`ResourceRef` renders as ``[Type/id]``, the citation form the model is asked to use and
the citation checker verifies.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class ResourceRef(BaseModel):
    """A FHIR resource a fact came from."""

    model_config = ConfigDict(frozen=True)

    resource_type: str
    id: str
    version: str | None = None

    @property
    def reference(self) -> str:
        """Return ``Type/id``, the FHIR relative reference."""
        return f"{self.resource_type}/{self.id}"

    @property
    def tag(self) -> str:
        """Return ``[Type/id]``, the form used in context lines and citations."""
        return f"[{self.reference}]"

    @classmethod
    def of(cls, resource: dict[str, object]) -> ResourceRef:
        """Build the reference of a raw FHIR resource (its meta.versionId when present)."""
        meta = resource.get("meta")
        version = meta.get("versionId") if isinstance(meta, dict) else None
        return cls(
            resource_type=str(resource["resourceType"]),
            id=str(resource["id"]),
            version=str(version) if version is not None else None,
        )


class InstanceRef(BaseModel):
    """One DICOM instance, by its three UIDs."""

    model_config = ConfigDict(frozen=True)

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    modality: str | None = None
    view_position: str | None = None
    instance_number: int | None = None
    series_description: str | None = None

    @classmethod
    def of_dataset(cls, ds: Any, *, missing_uid: str | None = None) -> InstanceRef:
        """Build the reference of a pydicom Dataset from its header (UIDs, modality, view, number, series).

        Args:
            ds: the dataset (header only is enough).
            missing_uid: stands in for an absent UID; ``None`` makes an absent UID an error.

        Raises:
            KeyError: a UID is absent and ``missing_uid`` is None.
        """

        def text(keyword: str) -> str | None:
            value = ds.get(keyword)
            return str(value).strip() or None if value not in (None, "") else None

        def uid(keyword: str) -> str:
            value = text(keyword)
            if value is None:
                if missing_uid is None:
                    raise KeyError(f"the dataset has no {keyword}")
                return missing_uid
            return value

        number = text("InstanceNumber")
        return cls(
            study_uid=uid("StudyInstanceUID"),
            series_uid=uid("SeriesInstanceUID"),
            sop_instance_uid=uid("SOPInstanceUID"),
            modality=text("Modality"),
            view_position=text("ViewPosition"),
            instance_number=int(number) if number is not None and number.lstrip("-").isdigit() else None,
            series_description=text("SeriesDescription"),
        )


class StudyRef(BaseModel):
    """One DICOM study as a QIDO-RS study search (or a folder scan) describes it."""

    model_config = ConfigDict(frozen=True)

    study_uid: str
    patient_id: str | None = None
    modalities: tuple[str, ...] = ()
    study_date: str | None = None
    description: str | None = None
    number_of_instances: int | None = None
