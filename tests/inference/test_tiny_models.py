"""Tiny random-weight models: real classes through the Auto loaders, faithful special parts."""

from __future__ import annotations

import hashlib
import importlib.util
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import (
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    GemmaTokenizer,
    SiglipImageProcessorPil,
    SiglipModel,
    SiglipProcessor,
    SiglipTokenizer,
)

from agent.inference.labels import CXR_LABELS_V1
from agent.inference.tiny_models import (
    MARKER_NAME,
    ensure_test_models,
    is_complete,
)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_medsiglip_reloads_as_the_real_classes(tiny_model_dirs: tuple[Path, Path]) -> None:
    model = AutoModel.from_pretrained(tiny_model_dirs[0])
    processor = AutoProcessor.from_pretrained(tiny_model_dirs[0])
    assert type(model) is SiglipModel
    assert type(processor) is SiglipProcessor
    assert type(processor.tokenizer) is SiglipTokenizer
    assert isinstance(processor.image_processor, SiglipImageProcessorPil)
    assert model.config.vision_config.image_size == 448
    assert model.config.text_config.max_position_embeddings >= 64
    # Image and text embeddings must share one space for the cosine.
    assert model.config.text_config.projection_size == model.config.vision_config.hidden_size


def test_medsiglip_processor_scales_pixels_to_minus_one_one(tiny_model_dirs: tuple[Path, Path]) -> None:
    processor = AutoProcessor.from_pretrained(tiny_model_dirs[0])
    black_white = np.zeros((100, 100, 3), dtype=np.uint8)
    black_white[:, 50:] = 255
    pixels = processor(images=[Image.fromarray(black_white)], return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape) == (1, 3, 448, 448)
    assert pixels.min().item() == pytest.approx(-1.0)
    assert pixels.max().item() == pytest.approx(1.0)


def test_medsiglip_tokenizer_knows_the_label_prompts(tiny_model_dirs: tuple[Path, Path]) -> None:
    tokenizer = AutoProcessor.from_pretrained(tiny_model_dirs[0]).tokenizer
    encoded = tokenizer(CXR_LABELS_V1.prompts, padding="max_length", max_length=64)
    for ids in encoded["input_ids"]:
        assert len(ids) == 64
        assert tokenizer.unk_token_id not in ids
        # Whole pieces, not one character per token: the corpus taught it these words.
        assert ids.index(tokenizer.eos_token_id) < 16


def test_medgemma_reloads_as_the_real_classes(tiny_model_dirs: tuple[Path, Path]) -> None:
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dirs[1])
    processor = AutoProcessor.from_pretrained(tiny_model_dirs[1])
    assert type(model) is Gemma3ForConditionalGeneration
    assert type(processor) is Gemma3Processor
    assert type(processor.tokenizer) is GemmaTokenizer
    assert isinstance(processor.image_processor, Gemma3ImageProcessorPil)


def test_medgemma_image_tokens_fit_the_vision_tower(tiny_model_dirs: tuple[Path, Path]) -> None:
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dirs[1])
    processor = AutoProcessor.from_pretrained(tiny_model_dirs[1])
    tokens = model.config.mm_tokens_per_image
    side = math.isqrt(tokens)
    patches_per_side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    assert processor.image_seq_length == tokens
    assert side * side == tokens
    assert patches_per_side % side == 0
    assert processor.image_processor.size["height"] == model.config.vision_config.image_size


def test_medgemma_tokenizer_special_tokens_are_atomic_and_bytes_absent(
    tiny_model_dirs: tuple[Path, Path],
) -> None:
    processor = AutoProcessor.from_pretrained(tiny_model_dirs[1])
    tokenizer = processor.tokenizer
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dirs[1])
    for token in (
        "<pad>",
        "<eos>",
        "<bos>",
        "<unk>",
        "<start_of_turn>",
        "<end_of_turn>",
        "<start_of_image>",
        "<end_of_image>",
        "<image_soft_token>",
        "<unused94>",
        "<unused95>",
    ):
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, token
        assert ids[0] != tokenizer.unk_token_id or token == "<unk>"
    assert not [piece for piece in tokenizer.get_vocab() if piece.startswith("<0x")]
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<image_soft_token>")
    assert model.config.boi_token_id == tokenizer.convert_tokens_to_ids("<start_of_image>")
    assert model.generation_config.eos_token_id == [
        tokenizer.convert_tokens_to_ids("<eos>"),
        tokenizer.convert_tokens_to_ids("<end_of_turn>"),
    ]


def test_medgemma_chat_template_folds_system_into_first_user_turn(tiny_model_dirs: tuple[Path, Path]) -> None:
    processor = AutoProcessor.from_pretrained(tiny_model_dirs[1])
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]},
    ]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<bos><start_of_turn>user\nBe brief.\n\n<start_of_image>What is shown?<end_of_turn>\n<start_of_turn>model\n"
    )


def test_ensure_keeps_complete_folders_and_rebuilds_broken_ones(
    tmp_path: Path, tiny_model_dirs: tuple[Path, Path]
) -> None:
    medsiglip_dir, medgemma_dir = ensure_test_models(tmp_path)
    assert is_complete(medsiglip_dir, "medsiglip") and is_complete(medgemma_dir, "medgemma")
    # Same seed, same bytes: a fresh build equals the session's build.
    for built, session in zip((medsiglip_dir, medgemma_dir), tiny_model_dirs, strict=True):
        assert _sha256(built / "model.safetensors") == _sha256(session / "model.safetensors")

    weights_mtime = (medgemma_dir / "model.safetensors").stat().st_mtime_ns
    assert ensure_test_models(tmp_path) == (medsiglip_dir, medgemma_dir)
    assert (medgemma_dir / "model.safetensors").stat().st_mtime_ns == weights_mtime

    # A build killed half-way: weights gone, marker never written, a stray file left behind.
    (medgemma_dir / MARKER_NAME).unlink()
    (medgemma_dir / "model.safetensors").unlink()
    (medgemma_dir / "stray.tmp").write_text("partial")
    ensure_test_models(tmp_path)
    assert is_complete(medgemma_dir, "medgemma")
    assert (medgemma_dir / "model.safetensors").is_file()
    assert not (medgemma_dir / "stray.tmp").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "scratch folders left behind"


def test_marker_of_another_kind_or_version_is_not_complete(tmp_path: Path, tiny_model_dirs: tuple[Path, Path]) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(tiny_model_dirs[0], folder)
    assert is_complete(folder, "medsiglip")
    assert not is_complete(folder, "medgemma")
    (folder / MARKER_NAME).write_text('{"kind": "medsiglip", "version": 0}')
    assert not is_complete(folder, "medsiglip")
    (folder / MARKER_NAME).write_text("not json")
    assert not is_complete(folder, "medsiglip")


def test_make_test_models_cli_prints_both_folders(
    test_models_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    script = Path(__file__).resolve().parents[2] / "tools" / "make_test_models.py"
    spec = importlib.util.spec_from_file_location("make_test_models", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # The script prepends the checkout to sys.path; give it a copy that is dropped afterwards.
    monkeypatch.setattr(sys, "path", list(sys.path))
    spec.loader.exec_module(module)
    assert module.main(["--out", str(test_models_dir)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [
        str((test_models_dir / "tiny-random-medsiglip").resolve()),
        str((test_models_dir / "tiny-random-medgemma").resolve()),
    ]
