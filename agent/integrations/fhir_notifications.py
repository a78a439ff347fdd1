"""Parse a FHIR subscription notification into one typed shape, whatever FHIR version sent it.

Where it sits: the rest-hook endpoint (:mod:`agent.service.routes_notifications`) hands the raw
body here and gets back what kind of notification it is, which subscription sent it, its events
(number, focus, time) and whether the focus resources came with it. Deciding what to summarize,
fetching and queueing are the endpoint's job: nothing here does I/O.

Three shapes are understood:

- **R4 backport** (HL7 "Subscriptions R5 Backport" IG): a Bundle of type ``history`` whose first
  entry is a ``Parameters`` resource (profile ``backport-subscription-status-r4``) with the
  parameters ``subscription``, ``topic``, ``status``, ``type``,
  ``events-since-subscription-start`` and repeated ``notification-event`` (parts ``event-number``,
  ``timestamp``, ``focus``, ``additional-context``).
- **R4B / R5**: a Bundle of type ``subscription-notification`` whose first entry is a
  ``SubscriptionStatus`` (``type``, ``eventsSinceSubscriptionStart``,
  ``notificationEvent[].eventNumber/timestamp/focus/additionalContext``). Either status resource
  is accepted in either Bundle type, since servers straddling versions mix them.
- **R4 criteria-based rest-hook**: the server sends the matching resource itself as the body (POST
  to the endpoint, or PUT to ``<endpoint>/<type>/<id>`` as HAPI FHIR does), or an empty body when
  the subscription has no payload. There is no event number; see :func:`event_key`.

The payload mode is read from the Bundle: focus resources included (full-resource), focus
references without resources (id-only), or no focus at all (empty).
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime
from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field

from agent.errors import MedagentError

NotificationKind = Literal["handshake", "heartbeat", "event-notification", "query-status", "query-event"]
PayloadMode = Literal["full-resource", "id-only", "empty"]
NotificationFlavor = Literal["r4-backport", "r4b-r5", "r4-criteria"]

KINDS: tuple[str, ...] = ("handshake", "heartbeat", "event-notification", "query-status", "query-event")
#: Bundle types a topic-based notification comes in (R4B/R5, and the R4 backport's).
NOTIFICATION_BUNDLE_TYPES = ("subscription-notification", "history")
#: Resource types that hold a topic-based notification's status (R4B/R5, and the R4 backport's).
STATUS_TYPES = ("SubscriptionStatus", "Parameters")

#: FHIR logical ids: what a focus or subject id must look like before it is used anywhere.
FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_REFERENCE = re.compile(
    r"^(?:(?P<base>https?://[^?#\s]+?)/)?"
    r"(?P<type>[A-Z][A-Za-z]{1,63})/(?P<id>[A-Za-z0-9\-.]{1,64})"
    r"(?:/_history/(?P<version>[A-Za-z0-9\-.]{1,64}))?/?$"
)
_MAX_EVENT_NUMBER = 2**63 - 1
#: ``sub:<subscription>:<event number>`` must fit the jobs table's 200-character idempotency key.
_MAX_SUBSCRIPTION_KEY = 176


class InvalidNotificationError(MedagentError):
    """A notification body is JSON but not a notification this endpoint understands (names what is wrong)."""

    code = "notification_invalid"
    exit_code = 2
    http_status = 422


class UnreadableNotificationError(InvalidNotificationError):
    """A notification body is not JSON, or not a JSON object."""

    code = "notification_unreadable"
    http_status = 400


class ResourceRef(BaseModel):
    """A parsed FHIR reference: type, id, and the server base and version when the reference had them."""

    model_config = ConfigDict(frozen=True)

    resource_type: str
    id: str
    version: str | None = None
    base: str | None = None

    @property
    def relative(self) -> str:
        """Return ``Type/id``."""
        return f"{self.resource_type}/{self.id}"


def parse_reference(reference: str | None) -> ResourceRef | None:
    """Return the reference's parts, or None for anything but ``[base/]Type/id[/_history/v]``."""
    if not reference:
        return None
    match = _REFERENCE.fullmatch(reference.strip())
    if match is None:
        return None
    return ResourceRef(
        resource_type=match["type"], id=match["id"], version=match["version"], base=match["base"] or None
    )


class NotifiedEvent(BaseModel):
    """One event of a notification."""

    event_number: int | None = Field(
        None, description="The event's number in its subscription (topic-based); None for R4 criteria-based."
    )
    focus: str | None = Field(None, description="The reference to the resource the event is about, as sent.")
    timestamp: datetime | None = None
    additional_context: list[str] = Field(default_factory=list)
    version: str | None = Field(
        None, description="R4 criteria-based: the focus's meta.versionId, else lastUpdated, else a content digest."
    )


class ParsedNotification(BaseModel):
    """What a notification says, whichever FHIR version sent it."""

    flavor: NotificationFlavor
    kind: NotificationKind
    subscription: str | None = Field(None, description="The Subscription reference (criteria-based: from a header).")
    topic: str | None = None
    status: str | None = Field(None, description="The subscription's status as the server reported it.")
    events_since_start: int | None = None
    events: list[NotifiedEvent] = Field(default_factory=list)
    payload: PayloadMode = "empty"
    resources: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Included resources by 'Type/id' and by their entry's fullUrl."
    )

    def included(self, reference: str) -> dict[str, Any] | None:
        """Return the resource the notification carries for this reference, or None."""
        if reference in self.resources:
            return self.resources[reference]
        parsed = parse_reference(reference)
        return self.resources.get(parsed.relative) if parsed is not None else None


class EventKey(BaseModel):
    """What makes an event distinct: redeliveries of one event share it."""

    model_config = ConfigDict(frozen=True)

    subscription: str
    event_number: int

    @property
    def idempotency_key(self) -> str:
        """Return the summary job's idempotency key for this event."""
        return f"sub:{self.subscription}:{self.event_number}"


def event_key(notification: ParsedNotification, event: NotifiedEvent) -> EventKey | None:
    """Return the event's dedup key, or None when nothing identifies it (an empty R4 payload).

    Topic-based events are keyed by (subscription, event number), as the subscriptions framework
    numbers them. R4 criteria-based notifications carry no event number, so the key is
    ``criteria:<subscription header or '-'>`` and a number derived from the focus and its
    version: the first 63 bits of SHA-256 over ``Type/id/_history/<version>``, where the version
    is ``meta.versionId``, else ``meta.lastUpdated``, else a digest of the resource's content. A
    redelivered version is then a duplicate, and every new version of the resource is a new event.
    """
    if event.event_number is not None and notification.subscription:
        return EventKey(subscription=_bounded(notification.subscription), event_number=event.event_number)
    if notification.flavor == "r4-criteria" and event.focus:
        identity = f"{event.focus}/_history/{event.version or 'unversioned'}"
        number = int.from_bytes(hashlib.sha256(identity.encode()).digest()[:8], "big") >> 1
        return EventKey(subscription=_bounded(f"criteria:{notification.subscription or '-'}"), event_number=number)
    return None


def subject_patient_id(resource: dict[str, Any]) -> str | None:
    """Return the id of the Patient a resource's ``subject`` names, or None (no subject, or not a Patient)."""
    subject = resource.get("subject")
    ref = parse_reference(subject.get("reference")) if isinstance(subject, dict) else None
    if ref is None or ref.resource_type != "Patient":
        return None
    return ref.id


def parse_notification(
    body: bytes,
    *,
    subscription_hint: str | None = None,
    path_focus: ResourceRef | None = None,
) -> ParsedNotification:
    """Parse a rest-hook notification body.

    Args:
        body: the raw request body (empty for an R4 subscription without payload).
        subscription_hint: the subscription an R4 criteria-based sender named in a header.
        path_focus: the ``<type>/<id>`` an R4 sender PUT the resource to, when it did.

    Raises:
        UnreadableNotificationError: not JSON, or not a JSON object.
        InvalidNotificationError: JSON, but not a notification; the message names the element.
    """
    if not body.strip():
        return _criteria_based(None, subscription_hint, path_focus)
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise UnreadableNotificationError(f"the body is not JSON ({type(exc).__name__})") from exc
    if not isinstance(data, dict):
        raise UnreadableNotificationError(f"the body must be a JSON object (a FHIR resource), not a {_kind_of(data)}")
    resource_type = data.get("resourceType")
    if not isinstance(resource_type, str) or not resource_type:
        raise InvalidNotificationError("the body is not a FHIR resource: resourceType is missing")
    if resource_type == "Bundle" and path_focus is None:
        if data.get("type") in NOTIFICATION_BUNDLE_TYPES:
            return _topic_based(data)
        if _first_resource_type(data) in STATUS_TYPES:
            raise InvalidNotificationError(
                f"Bundle.type is {data.get('type')!r}: a subscription notification is "
                "'subscription-notification' (R4B/R5) or 'history' (R4 backport)"
            )
    return _criteria_based(data, subscription_hint, path_focus)


# -- topic-based ---------------------------------------------------------------------------------


class _Status(BaseModel):
    kind: str | None = None
    subscription: str | None = None
    topic: str | None = None
    status: str | None = None
    events_since_start: int | None = None
    events: list[NotifiedEvent] = Field(default_factory=list)


def _topic_based(bundle: dict[str, Any]) -> ParsedNotification:
    entries = bundle.get("entry")
    if not isinstance(entries, list) or not entries:
        raise InvalidNotificationError("the notification Bundle has no entry: entry[0] must be the subscription status")
    first = entries[0]
    status_resource = first.get("resource") if isinstance(first, dict) else None
    if not isinstance(status_resource, dict):
        raise InvalidNotificationError("Bundle.entry[0].resource is missing: it must be the subscription status")
    found = status_resource.get("resourceType")
    if found == "Parameters":
        flavor: NotificationFlavor = "r4-backport"
        status = _from_parameters(status_resource)
    elif found == "SubscriptionStatus":
        flavor = "r4b-r5"
        status = _from_subscription_status(status_resource)
    else:
        raise InvalidNotificationError(
            f"Bundle.entry[0] must be a SubscriptionStatus (R4B/R5) or a Parameters (R4 backport), not {found!r}"
        )
    where = "Parameters.parameter:type" if flavor == "r4-backport" else "SubscriptionStatus.type"
    if status.kind is None:
        raise InvalidNotificationError(f"{where} is missing: the notification type is required")
    if status.kind not in KINDS:
        raise InvalidNotificationError(f"{where} {status.kind!r} is not one of {', '.join(KINDS)}")
    if not status.subscription:
        raise InvalidNotificationError("the subscription status has no subscription reference")
    events = status.events
    if status.kind == "event-notification" and not events and status.events_since_start is not None:
        # Early backport servers sent only the running count; for a one-event notification it is
        # the event's number (the count includes this notification).
        events = [NotifiedEvent(event_number=status.events_since_start)]
    notification = ParsedNotification(
        flavor=flavor,
        kind=cast(NotificationKind, status.kind),  # checked against KINDS above
        subscription=status.subscription,
        topic=status.topic,
        status=status.status,
        events_since_start=status.events_since_start,
        events=events,
        resources=_included_resources(entries[1:]),
    )
    notification.payload = _payload_mode(notification)
    return notification


def _from_parameters(parameters: dict[str, Any]) -> _Status:
    """Read the R4 backport's ``backport-subscription-status-r4`` Parameters."""
    items = parameters.get("parameter")
    if not isinstance(items, list) or not items:
        raise InvalidNotificationError("Parameters.parameter is missing: the subscription status has no parameters")
    status = _Status()
    for index, item in enumerate(items):
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str):
            raise InvalidNotificationError(f"Parameters.parameter[{index}] has no name")
        where = f"Parameters.parameter:{name}"
        value = _value(item)
        if name == "subscription":
            status.subscription = _reference_value(value, where)
        elif name == "topic":
            status.topic = _string(value, where)
        elif name == "status":
            status.status = _string(value, where)
        elif name == "type":
            status.kind = _string(value, where)
        elif name == "events-since-subscription-start":
            status.events_since_start = _number(value, where)
        elif name == "notification-event":
            status.events.append(_event_from_parts(item, f"{where}[{len(status.events)}]"))
    return status


def _event_from_parts(item: dict[str, Any], where: str) -> NotifiedEvent:
    parts = item.get("part")
    if not isinstance(parts, list):
        raise InvalidNotificationError(f"{where} has no parts (event-number, timestamp, focus)")
    event = NotifiedEvent()
    for part in parts:
        name = part.get("name") if isinstance(part, dict) else None
        if not isinstance(name, str):
            raise InvalidNotificationError(f"{where}.part has an element without a name")
        value = _value(part)
        if name == "event-number":
            event.event_number = _number(value, f"{where}.part:event-number")
        elif name == "timestamp":
            event.timestamp = _instant(value, f"{where}.part:timestamp")
        elif name == "focus":
            event.focus = _reference_value(value, f"{where}.part:focus")
        elif name == "additional-context":
            context = _reference_value(value, f"{where}.part:additional-context")
            if context:
                event.additional_context.append(context)
    if event.event_number is None:
        raise InvalidNotificationError(f"{where} has no event-number part")
    return event


def _from_subscription_status(resource: dict[str, Any]) -> _Status:
    """Read an R4B/R5 ``SubscriptionStatus``."""
    status = _Status(
        kind=_string(resource.get("type"), "SubscriptionStatus.type"),
        subscription=_reference_value(resource.get("subscription"), "SubscriptionStatus.subscription"),
        topic=_string(resource.get("topic"), "SubscriptionStatus.topic"),
        status=_string(resource.get("status"), "SubscriptionStatus.status"),
        events_since_start=_number(
            resource.get("eventsSinceSubscriptionStart"), "SubscriptionStatus.eventsSinceSubscriptionStart"
        ),
    )
    items = resource.get("notificationEvent") or []
    if not isinstance(items, list):
        raise InvalidNotificationError("SubscriptionStatus.notificationEvent must be a list")
    for index, item in enumerate(items):
        where = f"SubscriptionStatus.notificationEvent[{index}]"
        if not isinstance(item, dict):
            raise InvalidNotificationError(f"{where} is not an object")
        number = _number(item.get("eventNumber"), f"{where}.eventNumber")
        if number is None:
            raise InvalidNotificationError(f"{where}.eventNumber is missing")
        contexts = item.get("additionalContext") or []
        if not isinstance(contexts, list):
            raise InvalidNotificationError(f"{where}.additionalContext must be a list")
        status.events.append(
            NotifiedEvent(
                event_number=number,
                timestamp=_instant(item.get("timestamp"), f"{where}.timestamp"),
                focus=_reference_value(item.get("focus"), f"{where}.focus"),
                additional_context=[
                    ref
                    for i, c in enumerate(contexts)
                    if (ref := _reference_value(c, f"{where}.additionalContext[{i}]")) is not None
                ],
            )
        )
    return status


def _included_resources(entries: list[Any]) -> dict[str, dict[str, Any]]:
    """Index the resources after the status entry by ``Type/id`` and by fullUrl."""
    resources: dict[str, dict[str, Any]] = {}
    for index, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict):
            raise InvalidNotificationError(f"Bundle.entry[{index}] is not an object")
        resource = entry.get("resource")
        if resource is None:
            continue  # id-only: the entry names the resource (fullUrl / request.url) without it
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            raise InvalidNotificationError(f"Bundle.entry[{index}].resource is not a FHIR resource")
        resource_id = resource.get("id")
        if isinstance(resource_id, str) and FHIR_ID.fullmatch(resource_id):
            resources[f"{resource['resourceType']}/{resource_id}"] = resource
        full_url = entry.get("fullUrl")
        if isinstance(full_url, str) and full_url:
            resources[full_url] = resource
    return resources


def _payload_mode(notification: ParsedNotification) -> PayloadMode:
    foci = [event.focus for event in notification.events if event.focus]
    if not foci:
        return "empty"
    if any(notification.included(focus) is not None for focus in foci):
        return "full-resource"
    return "id-only"


# -- R4 criteria-based ---------------------------------------------------------------------------


def _criteria_based(
    resource: dict[str, Any] | None, subscription_hint: str | None, path_focus: ResourceRef | None
) -> ParsedNotification:
    subscription = (subscription_hint.strip() or None) if subscription_hint else None
    if resource is None:
        events = [NotifiedEvent(focus=path_focus.relative)] if path_focus is not None else []
        return ParsedNotification(
            flavor="r4-criteria",
            kind="event-notification",
            subscription=subscription,
            events=events,
            payload="id-only" if events else "empty",
        )
    resource_type = str(resource["resourceType"])
    resource_id = resource.get("id")
    if path_focus is not None:
        if resource_type != path_focus.resource_type or resource_id not in (None, path_focus.id):
            raise InvalidNotificationError(
                f"the body is a {resource_type} that does not match the {path_focus.resource_type} the URL names"
            )
        resource_id = path_focus.id
    if not isinstance(resource_id, str) or not FHIR_ID.fullmatch(resource_id):
        raise InvalidNotificationError(f"the posted {resource_type} has no valid id")
    focus = f"{resource_type}/{resource_id}"
    return ParsedNotification(
        flavor="r4-criteria",
        kind="event-notification",
        subscription=subscription,
        events=[NotifiedEvent(focus=focus, version=_version_of(resource))],
        payload="full-resource",
        resources={focus: resource},
    )


def _version_of(resource: dict[str, Any]) -> str:
    meta = resource.get("meta")
    if isinstance(meta, dict):
        if isinstance(meta.get("versionId"), str | int) and str(meta["versionId"]):
            return str(meta["versionId"])
        if isinstance(meta.get("lastUpdated"), str) and meta["lastUpdated"]:
            return f"lastUpdated:{meta['lastUpdated']}"
    canonical = json.dumps(resource, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()[:32]


# -- values --------------------------------------------------------------------------------------


def _value(item: dict[str, Any]) -> Any:
    """Return a Parameters element's ``value[x]``, whatever its type."""
    return next((v for k, v in item.items() if k.startswith("value")), None)


def _string(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidNotificationError(f"{where} must be a string")
    return value.strip() or None


def _reference_value(value: Any, where: str) -> str | None:
    """Return ``reference`` of a Reference (or a bare string some servers send)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, dict):
        return _string(value.get("reference"), f"{where}.reference")
    raise InvalidNotificationError(f"{where} must be a Reference")


def _number(value: Any, where: str) -> int | None:
    """Return an event count or number: an integer, or a string of digits (integer64 is a string in JSON)."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer() and 0 <= value <= _MAX_EVENT_NUMBER:
        value = int(value)  # JSON has one number type: 12.0 is the integer 12
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidNotificationError(f"{where} must be a non-negative integer")
    text = str(value).strip()
    if not text.isdigit() or not text.isascii():
        raise InvalidNotificationError(f"{where} must be a non-negative integer")
    number = int(text)
    if number > _MAX_EVENT_NUMBER:
        raise InvalidNotificationError(f"{where} is larger than a 64-bit integer")
    return number


def _instant(value: Any, where: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidNotificationError(f"{where} must be an instant (e.g. 2024-05-01T10:00:00Z)")
    try:
        return datetime.fromisoformat(value.strip().upper())  # RFC 3339 allows a lower-case "t" and "z"
    except ValueError as exc:
        raise InvalidNotificationError(f"{where} must be an instant (e.g. 2024-05-01T10:00:00Z)") from exc


def _first_resource_type(bundle: dict[str, Any]) -> object:
    entries = bundle.get("entry")
    if isinstance(entries, list) and entries and isinstance(entries[0], dict):
        first = entries[0].get("resource")
        if isinstance(first, dict):
            return first.get("resourceType")
    return None


def _bounded(subscription: str) -> str:
    """Return the subscription as a key part, hashed when it would not fit (or not belong in) the key column."""
    if len(subscription) <= _MAX_SUBSCRIPTION_KEY and subscription.isprintable():
        return subscription
    return "sha256:" + hashlib.sha256(subscription.encode()).hexdigest()


def _kind_of(data: object) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(data), "value")


# -- the documented wire format ------------------------------------------------------------------


def notification_body_schema() -> dict[str, Any]:
    """Return the JSON schema of the bodies :func:`parse_notification` accepts (for the OpenAPI document).

    It spells out the elements the parser reads; every body it allows parses. Senders may add
    any other FHIR elements (meta, id, timestamp...): they are ignored.
    """
    digits = {"type": "string", "pattern": "^[0-9]{1,18}$"}
    number = {"anyOf": [{"type": "integer", "minimum": 0, "maximum": _MAX_EVENT_NUMBER}, digits]}
    instant = {"type": "string", "format": "date-time"}
    reference = {"type": "object", "properties": {"reference": {"type": "string"}}}
    required_reference = {
        "type": "object",
        "required": ["reference"],
        "properties": {"reference": {"type": "string", "pattern": "\\S", "examples": ["Subscription/123"]}},
    }

    def parameter(name: str, value_key: str, value: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "object",
            "required": ["name", value_key],
            "additionalProperties": False,
            "properties": {"name": {"const": name}, value_key: value},
        }

    subscription = parameter("subscription", "valueReference", required_reference)
    kind = parameter("type", "valueCode", {"enum": list(KINDS)})
    event_part = {
        "oneOf": [
            parameter("event-number", "valueString", digits),
            parameter("timestamp", "valueInstant", instant),
            parameter("focus", "valueReference", reference),
            parameter("additional-context", "valueReference", reference),
        ]
    }
    known = ["subscription", "type", "topic", "status", "events-since-subscription-start", "notification-event"]
    backport_status = {
        "title": "R4 backport subscription status (Parameters, profile backport-subscription-status-r4)",
        "type": "object",
        "required": ["resourceType", "parameter"],
        "properties": {
            "resourceType": {"const": "Parameters"},
            "parameter": {
                "type": "array",
                "items": {
                    "anyOf": [
                        subscription,
                        kind,
                        parameter("topic", "valueCanonical", {"type": "string"}),
                        parameter("status", "valueCode", {"type": "string"}),
                        parameter("events-since-subscription-start", "valueString", digits),
                        {
                            "type": "object",
                            "required": ["name", "part"],
                            "additionalProperties": False,
                            "properties": {
                                "name": {"const": "notification-event"},
                                "part": {
                                    "type": "array",
                                    "items": event_part,
                                    "contains": {"properties": {"name": {"const": "event-number"}}},
                                },
                            },
                        },
                        {
                            "type": "object",
                            "required": ["name"],
                            "properties": {"name": {"type": "string", "not": {"enum": known}}},
                        },
                    ]
                },
                "allOf": [{"contains": subscription}, {"contains": kind}],
            },
        },
    }
    subscription_status = {
        "title": "R4B/R5 SubscriptionStatus",
        "type": "object",
        "required": ["resourceType", "type", "subscription"],
        "properties": {
            "resourceType": {"const": "SubscriptionStatus"},
            "type": {"enum": list(KINDS)},
            "status": {"type": "string"},
            "subscription": required_reference,
            "topic": {"type": "string"},
            "eventsSinceSubscriptionStart": number,
            "notificationEvent": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["eventNumber"],
                    "properties": {
                        "eventNumber": number,
                        "timestamp": instant,
                        "focus": reference,
                        "additionalContext": {"type": "array", "items": reference},
                    },
                },
            },
        },
    }
    resource = {
        "type": "object",
        "required": ["resourceType"],
        "properties": {
            "resourceType": {"type": "string", "pattern": "^[A-Z][A-Za-z]{1,63}$"},
            "id": {"type": "string"},
        },
    }
    bundle = {
        "title": "Topic-based notification Bundle (R4 backport, R4B, R5)",
        "description": "entry[0] is the subscription status; further entries carry (full-resource) or name "
        "(id-only) the focus resources.",
        "type": "object",
        "required": ["resourceType", "type", "entry"],
        "properties": {
            "resourceType": {"const": "Bundle"},
            "type": {"enum": list(NOTIFICATION_BUNDLE_TYPES)},
            "entry": {
                "type": "array",
                "minItems": 1,
                "prefixItems": [
                    {
                        "type": "object",
                        "required": ["resource"],
                        "properties": {
                            "fullUrl": {"type": "string"},
                            "resource": {"oneOf": [subscription_status, backport_status]},
                        },
                    }
                ],
                "items": {"type": "object", "properties": {"fullUrl": {"type": "string"}, "resource": resource}},
            },
        },
    }
    criteria_resource = {
        "title": "R4 criteria-based delivery: the matching resource itself",
        "type": "object",
        "required": ["resourceType", "id"],
        "properties": {
            "resourceType": {"type": "string", "pattern": "^[A-Z][A-Za-z]{1,63}$", "not": {"const": "Bundle"}},
            "id": {"type": "string", "pattern": FHIR_ID.pattern},
            "meta": {"type": "object", "properties": {"versionId": {"type": "string"}}},
        },
    }
    return {"oneOf": [bundle, criteria_resource]}
