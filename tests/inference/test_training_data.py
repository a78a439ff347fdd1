"""Training data for ``classify fit``: folder and CSV layouts, pictures and DICOM, unreadable files named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.typing import NDArray
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from agent.errors import DicomDecodeError
from agent.inference.classifier import TrainingDataError
from agent.inference.medsiglip import MedSigLIP
from agent.inference.training_data import LabelledFile, embed_examples, list_examples, load_image


def write_dicom(path: Path, pixels: NDArray[np.uint16], *, modality: str = "DX", with_pixels: bool = True) -> Path:
    """Write a MONOCHROME2 16-bit DICOM file with a full window over its values."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    if with_pixels:
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def gradient(rows: int, cols: int) -> NDArray[np.uint16]:
    """Return a left-to-right ramp over 0..4095."""
    return np.tile(np.linspace(0, 4095, cols), (rows, 1)).astype(np.uint16)


def test_folder_classes_are_subfolders_and_hidden_files_are_ignored(tmp_path: Path) -> None:
    for label in ("normal", "pneumonia"):
        (tmp_path / label / "nested").mkdir(parents=True)
        Image.new("L", (8, 8)).save(tmp_path / label / "a.png")
        Image.new("L", (8, 8)).save(tmp_path / label / "nested" / "b.jpg")
    (tmp_path / "normal" / ".DS_Store").write_bytes(b"junk")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "x.png").write_bytes(b"junk")
    examples = list_examples(tmp_path)
    assert [(e.path.relative_to(tmp_path).as_posix(), e.label) for e in examples] == [
        ("normal/a.png", "normal"),
        ("normal/nested/b.jpg", "normal"),
        ("pneumonia/a.png", "pneumonia"),
        ("pneumonia/nested/b.jpg", "pneumonia"),
    ]


def test_loose_files_and_empty_folders_are_errors(tmp_path: Path) -> None:
    with pytest.raises(TrainingDataError, match="no labelled images"):
        list_examples(tmp_path)
    (tmp_path / "a").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "a" / "x.png")
    Image.new("L", (8, 8)).save(tmp_path / "stray.png")
    with pytest.raises(TrainingDataError, match=r"stray\.png"):
        list_examples(tmp_path)
    with pytest.raises(TrainingDataError, match="does not exist"):
        list_examples(tmp_path / "nowhere")
    with pytest.raises(TrainingDataError, match=r"folder of class subfolders or a \.csv"):
        list_examples(tmp_path / "stray.png")


def test_csv_paths_are_relative_to_the_csv(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "img" / "one.png")
    absolute = tmp_path / "two.png"
    Image.new("L", (8, 8)).save(absolute)
    csv_file = tmp_path / "labels.csv"
    csv_file.write_text(f"Path,Label\nimg/one.png,normal\n{absolute},effusion\n")
    assert list_examples(csv_file) == [
        LabelledFile(tmp_path / "img" / "one.png", "normal"),
        LabelledFile(absolute, "effusion"),
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("file,class\na.png,x\n", "needs a header with 'path' and 'label'"),
        ("path,label\nmissing.png,x\n", "line 2: no file at"),
        ("path,label\na.png,\n", "line 2: empty path or label"),
        ("path,label\n", "lists no images"),
    ],
)
def test_csv_errors_name_the_problem(tmp_path: Path, content: str, message: str) -> None:
    Image.new("L", (8, 8)).save(tmp_path / "a.png")
    csv_file = tmp_path / "labels.csv"
    csv_file.write_text(content)
    with pytest.raises(TrainingDataError) as caught:
        list_examples(csv_file)
    assert message in caught.value.message


def test_pictures_are_padded_to_square_rgb(tmp_path: Path) -> None:
    wide = np.full((20, 40), 200, dtype=np.uint8)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    image = load_image(tmp_path / "wide.png")
    assert (image.mode, image.size) == ("RGB", (40, 40))
    pixels = np.asarray(image)
    # Black bars above and below, the picture in the middle, never stretched.
    assert pixels[:10].max() == 0 and pixels[30:].max() == 0
    assert (pixels[10:30] == 200).all()

    Image.new("RGB", (10, 30), (255, 0, 0)).save(tmp_path / "tall.jpg")
    tall = load_image(tmp_path / "tall.jpg")
    assert (tall.mode, tall.size) == ("RGB", (30, 30))

    Image.new("RGBA", (12, 12), (0, 0, 255, 128)).save(tmp_path / "alpha.png")
    assert load_image(tmp_path / "alpha.png").mode == "RGB"


def test_sixteen_bit_pictures_use_their_whole_range(tmp_path: Path) -> None:
    ramp = np.tile(np.linspace(1000, 3000, 16), (16, 1)).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    pixels = np.asarray(load_image(tmp_path / "ramp16.png"))
    assert pixels[:, 0].max() == 0 and pixels[:, -1].min() == 255


def test_dicom_goes_through_pixel_preparation(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "cxr.dcm", gradient(30, 60))
    image = load_image(path)
    assert (image.mode, image.size) == ("RGB", (60, 60))
    pixels = np.asarray(image)
    assert pixels[15, 0, 0] == 0 and pixels[15, -1, 0] == 255
    # A DICOM file without the .dcm suffix is recognised by its DICM marker.
    bare = tmp_path / "IM0001"
    bare.write_bytes(path.read_bytes())
    assert np.array_equal(np.asarray(load_image(bare)), pixels)


def test_unreadable_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(TrainingDataError) as caught:
        load_image(tmp_path / "broken.png")
    assert "broken.png" in caught.value.message
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(TrainingDataError, match=r"notes\.txt is neither"):
        load_image(tmp_path / "notes.txt")
    no_pixels = write_dicom(tmp_path / "nopixels.dcm", gradient(4, 4), with_pixels=False)
    with pytest.raises(DicomDecodeError) as decoding:
        load_image(no_pixels)
    assert "nopixels.dcm" in decoding.value.message and "no PixelData" in decoding.value.message
    whole = write_dicom(tmp_path / "whole.dcm", gradient(30, 60)).read_bytes()
    (tmp_path / "truncated.dcm").write_bytes(whole[: len(whole) - 1000])
    with pytest.raises(DicomDecodeError, match=r"truncated\.dcm"):
        load_image(tmp_path / "truncated.dcm")


def test_embed_examples_embeds_in_batches_and_fails_on_unreadable(tmp_path: Path, medsiglip: MedSigLIP) -> None:
    rng = np.random.default_rng(0)
    examples = []
    for index in range(5):
        path = tmp_path / f"{index}.png"
        Image.fromarray(rng.integers(0, 256, size=(16, 16), dtype=np.uint8)).save(path)
        examples.append(LabelledFile(path, "a" if index % 2 else "b"))
    examples.append(LabelledFile(write_dicom(tmp_path / "x.dcm", gradient(16, 24)), "c"))
    embedded = embed_examples(medsiglip, examples, batch_size=4)
    assert embedded.embeddings.shape == (6, medsiglip.embedding_dim)
    assert embedded.labels == ["b", "a", "b", "a", "b", "c"]
    assert embedded.skipped == []
    # Batching changes nothing: the same rows as one call on the loaded images.
    direct = medsiglip.embed_images([load_image(e.path) for e in examples])
    assert torch.allclose(embedded.embeddings, direct, atol=1e-5)

    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    with_bad = [*examples[:2], LabelledFile(tmp_path / "bad.jpg", "a"), *examples[2:]]
    with pytest.raises(TrainingDataError, match=r"bad\.jpg"):
        embed_examples(medsiglip, with_bad, batch_size=4)
    skipping = embed_examples(medsiglip, with_bad, batch_size=4, skip_unreadable=True)
    assert skipping.paths == [e.path for e in examples]
    assert [(s.path.name, "bad.jpg" in s.reason) for s in skipping.skipped] == [("bad.jpg", True)]
    assert torch.allclose(skipping.embeddings, direct, atol=1e-5)
