"""MedGemma adapter: prompt layout, greedy generation, counts, thinking blocks stripped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from agent.errors import ModelOutputError, ModelUnavailableError
from agent.inference.medgemma import MedGemma, strip_thinking
from agent.inference.protocols import GenerationRequest


def _printable(text: str) -> bool:
    return "\ufffd" not in text and all(char.isprintable() or char in "\n\t" for char in text)


def test_generate_without_images(medgemma: MedGemma) -> None:
    result = medgemma.generate(
        GenerationRequest(system="Answer briefly.", user_text="Summarise the history.", max_new_tokens=12)
    )
    assert result.text
    assert _printable(result.text)
    assert result.prompt_tokens > 0
    assert 0 < result.output_tokens <= 12
    assert result.latency_s > 0
    assert result.parameters == {"max_new_tokens": 12, "do_sample": False}


def test_generate_with_two_images_adds_their_tokens(medgemma: MedGemma, images: list[Image.Image]) -> None:
    text_only = GenerationRequest(system="", user_text="Compare the two studies.", max_new_tokens=8)
    with_images = text_only.model_copy(update={"images": images[:2]})
    without = medgemma.generate(text_only)
    result = medgemma.generate(with_images)
    assert result.text and _printable(result.text)
    assert result.output_tokens > 0
    per_image = medgemma.processor.image_seq_length
    assert result.prompt_tokens - without.prompt_tokens >= 2 * per_image


def test_greedy_generation_is_deterministic(medgemma: MedGemma, images: list[Image.Image]) -> None:
    request = GenerationRequest(system="Be careful.", user_text="What changed?", images=images[:1], max_new_tokens=10)
    first = medgemma.generate(request)
    second = medgemma.generate(request)
    assert first.text == second.text
    assert first.output_tokens == second.output_tokens


def test_greedy_config_neutralises_the_checkpoint_sampling_defaults(medgemma: MedGemma) -> None:
    greedy = medgemma._generation_config(GenerationRequest(system="", user_text="x", max_new_tokens=7))
    assert (greedy.do_sample, greedy.max_new_tokens, greedy.top_k, greedy.top_p) == (False, 7, 50, 1.0)
    assert greedy.eos_token_id == medgemma.model.generation_config.eos_token_id
    sampled = medgemma._generation_config(GenerationRequest(system="", user_text="x", do_sample=True))
    assert (sampled.do_sample, sampled.top_k) == (True, medgemma.model.generation_config.top_k)
    # The model's own config is left as loaded.
    assert medgemma.model.generation_config.do_sample is True


def test_prompt_folds_system_into_the_user_turn_with_images_first(
    medgemma: MedGemma, images: list[Image.Image], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    original = medgemma.model.generate

    def spy(**kwargs: Any) -> Any:
        seen.append(medgemma.processor.tokenizer.decode(kwargs["input_ids"][0]))
        return original(**kwargs)

    monkeypatch.setattr(medgemma.model, "generate", spy)
    medgemma.generate(
        GenerationRequest(system="SYSTEM RULES", user_text="USER QUESTION", images=images[:1], max_new_tokens=2)
    )
    prompt = seen[0]
    assert prompt.startswith("<bos><start_of_turn>user\nSYSTEM RULES\n\n")
    assert prompt.count("<start_of_turn>") == 2  # one user turn, then the model's
    assert prompt.index("<start_of_image>") < prompt.index("USER QUESTION")
    assert prompt.endswith("USER QUESTION<end_of_turn>\n<start_of_turn>model\n")


def test_generate_strips_a_thinking_block_and_special_tokens(
    medgemma: MedGemma, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokenizer = medgemma.processor.tokenizer
    scripted = tokenizer(
        "<unused94>the patient history<unused95>no acute finding<end_of_turn>", add_special_tokens=False
    )["input_ids"]

    def scripted_generate(**kwargs: Any) -> torch.Tensor:
        return torch.cat([kwargs["input_ids"], torch.tensor([scripted])], dim=-1)

    monkeypatch.setattr(medgemma.model, "generate", scripted_generate)
    result = medgemma.generate(GenerationRequest(system="", user_text="Findings?"))
    assert result.text == "no acute finding"
    assert result.output_tokens == len(scripted)


def test_generation_failure_becomes_model_output_error(medgemma: MedGemma, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(**_: Any) -> Any:
        raise RuntimeError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(medgemma.model, "generate", broken)
    with pytest.raises(ModelOutputError) as caught:
        medgemma.generate(GenerationRequest(system="", user_text="x"))
    assert caught.value.code == "model_failed"
    assert "RuntimeError" in caught.value.message


def test_load_failure_names_the_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailableError) as caught:
        MedGemma.load(tmp_path, model_id="x", device="cpu", dtype=torch.float32, test_model=False)
    assert str(tmp_path) in caught.value.message


def test_identity(medgemma: MedGemma) -> None:
    assert medgemma.identity.backend == "transformers"
    assert medgemma.identity.test_model is True
    assert medgemma.identity.revision and medgemma.identity.revision.startswith("sha256:")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("plain answer", "plain answer"),
        ("<unused94>thought\nstep by step<unused95>The answer.", "The answer."),
        ("  <unused94>a<unused95> one <unused94>b<unused95>two ", "one two"),
        ("Answer first. <unused94>cut off by max_new_tokens", "Answer first."),
        ("<unused94>only thinking, never finished", ""),
        # The opener was part of the prompt: everything up to the closer is thinking.
        ("thinking from the prompt<unused95>\nThe answer.", "The answer."),
        ("multi\nline\n<unused94>x\ny<unused95>\nkept\n", "multi\nline\n\nkept"),
    ],
)
def test_strip_thinking(raw: str, expected: str) -> None:
    assert strip_thinking(raw) == expected
