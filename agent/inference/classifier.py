"""A data-efficient classifier: a linear probe on MedSigLIP image embeddings.

Where it sits: ``medagent classify fit`` trains it on embeddings of a few labelled images per
class (see :mod:`agent.inference.training_data`), reports stratified cross-validation, and saves
it as one JSON file; the agent loads that file when ``imaging.classifier_path`` is set and its
predictions join the zero-shot findings as another finding source.

The probe is multinomial logistic regression with L2 regularisation and balanced class weights,
fitted in float64 by L-BFGS from zero weights: the objective is strictly convex, so the result
depends only on the data (no random initialisation), and the fold split is the only thing the
seed drives. Embeddings only mean something to the model that made them, so the file records
that model's identity and embedding size, and :meth:`LinearProbe.check_embedding_model` refuses
embeddings from any other model.

The file is plain JSON (weights as lists of floats), never pickle: loading a classifier someone
sent must not be able to run code.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from pydantic import BaseModel, Field, ValidationError

from agent.domain.imaging import LabelScore
from agent.errors import ConfigError
from agent.inference.protocols import ModelIdentity

FORMAT_NAME = "medagent-linear-probe"
FORMAT_VERSION = 1
#: Folds used when there are enough examples; fewer when the smallest class is smaller.
MAX_FOLDS = 5
#: Below two examples a class can be neither trained on and tested nor cross-validated.
MIN_PER_CLASS = 2
DEFAULT_L2 = 1e-3

FloatArray = NDArray[np.float64]


class TrainingDataError(ConfigError):
    """The labelled examples cannot train a classifier (too few, one class, unreadable files)."""

    code = "training_data_invalid"
    exit_code = 2
    http_status = 422


class ClassifierFileError(ConfigError):
    """A classifier file is missing, not a medagent probe, or internally inconsistent."""

    code = "classifier_invalid"


class EmbeddingModelMismatchError(ConfigError):
    """A probe was asked to classify embeddings from a model it was not trained on."""

    code = "classifier_model_mismatch"


class EmbeddingModelInfo(BaseModel):
    """The embedding model a probe was trained on: its features are meaningless to any other."""

    model_id: str
    revision: str | None = None
    dtype: str
    embedding_dim: int = Field(ge=1)


class CrossValidationReport(BaseModel):
    """Out-of-fold results of stratified k-fold cross-validation, pooled over the folds."""

    folds: int
    examples: int
    accuracy: float
    balanced_accuracy: float
    per_class_recall: dict[str, float]
    class_counts: dict[str, int]


class ProbeLabelSet(BaseModel):
    """The probe's classes, named and versioned like a zero-shot label set (``name@version``)."""

    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    classes: list[str] = Field(min_length=2)

    @property
    def key(self) -> str:
        """Return ``name@version``, the form recorded with every finding."""
        return f"{self.name}@{self.version}"


class _ProbeFile(BaseModel):
    """The JSON document :meth:`LinearProbe.save` writes."""

    format: str
    format_version: int
    created_at: datetime
    label_set: ProbeLabelSet
    embedding_model: EmbeddingModelInfo
    weights: list[list[float]]
    bias: list[float]
    l2: float
    seed: int
    cross_validation: CrossValidationReport


class LinearProbe:
    """A fitted multinomial logistic-regression probe over L2-normalised embeddings."""

    def __init__(
        self,
        *,
        label_set: ProbeLabelSet,
        embedding_model: EmbeddingModelInfo,
        weights: FloatArray,
        bias: FloatArray,
        cross_validation: CrossValidationReport,
        l2: float,
        seed: int,
        created_at: datetime | None = None,
    ) -> None:
        """Wrap fitted parameters; use :meth:`fit` to train or :meth:`load` to read a file."""
        self.label_set = label_set
        self.embedding_model = embedding_model
        self.weights = weights
        self.bias = bias
        self.cross_validation = cross_validation
        self.l2 = l2
        self.seed = seed
        self.created_at = created_at or datetime.now(UTC)

    @property
    def classes(self) -> list[str]:
        """Return the class names, in score order."""
        return list(self.label_set.classes)

    @classmethod
    def fit(
        cls,
        embeddings: NDArray[Any] | torch.Tensor,
        labels: Sequence[str],
        *,
        identity: ModelIdentity,
        name: str,
        version: str = "1",
        folds: int | None = None,
        l2: float = DEFAULT_L2,
        seed: int = 0,
    ) -> LinearProbe:
        """Cross-validate, then fit the probe on all examples.

        Args:
            embeddings: ``(n, dim)`` image embeddings from the model ``identity`` describes.
                They are L2-normalised again here, so unnormalised rows are harmless.
            labels: one class name per row.
            identity: the embedding model, saved with the probe.
            name: the probe's label-set name (e.g. ``pneumonia-vs-normal``); ``version`` its version.
            folds: cross-validation folds; default ``min(5, smallest class count)``.
            l2: L2 penalty on the weights (not the bias), added to the mean weighted loss as
                ``l2 / 2 * ||W||^2``.
            seed: drives the fold split only; the fit itself is deterministic.

        Raises:
            TrainingDataError: fewer than two classes, a class with fewer than two examples,
                a bad fold count, or embeddings and labels that do not line up.
        """
        features = _as_features(embeddings)
        if features.shape[0] != len(labels):
            raise TrainingDataError(f"{features.shape[0]} embeddings but {len(labels)} labels")
        classes = sorted(set(labels))
        counts = {label: sum(1 for value in labels if value == label) for label in classes}
        if len(classes) < 2:
            raise TrainingDataError(
                f"a classifier needs at least two classes; got {classes or 'none'}", details={"class_counts": counts}
            )
        too_few = {label: count for label, count in counts.items() if count < MIN_PER_CLASS}
        if too_few:
            raise TrainingDataError(
                f"every class needs at least {MIN_PER_CLASS} labelled images for cross-validation; too few: "
                + ", ".join(f"{label} ({count})" for label, count in too_few.items()),
                details={"class_counts": counts},
            )
        smallest = min(counts.values())
        k = min(MAX_FOLDS, smallest) if folds is None else folds
        if not 2 <= k <= smallest:
            raise TrainingDataError(
                f"--folds must be between 2 and the smallest class count ({smallest}), got {k}",
                details={"class_counts": counts},
            )
        targets = np.array([classes.index(label) for label in labels], dtype=np.int64)
        report = cross_validate(features, targets, classes, folds=k, l2=l2, seed=seed)
        weights, bias = _fit_logistic(features, targets, len(classes), l2=l2)
        info = EmbeddingModelInfo(
            model_id=identity.model_id,
            revision=identity.revision,
            dtype=identity.dtype,
            embedding_dim=features.shape[1],
        )
        return cls(
            label_set=ProbeLabelSet(name=name, version=version, classes=classes),
            embedding_model=info,
            weights=weights,
            bias=bias,
            cross_validation=report,
            l2=l2,
            seed=seed,
        )

    def predict_proba(self, embeddings: NDArray[Any] | torch.Tensor) -> FloatArray:
        """Return ``(n, classes)`` softmax probabilities for ``(n, dim)`` embeddings.

        Raises:
            EmbeddingModelMismatchError: when the embedding size is not the one trained on.
        """
        features = _as_features(embeddings)
        dim = self.embedding_model.embedding_dim
        if features.shape[1] != dim:
            raise EmbeddingModelMismatchError(
                f"the classifier takes {dim}-d embeddings, got {features.shape[1]}-d ones",
                details={"expected_dim": dim, "got_dim": int(features.shape[1])},
            )
        logits = features @ self.weights.T + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        probabilities: FloatArray = exp / exp.sum(axis=1, keepdims=True)
        return probabilities

    def predict(self, embeddings: NDArray[Any] | torch.Tensor) -> list[list[LabelScore]]:
        """Return one list per embedding of every class's probability, in class order (they sum to one)."""
        return [
            [LabelScore(label=label, score=float(p)) for label, p in zip(self.classes, row, strict=True)]
            for row in self.predict_proba(embeddings)
        ]

    def check_embedding_model(self, identity: ModelIdentity, dim: int) -> None:
        """Refuse an embedding model other than the one this probe was trained on.

        Weights are compared by revision (the weights' hash) when both sides have one, else by
        model id; the embedding size must match too. The dtype is not compared: bf16 and fp32
        embeddings of the same weights differ by rounding only.

        Raises:
            EmbeddingModelMismatchError: naming both models.
        """
        trained = self.embedding_model
        if trained.revision is not None and identity.revision is not None:
            same = trained.revision == identity.revision
            what = f"weights {trained.revision} ({trained.model_id})", f"{identity.revision} ({identity.model_id})"
        else:
            same = trained.model_id == identity.model_id
            what = trained.model_id, identity.model_id
        if not same:
            raise EmbeddingModelMismatchError(
                f"the classifier {self.label_set.key} was trained on embeddings of {what[0]}, "
                f"but the loaded embedding model is {what[1]}; retrain it with `medagent classify fit` "
                "or configure the model it was trained on",
                details={"trained_on": trained.model_dump(), "loaded": identity.model_dump()},
            )
        if dim != trained.embedding_dim:
            raise EmbeddingModelMismatchError(
                f"the classifier {self.label_set.key} takes {trained.embedding_dim}-d embeddings, "
                f"the loaded model makes {dim}-d ones",
                details={"expected_dim": trained.embedding_dim, "got_dim": dim},
            )

    def save(self, path: Path) -> None:
        """Write the probe as one JSON file (parent folders are created)."""
        document = _ProbeFile(
            format=FORMAT_NAME,
            format_version=FORMAT_VERSION,
            created_at=self.created_at,
            label_set=self.label_set,
            embedding_model=self.embedding_model,
            weights=self.weights.tolist(),
            bias=self.bias.tolist(),
            l2=self.l2,
            seed=self.seed,
            cross_validation=self.cross_validation,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename, so a reader never sees half a file.
        partial = path.with_name(path.name + ".partial")
        partial.write_text(document.model_dump_json(indent=1))
        partial.replace(path)

    @classmethod
    def load(cls, path: Path) -> LinearProbe:
        """Read and validate a probe written by :meth:`save`.

        Raises:
            ClassifierFileError: the file is missing or unreadable, not a medagent probe, of an
                unknown format version, or its shapes or values are inconsistent.
        """

        def invalid(reason: str) -> ClassifierFileError:
            return ClassifierFileError(f"classifier file {path}: {reason}", details={"path": str(path)})

        try:
            raw = json.loads(path.read_text())
        except OSError as exc:
            raise invalid(f"cannot read it ({type(exc).__name__}: {exc.strerror or exc})") from exc
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise invalid("not JSON, so not a classifier saved by `medagent classify fit`") from exc
        if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
            raise invalid(f"not a {FORMAT_NAME} file")
        if raw.get("format_version") != FORMAT_VERSION:
            raise invalid(f"format version {raw.get('format_version')!r} is not supported (expected {FORMAT_VERSION})")
        try:
            document = _ProbeFile.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
            raise invalid(f"malformed ({problems})") from exc
        classes = document.label_set.classes
        dim = document.embedding_model.embedding_dim
        if len(set(classes)) != len(classes):
            raise invalid(f"duplicate class names in {classes}")
        weights = np.asarray(document.weights, dtype=np.float64)
        bias = np.asarray(document.bias, dtype=np.float64)
        if weights.shape != (len(classes), dim) or bias.shape != (len(classes),):
            raise invalid(
                f"weights {weights.shape} and bias {bias.shape} do not fit {len(classes)} classes of {dim}-d embeddings"
            )
        if not (np.isfinite(weights).all() and np.isfinite(bias).all()):
            raise invalid("weights or bias are not finite numbers")
        return cls(
            label_set=document.label_set,
            embedding_model=document.embedding_model,
            weights=weights,
            bias=bias,
            cross_validation=document.cross_validation,
            l2=document.l2,
            seed=document.seed,
            created_at=document.created_at,
        )


def stratified_folds(targets: NDArray[np.int64], folds: int, seed: int) -> list[NDArray[np.int64]]:
    """Split example indices into ``folds`` test sets, each holding every class.

    Each class's examples are shuffled (by ``seed``) and dealt round-robin, so fold sizes per
    class differ by at most one; a class needs at least ``folds`` examples to appear in all.
    """
    rng = np.random.default_rng(seed)
    assigned: list[list[int]] = [[] for _ in range(folds)]
    offset = 0
    for target in np.unique(targets):
        members = rng.permutation(np.flatnonzero(targets == target))
        for position, index in enumerate(members):
            # Start each class where the previous one stopped, so no fold collects all the leftovers.
            assigned[(position + offset) % folds].append(int(index))
        offset += len(members)
    return [np.array(sorted(fold), dtype=np.int64) for fold in assigned]


def cross_validate(
    features: FloatArray, targets: NDArray[np.int64], classes: list[str], *, folds: int, l2: float, seed: int
) -> CrossValidationReport:
    """Fit on k-1 folds, predict the held-out one, and score the pooled out-of-fold predictions."""
    predicted = np.full(targets.shape, -1, dtype=np.int64)
    for test in stratified_folds(targets, folds, seed):
        train = np.setdiff1d(np.arange(len(targets)), test)
        weights, bias = _fit_logistic(features[train], targets[train], len(classes), l2=l2)
        predicted[test] = np.argmax(features[test] @ weights.T + bias, axis=1)
    recall = {label: float(np.mean(predicted[targets == index] == index)) for index, label in enumerate(classes)}
    return CrossValidationReport(
        folds=folds,
        examples=len(targets),
        accuracy=float(np.mean(predicted == targets)),
        balanced_accuracy=float(np.mean(list(recall.values()))),
        per_class_recall=recall,
        class_counts={label: int(np.sum(targets == index)) for index, label in enumerate(classes)},
    )


def _as_features(embeddings: NDArray[Any] | torch.Tensor) -> FloatArray:
    """Return float64 rows of unit length; MedSigLIP's are already, this guards other callers."""
    array = embeddings.detach().cpu().double().numpy() if isinstance(embeddings, torch.Tensor) else embeddings
    features = np.asarray(array, dtype=np.float64)
    if features.ndim != 2:
        raise TrainingDataError(f"embeddings must be a (n, dim) matrix, got shape {features.shape}")
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    normalised: FloatArray = features / np.where(norms > 0, norms, 1.0)
    return normalised


def _fit_logistic(
    features: FloatArray, targets: NDArray[np.int64], n_classes: int, *, l2: float
) -> tuple[FloatArray, FloatArray]:
    """Minimise the class-balanced mean cross-entropy plus ``l2 / 2 * ||W||^2`` with L-BFGS."""
    x = torch.from_numpy(features)
    y = torch.from_numpy(targets)
    counts = torch.bincount(y, minlength=n_classes).double()
    # Balanced weights (n / (classes * count)): each class weighs the same in the loss, however
    # many examples it has, so the probe is not pulled toward the majority class.
    class_weights = torch.where(counts > 0, len(targets) / (n_classes * counts.clamp(min=1)), 0.0)
    weights = torch.zeros((n_classes, x.shape[1]), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS(
        [weights, bias],
        lr=1.0,
        max_iter=500,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        logits = x @ weights.T + bias
        loss = torch.nn.functional.cross_entropy(logits, y, weight=class_weights, reduction="sum") / len(targets)
        loss = loss + 0.5 * l2 * weights.pow(2).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    fitted_weights = weights.detach().numpy().copy()
    fitted_bias = bias.detach().numpy().copy()
    if not (math.isfinite(float(fitted_weights.sum())) and math.isfinite(float(fitted_bias.sum()))):
        raise TrainingDataError("the classifier fit diverged (non-finite weights); check the embeddings")
    return fitted_weights, fitted_bias
