"""Named pixel presets: how each kind of image is turned into the model's 8-bit RGB input.

Sits inside pixel preparation (:mod:`agent.sources.pixels` for one instance,
:mod:`agent.sources.volumes` for a CT/MR series). The modality picks a preset unless the caller
names one, and the preset's name is the first step recorded in the trace, so a reader can tell
why a CT slice came out as three packed windows while a chest X-ray came out gray.

The value maps here (:func:`pack_hu_windows`, :func:`minmax_to_uint8`) are pure numpy so they can
be checked against hand-computed bytes. The CT windows follow Google's MedGemma CT recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np
from numpy.typing import NDArray

ByteArray = NDArray[np.uint8]

#: How grayscale values become 0..255: the DICOM VOI window, three packed HU windows, or the
#: value range (of the slice, or of the whole volume for a series).
GrayMapping = Literal["voi", "hu_windows", "minmax"]


@dataclass(frozen=True)
class PixelPreset:
    """One way of preparing pixels, named so the trace can say which was used."""

    name: str
    description: str
    gray: GrayMapping
    #: MONOCHROME1 is displayed inverted; packed HU windows are an encoding of values, not a display.
    invert_monochrome1: bool = True


#: CT windows packed into R, G and B (lower, upper HU): wide, soft tissue, brain.
CT_WINDOWS: Final[tuple[tuple[float, float], ...]] = ((-1024.0, 1024.0), (-135.0, 215.0), (0.0, 80.0))

CXR: Final = "cxr"
CT: Final = "ct"
MR: Final = "mr"
COLOR: Final = "color"
DEFAULT: Final = "default"

PRESETS: Final[dict[str, PixelPreset]] = {
    CXR: PixelPreset(CXR, "projection radiograph: VOI window, MONOCHROME1 inverted, padded to square", "voi"),
    CT: PixelPreset(
        CT,
        "CT: Hounsfield units, windows -1024..1024 / -135..215 / 0..80 packed into R / G / B",
        "hu_windows",
        invert_monochrome1=False,
    ),
    MR: PixelPreset(MR, "MR: min-max over the volume (the slice, for one instance)", "minmax"),
    COLOR: PixelPreset(COLOR, "photograph or slide: kept in colour (RGB / YBR / palette), padded", "voi"),
    DEFAULT: PixelPreset(DEFAULT, "DICOM grayscale pipeline: modality LUT, VOI window, MONOCHROME1", "voi"),
}

#: Modality codes (PS3.3 C.7.3.1.1.1) per preset; anything else gets the default.
MODALITY_PRESETS: Final[dict[str, str]] = {
    "CR": CXR,
    "DX": CXR,
    "CT": CT,
    "MR": MR,
    "XC": COLOR,  # external-camera photography (dermatology)
    "GM": COLOR,  # general microscopy
    "SM": COLOR,  # slide microscopy (pathology)
    "OP": COLOR,  # ophthalmic photography (fundus)
    "ES": COLOR,  # endoscopy
}


def preset_for_modality(modality: str | None) -> str:
    """Return the preset name for a DICOM modality code; ``"default"`` when unknown or missing."""
    return MODALITY_PRESETS.get(str(modality or "").strip().upper(), DEFAULT)


def window_to_uint8(values: NDArray[Any], lower: float, upper: float) -> ByteArray:
    """Map ``lower..upper`` linearly onto 0..255, clipping outside values and rounding to nearest.

    Raises:
        ValueError: when ``upper <= lower``.
    """
    if upper <= lower:
        raise ValueError(f"window upper edge {upper} must exceed lower edge {lower}")
    # Multiplied before dividing, so that exact halves (127.5) stay exact and round to even.
    y = (values.astype(np.float64) - lower) * 255.0 / (upper - lower)
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def pack_hu_windows(hu: NDArray[Any], windows: tuple[tuple[float, float], ...] = CT_WINDOWS) -> ByteArray:
    """Pack three HU windows of one (rows, cols) slice into the R, G and B channels.

    Args:
        hu: Hounsfield units (after RescaleSlope/Intercept).
        windows: three (lower, upper) pairs, one per channel.

    Returns:
        uint8 array of shape (rows, cols, 3).
    """
    if len(windows) != 3:
        raise ValueError(f"need three windows for R, G and B, got {len(windows)}")
    return np.stack([window_to_uint8(hu, lo, hi) for lo, hi in windows], axis=-1)


def minmax_to_uint8(values: NDArray[Any], lower: float, upper: float) -> ByteArray:
    """Map ``lower..upper`` (a volume's or slice's range) onto 0..255; a flat range gives all zeros."""
    if upper <= lower:
        return np.zeros(values.shape, dtype=np.uint8)
    return window_to_uint8(values, lower, upper)
