"""Write a finished summary back to the FHIR server: a DocumentReference and its Provenance, in one transaction.

Where it sits: after a summary job's run succeeded, the worker (:mod:`agent.jobs.worker`) calls
:func:`write_back_summary` when the job asked for write-back. Both resources go in ONE
``transaction`` Bundle, so the server stores both or neither:

- DocumentReference: status ``current``, docStatus ``preliminary`` (machine-written, not reviewed),
  type LOINC 60591-5 "Patient summary Document", subject the patient, the summary as a base64
  ``text/plain`` attachment, and the run id as ``masterIdentifier``. It is created conditionally
  (``ifNoneExist`` on that identifier), so an attempt retried after a crash between the server's
  commit and ours does not write a second document.
- Provenance: target the DocumentReference, agents the model (as a Device, by display) and the
  requesting user, entities the resources the summary cited and that the run really fetched
  (``role = source``), reason the purpose of use.

Both are validated with ``fhir.resources`` before anything is sent. Only an HTTP FHIR source can
be written to; the bundle-folder default cannot. The FHIR settings' credentials (basic, bearer
or SMART Backend Services) are used exactly as the read path builds them.
"""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx

from agent import __version__
from agent.config import FhirSettings
from agent.errors import ConfigError, MedagentError
from agent.sources.fhir_validation import validate_resource
from agent.sources.http_auth import client_kwargs, http_auth
from agent.sources.http_clients import async_client
from agent.sources.smart_auth import smart_auth_from_settings

FHIR_JSON = "application/fhir+json"
LOINC = "http://loinc.org"
#: LOINC 60591-5, the document type the International Patient Summary uses.
SUMMARY_TYPE = {"system": LOINC, "code": "60591-5", "display": "Patient summary Document"}
RUN_ID_SYSTEM = "urn:ietf:rfc:3986"
_PARTICIPANT_TYPE = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
_DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
_ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"


class WriteBackUnsupportedError(ConfigError):
    """Write-back was asked for, but the configured FHIR source is a folder, not a server."""

    code = "write_back_unsupported"
    #: the request is well formed; it conflicts with how this server is set up
    http_status = 409


class WriteBackError(MedagentError):
    """The FHIR server could not be reached, or failed the transaction with a 5xx or 429 (worth retrying)."""

    code = "write_back_failed"
    exit_code = 4
    http_status = 502


class WriteBackRejectedError(MedagentError):
    """The FHIR server refused the transaction (4xx): retrying the same resources will not help."""

    code = "write_back_rejected"
    exit_code = 4
    http_status = 422


class InvalidWriteBackError(MedagentError):
    """The resources built for write-back do not validate (a bug: nothing was sent)."""

    code = "write_back_invalid"
    exit_code = 70
    http_status = 500


@dataclass
class SummaryToWrite:
    """What goes into the FHIR server: the summary and the references that explain it."""

    patient_id: str
    run_id: str
    text: str
    models: dict[str, str] = field(default_factory=dict)
    #: the summary's valid citations ('Type/id' the run really fetched)
    cited: list[str] = field(default_factory=list)
    requested_by: str | None = None
    purpose_of_use: str | None = None
    focus: str | None = None


def check_write_back_possible(settings: FhirSettings) -> None:
    """Refuse write-back early when there is no FHIR server to write to.

    Raises:
        WriteBackUnsupportedError: ``fhir.base_url`` is not set (bundle folders are read-only).
    """
    if not settings.base_url:
        raise WriteBackUnsupportedError(
            "write-back needs a FHIR server (set fhir.base_url); a folder of bundles cannot be written to"
        )


def build_transaction(summary: SummaryToWrite, *, now: datetime | None = None) -> dict[str, Any]:
    """Return the transaction Bundle that creates the DocumentReference and its Provenance.

    Raises:
        InvalidWriteBackError: a resource does not validate as FHIR R4 (nothing should be sent).
    """
    now = now or datetime.now(UTC)
    stamp = now.isoformat(timespec="seconds")
    doc_urn = f"urn:uuid:{uuid.uuid4()}"
    reasoner = summary.models.get("reasoner") or "unknown model"
    run_urn = f"urn:uuid:{summary.run_id}"
    document: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "masterIdentifier": {"system": RUN_ID_SYSTEM, "value": run_urn},
        "status": "current",
        "docStatus": "preliminary",
        "type": {"coding": [SUMMARY_TYPE], "text": "Patient summary (AI-generated, decision support)"},
        "subject": {"reference": f"Patient/{summary.patient_id}"},
        "date": stamp,
        "author": [{"display": f"medagent {__version__} ({reasoner})"}],
        "description": (
            f"Decision-support summary written by {reasoner} through medagent; not reviewed by a clinician. "
            f"Trace run {summary.run_id}."
        ),
        "content": [
            {
                "attachment": {
                    "contentType": "text/plain",
                    "language": "en",
                    "data": base64.b64encode(summary.text.encode("utf-8")).decode("ascii"),
                    "title": "Patient summary",
                    "creation": stamp,
                }
            }
        ],
    }
    if summary.focus:
        document["context"] = {"related": [{"reference": summary.focus}]}
    agents: list[dict[str, Any]] = [
        {
            "type": {"coding": [{"system": _PARTICIPANT_TYPE, "code": "author", "display": "Author"}]},
            "who": {"type": "Device", "display": f"{reasoner} via medagent {__version__}"},
        }
    ]
    if summary.requested_by:
        agents.append({"role": [{"text": "requested the summary"}], "who": {"display": summary.requested_by}})
    provenance: dict[str, Any] = {
        "resourceType": "Provenance",
        "target": [{"reference": doc_urn}],
        "recorded": stamp,
        "activity": {"coding": [{"system": _DATA_OPERATION, "code": "CREATE", "display": "create"}]},
        "agent": agents,
    }
    if summary.purpose_of_use:
        provenance["reason"] = [{"coding": [{"system": _ACT_REASON, "code": summary.purpose_of_use}]}]
    entities = [{"role": "source", "what": {"reference": ref}} for ref in dict.fromkeys(summary.cited)]
    if entities:
        provenance["entity"] = entities
    for resource in (document, provenance):
        problems = validate_resource(resource)
        if problems:
            raise InvalidWriteBackError(
                f"the {resource['resourceType']} built for write-back is not valid FHIR: {'; '.join(problems[:3])}"
            )
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": doc_urn,
                "resource": document,
                "request": {
                    "method": "POST",
                    "url": "DocumentReference",
                    "ifNoneExist": f"identifier={RUN_ID_SYSTEM}|{run_urn}",
                },
            },
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": provenance,
                "request": {"method": "POST", "url": "Provenance"},
            },
        ],
    }


def _auth(settings: FhirSettings) -> tuple[dict[str, str], httpx.Auth | None]:
    """Return the headers and httpx auth the read path uses for this server (basic, bearer or SMART)."""
    smart = smart_auth_from_settings(settings)
    if smart is not None:
        return {}, smart
    creds = client_kwargs(settings)
    return http_auth(creds["username"], creds["password"], creds["bearer_token"])


def _created_reference(reply: dict[str, Any], resource_type: str) -> str | None:
    """Return ``Type/id`` of the entry of this type in a transaction-response Bundle."""
    for entry in reply.get("entry") or []:
        if not isinstance(entry, dict):
            continue
        resource = entry.get("resource")
        if isinstance(resource, dict) and resource.get("resourceType") == resource_type and resource.get("id"):
            return f"{resource_type}/{resource['id']}"
        location = (entry.get("response") or {}).get("location") or ""
        parts = location.split("/")
        if resource_type in parts:
            index = parts.index(resource_type)
            if index + 1 < len(parts) and parts[index + 1]:
                return f"{resource_type}/{parts[index + 1]}"
    return None


async def write_back_summary(
    settings: FhirSettings, summary: SummaryToWrite, *, client: httpx.AsyncClient | None = None
) -> str:
    """POST the summary's transaction to the FHIR server and return ``DocumentReference/<id>``.

    Args:
        settings: the ``fhir`` settings group (base URL and credentials).
        summary: the summary and its references.
        client: an existing client (tests); by default one is made and closed here.

    Raises:
        WriteBackUnsupportedError: no FHIR server is configured.
        WriteBackError: unreachable, timed out, 429 or 5xx (the worker retries the write).
        WriteBackRejectedError: any other non-2xx answer (permanent).
        InvalidWriteBackError: the resources built do not validate.
    """
    check_write_back_possible(settings)
    assert settings.base_url is not None
    base = settings.base_url.rstrip("/")
    bundle = build_transaction(summary)
    headers, auth = _auth(settings)
    request_headers = {"Accept": FHIR_JSON, **headers}
    owned = client is None
    http = client or async_client(timeout=httpx.Timeout(settings.timeout_s))
    try:
        # An earlier attempt may have committed on the server and crashed before recording it: its
        # document (and the Provenance written in the same transaction) is the one to keep.
        found = await _send(
            http,
            base,
            "GET",
            base + "/DocumentReference",
            params={"identifier": f"{RUN_ID_SYSTEM}|urn:uuid:{summary.run_id}"},
            headers=request_headers,
            auth=auth,
            timeout_s=settings.timeout_s,
        )
        existing = _created_reference(found, "DocumentReference")
        if existing is not None:
            return existing
        reply = await _send(
            http,
            base,
            "POST",
            base + "/",
            json=bundle,
            headers={**request_headers, "Content-Type": FHIR_JSON},
            auth=auth,
            timeout_s=settings.timeout_s,
        )
    finally:
        if owned:
            await http.aclose()
    reference = _created_reference(reply, "DocumentReference")
    if reference is None:
        raise WriteBackError(f"FHIR server {base} did not say where it stored the DocumentReference")
    return reference


async def _send(
    http: httpx.AsyncClient,
    base: str,
    method: str,
    url: str,
    *,
    headers: dict[str, str],
    auth: httpx.Auth | None,
    timeout_s: float,
    params: dict[str, str] | None = None,
    json: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Send one write-back request and return its JSON body, mapping failures to retryable or not."""
    what = "write-back transaction" if method == "POST" else "write-back check"
    try:
        response = await http.request(
            method,
            url,
            params=params,
            json=json,
            headers=headers,
            auth=auth or httpx.USE_CLIENT_DEFAULT,
            timeout=timeout_s,
        )
    except httpx.TimeoutException as exc:
        raise WriteBackError(f"FHIR server {base} timed out after {timeout_s:g}s on the {what}") from exc
    except httpx.TransportError as exc:
        raise WriteBackError(f"FHIR server {base} could not be reached for the {what} ({type(exc).__name__})") from exc
    status = response.status_code
    if status == 429 or status >= 500:
        raise WriteBackError(f"FHIR server {base} answered HTTP {status} to the {what}", details={"status": status})
    if not 200 <= status < 300:
        raise WriteBackRejectedError(
            f"FHIR server {base} refused the {what} (HTTP {status})", details={"status": status}
        )
    try:
        body = response.json()
    except ValueError as exc:
        raise WriteBackError(f"FHIR server {base} answered the {what} with a body that is not JSON") from exc
    if not isinstance(body, dict):
        raise WriteBackError(f"FHIR server {base} answered the {what} with JSON that is not a FHIR resource")
    return body
