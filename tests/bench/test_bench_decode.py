"""The decode benchmark: every syntax it can write is measured, the rest are named with a reason."""

from __future__ import annotations

import pytest

from agent.bench.decode import NOT_MEASURED, measure_decode


def test_measure_decode_reports_every_writable_syntax() -> None:
    rates = measure_decode(repeats=1, size=32)
    assert set(rates) == {
        "explicit_le",
        "implicit_le",
        "big_endian",
        "deflate",
        "rle",
        "jpeg_baseline",
        "jpeg_lossless",
        "jpegls_lossless",
        "jpegls_near",
        "j2k_lossless",
        "j2k_lossy",
    }
    assert all(rate > 0 for rate in rates.values())
    assert set(NOT_MEASURED) == {"jpeg_extended", "htj2k"}
    assert all(NOT_MEASURED.values())


def test_measure_decode_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="repeats"):
        measure_decode(repeats=0)
