"""Export one run's trace as OpenTelemetry spans (OTLP/JSON), and send them to a collector.

This sits at the end of the flow, after :func:`agent.audit.reader.load_run`: operations teams
look at runs in the tracing backend they already use (Jaeger, Tempo, Phoenix, Langfuse, ...).
The spans are rebuilt from the recorded trace rather than emitted live, so what the backend
shows is exactly what the audit trail holds:

* one root span for the run (``invoke_agent medagent``);
* one span per graph node, from its ``node_started`` / ``node_finished`` records;
* one span per model call, child of the node it ran in, with the OpenTelemetry GenAI semantic
  conventions (``gen_ai.*``; semconv v1.37+, ``docs/gen-ai/gen-ai-spans.md``);
* one span per FHIR request and DICOM retrieval, child of its node.

Telemetry backends are rarely held to the access rules of a clinical record, so by default no
PHI leaves: no prompt, output or answer text, and no identifiers (FHIR ids, DICOM UIDs, patient
reference). ``include_content=True`` adds them, the prompts and outputs as the GenAI
``gen_ai.client.inference.operation.details`` span event.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from agent.audit import recorder as kinds
from agent.audit.export_json import readable_content
from agent.audit.reader import RunTrace, TraceEvent
from agent.errors import SourceUnavailableError

#: Instrumentation scope of the exported spans.
SCOPE_NAME = "medagent.audit.export_otel"

# OTLP enums (opentelemetry/proto/trace/v1/trace.proto).
SPAN_KIND_INTERNAL = 1
SPAN_KIND_CLIENT = 3
STATUS_UNSET = 0
STATUS_ERROR = 2

# gen_ai.operation.name per recorded call. MedGemma runs its chat template over one user turn,
# which is the well-known "chat" operation. MedSigLIP zero-shot returns label scores, not
# vectors: calling it "embeddings" would make backends treat its output as embeddings, so the
# semconv's allowance for a custom value is used ("If one of them applies, then the respective
# value MUST be used; otherwise, a custom value MAY be used").
_OPERATIONS = {
    "medgemma.generate": "chat",
    "medsiglip.zero_shot": "zero_shot_classification",
    "medsiglip.embed_images": "embeddings",
    "classifier.predict": "classification",
}

# Backends that run the model inside this process; the semconv suggests span kind INTERNAL for
# those and CLIENT for a model behind a network call.
_IN_PROCESS_BACKENDS = {"transformers", "test"}

# "Type/id" (optionally "/_history/vid"): the id is replaced by a placeholder in url.template.
_READ_PATH = re.compile(r"^/?(?P<type>[A-Z][A-Za-z]{1,63})/[^/?]+(?P<history>/_history/[^/?]+)?$")
_TYPE_PATH = re.compile(r"^/?(?P<type>[A-Z][A-Za-z]{1,63})(?:\?|$)")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def export_otel(trace: RunTrace, *, include_content: bool = False) -> dict[str, Any]:
    """Return the run as an OTLP/JSON ``ExportTraceServiceRequest`` (``{"resourceSpans": [...]}``).

    The trace id is the run id's UUID (or a hash of it), and each span id is derived from the
    run id and the seq of the record that opens the span, so exporting a run twice yields the
    same ids and a collector can de-duplicate.

    Args:
        trace: the run, as read by :func:`agent.audit.reader.load_run`.
        include_content: also export prompts, outputs and identifiers (PHI). Off by default.
    """
    return _SpanBuilder(trace, include_content).request()


def send_otlp(
    payload: dict[str, Any],
    endpoint: str,
    *,
    headers: dict[str, str] | None = None,
    timeout_s: float = 10,
) -> None:
    """POST an OTLP/JSON payload to a collector's OTLP/HTTP traces endpoint.

    Args:
        payload: what :func:`export_otel` returned.
        endpoint: the collector's OTLP/HTTP base URL (``http://host:4318``); ``/v1/traces`` is
            appended unless the URL already ends with it, as OTEL_EXPORTER_OTLP_ENDPOINT works.
        headers: extra headers, e.g. an API key (never logged or put in an error message).
        timeout_s: seconds to wait for the collector.

    Raises:
        SourceUnavailableError: the collector could not be reached, timed out, answered with a
            non-2xx status, or reported rejected spans.
    """
    url = endpoint.rstrip("/")
    if not url.endswith("/v1/traces"):
        url += "/v1/traces"
    try:
        response = httpx.post(
            url,
            content=json.dumps(payload).encode(),
            headers={**(headers or {}), "Content-Type": "application/json"},
            timeout=timeout_s,
        )
    except httpx.TimeoutException as exc:
        raise SourceUnavailableError(f"OTLP endpoint {url} timed out after {timeout_s:g}s") from exc
    except httpx.HTTPError as exc:
        reason = str(exc) or type(exc).__name__
        raise SourceUnavailableError(f"OTLP endpoint {url} could not be reached: {reason}") from exc
    if not 200 <= response.status_code < 300:
        raise SourceUnavailableError(
            f"OTLP endpoint {url} refused the spans (HTTP {response.status_code})",
            details={"status": response.status_code},
        )
    # A 2xx may still carry a partial success: the collector dropped some spans.
    try:
        answer = response.json() if response.content else {}
    except ValueError:
        answer = {}
    partial = answer.get("partialSuccess") if isinstance(answer, dict) else None
    rejected = int(partial.get("rejectedSpans") or 0) if isinstance(partial, dict) else 0
    if rejected:
        message = partial.get("errorMessage") if isinstance(partial, dict) else None
        raise SourceUnavailableError(
            f"OTLP endpoint {url} rejected {rejected} span(s)" + (f": {message}" if message else ""),
            details={"rejected_spans": rejected},
        )


@dataclass
class _Span:
    """One span being assembled (times as datetimes until serialised)."""

    span_id: str
    parent_id: str
    name: str
    kind: int
    start: datetime
    end: datetime | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    status_code: int = STATUS_UNSET
    status_message: str | None = None

    def fail(self, error: Any, fallback: str) -> None:
        """Mark the span ERROR with the recorded error's code and message."""
        code, message = _error_parts(error, fallback)
        self.status_code = STATUS_ERROR
        self.status_message = f"{code}: {message}" if message else code
        self.attributes["error.type"] = code

    def to_otlp(self, trace_id: str) -> dict[str, Any]:
        """Return the span in OTLP/JSON form (hex ids, unix-nano times as strings)."""
        span: dict[str, Any] = {
            "traceId": trace_id,
            "spanId": self.span_id,
            "parentSpanId": self.parent_id,
            "name": self.name,
            "kind": self.kind,
            "startTimeUnixNano": _nanos(self.start),
            "endTimeUnixNano": _nanos(self.end or self.start),
            "attributes": _attributes(self.attributes),
            "status": {"code": self.status_code},
        }
        if self.events:
            span["events"] = self.events
        if self.status_message:
            span["status"]["message"] = self.status_message
        return span


class _SpanBuilder:
    """Walks the trace once, opening node spans and hanging calls and accesses under them."""

    def __init__(self, trace: RunTrace, include_content: bool) -> None:
        self.trace = trace
        self.run_id = trace.run.run_id
        self.content = include_content
        self.trace_id = _trace_id(self.run_id)

    def span_id(self, seq: int) -> str:
        """Return the span id of the span opened by record ``seq`` (never all zeros)."""
        digest = hashlib.sha256(f"{self.run_id}/{seq}".encode()).hexdigest()[:16]
        return digest if int(digest, 16) else "0000000000000001"

    def request(self) -> dict[str, Any]:
        """Return the ExportTraceServiceRequest of the run."""
        spans = self.spans()
        return {
            "resourceSpans": [
                {
                    "resource": {
                        "attributes": _attributes(
                            {
                                "service.name": "medagent",
                                "service.version": self.trace.software_version,
                                "medagent.settings_fingerprint": self.trace.settings_fingerprint,
                            }
                        )
                    },
                    "scopeSpans": [
                        {
                            "scope": {"name": SCOPE_NAME, "version": self.trace.software_version},
                            "spans": [span.to_otlp(self.trace_id) for span in spans],
                        }
                    ],
                }
            ]
        }

    def spans(self) -> list[_Span]:
        """Return the root span, then node, model-call and data-access spans in trace order."""
        events = self.trace.events
        run = self.trace.run
        started = next((e for e in events if e.kind == kinds.RUN_STARTED), None)
        finished = next((e for e in reversed(events) if e.kind == kinds.RUN_FINISHED), None)
        root = _Span(
            span_id=self.span_id(started.seq if started is not None else 0),
            parent_id="",
            name="invoke_agent medagent",
            kind=SPAN_KIND_INTERNAL,
            start=started.at if started is not None else run.created_at,
            end=finished.at if finished is not None else (events[-1].at if events else run.created_at),
            attributes={
                # The run is one invocation of the agent (semconv gen-ai-agent-spans.md).
                "gen_ai.operation.name": "invoke_agent",
                "gen_ai.agent.name": "medagent",
                "medagent.run.id": run.run_id,
                "medagent.run.kind": run.kind,
                "medagent.run.trigger": run.trigger,
                "medagent.run.status": run.status,
                "medagent.user.role": getattr(run, "user_role", None),
                "medagent.purpose_of_use": getattr(run, "purpose_of_use", None),
                "gen_ai.conversation.id": getattr(run, "thread_id", None),
            },
        )
        if self.content:
            root.attributes["medagent.patient_ref"] = run.patient_ref
            root.attributes["user.id"] = getattr(run, "user_id", None)
        if finished is not None and finished.status != "ok":
            root.fail(finished.meta.get("error"), finished.status or "failed")
            if finished.meta.get("failing_step"):
                root.attributes["medagent.failing_step"] = finished.meta["failing_step"]

        spans = [root]
        open_nodes: list[_Span] = []
        for event in events:
            parent = open_nodes[-1] if open_nodes else root
            if event.kind == kinds.NODE_STARTED:
                node = _Span(
                    span_id=self.span_id(event.seq),
                    parent_id=parent.span_id,
                    name=event.name,
                    kind=SPAN_KIND_INTERNAL,
                    start=event.at,
                    attributes={"medagent.node": event.name},
                )
                open_nodes.append(node)
                spans.append(node)
            elif event.kind == kinds.NODE_FINISHED:
                match = next((n for n in reversed(open_nodes) if n.name == event.name), None)
                if match is None:
                    continue  # an end without a start: nothing to close
                open_nodes.remove(match)
                match.end = event.at
                if event.status != "ok":
                    match.fail(event.meta.get("error"), event.status or "failed")
            elif event.kind == kinds.MODEL_CALL:
                spans.append(self.model_span(event, parent))
            elif event.kind in (kinds.FHIR_REQUEST, kinds.DICOM_RETRIEVAL):
                spans.append(self.access_span(event, parent))
            elif event.kind in (kinds.NOTE, kinds.MODEL_LOAD):
                parent.events.append(self.note_event(event))
        for node in open_nodes:
            # A node with no end record: the process died or the trace was read mid-run.
            node.end = root.end
            node.fail({"code": "unfinished", "message": f"no end record (run {run.status})"}, "unfinished")
        return spans

    # -- model calls -------------------------------------------------------------------------
    def model_span(self, event: TraceEvent, parent: _Span) -> _Span:
        """Return the GenAI span of one model call."""
        meta = event.meta
        model = str(meta.get("model_id") or "unknown")
        backend = str(meta.get("backend") or "unknown")
        operation = _OPERATIONS.get(event.name, event.name.rsplit(".", 1)[-1])
        raw_parameters = meta.get("parameters")
        parameters: dict[str, Any] = raw_parameters if isinstance(raw_parameters, dict) else {}
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "gen_ai.request.model": model,
            # gen_ai.provider.name (semconv >= 1.37) and gen_ai.system (earlier) both say which
            # backend served the call; both are set so older and newer backends read it.
            "gen_ai.provider.name": backend,
            "gen_ai.system": backend,
            "gen_ai.usage.input_tokens": meta.get("prompt_tokens"),
            "gen_ai.usage.output_tokens": meta.get("output_tokens"),
            "gen_ai.request.max_tokens": parameters.get("max_new_tokens"),
            "medagent.model.revision": meta.get("revision"),
            "medagent.model.device": meta.get("device"),
            "medagent.model.dtype": meta.get("dtype"),
            "medagent.model.test_model": meta.get("test_model"),
            "medagent.prompt_chars": meta.get("prompt_chars"),
            "medagent.images": meta.get("images"),
            "medagent.label_set": parameters.get("label_set"),
            "medagent.labels": parameters.get("labels"),
        }
        if operation == "chat":
            attributes["gen_ai.output.type"] = "text"
        if self.content:
            attributes["medagent.image_refs"] = meta.get("image_refs")
        start = event.at - timedelta(milliseconds=event.duration_ms or 0.0)
        span = _Span(
            span_id=self.span_id(event.seq),
            parent_id=parent.span_id,
            name=f"{operation} {model}",
            kind=SPAN_KIND_INTERNAL if backend in _IN_PROCESS_BACKENDS else SPAN_KIND_CLIENT,
            start=start,
            end=event.at,
            attributes=attributes,
        )
        if event.status != "ok":
            span.fail(meta.get("error"), event.status or "failed")
        content = readable_content(event)
        if self.content and content is not None:
            span.events.append(self.details_event(event, operation, model, content, attributes))
        return span

    def details_event(
        self, event: TraceEvent, operation: str, model: str, content: dict[str, Any], attributes: dict[str, Any]
    ) -> dict[str, Any]:
        """Return the ``gen_ai.client.inference.operation.details`` event: instructions, input, output.

        On events the semconv wants the messages in structured form (not JSON strings), so
        they are sent as OTLP kvlist / array values.
        """
        details: dict[str, Any] = {"gen_ai.operation.name": operation, "gen_ai.request.model": model}
        if isinstance(content.get("system"), str):
            details["gen_ai.system_instructions"] = [{"type": "text", "content": content["system"]}]
        if isinstance(content.get("prompt"), str):
            details["gen_ai.input.messages"] = [
                {"role": "user", "parts": [{"type": "text", "content": content["prompt"]}]}
            ]
        if "output" in content:
            output = content["output"]
            text = output if isinstance(output, str) else json.dumps(output, sort_keys=True)
            details["gen_ai.output.messages"] = [
                {
                    "role": "assistant",
                    "parts": [{"type": "text", "content": text}],
                    "finish_reason": _finish(attributes),
                }
            ]
        return {
            "timeUnixNano": _nanos(event.at),
            "name": "gen_ai.client.inference.operation.details",
            "attributes": _attributes(details),
        }

    # -- data accesses -----------------------------------------------------------------------
    def access_span(self, event: TraceEvent, parent: _Span) -> _Span:
        """Return the span of one FHIR request or DICOM retrieval (no identifiers unless content is on)."""
        meta = event.meta
        backend = str(meta.get("backend") or "unknown")
        attributes: dict[str, Any] = {"medagent.source.backend": backend}
        if event.kind == kinds.FHIR_REQUEST:
            method = str(meta.get("method") or "GET")
            path = str(meta.get("path") or "")
            template = _url_template(path)
            name = f"{method} {template}"
            attributes |= {
                "http.request.method": method,
                "url.template": template,
                "http.response.status_code": meta.get("status"),
                "medagent.fhir.resources_returned": len(meta.get("resource_ids") or []),
            }
            if self.content:
                attributes["url.path"] = path.split("?", 1)[0]
                attributes["url.query"] = path.split("?", 1)[1] if "?" in path else None
                attributes["medagent.fhir.resource_ids"] = list(meta.get("resource_ids") or [])
            remote = backend == "http"
        else:
            action = str(meta.get("action") or "retrieve")
            name = f"DICOM {action}"
            attributes |= {
                "medagent.dicom.action": action,
                "medagent.dicom.transfer_syntax": meta.get("transfer_syntax"),
                "medagent.dicom.bytes": meta.get("bytes"),
                "http.response.status_code": meta.get("status"),
            }
            if self.content:
                for key in ("study_uid", "series_uid", "sop_instance_uid"):
                    attributes[f"medagent.dicom.{key}"] = meta.get(key)
            remote = backend == "dicomweb"
        span = _Span(
            span_id=self.span_id(event.seq),
            parent_id=parent.span_id,
            name=name,
            kind=SPAN_KIND_CLIENT if remote else SPAN_KIND_INTERNAL,
            start=event.at - timedelta(milliseconds=event.duration_ms or 0.0),
            end=event.at,
            attributes=attributes,
        )
        if event.status != "ok":
            status = meta.get("status")
            code = str(status) if isinstance(status, int) else "source_unavailable"
            # The recorded error text names the server and, for a bundle folder, a path: only
            # its class goes out unless content is on.
            span.fail({"code": code, "message": meta.get("error") if self.content else None}, code)
        return span

    def note_event(self, event: TraceEvent) -> dict[str, Any]:
        """Return a note or model load as a span event: its name and its numeric / boolean facts.

        Strings and lists in a note's meta are identifiers (sources, UIDs) or clinical text,
        so only their counts go out unless content is on.
        """
        attributes: dict[str, Any] = {}
        if event.status:
            attributes["medagent.status"] = event.status
        for key, value in sorted(event.meta.items()):
            if isinstance(value, bool | int | float):
                attributes[f"medagent.{key}"] = value
            elif isinstance(value, list | dict):
                attributes[f"medagent.{key}.count"] = len(value)
                if self.content and isinstance(value, list):
                    attributes[f"medagent.{key}"] = [str(item) for item in value]
            elif isinstance(value, str) and (self.content or event.kind == kinds.MODEL_LOAD):
                # A model load's strings are model ids, backends and dtypes: no PHI.
                attributes[f"medagent.{key}"] = value
        prefix = "medagent.model_load" if event.kind == kinds.MODEL_LOAD else "medagent.note"
        return {
            "timeUnixNano": _nanos(event.at),
            "name": f"{prefix}.{event.name}",
            "attributes": _attributes(attributes),
        }


# -- OTLP/JSON encoding -----------------------------------------------------------------------
def _trace_id(run_id: str) -> str:
    try:
        return uuid.UUID(run_id).hex
    except ValueError:
        return hashlib.sha256(run_id.encode()).hexdigest()[:32]


def _nanos(value: datetime) -> str:
    aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    # Integer arithmetic on the timedelta: a float timestamp loses the microseconds.
    return str((aware - _EPOCH) // timedelta(microseconds=1) * 1000)


def _any_value(value: Any) -> dict[str, Any]:
    """Return a Python value as an OTLP AnyValue (int64 as a decimal string, per OTLP/JSON)."""
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": value}
    if isinstance(value, str):
        return {"stringValue": value}
    if isinstance(value, list | tuple):
        return {"arrayValue": {"values": [_any_value(item) for item in value]}}
    if isinstance(value, dict):
        return {"kvlistValue": {"values": [{"key": str(k), "value": _any_value(v)} for k, v in value.items()]}}
    return {"stringValue": str(value)}


def _attributes(values: dict[str, Any]) -> list[dict[str, Any]]:
    """Return OTLP key-values, leaving out unset (None) attributes."""
    return [{"key": key, "value": _any_value(value)} for key, value in values.items() if value is not None]


def _error_parts(error: Any, fallback: str) -> tuple[str, str | None]:
    if isinstance(error, dict):
        return str(error.get("code") or fallback), (str(error["message"]) if error.get("message") else None)
    if error:
        return fallback, str(error)
    return fallback, None


def _url_template(path: str) -> str:
    """Return the low-cardinality form of a FHIR path: ``Patient/{id}``, ``Condition``."""
    read = _READ_PATH.match(path)
    if read is not None:
        return f"{read.group('type')}/{{id}}" + ("/_history/{vid}" if read.group("history") else "")
    search = _TYPE_PATH.match(path)
    return search.group("type") if search is not None else "{page}"


def _finish(attributes: dict[str, Any]) -> str:
    """Return the output's finish reason: ``length`` when it used the whole token budget."""
    limit, used = attributes.get("gen_ai.request.max_tokens"), attributes.get("gen_ai.usage.output_tokens")
    if isinstance(limit, int) and isinstance(used, int) and used >= limit:
        return "length"
    return "stop"
