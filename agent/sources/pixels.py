"""Pixel preparation: turn one DICOM instance into the square 8-bit RGB picture the models take.

Sits between the imaging sources (DICOMweb or a folder, which hand over a ``pydicom.Dataset``)
and the image models (MedSigLIP, MedGemma). It follows the DICOM grayscale pipeline (PS3.3 C.11):
stored values -> modality LUT (rescale) -> VOI (window) -> 8-bit -> MONOCHROME1 inversion; colour
images are converted to RGB; everything is padded, never stretched, to a square, as Google's
serving code does for these models.

Every step taken and every default applied because a tag was missing lands in the returned
:class:`~agent.domain.imaging.PreparedImage`, so the trace shows exactly how the model's input was
made. The array helpers (:func:`rescale`, :func:`window`, :func:`invert`, :func:`pad_to_square`,
...) are pure and small so they can be checked against hand-computed values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, convert_color_space, get_decoder
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
)

from agent.domain.imaging import PreparedImage
from agent.domain.refs import InstanceRef
from agent.errors import ConfigError, DicomDecodeError
from agent.sources.pixel_presets import (
    COLOR,
    CT_WINDOWS,
    PRESETS,
    PixelPreset,
    minmax_to_uint8,
    pack_hu_windows,
    preset_for_modality,
)

# Photometric interpretations (PS3.3 C.7.6.3.1.2).
MONOCHROME1: Final = "MONOCHROME1"
MONOCHROME2: Final = "MONOCHROME2"
RGB: Final = "RGB"
PALETTE_COLOR: Final = "PALETTE COLOR"
YBR_FULL: Final = "YBR_FULL"
YBR_FULL_422: Final = "YBR_FULL_422"
YBR_RCT: Final = "YBR_RCT"
YBR_ICT: Final = "YBR_ICT"
GRAYSCALE: Final = frozenset({MONOCHROME1, MONOCHROME2})
#: Converted to RGB here with pydicom's convert_color_space.
YBR_CONVERTIBLE: Final = frozenset({YBR_FULL, YBR_FULL_422})
#: JPEG 2000 component transforms: the codec undoes them while decoding, so the output is RGB.
YBR_J2K: Final = frozenset({YBR_RCT, YBR_ICT})

# VOI LUT functions (PS3.3 C.11.2.1.3).
VOI_LINEAR: Final = "LINEAR"
VOI_LINEAR_EXACT: Final = "LINEAR_EXACT"
VOI_SIGMOID: Final = "SIGMOID"

PIXEL_KEYWORDS: Final = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

#: Syntaxes whose every frame is one codestream ending in the 0xFFD9 marker (JPEG EOI, JPEG 2000
#: EOC). The JPEG and JPEG-LS decoders return a half-grey picture for a cut-off stream instead of
#: failing, so the end marker is checked before decoding.
MARKER_TERMINATED: Final = frozenset(
    {
        JPEGBaseline8Bit,
        JPEGExtended12Bit,
        JPEGLossless,
        JPEGLosslessSV1,
        JPEGLSLossless,
        JPEGLSNearLossless,
        JPEG2000Lossless,
        JPEG2000,
        HTJ2KLossless,
        HTJ2KLosslessRPCL,
        HTJ2K,
    }
)
END_MARKER: Final = b"\xff\xd9"

#: Pixel spacing differing by more than this fraction between rows and columns is resampled.
ASPECT_TOLERANCE: Final = 0.01

FloatArray = NDArray[np.float64]
ByteArray = NDArray[np.uint8]


# --- pure helpers ------------------------------------------------------------------------------


def rescale(stored: NDArray[Any], slope: float, intercept: float) -> FloatArray:
    """Apply the linear modality transform ``slope * stored + intercept``.

    Args:
        stored: stored pixel values (any numeric dtype).
        slope: RescaleSlope.
        intercept: RescaleIntercept.

    Returns:
        The modality values (Hounsfield units for CT) as float64; computed in float so that
        unsigned stored values with a negative intercept cannot wrap around.
    """
    return stored.astype(np.float64) * float(slope) + float(intercept)


def default_window(values: NDArray[Any]) -> tuple[float, float]:
    """Return a (center, width) that maps the image's minimum to 0 and its maximum to 255.

    Chosen for the DICOM LINEAR formula: with ``width = max - min + 1`` and
    ``center = (min + max + 1) / 2`` the lower edge is exactly ``min`` and the upper edge ``max``.
    """
    lo = float(np.min(values))
    hi = float(np.max(values))
    width = hi - lo + 1.0
    return (lo + hi + 1.0) / 2.0, width


def window(values: NDArray[Any], center: float, width: float, function: str = VOI_LINEAR) -> ByteArray:
    """Map values through a VOI window onto 0..255.

    Args:
        values: modality values.
        center: WindowCenter.
        width: WindowWidth (> 0; >= 1 for LINEAR).
        function: VOILUTFunction: LINEAR (the default, PS3.3 C.11.2.1.2.1), LINEAR_EXACT or SIGMOID.

    Returns:
        uint8 array of the same shape, rounded to nearest.

    Raises:
        ValueError: on a non-positive width or an unknown function.
    """
    if width <= 0:
        raise ValueError(f"window width must be > 0, got {width}")
    x = values.astype(np.float64)
    if function == VOI_LINEAR:
        if width < 1:
            raise ValueError(f"LINEAR window width must be >= 1, got {width}")
        lower = center - 0.5 - (width - 1) / 2
        upper = center - 0.5 + (width - 1) / 2
        # Width 1 is a threshold: the formula's ramp is empty, and dividing by zero is avoided.
        span = max(width - 1, 1e-12)
        ramp = ((x - (center - 0.5)) / span + 0.5) * 255.0
        y = np.where(x <= lower, 0.0, np.where(x > upper, 255.0, ramp))
    elif function == VOI_LINEAR_EXACT:
        lower = center - width / 2
        upper = center + width / 2
        ramp = ((x - center) / width + 0.5) * 255.0
        y = np.where(x <= lower, 0.0, np.where(x > upper, 255.0, ramp))
    elif function == VOI_SIGMOID:
        # Clip the exponent so far-out values saturate instead of overflowing (a warning is an error).
        y = 255.0 / (1.0 + np.exp(np.clip(-4.0 * (x - center) / width, -700.0, 700.0)))
    else:
        raise ValueError(f"unknown VOI LUT function {function!r}")
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def apply_lut(values: NDArray[Any], first_mapped: int, lut: NDArray[Any]) -> FloatArray:
    """Look values up in a LUT whose first entry maps ``first_mapped``; outside values clamp to the ends."""
    index = np.clip(np.rint(values.astype(np.float64)) - first_mapped, 0, len(lut) - 1).astype(np.intp)
    return np.asarray(lut, dtype=np.float64)[index]


def invert(pixels: ByteArray) -> ByteArray:
    """Return ``255 - pixels``: MONOCHROME1 shows low values bright."""
    return (255 - pixels.astype(np.int16)).astype(np.uint8)


def scale_to_uint8(values: NDArray[Any], max_value: float) -> ByteArray:
    """Linearly map ``0..max_value`` onto ``0..255`` (for colour samples wider than 8 bits)."""
    if max_value <= 0:
        raise ValueError(f"max_value must be > 0, got {max_value}")
    y = values.astype(np.float64) * (255.0 / max_value)
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def gray_to_rgb(pixels: ByteArray) -> ByteArray:
    """Copy a (rows, cols) image into three identical channels, as the models' serving code does."""
    return np.repeat(pixels[:, :, np.newaxis], 3, axis=2)


def pad_to_square(pixels: ByteArray) -> ByteArray:
    """Pad a (rows, cols[, channels]) image with black to a centered square; never resize.

    When the difference is odd the extra row or column goes to the bottom or right.
    """
    rows, cols = pixels.shape[:2]
    size = max(rows, cols)
    top = (size - rows) // 2
    left = (size - cols) // 2
    out = np.zeros((size, size, *pixels.shape[2:]), dtype=pixels.dtype)
    out[top : top + rows, left : left + cols, ...] = pixels
    return out


# --- decoding ----------------------------------------------------------------------------------


@dataclass
class DecodedFrame:
    """One decoded frame, before any value transform, plus what decoding did."""

    pixels: NDArray[Any]
    photometric: str
    frame_index: int
    number_of_frames: int
    transfer_syntax: UID
    bits_stored: int
    steps: list[str] = field(default_factory=list)
    defaults: list[str] = field(default_factory=list)


def _describe(ts: UID) -> str:
    """Return ``UID (name)`` for error messages."""
    return f"{ts} ({ts.name})" if ts.name != str(ts) else f"{ts} (unknown transfer syntax)"


def _transfer_syntax(ds: Dataset, defaults: list[str]) -> UID:
    """Return the transfer syntax of the pixel data, inferring it when the file meta lacks it."""
    file_meta = getattr(ds, "file_meta", None)
    ts = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if ts:
        return UID(str(ts))
    # A dataset read without file meta still knows how it was encoded; native pixels only.
    implicit, little = ds.original_encoding
    if implicit is not None and little is not None:
        inferred = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    else:
        inferred = ExplicitVRLittleEndian
    defaults.append(f"transfer syntax missing: assumed {inferred.name}")
    return inferred


def _int_tag(ds: Dataset, keyword: str) -> int | None:
    """Return an integer tag's value, or None when absent, empty or malformed."""
    value = ds.get(keyword)
    try:
        return int(value) if value is not None and value != "" else None
    except (TypeError, ValueError):
        return None


def _stream_end_problem(ds: Dataset, index: int, frames: int) -> str | None:
    """Return why an encapsulated frame looks cut off, or None when it ends with its end marker."""
    offsets = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        offsets = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    try:
        data = get_frame(ds.PixelData, index, extended_offsets=offsets, number_of_frames=frames)
    except Exception as exc:
        return f"frame {index + 1} cannot be read from the encapsulated pixel data: {type(exc).__name__}: {exc}"
    # Fragments are padded to an even length, with 0x00 or (some encoders) a 0xFF fill byte.
    if not bytes(data).rstrip(b"\x00\xff").endswith(END_MARKER):
        return f"frame {index + 1}'s compressed stream has no end marker (truncated or corrupt)"
    return None


def decode_frame(ds: Dataset, sop_instance_uid: str | None = None, *, frame_index: int | None = None) -> DecodedFrame:
    """Decode one frame (by default the middle one) of an instance's pixel data, checking decodability first.

    Args:
        ds: the instance, with pixel data.
        sop_instance_uid: named in errors; defaults to the dataset's SOPInstanceUID.
        frame_index: 0-based frame to decode; None takes the middle frame (for an even count the
            later of the two middle ones), the one most likely to show the anatomy.

    Returns:
        The stored values of one frame (no rescale, no window) and its photometric
        interpretation as produced by the decoder (a JPEG 2000 YBR_RCT image comes out RGB).

    Raises:
        DicomDecodeError: no pixel data, image tags missing, a transfer syntax pydicom cannot
            decode with the installed plugins, or the decoder failed; the message names the
            transfer syntax (UID and name) and the SOP instance UID.
    """
    sop = sop_instance_uid or str(ds.get("SOPInstanceUID", "unknown"))
    defaults: list[str] = []
    steps: list[str] = []
    ts = _transfer_syntax(ds, defaults)
    details = {"transfer_syntax": str(ts), "transfer_syntax_name": ts.name, "sop_instance_uid": sop}

    def fail(reason: str) -> DicomDecodeError:
        return DicomDecodeError(
            f"cannot decode pixels of SOP instance {sop} (transfer syntax {_describe(ts)}): {reason}",
            details=details,
        )

    if not any(keyword in ds for keyword in PIXEL_KEYWORDS):
        raise fail("the instance has no PixelData")
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise fail("pydicom has no pixel decoder for this transfer syntax") from None
    if not decoder.is_available:
        hint = "; ".join(decoder.missing_dependencies) or "no plugin"
        raise fail(f"no installed decoder plugin handles it (install one of: {hint})")
    for keyword in ("Rows", "Columns", "BitsAllocated"):
        if _int_tag(ds, keyword) is None:
            raise fail(f"required tag {keyword} is missing")

    # Missing or contradictory pixel-description tags are overridden rather than fatal: the
    # picture is still worth showing, and the override is recorded.
    overrides: dict[str, Any] = {}
    bits_allocated = _int_tag(ds, "BitsAllocated") or 0
    samples = _int_tag(ds, "SamplesPerPixel")
    if samples is None:
        samples = 1
        overrides["samples_per_pixel"] = 1
        defaults.append("SamplesPerPixel missing: assumed 1")
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if not photometric:
        photometric = MONOCHROME2 if samples == 1 else RGB
        overrides["photometric_interpretation"] = photometric
        defaults.append(f"PhotometricInterpretation missing: assumed {photometric}")
    bits_stored = _int_tag(ds, "BitsStored")
    if "PixelData" in ds and (bits_stored is None or not 1 <= bits_stored <= bits_allocated):
        defaults.append(f"BitsStored {bits_stored} invalid for BitsAllocated {bits_allocated}: used {bits_allocated}")
        bits_stored = bits_allocated
        overrides["bits_stored"] = bits_allocated
    if "PixelData" in ds and _int_tag(ds, "PixelRepresentation") is None:
        overrides["pixel_representation"] = 0
        defaults.append("PixelRepresentation missing: assumed unsigned")
    if samples > 1 and _int_tag(ds, "PlanarConfiguration") is None:
        overrides["planar_configuration"] = 0
        defaults.append("PlanarConfiguration missing: assumed 0 (interleaved)")

    frames = _int_tag(ds, "NumberOfFrames") or 1
    index = frames // 2 if frame_index is None else frame_index
    if not 0 <= index < frames:
        raise fail(f"frame index {index} is outside the instance's {frames} frame(s)")
    if ts in MARKER_TERMINATED and "PixelData" in ds:
        problem = _stream_end_problem(ds, index, frames)
        if problem is not None:
            raise fail(problem)
    try:
        # as_rgb=False: YBR is converted below, where the step is recorded.
        options: dict[str, Any] = {"as_rgb": False, **overrides}
        pixels, props = decoder.as_array(ds, index=index, **options)
    except Exception as exc:
        raise fail(f"decoder failed: {type(exc).__name__}: {exc}") from exc
    steps.append(f"decode {ts.name}")
    if frames > 1:
        steps.append(f"frame {index + 1} of {frames}" + (" (middle)" if frame_index is None else ""))
    return DecodedFrame(
        pixels=pixels,
        photometric=str(props.get("photometric_interpretation", photometric)),
        frame_index=index,
        number_of_frames=frames,
        transfer_syntax=ts,
        bits_stored=int(bits_stored or bits_allocated),
        steps=steps,
        defaults=defaults,
    )


# --- value transforms --------------------------------------------------------------------------


def _frame_item(ds: Dataset, frame_index: int, sequence: str) -> Dataset | None:
    """Return the first item of a functional-group macro for a frame (enhanced multi-frame IODs)."""
    for groups, idx in (
        ("PerFrameFunctionalGroupsSequence", frame_index),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        items = ds.get(groups)
        if items and len(items) > idx:
            inner = items[idx].get(sequence)
            if inner:
                item: Dataset = inner[0]
                return item
    return None


def _first_float(value: Any) -> float | None:
    """Return the first number of a possibly multi-valued DS/IS element, or None."""
    if value is None or value == "":
        return None
    if isinstance(value, MultiValue | list | tuple):
        if len(value) == 0:
            return None
        value = value[0]
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def modality_values(ds: Dataset, frame: DecodedFrame) -> FloatArray:
    """Apply the modality LUT (RescaleSlope/Intercept, or a Modality LUT Sequence) to a grayscale frame.

    Appends what it did to ``frame.steps`` and any default to ``frame.defaults``.

    Returns:
        float64 modality values (Hounsfield units for CT).
    """
    if "ModalityLUTSequence" in ds:
        frame.steps.append("modality LUT (sequence)")
        return np.asarray(apply_modality_lut(frame.pixels, ds), dtype=np.float64)
    source = ds
    if "RescaleSlope" not in ds and "RescaleIntercept" not in ds:
        source = _frame_item(ds, frame.frame_index, "PixelValueTransformationSequence") or ds
    slope = _first_float(source.get("RescaleSlope"))
    intercept = _first_float(source.get("RescaleIntercept"))
    if slope is None or slope == 0:
        frame.defaults.append("RescaleSlope missing: used 1")
        slope = 1.0
    if intercept is None:
        frame.defaults.append("RescaleIntercept missing: used 0")
        intercept = 0.0
    frame.steps.append(f"rescale slope={slope:g} intercept={intercept:g}")
    return rescale(frame.pixels, slope, intercept)


def _voi_to_uint8(ds: Dataset, values: FloatArray, frame: DecodedFrame) -> ByteArray:
    """Apply the VOI transform (window, VOI LUT, or a default window) and map onto 0..255."""
    source = ds
    if "WindowCenter" not in ds and "VOILUTSequence" not in ds:
        source = _frame_item(ds, frame.frame_index, "FrameVOILUTSequence") or ds
    center = _first_float(source.get("WindowCenter"))
    width = _first_float(source.get("WindowWidth"))
    function = str(source.get("VOILUTFunction", VOI_LINEAR) or VOI_LINEAR).strip().upper()
    if function not in (VOI_LINEAR, VOI_LINEAR_EXACT, VOI_SIGMOID):
        frame.defaults.append(f"VOILUTFunction {function} unknown: used LINEAR")
        function = VOI_LINEAR
    if center is not None and width is not None and width >= 1:
        frame.steps.append(f"window c={center:g} w={width:g}" + ("" if function == VOI_LINEAR else f" {function}"))
        return window(values, center, width, function)
    if center is not None or width is not None:
        frame.defaults.append(f"window c={center} w={width} unusable: ignored")
    if "VOILUTSequence" in source:
        item = source.VOILUTSequence[0]
        data = np.asarray(item.LUTData, dtype=np.float64).ravel()
        out = apply_lut(values, int(item.LUTDescriptor[1]), data)
        lo, hi = float(data.min()), float(data.max())
        frame.steps.append("VOI LUT (sequence)")
        # Scaled by the LUT's own output range: descriptors often claim 16 bits for 12-bit data.
        return scale_to_uint8(out - lo, max(hi - lo, 1.0))
    center, width = default_window(values)
    frame.defaults.append(f"no VOI window: used pixel range c={center:g} w={width:g}")
    frame.steps.append(f"window c={center:g} w={width:g}")
    return window(values, center, width)


def _color_to_rgb(ds: Dataset, frame: DecodedFrame) -> ByteArray:
    """Return an 8-bit RGB array from an RGB, YBR or PALETTE COLOR frame."""
    pixels = frame.pixels
    photometric = frame.photometric
    if photometric == PALETTE_COLOR:
        rgb = np.asarray(apply_color_lut(pixels, ds))
        descriptor = ds.get("RedPaletteColorLookupTableDescriptor")
        lut_bits = int(descriptor[2]) if descriptor is not None and len(descriptor) == 3 else 8
        frame.steps.append(f"palette colour LUT ({lut_bits}-bit entries)")
        if lut_bits > 8 or rgb.dtype != np.uint8:
            return scale_to_uint8(rgb, float(2 ** min(lut_bits, 16) - 1))
        return rgb.astype(np.uint8)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise DicomDecodeError(
            f"photometric interpretation {photometric} with shape {pixels.shape} is not a 3-sample image",
            details={"photometric": photometric, "transfer_syntax": str(frame.transfer_syntax)},
        )
    if pixels.dtype != np.uint8:
        frame.steps.append(f"scale {frame.bits_stored}-bit samples to 8-bit")
        pixels = scale_to_uint8(pixels, float(2**frame.bits_stored - 1))
    if photometric in YBR_CONVERTIBLE:
        frame.steps.append(f"convert {photometric} to RGB")
        return np.asarray(convert_color_space(pixels, photometric, RGB), dtype=np.uint8)
    if photometric in YBR_J2K:
        frame.steps.append(f"{photometric} already undone by the JPEG 2000 decoder")
    return pixels.astype(np.uint8)


#: Public names for the helpers :mod:`agent.sources.volumes` reuses slice by slice.
frame_item = _frame_item
int_tag = _int_tag
voi_to_uint8 = _voi_to_uint8


def resolve_preset(preset: str | None, modality: str | None) -> PixelPreset:
    """Return the named preset, or the modality's when ``preset`` is None.

    Raises:
        ConfigError: ``preset`` names no known preset.
    """
    name = preset if preset is not None else preset_for_modality(modality)
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown pixel preset {name!r}; known presets: {', '.join(PRESETS)}") from None


def instance_modality(ds: Dataset, ref: InstanceRef | None = None) -> str | None:
    """Return the instance's Modality tag, else the one its reference carries (from QIDO-RS)."""
    value = str(ds.get("Modality", "") or "").strip().upper()
    return value or (ref.modality if ref is not None else None)


def pixel_spacing(ds: Dataset, frame_index: int, defaults: list[str]) -> tuple[float, float] | None:
    """Return (row, column) spacing in mm, or None (square pixels assumed, recorded in ``defaults``).

    Looks at PixelSpacing, the frame's Pixel Measures functional group (enhanced IODs), then
    ImagerPixelSpacing (projection radiographs, spacing at the detector).
    """
    candidates = [ds.get("PixelSpacing")]
    item = _frame_item(ds, frame_index, "PixelMeasuresSequence")
    if item is not None:
        candidates.append(item.get("PixelSpacing"))
    candidates.append(ds.get("ImagerPixelSpacing"))
    for value in candidates:
        try:
            pair = (float(value[0]), float(value[1])) if value is not None and len(value) == 2 else None
        except (TypeError, ValueError):
            pair = None
        if pair is not None and pair[0] > 0 and pair[1] > 0:
            return pair
    defaults.append("PixelSpacing missing: assumed square pixels")
    return None


def correct_aspect(pixels: ByteArray, spacing: tuple[float, float] | None) -> tuple[ByteArray, str | None]:
    """Resample non-square pixels so that the picture has its true proportions.

    Args:
        pixels: (rows, cols, 3) uint8.
        spacing: (row, column) spacing in mm, or None for square pixels.

    Returns:
        The (possibly resampled) pixels and the step to record, or None when nothing was done.
        Only the coarser axis is upsampled, so no detail is lost.
    """
    if spacing is None:
        return pixels, None
    row_mm, col_mm = spacing
    if abs(row_mm / col_mm - 1.0) <= ASPECT_TOLERANCE:
        return pixels, None
    rows, cols = pixels.shape[:2]
    fine = min(row_mm, col_mm)
    new_rows, new_cols = round(rows * row_mm / fine), round(cols * col_mm / fine)
    resized = Image.fromarray(np.ascontiguousarray(pixels)).resize((new_cols, new_rows), Image.Resampling.BILINEAR)
    step = f"resample {rows}x{cols} to {new_rows}x{new_cols} for pixel spacing {row_mm:g}x{col_mm:g} mm"
    return np.asarray(resized, dtype=np.uint8), step


def display_gray(ds: Dataset, gray: ByteArray, frame: DecodedFrame, preset: PixelPreset) -> ByteArray:
    """Invert a MONOCHROME1 (or INVERSE-shaped) 8-bit image when the preset displays it, then make 3 channels."""
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    if frame.photometric == MONOCHROME1:
        if preset.invert_monochrome1:
            # MONOCHROME1 (with or without the INVERSE shape DX requires) is inverted once.
            frame.steps.append("invert MONOCHROME1")
            gray = invert(gray)
        else:
            frame.steps.append(f"MONOCHROME1 not inverted ({preset.name} preset maps values, not display)")
    elif shape == "INVERSE" and preset.invert_monochrome1:
        frame.steps.append("invert (PresentationLUTShape INVERSE)")
        gray = invert(gray)
    frame.steps.append("gray to 3 channels")
    return gray_to_rgb(gray)


def hu_windows_rgb(values: FloatArray, frame: DecodedFrame) -> ByteArray:
    """Pack the CT windows of one slice's modality values into RGB, recording the step."""
    bands = " ".join(f"{c}={lo:g}..{hi:g}" for c, (lo, hi) in zip("RGB", CT_WINDOWS, strict=True))
    frame.steps.append(f"HU windows to RGB: {bands}")
    return pack_hu_windows(values)


def minmax_gray(values: FloatArray, lower: float, upper: float, frame: DecodedFrame, scope: str) -> ByteArray:
    """Map a min-max range onto 0..255, recording the step (and a default for a flat range)."""
    if upper <= lower:
        frame.defaults.append(f"flat {scope}: every value is {lower:g}, mapped to 0")
    frame.steps.append(f"min-max over the {scope}: {lower:g}..{upper:g} to 0..255")
    return minmax_to_uint8(values, lower, upper)


def finish_image(ds: Dataset, ref: InstanceRef, rgb: ByteArray, frame: DecodedFrame) -> PreparedImage:
    """Correct the aspect ratio, pad with black to a centred square and wrap into a PreparedImage."""
    rgb, step = correct_aspect(rgb, pixel_spacing(ds, frame.frame_index, frame.defaults))
    if step is not None:
        frame.steps.append(step)
    rows, cols = rgb.shape[:2]
    if rows != cols:
        rgb = pad_to_square(rgb)
        frame.steps.append(f"pad {rows}x{cols} to {rgb.shape[0]}x{rgb.shape[1]}")
    image = Image.fromarray(np.ascontiguousarray(rgb))
    return PreparedImage(ref=ref, image=image, steps=frame.steps, defaults=frame.defaults)


def is_color(frame: DecodedFrame) -> bool:
    """Tell whether a decoded frame goes through the colour path."""
    return frame.photometric in {RGB, PALETTE_COLOR} | YBR_CONVERTIBLE | YBR_J2K


def unsupported(frame: DecodedFrame, sop_instance_uid: str) -> DicomDecodeError:
    """Return the error for a frame that is neither a 2-D grayscale nor a supported colour image."""
    return DicomDecodeError(
        f"cannot prepare SOP instance {sop_instance_uid}: photometric interpretation "
        f"{frame.photometric!r} is not supported (transfer syntax {_describe(frame.transfer_syntax)})",
        details={"photometric": frame.photometric, "sop_instance_uid": sop_instance_uid},
    )


def preparation_failed(frame: DecodedFrame, sop_instance_uid: str, exc: Exception) -> DicomDecodeError:
    """Wrap an unexpected failure of a value transform: a malformed LUT or window tag is the file's fault."""
    return DicomDecodeError(
        f"cannot prepare SOP instance {sop_instance_uid} (transfer syntax "
        f"{_describe(frame.transfer_syntax)}): {type(exc).__name__}: {exc}",
        details={"transfer_syntax": str(frame.transfer_syntax), "sop_instance_uid": sop_instance_uid},
    )


def prepare_instance(ds: Dataset, ref: InstanceRef, *, preset: str | None = None) -> PreparedImage:
    """Turn one DICOM instance into a square 8-bit RGB picture, recording every step.

    The preset (named, or chosen from the modality: CR/DX ``cxr``, CT ``ct``, MR ``mr``,
    photographs ``color``, else ``default``) decides how grayscale values become bytes:
    ``cxr``/``default``/``color`` use the DICOM VOI window, ``ct`` packs three HU windows into
    R, G and B, ``mr`` maps the slice's min-max range. Colour images keep their colours (RGB kept,
    YBR converted, PALETTE COLOR looked up) whatever the preset. Non-square pixels are resampled to
    true proportions, then the picture is padded with black to a centred square (never stretched).

    Args:
        ds: the instance with its pixel data (as returned by a DicomSource's ``retrieve``).
        ref: the instance's reference; its SOP instance UID is named in errors.
        preset: a name from :data:`~agent.sources.pixel_presets.PRESETS`; None picks by modality.

    Returns:
        The picture and the steps/defaults that made it; the first step names the preset.

    Raises:
        DicomDecodeError: the pixels cannot be decoded or the photometric interpretation is not
            supported; the message names the transfer syntax and the SOP instance UID.
        ConfigError: ``preset`` names no known preset.
    """
    chosen = resolve_preset(preset, instance_modality(ds, ref))
    frame = decode_frame(ds, ref.sop_instance_uid)
    frame.steps.insert(0, f"preset {chosen.name}")
    try:
        if frame.photometric in GRAYSCALE and frame.pixels.ndim == 2:
            if chosen.name == COLOR:
                frame.defaults.append(f"{COLOR} preset on a {frame.photometric} image: used the VOI window")
            values = modality_values(ds, frame)
            if chosen.gray == "hu_windows":
                if frame.photometric == MONOCHROME1:
                    frame.steps.append(f"MONOCHROME1 not inverted ({chosen.name} preset maps values, not display)")
                rgb = hu_windows_rgb(values, frame)
            else:
                if chosen.gray == "minmax":
                    gray = minmax_gray(values, float(values.min()), float(values.max()), frame, "slice")
                else:
                    gray = _voi_to_uint8(ds, values, frame)
                rgb = display_gray(ds, gray, frame, chosen)
        elif is_color(frame):
            if chosen.gray != "voi":
                frame.defaults.append(f"{chosen.name} preset on a {frame.photometric} image: kept its colours")
            rgb = _color_to_rgb(ds, frame)
        else:
            raise unsupported(frame, ref.sop_instance_uid)
    except DicomDecodeError:
        raise
    except Exception as exc:
        raise preparation_failed(frame, ref.sop_instance_uid, exc) from exc
    return finish_image(ds, ref, rgb, frame)
