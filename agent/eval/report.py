"""Print an :class:`~agent.eval.harness.EvalReport` as a table: per kind, then overall.

Where it sits: ``medagent eval`` prints this (or the JSON of ``EvalReport.to_dict``). When the
tiny test models answered, the report opens with a plain statement that its answer scores are
meaningless, so nobody reads noise as a result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from agent.eval.harness import TEST_MODELS_NOTICE, EvalReport
from agent.eval.questions import KINDS

_COLUMNS = (
    ("questions", "n", "{:d}"),
    ("fact_recall", "recall", "{:.1%}"),
    ("citation_precision", "cit.prec", "{:.1%}"),
    ("dangling_citations", "dangling", "{:d}"),
    ("exact_match", "exact", "{:.1%}"),
    ("model_calls_per_question", "calls/q", "{:.1f}"),
    ("prompt_tokens_per_question", "tokens/q", "{:.0f}"),
    ("latency_median_s", "p50 s", "{:.2f}"),
)


def _cell(value: Any, spec: str) -> str:
    return "-" if value is None else spec.format(value)


def format_report(report: EvalReport) -> list[str]:
    """Return the report's lines: the test-model notice (if any), a row per kind, the overall row."""
    lines: list[str] = []
    if report.test_models:
        lines += [f"NOTE: {TEST_MODELS_NOTICE}", ""]
    header = f"{'kind':<13}" + "".join(f"{title:>10}" for _, title, _ in _COLUMNS)
    lines.append(header)
    rows: list[tuple[str, dict[str, Any]]] = [
        (kind, report.summary(kind)) for kind in KINDS if any(r.kind == kind for r in report.results)
    ]
    rows.append(("overall", report.summary()))
    for name, summary in rows:
        lines.append(f"{name:<13}" + "".join(f"{_cell(summary[key], spec):>10}" for key, _, spec in _COLUMNS))
    overall = report.summary()
    lines.append("")
    if overall["fact_recall"] is None:
        lines.append("no questions were asked")
    else:
        lines.append(
            f"gold facts in context: {overall['fact_recall']:.1%} of {overall['gold_facts']}; "
            f"questions with every gold fact: {overall['questions_complete']}/{overall['questions']}; "
            f"failed runs: {overall['failed']}"
        )
    failed = [r for r in report.results if r.error]
    for result in failed:
        lines.append(f"  failed: {result.patient}: {result.question!r} ({result.error}, run {result.run_id})")
    return lines


def print_report(report: EvalReport, echo: Callable[[str], None] = print) -> None:
    """Print the report's lines."""
    for line in format_report(report):
        echo(line)
