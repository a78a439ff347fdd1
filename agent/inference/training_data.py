"""Labelled images for ``medagent classify fit``, and image files for ``classify predict``.

Where it sits: between the files a user points at and :class:`~agent.inference.classifier.LinearProbe`.
Two layouts are read:

* a folder whose subfolders are the classes (``DATA/pneumonia/*.png``, ``DATA/normal/*.dcm``;
  files in nested folders below a class folder belong to that class), or
* a CSV file with a ``path,label`` header, paths relative to the CSV's folder (or absolute).

Files are PNG/JPEG pictures or DICOM instances. DICOM goes through the same pixel preparation as
the agent's imaging (:func:`agent.sources.pixels.prepare_instance`), so the probe is trained on
exactly what it will later score; pictures are padded (never stretched) to a square like the
DICOM path does. Images are read one batch at a time while embedding, so a large training set is
never held in memory at once.

Unreadable files stop the fit with an error naming the file, by default: a probe silently trained
on fewer images than the user thinks is worse than no probe. With ``skip_unreadable`` they are
left out instead and listed in :attr:`EmbeddedExamples.skipped`, which the CLI prints.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import torch
from PIL import Image, UnidentifiedImageError
from pydicom.errors import InvalidDicomError

from agent.domain.refs import InstanceRef
from agent.errors import DicomDecodeError, MedagentError
from agent.inference.classifier import TrainingDataError
from agent.inference.protocols import ImageScorer
from agent.sources.pixels import gray_to_rgb, pad_to_square, prepare_instance, scale_to_uint8

PICTURE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
_DICM_OFFSET = 128


@dataclass(frozen=True)
class LabelledFile:
    """One training example: an image file and its class."""

    path: Path
    label: str


@dataclass(frozen=True)
class SkippedFile:
    """A file left out of training, and why."""

    path: Path
    reason: str


@dataclass
class EmbeddedExamples:
    """Embeddings of the readable examples, their labels, and what was skipped."""

    embeddings: torch.Tensor
    labels: list[str]
    paths: list[Path]
    skipped: list[SkippedFile] = field(default_factory=list)


def list_examples(data: Path) -> list[LabelledFile]:
    """Return the labelled files of a class-per-subfolder folder or a ``path,label`` CSV.

    Hidden files and folders (``.DS_Store``, ``.git``) are ignored. In a folder, every other file
    under a class subfolder is an example (its readability is checked while embedding); files
    directly in ``data`` have no class and are an error.

    Raises:
        TrainingDataError: ``data`` is missing, is neither a folder nor a ``.csv`` file, has no
            class folders, a file outside them, or a CSV without ``path`` and ``label`` columns,
            with an empty field, or naming a file that does not exist.
    """
    if data.is_dir():
        return _list_folder(data)
    if data.is_file() and data.suffix.lower() == ".csv":
        return _list_csv(data)
    if not data.exists():
        raise TrainingDataError(f"training data {data} does not exist", details={"path": str(data)})
    raise TrainingDataError(
        f"training data {data} must be a folder of class subfolders or a .csv file with path,label columns",
        details={"path": str(data)},
    )


def load_image(path: Path) -> Image.Image:
    """Read a PNG/JPEG picture or a DICOM instance as the square 8-bit RGB image MedSigLIP takes.

    Raises:
        TrainingDataError: the file cannot be read, or is neither a picture nor DICOM.
        DicomDecodeError: a DICOM file whose pixels cannot be decoded; names the file.
    """
    suffix = path.suffix.lower()
    try:
        if suffix in PICTURE_SUFFIXES:
            return _load_picture(path)
        if suffix in DICOM_SUFFIXES or _has_dicm_marker(path):
            return _load_dicom(path)
    except OSError as exc:
        raise TrainingDataError(
            f"cannot read {path}: {exc.strerror or type(exc).__name__}", details={"path": str(path)}
        ) from exc
    raise TrainingDataError(
        f"{path} is neither a PNG/JPEG picture nor a DICOM file (no DICM marker)", details={"path": str(path)}
    )


def embed_examples(
    scorer: ImageScorer, examples: Sequence[LabelledFile], *, batch_size: int = 16, skip_unreadable: bool = False
) -> EmbeddedExamples:
    """Read and embed the examples, ``batch_size`` images at a time.

    Args:
        scorer: MedSigLIP (anything with ``embed_images``).
        examples: from :func:`list_examples`.
        batch_size: images held in memory and embedded together.
        skip_unreadable: leave unreadable files out (listed in ``skipped``) instead of failing.

    Raises:
        TrainingDataError: an unreadable file (unless skipped).
        DicomDecodeError: an undecodable DICOM file (unless skipped).
        ModelOutputError: the model failed.
    """
    rows: list[torch.Tensor] = []
    labels: list[str] = []
    paths: list[Path] = []
    skipped: list[SkippedFile] = []
    for start in range(0, len(examples), batch_size):
        images: list[Image.Image] = []
        for example in examples[start : start + batch_size]:
            try:
                images.append(load_image(example.path))
            except (TrainingDataError, DicomDecodeError) as exc:
                if not skip_unreadable:
                    raise
                skipped.append(SkippedFile(example.path, exc.message))
                continue
            labels.append(example.label)
            paths.append(example.path)
        if images:
            rows.append(scorer.embed_images(images))
    embeddings = torch.cat(rows) if rows else torch.empty((0, 0), dtype=torch.float32)
    return EmbeddedExamples(embeddings=embeddings, labels=labels, paths=paths, skipped=skipped)


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def _list_folder(data: Path) -> list[LabelledFile]:
    loose = sorted(p.name for p in data.iterdir() if p.is_file() and _visible(p, data))
    if loose:
        raise TrainingDataError(
            f"files directly in {data} have no class ({', '.join(loose[:5])}); put each class's images "
            "in a subfolder named after the class",
            details={"path": str(data)},
        )
    examples: list[LabelledFile] = []
    for class_dir in sorted(p for p in data.iterdir() if p.is_dir() and _visible(p, data)):
        files = sorted(p for p in class_dir.rglob("*") if p.is_file() and _visible(p, data))
        examples.extend(LabelledFile(path, class_dir.name) for path in files)
    if not examples:
        raise TrainingDataError(
            f"no labelled images in {data}: expected one subfolder per class holding PNG/JPEG or DICOM files",
            details={"path": str(data)},
        )
    return examples


def _list_csv(data: Path) -> list[LabelledFile]:
    try:
        with data.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [name.strip().lower() for name in reader.fieldnames or []]
            if "path" not in columns or "label" not in columns:
                raise TrainingDataError(
                    f"{data} needs a header with 'path' and 'label' columns, found {columns or 'none'}",
                    details={"path": str(data)},
                )
            rows = [
                (line, {(key or "").strip().lower(): (value or "").strip() for key, value in row.items()})
                for line, row in enumerate(reader, start=2)
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise TrainingDataError(f"cannot read {data}: {exc}", details={"path": str(data)}) from exc
    examples: list[LabelledFile] = []
    for line, row in rows:
        if not row.get("path") or not row.get("label"):
            raise TrainingDataError(f"{data} line {line}: empty path or label", details={"path": str(data)})
        path = Path(row["path"])
        path = path if path.is_absolute() else data.parent / path
        if not path.is_file():
            raise TrainingDataError(f"{data} line {line}: no file at {path}", details={"path": str(path)})
        examples.append(LabelledFile(path, row["label"]))
    if not examples:
        raise TrainingDataError(f"{data} lists no images", details={"path": str(data)})
    return examples


def _has_dicm_marker(path: Path) -> bool:
    with path.open("rb") as handle:
        handle.seek(_DICM_OFFSET)
        return handle.read(4) == b"DICM"


def _load_picture(path: Path) -> Image.Image:
    try:
        with Image.open(path) as opened:
            opened.load()
            image = opened
    except (UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise TrainingDataError(
            f"cannot read {path} as a picture: {type(exc).__name__}", details={"path": str(path)}
        ) from exc
    if image.mode in ("RGB", "L"):
        pixels = np.asarray(image)
    elif image.mode.startswith("I") or image.mode == "F":
        # 16-bit or float grayscale: stretch the stored range onto 0..255, as a default window would.
        values = np.asarray(image, dtype=np.float64)
        low = float(values.min())
        pixels = scale_to_uint8(values - low, max(float(values.max()) - low, 1.0))
    else:
        pixels = np.asarray(image.convert("RGB"))
    if pixels.ndim == 2:
        pixels = gray_to_rgb(pixels)
    return Image.fromarray(np.ascontiguousarray(pad_to_square(pixels)))


def _load_dicom(path: Path) -> Image.Image:
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, EOFError, ValueError, KeyError) as exc:
        raise TrainingDataError(
            f"cannot read {path} as DICOM: {type(exc).__name__}: {exc}", details={"path": str(path)}
        ) from exc
    ref = InstanceRef.of_dataset(ds, missing_uid="unknown")
    try:
        return prepare_instance(ds, ref).image
    except MedagentError as exc:
        raise DicomDecodeError(f"{path}: {exc.message}", details={**exc.details, "path": str(path)}) from exc
