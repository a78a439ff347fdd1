"""Fixtures for the model adapters: the tiny random-weight models, built once per session.

Every test here runs offline: HF_HUB_OFFLINE is set before transformers or huggingface_hub is
imported (both read it at import), so a stray Hub lookup fails instead of reaching the network.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

# The imports come after the environment is set, on purpose.
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from agent.inference.medgemma import MedGemma
from agent.inference.medsiglip import MedSigLIP
from agent.inference.tiny_models import ensure_test_models, ensure_test_text_model
from tests.support.model_server import ServedModel, serve_unavailable_reason, start_transformers_serve


@pytest.fixture(scope="session")
def tiny_model_dirs(test_models_dir: Path) -> tuple[Path, Path]:
    """Return ``(medsiglip_dir, medgemma_dir)`` of the session's tiny models."""
    return ensure_test_models(test_models_dir)


@pytest.fixture(scope="session")
def medsiglip(tiny_model_dirs: tuple[Path, Path]) -> MedSigLIP:
    """Return the tiny MedSigLIP in float32, so hand computations match to 1e-5."""
    return MedSigLIP.load(
        tiny_model_dirs[0], model_id="tiny-medsiglip", device="cpu", dtype=torch.float32, test_model=True
    )


@pytest.fixture(scope="session")
def medgemma(tiny_model_dirs: tuple[Path, Path]) -> MedGemma:
    """Return the tiny MedGemma in float32."""
    return MedGemma.load(
        tiny_model_dirs[1], model_id="tiny-medgemma", device="cpu", dtype=torch.float32, test_model=True
    )


@pytest.fixture
def images() -> list[Image.Image]:
    """Return three different square RGB noise images of different sizes."""
    rng = np.random.default_rng(7)
    return [Image.fromarray(rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)) for side in (64, 300, 512)]


@pytest.fixture(scope="session")
def medgemma_text(test_models_dir: Path) -> MedGemma:
    """Return the tiny text-only MedGemma (the medgemma-27b-text-it stand-in) in float32."""
    return MedGemma.load(
        ensure_test_text_model(test_models_dir),
        model_id="tiny-medgemma-text",
        device="cpu",
        dtype=torch.float32,
        test_model=True,
    )


@pytest.fixture(scope="session")
def medgemma_server(
    tiny_model_dirs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServedModel]:
    """Run ``transformers serve`` with the tiny multimodal MedGemma on 127.0.0.1 for the session.

    Outside CI a missing server dependency skips the tests that need it, loudly; in CI (CI=true)
    it fails them, so the real-server tests can never be silently skipped there.
    """
    reason = serve_unavailable_reason()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must not skip the transformers-serve tests")
        pytest.skip(f"SKIPPING TRANSFORMERS SERVE TESTS: {reason}")
    with start_transformers_serve(tiny_model_dirs[1], tmp_path_factory.mktemp("serve-logs")) as served:
        yield served
