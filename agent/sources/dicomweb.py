"""DICOMweb (QIDO-RS + WADO-RS): the server implementation of :class:`~agent.sources.protocols.DicomSource`.

Where it sits: after the history step has found a patient's ImagingStudy resources, the graph
asks the DICOM source for each study's instances (:meth:`DicomWebSource.list_instances`, QIDO-RS)
and fetches the few it will show the models (:meth:`DicomWebSource.retrieve`, WADO-RS); pixel
preparation (``agent/sources/pixels.py``) then turns the datasets into images. Studies can also
be found without a FHIR record (:meth:`DicomWebSource.search_studies`), and headers or single
frames fetched without whole instances (:meth:`DicomWebSource.retrieve_metadata`,
:meth:`DicomWebSource.retrieve_frames`), which matters for large multi-frame objects.
:func:`agent.sources.factory.make_dicom_source` builds this source when
``settings.dicom.dicomweb_url`` is set (Orthanc, Google/Azure DICOM services, dcm4chee).

Every HTTP request, including failed ones, is reported to the run's observer as a
:class:`~agent.domain.events.DicomRetrievalEvent`. Error messages name the server and the UIDs,
never patient data.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from email.message import Message
from io import BytesIO
from typing import Any, NoReturn
from urllib.parse import urlsplit

import httpx
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from agent.config import DicomSettings
from agent.domain.events import AccessObserver, DicomRetrievalEvent
from agent.domain.refs import InstanceRef, StudyRef
from agent.errors import InvalidResourceError, SourceUnavailableError, StudyNotFoundError
from agent.sources.http_auth import client_kwargs, http_auth
from agent.sources.http_clients import async_client, loads_json

DICOM_JSON = "application/dicom+json"
#: WADO-RS instance retrieval in whatever transfer syntax the server stored (no transcoding).
ACCEPT_DICOM_ANY_SYNTAX = 'multipart/related; type="application/dicom"; transfer-syntax=*'
#: WADO-RS frames: with no transfer-syntax parameter the standard (PS3.18 8.7.3.5.2) makes the
#: server send uncompressed Explicit VR Little Endian, transcoding when it stored something else.
#: Orthanc refuses frame requests whose Accept does not name this media type.
ACCEPT_FRAMES = 'multipart/related; type="application/octet-stream"'
#: ``transfer_syntax`` value asking for frames as stored (compressed bytes when stored compressed).
AS_STORED = "*"
#: Pixel data in these syntaxes is plain little- or big-endian values, one frame after another.
UNCOMPRESSED_SYNTAXES = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"})
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"

# DICOM attribute tags as QIDO-RS JSON keys.
TAG_MODALITY = "00080060"
TAG_SOP_INSTANCE_UID = "00080018"
TAG_VIEW_POSITION = "00185101"
TAG_STUDY_UID = "0020000D"
TAG_SERIES_UID = "0020000E"
TAG_INSTANCE_NUMBER = "00200013"
TAG_TRANSFER_SYNTAX_UID = "00020010"
TAG_SERIES_DESCRIPTION = "0008103E"
TAG_STUDY_DATE = "00080020"
TAG_MODALITIES_IN_STUDY = "00080061"
TAG_STUDY_DESCRIPTION = "00081030"
TAG_PATIENT_ID = "00100020"
TAG_NUMBER_OF_STUDY_RELATED_INSTANCES = "00201208"

_INCLUDE_FIELDS = (TAG_MODALITY, TAG_VIEW_POSITION, TAG_INSTANCE_NUMBER, TAG_SERIES_DESCRIPTION)
#: Asked for explicitly: StudyDescription is not among QIDO-RS's default study attributes, and
#: servers differ on the others.
_STUDY_INCLUDE_FIELDS = (
    TAG_STUDY_DESCRIPTION,
    TAG_MODALITIES_IN_STUDY,
    TAG_NUMBER_OF_STUDY_RELATED_INSTANCES,
    TAG_STUDY_DATE,
)

# UIDs go into URL paths: anything but digits and dots could rewrite the request.
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
# A modality is a DICOM code string (CS): upper-case letters, digits, space and underscore.
_MODALITY = re.compile(r"^[A-Z0-9_ ]{1,16}$")
# QIDO-RS matching treats these as wildcards (``*``, ``?``) or value separators (``,``, ``\``);
# a patient ID holding one would match other patients' studies.
_QIDO_SPECIAL = frozenset("*?,\\")


@dataclass(frozen=True)
class MultipartPart:
    """One body part of a ``multipart/related`` message: lower-cased headers and raw content."""

    headers: dict[str, str]
    content: bytes

    @property
    def content_type(self) -> str:
        """Return the part's Content-Type header ("" when absent)."""
        return self.headers.get("content-type", "")


def _content_type_params(content_type: str) -> tuple[str, dict[str, str]]:
    """Split a Content-Type into its lower-cased media type and parameters (quotes removed)."""
    message = Message()
    message["content-type"] = content_type
    media_type = message.get_content_type()
    params: dict[str, str] = {}
    for key, value in (message.get_params(header="content-type") or [])[1:]:
        params[key.lower()] = value if isinstance(value, str) else str(value)
    return media_type, params


def parse_multipart_related(body: bytes, content_type: str) -> list[MultipartPart]:
    """Split a ``multipart/related`` body into its parts (RFC 2046 section 5.1.1).

    The boundary comes from the Content-Type, quoted or not. A preamble before the first
    delimiter and an epilogue after the closing one are ignored; transport padding (spaces and
    tabs) after a delimiter is allowed.

    Args:
        body: the whole HTTP response body.
        content_type: the response's Content-Type header.

    Raises:
        InvalidResourceError: not multipart, no boundary, or the body does not follow it.
    """
    media_type, params = _content_type_params(content_type)
    if not media_type.startswith("multipart/"):
        raise InvalidResourceError(f"expected a multipart response, got {media_type!r}")
    boundary = params.get("boundary")
    if not boundary:
        raise InvalidResourceError("multipart response has no boundary parameter")
    delimiter = b"--" + boundary.encode("ascii", errors="strict")

    if body.startswith(delimiter):
        position = len(delimiter)
    else:
        start = body.find(b"\r\n" + delimiter)
        if start < 0:
            raise InvalidResourceError("multipart response does not contain its boundary")
        position = start + 2 + len(delimiter)

    parts: list[MultipartPart] = []
    while True:
        if body.startswith(b"--", position):
            return parts
        line_end = body.find(b"\r\n", position)
        if line_end < 0 or body[position:line_end].strip(b" \t"):
            raise InvalidResourceError("multipart response has a malformed boundary line")
        part_start = line_end + 2
        part_end = _find_delimiter(body, delimiter, part_start)
        parts.append(_parse_part(body[part_start:part_end]))
        position = part_end + 2 + len(delimiter)


def _find_delimiter(body: bytes, delimiter: bytes, start: int) -> int:
    """Return the index of the CRLF that opens the next delimiter line at or after ``start``.

    A match counts only when the delimiter ends its line (optional spaces/tabs, then CRLF) or
    closes the message (``--``); RFC 2046 forbids the delimiter as a line prefix inside a part,
    but checking keeps a sloppy sender's content intact.
    """
    marker = b"\r\n" + delimiter
    search_from = start
    while True:
        found = body.find(marker, search_from)
        if found < 0:
            raise InvalidResourceError("multipart response is truncated (no closing boundary)")
        after = found + len(marker)
        rest = body[after : after + 2]
        if rest == b"--" or rest == b"\r\n" or after == len(body) or rest[:1] in (b" ", b"\t"):
            return found
        search_from = after


def _parse_part(raw: bytes) -> MultipartPart:
    if raw.startswith(b"\r\n"):
        # A part with no headers: defaults to text/plain per RFC 2046, content follows at once.
        return MultipartPart({}, raw[2:])
    header_end = raw.find(b"\r\n\r\n")
    if header_end < 0:
        raise InvalidResourceError("multipart body part has no header/content separator")
    headers: dict[str, str] = {}
    for line in raw[:header_end].decode("latin-1").split("\r\n"):
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return MultipartPart(headers, raw[header_end + 4 :])


def _first_value(item: dict[str, Any], tag: str) -> Any:
    element = item.get(tag)
    if not isinstance(element, dict):
        return None
    values = element.get("Value")
    if not isinstance(values, list) or not values:
        return None
    return values[0]


def _all_values(item: dict[str, Any], tag: str) -> list[Any]:
    element = item.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return [v for v in values if v is not None] if isinstance(values, list) else []


def _as_int(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _as_text(value: Any) -> str | None:
    text = str(value).strip() if value is not None else ""
    return text or None


@dataclass(frozen=True)
class Frame:
    """One frame from WADO-RS Retrieve Frames: its number (1-based), bytes and how they are encoded.

    ``transfer_syntax`` is what the server declared for the part (or for the whole answer), else
    what was asked for; None when frames were asked for as stored and the server did not say.
    """

    number: int
    content: bytes
    media_type: str
    transfer_syntax: str | None


class DicomWebSource:
    """Find and fetch DICOM instances over QIDO-RS and WADO-RS with an async httpx client.

    Args:
        base_url: the DICOMweb root, e.g. ``http://127.0.0.1:8042/dicom-web``.
        observer: receives one event per HTTP request.
        timeout_s: per-request timeout.
        username: HTTP basic auth user (with ``password``).
        password: HTTP basic auth password.
        bearer_token: sent as ``Authorization: Bearer ...``; wins over basic auth.
        client: an existing client to use; not closed by :meth:`aclose`.
    """

    backend = "dicomweb"

    def __init__(
        self,
        base_url: str,
        *,
        observer: AccessObserver,
        timeout_s: float = 30,
        username: str | None = None,
        password: str | None = None,
        bearer_token: str | None = None,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        # Scheme, host and port only, for the trace: enough to tell servers apart, never user info.
        split = urlsplit(self.base_url)
        self._origin = f"{split.scheme}://{split.hostname}" + (f":{split.port}" if split.port else "")
        self._observer = observer
        self._timeout_s = timeout_s
        self._headers, self._auth = http_auth(username, password, bearer_token)
        self._owns_client = client is None
        self._client = client or async_client(timeout=httpx.Timeout(timeout_s))

    @classmethod
    def from_settings(cls, settings: DicomSettings, observer: AccessObserver) -> DicomWebSource:
        """Build a source from the ``dicom`` settings group.

        Raises:
            ValueError: when ``settings.dicomweb_url`` is not set.
        """
        if not settings.dicomweb_url:
            raise ValueError("DicomSettings.dicomweb_url is not set")
        return cls(settings.dicomweb_url, observer=observer, **client_kwargs(settings))

    async def __aenter__(self) -> DicomWebSource:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP client when this source created it."""
        if self._owns_client:
            await self._client.aclose()

    async def search_studies(
        self,
        *,
        patient_id: str | None = None,
        study_uid: str | None = None,
        modality: str | None = None,
        limit: int | None = None,
    ) -> list[StudyRef]:
        """Return the studies matching every given filter, via QIDO-RS ``/studies``.

        Filters are exact: a patient ID containing QIDO-RS wildcard or list characters is refused
        rather than sent, because the server would match other patients' studies with it.
        ``modality`` matches ModalitiesInStudy (any series of that modality). No match is an empty
        list, not an error.

        Raises:
            SourceUnavailableError: server unreachable, authentication failed or an error answer.
            InvalidResourceError: a malformed filter, or the answer is not DICOM JSON.
            ValueError: ``limit`` below 1.
        """
        params: list[tuple[str, str]] = []
        if patient_id is not None:
            if not patient_id.strip() or _QIDO_SPECIAL.intersection(patient_id):
                # The ID itself stays out of the message: it identifies a patient.
                raise InvalidResourceError(
                    "patient ID is empty or contains QIDO-RS wildcard or list characters (* ? , \\); "
                    "it cannot be searched exactly"
                )
            params.append((TAG_PATIENT_ID, patient_id))
        if study_uid is not None:
            _check_uid(study_uid, "study")
            params.append((TAG_STUDY_UID, study_uid))
        if modality is not None:
            code = modality.strip().upper()
            if not _MODALITY.match(code):
                raise InvalidResourceError(f"not a DICOM modality code: {modality[:20]!r}")
            params.append((TAG_MODALITIES_IN_STUDY, code))
        if limit is not None:
            if limit < 1:
                raise ValueError("limit must be at least 1")
            params.append(("limit", str(limit)))
        params += [("includefield", tag) for tag in _STUDY_INCLUDE_FIELDS]

        event = _EventDraft("search", study_uid, None, None)
        items = await self._qido(f"{self.base_url}/studies", params, event, empty_means=None)
        studies: list[StudyRef] = []
        for item in items:
            uid = _first_value(item, TAG_STUDY_UID)
            if not isinstance(uid, str):
                self._fail(
                    event,
                    200,
                    InvalidResourceError(f"DICOMweb server {self.base_url} returned a study without StudyInstanceUID"),
                )
            studies.append(
                StudyRef(
                    study_uid=uid,
                    patient_id=_as_text(_first_value(item, TAG_PATIENT_ID)),
                    modalities=tuple(str(m) for m in _all_values(item, TAG_MODALITIES_IN_STUDY)),
                    study_date=_as_text(_first_value(item, TAG_STUDY_DATE)),
                    description=_as_text(_first_value(item, TAG_STUDY_DESCRIPTION)),
                    number_of_instances=_as_int(_first_value(item, TAG_NUMBER_OF_STUDY_RELATED_INSTANCES)),
                )
            )
        # Some servers ignore ``limit``; the caller asked for at most that many.
        return studies[:limit] if limit is not None else studies

    async def list_instances(self, study_uid: str) -> list[InstanceRef]:
        """Return the instances of a study, ordered by series then instance number.

        Modality, ViewPosition, InstanceNumber and SeriesDescription are requested with
        ``includefield``. A server that leaves Modality out of the instance-level answer does not
        return series attributes there, so Modality and SeriesDescription then come from one
        series-level query (where QIDO-RS returns both by default). Series metadata (WADO-RS)
        would carry the same attributes but costs a full header per instance, so it is not used.

        Raises:
            StudyNotFoundError: the study is not found (404, 204 or an empty list).
            SourceUnavailableError: server unreachable, authentication failed or an error answer.
            InvalidResourceError: the UID is malformed or the answer is not DICOM JSON.
        """
        _check_uid(study_uid, "study")
        params = [("includefield", tag) for tag in _INCLUDE_FIELDS]
        url = f"{self.base_url}/studies/{study_uid}/instances"
        event = _EventDraft("search", study_uid, None, None)
        items = await self._qido(url, params, event, empty_means=f"study {study_uid}", not_found=StudyNotFoundError)

        refs: list[InstanceRef] = []
        for item in items:
            series_uid = _first_value(item, TAG_SERIES_UID)
            sop_uid = _first_value(item, TAG_SOP_INSTANCE_UID)
            if not isinstance(series_uid, str) or not isinstance(sop_uid, str):
                raise InvalidResourceError(
                    f"DICOMweb server {self.base_url} returned an instance without series or SOP UID"
                )
            refs.append(
                InstanceRef(
                    study_uid=study_uid,
                    series_uid=series_uid,
                    sop_instance_uid=sop_uid,
                    modality=_as_text(_first_value(item, TAG_MODALITY)),
                    view_position=_as_text(_first_value(item, TAG_VIEW_POSITION)),
                    instance_number=_as_int(_first_value(item, TAG_INSTANCE_NUMBER)),
                    series_description=_as_text(_first_value(item, TAG_SERIES_DESCRIPTION)),
                )
            )

        if any(ref.modality is None for ref in refs):
            series = await self._series_attributes(study_uid)
            refs = [
                ref
                if ref.modality is not None
                else ref.model_copy(
                    update={
                        "modality": series.get(ref.series_uid, (None, None))[0],
                        "series_description": ref.series_description or series.get(ref.series_uid, (None, None))[1],
                    }
                )
                for ref in refs
            ]
        refs.sort(key=lambda r: (r.series_uid, r.instance_number is None, r.instance_number or 0))
        return refs

    async def find_study_uid(self, *, series_uid: str | None = None, sop_instance_uid: str | None = None) -> str | None:
        """Return the StudyInstanceUID of the study holding a series or an instance (exactly one given).

        One QIDO-RS search across all studies: ``/series?SeriesInstanceUID=...`` or
        ``/instances?SOPInstanceUID=...``, asking for StudyInstanceUID (0020000D) explicitly, since
        servers differ on which study attributes a series- or instance-level answer carries.

        Returns:
            The study's UID, or None when nothing matches.

        Raises:
            ValueError: not exactly one of ``series_uid`` and ``sop_instance_uid`` is given.
            SourceUnavailableError: server unreachable, authentication failed or an error answer.
            InvalidResourceError: a malformed UID, or the answer is not DICOM JSON.
        """
        if (series_uid is None) == (sop_instance_uid is None):
            raise ValueError("give exactly one of series_uid and sop_instance_uid")
        if series_uid is not None:
            _check_uid(series_uid, "series")
            url, params = f"{self.base_url}/series", [(TAG_SERIES_UID, series_uid)]
        else:
            assert sop_instance_uid is not None
            _check_uid(sop_instance_uid, "instance")
            url, params = f"{self.base_url}/instances", [(TAG_SOP_INSTANCE_UID, sop_instance_uid)]
        params.append(("includefield", TAG_STUDY_UID))
        event = _EventDraft("search", None, series_uid, sop_instance_uid)
        items = await self._qido(url, params, event, empty_means=None)
        for item in items:
            uid = _first_value(item, TAG_STUDY_UID)
            # The answer goes into later URL paths: a malformed UID is skipped, not followed.
            if isinstance(uid, str) and _UID.match(uid) and len(uid) <= 64:
                return uid
        return None

    async def retrieve(self, ref: InstanceRef) -> Dataset:
        """Return one instance as stored (pixel data not decoded), via WADO-RS.

        Pixel data is not checked here: an instance whose pixels are truncated or in a syntax
        nothing here decodes still comes back, and pixel preparation raises
        :class:`~agent.errors.DicomDecodeError` for it alone.

        Raises:
            SourceUnavailableError: server unreachable, authentication failed, an error answer, or
                the instance is not found (the message names its three UIDs).
            InvalidResourceError: the answer is not a DICOM instance, or is a different instance.
        """
        _check_ref(ref)
        url = self._instance_url(ref)
        event = _EventDraft("retrieve", ref.study_uid, ref.series_uid, ref.sop_instance_uid)
        response = await self._get(url, None, ACCEPT_DICOM_ANY_SYNTAX, event)
        if response.status_code in (404, 204):
            self._fail(event, response.status_code, self._instance_not_found(ref, response.status_code))

        content_type = response.headers.get("content-type", "")
        media_type, params = _content_type_params(content_type)
        try:
            if media_type == "application/dicom":
                payload, syntax = response.content, params.get("transfer-syntax")
            else:
                parts = parse_multipart_related(response.content, content_type)
                dicom_parts = [p for p in parts if _content_type_params(p.content_type)[0] == "application/dicom"]
                if not dicom_parts:
                    raise InvalidResourceError(f"DICOMweb server {self.base_url} returned no application/dicom part")
                payload = dicom_parts[0].content
                syntax = _content_type_params(dicom_parts[0].content_type)[1].get("transfer-syntax")
            dataset = pydicom.dcmread(BytesIO(payload))
        except InvalidResourceError as exc:
            self._fail(event, response.status_code, exc)
        except (InvalidDicomError, EOFError, ValueError, OSError) as exc:
            self._fail(
                event,
                response.status_code,
                InvalidResourceError(
                    f"DICOMweb server {self.base_url} returned data that is not a DICOM instance: {exc}"
                ),
            )

        file_meta = getattr(dataset, "file_meta", None)
        meta_syntax = getattr(file_meta, "TransferSyntaxUID", None)
        event.transfer_syntax = str(meta_syntax) if meta_syntax else syntax
        event.bytes = len(payload)
        if str(dataset.get("SOPInstanceUID", "")) != ref.sop_instance_uid:
            self._fail(
                event,
                response.status_code,
                InvalidResourceError(
                    f"DICOMweb server {self.base_url} returned a different instance than {ref.sop_instance_uid}"
                ),
            )
        self._emit(event, response.status_code, None)
        return dataset

    async def retrieve_metadata(self, study_uid: str, series_uid: str | None = None) -> list[dict[str, Any]]:
        """Return the DICOM JSON header of every instance of a study or series (WADO-RS ``/metadata``).

        Bulk data (pixels, large binary values) comes as ``BulkDataURI`` references, so this is
        the cheap way to read attributes QIDO-RS does not return (window presets, pixel spacing,
        frame counts) before deciding what to fetch.

        Raises:
            SourceUnavailableError: server unreachable, authentication failed, an error answer,
                or the study or series is not found (404, 204 or an empty list).
            InvalidResourceError: a malformed UID, or the answer is not DICOM JSON.
        """
        _check_uid(study_uid, "study")
        url = f"{self.base_url}/studies/{study_uid}"
        what = f"study {study_uid}"
        if series_uid is not None:
            _check_uid(series_uid, "series")
            url += f"/series/{series_uid}"
            what = f"series {series_uid} of study {study_uid}"
        event = _EventDraft("metadata", study_uid, series_uid, None)
        return await self._qido(f"{url}/metadata", [], event, empty_means=what)

    async def retrieve_frames(
        self, ref: InstanceRef, frames: list[int], *, transfer_syntax: str | None = None
    ) -> list[bytes]:
        """Return the pixel bytes of the given frames (1-based numbers) of one instance, in that order.

        See :meth:`retrieve_frame_parts`; this keeps only the bytes.
        """
        return [
            frame.content for frame in await self.retrieve_frame_parts(ref, frames, transfer_syntax=transfer_syntax)
        ]

    async def retrieve_frame_parts(
        self, ref: InstanceRef, frames: list[int], *, transfer_syntax: str | None = None
    ) -> list[Frame]:
        """Fetch frames with WADO-RS Retrieve Frames and say how each one is encoded.

        Args:
            ref: the instance.
            frames: 1-based frame numbers, answered in this order.
            transfer_syntax: None (the standard's default) asks for uncompressed Explicit VR
                Little Endian, so the bytes are plain pixel values (the server transcodes);
                :data:`AS_STORED` (``"*"``) asks for the stored encoding, e.g. one JPEG 2000
                codestream per frame; or an uncompressed transfer syntax UID.

        Raises:
            ValueError: no frames, or a frame number below 1, or an unusable ``transfer_syntax``.
            SourceUnavailableError: server unreachable, authentication failed, an error answer
                (a frame number past the end is one), the instance is not found, or the server
                cannot send that transfer syntax (HTTP 406; the message names it).
            InvalidResourceError: the answer is not multipart, holds another number of frames
                than asked, or is compressed although uncompressed frames were asked for (the
                message names the transfer syntax received).
        """
        if not frames or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in frames):
            raise ValueError(f"frame numbers must be a non-empty list of integers from 1: {frames!r}")
        if transfer_syntax is not None and transfer_syntax != AS_STORED and not _UID.match(transfer_syntax):
            raise ValueError(f"not a transfer syntax UID (or '*'): {transfer_syntax!r}")
        if transfer_syntax not in (None, AS_STORED, *UNCOMPRESSED_SYNTAXES):
            # PS3.18 table 8.7.3-5: octet-stream carries uncompressed (or as-stored) frames only.
            raise ValueError(f"application/octet-stream frames cannot be requested in {transfer_syntax}")
        _check_ref(ref)
        accept = ACCEPT_FRAMES if transfer_syntax is None else f"{ACCEPT_FRAMES}; transfer-syntax={transfer_syntax}"
        wanted = EXPLICIT_VR_LITTLE_ENDIAN if transfer_syntax is None else transfer_syntax
        url = f"{self._instance_url(ref)}/frames/{','.join(str(n) for n in frames)}"
        event = _EventDraft("frames", ref.study_uid, ref.series_uid, ref.sop_instance_uid)
        response = await self._get(url, None, accept, event, tolerated=(404, 204, 406))
        status = response.status_code
        if status in (404, 204):
            self._fail(event, status, self._instance_not_found(ref, status))
        if status == 406:
            self._fail(
                event,
                status,
                SourceUnavailableError(
                    f"DICOMweb server {self.base_url} cannot send frames of instance {ref.sop_instance_uid} "
                    f"in transfer syntax {wanted} (HTTP 406)",
                    details={"status": status, "transfer_syntax": wanted},
                ),
            )

        content_type = response.headers.get("content-type", "")
        media_type, params = _content_type_params(content_type)
        try:
            if media_type.startswith("multipart/"):
                parts = parse_multipart_related(response.content, content_type)
                whole_syntax = _declared_syntax(params)
            else:
                # A single frame may come as a bare body.
                parts = [MultipartPart({"content-type": content_type}, response.content)]
                whole_syntax = None
            result = []
            for number, part in zip(frames, parts, strict=False):
                part_type, part_params = _content_type_params(part.content_type or "application/octet-stream")
                declared = _declared_syntax(part_params) or whole_syntax
                result.append(
                    Frame(
                        number=number,
                        content=part.content,
                        media_type=part_type,
                        transfer_syntax=declared or (None if wanted == AS_STORED else wanted),
                    )
                )
            if len(parts) != len(frames):
                raise InvalidResourceError(
                    f"DICOMweb server {self.base_url} returned {len(parts)} frame(s) of instance "
                    f"{ref.sop_instance_uid}, not the {len(frames)} asked for"
                )
            if wanted != AS_STORED:
                # Implicit and explicit VR little endian hold identical pixel bytes; anything else
                # (compressed, or big endian when little was asked for) would be misread.
                acceptable = {wanted, IMPLICIT_VR_LITTLE_ENDIAN} if wanted == EXPLICIT_VR_LITTLE_ENDIAN else {wanted}
                for frame in result:
                    if frame.transfer_syntax not in acceptable or frame.media_type != "application/octet-stream":
                        raise InvalidResourceError(
                            f"DICOMweb server {self.base_url} returned frame {frame.number} of instance "
                            f"{ref.sop_instance_uid} as {frame.media_type} in transfer syntax "
                            f"{frame.transfer_syntax or 'unknown'}, not the uncompressed {wanted} asked for",
                            details={"transfer_syntax": frame.transfer_syntax},
                        )
        except InvalidResourceError as exc:
            self._fail(event, status, exc)
        event.transfer_syntax = result[0].transfer_syntax if result else None
        event.bytes = sum(len(frame.content) for frame in result)
        self._emit(event, status, None)
        return result

    # -- helpers ---------------------------------------------------------------------------------

    def _instance_url(self, ref: InstanceRef) -> str:
        return f"{self.base_url}/studies/{ref.study_uid}/series/{ref.series_uid}/instances/{ref.sop_instance_uid}"

    def _instance_not_found(self, ref: InstanceRef, status: int) -> SourceUnavailableError:
        return SourceUnavailableError(
            f"instance {ref.sop_instance_uid} (series {ref.series_uid}, study {ref.study_uid}) "
            f"not found on {self.base_url}",
            details={
                "status": status,
                "study_uid": ref.study_uid,
                "series_uid": ref.series_uid,
                "sop_instance_uid": ref.sop_instance_uid,
            },
        )

    async def _series_attributes(self, study_uid: str) -> dict[str, tuple[str | None, str | None]]:
        """Return (Modality, SeriesDescription) per series UID, from a series-level QIDO-RS query."""
        url = f"{self.base_url}/studies/{study_uid}/series"
        params = [("includefield", TAG_MODALITY), ("includefield", TAG_SERIES_DESCRIPTION)]
        event = _EventDraft("search", study_uid, None, None)
        items = await self._qido(url, params, event, empty_means=f"study {study_uid}")
        result: dict[str, tuple[str | None, str | None]] = {}
        for item in items:
            series_uid = _first_value(item, TAG_SERIES_UID)
            if isinstance(series_uid, str):
                result[series_uid] = (
                    _as_text(_first_value(item, TAG_MODALITY)),
                    _as_text(_first_value(item, TAG_SERIES_DESCRIPTION)),
                )
        return result

    async def _qido(
        self,
        url: str,
        params: list[tuple[str, str]],
        event: _EventDraft,
        *,
        empty_means: str | None,
        not_found: type[SourceUnavailableError] = SourceUnavailableError,
    ) -> list[dict[str, Any]]:
        """Run one DICOM JSON request (QIDO-RS search or WADO-RS metadata) and return its items.

        Args:
            url: the resource URL.
            params: query parameters.
            event: the access being recorded.
            empty_means: what is "not found" when the answer is empty (404, 204 or ``[]``), e.g.
                ``"study 1.2.3"``; None when an empty answer is a valid result (a search).
            not_found: the error raised for "not found" (a study's: :class:`StudyNotFoundError`).
        """
        response = await self._get(url, params, DICOM_JSON, event)
        status = response.status_code
        empty = status in (404, 204) or not response.content.strip()
        if empty and empty_means is None and status != 404:
            self._emit(event, status, None)
            return []
        if empty:
            if empty_means is None:
                # A search answering 404 means the URL is not a DICOMweb root, not "no match".
                message = (
                    f"DICOMweb server {self.base_url} answered HTTP 404 to a search (is the URL its DICOMweb root?)"
                )
                self._fail(event, status, SourceUnavailableError(message, details={"status": status}))
            message = f"{empty_means} not found on {self.base_url}"
            self._fail(event, status, not_found(message, details={"status": status}))
        try:
            items = loads_json(response.content)
        except ValueError as exc:
            self._fail(
                event,
                status,
                InvalidResourceError(f"DICOMweb server {self.base_url} returned a DICOM JSON answer that is not JSON"),
                cause=exc,
            )
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            self._fail(
                event,
                status,
                InvalidResourceError(f"DICOMweb server {self.base_url} returned an answer that is not DICOM JSON"),
            )
        if not items and empty_means is not None:
            self._fail(
                event, status, not_found(f"{empty_means} not found on {self.base_url}", details={"status": status})
            )
        event.bytes = len(response.content)
        self._emit(event, status, None)
        return items

    async def _get(
        self,
        url: str,
        params: list[tuple[str, str]] | None,
        accept: str,
        event: _EventDraft,
        *,
        tolerated: tuple[int, ...] = (404, 204),
    ) -> httpx.Response:
        """GET with auth; transport failures, auth refusals and error statuses emit and raise.

        The ``tolerated`` statuses (404 and 204 by default) come back to the caller, which knows
        what was not found (or, for 406, which transfer syntax could not be sent).
        """
        headers = {**self._headers, "Accept": accept}
        try:
            response = await self._client.get(
                url,
                params=httpx.QueryParams(tuple(params)) if params else None,
                headers=headers,
                auth=self._auth or httpx.USE_CLIENT_DEFAULT,
                # Per request, so "timed out after Ns" holds for a caller's client too.
                timeout=self._timeout_s,
            )
        except httpx.TimeoutException as exc:
            self._fail(
                event,
                None,
                SourceUnavailableError(f"DICOMweb server {self.base_url} timed out after {self._timeout_s:g}s"),
                cause=exc,
            )
        except httpx.TransportError as exc:
            reason = str(exc) or type(exc).__name__
            self._fail(
                event,
                None,
                SourceUnavailableError(f"DICOMweb server {self.base_url} could not be reached: {reason}"),
                cause=exc,
            )
        status = response.status_code
        if status in (401, 403):
            self._fail(
                event,
                status,
                SourceUnavailableError(
                    f"DICOMweb server {self.base_url} refused the request: authentication failed (HTTP {status})",
                    details={"status": status},
                ),
            )
        if status not in tolerated and not 200 <= status < 300:
            self._fail(
                event,
                status,
                SourceUnavailableError(
                    f"DICOMweb server {self.base_url} answered HTTP {status} to a {event.action} request",
                    details={"status": status},
                ),
            )
        return response

    def _emit(self, event: _EventDraft, status: int | None, error: str | None) -> None:
        self._observer.dicom_retrieval(
            DicomRetrievalEvent(
                backend=self.backend,
                server=self._origin,
                action=event.action,
                study_uid=event.study_uid,
                series_uid=event.series_uid,
                sop_instance_uid=event.sop_instance_uid,
                transfer_syntax=event.transfer_syntax,
                bytes=event.bytes,
                status=status,
                duration_ms=(time.perf_counter() - event.started) * 1000.0,
                error=error,
            )
        )

    def _fail(
        self,
        event: _EventDraft,
        status: int | None,
        error: SourceUnavailableError | InvalidResourceError,
        *,
        cause: BaseException | None = None,
    ) -> NoReturn:
        """Emit the failed request's event and raise ``error`` (never returns)."""
        self._emit(event, status, error.message)
        raise error from cause


class _EventDraft:
    """The parts of a DicomRetrievalEvent known before the response arrives."""

    def __init__(
        self, action: str, study_uid: str | None, series_uid: str | None, sop_instance_uid: str | None
    ) -> None:
        self.action = action
        self.study_uid = study_uid
        self.series_uid = series_uid
        self.sop_instance_uid = sop_instance_uid
        self.transfer_syntax: str | None = None
        self.bytes: int | None = None
        self.started = time.perf_counter()


def _declared_syntax(params: dict[str, str]) -> str | None:
    """Return the transfer syntax a Content-Type declares (Orthanc writes ``transferSyntax`` for some)."""
    value = params.get("transfer-syntax") or params.get("transfersyntax")
    return value.strip() if value else None


def _check_ref(ref: InstanceRef) -> None:
    for uid, what in (
        (ref.study_uid, "study"),
        (ref.series_uid, "series"),
        (ref.sop_instance_uid, "instance"),
    ):
        _check_uid(uid, what)


def _check_uid(uid: str, what: str) -> None:
    if not uid or len(uid) > 64 or not _UID.match(uid):
        raise InvalidResourceError(f"not a valid DICOM {what} UID: {uid[:80]!r}")
