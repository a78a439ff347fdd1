"""The embedded index folder: add, search, delete, rebuild, IVF vs exact, model refusal, crash safety."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.errors import ConfigError
from agent.retrieval import file_index
from agent.retrieval.file_index import MAX_SEGMENTS, FileIndex
from agent.retrieval.protocols import IndexModelMismatchError
from tests.retrieval.conftest import MODEL_A, MODEL_B, make_entries, make_vectors


def _files(path: Path) -> set[str]:
    return {p.name for p in path.iterdir()}


def test_search_ranks_studies_by_their_best_image(tmp_path: Path) -> None:
    vectors = make_vectors(60)
    entries = make_entries(60, images_per_study=3)
    with FileIndex(tmp_path / "ix", create=True) as index:
        assert index.add(entries, vectors, MODEL_A) == 60
        hits = index.search(vectors[7], 5)
    # image 7 belongs to study 2: its own vector scores 1.0
    assert hits[0].study_uid == "1.2.3.2" and hits[0].sop_instance_uid == "1.2.3.2.1.1"
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert len({h.study_uid for h in hits}) == 5
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    expected = {e.study_uid: float(np.max(vectors[i * 3 : i * 3 + 3] @ vectors[7])) for i, e in enumerate(entries[::3])}
    for hit in hits:
        assert hit.score == pytest.approx(expected[hit.study_uid], abs=1e-5)
    assert hits[0].instance_url == (
        "http://127.0.0.1:8042/dicom-web/studies/1.2.3.2/series/1.2.3.2.1/instances/1.2.3.2.1.1"
    )


def test_exclude_study_leaves_the_query_study_out(tmp_path: Path) -> None:
    vectors = make_vectors(20)
    with FileIndex(tmp_path / "ix", create=True) as index:
        index.add(make_entries(20), vectors, MODEL_A)
        hits = index.search(vectors[4], 3, exclude_study_uid="1.2.3.4")
    assert "1.2.3.4" not in {h.study_uid for h in hits} and len(hits) == 3


def test_delete_hides_at_once_and_rebuild_reclaims(tmp_path: Path) -> None:
    vectors = make_vectors(40)
    with FileIndex(tmp_path / "ix", create=True) as index:
        index.add(make_entries(40, images_per_study=2), vectors, MODEL_A)
        assert index.delete(study_uid="1.2.3.3") == 2
        assert "1.2.3.3" not in {h.study_uid for h in index.search(vectors[6], 19)}
        assert index.info().deleted == 2 and index.info().count == 38
        info = index.rebuild()
        assert (info.count, info.deleted, info.studies) == (38, 0, 19)
        assert index.search(vectors[8], 1)[0].study_uid == "1.2.3.4"


def test_re_adding_an_instance_replaces_it(tmp_path: Path) -> None:
    vectors = make_vectors(10)
    with FileIndex(tmp_path / "ix", create=True) as index:
        index.add(make_entries(10), vectors, MODEL_A)
        index.add(make_entries(10)[:1], vectors[5:6], MODEL_A)
        assert index.info().count == 10
        top = index.search(vectors[5], 2)
    assert {h.study_uid for h in top} == {"1.2.3.0", "1.2.3.5"}
    assert all(h.score == pytest.approx(1.0, abs=1e-5) for h in top)


def test_refuses_vectors_of_another_model(tmp_path: Path) -> None:
    with FileIndex(tmp_path / "ix", create=True) as index:
        index.add(make_entries(5), make_vectors(5), MODEL_A)
        with pytest.raises(IndexModelMismatchError) as caught:
            index.add(make_entries(5, prefix="9.9"), make_vectors(5, seed=1), MODEL_B)
        with pytest.raises(IndexModelMismatchError):
            index.search(make_vectors(1)[0], 3, model=MODEL_B)
        assert index.info().count == 5
    assert "model-a" in caught.value.message and "model-b" in caught.value.message
    assert "new index" in caught.value.message
    # Same weights under another name (same revision) are accepted; another size is not.
    with FileIndex(tmp_path / "ix") as index:
        index.add(make_entries(2, prefix="7.7"), make_vectors(2), MODEL_A.model_copy(update={"model_id": "alias"}))
        with pytest.raises(ValueError, match="dimensions"):
            index.add(make_entries(1, prefix="8.8"), make_vectors(1, dim=16), MODEL_A)


def test_survives_reopen_and_missing_index_is_an_error(tmp_path: Path) -> None:
    vectors = make_vectors(30)
    with FileIndex(tmp_path / "ix", create=True) as index:
        index.add(make_entries(30), vectors, MODEL_A)
    with FileIndex(tmp_path / "ix") as index:
        assert index.info().count == 30 and index.info().model_id == "model-a"
        assert index.search(vectors[12], 1)[0].study_uid == "1.2.3.12"
    with pytest.raises(ConfigError, match="no image index"):
        FileIndex(tmp_path / "elsewhere")


def test_ivf_agrees_with_exact_search(tmp_path: Path) -> None:
    everything_generated = make_vectors(3030, clusters=20)
    vectors, queries = everything_generated[:3000], everything_generated[3000:]  # held-out queries
    with FileIndex(tmp_path / "ix", create=True, ivf_min_vectors=1000) as index:
        index.add(make_entries(3000), vectors, MODEL_A)
        info = index.info()
        assert info.details["search"] == "ivf" and int(info.details["nlist"] or 0) > 1
        agree = 0
        for query in queries:
            everything = [h.study_uid for h in index.exact_search(query, 10)]
            brute = np.argsort(-(vectors @ (query / np.linalg.norm(query))))[:10]
            assert everything == [f"1.2.3.{i}" for i in brute]  # probing every list is exact
            agree += len(set(everything) & {h.study_uid for h in index.search(query, 10, nprobe=32)})
        assert agree / 300 >= 0.85  # 32 of ~219 lists: approximate, but mostly the same


def test_adds_go_to_existing_lists_and_segments_merge(tmp_path: Path) -> None:
    vectors = make_vectors(1200 + 10 * (MAX_SEGMENTS + 1), clusters=10)
    with FileIndex(tmp_path / "ix", create=True, ivf_min_vectors=1000) as index:
        index.add(make_entries(1200), vectors[:1200], MODEL_A)
        nlist = index.info().details["nlist"]
        for step in range(MAX_SEGMENTS + 1):
            rows = slice(1200 + 10 * step, 1210 + 10 * step)
            index.add(make_entries(10, prefix=f"5.{step}"), vectors[rows], MODEL_A)
            assert int(index.info().details["segments"] or 0) <= MAX_SEGMENTS
        assert index.info().details["nlist"] == nlist  # lists were kept, not retrained
        assert index.info().count == vectors.shape[0]
        assert index.search(vectors[1205], 1)[0].study_uid == "5.0.5"


def test_a_crash_before_the_commit_leaves_the_old_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vectors = make_vectors(20)
    path = tmp_path / "ix"
    with FileIndex(path, create=True) as index:
        index.add(make_entries(10), vectors[:10], MODEL_A)
    before = _files(path)

    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt("simulated crash after the vector files were written")

    with FileIndex(path) as index:
        monkeypatch.setattr(index, "_commit", crash)
        with pytest.raises(KeyboardInterrupt):
            index.add(make_entries(10, prefix="4.4"), vectors[10:], MODEL_A)
    assert _files(path) - before  # the new segment's files were left behind
    monkeypatch.undo()
    with FileIndex(path) as index:
        assert index.info().count == 10
        assert index.search(vectors[15], 1)[0].study_uid.startswith("1.2.3.")
        index.add(make_entries(10, prefix="4.4"), vectors[10:], MODEL_A)  # next writer cleans up
        assert index.search(vectors[15], 1)[0].study_uid == "4.4.5"
        assert index.info().count == 20 and index.info().details["segments"] == 2
    assert len([n for n in _files(path) if n.endswith(".vectors.npy")]) == 2


def test_a_crash_after_the_commit_keeps_the_new_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ix"
    vectors = make_vectors(8)
    with FileIndex(path, create=True) as index:
        monkeypatch.setattr(index, "_write_manifest", lambda: (_ for _ in ()).throw(OSError("disk full")))
        with pytest.raises(OSError):
            index.add(make_entries(8), vectors, MODEL_A)
    with FileIndex(path) as index:
        assert index.info().count == 8


def test_manifest_describes_the_index(tmp_path: Path) -> None:
    import json

    with FileIndex(tmp_path / "ix", create=True) as index:
        index.add(make_entries(12, images_per_study=2), make_vectors(12), MODEL_A)
    manifest = json.loads((tmp_path / "ix" / file_index.MANIFEST).read_text())
    assert manifest["format_version"] == file_index.FORMAT_VERSION
    assert manifest["model"]["revision"] == "rev-a" and manifest["dim"] == 32
    assert (manifest["count"], manifest["studies"]) == (12, 6)
