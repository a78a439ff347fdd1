"""``medagent bench agent``: the Navigator re-implementation, the stand-in tokenizer and a small comparison.

The tiny random-weight Gemma 3 stands in for MedGemma-4B (same classes, same adapter), generating
2 tokens per call; the real-size run is ``medagent bench agent`` itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from agent.bench.agent import (
    GEMMA_TURN_SPECIALS,
    MEDGEMMA_4B_TEXT,
    bench_questions,
    benchmark_corpus,
    medgemma_4b_config,
    run_benchmark,
    stand_in_tokenizer,
)
from agent.bench.fhir import fixture_resources
from agent.bench.navigator import MANIFEST_TYPES, Navigator, manifest_text
from agent.config import DEFAULT_FIXTURES
from agent.domain.events import ListObserver
from agent.eval.harness import fixture_patient_ids, gold_for
from agent.inference.medgemma import MedGemma
from agent.inference.tiny_models import ensure_test_models
from agent.sources.fhir_bundle_dir import BundleDirFhirSource


@pytest.fixture(scope="module")
def tiny_medgemma(test_models_dir: Path) -> MedGemma:
    _, medgemma_dir = ensure_test_models(test_models_dir)
    return MedGemma.load(medgemma_dir, model_id="tiny-medgemma", device="cpu", dtype=torch.float32, test_model=True)


async def test_navigator_makes_one_fetch_and_one_extraction_per_type(tiny_medgemma: MedGemma) -> None:
    patient_id = fixture_patient_ids()["cxr"]
    _, resources = fixture_resources()["cxr"]
    types = ["Observation", "Condition", "MedicationRequest"]
    observer = ListObserver()
    fhir = BundleDirFhirSource(DEFAULT_FIXTURES / "fhir", observer=observer)
    try:
        run = await Navigator(tiny_medgemma, max_new_tokens=2).run(
            fhir, patient_id, "Is his kidney function getting worse?", types=types
        )
    finally:
        await fhir.aclose()

    assert len(run.steps) == 2 + 2 * len(types) + 1
    assert [(s.kind, s.name, s.resource_type) for s in run.steps] == [
        ("tool", "manifest", None),
        ("model", "identify_types", None),
        *[pair for t in types for pair in (("tool", "fetch", t), ("model", "extract_facts", t))],
        ("model", "synthesise", None),
    ]
    assert len(observer.fhir) == len(MANIFEST_TYPES) + len(types)  # the manifest reads everything first
    for step in run.model_steps:
        assert step.output_tokens <= 2 and step.prompt_tokens > 0
        # the count is the processor's own: the prompt re-tokenised through the chat template gives the same
        chat = [{"role": "user", "content": [{"type": "text", "text": step.prompt}]}]
        ids = tiny_medgemma.processor.apply_chat_template(
            chat, tokenize=True, return_dict=True, return_tensors="pt", add_generation_prompt=True
        )["input_ids"]
        assert ids.shape[-1] == step.prompt_tokens
    assert run.prompt_tokens == sum(s.prompt_tokens for s in run.model_steps)
    # each extraction call saw exactly its type's resources, as raw JSON
    for step in run.steps:
        if step.name == "extract_facts":
            of_type = [r for r in resources if r["resourceType"] == step.resource_type]
            assert sorted(step.seen) == sorted(f"{r['resourceType']}/{r['id']}" for r in of_type)
            assert all(json.dumps(r) in step.prompt for r in of_type)
    assert run.seen == {f"{r['resourceType']}/{r['id']}" for r in resources if r["resourceType"] in types}


def test_manifest_lists_types_with_counts_and_concepts() -> None:
    _, resources = fixture_resources()["cxr"]
    by_type = {t: [r for r in resources if r["resourceType"] == t] for t in MANIFEST_TYPES}
    text = manifest_text(by_type)
    assert f"- Observation ({len(by_type['Observation'])}):" in text
    assert "NT-proBNP" in text or "Natriuretic" in text


def test_stand_in_tokenizer_keeps_words_whole_and_splits_digits() -> None:
    tokenizer = stand_in_tokenizer(benchmark_corpus())
    text = "Creatinine rose to 1.42 mg/dL [Observation/abc-12]"
    pieces = tokenizer.tokenize(text)
    assert "Creatinine" in pieces and "▁mg" in pieces and "Observation" in pieces
    assert [p for p in pieces if p.strip("▁").isdigit()] == ["1", "4", "2", "1", "2"]
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    assert all(len(tokenizer.tokenize(t)) == 1 for t in GEMMA_TURN_SPECIALS)
    # unknown words are still spelled out, never dropped
    assert tokenizer.decode(tokenizer("Zyxwvq", add_special_tokens=False)["input_ids"]) == "Zyxwvq"


def test_config_is_medgemma_4b_size() -> None:
    from transformers import Gemma3ForConditionalGeneration

    config = medgemma_4b_config(stand_in_tokenizer(["x"]))
    with torch.device("meta"):
        model = Gemma3ForConditionalGeneration(config)
    params = sum(p.numel() for p in model.parameters())
    assert 4.2e9 < params < 4.4e9  # medgemma-4b-it: 4.3 B parameters
    assert config.text_config.num_hidden_layers == MEDGEMMA_4B_TEXT["num_hidden_layers"] == 34
    assert config.text_config.layer_types.count("full_attention") == 5  # one global layer in six


@pytest.mark.slow
def test_comparison_on_tiny_gemma_reports_figures_from_the_right_inputs(tiny_medgemma: MedGemma) -> None:
    lines: list[str] = []
    figures = run_benchmark(generated_tokens=2, questions=2, repeats=1, echo=lines.append, reasoner=tiny_medgemma)

    assert json.loads(lines[-1]) == json.loads(json.dumps(figures))
    for key in (
        "speedup_vs_navigator",
        "prompt_token_reduction_vs_navigator",
        "fact_recall",
        "navigator_fact_recall",
        "overhead_share",
    ):
        assert isinstance(figures[key], float), key
    questions = bench_questions(2)
    assert figures["questions"] == [q.text for q in questions]
    types = [len(q.gold_types) for q in questions]
    assert figures["navigator_calls"] == sum(2 + 2 * n + 1 for n in types)
    assert figures["navigator_model_calls"] == sum(2 + n for n in types)
    # oracle types: every gold fact's resource went into an extraction prompt
    patient, resources = fixture_resources()["cxr"]
    gold = sum(len(gold_for(q, [patient, *resources])[0]) for q in questions)
    assert figures["gold_facts"] == gold and figures["navigator_fact_recall"] == 1.0
    assert 0.0 <= figures["fact_recall"] <= 1.0
    assert 0.0 <= figures["overhead_share"] < 1.0
    assert figures["agent_prompt_tokens"] > 0 and figures["navigator_prompt_tokens"] > figures["agent_prompt_tokens"]
    assert figures["prompt_token_reduction_vs_navigator"] == pytest.approx(
        figures["navigator_prompt_tokens"] / figures["agent_prompt_tokens"]
    )


def test_count_only_compares_prompt_tokens_without_a_model() -> None:
    lines: list[str] = []
    figures = run_benchmark(questions=2, count_only=True, echo=lines.append)
    assert json.loads(lines[-1])["count_only"] is True
    assert figures["speedup_vs_navigator"] is None and figures["overhead_share"] is None
    assert figures["navigator_model_calls"] == sum(2 + len(q.gold_types) for q in bench_questions(2))
    # the agent puts the gold facts' resources before the model in one call, the Navigator in several
    assert figures["fact_recall"] == figures["navigator_fact_recall"] == 1.0
    assert figures["navigator_prompt_tokens"] > figures["agent_prompt_tokens"] > 0


def test_bench_agent_command_prints_json_last() -> None:
    import typer
    from typer.testing import CliRunner

    from agent.cli_eval import bench_agent_command

    app = typer.Typer()
    app.command()(bench_agent_command)
    result = CliRunner().invoke(app, ["--count-only", "--questions", "1"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["questions"] == [bench_questions(1)[0].text]
    assert figures["prompt_token_reduction_vs_navigator"] > 1.0
