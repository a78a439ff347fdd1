"""How much of MedSigLIP's bare speed survives medagent's image path (decode + prepare + embed).

The image path a run takes for every DICOM instance is: parse the Part 10 bytes, decode the
pixels, apply the modality/VOI pipeline (:func:`agent.sources.pixels.prepare_instance`), then
:meth:`agent.inference.medsiglip.MedSigLIP.embed_images` (processor resize/normalise, forward,
L2-normalise). The reference is the bare model forward on pixel tensors prepared in advance. Both
run on a real-size random-weight SigLIP (the ``google/medsiglip-448`` configuration: a 27-layer,
1152-wide so400m tower per modality, 448x448 inputs, patch 14) in the dtype the settings pick
(bf16 on a CPU with a bf16 path), interleaved, and the medians are compared.

Random weights cost exactly what trained ones do, so the throughput figures hold for the real
checkpoint; the embeddings themselves are meaningless.
"""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from agent.domain.refs import InstanceRef
from agent.inference.loading import dtype_name, select_device, select_dtype
from agent.inference.medsiglip import MedSigLIP
from agent.inference.protocols import ModelIdentity
from agent.sources.pixels import prepare_instance

#: The ``google/medsiglip-448`` architecture (SigLIP so400m/14 at 448 px, 64-token text).
MEDSIGLIP_448: dict[str, dict[str, Any]] = {
    "text_config": {
        "vocab_size": 32000,
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "max_position_embeddings": 64,
        "projection_size": 1152,
    },
    "vision_config": {
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "image_size": 448,
        "patch_size": 14,
    },
}


@dataclass
class PathTiming:
    """Medians of the two sides, in images per second, and their ratio."""

    path_images_per_s: float
    bare_images_per_s: float
    images: int
    batch_size: int
    repeats: int
    dtype: str

    @property
    def efficiency(self) -> float:
        """Return the image path's throughput as a share of the bare forward's."""
        return self.path_images_per_s / self.bare_images_per_s


def real_size_medsiglip(processor_dir: Path, *, dtype_setting: str = "auto", seed: int = 0) -> MedSigLIP:
    """Build a random-weight MedSigLIP of the real size, wrapped in the project's adapter.

    The image processor comes from ``processor_dir`` (the tiny test model's, which has the real
    model's image settings: 448x448, mean = std = 0.5); the weights are random.
    """
    from transformers import AutoProcessor, SiglipConfig, SiglipModel

    device = select_device("auto")
    dtype = select_dtype(dtype_setting, device)
    config = SiglipConfig(text_config=MEDSIGLIP_448["text_config"], vision_config=MEDSIGLIP_448["vision_config"])
    previous = torch.get_default_dtype()
    torch.manual_seed(seed)
    # Built directly in the target dtype: half the memory and time of float32 then cast.
    torch.set_default_dtype(dtype)
    try:
        model = SiglipModel(config).eval().to(device)
    finally:
        torch.set_default_dtype(previous)
    processor = AutoProcessor.from_pretrained(processor_dir)
    identity = ModelIdentity(
        model_id="random-weight medsiglip-448 (benchmark)",
        backend="transformers",
        device=device,
        dtype=dtype_name(dtype),
        test_model=True,
    )
    return MedSigLIP(model, processor, identity, batch_size=8)


def synthetic_radiographs(count: int, size: int = 1024, seed: int = 0) -> list[bytes]:
    """Return ``count`` DICOM Part 10 files (12-bit MONOCHROME2, ``size`` square, windowed) as bytes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    files = []
    for _ in range(count):
        body = 2000 + 1200 * np.exp(-(((xx - size / 2) / (size / 3)) ** 2 + ((yy - size / 2) / (size / 2.5)) ** 2))
        pixels = np.clip(body + rng.normal(0, 60, (size, size)), 0, 4095).astype(np.uint16)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.preamble = b"\0" * 128
        ds.SOPClassUID = SecondaryCaptureImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.Modality = "DX"
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.WindowCenter, ds.WindowWidth = 2600, 2400
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        ds.PixelData = pixels.tobytes()
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        files.append(buffer.getvalue())
    return files


def image_path(model: MedSigLIP, files: list[bytes]) -> torch.Tensor:
    """Run medagent's path on Part 10 bytes: parse, decode, prepare, embed (batched by the adapter)."""
    prepared = []
    for raw in files:
        ds = dcmread(io.BytesIO(raw))
        prepared.append(prepare_instance(ds, InstanceRef.of_dataset(ds)).image)
    return model.embed_images(prepared)


def bare_forward(model: MedSigLIP, pixel_batches: list[torch.Tensor]) -> None:
    """Run only the vision forward on ready pixel tensors, as a model benchmark would."""
    with torch.inference_mode():
        for pixel_values in pixel_batches:
            model.model.get_image_features(pixel_values=pixel_values)


def measure_siglip_path(
    model: MedSigLIP, *, images: int = 8, repeats: int = 3, echo: Callable[[str], None] = print
) -> PathTiming:
    """Time the image path and the bare forward on the same images, interleaved, after one warm-up each."""
    files = synthetic_radiographs(images)
    if image_path(model, files).shape[0] != images:
        raise RuntimeError("the image path returned the wrong number of embeddings")
    datasets = [dcmread(io.BytesIO(raw)) for raw in files]
    pictures = [prepare_instance(ds, InstanceRef.of_dataset(ds)).image for ds in datasets]
    batches = [
        model.processor(images=pictures[start : start + model.batch_size], return_tensors="pt")["pixel_values"].to(
            next(model.model.parameters()).device, dtype=next(model.model.parameters()).dtype
        )
        for start in range(0, images, model.batch_size)
    ]
    bare_forward(model, batches)
    path_s: list[float] = []
    bare_s: list[float] = []
    for repeat in range(repeats):
        started = time.perf_counter()
        image_path(model, files)
        path_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        bare_forward(model, batches)
        bare_s.append(time.perf_counter() - started)
        echo(f"  siglip repeat {repeat + 1}/{repeats}: path {path_s[-1]:.2f} s, bare {bare_s[-1]:.2f} s")
    return PathTiming(
        path_images_per_s=images / statistics.median(path_s),
        bare_images_per_s=images / statistics.median(bare_s),
        images=images,
        batch_size=model.batch_size,
        repeats=repeats,
        dtype=model.identity.dtype,
    )
