"""Parsing FHIR subscription notifications: R4 backport, R4B/R5 and R4 criteria-based, every payload mode.

The builders below write notification bodies from the structure the specifications define (the
Subscriptions R5 Backport IG's Parameters profile, R4B/R5 SubscriptionStatus, R4 rest-hook
deliveries); the API tests in tests/service use them too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest

from agent.integrations.fhir_notifications import (
    InvalidNotificationError,
    ResourceRef,
    UnreadableNotificationError,
    event_key,
    parse_notification,
    parse_reference,
    subject_patient_id,
)

SERVER = "https://fhir.example.org/r4"
TOPIC = "http://example.org/SubscriptionTopic/new-imaging-or-result"

#: (event number, focus reference or None, timestamp or None)
Event = tuple[int, str | None, str | None]


def imaging_study(study_id: str, patient_id: str, *, version: str | None = "1") -> dict[str, Any]:
    """Return a minimal ImagingStudy of the patient."""
    resource: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "id": study_id,
        "status": "available",
        "subject": {"reference": f"Patient/{patient_id}"},
    }
    if version is not None:
        resource["meta"] = {"versionId": version, "lastUpdated": "2026-10-14T14:20:00Z"}
    return resource


def diagnostic_report(report_id: str, patient_id: str) -> dict[str, Any]:
    """Return a minimal final DiagnosticReport of the patient."""
    return {
        "resourceType": "DiagnosticReport",
        "id": report_id,
        "status": "final",
        "code": {"text": "Chest X-ray report"},
        "subject": {"reference": f"Patient/{patient_id}"},
    }


def _resource_entries(resources: Sequence[dict[str, Any]], id_only: Sequence[str]) -> list[dict[str, Any]]:
    entries = [
        {
            "fullUrl": f"{SERVER}/{r['resourceType']}/{r['id']}",
            "resource": r,
            "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"},
            "response": {"status": "201"},
        }
        for r in resources
    ]
    entries += [
        {"fullUrl": f"{SERVER}/{ref}", "request": {"method": "PUT", "url": ref}, "response": {"status": "201"}}
        for ref in id_only
    ]
    return entries


def backport_bundle(
    *,
    kind: str = "event-notification",
    subscription: str = "Subscription/sub-1",
    events: Sequence[Event] = (),
    resources: Sequence[dict[str, Any]] = (),
    id_only: Sequence[str] = (),
    since: int | None = None,
) -> dict[str, Any]:
    """Return an R4 backport notification: a history Bundle led by a backport-subscription-status-r4 Parameters."""
    parameters: list[dict[str, Any]] = [
        {"name": "subscription", "valueReference": {"reference": subscription}},
        {"name": "topic", "valueCanonical": TOPIC},
        {"name": "status", "valueCode": "active"},
        {"name": "type", "valueCode": kind},
        {
            "name": "events-since-subscription-start",
            "valueString": str(since if since is not None else max((e[0] for e in events), default=0)),
        },
    ]
    for number, focus, timestamp in events:
        parts: list[dict[str, Any]] = [{"name": "event-number", "valueString": str(number)}]
        if timestamp:
            parts.append({"name": "timestamp", "valueInstant": timestamp})
        if focus:
            parts.append({"name": "focus", "valueReference": {"reference": focus}})
        parameters.append({"name": "notification-event", "part": parts})
    status = {
        "resourceType": "Parameters",
        "meta": {
            "profile": [
                "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription-status-r4"
            ]
        },
        "parameter": parameters,
    }
    return {
        "resourceType": "Bundle",
        "type": "history",
        "timestamp": "2026-10-14T14:20:01Z",
        "entry": [
            {
                "fullUrl": "urn:uuid:9e41ff6d-5be6-4e6a-8b85-abd4e7f58400",
                "resource": status,
                "request": {"method": "GET", "url": f"{SERVER}/{subscription}/$status"},
                "response": {"status": "200"},
            },
            *_resource_entries(resources, id_only),
        ],
    }


def r5_bundle(
    *,
    kind: str = "event-notification",
    subscription: str = "Subscription/sub-5",
    events: Sequence[Event] = (),
    resources: Sequence[dict[str, Any]] = (),
    id_only: Sequence[str] = (),
    numbers_as_strings: bool = True,
) -> dict[str, Any]:
    """Return an R4B/R5 notification: a subscription-notification Bundle led by a SubscriptionStatus."""

    def number(value: int) -> int | str:
        return str(value) if numbers_as_strings else value  # integer64 is a JSON string in R5

    status: dict[str, Any] = {
        "resourceType": "SubscriptionStatus",
        "status": "active",
        "type": kind,
        "eventsSinceSubscriptionStart": number(max((e[0] for e in events), default=0)),
        "subscription": {"reference": subscription},
        "topic": TOPIC,
    }
    if events:
        status["notificationEvent"] = [
            {
                "eventNumber": number(n),
                **({"timestamp": t} if t else {}),
                **({"focus": {"reference": f}} if f else {}),
            }
            for n, f, t in events
        ]
    return {
        "resourceType": "Bundle",
        "type": "subscription-notification",
        "timestamp": "2026-10-14T14:20:01Z",
        "entry": [
            {"fullUrl": "urn:uuid:0d2b5a8e-2b1c-4d47-a8f4-5f3b2a7b9c10", "resource": status},
            *_resource_entries(resources, id_only),
        ],
    }


def body(data: dict[str, Any]) -> bytes:
    """Return a notification as the bytes a server sends."""
    return json.dumps(data).encode()


# -- topic-based ---------------------------------------------------------------------------------

STUDY = imaging_study("study-1", "pat-1")
REPORT = diagnostic_report("report-1", "pat-2")


def test_r4_backport_full_resource_event() -> None:
    data = backport_bundle(
        events=[(7, "ImagingStudy/study-1", "2026-10-14T14:20:00Z"), (8, f"{SERVER}/DiagnosticReport/report-1", None)],
        resources=[STUDY, REPORT],
    )
    parsed = parse_notification(body(data))
    assert (parsed.flavor, parsed.kind, parsed.payload) == ("r4-backport", "event-notification", "full-resource")
    assert parsed.subscription == "Subscription/sub-1" and parsed.topic == TOPIC and parsed.status == "active"
    assert parsed.events_since_start == 8
    assert [(e.event_number, e.focus) for e in parsed.events] == [
        (7, "ImagingStudy/study-1"),
        (8, f"{SERVER}/DiagnosticReport/report-1"),
    ]
    assert parsed.events[0].timestamp is not None and parsed.events[0].timestamp.year == 2026
    assert parsed.included("ImagingStudy/study-1") == STUDY
    assert parsed.included(f"{SERVER}/DiagnosticReport/report-1") == REPORT  # by fullUrl
    assert parsed.included("DiagnosticReport/report-1") == REPORT  # and by Type/id
    assert subject_patient_id(STUDY) == "pat-1"


def test_r4_backport_id_only_and_empty_payloads() -> None:
    id_only = parse_notification(
        body(backport_bundle(events=[(3, "ImagingStudy/s-9", None)], id_only=["ImagingStudy/s-9"]))
    )
    assert id_only.payload == "id-only"
    assert id_only.events[0].focus == "ImagingStudy/s-9" and id_only.included("ImagingStudy/s-9") is None

    empty = parse_notification(body(backport_bundle(events=[(4, None, None), (5, None, None)])))
    assert empty.payload == "empty"
    assert [(e.event_number, e.focus) for e in empty.events] == [(4, None), (5, None)]


def test_early_backport_count_only_becomes_the_event_number() -> None:
    data = backport_bundle(events=[], since=12)
    parsed = parse_notification(body(data))
    assert [e.event_number for e in parsed.events] == [12] and parsed.payload == "empty"


@pytest.mark.parametrize("builder", [backport_bundle, r5_bundle])
@pytest.mark.parametrize("kind", ["handshake", "heartbeat", "query-status"])
def test_handshake_heartbeat_and_status_carry_no_events(builder: Any, kind: str) -> None:
    parsed = parse_notification(body(builder(kind=kind)))
    assert parsed.kind == kind and parsed.events == [] and parsed.payload == "empty"
    assert parsed.subscription and parsed.subscription.startswith("Subscription/")


@pytest.mark.parametrize("as_strings", [True, False])
def test_r5_subscription_status_full_resource_and_id_only(as_strings: bool) -> None:
    full = parse_notification(
        body(
            r5_bundle(
                events=[(41, "DiagnosticReport/report-1", "2026-10-14T14:20:00+02:00")],
                resources=[REPORT],
                numbers_as_strings=as_strings,
            )
        )
    )
    assert (full.flavor, full.kind, full.payload) == ("r4b-r5", "event-notification", "full-resource")
    assert full.subscription == "Subscription/sub-5" and full.events_since_start == 41
    assert full.events[0].event_number == 41 and full.included("DiagnosticReport/report-1") == REPORT

    id_only = parse_notification(body(r5_bundle(events=[(42, "ImagingStudy/x", None)], id_only=["ImagingStudy/x"])))
    assert id_only.payload == "id-only" and id_only.events[0].focus == "ImagingStudy/x"
    empty = parse_notification(body(r5_bundle(events=[(43, None, None)])))
    assert empty.payload == "empty" and empty.events[0].event_number == 43


def test_topic_event_keys_are_subscription_and_event_number() -> None:
    parsed = parse_notification(body(backport_bundle(events=[(7, "ImagingStudy/study-1", None)], resources=[STUDY])))
    key = event_key(parsed, parsed.events[0])
    assert key is not None and (key.subscription, key.event_number) == ("Subscription/sub-1", 7)
    assert key.idempotency_key == "sub:Subscription/sub-1:7"
    again = parse_notification(body(r5_bundle(subscription="Subscription/sub-1", events=[(7, None, None)])))
    assert event_key(again, again.events[0]) == key  # same event, however it is delivered

    long = "https://fhir.example.org/" + "x" * 300 + "/Subscription/s"
    parsed_long = parse_notification(body(backport_bundle(subscription=long, events=[(1, "ImagingStudy/a", None)])))
    long_key = event_key(parsed_long, parsed_long.events[0])
    assert long_key is not None and len(long_key.idempotency_key) <= 200 and long_key.subscription.startswith("sha256:")


# -- R4 criteria-based ---------------------------------------------------------------------------


def test_criteria_based_resource_is_a_full_resource_event_keyed_by_version() -> None:
    parsed = parse_notification(
        body(imaging_study("study-1", "pat-1", version="3")), subscription_hint="Subscription/c-1"
    )
    assert (parsed.flavor, parsed.kind, parsed.payload) == ("r4-criteria", "event-notification", "full-resource")
    assert parsed.subscription == "Subscription/c-1"
    assert [(e.event_number, e.focus, e.version) for e in parsed.events] == [(None, "ImagingStudy/study-1", "3")]
    assert parsed.included("ImagingStudy/study-1") is not None
    key = event_key(parsed, parsed.events[0])
    assert key is not None and key.subscription == "criteria:Subscription/c-1"
    assert 0 <= key.event_number < 2**63

    redelivered = parse_notification(
        body(imaging_study("study-1", "pat-1", version="3")), subscription_hint="Subscription/c-1"
    )
    assert event_key(redelivered, redelivered.events[0]) == key
    updated = parse_notification(
        body(imaging_study("study-1", "pat-1", version="4")), subscription_hint="Subscription/c-1"
    )
    assert event_key(updated, updated.events[0]) != key


def test_criteria_version_falls_back_to_last_updated_then_content() -> None:
    stamped = imaging_study("s", "p", version=None) | {"meta": {"lastUpdated": "2026-01-01T00:00:00Z"}}
    assert parse_notification(body(stamped)).events[0].version == "lastUpdated:2026-01-01T00:00:00Z"
    bare = imaging_study("s", "p", version=None)
    first = parse_notification(body(bare))
    assert first.events[0].version is not None and first.events[0].version.startswith("sha256:")
    same = parse_notification(json.dumps(bare, indent=2).encode())  # formatting does not change the key
    changed = parse_notification(body(bare | {"status": "cancelled"}))
    assert event_key(same, same.events[0]) == event_key(first, first.events[0])
    assert event_key(changed, changed.events[0]) != event_key(first, first.events[0])
    assert event_key(first, first.events[0]).subscription == "criteria:-"  # type: ignore[union-attr]


def test_criteria_empty_body_and_put_path() -> None:
    empty = parse_notification(b"  \n")
    assert (empty.flavor, empty.payload, empty.events) == ("r4-criteria", "empty", [])

    path = ResourceRef(resource_type="ImagingStudy", id="study-1")
    by_path = parse_notification(b"", path_focus=path)
    assert by_path.payload == "id-only" and by_path.events[0].focus == "ImagingStudy/study-1"
    put = parse_notification(body(imaging_study("study-1", "pat-1")), path_focus=path)
    assert put.payload == "full-resource" and put.included("ImagingStudy/study-1") is not None
    with pytest.raises(InvalidNotificationError, match="does not match"):
        parse_notification(body(diagnostic_report("report-1", "p")), path_focus=path)


# -- references ----------------------------------------------------------------------------------


def test_references() -> None:
    assert parse_reference("ImagingStudy/abc") == ResourceRef(resource_type="ImagingStudy", id="abc")
    absolute = parse_reference(f"{SERVER}/DiagnosticReport/r-1/_history/2")
    assert absolute == ResourceRef(resource_type="DiagnosticReport", id="r-1", version="2", base=SERVER)
    assert parse_reference("urn:uuid:0d2b5a8e-2b1c-4d47-a8f4-5f3b2a7b9c10") is None
    assert parse_reference("ImagingStudy/../../etc") is None
    assert subject_patient_id({"subject": {"reference": "Group/g-1"}}) is None
    assert subject_patient_id({"subject": {"reference": f"{SERVER}/Patient/p-7"}}) == "p-7"
    assert subject_patient_id({}) is None


# -- malformed -----------------------------------------------------------------------------------


def _status_first(data: dict[str, Any]) -> dict[str, Any]:
    resource: dict[str, Any] = data["entry"][0]["resource"]
    return resource


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b"[" * 100_000, "not JSON"),
    ],
)
def test_unreadable_bodies_are_400(raw: bytes, message: str) -> None:
    with pytest.raises(UnreadableNotificationError, match=message) as caught:
        parse_notification(raw)
    assert caught.value.http_status == 400


def _without_type(data: dict[str, Any]) -> dict[str, Any]:
    _status_first(data)["parameter"] = [p for p in _status_first(data)["parameter"] if p["name"] != "type"]
    return data


def _event_number(value: Any) -> dict[str, Any]:
    data = backport_bundle(events=[(1, "ImagingStudy/a", None)])
    _status_first(data)["parameter"][-1]["part"][0] = {"name": "event-number", "valueString": value}
    return data


def _r5_without_event_number() -> dict[str, Any]:
    data = r5_bundle(events=[(1, "ImagingStudy/a", None)])
    del _status_first(data)["notificationEvent"][0]["eventNumber"]
    return data


MALFORMED: list[tuple[str, dict[str, Any], str]] = [
    ("no resourceType", {"entry": []}, "resourceType is missing"),
    ("no entries", {"resourceType": "Bundle", "type": "history", "entry": []}, "no entry"),
    (
        "first entry not a status",
        {"resourceType": "Bundle", "type": "history", "entry": [{"resource": {"resourceType": "Patient", "id": "p"}}]},
        "entry\\[0\\] must be a SubscriptionStatus",
    ),
    ("wrong bundle type", backport_bundle() | {"type": "collection"}, "Bundle.type is 'collection'"),
    ("no notification type", _without_type(backport_bundle()), "parameter:type is missing"),
    ("unknown notification type", backport_bundle(kind="event-notifcation"), "not one of"),
    ("event number not a number", _event_number("seven"), "event-number must be a non-negative integer"),
    ("negative event number", _event_number("-1"), "non-negative"),
    ("event number too large", _event_number(str(2**64)), "64-bit"),
    ("event without number", _r5_without_event_number(), "notificationEvent\\[0\\].eventNumber is missing"),
    ("no subscription", backport_bundle(subscription=""), "no subscription reference"),
    ("resource without id", {"resourceType": "ImagingStudy", "status": "available"}, "no valid id"),
]


@pytest.mark.parametrize(("name", "data", "message"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_notifications_name_what_is_wrong(name: str, data: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidNotificationError, match=message) as caught:
        parse_notification(body(data))
    assert caught.value.http_status == 422 and caught.value.code == "notification_invalid"


def test_bad_timestamp_and_focus_types_are_named() -> None:
    data = r5_bundle(events=[(1, "ImagingStudy/a", "yesterday")])
    with pytest.raises(InvalidNotificationError, match=r"notificationEvent\[0\].timestamp must be an instant"):
        parse_notification(body(data))
    data = r5_bundle(events=[(1, "ImagingStudy/a", None)])
    _status_first(data)["notificationEvent"][0]["focus"] = 42
    with pytest.raises(InvalidNotificationError, match=r"notificationEvent\[0\].focus must be a Reference"):
        parse_notification(body(data))


def test_integral_json_numbers_are_event_numbers() -> None:
    data = r5_bundle(events=[(5, "ImagingStudy/a", None)], numbers_as_strings=False)
    _status_first(data)["notificationEvent"][0]["eventNumber"] = 5.0  # JSON has one number type
    assert parse_notification(body(data)).events[0].event_number == 5
    _status_first(data)["notificationEvent"][0]["eventNumber"] = 5.5
    with pytest.raises(InvalidNotificationError, match="eventNumber must be a non-negative integer"):
        parse_notification(body(data))
