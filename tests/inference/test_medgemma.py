"""MedGemma adapter: prompt layout, greedy generation, counts, thinking blocks stripped."""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from agent.errors import ConfigError, ModelOutputError, ModelUnavailableError
from agent.inference.medgemma import MedGemma, strip_thinking
from agent.inference.protocols import GenerationRequest
from agent.inference.thinking import StreamCleaner, clean_text


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
    assert result.finish_reason in ("stop", "length")


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


# -- streaming -------------------------------------------------------------------------------------


def test_stream_equals_generate_with_greedy_decoding(medgemma: MedGemma, images: list[Image.Image]) -> None:
    request = GenerationRequest(system="Be brief.", user_text="What changed?", images=images[:1], max_new_tokens=16)
    whole = medgemma.generate(request)
    stream = medgemma.stream(request)
    deltas = list(stream)
    assert len(deltas) > 1  # it really streamed, piece by piece
    assert "".join(deltas) == whole.text == stream.result.text
    assert (stream.result.prompt_tokens, stream.result.output_tokens) == (whole.prompt_tokens, whole.output_tokens)
    assert stream.result.finish_reason == whole.finish_reason == "length"
    assert stream.result.parameters["stream"] is True


def test_stream_result_is_unavailable_until_read(medgemma: MedGemma) -> None:
    stream = medgemma.stream(GenerationRequest(system="", user_text="Summarise.", max_new_tokens=4))
    with pytest.raises(RuntimeError, match="read to the end"):
        _ = stream.result
    assert stream.text() == stream.result.text


def test_closing_a_stream_early_stops_generation_and_frees_the_model(medgemma: MedGemma) -> None:
    stream = medgemma.stream(GenerationRequest(system="", user_text="Summarise the history.", max_new_tokens=400))
    first = next(stream)
    assert first
    stream.close()
    # The worker stopped at its next token and released the lock: another call can run at once.
    assert medgemma._lock.acquire(timeout=10)
    medgemma._lock.release()
    assert medgemma.generate(GenerationRequest(system="", user_text="x", max_new_tokens=2)).output_tokens > 0


def _scripted_streaming_generate(medgemma: MedGemma, text: str) -> Any:
    """Replace model.generate by one that streams ``text``'s tokens as the real one would."""
    scripted = medgemma.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(**kwargs: Any) -> torch.Tensor:
        streamer = kwargs.get("streamer")
        output = torch.cat([kwargs["input_ids"], torch.tensor([scripted])], dim=-1)
        if streamer is not None:
            streamer.put(kwargs["input_ids"])  # the prompt first, as transformers does
            for token in scripted:
                streamer.put(torch.tensor([token]))
            streamer.end()
        return output

    return generate


def test_thinking_block_is_never_streamed(medgemma: MedGemma, monkeypatch: pytest.MonkeyPatch) -> None:
    answer = "<unused94>the patient history shows pleural effusion<unused95>no acute finding<end_of_turn>"
    monkeypatch.setattr(medgemma.model, "generate", _scripted_streaming_generate(medgemma, answer))
    stream = medgemma.stream(GenerationRequest(system="", user_text="Findings?"))
    deltas = list(stream)
    assert "".join(deltas) == "no acute finding" == stream.result.text
    assert not any(word in delta for delta in deltas for word in ("history", "effusion", "unused", "<"))
    assert stream.result.finish_reason == "stop"
    assert medgemma.generate(GenerationRequest(system="", user_text="Findings?")).text == "no acute finding"


def test_stream_failure_becomes_model_output_error_and_frees_the_model(
    medgemma: MedGemma, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(**_: Any) -> Any:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(medgemma.model, "generate", broken)
    with pytest.raises(ModelOutputError, match="RuntimeError"):
        list(medgemma.stream(GenerationRequest(system="", user_text="x")))
    assert medgemma._lock.acquire(timeout=1)
    medgemma._lock.release()


# -- the thinking filter on synthetic deltas ---------------------------------------------------------

_STREAM_TEXTS = [
    "plain answer",
    "  leading and trailing space  \n",
    "<unused94>thought\nstep by step<unused95>The answer.",
    "  <unused94>a<unused95> one <unused94>b<unused95>two ",
    "Answer first. <unused94>cut off by max_new_tokens",
    "<unused94>only thinking, never finished",
    "multi\nline\n<unused94>x\ny<unused95>\nkept\n",
    "no<end_of_turn> more<eos>",
    "a < b and <unused9 is not a marker, nor is <unused95 without its end",
]


@pytest.mark.parametrize("text", _STREAM_TEXTS)
def test_stream_cleaner_matches_clean_text_for_every_split(text: str) -> None:
    expected = clean_text(text)
    rng = random.Random(len(text))
    splits = [[text], list(text)] + [_random_split(text, rng) for _ in range(50)]
    for deltas in splits:
        cleaner = StreamCleaner()
        out = [cleaner.feed(delta) for delta in deltas] + [cleaner.finish()]
        assert "".join(out) == expected, deltas


def test_stream_cleaner_never_yields_text_inside_a_thinking_block() -> None:
    text = "Yes.<unused94>SECRET-REASONING-TEXT<unused95> ok."
    for size in range(1, len(text)):
        cleaner = StreamCleaner()
        deltas = [text[i : i + size] for i in range(0, len(text), size)]
        out = [cleaner.feed(delta) for delta in deltas] + [cleaner.finish()]
        # No piece carries any character of the reasoning or of the markers.
        assert not any(char in piece for piece in out for char in "SECRT<>-"), (size, out)
        assert "".join(out) == "Yes. ok."


def _random_split(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 6)))) if len(text) > 1 else []
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


# -- interleaved labels, text-only checkpoints, time limit -------------------------------------------


def _spy_prompts(medgemma: MedGemma, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []
    original = medgemma.model.generate

    def spy(**kwargs: Any) -> Any:
        seen.append(medgemma.tokenizer.decode(kwargs["input_ids"][0]))
        return original(**kwargs)

    monkeypatch.setattr(medgemma.model, "generate", spy)
    return seen


def test_image_labels_are_interleaved_before_their_images(
    medgemma: MedGemma, images: list[Image.Image], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _spy_prompts(medgemma, monkeypatch)
    request = GenerationRequest(
        system="",
        user_text="USER QUESTION",
        images=images,
        image_labels=["SLICE 1", "SLICE 2", "SLICE 3"],
        max_new_tokens=2,
    )
    medgemma.generate(request)
    list(medgemma.stream(request))
    assert seen[0] == seen[1]  # both paths build the same prompt
    prompt = seen[0]
    per_image = medgemma.processor.image_seq_length
    assert prompt.count("<image_soft_token>") == 3 * per_image
    order = [
        prompt.index("SLICE 1"),
        prompt.index("<start_of_image>"),
        prompt.index("SLICE 2"),
        prompt.index("<start_of_image>", prompt.index("SLICE 2")),
        prompt.index("SLICE 3"),
        prompt.index("<start_of_image>", prompt.index("SLICE 3")),
        prompt.index("USER QUESTION"),
    ]
    assert order == sorted(order)


def test_image_labels_must_match_the_images(images: list[Image.Image]) -> None:
    with pytest.raises(ValidationError, match="2 labels for 3 images"):
        GenerationRequest(system="", user_text="x", images=images, image_labels=["SLICE 1", "SLICE 2"])


def test_text_only_checkpoint_loads_as_causal_lm_and_streams(medgemma_text: MedGemma) -> None:
    assert type(medgemma_text.model).__name__ == "Gemma3ForCausalLM"
    assert medgemma_text.supports_images is False
    request = GenerationRequest(system="Answer briefly.", user_text="Summarise the history.", max_new_tokens=10)
    whole = medgemma_text.generate(request)
    assert whole.text and _printable(whole.text)
    assert 0 < whole.output_tokens <= 10
    assert medgemma_text.stream(request).text() == whole.text
    assert medgemma_text.identity.revision and medgemma_text.identity.revision.startswith("sha256:")


def test_text_only_checkpoint_refuses_images(medgemma_text: MedGemma, images: list[Image.Image]) -> None:
    request = GenerationRequest(system="", user_text="Describe.", images=images[:2])
    with pytest.raises(ConfigError, match="text-only") as caught:
        medgemma_text.generate(request)
    assert caught.value.details["images"] == 2
    with pytest.raises(ConfigError, match="text-only"):
        medgemma_text.stream(request)


def test_call_timeout_stops_generation_with_reason_timeout(medgemma: MedGemma) -> None:
    limited = MedGemma(medgemma.model, medgemma.processor, medgemma.identity, call_timeout_s=1e-6)
    request = GenerationRequest(system="", user_text="Summarise the history.", max_new_tokens=50)
    result = limited.generate(request)
    assert result.finish_reason == "timeout"
    assert 0 < result.output_tokens < 50
    assert result.parameters["max_time_s"] == 1e-6
    streamed = limited.stream(request)
    streamed.text()
    assert streamed.result.finish_reason == "timeout"
    assert streamed.result.output_tokens < 50


def test_factory_passes_the_call_timeout_to_the_local_model(test_models_dir: Path) -> None:
    from agent.config import ModelSettings
    from agent.inference.factory import load_models

    settings = ModelSettings(
        use_test_models=True, test_models_dir=test_models_dir, device="cpu", dtype="float32", call_timeout_s=42.0
    )
    reasoner = load_models(settings).reasoner
    assert isinstance(reasoner, MedGemma)
    assert reasoner.call_timeout_s == 42.0
    assert reasoner._generation_config(GenerationRequest(system="", user_text="x")).max_time == 42.0
