"""Encoded twins of one image: the same pixels in every transfer syntax that can be written here.

Used by the decoding tests (each twin decoded and compared with the source pixels: bit-identical
for lossless syntaxes, bounded error for lossy ones) and by the decode benchmark
(:mod:`agent.bench.decode`). Every twin goes through Part 10 bytes and back
(``dcmwrite`` -> ``dcmread``), the form a DICOMweb retrieve or a folder scan hands to
:mod:`agent.sources.pixels`.

Writers: pydicom's own writer for the native syntaxes (little/big endian, implicit, deflate),
pydicom's encoders for RLE, JPEG-LS and JPEG 2000, Pillow for 8-bit baseline JPEG, and a small
JPEG lossless (process 14, first-order prediction) encoder below, since no installed package
writes one. JPEG extended (12-bit DCT) and HTJ2K have no encoder here: see :data:`CANNOT_MAKE`.
"""

from __future__ import annotations

import copy
from io import BytesIO
from typing import Any, Final

import numpy as np
import pydicom
from numpy.typing import NDArray
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

#: Short names of the twins this module makes, with their transfer syntaxes.
SYNTAXES: Final[dict[str, UID]] = {
    "explicit_le": ExplicitVRLittleEndian,
    "implicit_le": ImplicitVRLittleEndian,
    "big_endian": ExplicitVRBigEndian,
    "deflate": DeflatedExplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg_baseline": JPEGBaseline8Bit,
    "jpeg_lossless": JPEGLosslessSV1,
    "jpegls_lossless": JPEGLSLossless,
    "jpegls_near": JPEGLSNearLossless,
    "j2k_lossless": JPEG2000Lossless,
    "j2k_lossy": JPEG2000,
}

#: Syntaxes decoded in production but not writable with what is installed, and why.
CANNOT_MAKE: Final[dict[str, str]] = {
    "jpeg_extended": "no installed encoder writes 12-bit JPEG (process 2/4); Pillow writes 8-bit only",
    "htj2k": "OpenJPEG (pylibjpeg-openjpeg, Pillow) decodes HTJ2K but cannot encode it",
}

LOSSY: Final = frozenset({"jpeg_baseline", "jpegls_near", "j2k_lossy"})
#: The NEAR parameter (largest allowed absolute error) of the JPEG-LS near-lossless twin.
JLS_NEAR: Final = 2
#: Compression ratio asked of the lossy JPEG 2000 twin.
J2K_RATIO: Final = 10
JPEG_QUALITY: Final = 90


def synthetic_image(size: int, bits_stored: int = 12, seed: int = 0) -> NDArray[np.uint16]:
    """Return a (size, size) image using the full ``bits_stored`` range: gradients, a disc and noise.

    Smooth regions with texture resemble a radiograph more than pure noise does, so compression
    ratios and decode times are in a realistic range.
    """
    top = (1 << bits_stored) - 1
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / max(size - 1, 1)
    base = 0.35 + 0.25 * np.sin(6.0 * x) * np.cos(4.0 * y)
    disc = ((x - 0.5) ** 2 + (y - 0.55) ** 2) < 0.09
    base = np.where(disc, base + 0.3, base)
    noise = np.random.default_rng(seed).normal(0.0, 0.02, size=(size, size))
    return np.clip(np.rint((base + noise) * top), 0, top).astype(np.uint16)


def grayscale_dataset(pixels: NDArray[Any], *, bits_stored: int, modality: str = "OT") -> Dataset:
    """Wrap a 2-D unsigned array into an Explicit VR Little Endian secondary-capture dataset."""
    bits_allocated = 8 if pixels.dtype == np.uint8 else 16
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype(f"<u{bits_allocated // 8}").tobytes()
    return ds


def roundtrip(ds: Dataset) -> Dataset:
    """Write a dataset as Part 10 bytes and read it back, as a DICOMweb retrieve would deliver it."""
    ts = UID(ds.file_meta.TransferSyntaxUID)
    buffer = BytesIO()
    pydicom.dcmwrite(
        buffer, ds, implicit_vr=ts.is_implicit_VR, little_endian=ts.is_little_endian, enforce_file_format=True
    )
    return pydicom.dcmread(BytesIO(buffer.getvalue()))


def _native(ds: Dataset, ts: UID) -> Dataset:
    twin = copy.deepcopy(ds)
    twin.file_meta.TransferSyntaxUID = ts
    if not ts.is_little_endian:
        # pydicom writes OW pixel bytes as they are: the big-endian twin's samples are swapped here.
        dtype = f"<u{int(ds.BitsAllocated) // 8}"
        twin.PixelData = np.frombuffer(ds.PixelData, dtype=dtype).byteswap().tobytes()
    return twin


def _encapsulated(ds: Dataset, ts: UID, frame: bytes) -> Dataset:
    twin = copy.deepcopy(ds)
    twin.file_meta.TransferSyntaxUID = ts
    twin.PixelData = encapsulate([frame])
    twin["PixelData"].VR = "OB"
    return twin


def make_twin(ds: Dataset, name: str) -> Dataset:
    """Return ``ds`` (native, single-frame grayscale) encoded in the syntax called ``name``, read back from bytes.

    Raises:
        KeyError: ``name`` is not in :data:`SYNTAXES` (see :data:`CANNOT_MAKE`).
        ValueError: the image does not suit the syntax (baseline JPEG needs 8-bit samples).
    """
    ts = SYNTAXES[name]
    pixels = ds.pixel_array
    if name in ("explicit_le", "implicit_le", "big_endian", "deflate"):
        twin = _native(ds, ts)
    elif name == "jpeg_baseline":
        if pixels.dtype != np.uint8:
            raise ValueError("baseline JPEG takes 8-bit samples only")
        buffer = BytesIO()
        Image.fromarray(pixels, mode="L").save(buffer, format="JPEG", quality=JPEG_QUALITY)
        twin = _encapsulated(ds, ts, buffer.getvalue())
        twin.LossyImageCompression = "01"
    elif name == "jpeg_lossless":
        twin = _encapsulated(ds, ts, encode_jpeg_lossless(pixels, int(ds.BitsStored)))
    else:
        twin = copy.deepcopy(ds)
        options: dict[str, Any] = {}
        if name == "jpegls_near":
            options["jls_error"] = JLS_NEAR
        elif name == "j2k_lossy":
            options["j2k_cr"] = [J2K_RATIO]
        twin.compress(ts, **options)
    return roundtrip(twin)


# --- JPEG lossless (ITU-T T.81 process 14, selection value 1) ----------------------------------

#: Huffman code lengths for the 17 difference categories: one of length 2, five of 3 and one each
#: of 4..14. The Kraft sum is below 1, so no code is all ones, as T.81 requires.
_BITS: Final = (0, 1, 5, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0)


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload


def _pack_bits(values: NDArray[np.uint64], lengths: NDArray[np.int64]) -> bytes:
    """Concatenate each value's low ``length`` bits, MSB first; pad with 1-bits; stuff 0x00 after 0xFF."""
    shift = (64 - lengths).astype(np.uint64)
    aligned = (values << shift).astype(">u8")
    bits = np.unpackbits(aligned.view(np.uint8).reshape(-1, 8), axis=1)
    stream = bits[np.arange(64)[np.newaxis, :] < lengths[:, np.newaxis]]
    stream = np.concatenate([stream, np.ones((-len(stream)) % 8, dtype=np.uint8)])
    data = np.packbits(stream)
    return np.insert(data, np.flatnonzero(data == 0xFF) + 1, 0).astype(np.uint8).tobytes()


def encode_jpeg_lossless(pixels: NDArray[Any], precision: int) -> bytes:
    """Encode a 2-D unsigned image as a lossless JPEG (process 14, predictor 1 = left neighbour).

    Args:
        pixels: (rows, cols) unsigned samples below ``2 ** precision``.
        precision: sample precision in bits (2..16), normally BitsStored.

    Returns:
        The JPEG stream, SOI to EOI.
    """
    if not 2 <= precision <= 16:
        raise ValueError(f"precision must be 2..16, got {precision}")
    x = pixels.astype(np.int64)
    rows, cols = x.shape
    predicted = np.empty_like(x)
    predicted[0, 0] = 1 << (precision - 1)
    predicted[0, 1:] = x[0, :-1]  # first line: left neighbour
    predicted[1:, 0] = x[:-1, 0]  # first column: the sample above
    predicted[1:, 1:] = x[1:, :-1]
    diff = (x - predicted).ravel() % 65536  # differences are taken modulo 2**16 (T.81 H.1.2.1)
    diff = np.where(diff > 32768, diff - 65536, diff)
    magnitude = np.abs(diff)
    category = np.zeros(diff.shape, dtype=np.int64)
    for k in range(1, 17):
        category[magnitude >= (1 << (k - 1))] = k
    # The most frequent categories get the shortest codes.
    counts = np.bincount(category, minlength=17)
    symbols = sorted(range(17), key=lambda s: -int(counts[s]))
    code_of, length_of = np.zeros(17, dtype=np.int64), np.zeros(17, dtype=np.int64)
    code, k = 0, 0
    for length, count in enumerate(_BITS, start=1):
        for _ in range(count):
            code_of[symbols[k]], length_of[symbols[k]] = code, length
            code, k = code + 1, k + 1
        code <<= 1
    extra_len = np.where(category == 16, 0, category)
    extra = np.where(diff < 0, diff - 1, diff) & ((1 << extra_len) - 1)
    values = ((code_of[category] << extra_len) | extra).astype(np.uint64)
    scan = _pack_bits(values, length_of[category] + extra_len)

    frame_header = bytes([precision]) + rows.to_bytes(2, "big") + cols.to_bytes(2, "big") + bytes([1, 1, 0x11, 0])
    table = bytes([0x00, *_BITS, *symbols])
    scan_header = bytes([1, 1, 0x00, 1, 0, 0])  # one component, table 0, predictor 1, Se 0, point transform 0
    return (
        b"\xff\xd8"
        + _segment(0xC3, frame_header)
        + _segment(0xC4, table)
        + _segment(0xDA, scan_header)
        + scan
        + b"\xff\xd9"
    )
