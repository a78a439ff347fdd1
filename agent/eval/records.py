"""Read a folder of FHIR bundles as patient records: each Patient with every resource that refers to it.

Where it sits: ``medagent eval --data DIR`` (agent/eval/record_eval.py) asks questions about each
record of a folder nobody here wrote; agent/eval/generated.py computes the questions' gold ids
from the resources read here. Reading goes through the agent's own bundle-folder source
(:class:`~agent.sources.fhir_bundle_dir.BundleDirFhirSource`, its public search and
``$everything``), so bundles of any type (transaction, collection, searchset), ``urn:uuid:``
references and duplicate ids are handled exactly as the agent sees them, with no second parser
to drift from the first.

The source indexes every file of its folder on each use, so the evaluation points it at a folder
holding one symlink to one bundle file (:func:`link_only`): indexing one file keeps each run fast
however large the data folder is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.domain.events import NullObserver
from agent.sources.fhir_bundle_dir import BundleDirFhirSource

Resource = dict[str, Any]


@dataclass(frozen=True)
class PatientRecord:
    """One patient of a bundle file, with every resource of that file that refers to the patient.

    Attributes:
        file: the bundle file the record came from (in the data folder, not the symlink).
        patient: the Patient resource.
        resources: every other resource with a reference to the patient, ``urn:uuid:``
            references already rewritten to ``Type/id``.
    """

    file: Path
    patient: Resource
    resources: tuple[Resource, ...]

    @property
    def patient_id(self) -> str:
        """Return the Patient's logical id."""
        return str(self.patient["id"])

    def of_type(self, resource_type: str) -> list[Resource]:
        """Return the record's resources of one type, in file order."""
        return [r for r in self.resources if r.get("resourceType") == resource_type]


def bundle_files(data_dir: Path) -> list[Path]:
    """Return every ``*.json`` file under a folder, sorted by file name (then path, for equal names)."""
    return sorted(data_dir.rglob("*.json"), key=lambda file: (file.name, str(file)))


def link_only(folder: Path, file: Path) -> Path:
    """Make ``folder`` hold exactly one entry: a symlink to ``file`` (the data is read in place, never copied).

    Returns:
        The symlink's path.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for entry in folder.iterdir():
        entry.unlink()
    link = folder / file.name
    link.symlink_to(file.resolve())
    return link


async def read_records(folder: Path, source_file: Path) -> list[PatientRecord]:
    """Return every patient record in a folder, as the agent's bundle-folder source reads it.

    Args:
        folder: the folder to read (in the evaluation, one symlink made by :func:`link_only`).
        source_file: the data file the folder stands for, kept on each record for the report.

    Raises:
        InvalidResourceError: a file in the folder is not valid JSON or not FHIR.
        SourceUnavailableError: the folder is missing.
    """
    source = BundleDirFhirSource(folder, observer=NullObserver())
    try:
        patients = await source.search("Patient", {})
        records = []
        for patient in sorted(patients, key=lambda p: str(p.get("id"))):
            page = await source.get(f"Patient/{patient['id']}/$everything", {})
            found = [e["resource"] for e in page.get("entry") or [] if isinstance(e.get("resource"), dict)]
            others = tuple(
                r for r in found if not (r.get("resourceType") == "Patient" and r.get("id") == patient["id"])
            )
            records.append(PatientRecord(file=source_file, patient=patient, resources=others))
        return records
    finally:
        await source.aclose()
