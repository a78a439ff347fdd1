"""The imaging half of the fetch step: choose the study (and its prior), retrieve and prepare its images.

Where it sits: the graph's ``fetch`` node runs this beside the record fetch. Imaging degrades, it
never ends the run (DESIGN.md, "Degrade, don't die"): a study that cannot be located, an imaging
source that is down or empty, a study none of whose images can be read, each becomes a warning
(:meth:`~agent.graph.state.RunContext.warn`) naming the study by reference, and the run answers
without those images. An instance that cannot be retrieved or decoded is skipped with a warning;
when that drops the main (frontal) view of a projection study, a warning says which view the
answer rests on. Only failures of the run itself (the trace, a cancellation) and programming
errors go on up.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any, Final, NamedTuple

from pydicom.dataset import Dataset

from agent.audit.recorder import NOTE
from agent.domain.imaging import PreparedImage
from agent.domain.refs import InstanceRef
from agent.errors import AuditError, DicomDecodeError, MedagentError, RunCancelledError, StudyNotFoundError
from agent.graph.state import RunContext
from agent.history.fhir_values import parse_when
from agent.sources.imaging_selection import choose_instances, view_from_description
from agent.sources.pixels import prepare_instance
from agent.sources.protocols import DicomSource
from agent.sources.study_identity import StudyIdentity, study_identity, study_instance_uid
from agent.sources.study_location import locate_study_uid, open_dicom_source_for_study
from agent.sources.volumes import prepare_volume

__all__ = [
    "VOLUME_MODALITIES",
    "by_date",
    "choose_studies",
    "fetch_study_images",
    "study_instance_uid",  # re-exported: the graph and the index ingest name studies the same way
]

#: Modalities whose chosen instances are slices of one volume, prepared together.
VOLUME_MODALITIES = frozenset({"CT", "MR"})
#: Views that make a projection study's main image; the selection puts them first.
FRONTAL_VIEWS: Final = frozenset({"PA", "AP", "FRONTAL"})
#: Failures that end the run even here: the trace cannot be written, or the run was cancelled.
RUN_FAILURES: Final = (AuditError, RunCancelledError)


class _StudySkipped(Exception):
    """A study the run goes on without; raised and caught inside this module only."""

    def __init__(self, reason: str, problem: str) -> None:
        super().__init__(problem)
        self.reason = reason
        self.problem = problem


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
    """Retrieve and prepare the chosen instances of one study; return the images and the skipped ones.

    A study that cannot be used is a warning, not an error: the images are then ``[]``.

    Args:
        ctx: the run.
        study: the FHIR ImagingStudy (raw JSON).
        role: ``current`` or ``prior``, for the trace and the warnings.

    Raises:
        AuditError: the trace cannot be written.
        RunCancelledError: the run was cancelled.
    """
    identity = study_identity(study)
    reference = identity.reference
    try:
        images, errors, chosen = await _fetch_and_prepare(ctx, study, identity, role)
    except _StudySkipped as skipped:
        _warn_study(ctx, reference, role, skipped.reason, skipped.problem)
        return [], []
    except RUN_FAILURES:
        raise
    except DicomDecodeError as exc:
        message = exc.metadata_dict()["message"]
        _warn_study(ctx, reference, role, "study_undecodable", f"no image could be decoded ({exc.code}): {message}")
        return [], []
    except MedagentError as exc:
        # Down, timed out, refused or answering nonsense: the source, not the run, failed.
        message = exc.metadata_dict()["message"]
        _warn_study(ctx, reference, role, "imaging_unavailable", f"imaging source unavailable ({exc.code}): {message}")
        return [], []
    if chosen and not images:
        first = errors[0] if errors else {}
        codes = {error.get("code") for error in errors}
        what = "decoded" if codes == {DicomDecodeError.code} else "read"
        _warn_study(
            ctx,
            reference,
            role,
            "study_undecodable",
            f"no image could be {what} ({first.get('code')}): {first.get('message')}",
            skipped=len(errors),
        )
        return [], errors
    dropped = main_view_dropped(chosen, images)
    if dropped is not None:
        lost, kept = dropped
        _warn_study(
            ctx,
            reference,
            role,
            "main_view_dropped",
            f"main view dropped: the {lost.view} image (instance {lost.sop_instance_uid}) could not be read; "
            f"the answer rests on the {', '.join(kept)} view{'s' if len(kept) > 1 else ''} only",
            dropped_instance=lost.sop_instance_uid,
            kept_views=kept,
        )
    return images, errors


async def _fetch_and_prepare(
    ctx: RunContext, study: dict[str, Any], identity: StudyIdentity, role: str
) -> tuple[list[PreparedImage], list[dict[str, Any]], list[InstanceRef]]:
    """Locate the study, choose and retrieve its instances, prepare them; return images, skipped, chosen.

    Raises:
        _StudySkipped: nothing names the study, the source holds none of it, or it has no instances.
        MedagentError: the source failed, or preparation failed as a whole.
    """
    # The study's own DICOMweb Endpoint (on an allowed origin) wins over the configured source.
    async with open_dicom_source_for_study(study, ctx.dicom, ctx.settings.dicom, ctx.recorder, fhir=ctx.fhir) as dicom:
        if dicom is not ctx.dicom:
            ctx.recorder.event(NOTE, "imaging_source", meta={"endpoint": getattr(dicom, "base_url", None)})
        if not identity.locatable:
            raise _StudySkipped(
                "study_not_located",
                "cannot be located: no DICOM study UID in its identifiers and no series or instance UIDs",
            )
        located = await locate_study_uid(dicom, identity)
        if located is None:
            listed = [f"series {uid}" for uid in identity.series_uids[:1]] or [
                f"instance {uid}" for uid in identity.instance_uids[:1]
            ]
            raise _StudySkipped("study_not_found", f"not found in the imaging source ({listed[0]})")
        if located.via != "identifier":
            ctx.recorder.event(
                NOTE,
                "study_located",
                meta={"study": identity.reference, "role": role, "study_uid": located.study_uid, "via": located.via},
            )
        try:
            refs = await dicom.list_instances(located.study_uid)
        except StudyNotFoundError as exc:
            raise _StudySkipped(
                "study_not_found", f"not found in the imaging source (study {located.study_uid})"
            ) from exc
        if not refs:
            raise _StudySkipped("study_empty", f"no instances in the imaging source (study {located.study_uid})")
        modality = refs[0].modality
        chosen = choose_instances(refs, modality, ctx.settings.dicom.max_instances)
        # The chosen instances are fetched at once (network-bound), then prepared (CPU-bound).
        fetched = await asyncio.gather(*(_retrieve(dicom, ref) for ref in chosen))
    items: list[tuple[Dataset, InstanceRef]] = []
    errors: list[dict[str, Any]] = []
    for outcome, ref in zip(fetched, chosen, strict=True):
        if isinstance(outcome, Dataset):
            items.append((outcome, ref))
        else:
            errors.append({"sop_instance_uid": ref.sop_instance_uid, **outcome})
    if not items:
        images: list[PreparedImage] = []
    elif (modality or "").upper() in VOLUME_MODALITIES and len(items) > 1:
        images, prepared_errors = await asyncio.to_thread(_prepare_volume, ctx, items, modality)
        errors += prepared_errors
    else:
        images, prepared_errors = await asyncio.to_thread(_prepare_each, items)
        errors += prepared_errors
    for error in errors:
        ctx.recorder.event(NOTE, "instance_skipped", status="failed", meta={**error, "study": role})
        ctx.warn(f"image skipped: {error['message']}", reason="instance_skipped", study=role)
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
    return images, errors, chosen


async def _retrieve(dicom: DicomSource, ref: InstanceRef) -> Dataset | dict[str, Any]:
    """Return one instance's dataset, or its error (``to_dict()``) when it alone cannot be retrieved."""
    try:
        return await dicom.retrieve(ref)
    except RUN_FAILURES:
        raise
    except MedagentError as exc:
        # One unreadable file or missing instance must not cost the study's other images.
        return exc.to_dict()


def view_name(ref: InstanceRef) -> str | None:
    """Return an instance's view: its ViewPosition, else the one its series description names, else None."""
    view = (ref.view_position or "").strip().upper()
    return view or view_from_description(ref.series_description)


class DroppedView(NamedTuple):
    """The main view lost from a study: its name (PA, AP, FRONTAL) and SOP Instance UID."""

    view: str
    sop_instance_uid: str


def main_view_dropped(chosen: list[InstanceRef], images: list[PreparedImage]) -> tuple[DroppedView, list[str]] | None:
    """Return the frontal view that was chosen first but not prepared, and the views kept; None if none was lost.

    The selection (:func:`~agent.sources.imaging_selection.choose_instances`) puts a projection
    study's frontal view first: it is what a reader looks at. When that image is lost and no other
    frontal image stands in, an answer resting on what is left (say, the lateral alone) must say so.
    """
    if not chosen or not images:
        return None
    main = chosen[0]
    main_view = view_name(main)
    if main_view not in FRONTAL_VIEWS:
        return None
    kept = [view_name(image.ref) for image in images]
    if main.sop_instance_uid in {image.ref.sop_instance_uid for image in images} or any(
        view in FRONTAL_VIEWS for view in kept
    ):
        return None
    names = list(dict.fromkeys(view or "unlabelled" for view in kept))
    return DroppedView(main_view, main.sop_instance_uid), names


def _warn_study(ctx: RunContext, reference: str, role: str, reason: str, problem: str, **meta: Any) -> None:
    """Warn that a study (or part of it) is missing from the answer, naming it by reference (and role)."""
    label = reference if role == "current" else f"{reference} ({role} study)"
    ctx.warn(f"{label}: {problem}", reason=reason, study=reference, role=role, **meta)


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
