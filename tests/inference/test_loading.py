"""Finding weights offline, device/dtype choice, fingerprints, and the model factory."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from agent.config import ModelSettings
from agent.errors import ConfigError, ModelUnavailableError
from agent.inference import loading
from agent.inference.factory import load_models
from agent.inference.loading import (
    resolve_model_path,
    select_device,
    select_dtype,
    weights_fingerprint,
)
from agent.inference.protocols import GenerationRequest

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _fake_hub_cache(cache: Path, repo_id: str, source: Path) -> Path:
    """Lay out ``source`` as a downloaded snapshot of ``repo_id``, the way huggingface_hub does."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(source, snapshot)
    return snapshot


# --- resolve_model_path -------------------------------------------------------------------------


def test_missing_hub_id_says_exactly_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailableError) as caught:
        resolve_model_path("google/medgemma-4b-it", env_var="MEDAGENT_MODELS__MEDGEMMA", cache_dir=tmp_path)
    message = caught.value.message
    for needed in (
        "'google/medgemma-4b-it'",
        "https://huggingface.co/google/medgemma-4b-it",
        "licence",
        "HF_TOKEN",
        "huggingface-cli download google/medgemma-4b-it",
        "MEDAGENT_MODELS__MEDGEMMA",
        "--test-models",
    ):
        assert needed in message, needed
    assert caught.value.code == "model_unavailable"


def test_missing_hub_id_without_setting_names_both_settings(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailableError) as caught:
        resolve_model_path("acme/nothing-here", cache_dir=tmp_path)
    assert "MEDAGENT_MODELS__MEDGEMMA" in caught.value.message
    assert "MEDAGENT_MODELS__MEDSIGLIP" in caught.value.message


def test_local_folder_wins(tiny_model_dirs: tuple[Path, Path]) -> None:
    assert resolve_model_path(str(tiny_model_dirs[0])) == tiny_model_dirs[0].resolve()


def test_missing_local_folder_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "weights" / "medsiglip"
    with pytest.raises(ModelUnavailableError) as caught:
        resolve_model_path(str(missing), env_var="MEDAGENT_MODELS__MEDSIGLIP")
    assert str(missing) in caught.value.message
    assert "MEDAGENT_MODELS__MEDSIGLIP" in caught.value.message


def test_incomplete_local_folder_is_refused(tmp_path: Path, tiny_model_dirs: tuple[Path, Path]) -> None:
    shutil.copy(tiny_model_dirs[0] / "config.json", tmp_path / "config.json")
    with pytest.raises(ModelUnavailableError, match="incomplete"):
        resolve_model_path(str(tmp_path))


def test_hub_cache_snapshot_resolves_offline(tmp_path: Path, tiny_model_dirs: tuple[Path, Path]) -> None:
    snapshot = _fake_hub_cache(tmp_path, "google/medsiglip-448", tiny_model_dirs[0])
    assert resolve_model_path("google/medsiglip-448", cache_dir=tmp_path) == snapshot


# --- device and dtype ---------------------------------------------------------------------------


def test_select_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device("auto") == "cpu"
    assert select_device("cpu") == "cpu"
    with pytest.raises(ConfigError, match="CUDA is not available"):
        select_device("cuda:0")
    with pytest.raises(ConfigError, match="unknown model device"):
        select_device("gpu-please")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device("auto") == "cuda"
    assert select_device("cuda:1") == "cuda:1"


def test_select_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    assert select_dtype("float32", "cuda") is torch.float32
    assert select_dtype("bfloat16", "cpu") is torch.bfloat16
    assert select_dtype("float16", "cuda:0") is torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert select_dtype("auto", "cuda") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert select_dtype("auto", "cuda:0") is torch.float16
    monkeypatch.setattr(loading, "_cpu_has_fast_bf16", lambda: True)
    assert select_dtype("auto", "cpu") is torch.bfloat16
    monkeypatch.setattr(loading, "_cpu_has_fast_bf16", lambda: False)
    assert select_dtype("auto", "cpu") is torch.float32
    with pytest.raises(ConfigError, match="unknown model dtype"):
        select_dtype("int4", "cpu")


# --- weights_fingerprint ------------------------------------------------------------------------


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_fingerprint_is_stable_and_follows_the_weights(tmp_path: Path, tiny_model_dirs: tuple[Path, Path]) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dirs[1], copy)
    original = weights_fingerprint(tiny_model_dirs[1])
    assert original == weights_fingerprint(copy)
    assert original.startswith("sha256:") and len(original) == len("sha256:") + 16
    # Config and tokenizer files do not count; the weights do.
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    assert weights_fingerprint(copy) == original
    _flip_byte(copy / "model.safetensors", -5)
    assert weights_fingerprint(copy) != original
    assert weights_fingerprint(tiny_model_dirs[0]) != original


def test_large_files_are_sampled_not_read_whole(
    tmp_path: Path, tiny_model_dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loading, "_FULL_HASH_LIMIT", 1024)
    monkeypatch.setattr(loading, "_SAMPLE_BYTES", 1024)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dirs[1], copy)
    weights = copy / "model.safetensors"
    original = weights_fingerprint(copy)
    size = weights.stat().st_size
    assert size > 16 * 1024
    _flip_byte(weights, size // 2)  # between the samples: not seen, by design
    assert weights_fingerprint(copy) == original
    _flip_byte(weights, size - 10)  # in the tail sample
    assert weights_fingerprint(copy) != original


def test_hub_blob_name_is_the_content_hash(tmp_path: Path, tiny_model_dirs: tuple[Path, Path]) -> None:
    blob_name = "ab" * 32
    fingerprints = []
    for name, source in (("one", tiny_model_dirs[0]), ("two", tiny_model_dirs[1])):
        blobs = tmp_path / name / "blobs"
        snapshot = tmp_path / name / "snapshot"
        blobs.mkdir(parents=True)
        snapshot.mkdir()
        shutil.copy(source / "model.safetensors", blobs / blob_name)
        (snapshot / "model.safetensors").symlink_to(Path("..") / "blobs" / blob_name)
        fingerprints.append(weights_fingerprint(snapshot))
    # Different bytes, same blob name: the cache's sha256 name is trusted, not re-read.
    assert fingerprints[0] == fingerprints[1]


def test_fingerprint_without_weights_fails(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailableError, match="no weights files"):
        weights_fingerprint(tmp_path)


# --- load_models --------------------------------------------------------------------------------


def test_factory_test_models(test_models_dir: Path) -> None:
    loaded = load_models(ModelSettings(use_test_models=True, test_models_dir=test_models_dir, device="cpu"))
    assert loaded.used_test_models and loaded.banner is None
    for identity in (loaded.scorer.identity, loaded.reasoner.identity):
        assert identity.test_model
        assert "(test model)" in identity.model_id
        assert str(test_models_dir) in identity.model_id


def test_factory_falls_back_with_a_banner(test_models_dir: Path) -> None:
    settings = ModelSettings(
        medgemma="acme/missing-medgemma",
        medsiglip="acme/missing-medsiglip",
        fallback_to_test_models=True,
        test_models_dir=test_models_dir,
        device="cpu",
        dtype="float32",
    )
    loaded = load_models(settings)
    assert loaded.used_test_models
    assert loaded.banner is not None
    for needed in ("acme/missing-medgemma", "acme/missing-medsiglip", "meaningless", "HF_TOKEN"):
        assert needed in loaded.banner
    assert loaded.scorer.identity.test_model and loaded.reasoner.identity.test_model
    assert loaded.reasoner.identity.dtype == "float32"
    # The fallback models work end to end.
    scores = loaded.scorer.zero_shot([Image.new("RGB", (32, 32))], ["cardiomegaly", "pneumothorax"])
    assert [score.label for score in scores[0]] == ["cardiomegaly", "pneumothorax"]
    assert loaded.reasoner.generate(GenerationRequest(system="", user_text="hi", max_new_tokens=3)).output_tokens


def test_factory_falls_back_all_or_nothing(test_models_dir: Path, tiny_model_dirs: tuple[Path, Path]) -> None:
    settings = ModelSettings(
        medsiglip=str(tiny_model_dirs[0]),
        medgemma="acme/missing-medgemma",
        fallback_to_test_models=True,
        test_models_dir=test_models_dir,
        device="cpu",
    )
    loaded = load_models(settings)
    assert loaded.banner is not None
    assert "missing: 'acme/missing-medgemma')" in loaded.banner
    # Never a real MedSigLIP beside a random MedGemma.
    assert loaded.scorer.identity.test_model and loaded.reasoner.identity.test_model


def test_factory_without_fallback_raises(test_models_dir: Path) -> None:
    settings = ModelSettings(
        medgemma="acme/missing-medgemma",
        medsiglip="acme/missing-medsiglip",
        test_models_dir=test_models_dir,
        device="cpu",
    )
    with pytest.raises(ModelUnavailableError) as caught:
        load_models(settings)
    assert "acme/missing-medsiglip" in caught.value.message
    assert "MEDAGENT_MODELS__MEDSIGLIP" in caught.value.message


def test_factory_loads_configured_folders_as_real_models(tiny_model_dirs: tuple[Path, Path]) -> None:
    settings = ModelSettings(medsiglip=str(tiny_model_dirs[0]), medgemma=str(tiny_model_dirs[1]), device="cpu")
    loaded = load_models(settings)
    assert not loaded.used_test_models and loaded.banner is None
    assert loaded.scorer.identity.model_id == str(tiny_model_dirs[0])
    assert loaded.reasoner.identity.model_id == str(tiny_model_dirs[1])
    assert not loaded.scorer.identity.test_model
