"""Print a :class:`~agent.eval.record_eval.RecordEvalReport` as text: per kind, per phrasing, the misses, then JSON.

Where it sits: ``medagent eval --data DIR`` prints these lines (or, with ``--json``, the one
object of ``RecordEvalReport.to_dict``). Either way the last line is JSON (the summary of
``RecordEvalReport.last_line``), so a script or CI job reads the figures without parsing a table.
"""

from __future__ import annotations

import json
from typing import Any

from agent.eval.harness import TEST_MODELS_NOTICE
from agent.eval.record_eval import TIGHT_BUDGET, RecordEvalReport

_COLUMNS = (
    ("questions", "n", "{:d}"),
    ("ok", "ok", "{:d}"),
    ("degraded", "degr.", "{:d}"),
    ("failed", "failed", "{:d}"),
    ("recall", "recall", "{:.1%}"),
    ("recall_tight", f"@{TIGHT_BUDGET}", "{:.1%}"),
    ("context_tokens_median", "ctx tok", "{:.0f}"),
    ("context_tokens_median_tight", f"ctx@{TIGHT_BUDGET}", "{:.0f}"),
    ("not_applicable", "n/a", "{:d}"),
)


def _cell(value: Any, spec: str) -> str:
    return "-" if value is None else spec.format(value)


def _kind_table(report: RecordEvalReport) -> list[str]:
    lines = [f"{'kind':<12}" + "".join(f"{title:>9}" for _, title, _ in _COLUMNS)]
    rows: list[tuple[str, dict[str, Any]]] = [(kind, report.summary(kind)) for kind in report.kinds()]
    rows.append(("overall", report.summary()))
    for name, summary in rows:
        lines.append(f"{name:<12}" + "".join(f"{_cell(summary[key], spec):>9}" for key, _, spec in _COLUMNS))
    return lines


def _phrasing_table(report: RecordEvalReport) -> list[str]:
    lines = [f"{'phrasing':<14}{'n':>4}{'recall':>9}{f'@{TIGHT_BUDGET}':>9}  template"]
    for key, entry in report.by_phrasing().items():
        lines.append(
            f"{key:<14}{entry['questions']:>4}{_cell(entry['recall'], '{:.1%}'):>9}"
            f"{_cell(entry['recall_tight'], '{:.1%}'):>9}  {entry['template']}"
        )
    return lines


def _miss_lines(report: RecordEvalReport) -> list[str]:
    misses = report.misses()
    lines = [f"questions that missed gold ids at the default budget: {len(misses)} of {len(report.results)}"]
    for miss in misses:
        failed = f" [failed: {miss['error']}]" if miss["outcome"] == "failed" else ""
        lines.append(
            f"  {miss['kind']:<11} missing {miss['missing']}/{miss['gold']}  {miss['question']!r}"
            f"  ({miss['record']}){failed}"
        )
    return lines


def format_record_report(report: RecordEvalReport) -> list[str]:
    """Return the report's lines; the last one is the JSON summary."""
    lines: list[str] = []
    if report.test_models:
        lines += [f"NOTE: {TEST_MODELS_NOTICE}", ""]
    lines.append(
        f"{report.records} records, {len(report.results)} questions, each asked at the default context budget "
        f"and at {TIGHT_BUDGET} tokens; recall = share of a question's gold ids in the context, mean over questions; "
        f"n/a = records without gold for the kind; {report.wall_s:.0f} s"
    )
    lines += ["", *_kind_table(report), "", *_phrasing_table(report), "", *_miss_lines(report)]
    lines += [f"  skipped file: {skipped}" for skipped in report.skipped_files]
    lines += ["", json.dumps(report.last_line())]
    return lines
