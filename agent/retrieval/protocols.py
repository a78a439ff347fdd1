"""The similar-case index interface both backends implement, and its errors.

The embedded index folder (:mod:`agent.retrieval.file_index`) and pgvector
(:mod:`agent.retrieval.pgvector_index`) behave the same: the first add claims the index for one
model, vectors from any other model are refused, deletes hide images at once and ``rebuild``
reclaims their space.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from agent.errors import ConfigError, MedagentError
from agent.retrieval.entries import IndexedModel, IndexEntry, IndexInfo, StudyHit

FloatMatrix = NDArray[np.floating]


class IndexModelMismatchError(ConfigError):
    """Vectors from one model were offered to an index made by another (or of another size)."""

    code = "index_model_mismatch"


class IndexCorruptError(MedagentError):
    """The index's files or tables are missing pieces or disagree with each other."""

    code = "index_corrupt"
    exit_code = 8
    http_status = 500


class ImageIndex(Protocol):
    """Store image embeddings with their identifiers; find the studies closest to a query."""

    def add(self, entries: Sequence[IndexEntry], vectors: FloatMatrix, model: IndexedModel) -> int:
        """Add one L2-normalised vector per entry, made by ``model``; return how many were added.

        Instances already indexed (same SOP instance UID) are replaced, so re-adding a study is safe.

        Raises:
            IndexModelMismatchError: the index holds vectors of another model or size.
            ValueError: entries and vectors differ in number, or vectors are not 2-d.
        """
        ...

    def delete(self, *, study_uid: str | None = None, sop_instance_uids: Sequence[str] = ()) -> int:
        """Remove a study's images, or the given instances; return how many were removed."""
        ...

    def search(
        self, vector: FloatMatrix, k: int, *, exclude_study_uid: str | None = None, model: IndexedModel | None = None
    ) -> list[StudyHit]:
        """Return the top ``k`` studies by their best image's cosine similarity to ``vector``.

        Raises:
            IndexModelMismatchError: ``model`` is given and is not the index's model.
        """
        ...

    def rebuild(self) -> IndexInfo:
        """Reclaim deleted space and rebuild the search structure; return the new info."""
        ...

    def info(self) -> IndexInfo:
        """Describe the index: model, dimension, counts, backend."""
        ...

    def close(self) -> None:
        """Release files or connections."""
        ...


def check_model(recorded: IndexedModel | None, offered: IndexedModel, where: str) -> None:
    """Refuse vectors of a model other than the one an index recorded.

    Raises:
        IndexModelMismatchError: naming both models and what to do.
    """
    if recorded is None or recorded.same_model(offered):
        return
    raise IndexModelMismatchError(
        f"the image index at {where} holds vectors made by {recorded.describe()}, but these come from "
        f"{offered.describe()}; vectors of different models are not comparable. Rebuild into a new index "
        "(another index path or table) with this model, or use the model the index was made with.",
        details={"index_model": recorded.model_dump(), "offered_model": offered.model_dump()},
    )


def as_unit_rows(vectors: FloatMatrix, dim: int | None = None) -> NDArray[np.float32]:
    """Return vectors as C-contiguous float32 rows of unit length.

    Rows are renormalised: embeddings arrive normalised, but float16 or bfloat16 round trips
    leave them slightly off, and cosine by dot product needs exact unit length.

    Raises:
        ValueError: not 2-d, the wrong width, or a zero / non-finite row.
    """
    array = np.asarray(vectors, dtype=np.float32)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2:
        raise ValueError(f"vectors must be 2-d (n, dim), got shape {array.shape}")
    if dim is not None and array.shape[1] != dim:
        raise ValueError(f"vectors have {array.shape[1]} dimensions, the index {dim}")
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    if not np.all(np.isfinite(norms)) or np.any(norms == 0):
        raise ValueError("vectors must be finite and non-zero")
    return np.ascontiguousarray(array / norms, dtype=np.float32)
