"""The retrieval benchmark on tiny inputs: the figures are present and recall is computed right."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.bench.retrieval import clustered_unit_vectors, exact_top_k, measure_file_index, measure_pgvector, recall_at_k

KEYS = {"p50_ms", "p99_ms", "recall_at_10", "bytes_per_vector", "build_s", "n_vectors"}


def test_clustered_vectors_are_unit_and_clustered() -> None:
    vectors = clustered_unit_vectors(2000, 64, 10, seed=3)
    assert vectors.shape == (2000, 64) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(vectors, clustered_unit_vectors(2000, 64, 10, seed=3))
    # Clustered, not uniform: a point's nearest neighbour is far closer than a random point.
    sims = vectors[:100] @ vectors.T
    np.fill_diagonal(sims[:, :100], -1)
    assert float(np.median(sims.max(axis=1))) > float(np.median(sims)) + 0.2
    assert clustered_unit_vectors(10, 8, 2, seed=0, dtype=np.float16).dtype == np.float16


def test_recall_counts_overlap_with_the_truth() -> None:
    truth = np.array([list(range(10)), list(range(10, 20))])
    assert recall_at_k([list(range(10)), list(range(10, 20))], truth) == 1.0
    assert recall_at_k([list(range(5)) + [99] * 5, []], truth) == pytest.approx(0.25)


def test_exact_top_k_matches_a_full_sort() -> None:
    data = clustered_unit_vectors(500, 16, 4, seed=1)
    queries = clustered_unit_vectors(5, 16, 4, seed=2)
    expected = np.argsort(-(queries @ data.T), axis=1)[:, :10]
    assert np.array_equal(exact_top_k(data, queries, 10, chunk=64), expected)


def test_file_index_figures_exact_mode_has_full_recall(tmp_path: Path) -> None:
    result = measure_file_index(n_vectors=3000, dim=32, n_queries=20, seed=0, workdir=tmp_path)
    assert set(result) >= KEYS
    assert result["search"] == "exact" and result["recall_at_10"] == 1.0
    assert result["n_vectors"] == 3000 and result["bytes_per_vector"] >= 32 * 4
    assert 0 < result["p50_ms"] <= result["p99_ms"]


def test_file_index_figures_in_ivf_mode(tmp_path: Path) -> None:
    result = measure_file_index(n_vectors=4000, dim=32, n_queries=20, seed=0, ivf_min_vectors=1000, workdir=tmp_path)
    assert result["search"] == "ivf" and 0.5 <= result["recall_at_10"] <= 1.0


def test_pgvector_figures(pgvector_server_url: str) -> None:
    result = measure_pgvector(n_vectors=1000, dim=32, n_queries=10, seed=0, url=pgvector_server_url)
    assert set(result) >= KEYS and result["search"] == "hnsw"
    assert result["recall_at_10"] >= 0.9 and result["n_vectors"] == 1000


@pytest.fixture(scope="module")
def pgvector_server_url() -> object:
    import os

    from agent.retrieval.scratch_pgvector import ScratchServerError, scratch_pgvector

    try:
        with scratch_pgvector() as server:
            yield server.url
    except ScratchServerError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"scratch pgvector server cannot start: {exc}", pytrace=False)
        pytest.skip(f"SKIPPING PGVECTOR BENCH TEST: {exc}")


def test_pgvector_ivfflat_figures(pgvector_server_url: str) -> None:
    result = measure_pgvector(n_vectors=3000, dim=32, n_queries=10, seed=0, url=pgvector_server_url, method="ivfflat")
    assert result["search"] == "ivfflat" and 0.3 <= result["recall_at_10"] <= 1.0
