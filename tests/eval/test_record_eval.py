"""``medagent eval --data``: scoring by hand, a run on the hand-checked bundle, and the CLI on a real Synthea bundle.

Real: the bundle-folder FHIR source, the graph, the SQL trace the scores are read back from, and
(in the slow test) the tiny random-weight models and a Synthea bundle from ../shared/data.
Scripted: the reasoner of the fast run (its answer is not scored; the context is), so that run
takes a second.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from agent.audit.reader import load_run
from agent.config import Settings, get_settings
from agent.domain.imaging import LabelScore
from agent.eval.generated import GeneratedQuestion
from agent.eval.record_eval import (
    TIGHT_BUDGET,
    QuestionScore,
    RecordEvalReport,
    RunScore,
    run_record_eval,
    shared_models,
)
from agent.eval.record_report import format_record_report
from agent.inference.factory import LoadedModels
from agent.inference.labels import LabelSet
from agent.inference.protocols import GenerationRequest, GenerationResult, ModelIdentity
from agent.runtime import AgentRuntime
from tests.eval.hand_bundle import write_hand_bundle
from tests.support.shared_data import SYNTHEA_DIR, synthea_dir_or_skip

SYNTHEA = SYNTHEA_DIR
LAST_LINE_KEYS = {"runs", "failed", "recall", "recall_tight", "by_kind", "context_tokens_median"}


def _question(kind: str, gold: tuple[str, ...], phrasing: str = "meds:0") -> GeneratedQuestion:
    return GeneratedQuestion("p1", kind, phrasing, f"{kind}?", gold)  # type: ignore[arg-type]


# -- scoring --------------------------------------------------------------------------------------------------


def test_summary_counts_outcomes_over_both_budgets_and_averages_recall_over_questions() -> None:
    meds = _question("meds", ("MedicationRequest/a", "MedicationRequest/b"))
    bp = _question("bp", ("Observation/bp",), "bp:1")
    report = RecordEvalReport(records=1, test_models=True)
    report.results = [
        QuestionScore(
            "r.json",
            meds,
            RunScore("ok", found=("MedicationRequest/a",), context_tokens=2000.0, run_id="r1"),
            RunScore("degraded", found=(), context_tokens=500.0, warnings=("imaging: not located",)),
        ),
        QuestionScore(
            "r.json",
            bp,
            RunScore("ok", found=("Observation/bp",), context_tokens=1000.0),
            RunScore("failed", error="source_unavailable"),
        ),
    ]
    report.not_applicable.update(["imaging", "imaging", "allergies"])

    overall = report.summary()
    assert (overall["runs"], overall["ok"], overall["degraded"], overall["failed"]) == (4, 2, 1, 1)
    assert overall["recall"] == 0.75  # (1/2 + 1) / 2: each question weighs the same
    assert overall["recall_tight"] == 0.0
    assert overall["context_tokens_median"] == 1500.0 and overall["context_tokens_median_tight"] == 500.0
    assert overall["not_applicable"] == 3 and report.summary("imaging")["not_applicable"] == 2
    (miss,) = report.misses()
    assert (miss["question"], miss["missing"], miss["gold"], miss["run_id"]) == ("meds?", 1, 2, "r1")
    assert report.by_phrasing()["bp:1"] == {
        "template": "Latest BP reading?",
        "questions": 1,
        "recall": 1.0,
        "recall_tight": 0.0,
    }

    last = report.last_line()
    assert set(last) >= LAST_LINE_KEYS
    assert last["by_kind"]["bp"] == {"recall": 1.0, "recall_tight": 0.0, "runs": 2, "failed": 1, "degraded": 0}
    lines = format_record_report(report)
    assert lines[0].startswith("NOTE: Tiny random-weight test models")
    assert json.loads(lines[-1]) == last
    assert any("missing 1/2  'meds?'" in line for line in lines)
    assert json.loads(json.dumps(report.to_dict()))["misses"][0]["record"] == "r.json"


# -- a run on the hand-checked bundle, scripted reasoner ----------------------------------------------------------


class _Scorer:
    identity = ModelIdentity(model_id="constant-scorer", backend="test")

    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.ones(len(images), 4), dim=-1)

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.ones(len(texts), 4), dim=-1)

    def score_embeddings(self, image_embeddings: torch.Tensor, label_set: LabelSet) -> list[list[LabelScore]]:
        return [[LabelScore(label=n, score=0.5) for n in label_set.names] for _ in range(image_embeddings.shape[0])]

    def zero_shot(self, images: list[Image.Image], labels: list[str]) -> list[list[LabelScore]]:
        return [[LabelScore(label=label, score=0.5) for label in labels] for _ in images]


class _Reasoner:
    identity = ModelIdentity(model_id="scripted", backend="test")

    def __init__(self) -> None:
        self.calls = 0

    def generate(self, request: GenerationRequest) -> GenerationResult:
        self.calls += 1
        return GenerationResult(text="Noted.", prompt_tokens=10, output_tokens=2, latency_s=0.0)


def _settings(scratch: Path, budget: int | None) -> Settings:
    models = {"context_token_budget": budget} if budget else {}
    return get_settings(
        fhir={"bundle_dir": scratch / "record", "base_url": None},
        dicom={"dicom_dir": scratch / "dicom", "dicomweb_url": None},
        db={"url": f"sqlite:///{scratch / 'trace.db'}"},
        imaging={"similar_cases": 0},
        agent={"planner": "terms"},  # the deterministic planner, as with the tiny models
        models=models,
    )


async def test_run_asks_every_question_at_both_budgets_and_reads_the_context_from_the_trace(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_hand_bundle(data)
    (tmp_path / "record").mkdir()
    (tmp_path / "dicom").mkdir()
    reasoner: Any = _Reasoner()  # the Reasoner protocol's parts the graph uses here
    scorer: Any = _Scorer()
    loads: list[int] = []

    def load(settings: Settings) -> LoadedModels:
        loads.append(settings.models.context_token_budget)
        return LoadedModels(scorer=scorer, reasoner=reasoner, used_test_models=False)

    models = shared_models(load)
    default = AgentRuntime(settings=_settings(tmp_path, None), models=models)
    tight = AgentRuntime(settings=_settings(tmp_path, TIGHT_BUDGET), models=models)
    progress: list[str] = []
    try:
        report = await run_record_eval(default, tight, data, progress=progress.append)
    finally:
        default.engine.dispose()
        tight.engine.dispose()

    assert loads == [default.settings.models.context_token_budget]  # one load serves both budgets
    # 3 lab, 2 trend and one of each other kind (tests/eval/test_generated.py checks their gold)
    assert report.records == 1 and progress == ["record 1: hand.json: 13 questions"]
    assert len(report.results) == 13 and report.summary()["runs"] == 26
    assert [p.name for p in (tmp_path / "record").iterdir()] == ["hand.json"]  # a symlink, read in place
    answered = [r for row in report.results for r in (row.default, row.tight) if r.outcome != "failed"]
    assert answered, [row.default.error for row in report.results]
    assert all(r.context_tokens and r.run_id for r in answered)
    # each side ran under its own settings (the budget is part of the recorded settings fingerprint)
    row = next(r for r in report.results if r.default.run_id and r.tight.run_id)
    fingerprints = {load_run(default.engine, str(run.run_id)).settings_fingerprint for run in (row.default, row.tight)}
    assert len(fingerprints) == 2
    for row in report.results:
        assert set(row.default.found) <= set(row.question.gold) and 0.0 <= row.recall <= 1.0
    assert set(report.last_line()) >= LAST_LINE_KEYS


async def test_a_folder_without_patients_is_a_config_error(tmp_path: Path) -> None:
    from agent.errors import ConfigError

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "stray.json").write_text("not json", encoding="utf-8")
    (tmp_path / "record").mkdir()
    runtime = AgentRuntime(settings=_settings(tmp_path, None))
    with pytest.raises(ConfigError, match="no Patient"):
        await run_record_eval(runtime, runtime, tmp_path / "data")


# -- the CLI on a real Synthea bundle, tiny models ----------------------------------------------------------------


def _smallest_bundle_with(data: Path, *types: str) -> Path:
    """Return the smallest bundle file holding every one of the resource types (chosen by content, not name)."""
    for file in sorted(data.glob("*.json"), key=lambda f: f.stat().st_size):
        text = file.read_text(encoding="utf-8")
        if all(f'"resourceType": "{t}"' in text for t in types):
            return file
    pytest.skip(f"no bundle in {data} holds {types}")


@pytest.mark.slow
def test_cli_runs_a_real_bundle_and_ends_with_the_json_summary(
    test_models_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import typer

    from agent.cli_eval import eval_command

    synthea_dir_or_skip()
    bundle = _smallest_bundle_with(SYNTHEA, "ImagingStudy", "Immunization", "MedicationRequest")
    data = tmp_path / "data"
    data.mkdir()
    (data / bundle.name).symlink_to(bundle)
    monkeypatch.setenv("MEDAGENT_MODELS__TEST_MODELS_DIR", str(test_models_dir))
    app = typer.Typer()
    app.command()(eval_command)

    result = CliRunner().invoke(app, ["--data", str(data), "--records", "1", "--test-models"])

    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("NOTE: Tiny random-weight test models were used")
    summary = json.loads(lines[-1])
    assert set(summary) >= LAST_LINE_KEYS
    assert summary["runs"] > 0 and summary["records"] == 1
    assert set(summary["by_kind"]) >= {"meds", "vaccines", "imaging"}
    for figures in summary["by_kind"].values():
        assert set(figures) == {"recall", "recall_tight", "runs", "failed", "degraded"}
    assert any(line.startswith("kind ") for line in lines) and any(line.startswith("overall") for line in lines)


def test_cli_refuses_fixture_options_with_data(tmp_path: Path) -> None:
    import typer

    from agent.cli_eval import eval_command

    app = typer.Typer()
    app.command()(eval_command)
    result = CliRunner().invoke(app, ["--data", str(tmp_path), "--limit", "2"])
    assert result.exit_code != 0 and "--records" in result.output
    result = CliRunner().invoke(app, ["--records", "2"])
    assert result.exit_code != 0 and "--records applies to --data" in result.output
