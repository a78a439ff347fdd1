"""``medagent eval``: the question set, the scoring on scripted answers, and a run on the tiny models.

Real: the bundle-folder FHIR and DICOM-folder sources, the graph, citation checking, the SQL
trace the harness reads its model calls from. Scripted: the reasoner in the scoring test, so
its answers cite exactly the ids whose scores are computed by hand below.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from agent.bench.fhir import fixture_resources
from agent.bench.fhir_questions import resolve_fact
from agent.config import DEFAULT_FIXTURES, get_settings
from agent.domain.imaging import LabelScore
from agent.eval.harness import EvalReport, answer_has_value, gold_for, run_eval
from agent.eval.questions import EVAL_QUESTIONS, KINDS, EvalQuestion, expected_value
from agent.eval.report import format_report
from agent.inference.factory import LoadedModels
from agent.inference.labels import LabelSet
from agent.inference.protocols import GenerationRequest, GenerationResult, ModelIdentity
from agent.runtime import AgentRuntime, ModelCache

PATIENTS = fixture_resources()


def _question(text: str) -> EvalQuestion:
    return next(q for q in EVAL_QUESTIONS if q.text == text)


def _gold(question: EvalQuestion) -> list[str]:
    patient, resources = PATIENTS[question.patient]
    return gold_for(question, [patient, *resources])[0]


# -- the question set --------------------------------------------------------------------------------


def test_question_set_covers_the_kinds_and_every_gold_fact_exists() -> None:
    assert len(EVAL_QUESTIONS) >= 50
    kinds = Counter(q.kind for q in EVAL_QUESTIONS)
    assert set(kinds) == set(KINDS)
    assert kinds["imaging"] >= 5 and kinds["two_type"] >= 10
    imaging = [q for q in EVAL_QUESTIONS if q.kind == "imaging"]
    assert {q.patient for q in imaging} == {"cxr", "ct"}  # both fixture studies are asked about
    for question in EVAL_QUESTIONS:
        patient, resources = PATIENTS[question.patient]
        gold, _ = gold_for(question, [patient, *resources])
        assert len(gold) == len(question.facts)
        if question.kind == "two_type":
            assert len({g.split("/")[0] for g in gold}) >= 2


def test_value_questions_read_their_expected_value_from_the_fixture() -> None:
    with_values = []
    for question in EVAL_QUESTIONS:
        if question.value_fact is None:
            continue
        patient, resources = PATIENTS[question.patient]
        _, value = gold_for(question, [patient, *resources])
        key = resolve_fact(question.value_fact, resources)
        resource = next(r for r in resources if f"{r['resourceType']}/{r['id']}" == key)
        quantity = resource.get("valueQuantity")
        if quantity is None:  # smoking status is a coded value: no exact match defined
            assert value is None
            continue
        assert value is not None and float(value) == float(quantity["value"])
        with_values.append(question)
    assert len(with_values) >= 6


def test_exact_match_compares_numbers_not_substrings() -> None:
    assert answer_has_value("Creatinine is 1.40 mg/dL [Observation/x].", "1.4")
    assert answer_has_value("NT-proBNP was 2,450 pg/mL.", "2450")
    assert not answer_has_value("Creatinine is 11.4 mg/dL.", "1.4")
    assert not answer_has_value("Creatinine is 1.45 mg/dL.", "1.4")
    assert not answer_has_value("see Observation/obs-14 and [Observation/1ff02-14]", "14")
    assert answer_has_value("SpO2 89% [Observation/a-89].", "89")
    assert expected_value({"valueQuantity": {"value": 12.40}}) == "12.4"
    assert expected_value({"component": []}) is None


# -- scoring, with a scripted reasoner ---------------------------------------------------------------


class _ConstantScorer:
    identity = ModelIdentity(model_id="constant-scorer", backend="test")

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.ones(len(images), 4), dim=-1)

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.ones(len(texts), 4), dim=-1)

    def score_embeddings(self, image_embeddings: torch.Tensor, label_set: LabelSet) -> list[list[LabelScore]]:
        return [[LabelScore(label=n, score=0.5) for n in label_set.names] for _ in range(image_embeddings.shape[0])]

    def zero_shot(self, images: list[Image.Image], labels: list[str]) -> list[list[LabelScore]]:
        return [[LabelScore(label=label, score=0.5) for label in labels] for _ in images]


class _ScriptedReasoner:
    """Answers each question with a fixed text (by the question it finds in the prompt); counts calls."""

    identity = ModelIdentity(model_id="scripted", backend="test")

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers
        self.calls: Counter[str] = Counter()

    def generate(self, request: GenerationRequest) -> GenerationResult:
        question = next(q for q in self.answers if q in request.user_text)
        self.calls[question] += 1
        return GenerationResult(text=self.answers[question], prompt_tokens=100, output_tokens=10, latency_s=0.01)


def _runtime(tmp_path: Path, reasoner: Any) -> AgentRuntime:
    settings = get_settings(
        fhir={"bundle_dir": DEFAULT_FIXTURES / "fhir"},
        dicom={"dicom_dir": DEFAULT_FIXTURES / "dicom"},
        db={"url": f"sqlite:///{tmp_path / 'trace.db'}"},
        imaging={"similar_cases": 0},
    )
    loaded = LoadedModels(scorer=_ConstantScorer(), reasoner=reasoner, used_test_models=False)
    return AgentRuntime(settings=settings, models=ModelCache(loader=lambda _s: loaded))


async def test_scores_recall_precision_dangling_and_exact_match_by_hand(tmp_path: Path) -> None:
    spo2 = _question("What is his current oxygen saturation?")
    hb = _question("Is he anaemic? What is the latest hemoglobin?")
    anticoag = _question("Which anticoagulant is he on for atrial fibrillation?")
    allergy = _question("Does he have a penicillin allergy?")
    cxr_patient = PATIENTS["cxr"][0]
    patient, resources = PATIENTS["cxr"]
    spo2_value = gold_for(spo2, [patient, *resources])[1]
    answers = {
        # the right value, citing the gold fact: precision 1/1, exact match
        spo2.text: f"Oxygen saturation is {spo2_value}% [{_gold(spo2)[0]}].",
        # a wrong value, the gold fact and a made-up id: precision 1/2, one dangling, no match
        hb.text: f"Hemoglobin is 99.9 g/dL [{_gold(hb)[0]}] [Observation/00000000-made-up].",
        # one of three gold facts and the (valid, not gold) Patient: precision 1/2
        anticoag.text: f"He takes apixaban [{_gold(anticoag)[0]}] [Patient/{cxr_patient['id']}].",
        # no citation at all
        allergy.text: "No allergy is recorded.",
    }
    reasoner = _ScriptedReasoner(answers)
    runtime = _runtime(tmp_path, reasoner)

    report = await run_eval(runtime, [spo2, hb, anticoag, allergy], oracle_plan=True)

    rows = {r.question: r for r in report.results}
    assert [r.error for r in report.results] == [None] * 4
    assert [
        (rows[q.text].cited, rows[q.text].cited_gold, rows[q.text].dangling) for q in (spo2, hb, anticoag, allergy)
    ] == [
        (1, 1, 0),
        (2, 1, 1),
        (2, 1, 0),
        (0, 0, 0),
    ]
    assert [rows[q.text].exact_match for q in (spo2, hb, anticoag, allergy)] == [True, False, None, None]
    for question in (spo2, hb, anticoag, allergy):
        row = rows[question.text]
        assert row.gold == _gold(question)
        assert row.prompt_tokens == 100 * reasoner.calls[question.text]  # read back from the trace
        assert row.model_calls >= reasoner.calls[question.text] >= 1
    overall = report.summary()
    assert overall["gold_facts"] == 6
    assert overall["fact_recall"] == 1.0  # the fixture record fits the context: every gold fact is shown
    assert overall["citation_precision"] == pytest.approx(3 / 5)
    assert overall["dangling_citations"] == 1
    assert overall["exact_match"] == 0.5 and overall["exact_match_questions"] == 2
    assert report.summary("latest_value")["citation_precision"] == pytest.approx(2 / 3)
    assert not report.test_models
    assert not any("NOTE" in line for line in format_report(report))


def test_recall_counts_only_gold_facts_among_the_sources() -> None:
    from agent.domain.answer import AskResult, Citation
    from agent.eval.harness import score_run

    question = _question("Which anticoagulant is he on for atrial fibrillation?")
    gold = _gold(question)
    result = AskResult(
        run_id="r1",
        status="ok",
        answer="x",
        sources=[gold[0], gold[2], "Condition/other"],
        citations=[Citation(reference=gold[1], valid=False)],
    )
    row = score_run(question, result, gold, None, [{"prompt_tokens": 7}, {}], 1.5)
    assert (row.in_context, row.recall, row.cited, row.cited_gold, row.dangling) == (2, 2 / 3, 1, 0, 1)
    assert (row.model_calls, row.prompt_tokens) == (2, 7)


# -- the tiny models, end to end -----------------------------------------------------------------------


@pytest.mark.slow
def test_cli_runs_the_tiny_models_and_says_answer_scores_are_meaningless(
    test_models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import typer

    from agent.cli_eval import eval_command

    monkeypatch.setenv("MEDAGENT_MODELS__TEST_MODELS_DIR", str(test_models_dir))
    app = typer.Typer()
    app.command()(eval_command)
    runner = CliRunner()

    result = runner.invoke(app, ["--limit", "3", "--test-models", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["test_models"] is True
    assert "answer scores (exact match, citation precision) are meaningless" in report["notice"]
    assert report["overall"]["questions"] == 3 and report["overall"]["failed"] == 0
    for row in report["questions"]:
        assert row["model_calls"] >= 1 and row["prompt_tokens"] > 0 and row["latency_s"] > 0
        assert row["in_context"] <= len(row["gold"])
    assert report["overall"]["gold_facts"] == sum(len(row["gold"]) for row in report["questions"])

    table = runner.invoke(app, ["--limit", "1", "--test-models"])
    assert table.exit_code == 0, table.output
    assert table.stdout.startswith("NOTE: Tiny random-weight test models were used")
    assert "overall" in table.stdout


def test_report_of_no_questions_prints_dashes() -> None:
    lines = format_report(EvalReport())
    overall = next(line for line in lines if line.startswith("overall"))
    assert overall.split()[1:] == ["0", "-", "-", "0", "-", "-", "-", "-"]
    assert lines[-1] == "no questions were asked"
