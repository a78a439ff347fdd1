"""The pgvector backend against a real PostgreSQL 16 + pgvector: the same behaviours as the file index."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from agent.config import ImagingSettings
from agent.errors import ConfigError
from agent.retrieval.factory import open_index
from agent.retrieval.pgvector_index import PgVectorIndex
from agent.retrieval.protocols import IndexModelMismatchError
from agent.retrieval.scratch_pgvector import ScratchPgVector
from tests.retrieval.conftest import MODEL_A, MODEL_B, make_entries, make_vectors


@pytest.fixture
def index(pgvector_server: ScratchPgVector, pg_table: str) -> Iterator[PgVectorIndex]:
    with PgVectorIndex(pgvector_server.url, table=pg_table, create=True) as opened:
        yield opened


def test_search_ranks_studies_by_their_best_image(index: PgVectorIndex) -> None:
    vectors = make_vectors(60)
    entries = make_entries(60, images_per_study=3)
    assert index.add(entries, vectors, MODEL_A) == 60
    hits = index.search(vectors[7], 5)
    assert hits[0].study_uid == "1.2.3.2" and hits[0].sop_instance_uid == "1.2.3.2.1.1"
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    expected = {e.study_uid: float(np.max(vectors[i * 3 : i * 3 + 3] @ vectors[7])) for i, e in enumerate(entries[::3])}
    exact_top = sorted(expected, key=lambda uid: -expected[uid])[:5]
    assert [h.study_uid for h in hits] == exact_top  # 60 rows: HNSW with ef_search 100 is exact
    for hit in hits:
        assert hit.score == pytest.approx(expected[hit.study_uid], abs=1e-5)
    assert hits[0].study_url == "http://127.0.0.1:8042/dicom-web/studies/1.2.3.2"


def test_exclude_delete_rebuild_and_replace(index: PgVectorIndex) -> None:
    vectors = make_vectors(40)
    index.add(make_entries(40, images_per_study=2), vectors, MODEL_A)
    assert "1.2.3.4" not in {h.study_uid for h in index.search(vectors[8], 3, exclude_study_uid="1.2.3.4")}
    assert index.delete(study_uid="1.2.3.3") == 2
    assert "1.2.3.3" not in {h.study_uid for h in index.search(vectors[6], 19)}
    info = index.rebuild()
    assert (info.count, info.studies, info.backend) == (38, 19, "pgvector")
    index.add(make_entries(2, images_per_study=2)[:1], vectors[30:31], MODEL_A)  # replaces 1.2.3.0.1.0
    assert index.info().count == 38
    assert {h.study_uid for h in index.search(vectors[30], 2)} == {"1.2.3.0", "1.2.3.15"}


def test_refuses_another_model_and_survives_reopen(pgvector_server: ScratchPgVector, pg_table: str) -> None:
    vectors = make_vectors(10)
    with PgVectorIndex(pgvector_server.url, table=pg_table, create=True) as index:
        index.add(make_entries(10), vectors, MODEL_A)
        with pytest.raises(IndexModelMismatchError) as caught:
            index.add(make_entries(3, prefix="9.9"), make_vectors(3, seed=2), MODEL_B)
        assert "model-a" in caught.value.message and "model-b" in caught.value.message
        with pytest.raises(IndexModelMismatchError):
            index.search(vectors[0], 1, model=MODEL_B)
    settings = ImagingSettings(index_backend="pgvector", index_url=pgvector_server.url, index_table=pg_table)
    reopened = open_index(settings, create=False)
    try:
        info = reopened.info()
        assert (info.count, info.model_id, info.dim) == (10, "model-a", 32)
        assert reopened.search(vectors[3], 1)[0].study_uid == "1.2.3.3"
    finally:
        reopened.close()


def test_a_failed_add_changes_nothing(index: PgVectorIndex) -> None:
    vectors = make_vectors(10)
    index.add(make_entries(5), vectors[:5], MODEL_A)
    broken = make_entries(5, prefix="6.6")
    with pytest.raises(ValueError):
        index.add(broken, np.full((5, 32), np.nan, dtype=np.float32), MODEL_A)
    assert index.info().count == 5


def test_pgvector_without_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="index_url"):
        open_index(ImagingSettings(index_backend="pgvector"), create=True)
