"""Find where an ImagingStudy's images live: its own DICOMweb Endpoint, or the configured source.

Where it sits: the imaging step has the newest ImagingStudy of the patient (FHIR) and needs a
:class:`~agent.sources.protocols.DicomSource` that holds that study. A FHIR ImagingStudy may name
the server itself (``ImagingStudy.endpoint``, or ``series[].endpoint``) as an Endpoint resource
with connection type ``dicom-wado-rs`` and the DICOMweb root in ``address``: that is common when
a hospital's FHIR server fronts several archives. Without a usable Endpoint the configured source
(``settings.dicom``) is used.

Which study: :func:`locate_study_uid` turns an ImagingStudy's identity
(:mod:`agent.sources.study_identity`) into a Study Instance UID the source holds, asking the
source for the study of a listed series or instance when no identifier names the study.

Credentials: the configured DICOMweb user, password or bearer token go only to the configured
server's origin (scheme, host and port). An Endpoint elsewhere is contacted without credentials,
so a record cannot make medagent hand its PACS password to another host; Endpoint ``header``
values are ignored for the same reason (a record must not choose what is sent).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any, Final, NamedTuple
from urllib.parse import urlsplit

from agent.config import DicomSettings
from agent.domain.events import AccessObserver
from agent.errors import MedagentError
from agent.sources.dicomweb import DicomWebSource
from agent.sources.http_auth import client_kwargs
from agent.sources.protocols import DicomSource, FhirSource
from agent.sources.study_identity import StudyIdentity

log = logging.getLogger(__name__)

ENDPOINT_CONNECTION_TYPE_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
WADO_RS: Final = "dicom-wado-rs"
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
#: Most series, then instances, asked about when locating a study by its contents: a study's
#: first few listed UIDs either are in the source or the study is not, and an ImagingStudy can
#: list thousands of instances (a request each).
MAX_LOCATE_LOOKUPS: Final = 3


class LocatedStudy(NamedTuple):
    """A Study Instance UID and how it was found (``identifier``, ``series <uid>``, ``instance <uid>``)."""

    study_uid: str
    via: str


async def locate_study_uid(
    source: DicomSource, identity: StudyIdentity, *, max_lookups: int = MAX_LOCATE_LOOKUPS
) -> LocatedStudy | None:
    """Return the Study Instance UID of an ImagingStudy, asking the source when no identifier gives it.

    An identifier's UID is taken as is (whether the source holds it shows when its instances are
    listed). Otherwise the listed series are looked up, then the listed instances, at most
    ``max_lookups`` of each, stopping at the first found.

    Returns:
        The UID and how it was found, or None when nothing names it or the source holds none of
        the listed series and instances.

    Raises:
        SourceUnavailableError: the source is unreachable or answered an error.
        InvalidResourceError: the source's answer is not what the protocol promises.
    """
    if identity.study_uid is not None:
        return LocatedStudy(identity.study_uid, "identifier")
    for series_uid in identity.series_uids[:max_lookups]:
        found = await source.find_study_uid(series_uid=series_uid)
        if found is not None:
            return LocatedStudy(found, f"series {series_uid}")
    for sop_uid in identity.instance_uids[:max_lookups]:
        found = await source.find_study_uid(sop_instance_uid=sop_uid)
        if found is not None:
            return LocatedStudy(found, f"instance {sop_uid}")
    return None


def origin(url: str) -> tuple[str, str, int] | None:
    """Return the (scheme, host, port) origin of an http(s) URL, ports made explicit; None if not one.

    URLs with user info (``user:pass@host``) are refused: httpx would send it as basic auth.
    """
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname or parts.username is not None or parts.password is not None:
        return None
    return scheme, parts.hostname.lower(), port if port is not None else _DEFAULT_PORTS[scheme]


def _codings(connection_type: Any) -> Iterator[dict[str, Any]]:
    """Yield the Codings of ``Endpoint.connectionType``: a Coding in R4, CodeableConcepts in R5."""
    items = connection_type if isinstance(connection_type, list) else [connection_type]
    for item in items:
        if not isinstance(item, dict):
            continue
        if "coding" in item:
            yield from (c for c in item.get("coding") or [] if isinstance(c, dict))
        else:
            yield item


def wado_rs_address(endpoint: dict[str, Any]) -> str | None:
    """Return the DICOMweb root of an Endpoint resource, or None when it is not a usable WADO-RS endpoint.

    Usable: ``resourceType`` Endpoint, ``status`` active (or absent), a ``connectionType`` coding
    ``dicom-wado-rs`` (system absent or the HL7 endpoint-connection-type system) and an http(s)
    ``address`` without user info, query or fragment.
    """
    if endpoint.get("resourceType") != "Endpoint":
        return None
    if endpoint.get("status", "active") != "active":
        return None
    if not any(
        c.get("code") == WADO_RS and c.get("system") in (None, ENDPOINT_CONNECTION_TYPE_SYSTEM)
        for c in _codings(endpoint.get("connectionType"))
    ):
        return None
    address = endpoint.get("address")
    if not isinstance(address, str) or origin(address) is None:
        return None
    parts = urlsplit(address.strip())
    if parts.query or parts.fragment:
        return None
    return address.strip().rstrip("/")


def _endpoint_references(imaging_study: dict[str, Any]) -> list[str]:
    """Return the study's Endpoint references, study level first, then each series', without repeats."""
    found: list[str] = []
    holders = [imaging_study, *(s for s in imaging_study.get("series") or [] if isinstance(s, dict))]
    for holder in holders:
        for reference in holder.get("endpoint") or []:
            value = reference.get("reference") if isinstance(reference, dict) else None
            if isinstance(value, str) and value and value not in found:
                found.append(value)
    return found


async def _resolve(reference: str, imaging_study: dict[str, Any], fhir: FhirSource | None) -> dict[str, Any] | None:
    """Return the Endpoint a reference points at: contained, or read from the FHIR source; None if unresolvable."""
    if reference.startswith("#"):
        wanted = reference[1:]
        for resource in imaging_study.get("contained") or []:
            if (
                isinstance(resource, dict)
                and resource.get("resourceType") == "Endpoint"
                and resource.get("id") == wanted
            ):
                return resource
        log.warning("ImagingStudy endpoint %s: no contained Endpoint with that id", reference)
        return None
    path = reference
    base = getattr(fhir, "base_url", None)
    if "://" in reference:
        # Only absolute references into the configured FHIR server are followed: reading from
        # a server the record names would be a request the configuration never allowed.
        if not isinstance(base, str) or not reference.startswith(base.rstrip("/") + "/"):
            log.warning("ImagingStudy endpoint reference on another FHIR server is not followed")
            return None
        path = reference[len(base.rstrip("/")) + 1 :]
    segments = path.split("/")
    if len(segments) not in (2, 4) or segments[0] != "Endpoint" or not segments[1]:
        log.warning("ImagingStudy endpoint reference is not Endpoint/<id>: ignored")
        return None
    if fhir is None:
        log.warning("ImagingStudy endpoint %s cannot be read: no FHIR source given", path)
        return None
    try:
        return await fhir.read("Endpoint", segments[1])
    except MedagentError as exc:
        # The read is in the trace (the FHIR source records it); the configured server is tried.
        log.warning(
            "ImagingStudy endpoint %s could not be read (%s): using the configured DICOM source", path, exc.code
        )
        return None


def _same_root(a: str, b: str) -> bool:
    """Return whether two DICOMweb roots are the same: same origin and same path (trailing slash aside)."""
    return origin(a) == origin(b) and urlsplit(a).path.rstrip("/") == urlsplit(b).path.rstrip("/")


def allowed_origin(address: str, settings: DicomSettings) -> bool:
    """Return whether an Endpoint address may be contacted: the configured server's origin or an allowed one.

    Endpoint addresses come from the patient record, which is data, not configuration: without
    this check a record could make the agent send requests to any host it names.
    """
    target = origin(address)
    if target is None:
        return False
    allowed = {origin(url) for url in [*settings.endpoint_allowed_origins, settings.dicomweb_url or ""]}
    return target in allowed


def _source_for(
    address: str, default: DicomSource, settings: DicomSettings, observer: AccessObserver
) -> DicomSource | None:
    if isinstance(default, DicomWebSource) and _same_root(default.base_url, address):
        return default
    if not allowed_origin(address, settings):
        log.warning("ImagingStudy endpoint on an origin not in dicom.endpoint_allowed_origins: ignored")
        return None
    configured = origin(settings.dicomweb_url) if settings.dicomweb_url else None
    if configured is not None and configured == origin(address):
        log.info("ImagingStudy endpoint on the configured DICOMweb origin: using the configured credentials")
        return DicomWebSource(address, observer=observer, **client_kwargs(settings))
    log.info("ImagingStudy endpoint on another allowed origin: contacted without credentials")
    return DicomWebSource(address, observer=observer, timeout_s=settings.timeout_s)


async def dicom_source_for_study(
    imaging_study: dict[str, Any],
    default: DicomSource,
    settings: DicomSettings,
    observer: AccessObserver,
    *,
    fhir: FhirSource | None = None,
) -> DicomSource:
    """Return the DICOM source that holds an ImagingStudy's images.

    The first usable ``dicom-wado-rs`` Endpoint (study level, then series level; contained, or
    read through ``fhir``) on an allowed origin (the configured server's, or one listed in
    ``endpoint_allowed_origins``) gives a :class:`DicomWebSource` for its address, with the
    configured credentials only when it shares the configured server's origin. An Endpoint at the very
    address of ``default`` gives ``default`` itself. Unusable or unreadable Endpoints are skipped
    (logged without patient data); with none left, ``default`` is returned.

    Args:
        imaging_study: the FHIR ImagingStudy (raw JSON).
        default: the run's configured DICOM source.
        settings: the ``dicom`` settings group (configured URL, credentials, timeout).
        observer: receives the new source's accesses, like the default's.
        fhir: resolves ``Endpoint/<id>`` references; without it only contained Endpoints count.

    Returns:
        ``default``, or a new source that the caller must close (``aclose``) when done;
        :func:`open_dicom_source_for_study` does that.
    """
    for reference in _endpoint_references(imaging_study):
        endpoint = await _resolve(reference, imaging_study, fhir)
        address = wado_rs_address(endpoint) if endpoint is not None else None
        if address is None:
            if endpoint is not None:
                log.warning("ImagingStudy endpoint %s is not an active dicom-wado-rs Endpoint: ignored", reference)
            continue
        source = _source_for(address, default, settings, observer)
        if source is not None:
            return source
    return default


@asynccontextmanager
async def open_dicom_source_for_study(
    imaging_study: dict[str, Any],
    default: DicomSource,
    settings: DicomSettings,
    observer: AccessObserver,
    *,
    fhir: FhirSource | None = None,
) -> AsyncIterator[DicomSource]:
    """Yield :func:`dicom_source_for_study`'s source and close it afterwards unless it is ``default``."""
    source = await dicom_source_for_study(imaging_study, default, settings, observer, fhir=fhir)
    try:
        yield source
    finally:
        if source is not default:
            await source.aclose()
