"""``medagent eval`` and ``medagent bench agent``: the evaluation harness and the agent benchmark's commands.

Registered by agent/cli.py (``app.command("eval")(eval_command)`` and
``bench_app.command("agent")(bench_agent_command)``). Both import the agent, torch and
transformers only when run, so ``medagent --help`` stays fast.

``eval``: the fixtures (bundle folder and DICOM folder) are the sources; traces go to a
throwaway SQLite file unless ``--db`` names a database. With ``--json`` exactly one JSON object
is printed.

``eval --data DIR``: every patient of a folder of bundles (read in place) gets questions with
gold ids computed from its own record (agent/eval/generated.py), each asked at the configured
context budget and at a tight one (agent/eval/record_eval.py). FHIR is read from a scratch
folder holding one symlink to the bundle in hand; the DICOM folder is an empty scratch folder
(bundles carry no pixels, so a record's ImagingStudy cannot be located: a degraded run, not a
failed one); no similar-case index, which is a property of a deployment, not of the record. The
last line printed is JSON, with or without ``--json``.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from agent.cli_support import fail, settings_with, source_groups
from agent.config import DEFAULT_FIXTURES, Settings
from agent.errors import ConfigError, MedagentError


def eval_settings(*, db: str | None, test_models: bool, scratch: Path) -> Settings:
    """Return the settings for an evaluation: fixture sources, a trace database, the chosen models."""
    groups = source_groups(fhir_dir=DEFAULT_FIXTURES / "fhir", dicom_dir=DEFAULT_FIXTURES / "dicom")
    groups["db"] = {"url": db or f"sqlite:///{scratch / 'eval-trace.db'}"}
    if test_models:
        groups["models"] = {"use_test_models": True}
    return settings_with(groups)


def data_eval_settings(*, db: str | None, test_models: bool, scratch: Path, budget: int | None = None) -> Settings:
    """Return the settings of one side of ``eval --data``: scratch FHIR and DICOM folders, a budget.

    Args:
        db: the trace database URL, or None for a SQLite file in ``scratch``.
        test_models: force the tiny random-weight models.
        scratch: the run's scratch folder; FHIR is read from ``scratch/record``.
        budget: the context budget in tokens, or None for the configured one.
    """
    groups = source_groups(fhir_dir=scratch / "record", dicom_dir=scratch / "dicom")
    groups["db"] = {"url": db or f"sqlite:///{scratch / 'eval-trace.db'}"}
    groups["imaging"] = {"similar_cases": 0}
    models: dict[str, object] = {"use_test_models": True} if test_models else {}
    if budget is not None:
        models["context_token_budget"] = budget
    groups["models"] = models
    return settings_with(groups)


def _data_eval(
    data: Path, *, records: int | None, db: str | None, test_models: bool, as_json: bool, scratch: Path
) -> None:
    """Run ``eval --data`` and print its report (the last line JSON either way)."""
    from agent.eval.record_eval import TIGHT_BUDGET, run_record_eval, shared_models
    from agent.eval.record_report import format_record_report
    from agent.runtime import AgentRuntime

    (scratch / "record").mkdir()
    (scratch / "dicom").mkdir()
    models = shared_models()
    runtimes: list[AgentRuntime] = []
    try:
        for budget in (None, TIGHT_BUDGET):
            settings = data_eval_settings(db=db, test_models=test_models, scratch=scratch, budget=budget)
            runtimes.append(AgentRuntime(settings=settings, models=models))
        report = asyncio.run(
            run_record_eval(runtimes[0], runtimes[1], data, records=records, progress=lambda s: typer.echo(s, err=True))
        )
    except MedagentError as exc:
        fail(exc, as_json=as_json)
    finally:
        for runtime in runtimes:  # the SQLite file lives in the scratch folder removed next
            runtime.engine.dispose()
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
    else:
        for line in format_record_report(report):
            typer.echo(line)


def eval_command(
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Ask only the first N questions.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    test_models: Annotated[bool, typer.Option("--test-models", help="Force the tiny random-weight models.")] = False,
    db: Annotated[str | None, typer.Option("--db", help="Trace database URL (default: a temporary SQLite).")] = None,
    oracle_plan: Annotated[
        bool, typer.Option("--oracle-plan", help="Give the agent the gold facts' record types as its plan.")
    ] = False,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            exists=True,
            file_okay=False,
            help="A folder of FHIR bundles: questions and gold ids are generated from each patient's record.",
        ),
    ] = None,
    records: Annotated[
        int | None, typer.Option("--records", min=1, help="With --data: only the first N records (files by name).")
    ] = None,
) -> None:
    """Score the agent on the fixture question set, or (--data) on questions generated from any folder of bundles."""
    from agent.eval.harness import run_eval
    from agent.eval.report import format_report
    from agent.runtime import AgentRuntime

    if data is not None and (limit is not None or oracle_plan):
        fail(
            ConfigError("--limit and --oracle-plan apply to the fixture eval; with --data use --records"),
            as_json=as_json,
        )
    if data is None and records is not None:
        fail(ConfigError("--records applies to --data"), as_json=as_json)
    if data is not None:
        with tempfile.TemporaryDirectory(prefix="medagent-eval-") as scratch:
            _data_eval(data, records=records, db=db, test_models=test_models, as_json=as_json, scratch=Path(scratch))
        return
    with tempfile.TemporaryDirectory(prefix="medagent-eval-") as scratch:
        runtime: AgentRuntime | None = None
        try:
            runtime = AgentRuntime(settings=eval_settings(db=db, test_models=test_models, scratch=Path(scratch)))
            report = asyncio.run(run_eval(runtime, limit=limit, oracle_plan=oracle_plan))
        except MedagentError as exc:
            fail(exc, as_json=as_json)
        finally:
            if runtime is not None:  # the SQLite file lives in the scratch folder removed next
                runtime.engine.dispose()
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
    else:
        for line in format_report(report):
            typer.echo(line)


def bench_agent_command(
    generated_tokens: Annotated[
        int, typer.Option("--generated-tokens", min=1, help="Tokens generated by every model call, both sides.")
    ] = 16,
    questions: Annotated[
        int | None,
        typer.Option("--questions", min=1, max=12, help="Two-type questions about the chest X-ray patient [1]."),
    ] = None,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Timed runs per side and question.")] = 1,
    count_only: Annotated[
        bool, typer.Option("--count-only", help="No model: compare prompt tokens only (seconds, any --questions).")
    ] = False,
) -> None:
    """This agent vs the EHR Navigator call pattern on a real-size random-weight MedGemma-4B; the last line is JSON."""
    from agent.bench.agent import DEFAULT_QUESTIONS, run_benchmark

    run_benchmark(
        generated_tokens=generated_tokens,
        questions=questions or DEFAULT_QUESTIONS,
        repeats=repeats,
        echo=typer.echo,
        count_only=count_only,
    )
