"""Find model weights on this machine and decide where and in what precision they run.

The first step of loading either model, before any weights are read: a configured name becomes
a local folder (a folder path, or a snapshot in the Hugging Face cache; the network is never
touched), the device and dtype settings become concrete values, and the weights get a short
fingerprint that the trace records as the model's revision.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any, BinaryIO

import torch

from agent.errors import ConfigError, ModelUnavailableError
from agent.inference.protocols import ModelIdentity

#: Files below this size are hashed in full; larger ones by their header, size and samples.
_FULL_HASH_LIMIT = 64 * 1024 * 1024
_SAMPLE_BYTES = 1024 * 1024
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_HUB_BLOB_SHA256 = re.compile(r"[0-9a-f]{64}")
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin")

_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}


def resolve_model_path(name_or_path: str, *, env_var: str | None = None, cache_dir: Path | None = None) -> Path:
    """Turn a configured model name into a local folder holding its weights, offline.

    An existing local folder wins; otherwise the name is treated as a Hub id and looked up in
    the Hugging Face cache only. Nothing is downloaded.

    Args:
        name_or_path: a local folder or a Hub id such as ``google/medgemma-4b-it``.
        env_var: the setting that configures this model (e.g. ``MEDAGENT_MODELS__MEDGEMMA``),
            named in the error; both model settings are named when omitted.
        cache_dir: the Hugging Face cache to search; the default cache (``HF_HUB_CACHE``,
            ``HF_HOME``) when omitted.

    Returns:
        The folder that holds ``config.json`` and the weights.

    Raises:
        ModelUnavailableError: when neither a folder nor a complete cached snapshot exists; the
            message says how to get the weights.
    """
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        _check_complete(local, name_or_path)
        return local.resolve()
    if _looks_like_path(name_or_path):
        problem = "is not a folder" if local.exists() else "does not exist"
        raise ModelUnavailableError(
            f"Model folder {name_or_path!r} {problem}. Point "
            f"{env_var or 'MEDAGENT_MODELS__MEDGEMMA / MEDAGENT_MODELS__MEDSIGLIP'} at a folder that "
            "holds the model's config.json and weights, or run with --test-models to use tiny "
            "random-weight models.",
            details={"model": name_or_path},
        )

    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(snapshot_download(repo_id=name_or_path, local_files_only=True, cache_dir=cache_dir))
    except Exception as exc:
        # huggingface_hub raises LocalEntryNotFoundError for a missing snapshot and a validation
        # error for a malformed id; to the user both mean "not on this machine".
        raise ModelUnavailableError(
            missing_model_message(name_or_path, env_var=env_var),
            details={"model": name_or_path, "reason": type(exc).__name__},
        ) from exc
    _check_complete(snapshot, name_or_path)
    return snapshot


def missing_model_message(model_id: str, *, env_var: str | None = None) -> str:
    """Return the instructions shown when the weights of ``model_id`` are not on this machine.

    Args:
        model_id: the Hub id that was looked for.
        env_var: the setting that configures this model; both model settings when omitted.
    """
    setting = env_var or "MEDAGENT_MODELS__MEDGEMMA (MedGemma) or MEDAGENT_MODELS__MEDSIGLIP (MedSigLIP)"
    return (
        f"Model weights for {model_id!r} were not found: it is not a local folder and not in the "
        "Hugging Face cache, and nothing is downloaded at run time. To fix it, either "
        f"(1) accept the licence on https://huggingface.co/{model_id}, then on a machine with "
        f"network set HF_TOKEN and run `huggingface-cli download {model_id}` (`hf download "
        f"{model_id}` with huggingface_hub 1.x), and copy the cache here; or (2) set {setting} to a "
        "local folder holding the weights; or (3) run with --test-models to use tiny "
        "random-weight models (meaningless output, real flow)."
    )


def select_device(setting: str) -> str:
    """Turn the device setting into a torch device string.

    Args:
        setting: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        ConfigError: for an unknown device, or CUDA requested on a machine without it.
    """
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(setting)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"unknown model device {setting!r}; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model device {setting!r} requested, but CUDA is not available here")
    return setting


def select_dtype(setting: str, device: str) -> torch.dtype:
    """Turn the dtype setting into a torch dtype for ``device``.

    ``auto`` picks bfloat16 on CUDA when the GPU supports it (float16 otherwise), bfloat16 on a
    CPU whose oneDNN has a bfloat16 path (AVX-512 or AMX; about twice as fast as float32 there
    and what the checkpoints are stored in), and float32 on any other CPU, where bfloat16 is
    emulated and slow.

    Args:
        setting: ``auto``, ``bfloat16``, ``float16`` or ``float32``.
        device: the device from :func:`select_device`.

    Raises:
        ConfigError: for an unknown dtype name.
    """
    if setting != "auto":
        try:
            return _DTYPES[setting]
        except KeyError:
            raise ConfigError(f"unknown model dtype {setting!r}; use auto, {', '.join(_DTYPES)}") from None
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if _cpu_has_fast_bf16() else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """Return the short name of a dtype (``bfloat16``) as the trace records it."""
    return str(dtype).removeprefix("torch.")


def weights_fingerprint(path: Path) -> str:
    """Return a short, stable hash that identifies the weights in ``path``.

    Each weights file contributes its content hash: the sha256 of small files, the blob name of
    a Hugging Face cache snapshot (which *is* the file's sha256, so no reading is needed), and
    for large files elsewhere a sha256 over the safetensors header, the size and the first and
    last megabyte of data. That last case tells checkpoints apart in practice without reading
    gigabytes at every start; it is not a cryptographic guarantee.

    Args:
        path: a model folder.

    Returns:
        ``sha256:`` followed by 16 hex digits.

    Raises:
        ModelUnavailableError: when the folder holds no weights files.
    """
    files = _weight_files(path)
    if not files:
        raise ModelUnavailableError(
            f"no weights files (*.safetensors, *.bin) in model folder {path}", details={"path": str(path)}
        )
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.relative_to(path).as_posix().encode())
        digest.update(_file_fingerprint(file).encode())
    return f"sha256:{digest.hexdigest()[:16]}"


def _looks_like_path(name: str) -> bool:
    # A Hub id is "owner/name"; anything absolute, relative-dotted or home-based is a folder.
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or "\\" in name


def _check_complete(folder: Path, name: str) -> None:
    if not (folder / "config.json").is_file() or not _weight_files(folder):
        raise ModelUnavailableError(
            f"Model folder {folder} for {name!r} is incomplete: it needs config.json and the "
            "weights (*.safetensors). Download the model again (`huggingface-cli download "
            f"{name}`) or point the setting at a complete folder.",
            details={"model": name, "path": str(folder)},
        )


def _weight_files(folder: Path) -> list[Path]:
    for pattern in _WEIGHT_PATTERNS:
        # safetensors wins: a folder with both formats loads the safetensors files.
        files = sorted(folder.glob(pattern))
        if files:
            return files
    return []


def _file_fingerprint(file: Path) -> str:
    if file.is_symlink():
        blob = Path(os.readlink(file)).name
        if _HUB_BLOB_SHA256.fullmatch(blob):
            return blob
    size = file.stat().st_size
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        if size <= _FULL_HASH_LIMIT:
            for chunk in iter(lambda: handle.read(_SAMPLE_BYTES), b""):
                digest.update(chunk)
            return digest.hexdigest()
        digest.update(str(size).encode())
        digest.update(_safetensors_header(handle))
        digest.update(handle.read(_SAMPLE_BYTES))
        handle.seek(-_SAMPLE_BYTES, os.SEEK_END)
        digest.update(handle.read(_SAMPLE_BYTES))
    return digest.hexdigest()


def _safetensors_header(handle: BinaryIO) -> bytes:
    # A safetensors file starts with an 8-byte little-endian length and that many bytes of JSON
    # (tensor names, dtypes, shapes, offsets). For anything else the bytes read are still a
    # stable part of the file, which is all the fingerprint needs.
    prefix = handle.read(8)
    length = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
    return prefix + handle.read(min(length, _MAX_HEADER_BYTES))


def _cpu_has_fast_bf16() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def load_pretrained(auto_class: Any, path: Path, *, dtype: torch.dtype, device: str, label: str, model_id: str) -> Any:
    """Load processor and model from a local folder with a transformers Auto class.

    Returns:
        ``(processor, model)``, the model moved to ``device`` in eval mode.

    Raises:
        ModelUnavailableError: when the folder cannot be loaded.
    """
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(path)
        model: Any = auto_class.from_pretrained(path, dtype=dtype)
        return processor, model.to(device).eval()
    except Exception as exc:
        raise ModelUnavailableError(
            f"could not load {label} from {path}: {type(exc).__name__}: {exc}",
            details={"path": str(path), "model": model_id},
        ) from exc


def local_identity(path: Path, *, model_id: str, device: str, dtype: torch.dtype, test_model: bool) -> ModelIdentity:
    """Return what the trace records for an in-process transformers model loaded from ``path``."""
    return ModelIdentity(
        model_id=model_id,
        backend="transformers",
        revision=weights_fingerprint(path),
        device=device,
        dtype=dtype_name(dtype),
        test_model=test_model,
    )
