"""The ``medagent`` command line: demo, ask, audit, serve, db, config.

Errors map to exit codes through the error hierarchy (agent/errors.py); messages are the safe,
user-facing ones. With ``--json`` the command prints exactly one JSON object on stdout.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypedDict

import typer

from agent.cli_classify import classify_app
from agent.cli_eval import bench_agent_command, eval_command
from agent.cli_index import index_app
from agent.cli_patient import patient_app
from agent.cli_support import fail, settings_with, source_groups
from agent.cli_worker import worker_command
from agent.config import DEFAULT_FIXTURES, Settings
from agent.domain.answer import AskResult
from agent.errors import ConfigError, MedagentError

if TYPE_CHECKING:
    from agent.runtime import AgentRuntime

app = typer.Typer(help="medagent: an auditable clinical agent over FHIR R4 and DICOM.", no_args_is_help=True)
audit_app = typer.Typer(help="Review run traces.", no_args_is_help=True)
db_app = typer.Typer(help="Trace database maintenance.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect settings.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks: medians and ratios; the last line is JSON.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")
app.add_typer(db_app, name="db")
app.add_typer(config_app, name="config")
app.add_typer(bench_app, name="bench")
app.add_typer(patient_app, name="patient")
app.add_typer(classify_app, name="classify")
app.add_typer(index_app, name="index")
app.command("worker")(worker_command)
app.command("eval")(eval_command)
bench_app.command("agent")(bench_agent_command)

DEMO_QUESTION = (
    "What are this patient's active problems and current medications, how have the heart-failure "
    "markers changed, and what does the most recent chest X-ray show?"
)

FhirOpt = Annotated[str | None, typer.Option("--fhir", help="FHIR R4 base URL.")]
FhirDirOpt = Annotated[Path | None, typer.Option("--fhir-dir", help="Folder of FHIR bundles.")]
DicomWebOpt = Annotated[str | None, typer.Option("--dicomweb", help="DICOMweb root URL.")]
DicomDirOpt = Annotated[Path | None, typer.Option("--dicom-dir", help="Folder of DICOM files.")]
DbOpt = Annotated[str | None, typer.Option("--db", help="Trace database URL (SQLAlchemy).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]
TestModelsOpt = Annotated[bool, typer.Option("--test-models", help="Force the tiny random-weight models.")]


def _settings(
    *,
    fhir: str | None = None,
    fhir_dir: Path | None = None,
    dicomweb: str | None = None,
    dicom_dir: Path | None = None,
    db: str | None = None,
    test_models: bool = False,
    fallback: bool | None = None,
) -> Settings:
    """Build settings from env/.env, then apply the command line's flags on top."""
    groups = source_groups(fhir=fhir, fhir_dir=fhir_dir, dicomweb=dicomweb, dicom_dir=dicom_dir)
    models_group: dict[str, Any] = {}
    if test_models:
        models_group["use_test_models"] = True
    if fallback is not None:
        models_group["fallback_to_test_models"] = fallback
    groups["models"] = models_group
    if db:
        groups["db"] = {"url": db}
    return settings_with(groups)


def _fail(exc: MedagentError, *, as_json: bool) -> None:
    fail(exc, as_json=as_json)


def _print_result(result: AskResult, *, banner: str | None) -> None:
    if banner:
        typer.echo(banner)
        typer.echo("")
    typer.echo("Answer:")
    typer.echo("  " + (result.answer or "(empty)").replace("\n", "\n  "))
    typer.echo("")
    typer.echo(f"Sources given to the model ({len(result.sources)}):")
    for source in result.sources:
        typer.echo(f"  [{source}]")
    typer.echo("")
    typer.echo(f"Citations made by the model ({len(result.citations)}):")
    if not result.citations:
        typer.echo("  (none)")
    for citation in result.citations:
        mark = "ok      " if citation.valid else "DANGLING"
        note = "" if citation.valid else "  (not among the sources: removed from the answer)"
        typer.echo(f"  {mark} [{citation.reference}]{note}")
    if result.findings:
        typer.echo("")
        typer.echo("Image findings (MedSigLIP, 0..1; pair probability where the label has a negative prompt):")
        for finding in result.findings:
            image: Any = finding["image"]
            scores: Any = finding["scores"]

            def shown(score: Any) -> float:
                return float(score["pair_probability"] if score.get("pair_probability") is not None else score["score"])

            top = ", ".join(f"{s['label']} {shown(s):.2f}" for s in sorted(scores, key=lambda s: -shown(s))[:3])
            typer.echo(
                f"  {image.get('modality')} {image.get('view_position') or ''} {image['sop_instance_uid']} "
                f"[{finding.get('source')} {finding.get('label_set') or ''}]: {top}"
            )
    if result.similar_cases:
        typer.echo("")
        typer.echo("Similar cases from the image index (same modality, this study excluded):")
        for case in result.similar_cases:
            typer.echo(f"  [{case['citation']}] {case.get('modality') or '?'} similarity {case['score']:.2f}")
    for warning in result.warnings:
        typer.echo(f"warning: {warning}", err=True)
    typer.echo("")
    typer.echo(f"Run id: {result.run_id}   (medagent audit show {result.run_id})")


def _test_model_banner(result: AskResult, banner: str | None) -> str | None:
    if not result.test_models:
        return None
    rule = "=" * 78
    text = banner or (
        "TEST MODELS IN USE (--test-models): tiny random-weight stand-ins of the real model classes. "
        "The answer and findings are meaningless; the flow (FHIR, DICOM, pixels, models, trace) is real."
    )
    return f"{rule}\n{text}\n{rule}"


def _ask(
    settings: Settings,
    patient_id: str,
    question: str,
    as_of: datetime | None,
    as_json: bool,
    who: Who | None = None,
) -> None:
    from transformers.utils import logging as hf_logging

    from agent.runner import AgentRuntime, run_ask

    hf_logging.disable_progress_bar()  # weight-loading bars would bury the answer
    runtime = AgentRuntime(settings=settings)
    try:
        result = asyncio.run(
            run_ask(runtime, patient_id=patient_id, question=question, as_of=as_of, **(who or _default_who()))
        )
    except MedagentError as exc:
        _fail(exc, as_json=as_json)
        return
    loaded, _ = runtime.models.get(settings)
    if as_json:
        typer.echo(result.model_dump_json())
    else:
        _print_result(result, banner=_test_model_banner(result, loaded.banner))


class Who(TypedDict):
    """Who is asking, as recorded with the run."""

    user_id: str | None
    user_role: str | None
    purpose_of_use: str | None


def _default_who() -> Who:
    """Return who is asking from the command line: the OS user, as a clinician, for treatment."""
    try:
        user = getpass.getuser()
    except Exception:
        user = None
    return {"user_id": user, "user_role": "clinician", "purpose_of_use": "TREAT"}


@app.command()
def ask(
    question: Annotated[str, typer.Argument(help="The clinical question.")],
    patient: Annotated[
        str, typer.Option("--patient", help="Patient logical id, or identifier=SYSTEM|VALUE (e.g. an MRN).")
    ],
    fhir: FhirOpt = None,
    fhir_dir: FhirDirOpt = None,
    dicomweb: DicomWebOpt = None,
    dicom_dir: DicomDirOpt = None,
    db: DbOpt = None,
    test_models: TestModelsOpt = False,
    as_of: Annotated[str | None, typer.Option("--as-of", help="Reference date for relative times.")] = None,
    user: Annotated[str | None, typer.Option(help="Who is asking (default: the OS user); recorded.")] = None,
    role: Annotated[str, typer.Option(help="The asker's role; recorded.")] = "clinician",
    purpose: Annotated[str, typer.Option(help="Purpose of use (HL7 v3 code, e.g. TREAT); recorded.")] = "TREAT",
    as_json: JsonOpt = False,
    stream: Annotated[
        bool, typer.Option("--stream", help="Print progress and the answer's tokens as they come (stderr/stdout).")
    ] = False,
) -> None:
    """Answer a question about one patient; print answer, sources, citations and run id."""
    try:
        settings = _settings(
            fhir=fhir,
            fhir_dir=fhir_dir,
            dicomweb=dicomweb,
            dicom_dir=dicom_dir,
            db=db,
            test_models=test_models,
        )
        when = _parse_date(as_of, "--as-of")
    except MedagentError as exc:
        _fail(exc, as_json=as_json)
        return
    who = Who(user_id=user or _default_who()["user_id"], user_role=role, purpose_of_use=purpose)
    if stream and not as_json:
        _ask_streaming(settings, patient, question, when, who)
        return
    _ask(settings, patient, question, when, as_json, who)


def _ask_streaming(settings: Settings, patient_id: str, question: str, as_of: datetime | None, who: Who) -> None:
    """Run ``ask`` printing node progress (stderr) and answer tokens (stdout) as they come, then the result.

    Tokens are the model's raw text; the checked answer (dangling citations removed) follows them.
    """
    from transformers.utils import logging as hf_logging

    from agent.runner import AgentRuntime
    from agent.streaming import stream_ask

    hf_logging.disable_progress_bar()
    runtime = AgentRuntime(settings=settings)

    async def consume() -> dict[str, Any] | None:
        async for event in stream_ask(runtime, patient_id=patient_id, question=question, as_of=as_of, **who):
            if event.type == "progress" and event.status in ("started", "failed"):
                typer.echo(f"[{event.node} {event.status}]", err=True)
            elif event.type == "token":
                typer.echo(event.text or "", nl=False)
            elif event.type == "final":
                typer.echo("")
                return event.data
            elif event.type == "error":
                raise _StreamFailed(event.data)
        return None

    try:
        data = asyncio.run(consume())
    except _StreamFailed as failed:
        typer.echo(f"error [{failed.data.get('code')}]: {failed.data.get('message')}", err=True)
        run_id = (failed.data.get("details") or {}).get("run_id")
        if run_id:
            typer.echo(f"run id: {run_id}", err=True)
        raise typer.Exit(int(failed.data.get("exit_code") or 1)) from None
    if data is not None:
        from agent.domain.answer import AskResult

        loaded, _ = runtime.models.get(settings)
        result = AskResult.model_validate(data)
        _print_result(result, banner=_test_model_banner(result, loaded.banner))


class _StreamFailed(Exception):
    """A streamed run ended with an error event (already recorded in the trace)."""

    def __init__(self, data: dict[str, Any]) -> None:
        super().__init__(data.get("code"))
        self.data = data


@app.command()
def demo(
    test_models: TestModelsOpt = False,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Ask a fixed question about the bundled chest X-ray patient on the embedded defaults."""
    try:
        manifest = json.loads((DEFAULT_FIXTURES / "manifest.json").read_text())
        patient = next(p for p in manifest["patients"] if p["key"] == "cxr")
        settings = _settings(
            fhir_dir=DEFAULT_FIXTURES / "fhir",
            dicom_dir=DEFAULT_FIXTURES / "dicom",
            db=db,
            test_models=test_models,
            fallback=True,
        )
    except MedagentError as exc:
        _fail(exc, as_json=as_json)
        return
    except (OSError, StopIteration, KeyError, ValueError) as exc:
        _fail(ConfigError(f"bundled fixtures are missing or unreadable: {type(exc).__name__}"), as_json=as_json)
        return
    if not as_json:
        typer.echo(f"Patient: {patient['patient_id']} ({patient['summary']})")
        typer.echo(f"Question: {DEMO_QUESTION}")
        typer.echo("")
    _ask(settings, patient["patient_id"], DEMO_QUESTION, None, as_json)


def _audit_runtime(db: str | None) -> AgentRuntime:
    """Return a runtime for reading the trace (schema checked, runs of dead processes closed)."""
    from agent.runtime import AgentRuntime

    runtime = AgentRuntime(settings=_settings(db=db))
    runtime.ensure_schema()
    return runtime


def _parse_date(value: str | None, option: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise ConfigError(f"{option} must be an ISO date or date-time, got {value!r}") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@audit_app.command("list")
def audit_list(
    db: DbOpt = None,
    limit: Annotated[int, typer.Option(help="How many runs, newest first.")] = 50,
    patient: Annotated[str | None, typer.Option(help="Only runs about this patient id.")] = None,
    user: Annotated[str | None, typer.Option(help="Only runs asked by this user id.")] = None,
    since: Annotated[str | None, typer.Option(help="Only runs started at or after (ISO date/time, UTC).")] = None,
    until: Annotated[str | None, typer.Option(help="Only runs started before (ISO date/time, UTC).")] = None,
    status: Annotated[str | None, typer.Option(help="ok, failed, cancelled, interrupted or running.")] = None,
    trigger: Annotated[str | None, typer.Option(help="cli, api, summary, subscription, cds-hook...")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List recorded runs, newest first, optionally filtered."""
    from agent.audit.reader import RunFilter, list_runs
    from agent.audit.render import render_run_list

    try:
        filters = RunFilter(
            patient_ref=f"Patient/{patient}" if patient else None,
            user_id=user,
            since=_parse_date(since, "--since"),
            until=_parse_date(until, "--until"),
            status=status,
            trigger=trigger,
        )
        runs = list_runs(_audit_runtime(db).engine, limit=limit, filters=filters)
    except MedagentError as exc:
        _fail(exc, as_json=as_json)
        return
    if as_json:
        typer.echo(json.dumps([run.model_dump(mode="json") for run in runs]))
    else:
        typer.echo(render_run_list(runs))


@audit_app.command("show")
def audit_show(
    run_id: Annotated[str, typer.Argument(help="The run id printed by ask/demo.")],
    db: DbOpt = None,
    no_content: Annotated[bool, typer.Option("--no-content", help="Metadata only: no prompts or outputs.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Print a run's steps in order: nodes, FHIR requests, DICOM retrievals, model calls."""
    from agent.audit.reader import load_run
    from agent.audit.render import render_run

    try:
        runtime = _audit_runtime(db)
        trace = load_run(runtime.engine, run_id, include_content=not no_content, cipher=runtime.cipher)
    except MedagentError as exc:
        _fail(exc, as_json=as_json)
        return
    typer.echo(trace.model_dump_json() if as_json else render_run(trace))


@audit_app.command("verify")
def audit_verify(
    run: Annotated[str | None, typer.Option("--run", help="Verify one run only (default: everything).")] = None,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Check the hash chain, content, run rows, Merkle roots and signed checkpoints; exit 1 if anything is broken."""
    from agent.audit.keys import verifiers_for
    from agent.audit.verify import report_lines, verify_trace

    try:
        runtime = _audit_runtime(db)
        report = verify_trace(runtime.engine, verifiers=verifiers_for(runtime.signer), run_id=run)
    except MedagentError as exc:
        _fail(exc, as_json=as_json)
        return
    if as_json:
        typer.echo(report.model_dump_json())
    else:
        typer.echo("\n".join(report_lines(report)))
    raise typer.Exit(0 if report.ok else 1)


@audit_app.command("export")
def audit_export(
    run_id: Annotated[str, typer.Argument(help="The run to export.")],
    format: Annotated[
        str, typer.Option("--format", help="fhir (AuditEvent + Provenance), otel (OTLP JSON) or json.")
    ] = "json",
    no_content: Annotated[bool, typer.Option("--no-content", help="Leave prompts, outputs and answers out.")] = False,
    otlp_endpoint: Annotated[
        str | None,
        typer.Option("--otlp-endpoint", help="With --format otel: also send the spans to this OTLP/HTTP endpoint."),
    ] = None,
    db: DbOpt = None,
) -> None:
    """Export a run's trace as a FHIR Bundle, OpenTelemetry spans or plain JSON (printed to stdout)."""
    from agent.audit.export_fhir import export_fhir
    from agent.audit.export_json import export_json
    from agent.audit.export_otel import export_otel, send_otlp
    from agent.audit.reader import load_run

    try:
        if format not in ("fhir", "otel", "json"):
            raise ConfigError(f"--format must be fhir, otel or json, not {format!r}")
        runtime = _audit_runtime(db)
        trace = load_run(runtime.engine, run_id, include_content=not no_content, cipher=runtime.cipher)
        if format == "fhir":
            payload = export_fhir(trace)
        elif format == "otel":
            payload = export_otel(trace, include_content=not no_content)
            if otlp_endpoint:
                send_otlp(payload, otlp_endpoint)
        else:
            payload = export_json(trace)
    except MedagentError as exc:
        _fail(exc, as_json=False)
        return
    typer.echo(json.dumps(payload, indent=2))


@audit_app.command("replay")
def audit_replay(
    run_id: Annotated[str, typer.Argument(help="The run to replay.")],
    rerun: Annotated[
        bool, typer.Option("--rerun", help="Run the same question again on the configured data and models, and diff.")
    ] = False,
    fhir: FhirOpt = None,
    fhir_dir: FhirDirOpt = None,
    dicomweb: DicomWebOpt = None,
    dicom_dir: DicomDirOpt = None,
    test_models: TestModelsOpt = False,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Re-render a run's answer and timeline from its recorded outputs (no model or server is called)."""
    from agent.audit.reader import load_run
    from agent.audit.replay import diff_runs, replay, rerun_request

    try:
        runtime = _audit_runtime(db)
        original = replay(load_run(runtime.engine, run_id, cipher=runtime.cipher))
        differences: list[str] = []
        again = None
        if rerun:
            from agent.runner import run_ask
            from agent.runtime import AgentRuntime

            patient_id, question = rerun_request(load_run(runtime.engine, run_id, cipher=runtime.cipher))
            settings = _settings(
                fhir=fhir, fhir_dir=fhir_dir, dicomweb=dicomweb, dicom_dir=dicom_dir, db=db, test_models=test_models
            )
            rerun_runtime = AgentRuntime(settings=settings)
            result = asyncio.run(
                run_ask(rerun_runtime, patient_id=patient_id, question=question, trigger="replay", **_default_who())
            )
            again = replay(load_run(rerun_runtime.engine, result.run_id, cipher=rerun_runtime.cipher))
            differences = diff_runs(original, again)
    except MedagentError as exc:
        _fail(exc, as_json=as_json)
        return
    if as_json:
        body: dict[str, Any] = {"original": original.model_dump(mode="json")}
        if again is not None:
            body |= {"rerun": again.model_dump(mode="json"), "differences": differences}
        typer.echo(json.dumps(body))
        return
    typer.echo(original.timeline)
    typer.echo("")
    typer.echo(f"Recorded answer ({original.answer_source}):")
    typer.echo("  " + (original.answer or "(none)").replace("\n", "\n  "))
    if again is not None:
        typer.echo("")
        typer.echo(f"Re-run: {again.run_id}")
        typer.echo("No differences." if not differences else "Differences:")
        for line in differences:
            typer.echo(f"  - {line}")


@db_app.command("upgrade")
def db_upgrade(
    db: DbOpt = None,
    revision: Annotated[str, typer.Option(help="Target revision.")] = "head",
) -> None:
    """Apply the trace database migrations (the only way the schema is created)."""
    from agent.audit.db import upgrade

    try:
        settings = _settings(db=db)
        upgrade(settings.db.url.get_secret_value(), revision)
    except MedagentError as exc:
        _fail(exc, as_json=False)
        return
    typer.echo(f"database at {revision}: {settings.masked()['db']['url']}")


@db_app.command("grant-append-only")
def db_grant_append_only(
    role: Annotated[str, typer.Argument(help="PostgreSQL role the service connects as.")],
    db: DbOpt = None,
) -> None:
    """Let a PostgreSQL role read and append to the trace, and revoke UPDATE, DELETE and TRUNCATE."""
    from agent.audit.db import grant_append_only, make_engine

    try:
        engine = make_engine(_settings(db=db).db.url.get_secret_value())
        grant_append_only(engine, role)
    except MedagentError as exc:
        _fail(exc, as_json=False)
        return
    typer.echo(f"{role}: SELECT, INSERT on the audit tables; UPDATE, DELETE, TRUNCATE revoked")


@config_app.command("api-key")
def config_api_key(
    user: Annotated[str, typer.Option(help="The user the key acts as (recorded in every run).")],
    role: Annotated[list[str], typer.Option(help="clinician, auditor, admin or service (repeatable).")],
    name: Annotated[str, typer.Option(help="A label for the key.")] = "key",
) -> None:
    """Make an API key: print it once, and the settings entry (its hash) for MEDAGENT_SERVICE__API_KEYS."""
    from agent.service.auth import ALL_ROLES, new_api_key

    unknown = [r for r in role if r not in ALL_ROLES]
    if unknown:
        _fail(ConfigError(f"unknown role(s) {unknown}: use {', '.join(ALL_ROLES)}"), as_json=False)
        return
    key, spec = new_api_key(user, role, name)  # type: ignore[arg-type]
    typer.echo(f"API key (shown once, give it to {user}): {key}")
    typer.echo("Add to MEDAGENT_SERVICE__API_KEYS (a JSON list):")
    typer.echo(spec.model_dump_json())


@config_app.command("show")
def config_show(
    fhir: FhirOpt = None,
    fhir_dir: FhirDirOpt = None,
    dicomweb: DicomWebOpt = None,
    dicom_dir: DicomDirOpt = None,
    db: DbOpt = None,
) -> None:
    """Print the effective settings (env, .env and flags applied) with secrets masked."""
    try:
        settings = _settings(fhir=fhir, fhir_dir=fhir_dir, dicomweb=dicomweb, dicom_dir=dicom_dir, db=db)
    except MedagentError as exc:
        _fail(exc, as_json=False)
        return
    typer.echo(json.dumps(settings.masked(), indent=2))


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default from settings: 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default from settings: 8000).")] = None,
    fhir: FhirOpt = None,
    fhir_dir: FhirDirOpt = None,
    dicomweb: DicomWebOpt = None,
    dicom_dir: DicomDirOpt = None,
    db: DbOpt = None,
    test_models: TestModelsOpt = False,
) -> None:
    """Start the HTTP API (POST /v1/ask, GET /v1/runs/{id}, docs at /docs)."""
    import uvicorn

    from agent.service.app import create_app

    try:
        settings = _settings(
            fhir=fhir,
            fhir_dir=fhir_dir,
            dicomweb=dicomweb,
            dicom_dir=dicom_dir,
            db=db,
            test_models=test_models,
        )
    except MedagentError as exc:
        _fail(exc, as_json=False)
        return
    uvicorn.run(
        create_app(settings),
        host=host or settings.service.host,
        port=port or settings.service.port,
        log_level="info",
        access_log=False,  # request paths carry patient ids: no PHI in logs
    )


@bench_app.command("audit")
def bench_audit(
    records: Annotated[int, typer.Option(help="Records in the chain that is verified.")] = 1_000_000,
    appends: Annotated[int, typer.Option(help="Records appended per database.")] = 2000,
    repeats: Annotated[int, typer.Option(help="Runs per variant for the overhead median.")] = 15,
    pg_url: Annotated[str | None, typer.Option(help="PostgreSQL URL (a scratch database).")] = None,
) -> None:
    """Measure recording overhead, append throughput (SQLite, PostgreSQL) and verification throughput."""
    from agent.bench.audit import run_benchmark, scratch_postgres

    with scratch_postgres(pg_url) as url:
        results = run_benchmark(verify_records=records, appends=appends, repeats=repeats, pg_url=url)
    typer.echo(json.dumps(results))


@bench_app.command("service")
def bench_service(
    chats: Annotated[int, typer.Option(help="Concurrent SSE chats (each a new thread and one question).")] = 100,
    sequential: Annotated[int, typer.Option(help="Chats run one at a time first, for the unloaded baseline.")] = 20,
    notifications: Annotated[
        int, typer.Option(help="FHIR subscription notifications in the burst (30% redeliveries; 0: none).")
    ] = 1000,
    db_url: Annotated[
        str | None, typer.Option(help="Trace and thread database (default: SQLite files in a temp folder).")
    ] = None,
) -> None:
    """Run concurrent chats against `medagent serve` with a fast fake model: errors, added latency, peak memory."""
    from agent.bench.service import run_benchmark

    run_benchmark(
        chats=chats, sequential=sequential, notifications=notifications, db_url=db_url, echo=typer.echo
    )  # its last line is the JSON


@bench_app.command("fhir")
def bench_fhir(
    observations: Annotated[int, typer.Option(help="Observations of the generated patient.")] = 5000,
    repeats: Annotated[int, typer.Option(help="Interleaved runs per variant for the medians.")] = 5,
) -> None:
    """Compare context assembly with a sequential per-type baseline: time, requests, tokens, fact recall."""
    from agent.bench.fhir import run_benchmark

    run_benchmark(observations=observations, repeats=repeats, echo=typer.echo)  # its last line is the JSON


@bench_app.command("imaging")
def bench_imaging(
    images: Annotated[int, typer.Option(help="DICOM images per side of the MedSigLIP path comparison.")] = 4,
    repeats: Annotated[int, typer.Option(help="Interleaved repeats for the medians.")] = 3,
    vectors: Annotated[int, typer.Option(help="Vectors in the embedded index (0: skip).")] = 1_000_000,
    pg_vectors: Annotated[int, typer.Option(help="Vectors in the pgvector table (0: skip).")] = 100_000,
    queries: Annotated[int, typer.Option(help="Top-10 queries timed per index.")] = 200,
) -> None:
    """MedSigLIP image path vs bare forward, decoders per transfer syntax, similar-case search latency and recall."""
    from agent.bench.imaging import run_benchmark

    run_benchmark(
        images=images, repeats=repeats, vectors=vectors, pg_vectors=pg_vectors, queries=queries, echo=typer.echo
    )  # its last line is the JSON


def main() -> None:
    """Run the CLI (the ``medagent`` console script)."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
