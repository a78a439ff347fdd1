"""Turn imaging sources into index entries and embeddings: a DICOM folder, DICOMweb, an ImagingStudy.

Where it sits: ``medagent index add`` calls these; each study is cut to the images that matter
(:func:`~agent.sources.imaging_selection.choose_instances`, frontal CXR first, evenly spaced
slices), every instance goes through the same pixel preparation as a run
(:func:`~agent.sources.pixels.prepare_instance`), images are embedded in batches by MedSigLIP
and added to the index one batch at a time, so a long ingest that stops keeps what it finished.

An instance that cannot be retrieved or decoded is reported in :class:`IngestReport` and skipped;
it never aborts the add. Reports carry UIDs and error codes only, never patient names.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from agent.config import DicomSettings
from agent.domain.events import AccessObserver
from agent.domain.refs import InstanceRef
from agent.errors import ConfigError, MedagentError, SourceUnavailableError, StudyNotFoundError
from agent.inference.protocols import ModelIdentity
from agent.retrieval.entries import IndexedModel, IndexEntry
from agent.retrieval.protocols import ImageIndex
from agent.sources.imaging_selection import choose_instances
from agent.sources.pixels import prepare_instance
from agent.sources.protocols import DicomSource, FhirSource
from agent.sources.study_identity import study_identity, study_instance_uid

log = logging.getLogger(__name__)

#: Images embedded (and added to the index) per batch.
EMBED_BATCH = 16


class ImageEmbedder(Protocol):
    """What ingest needs from MedSigLIP: batched, normalised image embeddings and an identity."""

    identity: ModelIdentity

    def embed_images(self, images: Sequence[Image.Image]) -> Any:
        """Return an ``(n, dim)`` tensor or array of L2-normalised embeddings."""
        ...


@dataclass
class IngestReport:
    """What an add did: images added, studies touched, instances skipped and why."""

    added: int = 0
    studies: set[str] = field(default_factory=set)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def skip(self, ref: InstanceRef | None, error: Exception, where: str | None = None) -> None:
        """Record one instance (or file) that could not be indexed."""
        code = error.code if isinstance(error, MedagentError) else type(error).__name__
        message = error.message if isinstance(error, MedagentError) else str(error)[:300]
        item = {"code": code, "message": message}
        if ref is not None:
            item["study_uid"] = ref.study_uid
            item["sop_instance_uid"] = ref.sop_instance_uid
        if where:
            item["file"] = where
        self.skipped.append(item)
        log.warning("index add: skipped %s (%s)", ref.sop_instance_uid if ref else where, code)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready summary."""
        return {"added": self.added, "studies": sorted(self.studies), "skipped": self.skipped}


class _Batcher:
    """Collect (entry, image) pairs and embed + add them EMBED_BATCH at a time."""

    def __init__(self, embedder: ImageEmbedder, index: ImageIndex, report: IngestReport) -> None:
        self.embedder = embedder
        self.index = index
        self.report = report
        self.entries: list[IndexEntry] = []
        self.images: list[Image.Image] = []

    def put(self, entry: IndexEntry, image: Image.Image) -> None:
        self.entries.append(entry)
        self.images.append(image)
        if len(self.entries) >= EMBED_BATCH:
            self.flush()

    def flush(self) -> None:
        if not self.entries:
            return
        import numpy as np

        vectors = np.asarray(self.embedder.embed_images(self.images), dtype=np.float32)
        model = IndexedModel.of(self.embedder.identity, int(vectors.shape[1]))
        self.report.added += self.index.add(self.entries, vectors, model)
        self.report.studies |= {e.study_uid for e in self.entries}
        self.entries, self.images = [], []


def public_url(url: str | None) -> str | None:
    """Return a URL without user:password, fit to store in an index entry."""
    if not url:
        return None
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


# --- a folder of DICOM files ------------------------------------------------------------------


def _scan_folder(folder: Path, report: IngestReport) -> dict[str, list[tuple[InstanceRef, Path]]]:
    """Read headers of every file under ``folder``; group DICOM instances by study."""
    studies: dict[str, list[tuple[InstanceRef, Path]]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            ref = InstanceRef.of_dataset(ds)
        except InvalidDicomError:
            continue  # not DICOM (a README, a PNG): nothing to index
        except Exception as exc:
            report.skip(None, exc, str(path.relative_to(folder)))
            continue
        studies.setdefault(ref.study_uid, []).append((ref, path))
    return studies


def ingest_folder(
    folder: Path, embedder: ImageEmbedder, index: ImageIndex, *, per_study: int = 4, label: str | None = None
) -> IngestReport:
    """Index the chosen images of every study found under ``folder``.

    Args:
        folder: searched recursively; files that are not DICOM are ignored.
        embedder: MedSigLIP (or anything with ``embed_images`` and ``identity``).
        index: where the vectors go.
        per_study: images per study (``dicom.max_instances``).
        label: optional caption stored with every entry.

    Raises:
        SourceUnavailableError: the folder does not exist.
    """
    if not folder.is_dir():
        raise SourceUnavailableError(f"DICOM folder {folder} does not exist or is not a folder")
    report = IngestReport()
    batch = _Batcher(embedder, index, report)
    for refs_paths in _scan_folder(folder, report).values():
        by_sop = {ref.sop_instance_uid: path for ref, path in refs_paths}
        refs = [ref for ref, _ in refs_paths]
        for ref in choose_instances(refs, None, per_study):
            try:
                image = prepare_instance(pydicom.dcmread(by_sop[ref.sop_instance_uid]), ref).image
            except Exception as exc:
                report.skip(ref, exc)
                continue
            batch.put(_entry(ref, source="dicom-dir", label=label), image)
    batch.flush()
    return report


# --- a DICOM source (DICOMweb, or the configured folder) -------------------------------------


async def ingest_dicom_source(
    source: DicomSource,
    embedder: ImageEmbedder,
    index: ImageIndex,
    *,
    dicomweb_url: str | None,
    patient_id: str | None = None,
    study_uid: str | None = None,
    modality: str | None = None,
    per_study: int = 4,
    patient_ref: str | None = None,
    imaging_study_ref: str | None = None,
    label: str | None = None,
) -> IngestReport:
    """Index the chosen images of the matching studies of a DICOM source.

    With only ``study_uid`` the study is read directly; otherwise studies are found with
    ``search_studies`` (all studies when no filter is given).
    """
    report = IngestReport()
    batch = _Batcher(embedder, index, report)
    if study_uid and not patient_id and not modality:
        study_uids = [study_uid]
    else:
        if not hasattr(source, "search_studies"):
            raise ConfigError(
                f"the {type(source).__name__} in use cannot list studies; give one study with --study UID"
            )
        found = await source.search_studies(patient_id=patient_id, study_uid=study_uid, modality=modality)
        study_uids = [s.study_uid for s in found]
    label_source = "dicomweb" if dicomweb_url else "dicom-dir"
    for uid in study_uids:
        try:
            refs = await source.list_instances(uid)
        except MedagentError as exc:
            report.skip(InstanceRef(study_uid=uid, series_uid="", sop_instance_uid=""), exc)
            continue
        for ref in choose_instances(refs, None, per_study):
            try:
                dataset: Dataset = await source.retrieve(ref)
                image = (await asyncio.to_thread(prepare_instance, dataset, ref)).image
            except Exception as exc:
                report.skip(ref, exc)
                continue
            entry = _entry(
                ref,
                source=label_source,
                dicomweb_url=public_url(dicomweb_url),
                patient_ref=patient_ref,
                imaging_study_ref=imaging_study_ref,
                label=label,
            )
            batch.put(entry, image)
    batch.flush()
    return report


# --- a FHIR ImagingStudy ----------------------------------------------------------------------


async def ingest_imaging_study(
    fhir: FhirSource,
    imaging_study_id: str,
    dicom_settings: DicomSettings,
    observer: AccessObserver,
    embedder: ImageEmbedder,
    index: ImageIndex,
    *,
    label: str | None = None,
) -> IngestReport:
    """Index one ImagingStudy: its DICOM study, with the ImagingStudy and Patient references.

    The images come from the configured DICOMweb server; without one, from the ImagingStudy's
    DICOMweb ``endpoint`` when it has one (with the configured credentials); else from the
    configured DICOM folder.

    Raises:
        SourceUnavailableError: the ImagingStudy cannot be read or names no DICOM study UID and
            no series or instance UID to find it by.
        StudyNotFoundError: the source holds none of the series or instances it lists.
    """
    from agent.sources.dicomweb import DicomWebSource
    from agent.sources.factory import make_dicom_source
    from agent.sources.study_location import locate_study_uid

    resource = await fhir.read("ImagingStudy", imaging_study_id)
    identity = study_identity(resource)
    if not identity.locatable:
        study_instance_uid(resource)  # raises, naming the study and the identifier forms read
    subject = (resource.get("subject") or {}).get("reference")
    patient_ref = str(subject) if isinstance(subject, str) and subject.startswith("Patient/") else None
    url = dicom_settings.dicomweb_url or await _endpoint_address(fhir, resource)
    if url and not dicom_settings.dicomweb_url:
        source: DicomSource = DicomWebSource.from_settings(
            dicom_settings.model_copy(update={"dicomweb_url": url}), observer
        )
    else:
        source = make_dicom_source(dicom_settings, observer)
    try:
        located = await locate_study_uid(source, identity)
        if located is None:
            raise StudyNotFoundError(
                f"{identity.reference}: none of its series or instances is in the imaging source",
                details={"series_uids": list(identity.series_uids[:3])},
            )
        return await ingest_dicom_source(
            source,
            embedder,
            index,
            dicomweb_url=url,
            study_uid=located.study_uid,
            per_study=dicom_settings.max_instances,
            patient_ref=patient_ref,
            imaging_study_ref=f"ImagingStudy/{resource.get('id', imaging_study_id)}",
            label=label,
        )
    finally:
        await source.aclose()


async def _endpoint_address(fhir: FhirSource, resource: dict[str, Any]) -> str | None:
    """Return the address of the ImagingStudy's first DICOMweb (WADO-RS) Endpoint, if any."""
    for ref in resource.get("endpoint") or []:
        reference = ref.get("reference") if isinstance(ref, dict) else None
        if not isinstance(reference, str) or not reference.startswith("Endpoint/"):
            continue
        try:
            endpoint = await fhir.read("Endpoint", reference.split("/", 1)[1])
        except MedagentError:
            continue
        kind = (endpoint.get("connectionType") or {}).get("code")
        if kind in (None, "dicom-wado-rs") and endpoint.get("address"):
            return str(endpoint["address"])
    return None


def _entry(
    ref: InstanceRef,
    *,
    source: str,
    dicomweb_url: str | None = None,
    patient_ref: str | None = None,
    imaging_study_ref: str | None = None,
    label: str | None = None,
) -> IndexEntry:
    return IndexEntry(
        study_uid=ref.study_uid,
        series_uid=ref.series_uid,
        sop_instance_uid=ref.sop_instance_uid,
        modality=ref.modality,
        patient_ref=patient_ref,
        imaging_study_ref=imaging_study_ref,
        source=source,
        dicomweb_url=dicomweb_url,
        label=label,
    )
