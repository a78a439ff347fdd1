"""Tell which DICOM study a FHIR ImagingStudy names: its Study Instance UID, or the UIDs to find it by.

Where it sits: before the imaging step (or the similar-case ingest) can ask a
:class:`~agent.sources.protocols.DicomSource` for a study's instances it needs the study's
DICOM UID. Servers write it in different ways, all read here:

- ``identifier`` ``{"system": "urn:dicom:uid", "value": "urn:oid:1.2.3"}`` (the R4 spec's form);
- ``{"system": "urn:ietf:rfc:3986", "value": "urn:oid:1.2.3"}`` (Synthea and others: an OID is a URI);
- ``{"value": "urn:oid:1.2.3"}`` with no system;
- ``{"system": "urn:dicom:uid", "value": "1.2.3"}`` (the bare UID).

When no identifier carries one, the study is still findable through the UIDs it lists
(``series[].uid``, ``series[].instance[].uid``): :func:`agent.sources.study_location.locate_study_uid`
asks the source which study holds them. Pure: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

from agent.errors import SourceUnavailableError

DICOM_UID_SYSTEM: Final = "urn:dicom:uid"
URI_SYSTEM: Final = "urn:ietf:rfc:3986"
OID_PREFIX: Final = "urn:oid:"
#: Systems under which an ``urn:oid:`` value is read as the Study Instance UID (None: no system).
OID_SYSTEMS: Final = (DICOM_UID_SYSTEM, URI_SYSTEM, None)
#: identifier.type code of an accession number (v2 table 0203): never a study UID, whatever its value.
ACCESSION_TYPE: Final = "ACSN"

# A DICOM UID (PS3.5 9.1): dot-separated digit groups, at most 64 characters. Checked because the
# UID goes into DICOMweb URL paths and queries, and it comes from a record, which is data.
_UID: Final = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_MAX_UID_LENGTH: Final = 64


@dataclass(frozen=True)
class StudyIdentity:
    """What an ImagingStudy says about which DICOM study it is.

    Attributes:
        reference: ``ImagingStudy/<id>``, how messages and the trace name the study.
        study_uid: the Study Instance UID from an identifier; None when none carries one.
        series_uids: the series UIDs it lists, in order, without repeats.
        instance_uids: the SOP Instance UIDs it lists, in order, without repeats.
    """

    reference: str
    study_uid: str | None
    series_uids: tuple[str, ...] = ()
    instance_uids: tuple[str, ...] = ()

    @property
    def locatable(self) -> bool:
        """Return whether there is any UID to find the study by."""
        return bool(self.study_uid or self.series_uids or self.instance_uids)


def dicom_uid(value: Any) -> str | None:
    """Return the DICOM UID a value holds, bare or as ``urn:oid:<uid>``; None when it is not one."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    if text[: len(OID_PREFIX)].lower() == OID_PREFIX:
        text = text[len(OID_PREFIX) :]
    if not text or len(text) > _MAX_UID_LENGTH or not _UID.match(text):
        return None
    return text


def _is_accession(identifier: dict[str, Any]) -> bool:
    kind = identifier.get("type")
    codings = kind.get("coding") if isinstance(kind, dict) else None
    return any(isinstance(c, dict) and c.get("code") == ACCESSION_TYPE for c in codings or [])


def identifier_study_uid(imaging_study: dict[str, Any]) -> str | None:
    """Return the Study Instance UID an ImagingStudy's identifiers carry, or None.

    An ``urn:oid:`` value counts under ``urn:dicom:uid``, ``urn:ietf:rfc:3986`` or no system; a
    bare UID only under ``urn:dicom:uid`` (elsewhere digits and dots may be an accession or
    order number). ``urn:dicom:uid`` identifiers win over the others, then the first in order.
    """
    found: list[tuple[int, str]] = []
    for identifier in imaging_study.get("identifier") or []:
        if not isinstance(identifier, dict) or _is_accession(identifier):
            continue
        system, value = identifier.get("system"), identifier.get("value")
        if not isinstance(value, str):
            continue
        is_oid = value.strip()[: len(OID_PREFIX)].lower() == OID_PREFIX
        if (is_oid and system in OID_SYSTEMS) or system == DICOM_UID_SYSTEM:
            uid = dicom_uid(value)
            if uid is not None:
                found.append((0 if system == DICOM_UID_SYSTEM else 1, uid))
    return min(found, key=lambda item: item[0])[1] if found else None


def _unique(values: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(values))


def study_identity(imaging_study: dict[str, Any]) -> StudyIdentity:
    """Return everything an ImagingStudy says about which DICOM study it is (see :class:`StudyIdentity`)."""
    series_uids: list[str] = []
    instance_uids: list[str] = []
    for series in imaging_study.get("series") or []:
        if not isinstance(series, dict):
            continue
        if (uid := dicom_uid(series.get("uid"))) is not None:
            series_uids.append(uid)
        for instance in series.get("instance") or []:
            if isinstance(instance, dict) and (uid := dicom_uid(instance.get("uid"))) is not None:
                instance_uids.append(uid)
    return StudyIdentity(
        reference=f"ImagingStudy/{imaging_study.get('id')}",
        study_uid=identifier_study_uid(imaging_study),
        series_uids=_unique(series_uids),
        instance_uids=_unique(instance_uids),
    )


def study_instance_uid(imaging_study: dict[str, Any]) -> str:
    """Return the Study Instance UID an ImagingStudy's identifiers carry (see :func:`identifier_study_uid`).

    For callers that cannot look a study up by its series or instances; the imaging step uses
    :func:`study_identity` and locates the others.

    Raises:
        SourceUnavailableError: no identifier carries a usable study UID.
    """
    uid = identifier_study_uid(imaging_study)
    if uid is None:
        raise SourceUnavailableError(
            f"ImagingStudy/{imaging_study.get('id')} has no DICOM study UID (an identifier with an "
            f"urn:oid: value, or a UID under system {DICOM_UID_SYSTEM})"
        )
    return uid
