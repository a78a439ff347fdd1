"""The FHIR Subscription rest-hook: a notification of a new study or result queues a patient summary.

Where it sits: a FHIR server POSTs notifications here (R4 criteria-based, or topic-based R4
backport / R4B / R5; see :mod:`agent.integrations.fhir_notifications`). For each event whose
focus is an ImagingStudy or DiagnosticReport, the endpoint

1. records the event in ``notification_events`` (:mod:`agent.jobs.notifications`): the unique
   (subscription, event number) makes a redelivery, or a copy arriving at the same moment, a
   duplicate;
2. learns the patient from the focus's ``subject``: from the resource when the notification
   carried it (full-resource), else by reading the focus from the configured FHIR source
   (id-only), or, for an empty payload, by asking the server's ``Subscription/<id>/$events`` for
   the event's id-only form first; every such read happens inside a traced ``notification`` run;
3. creates the summary job with the idempotency key ``sub:<subscription>:<event number>`` and
   hands it to the queue.

Senders authenticate with the shared secret header (``service.subscription_secret``), compared
in constant time; API keys are not used here because FHIR servers send fixed headers only.
Handshakes, heartbeats and query-status notifications are acknowledged and queue nothing. The
answer lists queued, duplicate and ignored events by reference only.

R4 servers that deliver a payload by ``PUT <endpoint>/<type>/<id>`` (HAPI FHIR does) are served
by the ``/fhir/notifications/{resource_type}/{resource_id}`` route. A criteria-based sender can
name its subscription in an ``X-Subscription-Id`` header (set it in ``Subscription.channel.header``
together with the secret header).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import traceback
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from pydantic import BaseModel, Field

from agent.audit.recorder import NOTE, TraceRecorder, settings_fingerprint
from agent.config import Settings
from agent.errors import InternalError, MedagentError
from agent.integrations.fhir_notifications import (
    FHIR_ID,
    EventKey,
    NotificationFlavor,
    NotificationKind,
    NotifiedEvent,
    ParsedNotification,
    PayloadMode,
    ResourceRef,
    event_key,
    notification_body_schema,
    parse_notification,
    parse_reference,
    subject_patient_id,
)
from agent.jobs.notifications import attach_job, record_event
from agent.jobs.store import JobRecord, create_job
from agent.runtime import AgentRuntime
from agent.service.auth import NotAuthenticatedError
from agent.service.bodies import read_limited_body
from agent.service.deps import ERROR_RESPONSES, RuntimeDep, get_job_queue
from agent.service.schemas import Problem
from agent.sources.factory import make_fhir_source
from agent.sources.protocols import FhirSource

log = logging.getLogger(__name__)

router = APIRouter(tags=["subscriptions"])

#: Focus types that mean "a new study or result": these queue a summary; other events are ignored.
SUMMARIZED_TYPES = ("ImagingStudy", "DiagnosticReport")
#: Where an R4 criteria-based sender may name its subscription (it has no place in the body).
SUBSCRIPTION_ID_HEADER = "X-Subscription-Id"
#: A notification larger than this is refused before it is parsed (a full-resource Bundle of a
#: few studies or reports is tens of kilobytes).
MAX_BODY_BYTES = 5 * 1024 * 1024
JSON_MEDIA_TYPES = ("application/fhir+json", "application/json")
#: Who the summary jobs and the notification runs name as the requester.
REQUESTER = "fhir-subscription"


class UnsupportedMediaTypeError(MedagentError):
    """A notification body in a media type other than FHIR JSON."""

    code = "unsupported_media_type"
    exit_code = 2
    http_status = 415


class PayloadTooLargeError(MedagentError):
    """A notification body larger than :data:`MAX_BODY_BYTES`."""

    code = "payload_too_large"
    exit_code = 2
    http_status = 413


class EventOutcome(BaseModel):
    """What became of one event of the notification."""

    event_number: int | None = Field(None, description="The subscription's event number (none for R4 criteria).")
    focus: str | None = Field(None, description="The focus as Type/id.")
    job_id: str | None = Field(None, description="The summary job the event queued (or an earlier one).")
    reason: str | None = Field(None, description="Why an event was ignored.")


class NotificationReceipt(BaseModel):
    """The answer to a notification: what was queued, what was seen before, what was ignored."""

    kind: NotificationKind
    flavor: NotificationFlavor = Field(description="r4-backport, r4b-r5 or r4-criteria")
    payload: PayloadMode
    subscription: str | None = None
    queued: list[EventOutcome] = Field(default_factory=list, description="Events that queued a new summary job.")
    duplicates: list[EventOutcome] = Field(default_factory=list, description="Events recorded before: nothing new.")
    ignored: list[EventOutcome] = Field(default_factory=list, description="Events that summarize nothing.")
    note: str | None = Field(None, description="Why nothing could be summarized, when that is so.")
    run_id: str | None = Field(None, description="The trace run of the reads this notification needed.")


_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    400: {"model": Problem, "description": "The body is not JSON"},
    413: {"model": Problem, "description": "The body is too large"},
    415: {"model": Problem, "description": "Not FHIR JSON"},
    422: {"model": Problem, "description": "Not a subscription notification (the detail names the element)"},
}
_R5_EXAMPLE = {
    "resourceType": "Bundle",
    "type": "subscription-notification",
    "entry": [
        {
            "fullUrl": "urn:uuid:9e41ff6d-5be6-4e6a-8b85-abd4e7f58400",
            "resource": {
                "resourceType": "SubscriptionStatus",
                "status": "active",
                "type": "event-notification",
                "eventsSinceSubscriptionStart": "12",
                "subscription": {"reference": "Subscription/new-imaging"},
                "topic": "http://example.org/SubscriptionTopic/new-imaging-or-result",
                "notificationEvent": [
                    {"eventNumber": "12", "focus": {"reference": "ImagingStudy/b4689769-659b-5a2d-bf99-e97b2e07401a"}}
                ],
            },
        },
        {"fullUrl": "https://fhir.example.org/ImagingStudy/b4689769-659b-5a2d-bf99-e97b2e07401a"},
    ],
}
_OPENAPI_BODY: dict[str, Any] = {
    "requestBody": {
        "required": False,
        "description": "The notification (FHIR JSON): a topic-based notification Bundle, or the resource an R4 "
        "criteria-based subscription matched; empty for an R4 subscription without payload.",
        "content": {
            media: {
                "schema": notification_body_schema(),
                "examples": {"r5-id-only": {"summary": "R5 event, id-only payload", "value": _R5_EXAMPLE}},
            }
            for media in JSON_MEDIA_TYPES
        },
    }
}


@router.post(
    "/fhir/notifications", response_model=NotificationReceipt, responses=_RESPONSES, openapi_extra=_OPENAPI_BODY
)
async def receive_notification(request: Request, runtime: RuntimeDep) -> NotificationReceipt:
    """Receive a FHIR subscription notification and queue a summary for each new study or result.

    Authenticated by the shared secret header (``service.subscription_secret_header``). Accepts
    R4 backport, R4B and R5 notification Bundles (handshake, heartbeat, event-notification;
    full-resource, id-only and empty payloads) and R4 criteria-based deliveries (the resource
    itself, or an empty body). Each event is summarized once, however often it is delivered.
    """
    return await _receive(request, runtime, path_focus=None)


@router.put(
    "/fhir/notifications/{resource_type}/{resource_id}", response_model=NotificationReceipt, responses=_RESPONSES
)
async def receive_resource_delivery(
    resource_type: Annotated[str, Path(pattern=r"^[A-Z][A-Za-z]{1,63}$", examples=["ImagingStudy"])],
    resource_id: Annotated[str, Path(pattern=FHIR_ID.pattern, examples=["b4689769-659b-5a2d-bf99-e97b2e07401a"])],
    request: Request,
    runtime: RuntimeDep,
) -> NotificationReceipt:
    """Receive an R4 criteria-based delivery sent as ``PUT <endpoint>/<type>/<id>`` (HAPI FHIR's form).

    The body is that resource as FHIR JSON (its type and id must be the URL's), or empty for a
    subscription without payload, in which case the resource is read from the configured FHIR
    source. Authenticated, deduplicated and answered as ``POST /fhir/notifications``.
    """
    return await _receive(request, runtime, path_focus=ResourceRef(resource_type=resource_type, id=resource_id))


# -- the request ---------------------------------------------------------------------------------


async def _receive(request: Request, runtime: AgentRuntime, *, path_focus: ResourceRef | None) -> NotificationReceipt:
    settings = runtime.settings
    _authenticate_sender(request, settings)
    body = await _read_body(request)
    notification = parse_notification(
        body, subscription_hint=request.headers.get(SUBSCRIPTION_ID_HEADER), path_focus=path_focus
    )
    receipt = NotificationReceipt(
        kind=notification.kind,
        flavor=notification.flavor,
        payload=notification.payload,
        subscription=notification.subscription,
    )
    if notification.kind != "event-notification":
        return receipt  # handshake, heartbeat, query-*: acknowledged; nothing happened to a patient
    await asyncio.to_thread(runtime.ensure_schema)
    intake = _Intake(runtime, notification, receipt)
    created = await intake.run()
    if created:
        queue = get_job_queue(request)
        for job in created:
            await queue.submit(job)
    log.info(
        "subscription notification (%s, %s): %d queued, %d duplicate, %d ignored",
        notification.flavor,
        notification.payload,
        len(receipt.queued),
        len(receipt.duplicates),
        len(receipt.ignored),
    )
    return receipt


def _authenticate_sender(request: Request, settings: Settings) -> None:
    """Check the shared secret header; without a configured secret (dev only) accept, and warn once.

    Raises:
        NotAuthenticatedError: the header is missing or wrong.
    """
    secret = settings.service.subscription_secret
    header = settings.service.subscription_secret_header
    if secret is None:
        if not getattr(request.app.state, "subscription_secret_warned", False):
            request.app.state.subscription_secret_warned = True
            log.warning("no service.subscription_secret is set: FHIR notifications are accepted unauthenticated (dev)")
        return
    presented = request.headers.get(header)
    if presented is None:
        raise NotAuthenticatedError(f"the {header} header is required")
    if not hmac.compare_digest(presented.encode(), secret.get_secret_value().encode()):
        raise NotAuthenticatedError(f"the {header} header is not valid")


async def _read_body(request: Request) -> bytes:
    """Return the body, refusing oversized bodies and media types other than FHIR JSON.

    Raises:
        PayloadTooLargeError: over :data:`MAX_BODY_BYTES`.
        UnsupportedMediaTypeError: a body declared as something other than JSON.
    """
    body = await read_limited_body(request, MAX_BODY_BYTES, PayloadTooLargeError, what="notification")
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if body.strip() and media_type and media_type not in JSON_MEDIA_TYPES:
        raise UnsupportedMediaTypeError(
            f"notifications must be FHIR JSON ({' or '.join(JSON_MEDIA_TYPES)}), not {media_type[:100]}"
        )
    return body


# -- from events to jobs -------------------------------------------------------------------------


class _Pending(BaseModel):
    """An event that should queue a summary once its patient is known."""

    key: EventKey
    event: NotifiedEvent
    focus: ResourceRef | None = None
    patient_id: str | None = None


class _Intake:
    """Turn one event-notification's events into outcomes and new jobs."""

    def __init__(self, runtime: AgentRuntime, notification: ParsedNotification, receipt: NotificationReceipt) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.notification = notification
        self.receipt = receipt
        self.recorder: TraceRecorder | None = None
        self._source: FhirSource | None = None

    async def run(self) -> list[JobRecord]:
        """Record, resolve and queue every event; return the jobs created now (to submit)."""
        try:
            pending, unfocused = await asyncio.to_thread(self._triage)
            if unfocused:
                pending += await self._foci_from_events_operation(unfocused)
            resolved = [item for item in [await self._resolve(item) for item in pending] if item is not None]
            created = await asyncio.to_thread(self._create_jobs, resolved)
            self._note_if_nothing_to_summarize()
        except MedagentError as exc:
            self._finish("failed", error=exc)
            if self.recorder is not None:
                exc.details.setdefault("run_id", self.recorder.run_id)  # the problem names the traced run
            raise
        except Exception as exc:
            # Type and place only: the message of an unexpected error can quote the notification.
            where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
            log.error(
                "internal error handling a notification: %s at %s",
                type(exc).__name__,
                f"{where.filename}:{where.lineno}" if where else "?",
            )
            error = InternalError(f"internal error ({type(exc).__name__}); see the service log")
            self._finish("failed", error=error)
            raise error from exc
        finally:
            if self._source is not None:
                await self._source.aclose()
        self._finish("ok")
        return created

    # -- phase 1: record each event; keep those that may need a summary
    def _triage(self) -> tuple[list[_Pending], list[_Pending]]:
        engine = self.runtime.engine
        pending: list[_Pending] = []
        unfocused: list[_Pending] = []
        for event in self.notification.events:
            key = event_key(self.notification, event)
            if key is None:
                continue  # nothing identifies it (an empty R4 delivery): only the note is left
            focus = parse_reference(event.focus)
            seen, new = record_event(
                engine,
                subscription=key.subscription,
                event_number=key.event_number,
                focus=focus.relative if focus else None,  # only a parsed reference is kept: no odd text in SQL
            )
            outcome = EventOutcome(event_number=event.event_number, focus=focus.relative if focus else event.focus)
            if not new and (seen.job_id is not None or event.focus is None):
                outcome.job_id = seen.job_id
                self.receipt.duplicates.append(outcome)
            elif event.focus is None:
                unfocused.append(_Pending(key=key, event=event))
            elif focus is None:
                self._ignore(outcome, new, "the focus is not a [base/]Type/id reference")
            elif focus.resource_type not in SUMMARIZED_TYPES:
                self._ignore(outcome, new, f"only {' and '.join(SUMMARIZED_TYPES)} events are summarized")
            else:
                pending.append(_Pending(key=key, event=event, focus=focus))
        return pending, unfocused

    def _ignore(self, outcome: EventOutcome, new: bool, reason: str) -> None:
        if new:
            outcome.reason = reason
            self.receipt.ignored.append(outcome)
        else:
            self.receipt.duplicates.append(outcome)

    # -- phase 2: an empty payload names no focus: ask the server which resources the events were about
    async def _foci_from_events_operation(self, unfocused: list[_Pending]) -> list[_Pending]:
        """Ask ``Subscription/<id>/$events`` for the id-only form of empty-payload events."""
        subscription = parse_reference(self.notification.subscription)
        numbers = [item.key.event_number for item in unfocused]
        if subscription is None or subscription.resource_type != "Subscription":
            self.receipt.note = "empty payload, and the subscription reference has no id to ask $events with"
            self._record_note("nothing_to_summarize", {})
            return []
        if not self._on_our_server(subscription):
            self.receipt.note = "empty payload from a subscription on another FHIR server than fhir.base_url"
            self._record_note("nothing_to_summarize", {})
            return []
        source = self._fhir()
        try:
            answer = await source.get(
                f"Subscription/{subscription.id}/$events",
                {"eventsSinceNumber": str(min(numbers)), "eventsUntilNumber": str(max(numbers)), "content": "id-only"},
            )
            listed = parse_notification(_json_bytes(answer))
        except (MedagentError, ValueError) as exc:
            code = exc.code if isinstance(exc, MedagentError) else "invalid_path"
            self.receipt.note = (
                f"empty payload: the notification names no focus, and the server's $events did not either ({code})"
            )
            self._record_note("events_operation_failed", {"error_code": code})
            return []
        foci = {e.event_number: e.focus for e in listed.events if e.event_number is not None and e.focus}
        found: list[_Pending] = []
        for item in unfocused:
            focus = parse_reference(foci.get(item.key.event_number))
            outcome = EventOutcome(event_number=item.event.event_number, focus=focus.relative if focus else None)
            if focus is None:
                self._ignore(outcome, True, "empty payload, and $events did not name the focus")
            elif focus.resource_type not in SUMMARIZED_TYPES:
                self._ignore(outcome, True, f"only {' and '.join(SUMMARIZED_TYPES)} events are summarized")
            else:
                found.append(item.model_copy(update={"focus": focus}))
        return found

    # -- phase 3: the patient, from the included focus or by reading it
    async def _resolve(self, item: _Pending) -> _Pending | None:
        focus = item.focus
        assert focus is not None
        outcome = EventOutcome(event_number=item.event.event_number, focus=focus.relative)
        resource = self.notification.included(item.event.focus) if item.event.focus else None
        if resource is None:
            if not self._on_our_server(focus):
                self._ignore(outcome, True, "the focus is on another FHIR server than fhir.base_url")
                return None
            try:
                resource = await self._fhir().read(focus.resource_type, focus.id)
            except MedagentError as exc:
                if exc.details.get("status") != 404:
                    raise  # the source failed: the sender retries, and this event is not lost
                self._ignore(outcome, True, "the focus was not found on the FHIR source")
                return None
        patient_id = subject_patient_id(resource)
        if patient_id is None:
            self._ignore(outcome, True, "the focus has no Patient subject")
            return None
        return item.model_copy(update={"patient_id": patient_id})

    # -- phase 4: one job per event (the idempotency key keeps concurrent copies to one)
    def _create_jobs(self, resolved: list[_Pending]) -> list[JobRecord]:
        engine = self.runtime.engine
        created: list[JobRecord] = []
        for item in resolved:
            assert item.focus is not None and item.patient_id is not None
            job, new_job = create_job(
                engine,
                patient_id=item.patient_id,
                trigger="subscription",
                max_attempts=self.settings.jobs.max_attempts,
                idempotency_key=item.key.idempotency_key,
                focus=item.focus.relative,
                requested_by=REQUESTER,
                purpose_of_use="TREAT",
                write_back=self.settings.jobs.write_back,
            )
            attach_job(engine, subscription=item.key.subscription, event_number=item.key.event_number, job_id=job.id)
            outcome = EventOutcome(event_number=item.event.event_number, focus=item.focus.relative, job_id=job.id)
            if new_job:
                created.append(job)
                self.receipt.queued.append(outcome)
            else:
                self.receipt.duplicates.append(outcome)
        return created

    def _note_if_nothing_to_summarize(self) -> None:
        if self.notification.events or self.receipt.note:
            return
        self.receipt.note = "empty payload: the notification names no resource, so there is nothing to summarize"
        self._record_note("nothing_to_summarize", {})

    # -- the trace
    def _fhir(self) -> FhirSource:
        if self._source is None:
            self._source = make_fhir_source(self.settings.fhir, self._recorder())
        return self._source

    def _recorder(self) -> TraceRecorder:
        if self.recorder is None:
            recorder = self.runtime.new_recorder()
            notification = self.notification
            recorder.start_run(
                kind="notification",
                trigger="subscription",
                patient_ref=None,
                settings_fingerprint=settings_fingerprint(self.settings.masked()),
                user_id=REQUESTER,
                user_role="service",
                purpose_of_use="TREAT",
                request={
                    "flavor": notification.flavor,
                    "kind": notification.kind,
                    "payload": notification.payload,
                    "subscription": notification.subscription,
                    "events": [{"event_number": e.event_number, "focus": e.focus} for e in notification.events],
                },
            )
            self.recorder = recorder
            self.receipt.run_id = recorder.run_id
        return self.recorder

    def _record_note(self, name: str, meta: dict[str, Any]) -> None:
        self._recorder().event(NOTE, name, meta={**meta, "note": self.receipt.note})

    def _finish(self, status: str, *, error: MedagentError | None = None) -> None:
        if self.recorder is None or self.recorder.finished_status is not None:
            return
        if status == "ok":
            self.recorder.event(
                NOTE,
                "notification_outcome",
                meta={
                    "queued": [o.job_id for o in self.receipt.queued],
                    "duplicates": len(self.receipt.duplicates),
                    "ignored": [{"focus": o.focus, "reason": o.reason} for o in self.receipt.ignored],
                },
            )
        self.recorder.finish_run(status, error=error)

    def _on_our_server(self, ref: ResourceRef) -> bool:
        """Whether an absolute reference points at the configured FHIR base (relative ones always do)."""
        base_url = self.settings.fhir.base_url
        if ref.base is None or not base_url:
            return True
        return ref.base.rstrip("/").lower() == base_url.rstrip("/").lower()


def _json_bytes(data: dict[str, Any]) -> bytes:
    return json.dumps(data).encode()
