"""Load the two models a run needs, real or tiny, from the model settings.

Called once per process by whatever builds the run context (the CLI, the service); the graph
only ever sees the resulting adapters. Real weights are looked up on this machine only. When
they are missing the settings decide: fail with instructions, or fall back to tiny random-weight
models and say so in a banner the caller shows the user.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from agent.config import ModelSettings
from agent.errors import ConfigError, ModelUnavailableError
from agent.inference.loading import resolve_model_path, select_device, select_dtype
from agent.inference.medgemma import MedGemma
from agent.inference.medsiglip import MedSigLIP
from agent.inference.protocols import ImageScorer, Reasoner
from agent.inference.remote_medgemma import RemoteMedGemma
from agent.inference.tiny_models import ensure_test_models

TINY_MEDSIGLIP_ID = "tiny-random-medsiglip (test model)"
TINY_MEDGEMMA_ID = "tiny-random-medgemma (test model)"


@dataclass
class LoadedModels:
    """The adapters for one process, and whether they are the tiny test models."""

    scorer: ImageScorer
    reasoner: Reasoner
    used_test_models: bool
    banner: str | None = None


def load_models(settings: ModelSettings) -> LoadedModels:
    """Load MedSigLIP and MedGemma as the settings ask.

    With ``use_test_models`` the tiny random-weight models are built (once) under
    ``test_models_dir`` and loaded. Otherwise both real models are resolved first; if either is
    missing and ``fallback_to_test_models`` is set, both tiny models are loaded instead (never a
    mix of real and random, which would look more trustworthy than it is) and ``banner`` explains
    why. Only *missing* weights fall back: weights that exist but fail to load raise, since that
    is a broken installation the user should hear about.

    Args:
        settings: the ``models`` group of the settings.

    Returns:
        The adapters, whether they are test models, and the banner to show (or ``None``).

    Raises:
        ModelUnavailableError: when real weights are missing and fallback is off, or when
            weights cannot be loaded.
        ConfigError: for an unusable device or dtype setting.
    """
    device = select_device(settings.device)
    dtype = select_dtype(settings.dtype, device)
    if settings.backend == "remote":
        # Checked before any weights load, so a missing setting fails in a second, not a minute.
        remote = build_remote_reasoner(settings)
        image_model = load_image_model(settings)
        used_test = image_model.identity.test_model
        banner = _remote_banner(settings) if used_test else None
        return LoadedModels(scorer=image_model, reasoner=remote, used_test_models=used_test, banner=banner)
    if settings.use_test_models:
        return _load_test_models(
            settings.test_models_dir, device=device, dtype=dtype, banner=None, call_timeout_s=settings.call_timeout_s
        )

    missing: list[ModelUnavailableError] = []
    paths: dict[str, Path] = {}
    for key, name, env_var in (
        ("medsiglip", settings.medsiglip, "MEDAGENT_MODELS__MEDSIGLIP"),
        ("medgemma", settings.medgemma, "MEDAGENT_MODELS__MEDGEMMA"),
    ):
        try:
            paths[key] = resolve_model_path(name, env_var=env_var)
        except ModelUnavailableError as exc:
            missing.append(exc)
    if missing:
        if not settings.fallback_to_test_models:
            raise missing[0]
        tried = [settings.medsiglip, settings.medgemma]
        not_found = [str(exc.details.get("model", "?")) for exc in missing]
        return _load_test_models(
            settings.test_models_dir,
            device=device,
            dtype=dtype,
            banner=_fallback_banner(tried, not_found),
            call_timeout_s=settings.call_timeout_s,
        )

    scorer = MedSigLIP.load(
        paths["medsiglip"], model_id=settings.medsiglip, device=device, dtype=dtype, test_model=False
    )
    reasoner = MedGemma.load(
        paths["medgemma"],
        model_id=settings.medgemma,
        device=device,
        dtype=dtype,
        test_model=False,
        call_timeout_s=settings.call_timeout_s,
    )
    return LoadedModels(scorer=scorer, reasoner=reasoner, used_test_models=False)


def build_remote_reasoner(settings: ModelSettings) -> RemoteMedGemma:
    """Return the OpenAI-compatible MedGemma client the settings describe (nothing is sent yet).

    Raises:
        ConfigError: when ``remote_url`` or ``remote_model`` is missing, or the URL is unusable.
    """
    missing = [
        env
        for env, value in (
            ("MEDAGENT_MODELS__REMOTE_URL", settings.remote_url),
            ("MEDAGENT_MODELS__REMOTE_MODEL", settings.remote_model),
        )
        if not (value and value.strip())
    ]
    if missing or settings.remote_url is None or settings.remote_model is None:
        raise ConfigError(
            f"MEDAGENT_MODELS__BACKEND=remote needs {' and '.join(missing)}: the OpenAI API root of the "
            "MedGemma server (e.g. http://127.0.0.1:8001/v1) and the model name it serves",
            details={"missing": missing},
        )
    key = settings.remote_api_key.get_secret_value() if settings.remote_api_key is not None else None
    return RemoteMedGemma(
        settings.remote_url,
        settings.remote_model,
        api_key=key,
        timeout_s=settings.remote_timeout_s,
        max_retries=settings.remote_max_retries,
        call_timeout_s=settings.call_timeout_s,
    )


def load_image_model(settings: ModelSettings) -> MedSigLIP:
    """Load MedSigLIP alone, for tools that only embed images (classifier, similar-case index).

    Follows the same rules as :func:`load_models`: the tiny model with ``use_test_models``, or
    when real weights are missing and ``fallback_to_test_models`` is set (with a warning on
    stderr); otherwise the real weights or a :class:`ModelUnavailableError` saying how to get them.
    """
    device = select_device(settings.device)
    dtype = select_dtype(settings.dtype, device)
    if not settings.use_test_models:
        try:
            path = resolve_model_path(settings.medsiglip, env_var="MEDAGENT_MODELS__MEDSIGLIP")
        except ModelUnavailableError:
            if not settings.fallback_to_test_models:
                raise
            print(_fallback_banner([settings.medsiglip], [settings.medsiglip]), file=sys.stderr)
        else:
            return MedSigLIP.load(path, model_id=settings.medsiglip, device=device, dtype=dtype, test_model=False)
    medsiglip_dir, _ = ensure_test_models(settings.test_models_dir)
    return MedSigLIP.load(
        medsiglip_dir, model_id=f"{TINY_MEDSIGLIP_ID} at {medsiglip_dir}", device=device, dtype=dtype, test_model=True
    )


def _load_test_models(
    base_dir: Path, *, device: str, dtype: torch.dtype, banner: str | None, call_timeout_s: float | None = None
) -> LoadedModels:
    medsiglip_dir, medgemma_dir = ensure_test_models(base_dir)
    scorer = MedSigLIP.load(
        medsiglip_dir,
        model_id=f"{TINY_MEDSIGLIP_ID} at {medsiglip_dir}",
        device=device,
        dtype=dtype,
        test_model=True,
    )
    reasoner = MedGemma.load(
        medgemma_dir,
        model_id=f"{TINY_MEDGEMMA_ID} at {medgemma_dir}",
        device=device,
        dtype=dtype,
        test_model=True,
        call_timeout_s=call_timeout_s,
    )
    return LoadedModels(scorer=scorer, reasoner=reasoner, used_test_models=True, banner=banner)


def _remote_banner(settings: ModelSettings) -> str:
    return (
        "TEST MODEL IN USE for MedSigLIP: tiny random-weight image model, so image findings are "
        f"meaningless noise; MedGemma answers from {settings.remote_model!r} on the remote endpoint."
    )


def _fallback_banner(tried: list[str], not_found: list[str]) -> str:
    return (
        "TEST MODELS IN USE: real model weights were not found on this machine "
        f"(tried {', '.join(repr(name) for name in tried)}; missing: "
        f"{', '.join(repr(name) for name in not_found)}), so tiny random-weight stand-ins of the "
        "same model classes are loaded instead. Every finding and answer below is meaningless "
        "noise, although the flow around it (record access, prompts, citations, trace) is real. "
        "To use the real models, accept their licences on huggingface.co, set HF_TOKEN and run "
        "`huggingface-cli download <id>` on a machine with network (copying the cache here), or "
        "set MEDAGENT_MODELS__MEDGEMMA / MEDAGENT_MODELS__MEDSIGLIP to local folders."
    )
