"""Run the generated questions of every record in a folder of bundles through the agent, and score each run.

Where it sits: ``medagent eval --data DIR`` (agent/cli_eval.py) builds two runtimes on the same
trace database, one at the configured context budget and one at :data:`TIGHT_BUDGET` tokens,
both reading FHIR from one scratch folder; :func:`run_record_eval` makes that folder hold a
symlink to one bundle file at a time (agent/eval/records.py), generates each record's questions
and gold ids (agent/eval/generated.py), and asks every question through
:func:`agent.runner.run_ask` exactly as a user's would, once per runtime. agent/eval/record_report.py
prints the result.

Scores, from the run's result and its trace (:func:`agent.audit.reader.load_run`):

- outcome: ``ok`` (no warnings), ``degraded`` (an answer with ``result.warnings``), ``failed``
  (a :class:`~agent.errors.MedagentError`, its code kept);
- gold recall: the share of a question's gold ids among ``result.sources`` (what the model was
  shown); a failed run recalls nothing. Recall figures are means over questions, so a
  forty-procedure year weighs as much as one blood pressure;
- context tokens: the ``context`` note's text (what the model read), at
  :data:`~agent.history.context.CHARS_PER_TOKEN` characters a token.

With the tiny test models the planner is the deterministic terms planner and the whole record
is fetched (agent/graph/planning.py ``planning_modes``), so recall measures the agent's own
selection code, not a model.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from agent.audit.reader import RunTrace, load_run
from agent.audit.recorder import NOTE
from agent.config import Settings
from agent.errors import ConfigError, InvalidResourceError, MedagentError
from agent.eval.generated import KINDS, PHRASINGS, GeneratedQuestion, Kind, generate
from agent.eval.records import bundle_files, link_only, read_records
from agent.history.context import CHARS_PER_TOKEN
from agent.runner import run_ask
from agent.runtime import AgentRuntime, ModelCache

if TYPE_CHECKING:
    from agent.inference.factory import LoadedModels

#: The tight context budget every question is also asked at (tokens).
TIGHT_BUDGET = 600
Outcome = Literal["ok", "degraded", "failed"]
OUTCOMES: tuple[Outcome, ...] = ("ok", "degraded", "failed")


@dataclass(frozen=True)
class RunScore:
    """One run of one question at one budget.

    Attributes:
        outcome: ok, degraded (answered with warnings) or failed.
        found: the gold ids among the run's sources.
        context_tokens: the size of the context the model read (None when the run failed or its
            content could not be read).
        run_id: the run in the trace.
        error: the error code of a failed run.
        warnings: the run's warnings.
    """

    outcome: Outcome
    found: tuple[str, ...] = ()
    context_tokens: float | None = None
    run_id: str | None = None
    error: str | None = None
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class QuestionScore:
    """One question asked at both budgets."""

    record: str
    question: GeneratedQuestion
    default: RunScore
    tight: RunScore

    @property
    def recall(self) -> float:
        """Return the share of gold ids in the context at the default budget."""
        return len(self.default.found) / len(self.question.gold)

    @property
    def recall_tight(self) -> float:
        """Return the share of gold ids in the context at the tight budget."""
        return len(self.tight.found) / len(self.question.gold)

    @property
    def missing(self) -> list[str]:
        """Return the gold ids not in the context at the default budget."""
        return [g for g in self.question.gold if g not in self.default.found]


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


@dataclass
class RecordEvalReport:
    """Every question's scores, the kinds records had no gold for, and the files that could not be read."""

    results: list[QuestionScore] = field(default_factory=list)
    not_applicable: Counter[str] = field(default_factory=Counter)
    records: int = 0
    skipped_files: list[str] = field(default_factory=list)
    test_models: bool = False
    wall_s: float = 0.0

    def kinds(self) -> list[Kind]:
        """Return the kinds asked at least once, in :data:`~agent.eval.generated.KINDS` order."""
        return [kind for kind in KINDS if any(r.question.kind == kind for r in self.results)]

    def summary(self, kind: str | None = None) -> dict[str, Any]:
        """Return the figures over every question, or over one kind's.

        Runs count both budgets (two per question); recall is the mean over questions.
        """
        rows = [r for r in self.results if kind is None or r.question.kind == kind]
        runs = [run for row in rows for run in (row.default, row.tight)]
        outcomes = Counter(run.outcome for run in runs)
        return {
            "questions": len(rows),
            "runs": len(runs),
            **{outcome: outcomes[outcome] for outcome in OUTCOMES},
            "recall": _rounded(_mean([r.recall for r in rows])),
            "recall_tight": _rounded(_mean([r.recall_tight for r in rows])),
            "complete": sum(r.recall == 1.0 for r in rows),
            "gold_ids": sum(len(r.question.gold) for r in rows),
            "context_tokens_median": _median([t for r in rows if (t := r.default.context_tokens) is not None]),
            "context_tokens_median_tight": _median([t for r in rows if (t := r.tight.context_tokens) is not None]),
            "not_applicable": self.not_applicable[kind] if kind else sum(self.not_applicable.values()),
        }

    def by_phrasing(self) -> dict[str, dict[str, Any]]:
        """Return, per phrasing template asked, its text, how often it was asked and its recall."""
        rows: dict[str, list[QuestionScore]] = {}
        for row in self.results:
            rows.setdefault(row.question.phrasing, []).append(row)
        return {
            key: {
                "template": phrasing_template(key),
                "questions": len(asked),
                "recall": _rounded(_mean([r.recall for r in asked])),
                "recall_tight": _rounded(_mean([r.recall_tight for r in asked])),
            }
            for key, asked in sorted(rows.items(), key=lambda item: _phrasing_order(item[0]))
        }

    def misses(self) -> list[dict[str, Any]]:
        """Return the questions with recall below 1 at the default budget: wording, record and what is missing."""
        return [
            {
                "kind": row.question.kind,
                "phrasing": row.question.phrasing,
                "question": row.question.text,
                "record": row.record,
                "patient": row.question.patient_id,
                "missing": len(row.missing),
                "gold": len(row.question.gold),
                "outcome": row.default.outcome,
                "error": row.default.error,
                "run_id": row.default.run_id,
            }
            for row in self.results
            if row.recall < 1.0
        ]

    def last_line(self) -> dict[str, Any]:
        """Return the one-line JSON summary every ``medagent eval --data`` run ends with."""
        overall = self.summary()
        by_kind = {}
        for kind in self.kinds():
            figures = self.summary(kind)
            by_kind[kind] = {key: figures[key] for key in ("recall", "recall_tight", "runs", "failed", "degraded")}
        return {
            "records": self.records,
            "runs": overall["runs"],
            "failed": overall["failed"],
            "degraded": overall["degraded"],
            "recall": overall["recall"],
            "recall_tight": overall["recall_tight"],
            "by_kind": by_kind,
            "context_tokens_median": overall["context_tokens_median"],
            "context_tokens_median_tight": overall["context_tokens_median_tight"],
        }

    def to_dict(self) -> dict[str, Any]:
        """Return everything as JSON-ready data: the last line's keys, per-kind detail, phrasings, misses, rows."""
        return {
            **self.last_line(),
            "questions": len(self.results),
            "test_models": self.test_models,
            "wall_s": round(self.wall_s, 1),
            "by_kind": {kind: self.summary(kind) for kind in self.kinds()},
            "not_applicable": {kind: self.not_applicable[kind] for kind in KINDS},
            "skipped_files": self.skipped_files,
            "by_phrasing": self.by_phrasing(),
            "misses": self.misses(),
            "rows": [_row(r) for r in self.results],
        }


def phrasing_template(key: str) -> str:
    """Return the template of a phrasing key ``<kind>:<n>``."""
    kind, _, index = key.partition(":")
    return PHRASINGS[cast(Kind, kind)][int(index)]


def _phrasing_order(key: str) -> tuple[int, int]:
    kind, _, index = key.partition(":")
    return KINDS.index(cast(Kind, kind)), int(index)


def _row(row: QuestionScore) -> dict[str, Any]:
    return {
        "record": row.record,
        "patient": row.question.patient_id,
        "kind": row.question.kind,
        "phrasing": row.question.phrasing,
        "question": row.question.text,
        "gold": list(row.question.gold),
        "recall": _rounded(row.recall),
        "recall_tight": _rounded(row.recall_tight),
        "default": vars(row.default),
        "tight": vars(row.tight),
    }


# -- running ------------------------------------------------------------------------------------------------


def shared_models(loader: Callable[[Settings], LoadedModels] | None = None) -> ModelCache:
    """Return a model cache that loads the models once for runtimes differing only in context budget.

    :class:`~agent.runtime.ModelCache` keys on every model setting, the budget included, so two
    runtimes at two budgets would otherwise load the same checkpoints twice (minutes with real ones).
    """
    loaded: dict[str, LoadedModels] = {}

    def load(settings: Settings) -> LoadedModels:
        key = settings.models.model_dump_json(exclude={"context_token_budget"})
        if key not in loaded:
            if loader is None:
                from agent.inference.factory import load_models  # torch loads here, on first use

                loaded[key] = load_models(settings.models)
            else:
                loaded[key] = loader(settings)
        return loaded[key]

    return ModelCache(loader=load)


def context_tokens(trace: RunTrace) -> float | None:
    """Return the size of the context the model read, in estimated tokens, from the trace's ``context`` note."""
    notes = [e for e in trace.events if e.kind == NOTE and e.name == "context"]
    content = notes[-1].content if notes else None
    text = content.get("text") if isinstance(content, dict) else None
    return len(text) / CHARS_PER_TOKEN if isinstance(text, str) else None


async def ask_and_score(
    runtime: AgentRuntime, question: GeneratedQuestion, as_of: datetime | None
) -> tuple[RunScore, bool]:
    """Ask one question through the agent, as a user would, and score the run against its gold ids.

    Returns:
        The run's score, and whether the tiny test models answered.
    """
    try:
        result = await run_ask(
            runtime, patient_id=question.patient_id, question=question.text, trigger="eval", as_of=as_of
        )
    except MedagentError as exc:
        return RunScore("failed", run_id=exc.details.get("run_id"), error=exc.code), False
    if result.status != "ok":  # an interrupt waits for a user: no answer
        return RunScore("failed", run_id=result.run_id, error=result.status), result.test_models
    trace = load_run(runtime.engine, result.run_id, include_content=True, cipher=runtime.cipher)
    sources = set(result.sources)
    score = RunScore(
        "degraded" if result.warnings else "ok",
        found=tuple(g for g in question.gold if g in sources),
        context_tokens=context_tokens(trace),
        run_id=result.run_id,
        warnings=tuple(result.warnings),
    )
    return score, result.test_models


async def run_record_eval(
    default: AgentRuntime,
    tight: AgentRuntime,
    data_dir: Path,
    *,
    records: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> RecordEvalReport:
    """Ask every generated question of every record in ``data_dir`` at both budgets and score the runs.

    Args:
        default: the runtime at the default context budget.
        tight: the runtime at the tight budget; both must read FHIR from the same bundle folder,
            which this function fills with one symlink at a time.
        data_dir: the folder of bundles (read in place).
        records: stop after this many records (files sorted by name).
        progress: receives one line per record.

    Raises:
        ConfigError: the runtimes do not share one bundle folder, or the data folder holds no patient.
    """
    folder = default.settings.fhir.bundle_dir
    if folder is None or default.settings.fhir.base_url or tight.settings.fhir.bundle_dir != folder:
        raise ConfigError("both eval runtimes must read FHIR from the same scratch bundle folder")
    report = RecordEvalReport()
    started = time.perf_counter()
    default.ensure_schema()
    tight.ensure_schema()
    for file in bundle_files(data_dir):
        if records is not None and report.records >= records:
            break
        link_only(folder, file)
        try:
            patients = await read_records(folder, file)
        except InvalidResourceError as exc:  # a stray JSON file in the folder is not a record
            report.skipped_files.append(f"{file.name}: {exc.message}")
            continue
        for record in patients[: None if records is None else records - report.records]:
            made = generate(record, ordinal=report.records)
            report.records += 1
            report.not_applicable.update(made.not_applicable)
            for question in made.questions:
                scores = []
                for runtime in (default, tight):
                    score, test_models = await ask_and_score(runtime, question, made.as_of)
                    report.test_models = report.test_models or test_models
                    scores.append(score)
                report.results.append(QuestionScore(file.name, question, scores[0], scores[1]))
            if progress is not None:
                progress(f"record {report.records}: {file.name}: {len(made.questions)} questions")
    report.wall_s = time.perf_counter() - started
    if report.records == 0:
        raise ConfigError(f"no Patient found in the FHIR files of {data_dir}")
    return report
