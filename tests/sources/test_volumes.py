"""Volume preparation: slice order, HU window packing, even sampling, MR min-max across the volume.

Slices are real datasets written to Part 10 bytes and read back (the form a DICOMweb retrieve
delivers), built by the project's twin-making code; expected bytes are computed by hand.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import JPEG2000Lossless, generate_uid

from agent.domain.refs import InstanceRef
from agent.sources.codec_twins import grayscale_dataset, roundtrip
from agent.sources.volumes import prepare_volume, sample_evenly

# Axial: rows along +x, columns along +y, normal +z.
AXIAL = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def _slice(value: int, z: float | None, number: int, modality: str = "CT", **tags: object) -> Dataset:
    """A 4x4 slice whose every stored value is ``value`` (a slice's identity after shuffling)."""
    ds = grayscale_dataset(np.full((4, 4), value, dtype=np.uint16), bits_stored=16, modality=modality)
    ds.InstanceNumber = number
    if z is not None:
        ds.ImagePositionPatient = [-10.0, -10.0, z]
        ds.ImageOrientationPatient = AXIAL
    ds.PixelSpacing = [0.7, 0.7]
    if modality == "CT":
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    for key, val in tags.items():
        setattr(ds, key, val)
    return roundtrip(ds)


def _ref(ds: Dataset) -> InstanceRef:
    return InstanceRef(
        study_uid=str(ds.StudyInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        modality=str(ds.Modality),
    )


def _items(datasets: list[Dataset]) -> list[tuple[Dataset, InstanceRef]]:
    return [(ds, _ref(ds)) for ds in datasets]


def _red(image: object) -> int:
    return int(np.asarray(image)[0, 0, 0])


def test_shuffled_ct_slices_come_back_ordered_by_position() -> None:
    # Stored value 1024 + 100 * k is (100 * k) HU; z descends as the stored value rises, and the
    # instance numbers are deliberately misleading, so only the position can give this order.
    slices = [_slice(1024 + 100 * k, z=50.0 - 5 * k, number=(7 * k) % 5 + 1) for k in range(5)]
    shuffled = slices[:]
    random.Random(3).shuffle(shuffled)
    volume = prepare_volume(_items(shuffled))
    sops = [image.ref.sop_instance_uid for image in volume.images]
    assert sops == [str(ds.SOPInstanceUID) for ds in reversed(slices)]  # ascending z
    assert "order by ImagePositionPatient along the slice normal" in volume.steps
    assert volume.steps[0] == "preset ct (volume of CT)"
    assert volume.skipped == [] and not any("ordered by" in d for d in volume.defaults)


def test_ct_slices_pack_hand_computed_hu_windows() -> None:
    # 40 HU: R = round(1064 / 2048 * 255) = 132, G = round(175 / 350 * 255) = round(127.5) = 128,
    # B = round(40 / 80 * 255) = round(127.5) = 128. -500 HU: R = round(524 / 2048 * 255) = 65, G = B = 0.
    volume = prepare_volume(_items([_slice(1024 + 40, 0.0, 1), _slice(1024 - 500, 2.5, 2)]))
    first, second = (np.asarray(image.image) for image in volume.images)
    assert first[0, 0].tolist() == [132, 128, 128]
    assert second[0, 0].tolist() == [65, 0, 0]
    assert first.shape == (4, 4, 3)
    assert "rescale to HU; windows R=-1024..1024 G=-135..215 B=0..80 packed per slice" in volume.steps
    assert "rescale slope=1 intercept=-1024" in volume.images[0].steps


def test_two_hundred_slices_are_sampled_to_85_including_both_ends() -> None:
    indices = sample_evenly(200, 85)
    assert len(indices) == 85 == len(set(indices))
    assert indices[0] == 0 and indices[-1] == 199
    gaps = np.diff(indices)
    assert set(gaps.tolist()) <= {2, 3}  # 199 / 84 = 2.37: evenly spread
    assert sample_evenly(10, 85) == list(range(10))
    assert sample_evenly(5, 1) == [2]
    with pytest.raises(ValueError, match="max_slices"):
        sample_evenly(5, 0)

    # Through prepare_volume: slice k holds k HU, so the red byte tells which slices were kept.
    slices = [_slice(1024 + k, z=float(k), number=k + 1) for k in range(200)]
    volume = prepare_volume(_items(slices[::-1]))
    assert len(volume.images) == 85
    kept = [str(slices[i].SOPInstanceUID) for i in indices]
    assert [image.ref.sop_instance_uid for image in volume.images] == kept
    assert "sample 85 of 200 slices evenly (first and last kept)" in volume.steps


def test_mr_min_max_spans_the_whole_volume() -> None:
    # Values 100, 200, 300 across three slices: the middle slice maps to 255 * 100 / 200 = 127.5 -> 128,
    # not to 0 or 255 as a per-slice min-max would give for a flat slice.
    slices = [_slice(v, z=float(z), number=z + 1, modality="MR") for z, v in enumerate([100, 200, 300])]
    volume = prepare_volume(_items(slices))
    assert [_red(image.image) for image in volume.images] == [0, 128, 255]
    assert "min-max over the volume (3 slices): 100..300 to 0..255" in volume.steps
    assert volume.steps[0] == "preset mr (volume of MR)"
    gray = np.asarray(volume.images[1].image)
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()


def test_missing_position_falls_back_to_instance_number_and_records_it() -> None:
    slices = [_slice(1024 + 10 * n, z=None, number=n) for n in (3, 1, 2)]
    volume = prepare_volume(_items(slices))
    assert [_red(image.image) for image in volume.images] == [round((10 * n + 1024) / 2048 * 255) for n in (1, 2, 3)]
    assert "ImagePositionPatient missing on 3 of 3 slices: ordered by InstanceNumber" in volume.defaults
    assert "order by InstanceNumber" in volume.steps


def test_missing_position_and_number_keeps_the_given_order() -> None:
    slices = [_slice(1024 + v, z=None, number=1) for v in (30, 10, 20)]
    for ds in slices:
        del ds.InstanceNumber
    volume = prepare_volume(_items(slices))
    assert [image.ref.sop_instance_uid for image in volume.images] == [str(ds.SOPInstanceUID) for ds in slices]
    assert any(d.endswith("InstanceNumber missing: kept the order given") for d in volume.defaults)


def test_oblique_slices_are_ordered_along_their_normal() -> None:
    # Orientation rotated about x: rows along +x, columns along (0, cos 30, sin 30); the normal is
    # (0, -sin 30, cos 30). Positions step along that normal while x shifts, which alone is noise.
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    orientation = [1.0, 0.0, 0.0, 0.0, float(c), float(s)]
    slices = []
    for k in range(4):
        ds = _slice(1024 + 100 * k, z=None, number=4 - k)
        ds.ImageOrientationPatient = orientation
        ds.ImagePositionPatient = [float(7 * ((k * 3) % 4)), float(-s * 3 * k), float(c * 3 * k)]
        slices.append(ds)
    volume = prepare_volume(_items(slices[::-1]))
    assert [image.ref.sop_instance_uid for image in volume.images] == [str(ds.SOPInstanceUID) for ds in slices]


def test_undecodable_slice_is_skipped_and_recorded() -> None:
    good = [_slice(1024, 0.0, 1), _slice(1124, 5.0, 3)]
    bad = _slice(1064, 2.5, 2)
    # A JPEG 2000 codestream that ends properly but holds garbage: the decoder itself fails.
    bad.file_meta.TransferSyntaxUID = JPEG2000Lossless
    bad.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(40) + b"\xff\xd9"])
    volume = prepare_volume(_items([*good, bad]))
    assert len(volume.images) == 2
    (skipped,) = volume.skipped
    assert skipped["sop_instance_uid"] == str(bad.SOPInstanceUID)
    assert skipped["code"] == "dicom_undecodable"
    assert "1.2.840.10008.1.2.4.90" in skipped["message"]


def _enhanced(values: list[int], zs: list[float], modality: str = "CT") -> Dataset:
    """One multi-frame instance; per-frame positions in the functional groups, orientation shared."""
    frames = np.stack([np.full((3, 5), v, dtype=np.uint16) for v in values])
    ds = grayscale_dataset(frames[0], bits_stored=16, modality=modality)
    ds.NumberOfFrames = len(values)
    ds.PixelData = frames.astype("<u2").tobytes()
    per_frame = []
    for z in zs:
        plane = Dataset()
        plane.ImagePositionPatient = [0.0, 0.0, z]
        item = Dataset()
        item.PlanePositionSequence = Sequence([plane])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    orientation, transform, measures = Dataset(), Dataset(), Dataset()
    orientation.ImageOrientationPatient = AXIAL
    transform.RescaleSlope, transform.RescaleIntercept = 1, -1024
    measures.PixelSpacing = [0.5, 0.5]
    shared = Dataset()
    shared.PlaneOrientationSequence = Sequence([orientation])
    shared.PixelValueTransformationSequence = Sequence([transform])
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.SOPInstanceUID = generate_uid()
    return roundtrip(ds)


def test_enhanced_multi_frame_ct_uses_per_frame_positions() -> None:
    # Frames stored out of order: z = 10, 0, 5 hold 0, -1024 and 40 HU.
    ds = _enhanced([1024, 0, 1064], [10.0, 0.0, 5.0])
    volume = prepare_volume(_items([ds]))
    assert [np.asarray(image.image)[1, 0].tolist() for image in volume.images] == [
        [0, 0, 0],  # -1024 HU at z = 0
        [132, 128, 128],  # 40 HU at z = 5
        [128, 98, 0],  # 0 HU at z = 10
    ]
    # 3x5 frames padded to 5x5; spacing from the shared Pixel Measures group, so no default.
    assert volume.images[0].image.size == (5, 5)
    assert "pad 3x5 to 5x5" in volume.images[0].steps
    assert "frame 2 of 3" in volume.images[0].steps
    assert "PixelSpacing missing: assumed square pixels" not in volume.defaults


def test_enhanced_multi_frame_mr_min_max_across_frames() -> None:
    ds = _enhanced([50, 150, 250], [0.0, 1.0, 2.0], modality="MR")
    volume = prepare_volume(_items([ds]))
    # The shared rescale gives -974, -874, -774; min-max over the volume gives 0, 127.5 -> 128, 255.
    # (Row 0 is padding: the 3x5 frames are padded to 5x5.)
    assert [int(np.asarray(image.image)[1, 0, 0]) for image in volume.images] == [0, 128, 255]


def test_other_modalities_prepare_each_slice_on_its_own() -> None:
    slices = [_slice(v, z=float(i), number=i + 1, modality="PT") for i, v in enumerate([10, 20])]
    volume = prepare_volume(_items(slices))
    assert volume.steps[0] == "preset default (volume of PT)"
    assert all(image.steps[0] == "preset default" for image in volume.images)
    assert any(d.startswith("no VOI window") for d in volume.defaults)


def test_modality_argument_overrides_the_tags() -> None:
    slices = [_slice(v, z=float(i), number=i + 1, modality="OT") for i, v in enumerate([100, 300])]
    volume = prepare_volume(_items(slices), modality="mr")
    assert [_red(image.image) for image in volume.images] == [0, 255]


def test_empty_series_gives_an_empty_volume() -> None:
    volume = prepare_volume([])
    assert volume.images == [] and volume.skipped == []
