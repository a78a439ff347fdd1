"""Pixel preparation: pure helpers on hand-computed arrays, then real files.

Real files are pydicom's bundled test files (``pydicom.data.get_testdata_file``) and the
project's own fixtures (``fixtures/dicom``, made by ``tools/make_fixtures.py``).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_color_lut
from pydicom.uid import UID, ExplicitVRLittleEndian

from agent.domain.refs import InstanceRef
from agent.errors import ConfigError, DicomDecodeError
from agent.sources.pixel_presets import PRESETS, minmax_to_uint8, pack_hu_windows, preset_for_modality
from agent.sources.pixels import (
    MONOCHROME1,
    MONOCHROME2,
    apply_lut,
    decode_frame,
    default_window,
    gray_to_rgb,
    invert,
    modality_values,
    pad_to_square,
    prepare_instance,
    rescale,
    scale_to_uint8,
    window,
)

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


def _ref(ds: Dataset) -> InstanceRef:
    return InstanceRef(
        study_uid=str(ds.get("StudyInstanceUID", "1.2.3")),
        series_uid=str(ds.get("SeriesInstanceUID", "1.2.3.4")),
        sop_instance_uid=str(ds.get("SOPInstanceUID", "1.2.3.4.5")),
    )


def _testfile(name: str) -> Dataset:
    path = get_testdata_file(name)
    assert path is not None, f"pydicom no longer bundles {name}"
    return pydicom.dcmread(path)


def _pixels(ds: Dataset) -> np.ndarray:
    return np.asarray(prepare_instance(ds, _ref(ds)).image)


def _tiny(values: list[list[int]], photometric: str = MONOCHROME2, **tags: object) -> Dataset:
    """Build an in-memory 16-bit grayscale dataset with no file meta at all."""
    arr = np.asarray(values, dtype=np.uint16)
    ds = Dataset()
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = arr.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = arr.tobytes()
    for key, value in tags.items():
        setattr(ds, key, value)
    return ds


# --- pure helpers ------------------------------------------------------------------------------


def test_rescale_hand_computed() -> None:
    stored = np.array([0, 100, 2000], dtype=np.uint16)
    assert rescale(stored, 1, -1024).tolist() == [-1024.0, -924.0, 976.0]
    assert rescale(stored, 0.5, 10).tolist() == [10.0, 60.0, 1010.0]
    assert rescale(stored, 1, -1024).dtype == np.float64


def test_window_linear_hand_computed() -> None:
    # c=100, w=101: lower edge 49.5, upper edge 149.5; ramp ((x - 99.5) / 100 + 0.5) * 255.
    x = np.array([0, 49, 49.5, 74.5, 124.5, 149.5, 150, 1000])
    assert window(x, 100, 101).tolist() == [0, 0, 0, 64, 191, 255, 255, 255]
    assert window(x, 100, 101).dtype == np.uint8


def test_window_width_one_is_a_threshold() -> None:
    assert window(np.array([9.0, 9.5, 10.0, 11.0]), 10, 1).tolist() == [0, 0, 255, 255]


def test_window_linear_exact_and_sigmoid() -> None:
    # LINEAR_EXACT c=100 w=100: edges 50 and 150, ramp ((x - 100) / 100 + 0.5) * 255.
    assert window(np.array([50.0, 75.0, 100.0, 151.0]), 100, 100, "LINEAR_EXACT").tolist() == [0, 64, 128, 255]
    # SIGMOID is 255 / (1 + exp(-4 (x - c) / w)): half way at the centre, saturating far out.
    assert window(np.array([-1e9, 100.0, 1e9]), 100, 50, "SIGMOID").tolist() == [0, 128, 255]


@pytest.mark.parametrize("width", [0, -5])
def test_window_rejects_non_positive_width(width: float) -> None:
    with pytest.raises(ValueError, match="width"):
        window(np.zeros(2), 0, width)


def test_default_window_spans_min_to_max() -> None:
    values = np.array([10.0, 15.0, 30.0])
    assert default_window(values) == (20.5, 21.0)
    # min -> 0, max -> 255, 15 -> ((15 - 20) / 20 + 0.5) * 255 = 63.75.
    assert window(values, *default_window(values)).tolist() == [0, 64, 255]


def test_invert_and_gray_to_rgb() -> None:
    gray = np.array([[0, 64], [191, 255]], dtype=np.uint8)
    assert invert(gray).tolist() == [[255, 191], [64, 0]]
    rgb = gray_to_rgb(gray)
    assert rgb.shape == (2, 2, 3)
    assert rgb[1, 0].tolist() == [191, 191, 191]


def test_pad_to_square_centres_with_black() -> None:
    wide = np.full((2, 4), 7, dtype=np.uint8)
    padded = pad_to_square(wide)
    assert padded.tolist() == [[0, 0, 0, 0], [7, 7, 7, 7], [7, 7, 7, 7], [0, 0, 0, 0]]
    # An odd difference puts the extra row at the bottom / the extra column at the right.
    tall = np.full((3, 2, 3), 9, dtype=np.uint8)
    padded = pad_to_square(tall)
    assert padded.shape == (3, 3, 3)
    assert padded[:, 0].tolist() == [[9, 9, 9]] * 3
    assert padded[:, 2].tolist() == [[0, 0, 0]] * 3
    square = np.ones((2, 2), dtype=np.uint8)
    assert pad_to_square(square).tolist() == square.tolist()


def test_scale_to_uint8_and_apply_lut() -> None:
    assert scale_to_uint8(np.array([0, 32768, 65535]), 65535).tolist() == [0, 128, 255]
    lut = np.array([0.0, 10.0, 20.0, 30.0])
    # First entry maps value 5; values outside clamp to the ends.
    assert apply_lut(np.array([0, 5, 6, 8, 99]), 5, lut).tolist() == [0.0, 0.0, 10.0, 30.0, 30.0]


# --- prepare_instance on in-memory datasets ----------------------------------------------------


def test_in_memory_monochrome2_hand_computed() -> None:
    # c=150 w=201: edges 49.5 / 249.5; 100 -> (-49.5/200 + .5) * 255 = 64.39; 200 -> 191.89.
    ds = _tiny([[0, 100, 200, 300], [300, 200, 100, 0]], WindowCenter=150, WindowWidth=201)
    result = prepare_instance(ds, _ref(ds))
    out = np.asarray(result.image)
    assert result.image.mode == "RGB"
    assert out.shape == (4, 4, 3)
    assert out[..., 0].tolist() == [[0, 0, 0, 0], [0, 64, 192, 255], [255, 192, 64, 0], [0, 0, 0, 0]]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert "window c=150 w=201" in result.steps
    assert "pad 2x4 to 4x4" in result.steps
    assert any("transfer syntax missing" in d for d in result.defaults)
    assert "RescaleSlope missing: used 1" in result.defaults


def test_in_memory_monochrome1_is_inverted_after_windowing() -> None:
    ds = _tiny([[0, 100, 200, 300]], MONOCHROME1, WindowCenter=150, WindowWidth=201)
    result = prepare_instance(ds, _ref(ds))
    assert np.asarray(result.image)[1, :, 0].tolist() == [255, 191, 63, 0]
    assert result.steps.index("invert MONOCHROME1") > result.steps.index("window c=150 w=201")


def test_multi_valued_window_uses_the_first_pair() -> None:
    ds = _tiny([[0, 100, 200, 300]], WindowCenter=[150, 400], WindowWidth=[201, 800])
    result = prepare_instance(ds, _ref(ds))
    assert "window c=150 w=201" in result.steps


def test_rescale_from_shared_functional_groups() -> None:
    ds = _tiny([[10, 20], [30, 40]])
    item = Dataset()
    transform = Dataset()
    transform.RescaleSlope = 2
    transform.RescaleIntercept = -10
    item.PixelValueTransformationSequence = [transform]
    ds.SharedFunctionalGroupsSequence = [item]
    result = prepare_instance(ds, _ref(ds))
    assert "rescale slope=2 intercept=-10" in result.steps


def test_voi_lut_sequence_is_applied() -> None:
    ds = _tiny([[0, 1], [2, 3]])
    lut = Dataset()
    lut.LUTDescriptor = [4, 0, 8]
    lut.LUTData = [0, 10, 20, 30]
    ds.VOILUTSequence = [lut]
    result = prepare_instance(ds, _ref(ds))
    assert np.asarray(result.image)[..., 0].tolist() == [[0, 85], [170, 255]]
    assert "VOI LUT (sequence)" in result.steps


def test_presentation_lut_inverse_inverts_monochrome2() -> None:
    ds = _tiny([[0, 300]], WindowCenter=150, WindowWidth=201, PresentationLUTShape="INVERSE")
    out = np.asarray(prepare_instance(ds, _ref(ds)).image)
    assert out[0, :, 0].tolist() == [255, 0]  # 1x2 padded to 2x2: the extra row is below


def test_odd_bits_stored_is_overridden_not_fatal() -> None:
    ds = _tiny([[0, 100], [200, 300]])
    ds.BitsStored = 20  # more than BitsAllocated: invalid
    result = prepare_instance(ds, _ref(ds))
    assert any("BitsStored 20 invalid" in d for d in result.defaults)
    del ds.BitsStored
    result = prepare_instance(ds, _ref(ds))
    assert any("BitsStored None invalid" in d for d in result.defaults)


def test_unsupported_photometric_interpretation() -> None:
    ds = _tiny([[0, 1]], "HSV")
    with pytest.raises(DicomDecodeError, match="photometric interpretation 'HSV' is not supported"):
        prepare_instance(ds, _ref(ds))


def test_missing_rows_is_a_decode_error() -> None:
    ds = _tiny([[0, 1]])
    del ds.Rows
    with pytest.raises(DicomDecodeError, match="Rows is missing"):
        prepare_instance(ds, _ref(ds))


# --- pydicom's bundled real files --------------------------------------------------------------


def test_ct_small_rescales_to_hounsfield_units() -> None:
    ds = _testfile("CT_small.dcm")
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, -1024.0)
    frame = decode_frame(ds)
    hu = modality_values(ds, frame)
    # Raw value 175 at (0, 0): 175 * 1 + (-1024) = -849 HU (lung parenchyma).
    assert int(frame.pixels[0, 0]) == 175
    assert hu[0, 0] == -849.0
    assert frame.steps[-1] == "rescale slope=1 intercept=-1024"

    result = prepare_instance(ds, _ref(ds), preset="default")
    assert result.steps[0] == "preset default"
    assert result.image.size == (128, 128)
    assert result.image.mode == "RGB"
    # CT_small carries no window, so one is derived from the HU range and recorded as a default.
    assert any(d.startswith("no VOI window") for d in result.defaults)


def test_mr_small_window_hand_computed() -> None:
    ds = _testfile("MR_small.dcm")
    assert (str(ds.WindowCenter), str(ds.WindowWidth)) == ("600", "1600")
    out = np.asarray(prepare_instance(ds, _ref(ds), preset="default").image)
    # c=600 w=1600, no rescale tags: raw 905 -> ((905 - 599.5) / 1599 + 0.5) * 255 = 176.2;
    # raw 182 -> ((182 - 599.5) / 1599 + 0.5) * 255 = 60.9.
    assert int(ds.pixel_array[0, 0]) == 905 and int(ds.pixel_array[32, 32]) == 182
    assert out[0, 0].tolist() == [176, 176, 176]
    assert out[32, 32].tolist() == [61, 61, 61]


def test_bundled_monochrome1_cr_is_inverted() -> None:
    # pydicom bundles a MONOCHROME1 CR in its DICOMDIR test tree.
    ds = _testfile("6154")
    assert ds.PhotometricInterpretation == MONOCHROME1
    result = prepare_instance(ds, _ref(ds))
    out = np.asarray(result.image)
    # Raw 1994 (the minimum, at 0,0): 1994 * 0.684 + 200 = 1563.9; window c=1600 w=2800 gives
    # ((1563.9 - 1599.5) / 2799 + 0.5) * 255 = 124.3 -> 124, inverted to 131.
    assert int(ds.pixel_array[0, 0]) == 1994
    assert out[0, 0, 0] == 131
    # Raw 2802 (the maximum, at 15,1) -> 2116.6 -> 174.6 -> 175, inverted to 80: low raw is bright.
    assert out[15, 1, 0] == 80
    assert "invert MONOCHROME1" in result.steps


def test_rgb_file_keeps_colours_and_pads() -> None:
    ds = _testfile("examples_rgb_color.dcm")
    out = _pixels(ds)
    raw = ds.pixel_array
    assert raw.shape == (240, 320, 3)
    assert out.shape == (320, 320, 3)
    assert (out[40:280] == raw).all()
    assert not out[:40].any() and not out[280:].any()


def test_ybr_file_is_converted_to_rgb() -> None:
    ds = _testfile("SC_ybr_full_422_uncompressed.dcm")
    result = prepare_instance(ds, _ref(ds))
    assert "convert YBR_FULL to RGB" in result.steps
    # pydicom's own default output (as_rgb=True) is the reference RGB.
    expected = ds.pixel_array.astype(int)
    assert np.abs(np.asarray(result.image).astype(int) - expected).max() <= 1


def test_palette_color_file_is_looked_up() -> None:
    ds = _testfile("examples_palette.dcm")
    result = prepare_instance(ds, _ref(ds))
    out = np.asarray(result.image)
    assert out.shape == (800, 800, 3)
    expected = apply_color_lut(ds.pixel_array, ds).astype(np.float64) * 255 / 65535
    assert np.abs(out[225:575].astype(float) - expected).max() <= 0.5 + 1e-9
    assert any(step.startswith("palette colour LUT") for step in result.steps)


def test_multi_frame_takes_the_middle_frame() -> None:
    ds = _testfile("rtdose.dcm")
    assert int(ds.NumberOfFrames) == 15
    result = prepare_instance(ds, _ref(ds))
    assert "frame 8 of 15 (middle)" in result.steps
    middle = ds.pixel_array[7].astype(np.float64)
    expected = window(middle, *default_window(middle))
    assert (np.asarray(result.image)[..., 0] == expected).all()


def test_multi_frame_rle_colour() -> None:
    ds = _testfile("SC_rgb_rle_2frame.dcm")
    result = prepare_instance(ds, _ref(ds))
    assert "frame 2 of 2 (middle)" in result.steps
    assert (np.asarray(result.image) == ds.pixel_array[1]).all()


def test_sixteen_bit_rgb_is_scaled_to_eight_bits() -> None:
    ds = _testfile("SC_rgb_rle_16bit.dcm")
    result = prepare_instance(ds, _ref(ds))
    assert "scale 16-bit samples to 8-bit" in result.steps
    assert np.asarray(result.image).dtype == np.uint8


def test_decoder_failure_is_wrapped() -> None:
    ds = _testfile("MR_truncated.dcm")  # pixel data shorter than Rows x Columns
    with pytest.raises(DicomDecodeError, match=r"Explicit VR Little Endian.*decoder failed"):
        prepare_instance(ds, _ref(ds))


def test_no_pixel_data_is_a_decode_error() -> None:
    ds = _testfile("rtplan.dcm")
    with pytest.raises(DicomDecodeError, match="no PixelData") as info:
        prepare_instance(ds, _ref(ds))
    assert "1.2.840.10008.1.2 (Implicit VR Little Endian)" in info.value.message
    path = get_testdata_file("CT_small.dcm")
    assert path is not None
    headers_only = pydicom.dcmread(path, stop_before_pixels=True)
    with pytest.raises(DicomDecodeError, match="no PixelData"):
        prepare_instance(headers_only, _ref(headers_only))


def test_unknown_transfer_syntax_is_a_decode_error() -> None:
    ds = copy.deepcopy(_testfile("CT_small.dcm"))
    ds.file_meta.TransferSyntaxUID = UID("1.2.3.4.99")
    with pytest.raises(DicomDecodeError, match=r"1\.2\.3\.4\.99 \(unknown transfer syntax\).*no pixel decoder"):
        prepare_instance(ds, _ref(ds))


def test_no_file_meta_infers_the_transfer_syntax() -> None:
    ds = _testfile("CT_small.dcm")
    ds.file_meta = FileMetaDataset()
    result = prepare_instance(ds, _ref(ds))
    assert "transfer syntax missing: assumed Explicit VR Little Endian" in result.defaults
    assert result.image.size == (128, 128)


# --- the project's fixtures --------------------------------------------------------------------


def _manifest_files(key: str) -> list[list[str]]:
    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    patient = next(p for p in manifest["patients"] if p["key"] == key)
    return [study["files"] for study in patient["studies"]]


def test_fixture_cxr_prior_monochrome1_square_and_padded() -> None:
    prior_files, _ = _manifest_files("cxr")
    ds = pydicom.dcmread(FIXTURES / prior_files[0])
    assert ds.PhotometricInterpretation == MONOCHROME1
    assert (ds.Rows, ds.Columns) == (256, 200)
    result = prepare_instance(ds, _ref(ds))
    out = np.asarray(result.image)
    assert result.image.mode == "RGB" and out.shape == (256, 256, 3)
    assert "pad 256x200 to 256x256" in result.steps
    # Aspect preserved: 28 black columns each side, the picture unstretched in between.
    assert not out[:, :28].any() and not out[:, 228:].any()
    assert out[:, 28:228].any()
    # MONOCHROME1: bright where the stored value is low.
    raw = ds.pixel_array.astype(np.float64)
    shown = out[:, 28:228, 0].astype(np.float64)
    assert shown[raw < np.percentile(raw, 10)].mean() > 200
    assert shown[raw > np.percentile(raw, 90)].mean() < 60
    assert np.corrcoef(raw.ravel(), shown.ravel())[0, 1] < -0.9


def test_fixture_cxr_prior_and_current_show_the_same_way_up() -> None:
    prior_files, current_files = _manifest_files("cxr")
    prior = _pixels(pydicom.dcmread(FIXTURES / prior_files[0]))
    pa = next(f for f in current_files if f.endswith("pa.dcm"))
    current = _pixels(pydicom.dcmread(FIXTURES / pa))
    # Spine column (bone, bright) and the middle of the right lung (air, dark) on both.
    for out in (prior, current):
        assert out[200, 128, 0] > 200
        assert out[115, 28 + 60, 0] < 80


def test_fixture_ct_slice_without_window_uses_a_recorded_default() -> None:
    (files,) = _manifest_files("ct")
    with_window = prepare_instance(ds := pydicom.dcmread(FIXTURES / files[0]), _ref(ds), preset="default")
    without = prepare_instance(ds := pydicom.dcmread(FIXTURES / files[3]), _ref(ds), preset="default")
    assert "window c=-600 w=1500" in with_window.steps
    assert "rescale slope=1 intercept=-1024" in with_window.steps
    assert any(d.startswith("no VOI window") for d in without.defaults)
    assert with_window.image.size == without.image.size == (64, 64)


def test_decoded_frame_reports_the_transfer_syntax() -> None:
    (files,) = _manifest_files("ct")
    frame = decode_frame(pydicom.dcmread(FIXTURES / files[0]))
    assert frame.transfer_syntax == ExplicitVRLittleEndian
    assert frame.number_of_frames == 1 and frame.frame_index == 0
    assert frame.pixels.dtype == np.int16


# --- named presets -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("modality", "preset"),
    [
        ("CR", "cxr"),
        ("dx", "cxr"),
        ("CT", "ct"),
        ("MR", "mr"),
        ("XC", "color"),
        ("SM", "color"),
        ("OP", "color"),
        ("US", "default"),
        ("", "default"),
        (None, "default"),
    ],
)
def test_preset_for_modality(modality: str | None, preset: str) -> None:
    assert preset_for_modality(modality) == preset
    assert preset in PRESETS


def test_pack_hu_windows_hand_computed() -> None:
    hu = np.array([[-2000.0, -1024.0, 0.0, 40.0, 80.0, 215.0, 1024.0, 3000.0]])
    rgb = pack_hu_windows(hu)
    # R: (hu + 1024) / 2048 * 255; G: (hu + 135) / 350 * 255; B: hu / 80 * 255; clipped, rounded.
    assert rgb[0, :, 0].tolist() == [0, 0, 128, 132, 137, 154, 255, 255]  # 1024/2048*255 = 127.5 -> 128
    assert rgb[0, :, 1].tolist() == [0, 0, 98, 128, 157, 255, 255, 255]  # 135/350*255 = 98.36
    assert rgb[0, :, 2].tolist() == [0, 0, 0, 128, 255, 255, 255, 255]
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 8, 3)


def test_minmax_to_uint8_and_flat_range() -> None:
    assert minmax_to_uint8(np.array([10.0, 20.0, 30.0]), 10.0, 30.0).tolist() == [0, 128, 255]
    assert minmax_to_uint8(np.array([5.0, 5.0]), 5.0, 5.0).tolist() == [0, 0]


def test_ct_preset_packs_hu_windows_into_rgb() -> None:
    # Stored 1064 with intercept -1024 is 40 HU: R = round(1064 / 2048 * 255) = 132,
    # G = round(175 / 350 * 255) = 128 (127.5, to even), B = round(40 / 80 * 255) = 128.
    ds = _tiny([[1064, 0], [1024, 1239]], Modality="CT", RescaleSlope=1, RescaleIntercept=-1024)
    ds.WindowCenter, ds.WindowWidth = 40, 400  # ignored by the CT preset
    result = prepare_instance(ds, _ref(ds))
    out = np.asarray(result.image)
    assert result.steps[0] == "preset ct"
    assert out[0, 0].tolist() == [132, 128, 128]
    assert out[0, 1].tolist() == [0, 0, 0]  # -1024 HU: air
    assert out[1, 0].tolist() == [128, 98, 0]  # 0 HU: water
    assert out[1, 1].tolist() == [154, 255, 255]  # 215 HU: R = round(1239 / 2048 * 255) = 154
    assert "HU windows to RGB: R=-1024..1024 G=-135..215 B=0..80" in result.steps
    assert not any(step.startswith("window c=") for step in result.steps)


def test_ct_preset_does_not_invert_monochrome1() -> None:
    ds = _tiny([[1064, 0]], MONOCHROME1, Modality="CT", RescaleSlope=1, RescaleIntercept=-1024)
    result = prepare_instance(ds, _ref(ds))
    assert np.asarray(result.image)[0, 0].tolist() == [132, 128, 128]
    assert "invert MONOCHROME1" not in result.steps


def test_mr_preset_maps_the_slice_range() -> None:
    # min 100 -> 0, max 300 -> 255, 150 -> 50 / 200 * 255 = 63.75 -> 64; the window tags are not used.
    ds = _tiny([[100, 150], [300, 200]], Modality="MR", WindowCenter=600, WindowWidth=1600)
    result = prepare_instance(ds, _ref(ds))
    assert np.asarray(result.image)[..., 0].tolist() == [[0, 64], [255, 128]]
    assert result.steps[0] == "preset mr"
    assert "min-max over the slice: 100..300 to 0..255" in result.steps


def test_cxr_preset_windows_inverts_and_pads() -> None:
    ds = _tiny([[0, 100, 200, 300]], MONOCHROME1, Modality="DX", WindowCenter=150, WindowWidth=201)
    result = prepare_instance(ds, _ref(ds))
    assert result.steps[0] == "preset cxr"
    assert np.asarray(result.image)[1, :, 0].tolist() == [255, 191, 63, 0]
    assert result.image.size == (4, 4)


def test_explicit_preset_overrides_the_modality() -> None:
    ds = _tiny([[100, 150], [300, 200]], Modality="CT", WindowCenter=150, WindowWidth=201)
    result = prepare_instance(ds, _ref(ds), preset="mr")
    assert result.steps[0] == "preset mr"
    with pytest.raises(ConfigError, match="unknown pixel preset 'bone'"):
        prepare_instance(ds, _ref(ds), preset="bone")


def test_modality_from_the_reference_when_the_tag_is_missing() -> None:
    ds = _tiny([[100, 150], [300, 200]])
    ref = _ref(ds).model_copy(update={"modality": "MR"})
    assert prepare_instance(ds, ref).steps[0] == "preset mr"


def test_color_preset_keeps_colours_and_records_a_gray_image() -> None:
    rgb = _testfile("examples_rgb_color.dcm")
    rgb.Modality = "XC"
    result = prepare_instance(rgb, _ref(rgb))
    assert result.steps[0] == "preset color"
    assert (np.asarray(result.image)[40:280] == rgb.pixel_array).all()
    gray = _tiny([[0, 1]], Modality="XC")
    assert any(d.startswith("color preset on a MONOCHROME2 image") for d in prepare_instance(gray, _ref(gray)).defaults)


def test_ct_preset_on_a_colour_capture_keeps_colours() -> None:
    rgb = _testfile("examples_rgb_color.dcm")
    rgb.Modality = "CT"
    result = prepare_instance(rgb, _ref(rgb))
    assert "ct preset on a RGB image: kept its colours" in result.defaults
    assert (np.asarray(result.image)[40:280] == rgb.pixel_array).all()


def test_missing_pixel_spacing_is_a_recorded_default() -> None:
    ds = _tiny([[0, 1], [2, 3]])
    assert "PixelSpacing missing: assumed square pixels" in prepare_instance(ds, _ref(ds)).defaults
    ds.PixelSpacing = [0.5, 0.5]
    assert "PixelSpacing missing: assumed square pixels" not in prepare_instance(ds, _ref(ds)).defaults
    cr = _tiny([[0, 1], [2, 3]], ImagerPixelSpacing=[0.2, 0.2])
    assert "PixelSpacing missing: assumed square pixels" not in prepare_instance(cr, _ref(cr)).defaults


def test_non_square_pixels_are_resampled_to_true_proportions() -> None:
    # 2 rows x 4 columns of 1.0 x 0.5 mm pixels is 2 mm x 2 mm: resampled to 4 x 4, no padding.
    ds = _tiny([[0, 100, 200, 300], [300, 200, 100, 0]], WindowCenter=150, WindowWidth=201)
    ds.PixelSpacing = [1.0, 0.5]
    result = prepare_instance(ds, _ref(ds))
    assert "resample 2x4 to 4x4 for pixel spacing 1x0.5 mm" in result.steps
    assert not any(step.startswith("pad") for step in result.steps)
    out = np.asarray(result.image)[..., 0]
    assert out.shape == (4, 4)
    assert out[0].tolist() == [0, 64, 192, 255] and out[3].tolist() == [255, 192, 64, 0]


def test_missing_file_meta_and_window_on_a_real_file_are_recorded() -> None:
    ds = _testfile("MR_small.dcm")
    del ds.WindowCenter
    del ds.WindowWidth
    ds.file_meta = FileMetaDataset()
    result = prepare_instance(ds, _ref(ds), preset="default")
    assert "transfer syntax missing: assumed Explicit VR Little Endian" in result.defaults
    assert any(d.startswith("no VOI window: used pixel range") for d in result.defaults)
    assert result.image.size == (64, 64)


def test_odd_bits_stored_within_range_masks_the_high_bits() -> None:
    # BitsStored 12 of 16: bits above bit 11 are not part of the value; 0xF064 reads as 0x064 = 100.
    ds = _tiny([[0xF064, 0]], BitsStored=12, HighBit=11, Modality="MR")
    frame = decode_frame(ds)
    assert frame.pixels.tolist() == [[100, 0]]
    assert frame.bits_stored == 12
