"""Make the synthetic fixtures: three patients' FHIR R4 bundles and the DICOM studies they cite.

This is the start of every offline flow: the bundle folder is the embedded FHIR source, the DICOM
folder the embedded imaging source, and the loader tools push both into a real FHIR engine and
Orthanc for the server tests. Everything here is invented; nothing comes from a real person.

Output is deterministic: ids are uuid5 of readable names, DICOM UIDs are hashes of readable names,
pictures come from a seeded generator and no clock is read, so re-running yields identical bytes.

Usage::

    python tools/make_fixtures.py            # writes ./fixtures (beside tools/)
    python tools/make_fixtures.py --out DIR  # writes DIR/fhir, DIR/dicom, DIR/manifest.json, DIR/README.md
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fhir.resources.R4B import get_fhir_model_class
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

# --- identities --------------------------------------------------------------------------------

#: Fixed namespace so every resource id is a stable UUID (the Medplum test engine requires UUID ids).
FIXTURE_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://medagent.example.org/fixtures")
MRN_SYSTEM = "http://hospital.example.org/mrn"
DICOM_UID_SYSTEM = "urn:dicom:uid"

SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
UCUM = "http://unitsofmeasure.org"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
CONDITION_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
CONDITION_VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
CONDITION_CATEGORY = "http://terminology.hl7.org/CodeSystem/condition-category"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
ALLERGY_CLINICAL = "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical"
ALLERGY_VERIFICATION = "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification"
DIAG_SERVICE_SECTION = "http://terminology.hl7.org/CodeSystem/v2-0074"

DX_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
CT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
#: pydicom's registered root; UIDs below it are derived from readable names, so they never change.
UID_PREFIX = "1.2.826.0.1.3680043.8.498."


def rid(name: str) -> str:
    """Return the deterministic UUID resource id for a readable name."""
    return str(uuid.uuid5(FIXTURE_NAMESPACE, name))


def duid(name: str) -> str:
    """Return the deterministic DICOM UID for a readable name."""
    return str(generate_uid(prefix=UID_PREFIX, entropy_srcs=["medagent-fixtures", name]))


def coding(system: str, code: str, display: str) -> dict[str, Any]:
    """Return a CodeableConcept with one coding and the display as text."""
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


# --- FHIR resource builders --------------------------------------------------------------------


@dataclass
class PatientSpec:
    """The readable facts of one synthetic patient."""

    key: str
    family: str
    given: str
    gender: str
    birth_date: str
    mrn: str

    @property
    def id(self) -> str:
        """Return the Patient resource id."""
        return rid(f"{self.key}/Patient")

    @property
    def ref(self) -> dict[str, str]:
        """Return a Reference to the Patient."""
        return {"reference": f"Patient/{self.id}"}

    @property
    def dicom_name(self) -> str:
        """Return the name in DICOM PN form (Family^Given)."""
        return f"{self.family}^{self.given}"


@dataclass
class Builder:
    """Collects one patient's resources in order, ids derived from the patient key and a label."""

    patient: PatientSpec
    resources: list[dict[str, Any]] = field(default_factory=list)

    def add(self, resource_type: str, label: str, body: dict[str, Any]) -> str:
        """Add a resource and return its id."""
        resource_id = rid(f"{self.patient.key}/{resource_type}/{label}")
        self.resources.append({"resourceType": resource_type, "id": resource_id, **body})
        return resource_id

    def patient_resource(self) -> None:
        """Add the Patient resource."""
        p = self.patient
        self.resources.append(
            {
                "resourceType": "Patient",
                "id": p.id,
                "identifier": [
                    {
                        "use": "usual",
                        "type": coding("http://terminology.hl7.org/CodeSystem/v2-0203", "MR", "Medical record number"),
                        "system": MRN_SYSTEM,
                        "value": p.mrn,
                    }
                ],
                "active": True,
                "name": [{"use": "official", "family": p.family, "given": [p.given]}],
                "gender": p.gender,
                "birthDate": p.birth_date,
            }
        )

    def condition(
        self,
        label: str,
        code: str,
        display: str,
        onset: str,
        *,
        abatement: str | None = None,
        category: str = "problem-list-item",
        encounter: str | None = None,
    ) -> str:
        """Add a Condition: active without an abatement date, resolved with one."""
        status = "resolved" if abatement else "active"
        body: dict[str, Any] = {
            "clinicalStatus": coding(CONDITION_CLINICAL, status, status.capitalize()),
            "verificationStatus": coding(CONDITION_VERIFICATION, "confirmed", "Confirmed"),
            "category": [
                coding(
                    CONDITION_CATEGORY,
                    category,
                    "Problem List Item" if category == "problem-list-item" else "Encounter Diagnosis",
                )
            ],
            "code": coding(SNOMED, code, display),
            "subject": self.patient.ref,
            "onsetDateTime": onset,
            "recordedDate": onset,
        }
        if abatement:
            body["abatementDateTime"] = abatement
        if encounter:
            body["encounter"] = {"reference": f"Encounter/{encounter}"}
        return self.add("Condition", label, body)

    def quantity_obs(
        self,
        label: str,
        code: str,
        display: str,
        when: str,
        value: float,
        unit: str,
        ucum: str,
        *,
        category: str = "laboratory",
        low: float | None = None,
        high: float | None = None,
    ) -> str:
        """Add a numeric Observation with UCUM units, reference range and interpretation if abnormal."""
        body: dict[str, Any] = {
            "status": "final",
            "category": [
                coding(
                    OBSERVATION_CATEGORY,
                    category,
                    "Laboratory" if category == "laboratory" else "Vital Signs",
                )
            ],
            "code": coding(LOINC, code, display),
            "subject": self.patient.ref,
            "effectiveDateTime": when,
            "issued": when,
            "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": ucum},
        }
        if low is not None or high is not None:
            rng: dict[str, Any] = {}
            if low is not None:
                rng["low"] = {"value": low, "unit": unit, "system": UCUM, "code": ucum}
            if high is not None:
                rng["high"] = {"value": high, "unit": unit, "system": UCUM, "code": ucum}
            body["referenceRange"] = [rng]
            if high is not None and value > high:
                body["interpretation"] = [coding(INTERPRETATION, "H", "High")]
            elif low is not None and value < low:
                body["interpretation"] = [coding(INTERPRETATION, "L", "Low")]
            else:
                body["interpretation"] = [coding(INTERPRETATION, "N", "Normal")]
        return self.add("Observation", label, body)

    def blood_pressure(self, label: str, when: str, systolic: int, diastolic: int) -> str:
        """Add a blood pressure panel (85354-9) with systolic and diastolic components."""
        high = systolic >= 140 or diastolic >= 90

        def component(code: str, display: str, value: int, limit: int) -> dict[str, Any]:
            comp: dict[str, Any] = {
                "code": coding(LOINC, code, display),
                "valueQuantity": {"value": value, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"},
                "referenceRange": [{"high": {"value": limit, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"}}],
            }
            if value >= limit:
                comp["interpretation"] = [coding(INTERPRETATION, "H", "High")]
            return comp

        body: dict[str, Any] = {
            "status": "final",
            "category": [coding(OBSERVATION_CATEGORY, "vital-signs", "Vital Signs")],
            "code": coding(LOINC, "85354-9", "Blood pressure panel with all children optional"),
            "subject": self.patient.ref,
            "effectiveDateTime": when,
            "issued": when,
            "component": [
                component("8480-6", "Systolic blood pressure", systolic, 140),
                component("8462-4", "Diastolic blood pressure", diastolic, 90),
            ],
        }
        if high:
            body["interpretation"] = [coding(INTERPRETATION, "H", "High")]
        return self.add("Observation", label, body)

    def coded_obs(self, label: str, code: str, display: str, when: str, value: dict[str, Any]) -> str:
        """Add an Observation whose value is a CodeableConcept (e.g. smoking status)."""
        return self.add(
            "Observation",
            label,
            {
                "status": "final",
                "category": [coding(OBSERVATION_CATEGORY, "social-history", "Social History")],
                "code": coding(LOINC, code, display),
                "subject": self.patient.ref,
                "effectiveDateTime": when,
                "valueCodeableConcept": value,
            },
        )

    def medication(
        self, label: str, rxnorm: str, display: str, authored: str, dosage: str, *, status: str = "active"
    ) -> str:
        """Add a MedicationRequest (RxNorm-coded, free-text dosage)."""
        return self.add(
            "MedicationRequest",
            label,
            {
                "status": status,
                "intent": "order",
                "medicationCodeableConcept": coding(RXNORM, rxnorm, display),
                "subject": self.patient.ref,
                "authoredOn": authored,
                "dosageInstruction": [{"text": dosage}],
            },
        )

    def allergy(
        self,
        label: str,
        substance: dict[str, Any],
        manifestation: dict[str, Any],
        recorded: str,
        severity: str,
    ) -> str:
        """Add an active, confirmed AllergyIntolerance with one reaction."""
        return self.add(
            "AllergyIntolerance",
            label,
            {
                "clinicalStatus": coding(ALLERGY_CLINICAL, "active", "Active"),
                "verificationStatus": coding(ALLERGY_VERIFICATION, "confirmed", "Confirmed"),
                "type": "allergy",
                "category": ["medication"],
                "criticality": "high" if severity == "severe" else "low",
                "code": substance,
                "patient": self.patient.ref,
                "recordedDate": recorded,
                "reaction": [{"manifestation": [manifestation], "severity": severity}],
            },
        )

    def encounter(self, label: str, klass: str, type_display: str, start: str, end: str, reason: dict[str, Any]) -> str:
        """Add a finished Encounter with class, period and reason."""
        class_display = {"AMB": "ambulatory", "IMP": "inpatient encounter", "EMER": "emergency"}[klass]
        return self.add(
            "Encounter",
            label,
            {
                "status": "finished",
                "class": {"system": ACT_CODE, "code": klass, "display": class_display},
                "type": [{"text": type_display}],
                "subject": self.patient.ref,
                "period": {"start": start, "end": end},
                "reasonCode": [reason],
            },
        )

    def note(self, label: str, when: str, title: str, text: str, encounter: str) -> str:
        """Add a DocumentReference holding a short plain-text clinical note."""
        return self.add(
            "DocumentReference",
            label,
            {
                "status": "current",
                "docStatus": "final",
                "type": coding(LOINC, "11506-3", "Progress note"),
                "category": [
                    coding(
                        "http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category",
                        "clinical-note",
                        "Clinical Note",
                    )
                ],
                "subject": self.patient.ref,
                "date": when,
                "description": title,
                "content": [
                    {
                        "attachment": {
                            "contentType": "text/plain; charset=utf-8",
                            "language": "en",
                            "data": base64.b64encode(text.encode("utf-8")).decode("ascii"),
                            "title": title,
                            "creation": when,
                        }
                    }
                ],
                "context": {"encounter": [{"reference": f"Encounter/{encounter}"}]},
            },
        )


# --- DICOM studies -----------------------------------------------------------------------------


@dataclass
class InstanceSpec:
    """One DICOM file to write: where, its UIDs and its pixels."""

    file: str  # relative to the fixtures root
    series_label: str
    series_number: int
    instance_number: int
    view_position: str | None
    series_description: str
    make: Callable[[Dataset], None]  # fills the image module (pixels and pixel tags)


@dataclass
class StudySpec:
    """One imaging study: DICOM files plus the ImagingStudy and report that describe it."""

    label: str
    modality: str
    sop_class: str
    date: str  # YYYY-MM-DD
    time: str  # HHMMSS
    description: str
    accession: str
    instances: list[InstanceSpec]

    def uid(self, patient_key: str) -> str:
        """Return the StudyInstanceUID."""
        return duid(f"{patient_key}/{self.label}/study")

    def series_uid(self, patient_key: str, series_label: str) -> str:
        """Return a SeriesInstanceUID."""
        return duid(f"{patient_key}/{self.label}/{series_label}/series")

    def sop_uid(self, patient_key: str, inst: InstanceSpec) -> str:
        """Return a SOPInstanceUID."""
        return duid(f"{patient_key}/{self.label}/{inst.series_label}/{inst.instance_number}/instance")


def _ellipse(shape: tuple[int, int], cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    """Return a boolean mask of an axis-aligned ellipse."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def chest_frontal(rows: int, cols: int, seed: int, *, cardiomegaly: float = 1.0) -> np.ndarray:
    """Return a 12-bit frontal chest picture where bright means dense (MONOCHROME2 sense)."""
    rng = np.random.default_rng(seed)
    img = np.full((rows, cols), 250.0)  # air around the body
    shape = (rows, cols)
    img[_ellipse(shape, rows * 0.55, cols * 0.5, rows * 0.52, cols * 0.47)] = 2300.0  # soft tissue
    lungs = np.zeros(shape, dtype=bool)
    for cx in (cols * 0.3, cols * 0.7):  # lungs: dark because air attenuates little
        lungs |= _ellipse(shape, rows * 0.45, cx, rows * 0.3, cols * 0.16)
    img[lungs] = 900.0
    # Ribs: faint bright arcs across the lungs, so windowing has edges to show.
    yy, xx = np.mgrid[0:rows, 0:cols]
    for k in range(7):
        arc = np.abs(yy - (rows * 0.2 + k * rows * 0.085) - 0.0015 * (xx - cols / 2) ** 2) < 2.0
        img[arc & lungs] += 350.0
    heart = _ellipse(shape, rows * 0.6, cols * 0.55, rows * 0.16 * cardiomegaly, cols * 0.17 * cardiomegaly)
    img[heart] = 2650.0
    img[:, int(cols * 0.47) : int(cols * 0.53)] = np.where(
        img[:, int(cols * 0.47) : int(cols * 0.53)] > 1000,
        3300.0,
        img[:, int(cols * 0.47) : int(cols * 0.53)],
    )  # spine, only inside the body
    img += rng.normal(0.0, 40.0, size=shape)
    return np.clip(np.rint(img), 0, 4095).astype(np.uint16)


def chest_lateral(rows: int, cols: int, seed: int) -> np.ndarray:
    """Return a 12-bit lateral chest picture (one lung field, spine behind, heart in front)."""
    rng = np.random.default_rng(seed)
    shape = (rows, cols)
    img = np.full(shape, 250.0)
    img[_ellipse(shape, rows * 0.55, cols * 0.5, rows * 0.52, cols * 0.4)] = 2300.0
    img[_ellipse(shape, rows * 0.45, cols * 0.5, rows * 0.32, cols * 0.28)] = 950.0
    img[_ellipse(shape, rows * 0.62, cols * 0.38, rows * 0.15, cols * 0.14)] = 2550.0
    spine = (slice(int(rows * 0.15), int(rows * 0.95)), slice(int(cols * 0.76), int(cols * 0.84)))
    img[spine] = 3300.0
    img += rng.normal(0.0, 40.0, size=shape)
    return np.clip(np.rint(img), 0, 4095).astype(np.uint16)


def ct_slice(index: int, size: int = 64) -> np.ndarray:
    """Return one axial chest CT slice in HU (float); a nodule shows on slices 1 and 2."""
    shape = (size, size)
    hu = np.full(shape, -1000.0)
    hu[_ellipse(shape, 32, 32, 24, 30)] = 40.0  # body wall
    for cx in (19, 45):
        hu[_ellipse(shape, 30, cx, 16, 10)] = -850.0  # lungs
    hu[_ellipse(shape, 50, 32, 4, 4)] = 700.0  # vertebral body
    hu[_ellipse(shape, 30, 32, 6, 5)] = 45.0  # mediastinum
    if index in (1, 2):
        hu[_ellipse(shape, 24, 16, 2.5, 2.5)] = 30.0  # right upper lobe nodule
    hu += np.random.default_rng(100 + index).normal(0.0, 8.0, size=shape)
    return hu


def fill_dx(pixels: np.ndarray, *, monochrome1: bool, center: float, width: float) -> Callable[[Dataset], None]:
    """Return a filler that stores a 12-bit (in 16) DX picture, inverted for MONOCHROME1."""

    def fill(ds: Dataset) -> None:
        stored = (4095 - pixels).astype(np.uint16) if monochrome1 else pixels
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
        ds.Rows, ds.Columns = stored.shape
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.ImagerPixelSpacing = [1.4, 1.4]
        ds.PixelSpacing = [1.4, 1.4]
        # Stored values are already in display sense for the photometric interpretation, so the
        # window is given in the stored (rescaled, slope 1 / intercept 0) space.
        ds.WindowCenter = center if not monochrome1 else 4095 - center
        ds.WindowWidth = width
        ds.RescaleSlope = 1
        ds.RescaleIntercept = 0
        ds.RescaleType = "US"
        ds.PixelData = stored.tobytes()

    return fill


def fill_ct(index: int, *, with_window: bool) -> Callable[[Dataset], None]:
    """Return a filler that stores one signed 16-bit CT slice with intercept -1024."""

    def fill(ds: Dataset) -> None:
        stored = np.clip(np.rint(ct_slice(index) + 1024.0), -2000, 3000).astype(np.int16)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = stored.shape
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.PixelSpacing = [5.0, 5.0]
        ds.SliceThickness = 5.0
        z = -100.0 + 5.0 * index
        ds.ImagePositionPatient = [-160.0, -160.0, z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = z
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.KVP = 120
        if with_window:
            # Lung window; one slice has none, so the default-window path runs on real fixtures.
            ds.WindowCenter = -600
            ds.WindowWidth = 1500
        ds.PixelData = stored.tobytes()

    return fill


def write_instance(path: Path, patient: PatientSpec, study: StudySpec, inst: InstanceSpec) -> tuple[str, str]:
    """Write one DICOM Part 10 file; return its series and SOP instance UIDs."""
    series_uid = study.series_uid(patient.key, inst.series_label)
    sop_uid = study.sop_uid(patient.key, inst)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(study.sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    # Orthanc stores a STOW-RS upload without the DICM header unless the preamble is present.
    ds.preamble = b"\0" * 128
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"] if study.modality == "CT" else ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = study.sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = study.date.replace("-", "")
    ds.SeriesDate = ds.StudyDate
    ds.ContentDate = ds.StudyDate
    ds.StudyTime = study.time
    ds.SeriesTime = study.time
    ds.ContentTime = study.time
    ds.AccessionNumber = study.accession
    ds.Modality = study.modality
    ds.Manufacturer = "medagent synthetic fixtures"
    ds.InstitutionName = "Example Hospital"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = study.description
    ds.SeriesDescription = inst.series_description
    ds.PatientName = patient.dicom_name
    ds.PatientID = patient.mrn
    ds.IssuerOfPatientID = MRN_SYSTEM
    ds.PatientBirthDate = patient.birth_date.replace("-", "")
    ds.PatientSex = {"male": "M", "female": "F"}.get(patient.gender, "O")
    ds.BodyPartExamined = "CHEST"
    if inst.view_position is not None:
        ds.ViewPosition = inst.view_position
        ds.PatientOrientation = ["P", "F"] if inst.view_position in {"LL", "RL"} else ["L", "F"]
    ds.StudyInstanceUID = study.uid(patient.key)
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = study.accession[-4:]
    ds.SeriesNumber = inst.series_number
    ds.InstanceNumber = inst.instance_number
    inst.make(ds)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return series_uid, sop_uid


def imaging_study_resource(
    b: Builder, study: StudySpec, written: list[tuple[InstanceSpec, str, str]], encounter: str
) -> str:
    """Add the ImagingStudy that describes a written DICOM study (same UIDs)."""
    series: dict[str, dict[str, Any]] = {}
    for inst, series_uid, sop_uid in written:
        entry = series.setdefault(
            series_uid,
            {
                "uid": series_uid,
                "number": inst.series_number,
                "modality": {"system": DCM, "code": study.modality},
                "description": inst.series_description,
                "bodySite": {"system": SNOMED, "code": "51185008", "display": "Thoracic structure"},
                "started": f"{study.date}T{study.time[:2]}:{study.time[2:4]}:{study.time[4:]}Z",
                "instance": [],
            },
        )
        entry["instance"].append(
            {
                "uid": sop_uid,
                "sopClass": {"system": "urn:ietf:rfc:3986", "code": f"urn:oid:{study.sop_class}"},
                "number": inst.instance_number,
            }
        )
    for entry in series.values():
        entry["numberOfInstances"] = len(entry["instance"])
    return b.add(
        "ImagingStudy",
        study.label,
        {
            "identifier": [
                {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{study.uid(b.patient.key)}"},
                {
                    "type": coding("http://terminology.hl7.org/CodeSystem/v2-0203", "ACSN", "Accession ID"),
                    "value": study.accession,
                },
            ],
            "status": "available",
            "modality": [{"system": DCM, "code": study.modality}],
            "subject": b.patient.ref,
            "encounter": {"reference": f"Encounter/{encounter}"},
            "started": f"{study.date}T{study.time[:2]}:{study.time[2:4]}:{study.time[4:]}Z",
            "numberOfSeries": len(series),
            "numberOfInstances": len(written),
            "description": study.description,
            "series": list(series.values()),
        },
    )


def report(
    b: Builder,
    label: str,
    loinc: str,
    display: str,
    when: str,
    imaging_study: str | None,
    encounter: str,
    conclusion: str,
    conclusion_codes: list[tuple[str, str]],
) -> str:
    """Add a final radiology DiagnosticReport."""
    body: dict[str, Any] = {
        "status": "final",
        "category": [coding(DIAG_SERVICE_SECTION, "RAD", "Radiology")],
        "code": coding(LOINC, loinc, display),
        "subject": b.patient.ref,
        "encounter": {"reference": f"Encounter/{encounter}"},
        "effectiveDateTime": when,
        "issued": when,
        "conclusion": conclusion,
        "conclusionCode": [coding(SNOMED, code, text) for code, text in conclusion_codes],
    }
    if imaging_study:
        body["imagingStudy"] = [{"reference": f"ImagingStudy/{imaging_study}"}]
    return b.add("DiagnosticReport", label, body)


# --- the three patients ------------------------------------------------------------------------

CXR = PatientSpec("cxr", "Quill", "Arthur", "male", "1959-03-11", "MRN-100001")
CT = PatientSpec("ct", "Lindqvist", "Beatrice", "female", "1961-04-02", "MRN-100002")
NOIMG = PatientSpec("noimg", "Mendez", "Carlos", "male", "1972-08-23", "MRN-100003")

CXR_ROWS, CXR_COLS = 256, 200  # not square, so pad-to-square is exercised


def cxr_studies() -> list[StudySpec]:
    """Return Patient A's prior (MONOCHROME1, PA only) and current (PA + lateral) chest X-rays."""
    prior = StudySpec(
        label="cxr-prior",
        modality="DX",
        sop_class=DX_SOP_CLASS,
        date="2024-06-18",
        time="093000",
        description="XR CHEST PA",
        accession="ACC-24-0618",
        instances=[
            InstanceSpec(
                file="dicom/cxr-prior/pa.dcm",
                series_label="pa",
                series_number=1,
                instance_number=1,
                view_position="PA",
                series_description="CHEST PA",
                make=fill_dx(chest_frontal(CXR_ROWS, CXR_COLS, seed=1), monochrome1=True, center=1700, width=3000),
            )
        ],
    )
    current = StudySpec(
        label="cxr-current",
        modality="DX",
        sop_class=DX_SOP_CLASS,
        date="2026-10-14",
        time="141500",
        description="XR CHEST PA AND LATERAL",
        accession="ACC-26-1014",
        instances=[
            InstanceSpec(
                file="dicom/cxr-current/pa.dcm",
                series_label="pa",
                series_number=1,
                instance_number=1,
                view_position="PA",
                series_description="CHEST PA",
                make=fill_dx(
                    chest_frontal(CXR_ROWS, CXR_COLS, seed=2, cardiomegaly=1.2),
                    monochrome1=False,
                    center=1700,
                    width=3000,
                ),
            ),
            InstanceSpec(
                file="dicom/cxr-current/lateral.dcm",
                series_label="lat",
                series_number=2,
                instance_number=1,
                view_position="LL",
                series_description="CHEST LAT",
                make=fill_dx(chest_lateral(CXR_ROWS, CXR_COLS, seed=3), monochrome1=False, center=1700, width=3000),
            ),
        ],
    )
    return [prior, current]


def ct_study() -> StudySpec:
    """Return Patient B's four-slice chest CT (one slice without a VOI window)."""
    return StudySpec(
        label="ct-chest",
        modality="CT",
        sop_class=CT_SOP_CLASS,
        date="2025-11-05",
        time="101000",
        description="CT CHEST WO CONTRAST",
        accession="ACC-25-1105",
        instances=[
            InstanceSpec(
                file=f"dicom/ct-chest/slice-{i + 1}.dcm",
                series_label="axial",
                series_number=1,
                instance_number=i + 1,
                view_position=None,
                series_description="AXIAL 5MM LUNG",
                make=fill_ct(i, with_window=i != 3),
            )
            for i in range(4)
        ],
    )


def write_study(root: Path, b: Builder, study: StudySpec, encounter: str) -> dict[str, Any]:
    """Write a study's DICOM files and ImagingStudy; return its manifest entry."""
    written: list[tuple[InstanceSpec, str, str]] = []
    for inst in study.instances:
        series_uid, sop_uid = write_instance(root / inst.file, b.patient, study, inst)
        written.append((inst, series_uid, sop_uid))
    study_id = imaging_study_resource(b, study, written, encounter)
    return {
        "study_uid": study.uid(b.patient.key),
        "modality": study.modality,
        "imaging_study_id": study_id,
        "started": f"{study.date}T{study.time[:2]}:{study.time[2:4]}:{study.time[4:]}Z",
        "description": study.description,
        "files": [inst.file for inst, _, _ in written],
        "instances": [
            {
                "file": inst.file,
                "series_uid": series_uid,
                "sop_instance_uid": sop_uid,
                "instance_number": inst.instance_number,
                "view_position": inst.view_position,
            }
            for inst, series_uid, sop_uid in written
        ],
    }


def build_cxr(root: Path) -> tuple[Builder, list[dict[str, Any]]]:
    """Build Patient A: heart failure and COPD, with a prior and a current chest X-ray."""
    b = Builder(CXR)
    b.patient_resource()
    enc_pneu = b.encounter(
        "enc-2023-pneumonia",
        "IMP",
        "Inpatient admission",
        "2023-01-09T18:20:00Z",
        "2023-01-14T11:00:00Z",
        coding(SNOMED, "385093006", "Community acquired pneumonia"),
    )
    enc_prior = b.encounter(
        "enc-2024-followup",
        "AMB",
        "Cardiology follow-up",
        "2024-06-18T09:00:00Z",
        "2024-06-18T10:00:00Z",
        coding(SNOMED, "703272007", "Heart failure with reduced ejection fraction"),
    )
    enc_current = b.encounter(
        "enc-2026-dyspnea",
        "EMER",
        "Emergency department visit",
        "2026-10-14T13:40:00Z",
        "2026-10-14T19:10:00Z",
        coding(SNOMED, "267036007", "Dyspnea"),
    )
    b.condition("copd", "13645005", "Chronic obstructive lung disease", "2019-04-02")
    b.condition("hypertension", "38341003", "Hypertensive disorder, systemic arterial", "2019-04-02")
    b.condition("hfref", "703272007", "Heart failure with reduced ejection fraction", "2021-02-17")
    b.condition("afib", "49436004", "Atrial fibrillation", "2022-08-30")
    b.condition(
        "pneumonia-2023",
        "385093006",
        "Community acquired pneumonia",
        "2023-01-09",
        abatement="2023-02-06",
        category="encounter-diagnosis",
        encounter=enc_pneu,
    )
    b.condition(
        "aki-2023",
        "14669001",
        "Acute renal failure syndrome",
        "2023-01-10",
        abatement="2023-01-20",
        category="encounter-diagnosis",
        encounter=enc_pneu,
    )
    vitals: list[tuple[str, float, float, float]] = [  # date, heart rate, SpO2, weight
        ("2021-02-17T10:00:00Z", 96, 93, 88.4),
        ("2023-01-09T18:45:00Z", 118, 86, 86.0),
        ("2024-06-18T09:10:00Z", 74, 95, 84.2),
        ("2026-10-14T13:55:00Z", 108, 89, 91.7),
    ]
    for when, hr, spo2, weight in vitals:
        day = when[:10]
        b.quantity_obs(
            f"hr-{day}",
            "8867-4",
            "Heart rate",
            when,
            hr,
            "/min",
            "/min",
            category="vital-signs",
            low=60,
            high=100,
        )
        b.quantity_obs(
            f"spo2-{day}",
            "59408-5",
            "Oxygen saturation in Arterial blood by Pulse oximetry",
            when,
            spo2,
            "%",
            "%",
            category="vital-signs",
            low=94,
        )
        b.quantity_obs(f"weight-{day}", "29463-7", "Body weight", when, weight, "kg", "kg", category="vital-signs")
    labs: list[tuple[str, float, float, float]] = [  # date, NT-proBNP, creatinine, hemoglobin
        ("2021-02-17T10:30:00Z", 2450, 1.1, 13.9),
        ("2023-01-10T06:00:00Z", 3900, 2.1, 12.8),
        ("2024-06-18T09:20:00Z", 640, 1.3, 13.6),
        ("2026-10-14T14:05:00Z", 5200, 1.6, 12.4),
    ]
    for when, bnp, creat, hgb in labs:
        day = when[:10]
        b.quantity_obs(
            f"ntprobnp-{day}",
            "33762-6",
            "NT-proBNP [Mass/volume] in Serum or Plasma",
            when,
            bnp,
            "pg/mL",
            "pg/mL",
            high=125,
        )
        b.quantity_obs(
            f"creatinine-{day}",
            "2160-0",
            "Creatinine [Mass/volume] in Serum or Plasma",
            when,
            creat,
            "mg/dL",
            "mg/dL",
            low=0.7,
            high=1.3,
        )
        b.quantity_obs(
            f"hgb-{day}",
            "718-7",
            "Hemoglobin [Mass/volume] in Blood",
            when,
            hgb,
            "g/dL",
            "g/dL",
            low=13.5,
            high=17.5,
        )
    b.medication(
        "furosemide",
        "313988",
        "Furosemide 40 MG Oral Tablet",
        "2021-02-17",
        "40 mg by mouth once daily in the morning",
    )
    b.medication(
        "metoprolol",
        "866412",
        "24 HR metoprolol succinate 25 MG Extended Release Oral Tablet",
        "2021-02-17",
        "25 mg by mouth once daily",
    )
    b.medication(
        "lisinopril",
        "314076",
        "lisinopril 10 MG Oral Tablet",
        "2019-04-02",
        "10 mg by mouth once daily",
        status="stopped",
    )
    b.medication(
        "warfarin",
        "855332",
        "Warfarin Sodium 5 MG Oral Tablet",
        "2022-08-30",
        "5 mg by mouth daily, adjust to INR 2-3",
        status="stopped",
    )
    b.medication("apixaban", "1364445", "apixaban 5 MG Oral Tablet", "2024-06-18", "5 mg by mouth twice daily")
    b.medication(
        "albuterol",
        "745679",
        "200 ACTUAT Albuterol 0.09 MG/ACTUAT Metered Dose Inhaler",
        "2019-04-02",
        "2 puffs inhaled every 4-6 hours as needed for wheeze",
    )
    b.allergy(
        "penicillin",
        coding(RXNORM, "70618", "Penicillin"),
        coding(SNOMED, "247472004", "Wheal"),
        "2019-04-02",
        "moderate",
    )
    prior, current = cxr_studies()
    studies = [write_study(root, b, prior, enc_prior), write_study(root, b, current, enc_current)]
    report(
        b,
        "report-cxr-prior",
        "36554-4",
        "XR Chest Single view",
        "2024-06-18T11:00:00Z",
        studies[0]["imaging_study_id"],
        enc_prior,
        "Mild cardiomegaly, stable. Hyperinflated lungs consistent with COPD. No effusion or consolidation.",
        [("8186001", "Cardiomegaly")],
    )
    report(
        b,
        "report-cxr-current",
        "36643-5",
        "XR Chest 2 Views",
        "2026-10-14T15:30:00Z",
        studies[1]["imaging_study_id"],
        enc_current,
        "Enlarged cardiac silhouette, increased from 2024. Small bilateral pleural effusions and "
        "interstitial edema, in keeping with decompensated heart failure.",
        [("8186001", "Cardiomegaly"), ("60046008", "Pleural effusion")],
    )
    b.note(
        "note-2026-ed",
        "2026-10-14T16:00:00Z",
        "ED progress note",
        "67 y/o man with HFrEF (EF 30%), COPD and AF on apixaban presents with 5 days of worsening "
        "dyspnoea, orthopnoea and 3 kg weight gain. SpO2 89% on room air, HR 108 irregular. "
        "Bibasal crackles, pitting oedema to the knees. NT-proBNP 5200. CXR: cardiomegaly, small "
        "bilateral effusions. Plan: IV furosemide, admit to cardiology, daily weights, repeat U&E.",
        enc_current,
    )
    return b, studies


def build_ct(root: Path) -> tuple[Builder, list[dict[str, Any]]]:
    """Build Patient B: former smoker with a lung nodule on surveillance CT."""
    b = Builder(CT)
    b.patient_resource()
    enc_2020 = b.encounter(
        "enc-2020-bronchitis",
        "AMB",
        "Primary care visit",
        "2020-02-11T08:30:00Z",
        "2020-02-11T09:00:00Z",
        coding(SNOMED, "10509002", "Acute bronchitis"),
    )
    enc_ct = b.encounter(
        "enc-2025-ct",
        "AMB",
        "Pulmonology follow-up",
        "2025-11-05T09:45:00Z",
        "2025-11-05T11:30:00Z",
        coding(SNOMED, "427359005", "Solitary nodule of lung"),
    )
    b.condition(
        "acute-bronchitis-2020",
        "10509002",
        "Acute bronchitis",
        "2020-02-11",
        abatement="2020-03-01",
        category="encounter-diagnosis",
        encounter=enc_2020,
    )
    b.condition("hypothyroidism", "40930008", "Hypothyroidism", "2019-06-20")
    b.condition("lung-nodule", "427359005", "Solitary nodule of lung", "2024-05-13")
    b.coded_obs(
        "smoking-2025",
        "72166-2",
        "Tobacco smoking status",
        "2025-11-05T09:50:00Z",
        coding(SNOMED, "8517006", "Ex-smoker"),
    )
    for when, weight, hgb, creat in [
        ("2020-02-11T08:40:00Z", 68.2, 13.1, 0.8),
        ("2024-05-13T10:00:00Z", 66.9, 12.9, 0.9),
        ("2025-11-05T09:50:00Z", 66.1, 11.8, 0.9),
    ]:
        day = when[:10]
        b.quantity_obs(f"weight-{day}", "29463-7", "Body weight", when, weight, "kg", "kg", category="vital-signs")
        b.quantity_obs(
            f"hgb-{day}",
            "718-7",
            "Hemoglobin [Mass/volume] in Blood",
            when,
            hgb,
            "g/dL",
            "g/dL",
            low=12.0,
            high=15.5,
        )
        b.quantity_obs(
            f"creatinine-{day}",
            "2160-0",
            "Creatinine [Mass/volume] in Serum or Plasma",
            when,
            creat,
            "mg/dL",
            "mg/dL",
            low=0.6,
            high=1.1,
        )
    b.medication(
        "levothyroxine",
        "966247",
        "Levothyroxine Sodium 0.075 MG Oral Tablet",
        "2019-06-20",
        "75 micrograms by mouth once daily before breakfast",
    )
    b.medication(
        "azithromycin-2020",
        "308460",
        "Azithromycin 250 MG Oral Tablet",
        "2020-02-11",
        "500 mg on day 1 then 250 mg daily for 4 days",
        status="completed",
    )
    b.allergy(
        "iodinated-contrast",
        coding(SNOMED, "293637006", "Allergy to contrast media"),
        coding(SNOMED, "271807003", "Eruption of skin"),
        "2024-05-13",
        "mild",
    )
    study = ct_study()
    studies = [write_study(root, b, study, enc_ct)]
    report(
        b,
        "report-ct-2024",
        "24627-2",
        "CT Chest",
        "2024-05-13T12:00:00Z",
        None,
        enc_ct,
        "Incidental 6 mm solid nodule in the right upper lobe. Follow-up CT in 12-18 months suggested.",
        [("427359005", "Solitary nodule of lung")],
    )
    report(
        b,
        "report-ct-2025",
        "24627-2",
        "CT Chest",
        "2025-11-05T12:30:00Z",
        studies[0]["imaging_study_id"],
        enc_ct,
        "Right upper lobe solid nodule now 7 mm (6 mm in 2024). No lymphadenopathy. Recommend PET-CT "
        "or 3-month follow-up CT.",
        [("427359005", "Solitary nodule of lung")],
    )
    b.note(
        "note-2025-pulm",
        "2025-11-05T12:45:00Z",
        "Pulmonology clinic note",
        "64 y/o woman, ex-smoker (30 pack-years, quit 2016), seen for RUL nodule surveillance. "
        "Asymptomatic. CT today: nodule 7 mm, previously 6 mm. Contrast allergy (rash) noted. "
        "Plan: PET-CT, discuss at thoracic MDT.",
        enc_ct,
    )
    return b, studies


def build_noimg(root: Path) -> tuple[Builder, list[dict[str, Any]]]:
    """Build Patient C: type 2 diabetes and hypertension, no imaging at all."""
    del root  # no DICOM for this patient
    b = Builder(NOIMG)
    b.patient_resource()
    enc_2019 = b.encounter(
        "enc-2019-annual",
        "AMB",
        "Annual review",
        "2019-09-03T08:00:00Z",
        "2019-09-03T08:30:00Z",
        coding(SNOMED, "44054006", "Diabetes mellitus type 2"),
    )
    enc_2026 = b.encounter(
        "enc-2026-review",
        "AMB",
        "Diabetes review",
        "2026-08-19T10:00:00Z",
        "2026-08-19T10:30:00Z",
        coding(SNOMED, "44054006", "Diabetes mellitus type 2"),
    )
    b.condition("t2dm", "44054006", "Diabetes mellitus type 2", "2019-09-03", encounter=enc_2019)
    b.condition("hypertension", "38341003", "Hypertensive disorder, systemic arterial", "2020-03-15")
    b.condition("hyperlipidemia", "55822004", "Hyperlipidemia", "2020-03-15")
    b.condition(
        "sinusitis-2022",
        "15805002",
        "Acute sinusitis",
        "2022-12-01",
        abatement="2022-12-20",
        category="encounter-diagnosis",
    )
    for when, a1c, sys_bp, dia_bp in [
        ("2019-09-03T08:10:00Z", 8.9, 152, 94),
        ("2020-03-15T09:00:00Z", 7.8, 146, 92),
        ("2022-06-01T09:00:00Z", 7.1, 134, 84),
        ("2024-04-22T09:00:00Z", 6.9, 128, 82),
        ("2026-08-19T10:05:00Z", 7.4, 138, 86),
    ]:
        day = when[:10]
        b.quantity_obs(
            f"hba1c-{day}",
            "4548-4",
            "Hemoglobin A1c/Hemoglobin.total in Blood",
            when,
            a1c,
            "%",
            "%",
            high=5.7,
        )
        b.blood_pressure(f"bp-{day}", when, sys_bp, dia_bp)
    b.quantity_obs(
        "creatinine-2026-08-19",
        "2160-0",
        "Creatinine [Mass/volume] in Serum or Plasma",
        "2026-08-19T10:05:00Z",
        1.0,
        "mg/dL",
        "mg/dL",
        low=0.7,
        high=1.3,
    )
    b.quantity_obs(
        "weight-2026-08-19",
        "29463-7",
        "Body weight",
        "2026-08-19T10:05:00Z",
        97.3,
        "kg",
        "kg",
        category="vital-signs",
    )
    b.medication(
        "metformin",
        "860975",
        "24 HR Metformin hydrochloride 500 MG Extended Release Oral Tablet",
        "2019-09-03",
        "1000 mg by mouth once daily with the evening meal",
    )
    b.medication("lisinopril", "314076", "lisinopril 10 MG Oral Tablet", "2020-03-15", "10 mg by mouth once daily")
    b.medication(
        "atorvastatin",
        "259255",
        "atorvastatin 80 MG Oral Tablet",
        "2020-03-15",
        "40 mg by mouth at night",
        status="stopped",
    )
    b.medication(
        "amoxicillin-2022",
        "308182",
        "Amoxicillin 250 MG Oral Capsule",
        "2022-12-01",
        "500 mg by mouth three times daily for 7 days",
        status="completed",
    )
    b.allergy(
        "sulfonamide",
        coding(SNOMED, "91939003", "Allergy to sulfonamide"),
        coding(SNOMED, "271807003", "Eruption of skin"),
        "2021-05-10",
        "mild",
    )
    b.note(
        "note-2026-review",
        "2026-08-19T10:30:00Z",
        "Diabetes review note",
        "54 y/o man with T2DM and hypertension. HbA1c 7.4% (up from 6.9%). BP 138/86. Statin stopped "
        "2024 for myalgia. No retinopathy at last screen. Plan: reinforce diet, consider SGLT2 inhibitor, "
        "recheck HbA1c in 3 months.",
        enc_2026,
    )
    return b, []


PATIENTS: list[tuple[PatientSpec, Callable[[Path], tuple[Builder, list[dict[str, Any]]]], str]] = [
    (CXR, build_cxr, "Heart failure + COPD; prior (MONOCHROME1) and current (PA + lateral) chest X-rays"),
    (CT, build_ct, "Ex-smoker, lung nodule surveillance; one 4-slice chest CT"),
    (NOIMG, build_noimg, "Type 2 diabetes + hypertension; no imaging"),
]


# --- output ------------------------------------------------------------------------------------


def validate(resource: dict[str, Any]) -> None:
    """Validate one resource with fhir.resources R4B; raise with the resource named on failure."""
    try:
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    except Exception as exc:
        raise SystemExit(f"invalid {resource['resourceType']}/{resource.get('id')}: {exc}") from exc


def bundle_of(b: Builder) -> dict[str, Any]:
    """Return the transaction Bundle that PUTs every resource under its own id."""
    for resource in b.resources:
        validate(resource)
    bundle = {
        "resourceType": "Bundle",
        "id": rid(f"{b.patient.key}/Bundle"),
        "type": "transaction",
        "entry": [
            {
                "fullUrl": f"urn:uuid:{r['id']}",
                "resource": r,
                "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"},
            }
            for r in b.resources
        ],
    }
    validate(bundle)
    return bundle


def dump_json(path: Path, data: Any) -> None:
    """Write JSON with a stable layout."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _count(n: int, noun: str) -> str:
    """Return ``n noun`` with the plural when needed."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def readme(manifest: dict[str, Any]) -> str:
    """Return fixtures/README.md."""
    lines = [
        "# Fixtures",
        "",
        "Synthetic data the project made itself (`tools/make_fixtures.py`); every name, date and value",
        "is invented. Regenerate with:",
        "",
        "```",
        "python tools/make_fixtures.py            # rewrites fixtures/ in place (byte-identical output)",
        "python tools/make_fixtures.py --out DIR  # writes elsewhere",
        "```",
        "",
        "- `fhir/<key>.json`: one FHIR R4 `transaction` Bundle per patient; every entry is a `PUT` to",
        "  `<Type>/<id>` so a server keeps the ids. All ids are uuid5 (Medplum needs UUID ids).",
        "- `dicom/<study>/*.dcm`: DICOM Part 10 files (Explicit VR Little Endian, with preamble and file",
        "  meta); PatientID is the MRN. UIDs match the ImagingStudy resources.",
        "- `manifest.json`: the same facts for code (tests, demo, loaders).",
        "",
        f"MRN system: `{MRN_SYSTEM}`",
        "",
        "| key | name | Patient id | MRN | what they have | studies (StudyInstanceUID) |",
        "|---|---|---|---|---|---|",
    ]
    for p in manifest["patients"]:
        studies = (
            "<br>".join(
                f"{s['started'][:10]} {s['modality']} `{s['study_uid']}` ({_count(len(s['files']), 'file')})"
                for s in p["studies"]
            )
            or "none"
        )
        lines.append(f"| {p['key']} | {p['name']} | `{p['patient_id']}` | {p['mrn']} | {p['summary']} | {studies} |")
    lines += [
        "",
        "Imaging details:",
        "",
        "- cxr prior (2024-06-18): one PA DX, 256x200, 12-bit, MONOCHROME1 (stored inverted).",
        "- cxr current (2026-10-14): PA (series 1) and left lateral `LL` (series 2) DX, MONOCHROME2.",
        "- ct (2025-11-05): four 64x64 signed 16-bit axial slices, RescaleIntercept -1024; slice 4 has no",
        "  WindowCenter/WindowWidth; a small right upper lobe nodule shows on slices 2 and 3.",
        "",
    ]
    return "\n".join(lines)


def generate(out: Path) -> dict[str, Any]:
    """Write every fixture under ``out`` and return the manifest."""
    # Nothing is deleted first: other tools may keep their own files beside these. After a layout
    # change, remove the old fixtures/fhir and fixtures/dicom by hand.
    patients = []
    for spec, build, summary in PATIENTS:
        b, studies = build(out)
        bundle_file = f"fhir/{spec.key}.json"
        dump_json(out / bundle_file, bundle_of(b))
        patients.append(
            {
                "key": spec.key,
                "patient_id": spec.id,
                "name": f"{spec.given} {spec.family}",
                "birth_date": spec.birth_date,
                "gender": spec.gender,
                "mrn": spec.mrn,
                "mrn_system": MRN_SYSTEM,
                "bundle": bundle_file,
                "summary": summary,
                "studies": studies,
            }
        )
    manifest = {"generator": "tools/make_fixtures.py", "patients": patients}
    dump_json(out / "manifest.json", manifest)
    (out / "README.md").write_text(readme(manifest), encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and write the fixtures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent.parent / "fixtures",
        help="output folder (default: the repository's fixtures/)",
    )
    args = parser.parse_args(argv)
    manifest = generate(args.out)
    n_files = sum(len(s["files"]) for p in manifest["patients"] for s in p["studies"])
    print(f"wrote {len(manifest['patients'])} bundles and {n_files} DICOM files to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
