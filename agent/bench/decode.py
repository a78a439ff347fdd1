"""Decoding throughput per transfer syntax: how many images per second pixel decoding sustains.

One synthetic image (16-bit allocated, 12 bits stored; an 8-bit copy for baseline JPEG) is encoded
in every syntax :mod:`agent.sources.codec_twins` can write here, and each twin is decoded with
:func:`agent.sources.pixels.decode_frame`, the call the imaging flow makes. Syntaxes that cannot be
written here are listed in :data:`NOT_MEASURED` with the reason.
"""

from __future__ import annotations

import statistics
import time
from typing import Final

import numpy as np

from agent.sources.codec_twins import CANNOT_MAKE, SYNTAXES, grayscale_dataset, make_twin, synthetic_image
from agent.sources.pixels import decode_frame

#: Syntaxes left out of :func:`measure_decode`'s result, and why.
NOT_MEASURED: Final[dict[str, str]] = dict(CANNOT_MAKE)

#: Each timed batch runs at least this long, so that fast decoders are not timed by the clock's grain.
MIN_BATCH_SECONDS: Final = 0.05


def measure_decode(*, repeats: int = 5, size: int = 512) -> dict[str, float]:
    """Return decoded images per second per syntax short name (median of ``repeats`` timed batches).

    Args:
        repeats: timed batches per syntax; the median is reported.
        size: the image is ``size`` x ``size``.

    Returns:
        ``{short name: images/s}`` for every key of :data:`~agent.sources.codec_twins.SYNTAXES`.
    """
    if repeats < 1 or size < 1:
        raise ValueError(f"repeats and size must be >= 1, got {repeats} and {size}")
    image = synthetic_image(size, bits_stored=12)
    sources = {
        16: grayscale_dataset(image, bits_stored=12),
        8: grayscale_dataset((image >> 4).astype(np.uint8), bits_stored=8),
    }
    result: dict[str, float] = {}
    for name in SYNTAXES:
        twin = make_twin(sources[8 if name == "jpeg_baseline" else 16], name)
        start = time.perf_counter()
        decode_frame(twin)  # warm-up, and a first estimate of one decode's time
        batch = max(1, int(MIN_BATCH_SECONDS / max(time.perf_counter() - start, 1e-9)))
        rates = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(batch):
                decode_frame(twin)
            rates.append(batch / (time.perf_counter() - start))
        result[name] = statistics.median(rates)
    return result


def main() -> None:
    """Print images/s per syntax, then one JSON line (the convention of ``medagent bench``)."""
    import json

    rates = measure_decode()
    for name, rate in rates.items():
        print(f"{name:16s} {rate:10.1f} images/s")
    for name, reason in NOT_MEASURED.items():
        print(f"{name:16s} not measured: {reason}")
    print(json.dumps({"decode_images_per_s": rates, "not_measured": NOT_MEASURED}))


if __name__ == "__main__":
    main()
