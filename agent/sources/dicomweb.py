"""DICOMweb (QIDO-RS + WADO-RS): the server implementation of :class:`~agent.sources.protocols.DicomSource`.

Where it sits: after the history step has found a patient's ImagingStudy resources, the graph
asks the DICOM source for each study's instances (:meth:`DicomWebSource.list_instances`, QIDO-RS)
and fetches the few it will show the models (:meth:`DicomWebSource.retrieve`, WADO-RS); pixel
preparation (``agent/sources/pixels.py``) then turns the datasets into images.
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

import httpx
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from agent.config import DicomSettings
from agent.domain.events import AccessObserver, DicomRetrievalEvent
from agent.domain.refs import InstanceRef
from agent.errors import InvalidResourceError, SourceUnavailableError
from agent.sources.http_auth import client_kwargs, http_auth

DICOM_JSON = "application/dicom+json"
#: WADO-RS instance retrieval in whatever transfer syntax the server stored (no transcoding).
ACCEPT_DICOM_ANY_SYNTAX = 'multipart/related; type="application/dicom"; transfer-syntax=*'

# DICOM attribute tags as QIDO-RS JSON keys.
TAG_MODALITY = "00080060"
TAG_SOP_INSTANCE_UID = "00080018"
TAG_VIEW_POSITION = "00185101"
TAG_STUDY_UID = "0020000D"
TAG_SERIES_UID = "0020000E"
TAG_INSTANCE_NUMBER = "00200013"
TAG_TRANSFER_SYNTAX_UID = "00020010"

_INCLUDE_FIELDS = (TAG_MODALITY, TAG_VIEW_POSITION, TAG_INSTANCE_NUMBER)

# UIDs go into URL paths: anything but digits and dots could rewrite the request.
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


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


def _as_int(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


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
        self._observer = observer
        self._timeout_s = timeout_s
        self._headers, self._auth = http_auth(username, password, bearer_token)
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(timeout=httpx.Timeout(timeout_s))

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

    async def list_instances(self, study_uid: str) -> list[InstanceRef]:
        """Return the instances of a study, ordered by series then instance number.

        Modality, ViewPosition and InstanceNumber are requested with ``includefield``; when the
        server leaves Modality out of the instance-level answer, it is taken from a series-level
        query (where QIDO-RS always returns it).

        Raises:
            SourceUnavailableError: server unreachable, authentication failed, an error answer,
                or the study is not found (404, 204 or an empty list).
            InvalidResourceError: the UID is malformed or the answer is not DICOM JSON.
        """
        _check_uid(study_uid, "study")
        params = [("includefield", tag) for tag in _INCLUDE_FIELDS]
        url = f"{self.base_url}/studies/{study_uid}/instances"
        items = await self._qido(url, params, study_uid=study_uid)

        refs: list[InstanceRef] = []
        for item in items:
            series_uid = _first_value(item, TAG_SERIES_UID)
            sop_uid = _first_value(item, TAG_SOP_INSTANCE_UID)
            if not isinstance(series_uid, str) or not isinstance(sop_uid, str):
                raise InvalidResourceError(
                    f"DICOMweb server {self.base_url} returned an instance without series or SOP UID"
                )
            modality = _first_value(item, TAG_MODALITY)
            view = _first_value(item, TAG_VIEW_POSITION)
            refs.append(
                InstanceRef(
                    study_uid=study_uid,
                    series_uid=series_uid,
                    sop_instance_uid=sop_uid,
                    modality=str(modality) if modality else None,
                    view_position=str(view) if view else None,
                    instance_number=_as_int(_first_value(item, TAG_INSTANCE_NUMBER)),
                )
            )

        if any(ref.modality is None for ref in refs):
            series_modality = await self._series_modalities(study_uid)
            refs = [
                ref
                if ref.modality is not None
                else ref.model_copy(update={"modality": series_modality.get(ref.series_uid)})
                for ref in refs
            ]
        refs.sort(key=lambda r: (r.series_uid, r.instance_number is None, r.instance_number or 0))
        return refs

    async def retrieve(self, ref: InstanceRef) -> Dataset:
        """Return one instance as stored (pixel data not decoded), via WADO-RS.

        Raises:
            SourceUnavailableError: server unreachable, authentication failed, an error answer, or
                the instance is not found.
            InvalidResourceError: the answer is not a DICOM instance, or is a different instance.
        """
        for uid, what in (
            (ref.study_uid, "study"),
            (ref.series_uid, "series"),
            (ref.sop_instance_uid, "instance"),
        ):
            _check_uid(uid, what)
        url = f"{self.base_url}/studies/{ref.study_uid}/series/{ref.series_uid}/instances/{ref.sop_instance_uid}"
        event = _EventDraft("retrieve", ref.study_uid, ref.series_uid, ref.sop_instance_uid)
        response = await self._get(url, None, ACCEPT_DICOM_ANY_SYNTAX, event)
        if response.status_code in (404, 204):
            self._fail(
                event,
                response.status_code,
                SourceUnavailableError(
                    f"instance {ref.sop_instance_uid} not found on {self.base_url}",
                    details={"status": response.status_code},
                ),
            )

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

    # -- helpers ---------------------------------------------------------------------------------

    async def _series_modalities(self, study_uid: str) -> dict[str, str]:
        url = f"{self.base_url}/studies/{study_uid}/series"
        items = await self._qido(url, [("includefield", TAG_MODALITY)], study_uid=study_uid)
        result: dict[str, str] = {}
        for item in items:
            series_uid = _first_value(item, TAG_SERIES_UID)
            modality = _first_value(item, TAG_MODALITY)
            if isinstance(series_uid, str) and modality:
                result[series_uid] = str(modality)
        return result

    async def _qido(self, url: str, params: list[tuple[str, str]], *, study_uid: str) -> list[dict[str, Any]]:
        """Run one QIDO-RS query and return its DICOM JSON items; an empty answer is "not found"."""
        event = _EventDraft("search", study_uid, None, None)
        response = await self._get(url, params, DICOM_JSON, event)
        not_found = SourceUnavailableError(
            f"study {study_uid} not found on {self.base_url}", details={"status": response.status_code}
        )
        if response.status_code in (404, 204) or not response.content.strip():
            self._fail(event, response.status_code, not_found)
        try:
            items = response.json()
        except ValueError as exc:
            self._fail(
                event,
                response.status_code,
                InvalidResourceError(f"DICOMweb server {self.base_url} returned a QIDO answer that is not JSON"),
                cause=exc,
            )
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            self._fail(
                event,
                response.status_code,
                InvalidResourceError(f"DICOMweb server {self.base_url} returned a QIDO answer that is not DICOM JSON"),
            )
        if not items:
            self._fail(event, response.status_code, not_found)
        event.bytes = len(response.content)
        self._emit(event, response.status_code, None)
        return items

    async def _get(
        self,
        url: str,
        params: list[tuple[str, str]] | None,
        accept: str,
        event: _EventDraft,
    ) -> httpx.Response:
        """GET with auth; transport failures, auth refusals and error statuses emit and raise.

        404 and 204 come back to the caller, which knows what was not found.
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
        if status not in (404, 204) and not 200 <= status < 300:
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

    def __init__(self, action: str, study_uid: str, series_uid: str | None, sop_instance_uid: str | None) -> None:
        self.action = action
        self.study_uid = study_uid
        self.series_uid = series_uid
        self.sop_instance_uid = sop_instance_uid
        self.transfer_syntax: str | None = None
        self.bytes: int | None = None
        self.started = time.perf_counter()


def _check_uid(uid: str, what: str) -> None:
    if not uid or len(uid) > 64 or not _UID.match(uid):
        raise InvalidResourceError(f"not a valid DICOM {what} UID: {uid[:80]!r}")
