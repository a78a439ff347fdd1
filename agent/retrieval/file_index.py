"""The embedded similar-case index: one folder, numpy vectors and an SQLite catalogue.

Layout of the folder:

- ``catalog.sqlite``: the source of truth. Entries (identifiers per image, with a ``deleted``
  tombstone), segments (which vector files are live), and metadata (model identity, dim,
  centroid file, generation). Every change is one SQLite transaction: the commit point.
- ``seg-<id>.vectors.npy`` (float32, unit rows sorted by IVF list), ``seg-<id>.ids.npy`` (entry id
  per row) and ``seg-<id>.offsets.npy`` (where each list starts): immutable, written to a temporary
  name, fsynced and renamed *before* the transaction that makes them live. Memory-mapped to read.
- ``centroids-<id>.npy``: the IVF coarse quantiser, absent below :data:`IVF_MIN_VECTORS`
  (small indexes are searched exactly).
- ``manifest.json``: a snapshot for people and tools (format version, model, dim, counts),
  rewritten atomically after each commit; the catalogue wins if they ever disagree.

A crash at any point leaves either the old or the new index: files written before the commit are
orphans, invisible and removed by the next writer. Writers are serialised by an ``flock`` on
``.lock``; readers notice a new generation and remap. Each add is a new segment whose vectors go
to the existing lists; past :data:`MAX_SEGMENTS` they are merged; ``rebuild`` re-clusters and
drops tombstoned rows.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
from numpy.typing import NDArray

from agent.retrieval import ivf
from agent.retrieval.entries import ENTRY_COLUMNS, IndexedModel, IndexEntry, IndexInfo, StudyHit, studies_from_hits
from agent.retrieval.protocols import FloatMatrix, IndexCorruptError, check_model

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
#: Below this many live vectors the index is searched exactly (one list): it is fast enough, and
#: k-means on a few thousand points makes poor lists.
IVF_MIN_VECTORS = 20_000
#: Segments allowed before an add merges them into one (each adds a slice per probed list).
MAX_SEGMENTS = 8
#: Rows written per chunk while copying vectors: bounds memory to chunk x dim floats.
COPY_CHUNK = 65_536
CATALOG = "catalog.sqlite"
MANIFEST = "manifest.json"

_ENTRY_COLUMNS = ENTRY_COLUMNS

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS segments (name TEXT PRIMARY KEY, rows INTEGER NOT NULL, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    entry_id INTEGER PRIMARY KEY,
    segment TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    modality TEXT,
    patient_ref TEXT,
    imaging_study_ref TEXT,
    source TEXT NOT NULL,
    dicomweb_url TEXT,
    label TEXT,
    added_at TEXT NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS ix_entries_study ON entries (study_uid);
CREATE INDEX IF NOT EXISTS ix_entries_sop ON entries (sop_instance_uid);
"""


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _guarded(method: _Method) -> _Method:
    """Run a public method under the index's thread guard (re-entrant: methods call each other)."""

    @functools.wraps(method)
    def wrapper(self: FileIndex, *args: Any, **kwargs: Any) -> Any:
        with self._guard:
            return method(self, *args, **kwargs)

    return cast(_Method, wrapper)


@dataclass
class _Segment:
    name: str
    vectors: NDArray[np.float32]
    ids: NDArray[np.int64]
    offsets: NDArray[np.int64]


@dataclass
class _Layout:
    generation: int
    model: IndexedModel | None
    centroids: NDArray[np.float32] | None
    centroid_file: str | None
    nprobe: int
    segments: list[_Segment]


class FileIndex:
    """An :class:`~agent.retrieval.protocols.ImageIndex` in a folder (the embedded default).

    Args:
        path: the index folder.
        create: make the folder when it does not exist; otherwise a missing index is an error.
        ivf_min_vectors: live vectors from which an IVF structure is built (tests lower it).
        nprobe: lists scanned per query when IVF is on; default :func:`~agent.retrieval.ivf.choose_nprobe`.
    """

    backend = "file"

    def __init__(
        self, path: Path, *, create: bool = False, ivf_min_vectors: int = IVF_MIN_VECTORS, nprobe: int | None = None
    ) -> None:
        self.path = Path(path)
        catalog = self.path / CATALOG
        if not catalog.exists():
            if not create:
                from agent.errors import ConfigError

                raise ConfigError(
                    f"no image index at {self.path} (no {CATALOG}); add images first with `medagent index add`"
                )
            self.path.mkdir(parents=True, exist_ok=True)
        self.ivf_min_vectors = ivf_min_vectors
        self._nprobe_override = nprobe
        # One connection, usable from worker threads (the CLI and the service call in via
        # asyncio.to_thread); _guard keeps two threads from using it at once.
        self._db = sqlite3.connect(catalog, isolation_level=None, check_same_thread=False)
        self._guard = threading.RLock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        with self._write_lock():
            self._db.executescript(_SCHEMA)
            self._set_meta_default("format_version", str(FORMAT_VERSION))
            self._set_meta_default("generation", "0")
        version = int(self._meta("format_version") or 0)
        if version != FORMAT_VERSION:
            raise IndexCorruptError(
                f"image index at {self.path} has format {version}; this medagent reads {FORMAT_VERSION}"
            )
        self._layout: _Layout | None = None

    # --- public API ------------------------------------------------------------------------------

    @_guarded
    def add(self, entries: Sequence[IndexEntry], vectors: FloatMatrix, model: IndexedModel) -> int:
        """Add one vector per entry as a new segment; replaces instances already indexed.

        ``vectors`` may be any float dtype (float16 is fine); rows are normalised chunk by chunk,
        so a million-row float16 input never needs a float32 copy of itself.
        """
        if vectors.ndim != 2 or vectors.shape[0] != len(entries):
            raise ValueError(f"{len(entries)} entries but vectors of shape {vectors.shape}")
        if vectors.shape[1] != model.dim:
            raise ValueError(f"vectors have {vectors.shape[1]} dimensions, the model {model.dim}")
        if not entries:
            return 0
        with self._write_lock():
            self._remove_orphans()
            recorded = self._recorded_model()
            check_model(recorded, model, str(self.path))
            layout = self._load_layout()
            first_id = int(self._db.execute("SELECT coalesce(max(entry_id), 0) + 1 FROM entries").fetchone()[0])
            new_ids = np.arange(first_id, first_id + len(entries), dtype=np.int64)
            live = self._live_count()
            needs_ivf = layout.centroids is None and live + len(entries) >= self.ivf_min_vectors
            if needs_ivf or len(layout.segments) + 1 > MAX_SEGMENTS:
                # Re-lay out everything at once: train lists on old and new vectors together.
                self._rewrite(layout, recluster=needs_ivf, extra=(new_ids, vectors), model=model, new_entries=entries)
            else:
                name = self._write_segment([(vectors, new_ids)], layout.centroids)
                self._commit(
                    model=model,
                    new_segments=[(name, len(entries))],
                    dropped_segments=[],
                    entries=entries,
                    entry_ids=new_ids,
                    segment_for_entries=name,
                    centroid_file=layout.centroid_file,
                )
            self._write_manifest()
            self._remove_orphans()
        return len(entries)

    @_guarded
    def delete(self, *, study_uid: str | None = None, sop_instance_uids: Sequence[str] = ()) -> int:
        """Tombstone a study's images or the given instances; ``rebuild`` reclaims the space."""
        if study_uid is None and not sop_instance_uids:
            raise ValueError("delete needs a study UID or SOP instance UIDs")
        with self._write_lock():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                count = 0
                if study_uid is not None:
                    count += self._db.execute(
                        "UPDATE entries SET deleted = 1 WHERE study_uid = ? AND deleted = 0", (study_uid,)
                    ).rowcount
                for sop in sop_instance_uids:
                    count += self._db.execute(
                        "UPDATE entries SET deleted = 1 WHERE sop_instance_uid = ? AND deleted = 0", (sop,)
                    ).rowcount
                self._bump_generation()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._write_manifest()
        return count

    @_guarded
    def search(
        self,
        vector: FloatMatrix,
        k: int,
        *,
        exclude_study_uid: str | None = None,
        model: IndexedModel | None = None,
        nprobe: int | None = None,
    ) -> list[StudyHit]:
        """Return the top ``k`` studies (best image cosine), probing ``nprobe`` lists when IVF is on."""
        if k <= 0:
            return []
        layout = self._load_layout()
        if model is not None:
            check_model(layout.model, model, str(self.path))
        if layout.model is None:
            return []
        query = ivf.unit_rows(np.asarray(vector, dtype=np.float32).reshape(1, -1))[0]
        if query.shape[0] != layout.model.dim:
            raise ValueError(f"query has {query.shape[0]} dimensions, the index {layout.model.dim}")
        scores, ids = self._scan(layout, query, nprobe)
        if scores.size == 0:
            return []
        # Image hits are over-fetched: several may belong to one study, and some may be
        # tombstoned; widen until k studies are found or the candidates run out.
        want = max(4 * k, 32)
        while True:
            order = ivf.top_k(scores, want)
            found = self._entries_by_id([int(i) for i in ids[order]])
            pairs = [
                (found[int(i)], float(s)) for i, s in zip(ids[order], scores[order], strict=True) if int(i) in found
            ]
            hits = studies_from_hits(pairs, k, exclude_study_uid)
            if len(hits) >= k or want >= scores.size:
                return hits
            want *= 4

    def exact_search(self, vector: FloatMatrix, k: int, **kwargs: Any) -> list[StudyHit]:
        """Search every list (brute force): the reference the IVF search is checked against."""
        return self.search(vector, k, nprobe=1 << 30, **kwargs)

    @_guarded
    def rebuild(self) -> IndexInfo:
        """Drop tombstoned rows, re-cluster (or go exact when small) and merge into one segment."""
        with self._write_lock():
            self._remove_orphans()
            layout = self._load_layout()
            model = self._recorded_model()
            if model is not None:
                self._rewrite(layout, recluster=True, extra=None, model=model, new_entries=())
            self._write_manifest()
            self._remove_orphans()
        return self.info()

    @_guarded
    def info(self) -> IndexInfo:
        """Describe the index: model, dim, live/deleted counts, lists and segments."""
        layout = self._load_layout()
        live, deleted, studies = self._db.execute(
            "SELECT coalesce(sum(deleted = 0), 0), coalesce(sum(deleted = 1), 0),"
            " count(DISTINCT CASE WHEN deleted = 0 THEN study_uid END) FROM entries"
        ).fetchone()
        model = layout.model
        return IndexInfo(
            backend="file",
            location=str(self.path),
            model_id=model.model_id if model else None,
            revision=model.revision if model else None,
            test_model=model.test_model if model else False,
            dim=model.dim if model else None,
            count=int(live),
            studies=int(studies),
            deleted=int(deleted),
            details={
                "format_version": FORMAT_VERSION,
                "nlist": int(layout.centroids.shape[0]) if layout.centroids is not None else 1,
                "nprobe": layout.nprobe,
                "segments": len(layout.segments),
                "search": "ivf" if layout.centroids is not None else "exact",
                "bytes": self.disk_bytes(),
            },
        )

    @_guarded
    def warm(self) -> None:
        """Read every vector once, so searches find them in memory (a service calls this at start)."""
        for segment in self._load_layout().segments:
            for start in range(0, segment.vectors.shape[0], COPY_CHUNK):
                np.asarray(segment.vectors[start : start + COPY_CHUNK]).sum()

    def disk_bytes(self) -> int:
        """Return the bytes the index folder takes on disk."""
        return sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())

    def close(self) -> None:
        """Close the catalogue and drop the memory maps."""
        self._layout = None
        self._db.close()

    def __enter__(self) -> FileIndex:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- search internals ----------------------------------------------------------------------

    def _scan(
        self, layout: _Layout, query: NDArray[np.float32], nprobe: int | None
    ) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        if layout.centroids is None:
            lists: NDArray[np.intp] = np.zeros(1, dtype=np.intp)
        else:
            lists = ivf.top_lists(query, layout.centroids, nprobe or layout.nprobe)
        score_parts: list[NDArray[np.float32]] = []
        id_parts: list[NDArray[np.int64]] = []
        for segment in layout.segments:
            offsets = segment.offsets
            for lst in lists:
                start, stop = int(offsets[lst]), int(offsets[lst + 1])
                if stop > start:
                    score_parts.append(segment.vectors[start:stop] @ query)
                    id_parts.append(segment.ids[start:stop])
        if not score_parts:
            return np.empty(0, dtype=np.float32), np.empty(0, dtype=np.int64)
        return np.concatenate(score_parts), np.concatenate(id_parts)

    def _entries_by_id(self, ids: list[int]) -> dict[int, IndexEntry]:
        found: dict[int, IndexEntry] = {}
        columns = ", ".join(_ENTRY_COLUMNS)
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                f"SELECT entry_id, {columns} FROM entries WHERE deleted = 0 AND entry_id IN ({marks})", chunk
            ).fetchall()
            for row in rows:
                found[int(row[0])] = _entry_of(row[1:])
        return found

    def _load_layout(self) -> _Layout:
        generation = int(self._meta("generation") or 0)
        if self._layout is not None and self._layout.generation == generation:
            return self._layout
        model = self._recorded_model()
        centroid_file = self._meta("centroids")
        centroids = None
        if centroid_file:
            centroids = self._open_array(centroid_file)
        segments = []
        for (name,) in self._db.execute("SELECT name FROM segments ORDER BY seq").fetchall():
            segments.append(
                _Segment(
                    name=name,
                    vectors=self._open_array(f"{name}.vectors.npy"),
                    ids=self._open_array(f"{name}.ids.npy"),
                    offsets=np.asarray(self._open_array(f"{name}.offsets.npy")),
                )
            )
        nlist = centroids.shape[0] if centroids is not None else 1
        nprobe = self._nprobe_override or int(self._meta("nprobe") or ivf.choose_nprobe(nlist))
        self._layout = _Layout(generation, model, centroids, centroid_file, min(nprobe, nlist), segments)
        return self._layout

    def _open_array(self, name: str) -> Any:
        try:
            return np.load(self.path / name, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise IndexCorruptError(
                f"image index at {self.path} is missing or cannot read {name}; run `medagent index rebuild` "
                "from the original sources into a new index",
                details={"file": name},
            ) from exc

    # --- write internals -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _write_lock(self) -> Iterator[None]:
        with open(self.path / ".lock", "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _write_segment(
        self, sources: list[tuple[Any, NDArray[np.int64]]], centroids: NDArray[np.float32] | None
    ) -> str:
        """Write one segment from (vectors, ids) sources, rows sorted by list; return its name.

        Written under temporary names, fsynced, then renamed: a crash leaves an orphan, not a
        half-written live file.
        """
        name = f"seg-{uuid.uuid4().hex[:16]}"
        nlist = centroids.shape[0] if centroids is not None else 1
        assignments = []
        total_rows = sum(int(vectors.shape[0]) for vectors, _ in sources)
        for vectors, _ in sources:
            if centroids is None:
                assignments.append(np.zeros(vectors.shape[0], dtype=np.int32))
            else:
                cap = max(64, int(ivf.OVERSIZE_FACTOR * total_rows / nlist))
                assignments.append(ivf.assign_lists(vectors, centroids, cap=cap))
        lists = np.concatenate(assignments) if assignments else np.zeros(0, dtype=np.int32)
        source_of = np.concatenate([np.full(len(a), i, dtype=np.int32) for i, a in enumerate(assignments)])
        row_of = np.concatenate([np.arange(len(a), dtype=np.int64) for a in assignments])
        order = np.argsort(lists, kind="stable")
        total = int(order.shape[0])
        dim = int(sources[0][0].shape[1])
        counts = np.bincount(lists, minlength=nlist).astype(np.int64)
        offsets = np.zeros(nlist + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])

        tmp_vectors = self.path / f".{name}.vectors.npy.tmp"
        out = np.lib.format.open_memmap(tmp_vectors, mode="w+", dtype=np.float32, shape=(total, dim))
        ids_out = np.empty(total, dtype=np.int64)
        for start in range(0, total, COPY_CHUNK):
            picked = order[start : start + COPY_CHUNK]
            block = np.empty((picked.shape[0], dim), dtype=np.float32)
            for index, (vectors, ids) in enumerate(sources):
                mask = source_of[picked] == index
                if mask.any():
                    rows = row_of[picked[mask]]
                    block[mask] = ivf.unit_rows(_take_rows(vectors, rows))
                    ids_out[start : start + picked.shape[0]][mask] = ids[rows]
            out[start : start + picked.shape[0]] = block
        out.flush()
        del out
        _fsync(tmp_vectors)
        self._save_array(f"{name}.ids.npy", ids_out)
        self._save_array(f"{name}.offsets.npy", offsets)
        os.replace(tmp_vectors, self.path / f"{name}.vectors.npy")
        return name

    def _save_array(self, name: str, array: NDArray[Any]) -> None:
        tmp = self.path / f".{name}.tmp"
        with open(tmp, "wb") as handle:
            np.save(handle, array)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path / name)

    def _rewrite(
        self,
        layout: _Layout,
        *,
        recluster: bool,
        extra: tuple[NDArray[np.int64], Any] | None,
        model: IndexedModel,
        new_entries: Sequence[IndexEntry],
    ) -> None:
        """Merge every live row (and ``extra``) into one new segment, optionally with new lists."""
        deleted = {int(r[0]) for r in self._db.execute("SELECT entry_id FROM entries WHERE deleted = 1")}
        sources: list[tuple[Any, NDArray[np.int64]]] = []
        for segment in layout.segments:
            keep = ~np.isin(segment.ids, np.fromiter(deleted, dtype=np.int64)) if deleted else None
            if keep is None:
                sources.append((segment.vectors, np.asarray(segment.ids)))
            else:
                rows = np.flatnonzero(keep)
                sources.append((_RowView(segment.vectors, rows), np.asarray(segment.ids)[rows]))
        if extra is not None:
            ids, vectors = extra
            sources.append((vectors, ids))
        total = sum(int(v.shape[0]) for v, _ in sources)
        centroids, centroid_file = layout.centroids, layout.centroid_file
        if recluster:
            if total >= self.ivf_min_vectors:
                nlist = ivf.choose_nlist(total)
                sample = _sample_rows(sources, min(total, 25 * nlist), seed=0)
                centroids = ivf.spherical_kmeans(sample, nlist)
                centroid_file = f"centroids-{uuid.uuid4().hex[:16]}.npy"
                self._save_array(centroid_file, centroids)
            else:
                centroids, centroid_file = None, None
        name = self._write_segment(sources, centroids) if total else None
        self._commit(
            model=model,
            new_segments=[(name, total)] if name else [],
            dropped_segments=[s.name for s in layout.segments],
            entries=new_entries,
            entry_ids=extra[0] if extra is not None else np.zeros(0, dtype=np.int64),
            segment_for_entries=name,
            centroid_file=centroid_file,
            purge_deleted=True,
            moved_to=name,
        )

    def _commit(
        self,
        *,
        model: IndexedModel,
        new_segments: list[tuple[str, int]],
        dropped_segments: list[str],
        entries: Sequence[IndexEntry],
        entry_ids: NDArray[np.int64],
        segment_for_entries: str | None,
        centroid_file: str | None,
        purge_deleted: bool = False,
        moved_to: str | None = None,
    ) -> None:
        """Make written files live in one transaction: the single commit point of every change."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            if purge_deleted:
                self._db.execute("DELETE FROM entries WHERE deleted = 1")
            if moved_to is not None:
                self._db.execute("UPDATE entries SET segment = ?", (moved_to,))
            if dropped_segments:
                marks = ",".join("?" * len(dropped_segments))
                self._db.execute(f"DELETE FROM segments WHERE name IN ({marks})", dropped_segments)
            seq = int(self._db.execute("SELECT coalesce(max(seq), 0) FROM segments").fetchone()[0])
            for offset, (name, rows) in enumerate(new_segments, start=1):
                self._db.execute("INSERT INTO segments (name, rows, seq) VALUES (?, ?, ?)", (name, rows, seq + offset))
            if entries:
                # Re-added instances replace their older rows.
                first_new = int(entry_ids[0])
                sops = [(e.sop_instance_uid, first_new) for e in entries]
                self._db.executemany(
                    "UPDATE entries SET deleted = 1 WHERE sop_instance_uid = ? AND entry_id < ? AND deleted = 0", sops
                )
                self._db.executemany(
                    f"INSERT INTO entries (entry_id, segment, {', '.join(_ENTRY_COLUMNS)})"
                    f" VALUES (?, ?, {', '.join('?' * len(_ENTRY_COLUMNS))})",
                    (
                        (int(i), segment_for_entries, *_entry_row(e))
                        for i, e in zip(entry_ids.tolist(), entries, strict=True)
                    ),
                )
            self._set_meta("model", model.model_dump_json())
            if centroid_file:
                self._set_meta("centroids", centroid_file)
            else:
                self._db.execute("DELETE FROM meta WHERE key = 'centroids'")
            self._bump_generation()
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def _remove_orphans(self) -> None:
        """Delete files no committed state refers to (left by a crash or replaced by a rewrite)."""
        live = {MANIFEST, CATALOG, f"{CATALOG}-wal", f"{CATALOG}-shm", ".lock"}
        for (name,) in self._db.execute("SELECT name FROM segments"):
            live |= {f"{name}.vectors.npy", f"{name}.ids.npy", f"{name}.offsets.npy"}
        centroids = self._meta("centroids")
        if centroids:
            live.add(centroids)
        for path in self.path.iterdir():
            if path.is_file() and path.name not in live:
                path.unlink(missing_ok=True)

    def _write_manifest(self) -> None:
        info = self.info()
        model = self._recorded_model()
        manifest = {
            "format_version": FORMAT_VERSION,
            "note": "snapshot for people and tools; catalog.sqlite is authoritative",
            "model": model.model_dump() if model else None,
            "dim": info.dim,
            "count": info.count,
            "studies": info.studies,
            "deleted": info.deleted,
            "nlist": info.details.get("nlist"),
            "segments": info.details.get("segments"),
        }
        tmp = self.path / f".{MANIFEST}.tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path / MANIFEST)

    # --- catalogue helpers ---------------------------------------------------------------------

    def _live_count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM entries WHERE deleted = 0").fetchone()[0])

    def _recorded_model(self) -> IndexedModel | None:
        raw = self._meta("model")
        return IndexedModel.model_validate_json(raw) if raw else None

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return str(row[0]) if row else None

    def _set_meta(self, key: str, value: str) -> None:
        self._db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def _set_meta_default(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def _bump_generation(self) -> None:
        self._db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")


class _RowView:
    """Some rows of a memory-mapped matrix, read lazily (so a rewrite never loads every vector)."""

    def __init__(self, matrix: Any, rows: NDArray[np.intp]) -> None:
        self.matrix = matrix
        self.rows = rows
        self.shape = (int(rows.shape[0]), int(matrix.shape[1]))
        self.ndim = 2

    def __getitem__(self, key: Any) -> Any:
        return self.matrix[self.rows[key]]


def _take_rows(vectors: Any, rows: NDArray[np.int64]) -> Any:
    """Return ``vectors[rows]`` for arrays, memory maps and row views alike."""
    if isinstance(vectors, _RowView):
        return vectors.matrix[vectors.rows[rows]]
    return vectors[rows]


def _sample_rows(sources: list[tuple[Any, NDArray[np.int64]]], size: int, *, seed: int) -> NDArray[np.float32]:
    """Return ``size`` unit rows drawn uniformly from all sources (the k-means training set)."""
    sizes = np.array([int(v.shape[0]) for v, _ in sources])
    total = int(sizes.sum())
    picks = np.sort(np.random.default_rng(seed).choice(total, size=size, replace=False))
    starts = np.concatenate([[0], np.cumsum(sizes)])
    parts = []
    for index, (vectors, _) in enumerate(sources):
        local = picks[(picks >= starts[index]) & (picks < starts[index + 1])] - starts[index]
        if local.size:
            parts.append(ivf.unit_rows(_take_rows(vectors, local)))
    return np.concatenate(parts)


def _fsync(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _entry_row(entry: IndexEntry) -> tuple[Any, ...]:
    values = entry.model_dump()
    values["added_at"] = entry.added_at.isoformat()
    return tuple(values[column] for column in _ENTRY_COLUMNS)


def _entry_of(row: Sequence[Any]) -> IndexEntry:
    values = dict(zip(_ENTRY_COLUMNS, row, strict=True))
    values["added_at"] = datetime.fromisoformat(values["added_at"])
    return IndexEntry.model_validate(values)
