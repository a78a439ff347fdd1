"""The embedded imaging source: a folder of DICOM files, behind the DicomSource protocol.

The graph's imaging step asks a :class:`~agent.sources.protocols.DicomSource` for the instances
of the study the FHIR record names (see :mod:`agent.sources.study_identity`), picks a few
(:mod:`agent.sources.imaging_selection`), retrieves them here and hands them to pixel
preparation (:mod:`agent.sources.pixels`). The same graph runs against DICOMweb in production.

The folder is indexed once, on first use, reading only headers (``stop_before_pixels``); study
searches (:meth:`DicomDirSource.search_studies`) answer from the same index. Every
search and retrieval is reported to the run's observer, failures included. Nothing that names the
patient goes into an event or an error message: only UIDs, file paths relative to the folder,
transfer syntaxes and sizes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from agent.domain.events import AccessObserver, DicomRetrievalEvent
from agent.domain.refs import InstanceRef, StudyRef
from agent.errors import SourceUnavailableError, StudyNotFoundError

log = logging.getLogger(__name__)

BACKEND = "dicom-dir"
#: File names indexed (recursively). Extension-less DICOM folders need renaming or DICOMweb.
PATTERN = "*.dcm"


@dataclass(frozen=True)
class _Entry:
    """One indexed file."""

    ref: InstanceRef
    path: Path
    series_number: int | None
    patient_id: str | None = None
    study_date: str | None = None
    study_description: str | None = None


def _int_or_none(value: object) -> int | None:
    """Return an IS value as int, or None when absent or malformed."""
    try:
        return int(str(value)) if value not in (None, "") else None
    except ValueError:
        return None


def _str_or_none(value: object) -> str | None:
    """Return a stripped string, or None when absent or blank."""
    text = str(value).strip() if value is not None else ""
    return text or None


class DicomDirSource:
    """Find and read DICOM instances in a folder tree (implements ``DicomSource``).

    Unknown studies raise :class:`SourceUnavailableError` rather than returning an empty list:
    the caller only asks for studies the patient's record says exist, so a miss means the folder
    and the record disagree, which the run should report, not silently skip.
    """

    def __init__(self, root: Path, observer: AccessObserver) -> None:
        """Create the source; nothing is read until the first call.

        Args:
            root: the folder to index recursively.
            observer: receives one event per search and per retrieval.
        """
        self.root = Path(root)
        self.observer = observer
        self._studies: dict[str, list[_Entry]] | None = None
        self._by_sop: dict[str, _Entry] = {}
        #: Files matching the pattern that could not be parsed at indexing time (relative paths).
        self.unreadable: list[str] = []
        self._lock = asyncio.Lock()

    # --- index ---------------------------------------------------------------------------------

    def _relative(self, path: Path) -> str:
        """Return a path relative to the folder, the form errors and ``unreadable`` use."""
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return path.name

    def _scan(self) -> tuple[dict[str, list[_Entry]], dict[str, _Entry], list[str]]:
        """Read the header of every matching file; return the index by study and by SOP UID."""
        if not self.root.is_dir():
            raise SourceUnavailableError(
                f"DICOM folder {self.root} does not exist or is not a folder",
                details={"backend": BACKEND},
            )
        studies: dict[str, list[_Entry]] = {}
        by_sop: dict[str, _Entry] = {}
        unreadable: list[str] = []
        for path in sorted(self.root.rglob(PATTERN)):
            if not path.is_file():
                continue
            try:
                ds = pydicom.dcmread(
                    path,
                    stop_before_pixels=True,
                    specific_tags=[
                        "StudyInstanceUID",
                        "SeriesInstanceUID",
                        "SOPInstanceUID",
                        "Modality",
                        "ViewPosition",
                        "InstanceNumber",
                        "SeriesNumber",
                        "SeriesDescription",
                        "PatientID",
                        "StudyDate",
                        "StudyDescription",
                    ],
                )
                study_uid = str(ds.StudyInstanceUID)
                ref = InstanceRef(
                    study_uid=study_uid,
                    series_uid=str(ds.SeriesInstanceUID),
                    sop_instance_uid=str(ds.SOPInstanceUID),
                    modality=_str_or_none(ds.get("Modality")),
                    view_position=_str_or_none(ds.get("ViewPosition")),
                    instance_number=_int_or_none(ds.get("InstanceNumber")),
                    series_description=_str_or_none(ds.get("SeriesDescription")),
                )
            except Exception:
                # One bad file must not hide the rest of the folder; it is listed, and a
                # retrieve of it (if anything points at it) fails with its own error.
                unreadable.append(self._relative(path))
                continue
            entry = _Entry(
                ref=ref,
                path=path,
                series_number=_int_or_none(ds.get("SeriesNumber")),
                patient_id=_str_or_none(ds.get("PatientID")),
                study_date=_str_or_none(ds.get("StudyDate")),
                study_description=_str_or_none(ds.get("StudyDescription")),
            )
            studies.setdefault(study_uid, []).append(entry)
            by_sop[ref.sop_instance_uid] = entry
        for entries in studies.values():
            entries.sort(key=_entry_order)
        if unreadable:
            log.warning("dicom-dir: %d unreadable file(s) skipped under %s", len(unreadable), self.root)
        return studies, by_sop, unreadable

    async def _index(self, *, refresh: bool = False) -> dict[str, list[_Entry]]:
        """Return the study index, scanning (in a worker thread) on first use or when asked."""
        async with self._lock:
            if self._studies is None or refresh:
                studies, by_sop, unreadable = await asyncio.to_thread(self._scan)
                self._studies, self._by_sop, self.unreadable = studies, by_sop, unreadable
            return self._studies

    # --- protocol ------------------------------------------------------------------------------

    async def search_studies(
        self,
        *,
        patient_id: str | None = None,
        study_uid: str | None = None,
        modality: str | None = None,
        limit: int | None = None,
    ) -> list[StudyRef]:
        """Return the folder's studies matching every given filter, newest study date first.

        Matching is exact (modality case-insensitive, against any series of the study). An empty
        result triggers one rescan (files may have been added since the first scan).

        Raises:
            SourceUnavailableError: the folder is missing.
            ValueError: ``limit`` below 1.
        """
        if limit is not None and limit < 1:
            raise ValueError("limit must be at least 1")
        started = time.perf_counter()
        error: str | None = None
        try:
            studies = await self._index()
            found = _matching_studies(studies, patient_id, study_uid, modality)
            if not found:
                found = _matching_studies(await self._index(refresh=True), patient_id, study_uid, modality)
            return found[:limit] if limit is not None else found
        except SourceUnavailableError as exc:
            error = exc.message
            raise
        finally:
            self.observer.dicom_retrieval(
                DicomRetrievalEvent(
                    backend=BACKEND,
                    action="search",
                    study_uid=study_uid,
                    duration_ms=(time.perf_counter() - started) * 1000.0,
                    error=error,
                )
            )

    async def list_instances(self, study_uid: str) -> list[InstanceRef]:
        """Return the instances of a study, ordered by series number then instance number.

        The folder is scanned on the first call; a study not found triggers one rescan (files
        may have been added since), then fails.

        Raises:
            StudyNotFoundError: the study is not in the folder (a kind of SourceUnavailableError).
            SourceUnavailableError: the folder is missing.
        """
        started = time.perf_counter()
        error: str | None = None
        refs: list[InstanceRef] = []
        try:
            studies = await self._index()
            if study_uid not in studies:
                studies = await self._index(refresh=True)
            if study_uid not in studies:
                raise StudyNotFoundError(
                    f"study {study_uid} not found in the DICOM folder",
                    details={"backend": BACKEND, "study_uid": study_uid},
                )
            refs = [entry.ref for entry in studies[study_uid]]
            return refs
        except SourceUnavailableError as exc:
            error = exc.message
            raise
        finally:
            self.observer.dicom_retrieval(
                DicomRetrievalEvent(
                    backend=BACKEND,
                    action="search",
                    study_uid=study_uid,
                    duration_ms=(time.perf_counter() - started) * 1000.0,
                    error=error,
                )
            )

    async def find_study_uid(self, *, series_uid: str | None = None, sop_instance_uid: str | None = None) -> str | None:
        """Return the StudyInstanceUID of the study holding a series or an instance (exactly one given).

        Answered from the header index, like a QIDO-RS search; a miss triggers one rescan (files
        may have been added since the first scan).

        Returns:
            The study's UID, or None when no indexed file is of that series or instance.

        Raises:
            ValueError: not exactly one of ``series_uid`` and ``sop_instance_uid`` is given.
            SourceUnavailableError: the folder is missing.
        """
        if (series_uid is None) == (sop_instance_uid is None):
            raise ValueError("give exactly one of series_uid and sop_instance_uid")
        started = time.perf_counter()
        error: str | None = None
        found: str | None = None
        try:
            for refresh in (False, True):
                studies = await self._index(refresh=refresh)
                found = self._study_of(studies, series_uid, sop_instance_uid)
                if found is not None:
                    break
            return found
        except SourceUnavailableError as exc:
            error = exc.message
            raise
        finally:
            self.observer.dicom_retrieval(
                DicomRetrievalEvent(
                    backend=BACKEND,
                    action="search",
                    study_uid=found,
                    series_uid=series_uid,
                    sop_instance_uid=sop_instance_uid,
                    duration_ms=(time.perf_counter() - started) * 1000.0,
                    error=error,
                )
            )

    def _study_of(
        self, studies: dict[str, list[_Entry]], series_uid: str | None, sop_instance_uid: str | None
    ) -> str | None:
        """Return the study UID of an indexed series or instance, or None."""
        if sop_instance_uid is not None:
            entry = self._by_sop.get(sop_instance_uid)
            return entry.ref.study_uid if entry is not None else None
        return next(
            (uid for uid, entries in studies.items() if any(e.ref.series_uid == series_uid for e in entries)),
            None,
        )

    async def retrieve(self, ref: InstanceRef) -> Dataset:
        """Read one instance in full (pixel data not decoded).

        Raises:
            SourceUnavailableError: the instance is not in the folder, or its file cannot be read
                as DICOM (the message names the file, relative to the folder).
        """
        started = time.perf_counter()
        error: str | None = None
        transfer_syntax: str | None = None
        size: int | None = None
        try:
            await self._index()
            entry = self._by_sop.get(ref.sop_instance_uid)
            if entry is None:
                raise SourceUnavailableError(
                    f"instance {ref.sop_instance_uid} not found in the DICOM folder",
                    details={"backend": BACKEND, "sop_instance_uid": ref.sop_instance_uid},
                )
            ds, size = await asyncio.to_thread(self._read, entry)
            ts = getattr(ds, "file_meta", None) and ds.file_meta.get("TransferSyntaxUID")
            transfer_syntax = str(ts) if ts else None
            return ds
        except SourceUnavailableError as exc:
            error = exc.message
            raise
        finally:
            self.observer.dicom_retrieval(
                DicomRetrievalEvent(
                    backend=BACKEND,
                    action="retrieve",
                    study_uid=ref.study_uid,
                    series_uid=ref.series_uid,
                    sop_instance_uid=ref.sop_instance_uid,
                    transfer_syntax=transfer_syntax,
                    bytes=size,
                    duration_ms=(time.perf_counter() - started) * 1000.0,
                    error=error,
                )
            )

    def _read(self, entry: _Entry) -> tuple[Dataset, int]:
        """Read a file in full and check it is still the instance the index says it is."""
        name = self._relative(entry.path)
        try:
            size = entry.path.stat().st_size
            ds = pydicom.dcmread(entry.path)
            sop = str(ds.SOPInstanceUID)
        except Exception as exc:
            raise SourceUnavailableError(
                f"cannot read DICOM file {name}: {type(exc).__name__}",
                details={"backend": BACKEND, "file": name, "sop_instance_uid": entry.ref.sop_instance_uid},
            ) from exc
        if sop != entry.ref.sop_instance_uid:
            raise SourceUnavailableError(
                f"DICOM file {name} changed since it was indexed (holds another instance)",
                details={"backend": BACKEND, "file": name, "sop_instance_uid": entry.ref.sop_instance_uid},
            )
        return ds, size

    async def aclose(self) -> None:
        """Forget the index (no connections to release)."""
        self._studies = None
        self._by_sop = {}


def _study_ref(study_uid: str, entries: list[_Entry]) -> StudyRef:
    """Summarise one study's indexed files; study attributes come from the first file that has them."""
    modalities: list[str] = []
    for entry in entries:
        if entry.ref.modality and entry.ref.modality not in modalities:
            modalities.append(entry.ref.modality)
    return StudyRef(
        study_uid=study_uid,
        patient_id=next((e.patient_id for e in entries if e.patient_id), None),
        modalities=tuple(modalities),
        study_date=next((e.study_date for e in entries if e.study_date), None),
        description=next((e.study_description for e in entries if e.study_description), None),
        number_of_instances=len(entries),
    )


def _matching_studies(
    studies: dict[str, list[_Entry]],
    patient_id: str | None,
    study_uid: str | None,
    modality: str | None,
) -> list[StudyRef]:
    """Return the studies matching every given filter, newest first (undated last), then by UID."""
    wanted_modality = modality.strip().upper() if modality is not None else None
    found: list[StudyRef] = []
    for uid, entries in studies.items():
        if study_uid is not None and uid != study_uid:
            continue
        study = _study_ref(uid, entries)
        if patient_id is not None and study.patient_id != patient_id:
            continue
        if wanted_modality is not None and wanted_modality not in {m.upper() for m in study.modalities}:
            continue
        found.append(study)
    found.sort(key=lambda s: s.study_uid)
    found.sort(key=lambda s: s.study_date or "", reverse=True)
    return found


def _entry_order(entry: _Entry) -> tuple[int, str, int, str]:
    """Sort key: series number, series UID (keeps series together), instance number, file path.

    Missing numbers sort last.
    """
    big = 2**31
    return (
        entry.series_number if entry.series_number is not None else big,
        entry.ref.series_uid,
        entry.ref.instance_number if entry.ref.instance_number is not None else big,
        str(entry.path),
    )
