"""CDS Hooks 2.0: discovery, and a ``patient-view`` service that shows the latest stored summary as a card.

Where it sits: an EHR calls ``POST /cds-services/medagent-patient-summary`` when a clinician opens
a chart. The answer must come within the EHR's latency budget, so the service never runs a model
while the EHR waits: it serves the patient's latest finished summary job (its answer replayed from
the trace, :func:`agent.audit.replay.replay`) and queues a fresh summary for next time
(idempotency key ``cds:<hookInstance>``, so a retried call queues nothing more). With no summary
yet, the card says one is being prepared.

Callers authenticate as the ``service`` role (API key or OIDC bearer). ``fhirAuthorization`` is
never used: the summary comes from storage and summary jobs read the configured FHIR source with
medagent's own credentials, so the EHR's token is never sent anywhere. ``fhirServer``, when given
while ``fhir.base_url`` is set, must be that server: a patient id means a person only on its own
server, and a card about another server's patient with the same id would show the wrong record.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from typing import Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent.errors import MedagentError
from agent.integrations.fhir_notifications import FHIR_ID
from agent.jobs.store import JobRecord, create_job, latest_done_job
from agent.jobs.worker import load_summary
from agent.runtime import AgentRuntime
from agent.service.auth import PrincipalDep, require
from agent.service.bodies import read_limited_body
from agent.service.deps import ERROR_RESPONSES, RuntimeDep, get_job_queue
from agent.service.schemas import Problem

router = APIRouter(tags=["cds-hooks"])

SERVICE_ID = "medagent-patient-summary"
HOOK = "patient-view"
#: CDS Hooks: a card's summary "SHOULD be less than 140 characters".
SUMMARY_LIMIT = 139
DISCLAIMER = "_medagent is decision support, not a diagnosis: check the cited records before acting._"
PREPARING = "A medagent summary of this patient is being prepared"
MAX_BODY_BYTES = 1024 * 1024


class CdsRequestError(MedagentError):
    """A CDS Hooks request this service cannot answer (names the field); CDS clients show it."""

    code = "cds_request_invalid"
    exit_code = 2
    http_status = 400


# -- discovery -----------------------------------------------------------------------------------


class CdsService(BaseModel):
    """One service in the discovery document."""

    hook: str
    id: str
    title: str
    description: str
    prefetch: dict[str, str] = Field(default_factory=dict)


class CdsDiscovery(BaseModel):
    """The CDS Hooks discovery document."""

    services: list[CdsService]


DISCOVERY = CdsDiscovery(
    services=[
        CdsService(
            hook=HOOK,
            id=SERVICE_ID,
            title="medagent patient summary",
            description=(
                "The latest medagent summary of the patient (problems, medications, results, imaging with "
                "MedSigLIP findings, reasoned by MedGemma), every claim cited; a fresh summary is queued on "
                "each chart open. Decision support, not a diagnosis."
            ),
            prefetch={"patient": "Patient/{{context.patientId}}"},
        )
    ]
)


@router.get("/cds-services", response_model=CdsDiscovery)
async def discovery() -> CdsDiscovery:
    """List the CDS services (CDS Hooks discovery): one ``patient-view`` service with a Patient prefetch."""
    return DISCOVERY


# -- the request ---------------------------------------------------------------------------------


class FhirAuthorization(BaseModel):
    """The EHR's token for its FHIR server: checked for shape, never used (see the module docstring)."""

    model_config = ConfigDict(extra="allow")

    access_token: str = Field(min_length=1)
    token_type: str = Field(min_length=1)
    expires_in: int | None = None
    scope: str | None = None
    subject: str | None = None


class PatientViewContext(BaseModel):
    """``patient-view`` context."""

    model_config = ConfigDict(extra="allow")

    userId: str | None = Field(None, max_length=300)
    patientId: str = Field(pattern=FHIR_ID.pattern, description="The FHIR id of the patient whose chart opened.")
    encounterId: str | None = Field(None, max_length=300)


class CdsRequest(BaseModel):
    """A CDS Hooks 2.0 request for the ``patient-view`` hook."""

    model_config = ConfigDict(extra="allow")

    hook: Literal["patient-view"] = Field(description="The hook this service answers.")
    hookInstance: str = Field(
        description="A UUID for this call; a retried call with the same one queues nothing new.",
        json_schema_extra={"format": "uuid"},
    )
    fhirServer: str | None = Field(None, max_length=2000)
    fhirAuthorization: FhirAuthorization | None = None
    context: PatientViewContext
    prefetch: dict[str, Any] | None = None

    @field_validator("hookInstance")
    @classmethod
    def _uuid(cls, value: str) -> str:
        try:
            uuid.UUID(value)
        except ValueError as exc:
            raise ValueError("hookInstance must be a UUID") from exc
        return value


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """Return a JSON schema with its ``$defs`` written in place (the app's OpenAPI has no components for them)."""
    defs = schema.get("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items() if k != "$defs"}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


_REQUEST_SCHEMA = _inline_refs(CdsRequest.model_json_schema())
_OPENAPI_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": _REQUEST_SCHEMA,
                "example": {
                    "hook": HOOK,
                    "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
                    "context": {"userId": "Practitioner/example", "patientId": "c02b6052-1523-5c41-983c-e2e4f28a22a9"},
                },
            }
        },
    }
}


# -- the response --------------------------------------------------------------------------------


class CdsSource(BaseModel):
    """Where a card comes from: medagent, with the model that wrote the summary."""

    label: str
    url: str | None = None


class CdsLink(BaseModel):
    """A link on a card."""

    label: str
    url: str
    type: Literal["absolute", "smart"] = "absolute"


class CdsCard(BaseModel):
    """One CDS Hooks card."""

    uuid: str
    summary: str = Field(max_length=140)
    indicator: Literal["info", "warning", "critical"] = "info"
    source: CdsSource
    detail: str | None = None
    links: list[CdsLink] = Field(default_factory=list)


class CdsResponse(BaseModel):
    """The answer to a hook call."""

    cards: list[CdsCard]


_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    400: {"model": Problem, "description": "Not a valid patient-view request (the detail names the field)"},
}


@router.post(
    f"/cds-services/{SERVICE_ID}",
    response_model=CdsResponse,
    response_model_exclude_none=True,
    responses=_RESPONSES,
    openapi_extra=_OPENAPI_BODY,
)
async def patient_summary_card(request: Request, runtime: RuntimeDep, principal: PrincipalDep) -> CdsResponse:
    """Answer ``patient-view`` with a card of the latest stored summary, and queue a fresh one.

    Never waits for a model: with no stored summary yet, the card says one is being prepared.
    Needs the service role.
    """
    require(principal, "service", "admin")
    call = _parse(await read_limited_body(request, MAX_BODY_BYTES, CdsRequestError))
    _check_fhir_server(runtime, call)
    card, job, created = await asyncio.to_thread(_answer, runtime, call, principal.user, principal.purpose_of_use)
    if created:
        await get_job_queue(request).submit(job)
    return CdsResponse(cards=[card])


def _parse(body: bytes) -> CdsRequest:
    """Validate a CDS Hooks request; every problem becomes a 400 naming the field (CDS clients show 400s).

    Raises:
        CdsRequestError: not JSON, not a patient-view request, or a prefetched Patient of another id.
    """
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise CdsRequestError("the request body is not JSON") from exc
    if not isinstance(data, dict):
        raise CdsRequestError("the request body must be a JSON object")
    try:
        call = CdsRequest.model_validate(data)
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {_reason(err)}" for err in exc.errors()]
        raise CdsRequestError("invalid CDS Hooks request: " + "; ".join(problems[:5])) from exc
    patient = (call.prefetch or {}).get("patient")
    if (
        isinstance(patient, dict)
        and patient.get("resourceType") == "Patient"
        and patient.get("id") != call.context.patientId
    ):
        raise CdsRequestError("prefetch.patient is not the patient named in context.patientId")
    return call


def _reason(err: Any) -> str:
    if err["loc"] == ("hook",):
        return f"this service answers the {HOOK} hook only"
    if err["type"] == "missing":
        return "required"
    if err["type"] == "string_pattern_mismatch":
        return "not a FHIR id"
    return str(err["msg"]).removeprefix("Value error, ")


def _check_fhir_server(runtime: AgentRuntime, call: CdsRequest) -> None:
    """Refuse a call about another FHIR server's patient (its ids name other people here).

    Raises:
        CdsRequestError: ``fhirServer`` is not ``fhir.base_url`` (checked only when that is set).
    """
    base_url = runtime.settings.fhir.base_url
    if call.fhirServer and base_url and call.fhirServer.rstrip("/").lower() != base_url.rstrip("/").lower():
        raise CdsRequestError(
            "fhirServer is not the FHIR server medagent reads (fhir.base_url): its patient ids would name "
            "other patients here"
        )


# -- the card ------------------------------------------------------------------------------------


def _answer(
    runtime: AgentRuntime, call: CdsRequest, user: str, purpose_of_use: str | None
) -> tuple[CdsCard, JobRecord, bool]:
    """Build the card from the latest stored summary and queue a fresh summary (blocking; run in a thread)."""
    runtime.ensure_schema()
    settings = runtime.settings
    patient_id = call.context.patientId
    latest = latest_done_job(runtime.engine, patient_id)
    stored = _stored_summary(runtime, latest) if latest is not None else None
    job, created = create_job(
        runtime.engine,
        patient_id=patient_id,
        trigger="cds-hook",
        max_attempts=settings.jobs.max_attempts,
        idempotency_key=f"cds:{call.hookInstance}",
        requested_by=user,
        purpose_of_use=purpose_of_use or "TREAT",
        write_back=settings.jobs.write_back,
    )
    if stored is None or latest is None:
        card = CdsCard(
            uuid=str(uuid.uuid4()),
            summary=PREPARING,
            source=CdsSource(label=f"medagent ({_model_label(settings.models.medgemma)})"),
            detail=f"{PREPARING}; it will be shown here the next time this chart is opened.\n\n{DISCLAIMER}",
            links=[CdsLink(label="Follow the summary", url=_summary_url(runtime, patient_id, job.id))],
        )
        return card, job, created
    answer, model_id = stored
    card = CdsCard(
        uuid=str(uuid.uuid4()),
        summary=card_summary(answer),
        source=CdsSource(label=f"medagent ({_model_label(model_id)})"),
        detail=f"{escape_markdown(answer)}\n\n{_written(latest)}\n\n{DISCLAIMER}",
        links=[CdsLink(label="Open full summary", url=_summary_url(runtime, patient_id, latest.id))],
    )
    return card, job, created


def _stored_summary(runtime: AgentRuntime, job: JobRecord) -> tuple[str, str] | None:
    """Return the finished job's answer and the reasoner that wrote it, or None when it cannot be read."""
    if job.run_id is None:
        return None
    try:
        stored = load_summary(runtime, job.run_id)
    except MedagentError:
        return None  # a missing or unreadable run: the card says a summary is being prepared
    if not stored.readable or not stored.summary.strip():
        return None
    return stored.summary, stored.models.get("reasoner") or runtime.settings.models.medgemma


def _written(job: JobRecord) -> str:
    """Return when the summary was written: a card may show a summary older than the latest results."""
    if job.finished_at is None:
        return "_Stored summary; a fresh one is being prepared._"
    return f"_Summary written {job.finished_at:%Y-%m-%d %H:%M} UTC; a fresh one is being prepared._"


def _summary_url(runtime: AgentRuntime, patient_id: str, job_id: str) -> str:
    service = runtime.settings.service
    base = (service.public_base_url or f"http://{service.host}:{service.port}").rstrip("/")
    return f"{base}/ui/?patient={quote(patient_id, safe='')}&summary={quote(job_id, safe='')}"


def _model_label(model_id: str) -> str:
    """Return a model id short enough for a source label (a local path shows its folder name)."""
    return model_id.rstrip("/").rsplit("/", 2)[-1] if model_id.startswith(("/", ".")) else model_id[:100]


_CITATION_GROUP = re.compile(r"\s*\[([^\[\]\n]{1,400})\]")
_CITATION = re.compile(r"^[A-Z][A-Za-z]{1,63}/[A-Za-z0-9\-.]{1,64}(?:/_history/[A-Za-z0-9\-.]{1,64})?$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")
_LIST_MARKER = re.compile(r"^\s*(?:[#>*\-+]+|\d+[.)])\s+")


def strip_citations(text: str) -> str:
    """Remove ``[Type/id]`` groups (one or several references) and tidy the spaces they leave."""

    def drop(match: re.Match[str]) -> str:
        parts = [part.strip() for part in re.split(r"[,;]", match.group(1))]
        return "" if parts and all(_CITATION.match(part) for part in parts) else match.group(0)

    text = _CITATION_GROUP.sub(drop, text)
    return re.sub(r"[ \t]+([.,;:!?])", r"\1", text)


def card_summary(answer: str, limit: int = SUMMARY_LIMIT) -> str:
    """Return the answer's first sentence without citations, cut on a word boundary to ``limit`` characters."""
    lines = [_LIST_MARKER.sub("", line).strip() for line in strip_citations(answer).splitlines()]
    first_line = next((line for line in lines if line), "")
    sentence = " ".join(_SENTENCE_END.split(first_line, maxsplit=1)[0].split())
    if not sentence:
        return PREPARING
    if len(sentence) <= limit:
        return sentence
    cut = sentence[: limit - 1]
    if " " in cut:
        cut = cut.rsplit(" ", 1)[0]
    return cut.rstrip(" ,;:-") + "…"


def escape_markdown(text: str) -> str:
    """Escape what would make model text a link, an image or HTML in the EHR's markdown renderer.

    The summary is model output over records that may hold untrusted text, and an image link
    would be fetched by the EHR as soon as the card shows. Citations stay readable: ``\\[`` renders
    as ``[``.
    """
    return re.sub(r"([\\\[\]<>])", r"\\\1", text)
