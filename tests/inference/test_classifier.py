"""The linear probe: it learns separable classes, not noise, and its file is safe and self-checking."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.typing import NDArray

from agent.errors import ConfigError
from agent.inference.classifier import (
    FORMAT_VERSION,
    ClassifierFileError,
    EmbeddingModelMismatchError,
    LinearProbe,
    TrainingDataError,
    stratified_folds,
)
from agent.inference.protocols import ModelIdentity

DIM = 48
IDENTITY = ModelIdentity(
    model_id="google/medsiglip-448", backend="transformers", revision="sha256:aaaa", dtype="bfloat16"
)


def clusters(per_class: dict[str, int], *, spread: float, seed: int = 1) -> tuple[NDArray[np.float64], list[str]]:
    """Return unit-length embeddings scattered around one random direction per class."""
    rng = np.random.default_rng(seed)
    rows: list[NDArray[np.float64]] = []
    labels: list[str] = []
    for label, count in per_class.items():
        centre = rng.normal(size=DIM)
        centre /= np.linalg.norm(centre)
        points = centre + spread * rng.normal(size=(count, DIM)) / np.sqrt(DIM)
        rows.append(points / np.linalg.norm(points, axis=1, keepdims=True))
        labels.extend([label] * count)
    return np.concatenate(rows), labels


def test_separable_embeddings_reach_full_cross_validated_accuracy() -> None:
    embeddings, labels = clusters({"normal": 6, "pneumonia": 6, "effusion": 6}, spread=0.3)
    probe = LinearProbe.fit(embeddings, labels, identity=IDENTITY, name="cxr-triage")
    report = probe.cross_validation
    assert report.folds == 5
    assert report.examples == 18
    assert report.accuracy == 1.0
    assert report.balanced_accuracy == 1.0
    assert report.per_class_recall == {"effusion": 1.0, "normal": 1.0, "pneumonia": 1.0}
    assert report.class_counts == {"effusion": 6, "normal": 6, "pneumonia": 6}
    # The final probe, trained on everything, classifies its training set, with probabilities.
    predicted = probe.predict(embeddings)
    assert [max(row, key=lambda s: s.score).label for row in predicted] == labels
    for row in predicted:
        assert [s.label for s in row] == probe.classes == ["effusion", "normal", "pneumonia"]
        assert sum(s.score for s in row) == pytest.approx(1.0)


def test_shuffled_labels_are_near_chance() -> None:
    embeddings, labels = clusters({"a": 30, "b": 30, "c": 30}, spread=0.3)
    shuffled = list(np.random.default_rng(5).permutation(labels))
    learned = LinearProbe.fit(embeddings, labels, identity=IDENTITY, name="x").cross_validation
    noise = LinearProbe.fit(embeddings, shuffled, identity=IDENTITY, name="x").cross_validation
    assert learned.balanced_accuracy == 1.0
    # Chance is 1/3; shuffled labels carry no signal the probe could find.
    assert noise.balanced_accuracy < 0.55


def test_class_balancing_keeps_a_small_class_visible() -> None:
    # Overlapping classes, 24 vs 4, a strong penalty: an unweighted fit leans on the bias and
    # calls everything the big class (rare recall 0, mean rare probability about 0.3 here).
    embeddings, labels = clusters({"common": 24, "rare": 4}, spread=3.0, seed=3)
    probe = LinearProbe.fit(embeddings, labels, identity=IDENTITY, name="x", folds=2, l2=0.1)
    assert probe.cross_validation.per_class_recall["rare"] >= 0.5
    probabilities = probe.predict_proba(embeddings)
    rare = np.array([label == "rare" for label in labels])
    # Balanced weights: the rare class's examples get, on average, the higher rare probability.
    assert probabilities[rare, probe.classes.index("rare")].mean() > 0.5


def test_fit_is_deterministic() -> None:
    embeddings, labels = clusters({"a": 5, "b": 5}, spread=1.0)
    first = LinearProbe.fit(embeddings, labels, identity=IDENTITY, name="x")
    second = LinearProbe.fit(embeddings, labels, identity=IDENTITY, name="x")
    assert np.array_equal(first.weights, second.weights)
    assert first.cross_validation == second.cross_validation


def test_stratified_folds_hold_every_class_and_every_index_once() -> None:
    targets = np.array([0] * 7 + [1] * 3 + [2] * 5, dtype=np.int64)
    folds = stratified_folds(targets, 3, seed=0)
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(targets)))
    for fold in folds:
        assert set(targets[fold].tolist()) == {0, 1, 2}


def test_folds_default_to_the_smallest_class() -> None:
    embeddings, labels = clusters({"a": 3, "b": 9}, spread=0.3)
    assert LinearProbe.fit(embeddings, labels, identity=IDENTITY, name="x").cross_validation.folds == 3


@pytest.mark.parametrize(
    ("per_class", "folds", "message"),
    [
        ({"a": 5, "b": 1}, None, "b (1)"),
        ({"a": 5}, None, "two classes"),
        ({"a": 3, "b": 3}, 4, "between 2 and the smallest class count (3)"),
        ({"a": 3, "b": 3}, 1, "between 2"),
    ],
)
def test_too_few_examples_is_a_clear_error(per_class: dict[str, int], folds: int | None, message: str) -> None:
    embeddings, labels = clusters(per_class, spread=0.3)
    with pytest.raises(TrainingDataError) as caught:
        LinearProbe.fit(embeddings, labels, identity=IDENTITY, name="x", folds=folds)
    assert message in caught.value.message
    assert isinstance(caught.value, ConfigError)


def test_embeddings_and_labels_must_line_up() -> None:
    embeddings, labels = clusters({"a": 3, "b": 3}, spread=0.3)
    with pytest.raises(TrainingDataError, match="6 embeddings but 5 labels"):
        LinearProbe.fit(embeddings, labels[:5], identity=IDENTITY, name="x")


def test_save_load_roundtrip_predicts_identically(tmp_path: Path) -> None:
    embeddings, labels = clusters({"a": 4, "b": 4, "c": 4}, spread=1.0)
    probe = LinearProbe.fit(embeddings, labels, identity=IDENTITY, name="triage", version="2")
    path = tmp_path / "probes" / "triage.json"
    probe.save(path)
    loaded = LinearProbe.load(path)
    assert loaded.predict(embeddings) == probe.predict(embeddings)
    assert loaded.label_set.key == "triage@2"
    assert loaded.cross_validation == probe.cross_validation
    assert loaded.created_at == probe.created_at

    document = json.loads(path.read_text())
    assert document["format_version"] == FORMAT_VERSION
    assert document["label_set"] == {"name": "triage", "version": "2", "classes": ["a", "b", "c"]}
    assert document["embedding_model"] == {
        "model_id": "google/medsiglip-448",
        "revision": "sha256:aaaa",
        "dtype": "bfloat16",
        "embedding_dim": DIM,
    }
    assert len(document["weights"]) == 3 and len(document["weights"][0]) == DIM
    assert document["cross_validation"]["accuracy"] == probe.cross_validation.accuracy
    assert not list(tmp_path.glob("probes/*.partial"))


def test_predict_accepts_torch_float32_embeddings() -> None:
    embeddings, labels = clusters({"a": 3, "b": 3}, spread=0.3)
    probe = LinearProbe.fit(embeddings, labels, identity=IDENTITY, name="x")
    as_tensor = probe.predict(torch.from_numpy(embeddings).float())
    as_array = probe.predict(embeddings)
    for tensor_row, array_row in zip(as_tensor, as_array, strict=True):
        assert [s.score for s in tensor_row] == pytest.approx([s.score for s in array_row], abs=1e-5)


def test_refuses_another_embedding_model() -> None:
    embeddings, labels = clusters({"a": 3, "b": 3}, spread=0.3)
    probe = LinearProbe.fit(embeddings, labels, identity=IDENTITY, name="x")
    probe.check_embedding_model(IDENTITY.model_copy(update={"dtype": "float32", "device": "cuda"}), DIM)

    other_weights = IDENTITY.model_copy(update={"revision": "sha256:bbbb"})
    with pytest.raises(EmbeddingModelMismatchError) as caught:
        probe.check_embedding_model(other_weights, DIM)
    assert "sha256:aaaa" in caught.value.message and "sha256:bbbb" in caught.value.message

    # Without a revision on one side, the model id decides.
    probe.check_embedding_model(IDENTITY.model_copy(update={"revision": None}), DIM)
    with pytest.raises(EmbeddingModelMismatchError, match="tiny"):
        probe.check_embedding_model(IDENTITY.model_copy(update={"revision": None, "model_id": "tiny"}), DIM)

    with pytest.raises(EmbeddingModelMismatchError, match=f"takes {DIM}-d"):
        probe.check_embedding_model(IDENTITY, DIM * 2)
    with pytest.raises(EmbeddingModelMismatchError, match=f"takes {DIM}-d"):
        probe.predict(np.ones((1, DIM + 1)))


def test_load_rejects_files_that_are_not_valid_probes(tmp_path: Path) -> None:
    embeddings, labels = clusters({"a": 3, "b": 3}, spread=0.3)
    good = tmp_path / "good.json"
    LinearProbe.fit(embeddings, labels, identity=IDENTITY, name="x").save(good)
    document = json.loads(good.read_text())

    def write(name: str, content: str) -> Path:
        path = tmp_path / name
        path.write_text(content)
        return path

    cases = {
        write("pickle.json", "\x80\x04K\x01."): "not JSON",
        write("other.json", json.dumps({"format": "something-else"})): "not a medagent-linear-probe",
        write("future.json", json.dumps({**document, "format_version": 99})): "format version 99",
        write("short.json", json.dumps({**document, "bias": [0.0]})): "do not fit 2 classes",
        write("nameless.json", json.dumps({k: v for k, v in document.items() if k != "label_set"})): "label_set",
        write("nan.json", json.dumps({**document, "bias": ["nan", 0.0]})): "not finite",
    }
    for path, message in cases.items():
        with pytest.raises(ClassifierFileError) as caught:
            LinearProbe.load(path)
        assert message in caught.value.message, path.name
        assert str(path) in caught.value.message
    with pytest.raises(ClassifierFileError, match="cannot read"):
        LinearProbe.load(tmp_path / "missing.json")
