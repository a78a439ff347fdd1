"""``medagent bench retrieval``: similar-case search speed and recall, measured on clustered vectors.

Real image embeddings are not uniform on the sphere: they sit in a narrow cone (a shared
direction) and gather in clusters of very different sizes (one per anatomy, view, device,
finding...). Uniform random vectors would make every IVF list equally likely and every neighbour
equally far, which is neither how embeddings look nor how an index behaves on them. So the
vectors here are a mixture of a few thousand Gaussian clusters around centres that share a common
component, with uneven cluster sizes and spreads, normalised to unit length. Queries are held-out
points of the same mixture (noisy points of the same clusters, never in the index).

Reported per backend: p50 / p99 latency of a top-10 study search, recall@10 against exact
search over the same stored vectors, bytes per vector (everything the index keeps, divided by
the vector count) and build time. The last line printed is one JSON object.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from agent.retrieval.entries import IndexedModel, IndexEntry, StudyHit
from agent.retrieval.ivf import unit_rows

#: Rows generated per chunk: bounds the float32 scratch to chunk x dim.
GEN_CHUNK = 32_768
#: Weight of the shared direction in every cluster centre (the embedding "cone").
CONE_WEIGHT = 0.6
BENCH_MODEL = IndexedModel(model_id="bench: clustered synthetic vectors", revision=None, test_model=True, dim=1152)


def clustered_unit_vectors(
    n: int, dim: int, clusters: int, seed: int, *, dtype: type[np.floating[Any]] = np.float32
) -> NDArray[Any]:
    """Return ``n`` unit vectors drawn from a mixture of ``clusters`` Gaussian clusters.

    Centres are ``normalise(CONE_WEIGHT * shared + (1 - CONE_WEIGHT) * own)``; cluster weights
    follow a log-normal (a few big clusters, many small ones); each cluster has its own spread,
    so a point's cosine to its centre ranges from about 0.7 to 0.9. Generated in chunks, so
    the only large allocation is the output (``dtype`` float16 halves it).

    Args:
        n: number of vectors.
        dim: dimension (1152 for MedSigLIP).
        clusters: number of mixture components.
        seed: the same seed gives the same vectors; a longer ``n`` with the same seed extends
            the same sequence chunk by chunk only when chunk boundaries agree, so hold out
            queries by generating ``n + queries`` rows and splitting, as the benchmark does.
        dtype: output float type.
    """
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal(dim).astype(np.float32)
    shared /= np.linalg.norm(shared)
    own = rng.standard_normal((clusters, dim)).astype(np.float32)
    own /= np.linalg.norm(own, axis=1, keepdims=True)
    centres = CONE_WEIGHT * shared + (1.0 - CONE_WEIGHT) * own
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = rng.lognormal(0.0, 1.0, clusters)
    weights /= weights.sum()
    # Noise norm relative to the unit centre: cos(point, centre) = 1 / sqrt(1 + spread^2).
    spreads = rng.uniform(0.5, 1.0, clusters).astype(np.float32)
    out = np.empty((n, dim), dtype=dtype)
    for start in range(0, n, GEN_CHUNK):
        rows = min(GEN_CHUNK, n - start)
        members = rng.choice(clusters, size=rows, p=weights)
        noise = rng.standard_normal((rows, dim), dtype=np.float32)
        noise *= (spreads[members] / np.sqrt(dim))[:, None]
        block = centres[members] + noise
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start : start + rows] = block
    return out


def exact_top_k(data: NDArray[Any], queries: NDArray[np.float32], k: int, chunk: int = 65_536) -> NDArray[np.int64]:
    """Return the row indices of each query's ``k`` most similar rows (brute force, chunked)."""
    best_scores = np.full((queries.shape[0], k), -np.inf, dtype=np.float32)
    best_ids = np.zeros((queries.shape[0], k), dtype=np.int64)
    for start in range(0, data.shape[0], chunk):
        # Normalised exactly as the index stores rows, so exact search is the same computation.
        block = unit_rows(data[start : start + chunk])
        scores = queries @ block.T
        top = np.argpartition(-scores, min(k, scores.shape[1] - 1), axis=1)[:, :k]
        merged_scores = np.concatenate([best_scores, np.take_along_axis(scores, top, axis=1)], axis=1)
        merged_ids = np.concatenate([best_ids, top + start], axis=1)
        keep = np.argsort(-merged_scores, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(merged_scores, keep, axis=1)
        best_ids = np.take_along_axis(merged_ids, keep, axis=1)
    return best_ids


def recall_at_k(found: list[list[int]], truth: NDArray[np.int64], k: int = 10) -> float:
    """Return the mean fraction of each query's true top ``k`` that the search found."""
    if not found:
        return 0.0
    hits = [len(set(row[:k]) & {int(t) for t in truth[i][:k]}) / k for i, row in enumerate(found)]
    return float(np.mean(hits))


def bench_entries(n: int) -> list[IndexEntry]:
    """Return one synthetic entry per vector, each its own study (so study top-k = image top-k)."""
    now = datetime.now(UTC)
    return [
        IndexEntry(
            study_uid=f"2.25.{i}",
            series_uid=f"2.25.{i}.1",
            sop_instance_uid=f"2.25.{i}.1.1",
            modality="DX",
            source="bench",
            added_at=now,
        )
        for i in range(n)
    ]


def _row_of(hit: StudyHit) -> int:
    return int(hit.study_uid.rsplit(".", 1)[1])


def _timed_queries(
    search: Callable[[NDArray[np.float32]], list[StudyHit]], queries: NDArray[np.float32]
) -> tuple[list[list[int]], list[float]]:
    search(queries[0])  # warm caches and memory maps
    found: list[list[int]] = []
    times: list[float] = []
    for query in queries:
        started = time.perf_counter()
        hits = search(query)
        times.append((time.perf_counter() - started) * 1000.0)
        found.append([_row_of(hit) for hit in hits])
    return found, times


def _dataset(
    n_vectors: int, dim: int, n_queries: int, seed: int, clusters: int | None
) -> tuple[NDArray[Any], NDArray[np.float32]]:
    groups = clusters or max(8, min(4000, n_vectors // 250))
    everything = clustered_unit_vectors(n_vectors + n_queries, dim, groups, seed, dtype=np.float16)
    queries = np.asarray(everything[n_vectors:], dtype=np.float32)
    return everything[:n_vectors], queries


def _summary(times: list[float], found: list[list[int]], truth: NDArray[np.int64], **extra: Any) -> dict[str, Any]:
    return {
        "p50_ms": float(np.percentile(times, 50)),
        "p99_ms": float(np.percentile(times, 99)),
        "recall_at_10": recall_at_k(found, truth, 10),
        **extra,
    }


def measure_file_index(
    n_vectors: int = 1_000_000,
    dim: int = 1152,
    n_queries: int = 200,
    seed: int = 0,
    *,
    clusters: int | None = None,
    nprobe: int | None = None,
    ivf_min_vectors: int | None = None,
    workdir: Path | None = None,
) -> dict[str, Any]:
    """Build the embedded index over clustered vectors and measure top-10 search.

    Args:
        n_vectors: vectors indexed.
        dim: their dimension.
        n_queries: held-out queries timed one by one.
        seed: data seed.
        clusters: mixture components (default: about one per 250 vectors, at most 4,000).
        nprobe: lists probed per query (default: the index's own choice).
        ivf_min_vectors: IVF threshold (default: the index's; lower it to test IVF on small n).
        workdir: where the index folder goes (default: a temporary folder, removed after).
    """
    from agent.retrieval.file_index import IVF_MIN_VECTORS, FileIndex

    data, queries = _dataset(n_vectors, dim, n_queries, seed, clusters)
    truth = exact_top_k(data, queries, 10)
    model = BENCH_MODEL.model_copy(update={"dim": dim})
    with _folder(workdir) as folder:
        entries = bench_entries(n_vectors)
        started = time.perf_counter()
        index = FileIndex(
            folder / "index", create=True, ivf_min_vectors=ivf_min_vectors or IVF_MIN_VECTORS, nprobe=nprobe
        )
        index.add(entries, data, model)
        build_s = time.perf_counter() - started
        del entries
        index.warm()  # measured as a running service sees it: vectors in memory, not on disk
        found, times = _timed_queries(lambda q: index.search(q, 10), queries)
        info = index.info()
        result = _summary(
            times,
            found,
            truth,
            bytes_per_vector=index.disk_bytes() / n_vectors,
            build_s=build_s,
            n_vectors=n_vectors,
            backend="file",
            search=info.details.get("search"),
            nlist=info.details.get("nlist"),
            nprobe=info.details.get("nprobe"),
        )
        index.close()
    return result


def measure_pgvector(
    n_vectors: int = 100_000,
    dim: int = 1152,
    n_queries: int = 200,
    seed: int = 0,
    *,
    clusters: int | None = None,
    url: str | None = None,
    ef_search: int | None = None,
    method: Literal["hnsw", "ivfflat"] = "hnsw",
) -> dict[str, Any]:
    """Load clustered vectors into pgvector (HNSW, cosine) and measure top-10 search.

    Starts its own scratch PostgreSQL with pgvector (:mod:`agent.retrieval.scratch_pgvector`)
    unless ``url`` points at one.
    """
    from agent.retrieval.pgvector_index import PgVectorIndex
    from agent.retrieval.scratch_pgvector import scratch_pgvector

    data, queries = _dataset(n_vectors, dim, n_queries, seed, clusters)
    truth = exact_top_k(data, queries, 10)
    model = BENCH_MODEL.model_copy(update={"dim": dim})

    def run(database_url: str) -> dict[str, Any]:
        index = PgVectorIndex(database_url, table="bench_image_index", create=True, ef_search=ef_search, method=method)
        try:
            index.drop()  # a left-over table from an interrupted run
            entries = bench_entries(n_vectors)
            started = time.perf_counter()
            index.add(entries, data, model)
            build_s = time.perf_counter() - started
            found, times = _timed_queries(lambda q: index.search(q, 10), queries)
            return _summary(
                times,
                found,
                truth,
                bytes_per_vector=index.table_bytes() / n_vectors,
                build_s=build_s,
                n_vectors=n_vectors,
                backend="pgvector",
                search=index.method,
            )
        finally:
            index.drop()
            index.close()

    if url:
        return run(url)
    with scratch_pgvector() as server:
        return run(server.url)


def run_benchmark(
    *, n_file: int = 1_000_000, n_pg: int = 100_000, n_queries: int = 200, echo: Callable[[str], None] = print
) -> dict[str, Any]:
    """Measure both backends, print one line each, then the JSON of both as the last line."""
    results: dict[str, Any] = {}
    if n_file:
        results["file"] = measure_file_index(n_file, n_queries=n_queries)
        echo(_line("file", results["file"]))
    if n_pg:
        results["pgvector"] = measure_pgvector(n_pg, n_queries=n_queries)
        echo(_line("pgvector", results["pgvector"]))
    echo(json.dumps(results))
    return results


def _line(name: str, r: dict[str, Any]) -> str:
    return (
        f"{name}: n={r['n_vectors']:,} p50={r['p50_ms']:.2f} ms p99={r['p99_ms']:.2f} ms "
        f"recall@10={r['recall_at_10']:.3f} bytes/vector={r['bytes_per_vector']:.0f} build={r['build_s']:.1f} s"
    )


@contextmanager
def _folder(workdir: Path | None) -> Iterator[Path]:
    """Yield ``workdir``, or a temporary folder removed afterwards."""
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir
        return
    with tempfile.TemporaryDirectory(prefix="medagent-bench-retrieval-") as tmp:
        yield Path(tmp)
