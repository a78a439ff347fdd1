"""Volume preparation: a CT or MR series (or one enhanced multi-frame instance) as ordered model inputs.

Sits beside :mod:`agent.sources.pixels`: where that turns one instance into one picture, this
takes every instance of a series, puts the slices in anatomical order, samples at most
``max_slices`` of them evenly and maps them the way the volume models expect: CT in Hounsfield
units with three windows packed into RGB, MR min-max normalised over the whole volume (so that a
dark slice stays dark next to a bright one). Slices are ordered from headers and sampled before
any pixel is decoded, so a 600-slice CT costs 85 decodes. An undecodable slice is skipped and
recorded; the rest of the volume goes on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from agent.domain.imaging import PreparedImage
from agent.domain.refs import InstanceRef
from agent.errors import DicomDecodeError
from agent.sources.pixel_presets import CT, MR, PixelPreset
from agent.sources.pixels import (
    GRAYSCALE,
    DecodedFrame,
    FloatArray,
    decode_frame,
    display_gray,
    finish_image,
    frame_item,
    hu_windows_rgb,
    instance_modality,
    int_tag,
    minmax_gray,
    modality_values,
    preparation_failed,
    prepare_instance,
    resolve_preset,
    unsupported,
    voi_to_uint8,
)

DEFAULT_MAX_SLICES = 85


@dataclass
class VolumeImages:
    """A prepared volume: pictures in slice order, what was done, and the slices that were skipped."""

    images: list[PreparedImage]
    steps: list[str] = field(default_factory=list)
    defaults: list[str] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Slice:
    """One slice before decoding: where it comes from and where it lies."""

    ds: Dataset
    ref: InstanceRef
    frame_index: int | None  # None for a single-frame instance
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    instance_number: int | None


def _floats(value: Any, count: int) -> tuple[float, ...] | None:
    """Return ``count`` floats from a multi-valued DS element, or None when absent or malformed."""
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count else None


def _plane(ds: Dataset, frame_index: int | None) -> tuple[Any, Any]:
    """Return the (ImagePositionPatient, ImageOrientationPatient) values of a slice or frame."""
    position, orientation = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
    if frame_index is not None:
        item = frame_item(ds, frame_index, "PlanePositionSequence")
        if item is not None and "ImagePositionPatient" in item:
            position = item.ImagePositionPatient
        item = frame_item(ds, frame_index, "PlaneOrientationSequence")
        if item is not None and "ImageOrientationPatient" in item:
            orientation = item.ImageOrientationPatient
    return position, orientation


def _slices(items: list[tuple[Dataset, InstanceRef]]) -> list[_Slice]:
    """Expand instances into slices: one per single-frame instance, one per frame of a multi-frame one."""
    out: list[_Slice] = []
    for ds, ref in items:
        frames = int_tag(ds, "NumberOfFrames") or 1
        number = int_tag(ds, "InstanceNumber")
        for index in range(frames) if frames > 1 else [None]:
            position, orientation = _plane(ds, index)
            pos = _floats(position, 3)
            out.append(
                _Slice(
                    ds=ds,
                    ref=ref,
                    frame_index=index,
                    position=(pos[0], pos[1], pos[2]) if pos is not None else None,
                    orientation=_floats(orientation, 6),
                    # Frames of one instance keep their frame order after the instance's number.
                    instance_number=number,
                )
            )
    return out


def slice_normal(orientation: tuple[float, ...]) -> FloatArray:
    """Return the slice normal: the cross product of the row and column direction cosines."""
    row = np.asarray(orientation[:3], dtype=np.float64)
    col = np.asarray(orientation[3:], dtype=np.float64)
    return np.cross(row, col)


def order_slices(slices: list[_Slice], steps: list[str], defaults: list[str]) -> list[_Slice]:
    """Order slices along the normal by ImagePositionPatient; else by InstanceNumber (recorded)."""
    oriented = next((s.orientation for s in slices if s.orientation is not None), None)
    if oriented is not None and all(s.position is not None for s in slices):
        normal = slice_normal(oriented)
        if float(np.linalg.norm(normal)) > 1e-6:
            if any(s.orientation is not None and not np.allclose(s.orientation, oriented, atol=1e-3) for s in slices):
                defaults.append("slices differ in ImageOrientationPatient: ordered along the first slice's normal")
            if any(s.orientation is None for s in slices):
                defaults.append("ImageOrientationPatient missing on some slices: used the first slice's")
            steps.append("order by ImagePositionPatient along the slice normal")
            keyed = [(float(np.dot(np.asarray(s.position), normal)), i) for i, s in enumerate(slices)]
            return [slices[i] for _, i in sorted(keyed)]
    missing = sum(s.position is None for s in slices)
    reason = (
        f"ImagePositionPatient missing on {missing} of {len(slices)} slices"
        if missing
        else "ImageOrientationPatient missing or degenerate"
    )
    if all(s.instance_number is not None for s in slices):
        defaults.append(f"{reason}: ordered by InstanceNumber")
        steps.append("order by InstanceNumber")
        keyed_n = [(s.instance_number or 0, s.frame_index or 0, i) for i, s in enumerate(slices)]
        return [slices[i] for *_, i in sorted(keyed_n)]
    defaults.append(f"{reason} and InstanceNumber missing: kept the order given")
    return list(slices)


def sample_evenly(count: int, max_slices: int) -> list[int]:
    """Return at most ``max_slices`` indices into ``count`` slices, evenly spaced, first and last included."""
    if max_slices < 1:
        raise ValueError(f"max_slices must be >= 1, got {max_slices}")
    if count <= max_slices:
        return list(range(count))
    if max_slices == 1:
        return [(count - 1) // 2]
    # With count > max_slices the spacing exceeds 1, so rounding never makes two indices equal.
    return [int(i) for i in np.rint(np.linspace(0, count - 1, max_slices))]


def _decode(piece: _Slice) -> DecodedFrame:
    """Decode one slice, recording its frame number for frames of a multi-frame instance."""
    return decode_frame(piece.ds, piece.ref.sop_instance_uid, frame_index=piece.frame_index)


def _grayscale_values(piece: _Slice, frame: DecodedFrame) -> FloatArray:
    """Return a slice's modality values (HU for CT), refusing colour or unsupported frames."""
    if frame.photometric not in GRAYSCALE or frame.pixels.ndim != 2:
        raise unsupported(frame, piece.ref.sop_instance_uid)
    try:
        return modality_values(piece.ds, frame)
    except Exception as exc:
        raise preparation_failed(frame, piece.ref.sop_instance_uid, exc) from exc


def _skip(skipped: list[dict[str, Any]], piece: _Slice, exc: DicomDecodeError) -> None:
    entry = {"sop_instance_uid": piece.ref.sop_instance_uid, **exc.to_dict()}
    if piece.frame_index is not None:
        entry["frame_index"] = piece.frame_index
    skipped.append(entry)


def _volume_modality(items: list[tuple[Dataset, InstanceRef]], modality: str | None) -> str | None:
    if modality:
        return modality.strip().upper()
    for ds, ref in items:
        found = instance_modality(ds, ref)
        if found:
            return found
    return None


def prepare_volume(
    items: list[tuple[Dataset, InstanceRef]],
    *,
    modality: str | None = None,
    max_slices: int = DEFAULT_MAX_SLICES,
) -> VolumeImages:
    """Prepare a series' slices, in anatomical order, as square 8-bit RGB pictures.

    CT: slices ordered by ImagePositionPatient projected on the slice normal (InstanceNumber when
    positions are missing, recorded), at most ``max_slices`` sampled evenly (first and last kept),
    rescaled to HU and the windows -1024..1024 / -135..215 / 0..80 packed into R / G / B. MR: the
    same order and sampling, then min-max normalised over all sampled slices together. Other
    modalities: each sampled slice prepared on its own with its modality's preset. A multi-frame
    instance contributes each frame as a slice (positions from its functional groups).

    Args:
        items: the series' instances with their references (any order).
        modality: overrides the instances' Modality tag.
        max_slices: the most slices returned.

    Returns:
        The pictures in slice order, the volume's steps and defaults (with every slice's defaults,
        deduplicated), and the skipped slices as their DicomDecodeError's ``to_dict()`` plus the
        SOP instance UID.
    """
    mod = _volume_modality(items, modality)
    preset = resolve_preset(None, mod)
    steps = [f"preset {preset.name} (volume of {mod or 'unknown modality'})"]
    defaults: list[str] = []
    skipped: list[dict[str, Any]] = []
    ordered = order_slices(_slices(items), steps, defaults)
    chosen = [ordered[i] for i in sample_evenly(len(ordered), max_slices)] if ordered else []
    if len(chosen) < len(ordered):
        steps.append(f"sample {len(chosen)} of {len(ordered)} slices evenly (first and last kept)")

    if preset.name in (CT, MR):
        images = _prepare_gray_volume(chosen, preset, steps, skipped)
    else:
        images = []
        for piece in chosen:
            try:
                if piece.frame_index is None:
                    images.append(prepare_instance(piece.ds, piece.ref, preset=preset.name))
                else:
                    images.append(_prepare_frame_alone(piece, preset))
            except DicomDecodeError as exc:
                _skip(skipped, piece, exc)
    for image in images:
        for default in image.defaults:
            if default not in defaults:
                defaults.append(default)
    return VolumeImages(images=images, steps=steps, defaults=defaults, skipped=skipped)


def _prepare_frame_alone(piece: _Slice, preset: PixelPreset) -> PreparedImage:
    """Prepare one frame of a multi-frame instance on its own (modalities without a volume mapping)."""
    frame = _decode(piece)
    frame.steps.insert(0, f"preset {preset.name}")
    values = _grayscale_values(piece, frame)
    try:
        gray = voi_to_uint8(piece.ds, values, frame)
    except Exception as exc:
        raise preparation_failed(frame, piece.ref.sop_instance_uid, exc) from exc
    return finish_image(piece.ds, piece.ref, display_gray(piece.ds, gray, frame, preset), frame)


def _prepare_gray_volume(
    chosen: list[_Slice], preset: PixelPreset, steps: list[str], skipped: list[dict[str, Any]]
) -> list[PreparedImage]:
    """Decode the chosen slices and map them: HU windows per slice (CT) or one min-max range (MR)."""
    decoded: list[tuple[_Slice, DecodedFrame, FloatArray]] = []
    for piece in chosen:
        try:
            frame = _decode(piece)
            decoded.append((piece, frame, _grayscale_values(piece, frame)))
        except DicomDecodeError as exc:
            _skip(skipped, piece, exc)
    if preset.name == CT:
        steps.append("rescale to HU; windows R=-1024..1024 G=-135..215 B=0..80 packed per slice")
        return [
            finish_image(piece.ds, piece.ref, hu_windows_rgb(values, frame), frame) for piece, frame, values in decoded
        ]
    if not decoded:
        return []
    lower = min(float(values.min()) for _, _, values in decoded)
    upper = max(float(values.max()) for _, _, values in decoded)
    steps.append(f"min-max over the volume ({len(decoded)} slices): {lower:g}..{upper:g} to 0..255")
    images = []
    for piece, frame, values in decoded:
        gray = minmax_gray(values, lower, upper, frame, "volume")
        images.append(finish_image(piece.ds, piece.ref, display_gray(piece.ds, gray, frame, preset), frame))
    return images


__all__ = [
    "DEFAULT_MAX_SLICES",
    "VolumeImages",
    "order_slices",
    "prepare_volume",
    "sample_evenly",
    "slice_normal",
]
