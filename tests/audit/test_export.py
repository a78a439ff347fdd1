"""Exports of real traces: FHIR AuditEvent/Provenance (BALP, DICOM audit), OpenTelemetry, plain JSON.

The traces come from the whole ask flow on the bundled fixtures (bundle-folder FHIR, DICOM
folder, SQLite trace), with the scripted reasoner and fake scorer of tests/graph, so every
record an export reads was written by the real recorder.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class

from agent.audit.export_fhir import BALP_PROFILE, export_fhir
from agent.audit.export_json import SCHEMA_VERSION, export_json
from agent.audit.export_otel import STATUS_ERROR, export_otel, send_otlp
from agent.audit.reader import RunTrace, TraceEvent, load_run
from agent.domain.answer import AskResult
from agent.errors import MedagentError, SourceUnavailableError
from agent.runner import AgentRuntime, run_ask
from tests.graph.test_ask_flow import PATIENTS, FakeScorer, ScriptedReasoner, _runtime

QUESTION = "Summarise the heart failure."
DCM = "http://dicom.nema.org/resources/ontology/DCM"


@dataclass
class Case:
    """One finished run: its runtime, its trace as read back, and what run_ask returned or raised."""

    runtime: AgentRuntime
    trace: RunTrace
    result: AskResult | None
    error: MedagentError | None


async def run_case(
    tmp_path: Path,
    kind: str,
    *,
    reasoner: Any = None,
    runtime: AgentRuntime | None = None,
    include_content: bool = True,
    **ask: Any,
) -> Case:
    """Run the ask flow for a fixture patient (``cxr``, ``noimg``, ``ct``) or ``unknown``, and read its trace."""
    runtime = runtime or _runtime(tmp_path, FakeScorer(), reasoner or ScriptedReasoner())
    patient_id = "no-such-patient" if kind == "unknown" else PATIENTS[kind]["patient_id"]
    try:
        result = await run_ask(runtime, patient_id=patient_id, question=QUESTION, **ask)
    except MedagentError as exc:
        trace = load_run(runtime.engine, exc.details["run_id"], include_content=include_content)
        return Case(runtime, trace, None, exc)
    return Case(runtime, load_run(runtime.engine, result.run_id, include_content=include_content), result, None)


def validate_bundle(bundle: dict[str, Any]) -> None:
    """Validate the bundle as a whole and every resource on its own with fhir.resources (R4B)."""
    get_fhir_model_class("Bundle").model_validate(bundle)
    for entry in bundle["entry"]:
        resource = entry["resource"]
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)


def resources(bundle: dict[str, Any], resource_type: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == resource_type]


def full_url(bundle: dict[str, Any], resource: dict[str, Any]) -> str:
    return next(e["fullUrl"] for e in bundle["entry"] if e["resource"] is resource)


def audit_events_by_seq(bundle: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Map each AuditEvent to the trace record it came from (its run entity's ``seq`` detail)."""
    found = {}
    for audit in resources(bundle, "AuditEvent"):
        run_entity = next(e for e in audit["entity"] if e["role"]["code"] == "20")
        seq = next(d["valueString"] for d in run_entity["detail"] if d["type"] == "seq")
        found[int(seq)] = audit
    return found


def entity_refs(audit: dict[str, Any], role_code: str) -> list[str]:
    return [e["what"]["reference"] for e in audit["entity"] if e["role"]["code"] == role_code and "what" in e]


def uid_values(audit: dict[str, Any]) -> set[str]:
    return {
        e["what"]["identifier"]["value"]
        for e in audit["entity"]
        if e["what"].get("identifier", {}).get("system") == "urn:dicom:uid"
    }


def accesses(trace: RunTrace, kind: str) -> list[TraceEvent]:
    return [e for e in trace.events if e.kind == kind]


# -- FHIR ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["cxr", "noimg", "unknown"])
async def test_fhir_export_validates_with_r4b(tmp_path: Path, kind: str) -> None:
    case = await run_case(tmp_path, kind)
    bundle = export_fhir(case.trace)
    assert bundle["type"] == "collection"
    validate_bundle(bundle)
    assert export_fhir(case.trace) == bundle  # deterministic: same run, same bundle


async def test_every_fhir_request_is_one_balp_audit_event(tmp_path: Path) -> None:
    case = await run_case(tmp_path, "cxr", user_id="dr.house", user_role="physician", purpose_of_use="TREAT")
    trace, patient_ref = case.trace, case.trace.run.patient_ref
    bundle = export_fhir(trace)
    by_seq = audit_events_by_seq(bundle)
    requests = accesses(trace, "fhir_request")
    assert len(by_seq) == len(requests) + len(accesses(trace, "dicom_retrieval"))

    for event in requests:
        audit = by_seq[event.seq]
        path = event.meta["path"]
        assert audit["type"]["code"] == "rest"
        if path == "metadata":  # the server's capabilities: not a patient access
            assert [s["code"] for s in audit["subtype"]] == ["capabilities"]
            assert "profile" not in audit.get("meta", {}) and entity_refs(audit, "1") == []
            continue
        assert audit["outcome"] == "0"
        assert entity_refs(audit, "1") == [patient_ref]  # the BALP patient entity
        if "?" in path:
            assert audit["meta"]["profile"] == [BALP_PROFILE + "PatientQuery"]
            assert [s["code"] for s in audit["subtype"]] == ["search-type"]
            assert audit["action"] == "E"
            query = next(e for e in audit["entity"] if e["role"]["code"] == "24")
            assert base64.b64decode(query["query"]).decode() == f"GET {path}"
            assert entity_refs(audit, "4") == event.meta["resource_ids"]  # each resource returned
        else:
            assert audit["meta"]["profile"] == [BALP_PROFILE + "PatientRead"]
            assert [s["code"] for s in audit["subtype"]] == ["read"]
            assert audit["action"] == "R"
            assert entity_refs(audit, "4") == [path] == event.meta["resource_ids"]
        user = next(a for a in audit["agent"] if a["requestor"])
        assert user["who"]["identifier"]["value"] == "dr.house"
        assert user["role"] == [{"text": "physician"}]
        assert user["purposeOfUse"][0]["coding"][0]["code"] == "TREAT"
        assert audit["source"]["observer"]["reference"].startswith("urn:uuid:")


async def test_every_dicom_access_is_one_dicom_audit_event(tmp_path: Path) -> None:
    case = await run_case(tmp_path, "cxr")
    by_seq = audit_events_by_seq(export_fhir(case.trace))
    retrievals = accesses(case.trace, "dicom_retrieval")
    assert {e.meta["action"] for e in retrievals} == {"search", "retrieve"}
    for event in retrievals:
        audit = by_seq[event.seq]
        if event.meta["action"] == "search":
            assert (audit["type"]["system"], audit["type"]["code"], audit["action"]) == (DCM, "110112", "E")
            query = next(e for e in audit["entity"] if e["role"]["code"] == "24")
            assert event.meta["study_uid"] in base64.b64decode(query["query"]).decode()
        else:
            assert (audit["type"]["system"], audit["type"]["code"], audit["action"]) == (DCM, "110103", "R")
            uids = ("study_uid", "series_uid", "sop_instance_uid")
            assert uid_values(audit) == {f"urn:oid:{event.meta[key]}" for key in uids}
        # who asked (unknown here) is always named, as BALP's user agent
        assert next(a for a in audit["agent"] if a["requestor"])["who"] == {"display": "unknown"}


async def test_provenance_names_the_context_sources_and_the_models(tmp_path: Path) -> None:
    case = await run_case(tmp_path, "cxr", user_id="dr.house")
    assert case.result is not None
    bundle = export_fhir(case.trace)
    (provenance,) = resources(bundle, "Provenance")
    (document,) = resources(bundle, "DocumentReference")

    context = next(e for e in case.trace.events if e.name == "context")
    assert [e["what"]["reference"] for e in provenance["entity"]] == context.meta["sources"] == case.result.sources
    assert {e["role"] for e in provenance["entity"]} == {"source"}

    assert provenance["target"] == [{"reference": full_url(bundle, document)}]
    text = base64.b64decode(document["content"][0]["attachment"]["data"]).decode()
    assert text == case.result.answer

    loads = accesses(case.trace, "model_load")
    model_devices = {
        full_url(bundle, d): d["deviceName"][0]["name"]
        for d in resources(bundle, "Device")
        if d["deviceName"][0]["type"] == "model-name"
    }
    assert sorted(model_devices.values()) == sorted(e.meta["model_id"] for e in loads)
    agents = {a["who"].get("reference"): a["type"]["coding"][0]["code"] for a in provenance["agent"]}
    assert set(model_devices) <= set(agents)
    reasoner = next(url for url, name in model_devices.items() if name == case.result.models["reasoner"])
    assert agents[reasoner] == "author"
    user = next(a for a in provenance["agent"] if a["who"].get("identifier"))
    assert user["who"]["identifier"]["value"] == "dr.house"
    finished = case.trace.events[-1]
    assert provenance["recorded"] == finished.at.isoformat()


async def test_failed_run_has_no_provenance_and_a_failed_read(tmp_path: Path) -> None:
    case = await run_case(tmp_path, "unknown")
    bundle = export_fhir(case.trace)
    assert resources(bundle, "Provenance") == [] and resources(bundle, "DocumentReference") == []
    (read,) = [e for e in case.trace.events if e.kind == "fhir_request"]
    audit = audit_events_by_seq(bundle)[read.seq]
    assert audit["outcome"] == "4"  # 404: the patient is not there
    assert "meta" not in audit  # BALP's profiles describe successful reads only
    assert "no-such-patient" in audit["outcomeDesc"]


async def test_export_without_content_keeps_the_shape_but_not_the_answer(tmp_path: Path) -> None:
    case = await run_case(tmp_path, "noimg", include_content=False)
    bundle = export_fhir(case.trace)
    validate_bundle(bundle)
    (document,) = resources(bundle, "DocumentReference")
    attachment = document["content"][0]["attachment"]
    assert "data" not in attachment and "not included" in document["description"]
    assert resources(bundle, "Provenance")[0]["entity"]  # sources are metadata: still listed


async def test_base_url_makes_server_references_absolute(tmp_path: Path) -> None:
    case = await run_case(tmp_path, "noimg")
    base = "https://fhir.example.org/r4"
    bundle = export_fhir(case.trace, base_url=base + "/")
    validate_bundle(bundle)
    provenance = resources(bundle, "Provenance")[0]
    assert all(e["what"]["reference"].startswith(base + "/") for e in provenance["entity"])
    audit = resources(bundle, "AuditEvent")[0]
    server = next(a for a in audit["agent"] if a.get("network", {}).get("type") == "5")
    assert server["network"]["address"] == base


# -- OpenTelemetry -------------------------------------------------------------------------------


def otel_spans(payload: dict[str, Any]) -> list[dict[str, Any]]:
    return [span for rs in payload["resourceSpans"] for ss in rs["scopeSpans"] for span in ss["spans"]]


def plain(value: dict[str, Any]) -> Any:
    """Return an OTLP AnyValue as Python data (int64 values stay decimal strings, as OTLP/JSON has them)."""
    (kind, inner), *_ = value.items()
    if kind == "arrayValue":
        return [plain(item) for item in inner.get("values", [])]
    if kind == "kvlistValue":
        return {item["key"]: plain(item["value"]) for item in inner.get("values", [])}
    return inner


def attrs(span_or_event: dict[str, Any]) -> dict[str, Any]:
    """Return a span's or span event's attributes as Python data."""
    return {a["key"]: plain(a["value"]) for a in span_or_event["attributes"]}


async def test_otel_has_a_span_per_node_call_and_access_with_parents(tmp_path: Path) -> None:
    case = await run_case(tmp_path, "cxr")
    trace = case.trace
    spans = otel_spans(export_otel(trace))
    (root,) = [s for s in spans if not s["parentSpanId"]]
    assert root["traceId"] == trace.run.run_id.replace("-", "")
    assert len({s["spanId"] for s in spans}) == len(spans)
    assert all(int(s["startTimeUnixNano"]) <= int(s["endTimeUnixNano"]) for s in spans)

    nodes = [e.name for e in trace.events if e.kind == "node_started"]
    node_spans = {s["name"]: s for s in spans if "medagent.node" in attrs(s)}
    assert list(node_spans) == nodes
    assert all(s["parentSpanId"] == root["spanId"] for s in node_spans.values())

    calls = {s["name"]: s for s in spans if "gen_ai.request.model" in attrs(s)}
    assert set(calls) == {"embeddings fake-siglip", "zero_shot_classification fake-siglip", "chat scripted-reasoner"}
    chat = calls["chat scripted-reasoner"]
    assert chat["parentSpanId"] == node_spans["reason"]["spanId"]
    assert calls["zero_shot_classification fake-siglip"]["parentSpanId"] == node_spans["image_findings"]["spanId"]
    generate = next(e for e in trace.events if e.name == "medgemma.generate")
    assert (
        attrs(chat).items()
        >= {
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": "scripted-reasoner",
            "gen_ai.provider.name": "test",
            "gen_ai.usage.input_tokens": str(generate.meta["prompt_tokens"]),
            "gen_ai.usage.output_tokens": str(generate.meta["output_tokens"]),
        }.items()
    )

    access = [s for s in spans if "medagent.source.backend" in attrs(s)]
    assert len(access) == len(accesses(trace, "fhir_request")) + len(accesses(trace, "dicom_retrieval"))
    fhir_parents = {s["parentSpanId"] for s in access if "http.request.method" in attrs(s)}
    assert fhir_parents == {node_spans["resolve_patient"]["spanId"], node_spans["fetch_history"]["spanId"]}
    assert {attrs(s)["url.template"] for s in access if "url.template" in attrs(s)} >= {"Patient/{id}", "Condition"}


async def test_otel_leaves_content_out_unless_asked(tmp_path: Path) -> None:
    case = await run_case(tmp_path, "cxr")
    generate = next(e for e in case.trace.events if e.name == "medgemma.generate")
    prompt, output = generate.content["prompt"], generate.content["output"]
    patient_id = PATIENTS["cxr"]["patient_id"]

    def escaped(text: str) -> str:  # the text as it appears inside a JSON document
        return json.dumps(text)[1:-1]

    plain = json.dumps(export_otel(case.trace))
    for secret in (QUESTION, escaped(prompt)[:200], escaped(output), patient_id):
        assert secret not in plain
    assert all(
        "events" not in s or not any("gen_ai" in e["name"] for e in s["events"]) for s in otel_spans(json.loads(plain))
    )

    full = export_otel(case.trace, include_content=True)
    chat = next(s for s in otel_spans(full) if s["name"] == "chat scripted-reasoner")
    (details,) = chat["events"]
    assert details["name"] == "gen_ai.client.inference.operation.details"
    content = attrs(details)
    assert content["gen_ai.input.messages"] == [{"role": "user", "parts": [{"type": "text", "content": prompt}]}]
    assert content["gen_ai.output.messages"][0]["parts"] == [{"type": "text", "content": output}]
    assert content["gen_ai.system_instructions"] == [{"type": "text", "content": generate.content["system"]}]


async def test_otel_carries_the_token_budget_and_finish_reason(tmp_path: Path) -> None:
    case = await run_case(tmp_path, "noimg")
    generate = next(e for e in case.trace.events if e.name == "medgemma.generate")
    used = generate.meta["output_tokens"]
    # the tiny and real reasoners record their generation parameters; the scripted one does not
    budget = generate.model_copy(update={"meta": {**generate.meta, "parameters": {"max_new_tokens": used}}})
    trace = case.trace.model_copy(update={"events": [budget if e is generate else e for e in case.trace.events]})
    chat = next(s for s in otel_spans(export_otel(trace, include_content=True)) if s["name"].startswith("chat "))
    assert attrs(chat)["gen_ai.request.max_tokens"] == str(used)
    (details,) = chat["events"]
    (output,) = attrs(details)["gen_ai.output.messages"]
    assert output["finish_reason"] == "length" and output["role"] == "assistant"


async def test_otel_marks_the_failed_node_and_run(tmp_path: Path) -> None:
    case = await run_case(tmp_path, "unknown")
    spans = otel_spans(export_otel(case.trace))
    failed = next(s for s in spans if s["name"] == "resolve_patient")
    assert failed["status"]["code"] == STATUS_ERROR
    assert failed["status"]["message"].startswith("patient_not_found")
    root = next(s for s in spans if not s["parentSpanId"])
    assert root["status"]["code"] == STATUS_ERROR and attrs(root)["medagent.failing_step"] == "resolve_patient"
    assert next(s for s in spans if s["name"] == "load_models")["status"] == {"code": 0}


class _Collector(BaseHTTPRequestHandler):
    """A tiny OTLP/HTTP receiver: keeps each request's path and body, answers as configured."""

    received: list[tuple[str, bytes]]
    reply: tuple[int, bytes]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        type(self).received.append((self.path, body))
        status, answer = type(self).reply
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: Any) -> None:  # keep the test output clean
        pass


@pytest.fixture
def collector() -> Iterator[tuple[str, type[_Collector]]]:
    handler = type("Handler", (_Collector,), {"received": [], "reply": (200, b"{}")})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


async def test_send_otlp_posts_json_to_v1_traces(tmp_path: Path, collector: tuple[str, type[_Collector]]) -> None:
    endpoint, handler = collector
    case = await run_case(tmp_path, "noimg")
    payload = export_otel(case.trace)
    send_otlp(payload, endpoint, headers={"Authorization": "Bearer t"})
    ((path, body),) = handler.received
    assert path == "/v1/traces" and json.loads(body) == payload


async def test_send_otlp_raises_when_the_collector_refuses(collector: tuple[str, type[_Collector]]) -> None:
    endpoint, handler = collector
    handler.reply = (500, b"{}")
    with pytest.raises(SourceUnavailableError, match="HTTP 500"):
        send_otlp({"resourceSpans": []}, endpoint + "/v1/traces")
    handler.reply = (200, json.dumps({"partialSuccess": {"rejectedSpans": 2, "errorMessage": "bad"}}).encode())
    with pytest.raises(SourceUnavailableError, match="rejected 2"):
        send_otlp({"resourceSpans": []}, endpoint)


def test_send_otlp_raises_when_nothing_listens() -> None:
    import socket

    with socket.socket() as sock:  # a port that was free a moment ago
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(SourceUnavailableError, match="could not be reached"):
        send_otlp({"resourceSpans": []}, f"http://127.0.0.1:{port}", timeout_s=2)


# -- plain JSON ----------------------------------------------------------------------------------


async def test_json_export_is_the_whole_trace_with_a_schema_version(tmp_path: Path) -> None:
    case = await run_case(tmp_path, "cxr")
    exported = json.loads(json.dumps(export_json(case.trace)))
    assert exported["schema_version"] == SCHEMA_VERSION and exported["content_included"] is True
    assert exported["run"]["run_id"] == case.trace.run.run_id
    assert [e["seq"] for e in exported["events"]] == [e.seq for e in case.trace.events]
    assert RunTrace.model_validate({k: exported[k] for k in RunTrace.model_fields}) == case.trace

    metadata_only = load_run(case.runtime.engine, case.trace.run.run_id, include_content=False)
    assert export_json(metadata_only)["content_included"] is False


async def test_runs_are_sent_to_a_configured_otlp_endpoint(
    tmp_path: Path, collector: tuple[str, type[_Collector]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With MEDAGENT_AUDIT__OTLP_ENDPOINT set, every finished run's spans reach the collector, without content."""
    endpoint, handler = collector
    monkeypatch.setenv("MEDAGENT_AUDIT__OTLP_ENDPOINT", endpoint)
    case = await run_case(tmp_path, "noimg")
    ((path, body),) = handler.received
    assert path == "/v1/traces"
    sent = json.loads(body)
    assert sent == export_otel(case.trace)  # the metadata-only export of the same run
    assert case.result.answer not in body.decode()
