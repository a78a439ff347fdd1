"""``medagent bench imaging``: the image path, the decoders and similar-case search, in one run.

Three measurements, each a comparison or a distribution rather than a bare timing (these machines
are noisy):

- MedSigLIP image path (parse + decode + prepare + embed) vs the bare vision forward on ready
  tensors, with a real-size random-weight MedSigLIP (:mod:`agent.bench.siglip_path`);
- decoded images per second for every transfer syntax the project can encode here
  (:func:`agent.bench.decode.measure_decode`);
- similar-case search: the embedded index at 1,000,000 x 1152 clustered unit vectors and pgvector
  at 100,000 (:mod:`agent.bench.retrieval`): p50/p99 top-10 latency, recall@10 against exact
  search, memory per vector, build time.

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

Echo = Callable[[str], None]


def run_benchmark(
    *,
    images: int = 4,
    repeats: int = 3,
    vectors: int = 1_000_000,
    pg_vectors: int = 100_000,
    queries: int = 200,
    echo: Echo = print,
) -> dict[str, Any]:
    """Run the three measurements, print a line per figure and a closing JSON line, return the figures.

    Args:
        images: DICOM images per timed side of the MedSigLIP comparison.
        repeats: interleaved timed repeats of the MedSigLIP comparison and of each decoder.
        vectors: size of the embedded index (0 skips it).
        pg_vectors: size of the pgvector table (0 skips it).
        queries: top-10 queries timed per index.
        echo: where each line goes.
    """
    from agent.bench.decode import measure_decode
    from agent.bench.retrieval import measure_file_index, measure_pgvector
    from agent.bench.siglip_path import measure_siglip_path, real_size_medsiglip
    from agent.inference.tiny_models import ensure_test_models

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="medagent-bench-imaging-") as tmp:
        processor_dir, _ = ensure_test_models(Path(tmp) / "models")
        echo("building a real-size random-weight MedSigLIP (medsiglip-448 configuration) ...")
        model = real_size_medsiglip(processor_dir)
        timing = measure_siglip_path(model, images=images, repeats=repeats, echo=echo)
        del model
    results.update(
        {
            "siglip_path_efficiency": round(timing.efficiency, 3),
            "siglip_path_images_per_s": round(timing.path_images_per_s, 3),
            "siglip_bare_images_per_s": round(timing.bare_images_per_s, 3),
            "siglip_dtype": timing.dtype,
            "siglip_images": timing.images,
        }
    )
    echo(
        f"MedSigLIP image path (parse + decode + prepare + embed, {timing.dtype}): "
        f"{timing.path_images_per_s:.3f} images/s vs bare forward {timing.bare_images_per_s:.3f} images/s "
        f"-> {timing.efficiency:.1%} of bare (target >= 90%); medians of {timing.repeats}, {timing.images} images"
    )

    decode = measure_decode(repeats=max(repeats, 3))
    results["decode_images_per_s"] = {name: round(rate, 1) for name, rate in decode.items()}
    echo("decoding, 512x512 12-bit (8-bit for baseline JPEG), images/s (median):")
    for name, rate in sorted(decode.items(), key=lambda item: -item[1]):
        echo(f"  {name:<16} {rate:10.1f}")

    if vectors:
        echo(f"embedded index: {vectors:,} clustered unit vectors x 1152 ...")
        file_index = measure_file_index(n_vectors=vectors, n_queries=queries)
        results.update(
            {
                "retrieval_vectors": file_index["n_vectors"],
                "retrieval_p50_ms": round(file_index["p50_ms"], 3),
                "retrieval_p99_ms": round(file_index["p99_ms"], 3),
                "retrieval_recall_at_10": round(file_index["recall_at_10"], 4),
                "retrieval_bytes_per_vector": round(file_index["bytes_per_vector"], 1),
                "retrieval_build_s": round(file_index["build_s"], 1),
            }
        )
        echo(
            f"  top-10 p50 {file_index['p50_ms']:.2f} ms (target < 10), p99 {file_index['p99_ms']:.2f} ms, "
            f"recall@10 {file_index['recall_at_10']:.3f} vs exact (target >= 0.95), "
            f"{file_index['bytes_per_vector']:.0f} bytes/vector, build {file_index['build_s']:.1f} s"
        )
    if pg_vectors:
        echo(f"pgvector: {pg_vectors:,} clustered unit vectors x 1152 ...")
        pg = measure_pgvector(n_vectors=pg_vectors, n_queries=queries)
        results.update(
            {
                "pgvector_vectors": pg["n_vectors"],
                "pgvector_p50_ms": round(pg["p50_ms"], 3),
                "pgvector_p99_ms": round(pg["p99_ms"], 3),
                "pgvector_recall_at_10": round(pg["recall_at_10"], 4),
                "pgvector_build_s": round(pg["build_s"], 1),
            }
        )
        echo(
            f"  top-10 p50 {pg['p50_ms']:.2f} ms, p99 {pg['p99_ms']:.2f} ms, recall@10 {pg['recall_at_10']:.3f}, "
            f"build {pg['build_s']:.1f} s"
        )
    echo(json.dumps(results, sort_keys=True))
    return results
