"""MedSigLIP adapter: normalised embeddings, zero-shot scores equal to the model's own math."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from PIL import Image

from agent.errors import ModelOutputError, ModelUnavailableError
from agent.inference.labels import CXR_LABELS_V1, LabelSet, ZeroShotLabel
from agent.inference.medsiglip import TEXT_MAX_LENGTH, MedSigLIP


def test_image_embeddings_are_normalised_rows(medsiglip: MedSigLIP, images: list[Image.Image]) -> None:
    embeddings = medsiglip.embed_images(images)
    assert embeddings.dim() == 2
    assert embeddings.shape[0] == 3
    assert embeddings.dtype == torch.float32
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(3), atol=1e-5)
    # Different images, different embeddings.
    assert not torch.allclose(embeddings[0], embeddings[1])


def test_batches_give_the_same_embeddings_as_one_pass(medsiglip: MedSigLIP, images: list[Image.Image]) -> None:
    small_batches = MedSigLIP(medsiglip.model, medsiglip.processor, medsiglip.identity, batch_size=2)
    assert torch.allclose(small_batches.embed_images(images), medsiglip.embed_images(images), atol=1e-5)


def test_grey_images_are_converted_to_rgb(medsiglip: MedSigLIP, images: list[Image.Image]) -> None:
    grey = images[1].convert("L")
    from_grey = medsiglip.embed_images([grey])
    from_rgb = medsiglip.embed_images([grey.convert("RGB")])
    assert torch.allclose(from_grey, from_rgb)


def test_text_embeddings_are_normalised_rows(medsiglip: MedSigLIP) -> None:
    embeddings = medsiglip.embed_texts(["a chest x-ray showing atelectasis", "a photo of an arm"])
    assert embeddings.shape == (2, medsiglip.embed_images([Image.new("RGB", (8, 8))]).shape[1])
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_zero_shot_scores_one_list_per_image_in_label_order(medsiglip: MedSigLIP, images: list[Image.Image]) -> None:
    labels = list(reversed(CXR_LABELS_V1.names))
    results = medsiglip.zero_shot(images, labels)
    assert len(results) == len(images)
    for scores in results:
        assert [score.label for score in scores] == labels
        assert all(0.0 < score.score < 1.0 for score in scores)


def test_zero_shot_equals_a_hand_computation(medsiglip: MedSigLIP, images: list[Image.Image]) -> None:
    labels = CXR_LABELS_V1.names
    results = medsiglip.zero_shot(images, labels)
    got = torch.tensor([[score.score for score in scores] for scores in results])

    # From the adapter's own embeddings and the model's parameters.
    image_embeddings = medsiglip.embed_images(images)
    text_embeddings = medsiglip.embed_texts(CXR_LABELS_V1.prompts)
    scale = medsiglip.model.logit_scale.detach().exp()
    bias = medsiglip.model.logit_bias.detach()
    by_hand = torch.sigmoid(scale * image_embeddings @ text_embeddings.T + bias)
    assert torch.allclose(got, by_hand, atol=1e-6)

    # And independently, from a full forward pass of the model on the processor's inputs.
    inputs = medsiglip.processor(
        text=CXR_LABELS_V1.prompts,
        images=images,
        padding="max_length",
        max_length=TEXT_MAX_LENGTH,
        return_tensors="pt",
    )
    with torch.no_grad():
        output = medsiglip.model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"])
    assert torch.allclose(got, torch.sigmoid(output.logits_per_image), atol=1e-5)


def test_label_names_use_their_prompts_and_other_text_is_its_own_prompt(
    medsiglip: MedSigLIP, images: list[Image.Image]
) -> None:
    by_name = medsiglip.zero_shot(images[:1], ["cardiomegaly"])[0][0]
    by_prompt = medsiglip.zero_shot(images[:1], ["a chest x-ray showing cardiomegaly"])[0][0]
    assert by_name.label == "cardiomegaly"
    assert by_prompt.label == "a chest x-ray showing cardiomegaly"
    assert by_name.score == pytest.approx(by_prompt.score, abs=1e-7)
    bare = medsiglip.zero_shot(images[:1], ["a chest x-ray showing cardiomegaly."])[0][0]
    other = medsiglip.zero_shot(images[:1], ["a ct scan of the abdomen"])[0][0]
    # The tokenizer drops punctuation, so the trailing period changes nothing; other text does.
    assert bare.score == pytest.approx(by_prompt.score, abs=1e-7)
    assert other.score != pytest.approx(by_prompt.score, abs=1e-7)


def test_text_embeddings_are_cached(medsiglip: MedSigLIP, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    original: Callable[..., Any] = medsiglip.model.get_text_features

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(int(kwargs["input_ids"].shape[0]))
        return original(*args, **kwargs)

    monkeypatch.setattr(medsiglip.model, "get_text_features", counting)
    first = medsiglip.embed_texts(["cache probe one"])
    assert calls == [1]
    again = medsiglip.embed_texts(["cache probe one"])
    assert calls == [1]
    assert torch.equal(first, again)
    # Only the new text goes through the model, once even when repeated.
    medsiglip.embed_texts(["cache probe one", "cache probe two", "cache probe two"])
    assert calls == [1, 1]


def test_empty_inputs(medsiglip: MedSigLIP, images: list[Image.Image]) -> None:
    assert medsiglip.zero_shot([], ["cardiomegaly"]) == []
    assert medsiglip.zero_shot(images[:2], []) == [[], []]
    assert medsiglip.embed_images([]).shape[0] == 0


def test_model_failure_becomes_model_output_error(
    medsiglip: MedSigLIP, images: list[Image.Image], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(**_: Any) -> Any:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(medsiglip.model, "get_image_features", broken)
    with pytest.raises(ModelOutputError) as caught:
        medsiglip.zero_shot(images, ["cardiomegaly"])
    assert "RuntimeError" in caught.value.message


def test_identity_records_weights_and_settings(medsiglip: MedSigLIP) -> None:
    identity = medsiglip.identity
    assert identity.backend == "transformers"
    assert identity.revision is not None and identity.revision.startswith("sha256:")
    assert (identity.device, identity.dtype, identity.test_model) == ("cpu", "float32", True)


def test_load_failure_names_the_folder(tmp_path: Any) -> None:
    with pytest.raises(ModelUnavailableError) as caught:
        MedSigLIP.load(tmp_path, model_id="x", device="cpu", dtype=torch.float32, test_model=False)
    assert str(tmp_path) in caught.value.message


def test_label_set_rejects_duplicates_and_keys_by_version() -> None:
    assert CXR_LABELS_V1.key == "cxr@1"
    assert len(CXR_LABELS_V1.names) == len(set(CXR_LABELS_V1.names)) == 6
    assert CXR_LABELS_V1.prompt_map()["pneumothorax"] == "a chest x-ray showing pneumothorax"
    with pytest.raises(ValueError, match="duplicate"):
        LabelSet("x", "1", (ZeroShotLabel("a", "p"), ZeroShotLabel("a", "q")))
