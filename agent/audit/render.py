"""Render a run's trace as a readable timeline (``medagent audit show``)."""

from __future__ import annotations

from typing import Any

from agent.audit import recorder as kinds
from agent.audit.reader import RunSummary, RunTrace, TraceEvent

_MAX_OUTPUT_CHARS = 400


def render_run_list(runs: list[RunSummary]) -> str:
    """Return one line per run: id, time, status, kind, patient, event count."""
    if not runs:
        return "no runs recorded"
    lines = [f"{'RUN ID':36}  {'STARTED (UTC)':19}  {'STATUS':9}  {'KIND':6}  {'EVENTS':>6}  PATIENT"]
    for run in runs:
        started = run.created_at.strftime("%Y-%m-%d %H:%M:%S")
        lines.append(
            f"{run.run_id:36}  {started:19}  {run.status:9}  {run.kind:6}  {run.events:>6}  {run.patient_ref or '-'}"
        )
    return "\n".join(lines)


def render_run(trace: RunTrace) -> str:
    """Return the run's header and every event in order, one or more lines each."""
    run = trace.run
    lines = [
        f"run {run.run_id}",
        f"  status: {run.status}   kind: {run.kind}   trigger: {run.trigger}   patient: {run.patient_ref or '-'}",
        f"  started: {run.created_at.isoformat()}   software: {trace.software_version}   "
        f"settings: {trace.settings_fingerprint[:12]}",
        "",
    ]
    for event in trace.events:
        lines.extend(_render_event(event))
    return "\n".join(lines)


def _ms(event: TraceEvent) -> str:
    return f"{event.duration_ms:.0f} ms" if event.duration_ms is not None else ""


def _render_event(event: TraceEvent) -> list[str]:
    head = f"{event.seq:>4}  {event.at.strftime('%H:%M:%S.%f')[:-3]}  "
    meta: dict[str, Any] = event.meta
    if event.kind == kinds.RUN_STARTED:
        return [f"{head}RUN START   {event.name} (trigger {meta.get('trigger')})"]
    if event.kind == kinds.RUN_FINISHED:
        line = f"{head}RUN END     status={event.status}"
        if meta.get("error"):
            err = meta["error"]
            line += f" failing_step={meta.get('failing_step')} error={err.get('code')}: {err.get('message')}"
        return [line]
    if event.kind == kinds.NODE_STARTED:
        return [f"{head}NODE ▶      {event.name}"]
    if event.kind == kinds.NODE_FINISHED:
        line = f"{head}NODE {'✓' if event.status == 'ok' else '✗'}      {event.name}  {_ms(event)}"
        if meta.get("error"):
            line += f"  error={meta['error'].get('code')}: {meta['error'].get('message')}"
        return [line]
    if event.kind == kinds.FHIR_REQUEST:
        ids = meta.get("resource_ids") or []
        line = f"{head}FHIR        {meta.get('method')} {meta.get('path')} -> {meta.get('status')}  {_ms(event)}"
        out = [line, f"{'':>20}returned {len(ids)}: {', '.join(ids) if ids else '-'}"]
        if meta.get("error"):
            out.append(f"{'':>20}error: {meta['error']}")
        return out
    if event.kind == kinds.DICOM_RETRIEVAL:
        status = f" -> {meta['status']}" if meta.get("status") is not None else ""
        line = f"{head}DICOM       {meta.get('action')} ({meta.get('backend')}){status}  {_ms(event)}"
        out = [
            line,
            f"{'':>20}study={meta.get('study_uid')} series={meta.get('series_uid')} "
            f"instance={meta.get('sop_instance_uid')}",
        ]
        if meta.get("transfer_syntax") or meta.get("bytes"):
            out.append(f"{'':>20}transfer_syntax={meta.get('transfer_syntax')} bytes={meta.get('bytes')}")
        if meta.get("error"):
            out.append(f"{'':>20}error: {meta['error']}")
        return out
    if event.kind == kinds.INDEX_SEARCH:
        results = meta.get("results") or []
        index = meta.get("index") or {}
        out = [
            f"{head}INDEX       {event.name} ({index.get('backend')}, {index.get('count')} images) "
            f"k={meta.get('k')} queries={meta.get('queries')}  {_ms(event)}"
        ]
        out += [f"{'':>20}{r.get('citation')} score={r.get('score'):.3f} study={r.get('study_uid')}" for r in results]
        return out
    if event.kind in (kinds.MODEL_CALL, kinds.MODEL_LOAD):
        label = "MODEL CALL " if event.kind == kinds.MODEL_CALL else "MODEL LOAD "
        out = [
            f"{head}{label} {event.name}  model={meta.get('model_id')} backend={meta.get('backend')} "
            f"revision={meta.get('revision')} {_ms(event)}"
        ]
        if meta.get("parameters"):
            out.append(f"{'':>20}parameters: {meta['parameters']}")
        if "prompt_chars" in meta or "prompt_tokens" in meta:
            out.append(
                f"{'':>20}prompt: {meta.get('prompt_chars')} chars, {meta.get('prompt_tokens')} tokens, "
                f"{meta.get('images', 0)} image(s); output: {meta.get('output_tokens')} tokens"
            )
        if isinstance(event.content, dict) and isinstance(event.content.get("output"), list):
            out.extend(f"{'':>20}{line}" for line in _findings_lines(event.content["output"]))
        elif isinstance(event.content, dict) and "output" in event.content:
            output = str(event.content["output"])
            shown = output if len(output) <= _MAX_OUTPUT_CHARS else output[:_MAX_OUTPUT_CHARS] + "…"
            out.append(f"{'':>20}output: {shown!r}")
        if meta.get("error"):
            out.append(f"{'':>20}error: {meta['error']}")
        return out
    if event.kind == kinds.NOTE and event.name == "pixel_preparation":
        out = [f"{head}PIXELS      {meta.get('sop_instance_uid')}: {'; '.join(meta.get('steps') or [])}"]
        if meta.get("defaults"):
            out.append(f"{'':>20}defaults applied: {'; '.join(meta['defaults'])}")
        return out
    return [f"{head}{event.kind.upper():11} {event.name} {meta if meta else ''}"]


def _findings_lines(findings: list[Any]) -> list[str]:
    """Return one line per image: its instance UID and its three highest scores."""
    lines = []
    for finding in findings:
        if not isinstance(finding, dict):
            continue
        scores = sorted(finding.get("scores") or [], key=lambda s: -float(s.get("score", 0)))
        top = ", ".join(f"{s.get('label')} {float(s.get('score', 0)):.2f}" for s in scores[:3])
        lines.append(f"image {(finding.get('image') or {}).get('sop_instance_uid')}: {top}")
    return lines
