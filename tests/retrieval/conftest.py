"""Fixtures for the similar-case index: a scratch PostgreSQL with pgvector, vectors, the tiny MedSigLIP.

The pgvector tests run against a real server: PostgreSQL 16 + pgvector from the ``pgserver``
wheel, started once per session by :func:`agent.retrieval.scratch_pgvector.scratch_pgvector`.
If it cannot start, the tests that need it are skipped loudly; with ``CI`` set they fail instead.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from agent.bench.retrieval import clustered_unit_vectors
from agent.inference.medsiglip import MedSigLIP
from agent.retrieval.entries import IndexedModel, IndexEntry
from agent.retrieval.scratch_pgvector import ScratchPgVector, ScratchServerError, scratch_pgvector

MODEL_A = IndexedModel(model_id="model-a", revision="rev-a", dim=32)
MODEL_B = IndexedModel(model_id="model-b", revision="rev-b", dim=32)


@pytest.fixture(scope="session")
def pgvector_server() -> Iterator[ScratchPgVector]:
    """Yield the session's scratch PostgreSQL with the vector extension."""
    try:
        with scratch_pgvector() as server:
            yield server
    except ScratchServerError as exc:
        message = f"the scratch PostgreSQL + pgvector server cannot start: {exc}"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI must not skip pgvector tests", pytrace=False)
        pytest.skip(f"SKIPPING PGVECTOR TESTS: {message}")


@pytest.fixture
def pg_table() -> str:
    """Return a fresh table name, so tests never see each other's rows."""
    return f"t_{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def tiny_medsiglip(test_models_dir: Path) -> MedSigLIP:
    """Return the tiny random-weight MedSigLIP in float32."""
    from agent.inference.tiny_models import ensure_test_models

    return MedSigLIP.load(
        ensure_test_models(test_models_dir)[0],
        model_id="tiny-medsiglip",
        device="cpu",
        dtype=torch.float32,
        test_model=True,
    )


def make_entries(n: int, *, images_per_study: int = 1, prefix: str = "1.2.3") -> list[IndexEntry]:
    """Return ``n`` entries, ``images_per_study`` consecutive ones per study."""
    return [
        IndexEntry(
            study_uid=f"{prefix}.{i // images_per_study}",
            series_uid=f"{prefix}.{i // images_per_study}.1",
            sop_instance_uid=f"{prefix}.{i // images_per_study}.1.{i % images_per_study}",
            modality="DX",
            source="test",
            dicomweb_url="http://127.0.0.1:8042/dicom-web",
        )
        for i in range(n)
    ]


def make_vectors(n: int, dim: int = 32, seed: int = 0, clusters: int = 8) -> np.ndarray:
    """Return ``n`` clustered unit vectors."""
    return clustered_unit_vectors(n, dim, clusters, seed)
