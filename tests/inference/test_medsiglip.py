"""MedSigLIP adapter: normalised embeddings, zero-shot scores equal to the model's own math."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from PIL import Image

from agent.errors import ModelOutputError, ModelUnavailableError
from agent.inference.labels import CXR_LABELS_V1, CXR_LABELS_V2, LabelSet, ZeroShotLabel
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


def test_embedding_dim_is_the_length_of_both_embeddings(medsiglip: MedSigLIP, images: list[Image.Image]) -> None:
    dim = medsiglip.embedding_dim
    assert dim == medsiglip.model.config.vision_config.hidden_size
    assert medsiglip.embed_images(images[:1]).shape == (1, dim)
    assert medsiglip.embed_texts(["a chest x-ray"]).shape == (1, dim)
    assert medsiglip.embed_images([]).shape == (0, dim)


def test_images_go_through_the_model_in_batches(
    medsiglip: MedSigLIP, images: list[Image.Image], monkeypatch: pytest.MonkeyPatch
) -> None:
    batches: list[int] = []
    original: Callable[..., Any] = medsiglip.model.get_image_features

    def counting(*args: Any, **kwargs: Any) -> Any:
        batches.append(int(kwargs["pixel_values"].shape[0]))
        return original(*args, **kwargs)

    monkeypatch.setattr(medsiglip.model, "get_image_features", counting)
    small_batches = MedSigLIP(medsiglip.model, medsiglip.processor, medsiglip.identity, batch_size=2)
    assert small_batches.embed_images([*images, images[0]]).shape[0] == 4
    assert batches == [2, 2]


def test_new_texts_go_through_the_model_in_batches(medsiglip: MedSigLIP, monkeypatch: pytest.MonkeyPatch) -> None:
    batches: list[int] = []
    original: Callable[..., Any] = medsiglip.model.get_text_features

    def counting(*args: Any, **kwargs: Any) -> Any:
        batches.append(int(kwargs["input_ids"].shape[0]))
        return original(*args, **kwargs)

    monkeypatch.setattr(medsiglip.model, "get_text_features", counting)
    small_batches = MedSigLIP(medsiglip.model, medsiglip.processor, medsiglip.identity, batch_size=1)
    texts = [f"a chest x-ray number {index}" for index in range(10)]
    batched = small_batches.embed_texts(texts)
    assert batches == [4, 4, 2]
    # Same rows as one pass of the model over all ten texts.
    assert torch.allclose(
        batched, MedSigLIP(medsiglip.model, medsiglip.processor, medsiglip.identity).embed_texts(texts), atol=1e-5
    )


def test_bfloat16_compute_still_returns_float32_unit_rows(
    tiny_model_dirs: tuple[Any, Any], images: list[Image.Image]
) -> None:
    bf16 = MedSigLIP.load(tiny_model_dirs[0], model_id="tiny", device="cpu", dtype=torch.bfloat16, test_model=True)
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    assert bf16.identity.dtype == "bfloat16"
    for embeddings in (bf16.embed_images(images), bf16.embed_texts(["a chest x-ray showing edema"])):
        assert embeddings.dtype == torch.float32
        assert embeddings.device.type == "cpu"
        assert torch.allclose(embeddings.norm(dim=-1), torch.ones(embeddings.shape[0]), atol=1e-5)


def test_score_label_set_equals_a_hand_computation(medsiglip: MedSigLIP, images: list[Image.Image]) -> None:
    results = medsiglip.score_label_set(images, CXR_LABELS_V2)

    image_embeddings = medsiglip.embed_images(images)
    positives = medsiglip.embed_texts(CXR_LABELS_V2.prompts)
    negatives = medsiglip.embed_texts([item.negative_prompt or "" for item in CXR_LABELS_V2.labels])
    scale, bias = medsiglip.logit_parameters()
    positive_logits = scale * image_embeddings @ positives.T + bias
    negative_logits = scale * image_embeddings @ negatives.T + bias
    pair = torch.exp(positive_logits) / (torch.exp(positive_logits) + torch.exp(negative_logits))

    assert len(results) == len(images)
    for row, scores in enumerate(results):
        assert [score.label for score in scores] == CXR_LABELS_V2.names
        got = torch.tensor([[s.score, s.negative_score or -1.0, s.pair_probability or -1.0] for s in scores])
        expected = torch.stack(
            [torch.sigmoid(positive_logits[row]), torch.sigmoid(negative_logits[row]), pair[row]], dim=1
        )
        assert torch.allclose(got, expected, atol=1e-6)


def test_score_label_set_scores_match_zero_shot(medsiglip: MedSigLIP, images: list[Image.Image]) -> None:
    by_set = medsiglip.score_label_set(images, CXR_LABELS_V2)
    by_prompts = medsiglip.zero_shot(images, CXR_LABELS_V2.prompts)
    for set_row, prompt_row in zip(by_set, by_prompts, strict=True):
        assert [s.score for s in set_row] == pytest.approx([s.score for s in prompt_row], abs=1e-7)


def test_score_embeddings_reuses_embeddings_computed_once(
    medsiglip: MedSigLIP, images: list[Image.Image], monkeypatch: pytest.MonkeyPatch
) -> None:
    embeddings = medsiglip.embed_images(images)
    expected = medsiglip.score_label_set(images, CXR_LABELS_V2)

    def no_image_tower(**_: Any) -> Any:
        raise AssertionError("score_embeddings must not encode images again")

    monkeypatch.setattr(medsiglip.model, "get_image_features", no_image_tower)
    assert medsiglip.score_embeddings(embeddings, CXR_LABELS_V2) == expected
    assert medsiglip.score_embeddings(embeddings[:0], CXR_LABELS_V2) == []


def test_labels_without_negatives_have_no_pair_probability(medsiglip: MedSigLIP, images: list[Image.Image]) -> None:
    mixed = LabelSet(
        "mixed",
        "1",
        (
            ZeroShotLabel("edema", "a chest x-ray showing edema", "a chest x-ray with no edema"),
            ZeroShotLabel("cardiomegaly", "a chest x-ray showing cardiomegaly"),
        ),
    )
    for scores in medsiglip.score_label_set(images, mixed):
        with_negative, without = scores
        assert with_negative.pair_probability is not None and 0.0 < with_negative.pair_probability < 1.0
        assert without.negative_score is None and without.pair_probability is None
    v1 = medsiglip.score_label_set(images[:1], CXR_LABELS_V1)[0]
    assert [s.label for s in v1] == CXR_LABELS_V1.names
    assert all(s.pair_probability is None for s in v1)
    assert medsiglip.score_label_set([], CXR_LABELS_V2) == []


def test_score_label_set_runs_the_text_tower_once_per_prompt(
    medsiglip: MedSigLIP, images: list[Image.Image], monkeypatch: pytest.MonkeyPatch
) -> None:
    texts: list[int] = []
    original: Callable[..., Any] = medsiglip.model.get_text_features

    def counting(*args: Any, **kwargs: Any) -> Any:
        texts.append(int(kwargs["input_ids"].shape[0]))
        return original(*args, **kwargs)

    fresh = MedSigLIP(medsiglip.model, medsiglip.processor, medsiglip.identity)
    monkeypatch.setattr(medsiglip.model, "get_text_features", counting)
    fresh.score_label_set(images[:1], CXR_LABELS_V2)
    # 13 positives and 13 negatives, one forward pass.
    assert texts == [26]
    fresh.score_label_set(images[1:], CXR_LABELS_V2)
    assert texts == [26]
