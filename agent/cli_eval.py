"""``medagent eval``: ask the evaluation questions on the embedded fixtures and print the scores.

Registered by agent/cli.py (``app.command("eval")(eval_command)``). The fixtures (bundle folder
and DICOM folder) are the sources; traces go to a throwaway SQLite file unless ``--db`` names a
database. With ``--json`` exactly one JSON object is printed.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from agent.config import DEFAULT_FIXTURES, Settings, get_settings
from agent.errors import ConfigError, MedagentError


def eval_settings(*, db: str | None, test_models: bool, scratch: Path) -> Settings:
    """Return the settings for an evaluation: fixture sources, a trace database, the chosen models."""
    merged: dict[str, Any] = get_settings().model_dump()
    merged["fhir"].update({"bundle_dir": DEFAULT_FIXTURES / "fhir", "base_url": None})
    merged["dicom"].update({"dicom_dir": DEFAULT_FIXTURES / "dicom", "dicomweb_url": None})
    merged["db"]["url"] = db or f"sqlite:///{scratch / 'eval-trace.db'}"
    if test_models:
        merged["models"]["use_test_models"] = True
    try:
        return Settings.model_validate(merged)
    except Exception as exc:
        raise ConfigError(f"invalid settings: {exc}") from exc


def eval_command(
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Ask only the first N questions.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    test_models: Annotated[bool, typer.Option("--test-models", help="Force the tiny random-weight models.")] = False,
    db: Annotated[str | None, typer.Option("--db", help="Trace database URL (default: a temporary SQLite).")] = None,
    oracle_plan: Annotated[
        bool, typer.Option("--oracle-plan", help="Give the agent the gold facts' record types as its plan.")
    ] = False,
) -> None:
    """Score the agent on the fixture question set: recall, citations, exact match, calls, tokens, latency."""
    from agent.eval.harness import run_eval
    from agent.eval.report import format_report
    from agent.runtime import AgentRuntime

    with tempfile.TemporaryDirectory(prefix="medagent-eval-") as scratch:
        runtime: AgentRuntime | None = None
        try:
            runtime = AgentRuntime(settings=eval_settings(db=db, test_models=test_models, scratch=Path(scratch)))
            report = asyncio.run(run_eval(runtime, limit=limit, oracle_plan=oracle_plan))
        except MedagentError as exc:
            if as_json:
                typer.echo(json.dumps({"status": "failed", "error": exc.to_dict()}))
            else:
                typer.echo(f"error [{exc.code}]: {exc.message}", err=True)
            raise typer.Exit(exc.exit_code) from exc
        finally:
            if runtime is not None:  # the SQLite file lives in the scratch folder removed next
                runtime.engine.dispose()
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
    else:
        for line in format_report(report):
            typer.echo(line)
