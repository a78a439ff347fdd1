"""The imaging half of the fetch step: choose the study (and its prior), retrieve and prepare its images.

Where it sits: the graph's ``fetch`` node runs this beside the record fetch. An instance that
cannot be decoded is recorded and skipped; if none of a study's chosen instances can be, the run
fails with the decoder's error (which names the transfer syntax).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from agent.audit.recorder import NOTE
from agent.domain.imaging import PreparedImage
from agent.domain.refs import InstanceRef
from agent.errors import DicomDecodeError, SourceUnavailableError
from agent.graph.state import RunContext
from agent.history.fhir_values import parse_when
from agent.sources.imaging_selection import choose_instances
from agent.sources.pixels import prepare_instance
from agent.sources.study_location import open_dicom_source_for_study
from agent.sources.volumes import prepare_volume

#: Modalities whose chosen instances are slices of one volume, prepared together.
VOLUME_MODALITIES = frozenset({"CT", "MR"})


def study_instance_uid(imaging_study: dict[str, Any]) -> str:
    """Return the DICOM StudyInstanceUID of an ImagingStudy (identifier system urn:dicom:uid).

    Raises:
        SourceUnavailableError: the ImagingStudy carries no DICOM study UID.
    """
    for identifier in imaging_study.get("identifier") or []:
        if identifier.get("system") == "urn:dicom:uid" and identifier.get("value"):
            return str(identifier["value"]).removeprefix("urn:oid:")
    raise SourceUnavailableError(
        f"ImagingStudy/{imaging_study.get('id')} has no DICOM study UID (identifier system urn:dicom:uid)"
    )


def by_date(studies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return the studies newest first (undated ones last)."""
    epoch = datetime.min.replace(tzinfo=UTC)
    return sorted(studies, key=lambda study: parse_when(study.get("started")) or epoch, reverse=True)


def choose_studies(
    studies: list[dict[str, Any]], wanted_ids: list[str], prior: bool
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Return the current study (the one the plan names, else the newest) and, when asked, the one before it."""
    ordered = by_date(studies)
    if not ordered:
        return None, None
    named = [study for study in ordered if study.get("id") in wanted_ids]
    current = named[0] if named else ordered[0]
    if not prior:
        return current, None
    earlier = ordered[ordered.index(current) + 1 :]
    candidates = named[1:] or earlier
    return current, candidates[0] if candidates else None


async def fetch_study_images(
    ctx: RunContext, study: dict[str, Any], role: str
) -> tuple[list[PreparedImage], list[dict[str, Any]]]:
    """Retrieve and prepare the chosen instances of one study; return the images and the skipped ones."""
    uid = study_instance_uid(study)
    # The study's own DICOMweb Endpoint (on an allowed origin) wins over the configured source.
    async with open_dicom_source_for_study(study, ctx.dicom, ctx.settings.dicom, ctx.recorder, fhir=ctx.fhir) as dicom:
        if dicom is not ctx.dicom:
            ctx.recorder.event(NOTE, "imaging_source", meta={"endpoint": getattr(dicom, "base_url", None)})
        refs = await dicom.list_instances(uid)
        modality = refs[0].modality if refs else None
        chosen = choose_instances(refs, modality, ctx.settings.dicom.max_instances)
        # The chosen instances are fetched at once (network-bound), then prepared (CPU-bound).
        datasets = await asyncio.gather(*(dicom.retrieve(ref) for ref in chosen))
    items = list(zip(datasets, chosen, strict=True))
    if (modality or "").upper() in VOLUME_MODALITIES and len(chosen) > 1:
        images, errors = await asyncio.to_thread(_prepare_volume, ctx, items, modality)
    else:
        images, errors = await asyncio.to_thread(_prepare_each, items)
    for error in errors:
        ctx.recorder.event(NOTE, "instance_skipped", status="failed", meta={**error, "study": role})
    if chosen and not images and errors:
        # None could be decoded: the run fails with the first decoder error (it names the transfer syntax).
        raise DicomDecodeError(errors[0]["message"], details=errors[0]["details"])
    for image in images:
        ctx.recorder.event(
            NOTE,
            "pixel_preparation",
            meta={
                "sop_instance_uid": image.ref.sop_instance_uid,
                "study": role,
                "steps": image.steps,
                "defaults": image.defaults,
            },
        )
    return images, errors


def _prepare_each(items: list[tuple[Any, InstanceRef]]) -> tuple[list[PreparedImage], list[dict[str, Any]]]:
    """Prepare instances one by one; an undecodable one is reported and skipped, the others go on."""
    images: list[PreparedImage] = []
    errors: list[dict[str, Any]] = []
    for dataset, ref in items:
        try:
            images.append(prepare_instance(dataset, ref))
        except DicomDecodeError as exc:
            errors.append({"sop_instance_uid": ref.sop_instance_uid, **exc.to_dict()})
    return images, errors


def _prepare_volume(
    ctx: RunContext, items: list[tuple[Any, InstanceRef]], modality: str | None
) -> tuple[list[PreparedImage], list[dict[str, Any]]]:
    """Prepare CT/MR slices as one volume: ordered by position, HU windows (CT) or volume min-max (MR)."""
    volume = prepare_volume(items, modality=modality, max_slices=ctx.settings.dicom.max_instances)
    ctx.recorder.event(
        NOTE,
        "volume_preparation",
        meta={"modality": modality, "slices": len(volume.images), "steps": volume.steps, "defaults": volume.defaults},
    )
    return volume.images, volume.skipped
