"""MedSigLIP in-process: image and text embeddings and zero-shot image findings.

Sits at the image-findings stage: prepared images (square RGB) come in from the sources, and the
zero-shot label scores (and embeddings, for similar-case retrieval) go to the trace and on to
MedGemma's context. The same code loads ``google/medsiglip-448`` and the tiny random-weight test
model, through ``AutoModel`` and ``AutoProcessor``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from agent.domain.imaging import LabelScore
from agent.errors import ModelOutputError, ModelUnavailableError
from agent.inference.labels import CXR_LABELS_V1, LabelSet
from agent.inference.loading import load_pretrained, local_identity
from agent.inference.protocols import ModelIdentity

#: MedSigLIP was trained on texts padded to 64 tokens; shorter padding changes the embedding.
TEXT_MAX_LENGTH = 64
_TEXT_CACHE_SIZE = 1024
_TEXTS_PER_IMAGE_SLOT = 4


class MedSigLIP:
    """An :class:`~agent.inference.protocols.ImageScorer` backed by a local SigLIP checkpoint.

    Embeddings come back L2-normalised, as float32 on the CPU, so callers (the similar-case
    index, the trace) never deal with the model's device or dtype. Text embeddings are cached per
    text: label prompts are the same for every image, so each is encoded once per process.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        identity: ModelIdentity,
        *,
        prompts: Mapping[str, str] | None = None,
        batch_size: int = 16,
    ) -> None:
        """Wrap an already loaded model; use :meth:`load` to load one from a folder.

        Args:
            model: a ``SiglipModel`` in eval mode.
            processor: its ``SiglipProcessor``.
            identity: what the trace records for calls to this model.
            prompts: label name -> prompt; a label passed to :meth:`zero_shot` that is a key here
                is scored with its prompt, any other label is used as its own prompt. Defaults
                to :data:`~agent.inference.labels.CXR_LABELS_V1`.
            batch_size: images encoded per forward pass.
        """
        self.model = model
        self.processor = processor
        self.identity = identity
        self.prompts = dict(CXR_LABELS_V1.prompt_map() if prompts is None else prompts)
        self.batch_size = batch_size
        self._device = next(model.parameters()).device
        self._dtype = next(model.parameters()).dtype
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        # One forward pass at a time: parallel calls would only fight over the same cores or GPU
        # memory, and the cache is not safe to mutate from two threads.
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: Path, *, model_id: str, device: str, dtype: torch.dtype, test_model: bool) -> MedSigLIP:
        """Load a SigLIP checkpoint (e.g. ``google/medsiglip-448``) from a local folder.

        Args:
            path: the model folder (from :func:`~agent.inference.loading.resolve_model_path`).
            model_id: the name recorded in the trace.
            device: torch device string, from :func:`~agent.inference.loading.select_device`.
            dtype: weights dtype, from :func:`~agent.inference.loading.select_dtype`.
            test_model: whether these are tiny random weights (recorded in the trace).

        Raises:
            ModelUnavailableError: when the folder cannot be loaded as a SigLIP model.
        """
        from transformers import AutoModel

        processor, model = load_pretrained(
            AutoModel, path, dtype=dtype, device=device, label="MedSigLIP", model_id=model_id
        )
        if not hasattr(model, "get_image_features") or not hasattr(model, "logit_bias"):
            raise ModelUnavailableError(
                f"the model in {path} is a {type(model).__name__}, not a SigLIP image-text model",
                details={"path": str(path), "model": model_id},
            )
        identity = local_identity(path, model_id=model_id, device=device, dtype=dtype, test_model=test_model)
        return cls(model, processor, identity)

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Return one L2-normalised embedding per image, shape ``(len(images), dim)``.

        Args:
            images: PIL images of any size; non-RGB ones are converted, and the processor resizes
                them to the model's input size (448x448 for MedSigLIP). They should already be
                square: resizing does not pad, so other shapes get distorted.

        Raises:
            ModelOutputError: when the model call fails.
        """
        if not images:
            return torch.empty((0, self._embedding_dim()), dtype=torch.float32)
        rows: list[torch.Tensor] = []
        with self._lock:
            for start in range(0, len(images), self.batch_size):
                batch = [_as_rgb(image) for image in images[start : start + self.batch_size]]
                rows.append(self._encode_images(batch))
        return torch.cat(rows)

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Return one L2-normalised embedding per text, shape ``(len(texts), dim)``.

        Texts are padded to 64 tokens, as MedSigLIP was trained; embeddings are cached per text.

        Raises:
            ModelOutputError: when the model call fails.
        """
        if not texts:
            return torch.empty((0, self._embedding_dim()), dtype=torch.float32)
        with self._lock:
            missing = list(dict.fromkeys(text for text in texts if text not in self._text_cache))
            # Texts are short (64 tokens), so a batch holds more of them than of images.
            text_batch = self.batch_size * _TEXTS_PER_IMAGE_SLOT
            for start in range(0, len(missing), text_batch):
                chunk = missing[start : start + text_batch]
                for text, row in zip(chunk, self._encode_texts(chunk), strict=True):
                    self._text_cache[text] = row
            for text in texts:
                self._text_cache.move_to_end(text)
            result = torch.stack([self._text_cache[text] for text in texts])
            while len(self._text_cache) > _TEXT_CACHE_SIZE:
                self._text_cache.popitem(last=False)
        return result

    def zero_shot(self, images: list[Image.Image], labels: list[str]) -> list[list[LabelScore]]:
        """Score every label on every image: sigmoid(exp(logit_scale) * cos + logit_bias).

        Each score is independent (a sigmoid, not a softmax over labels), so several findings
        can score high on the same image, and none need.

        Args:
            images: PIL images, as for :meth:`embed_images`.
            labels: label names (scored with their prompt, see ``prompts``) or free-text prompts.

        Returns:
            One list per image, in label order, each score in (0, 1).

        Raises:
            ModelOutputError: when the model call fails.
        """
        if not images or not labels:
            return [[] for _ in images]
        image_embeddings = self.embed_images(images)
        text_embeddings = self.embed_texts([self.prompts.get(label, label) for label in labels])
        scale, bias = self.logit_parameters()
        probabilities = torch.sigmoid(scale * image_embeddings @ text_embeddings.T + bias)
        return [
            [LabelScore(label=label, score=float(score)) for label, score in zip(labels, row, strict=True)]
            for row in probabilities.tolist()
        ]

    def score_label_set(self, images: Sequence[Image.Image], label_set: LabelSet) -> list[list[LabelScore]]:
        """Embed the images and score a versioned label set on them; see :meth:`score_embeddings`.

        Args:
            images: PIL images, as for :meth:`embed_images`.
            label_set: the set to score; its labels name the scores, in order.

        Raises:
            ModelOutputError: when the model call fails.
        """
        if not images:
            return []
        return self.score_embeddings(self.embed_images(images), label_set)

    def score_embeddings(self, image_embeddings: torch.Tensor, label_set: LabelSet) -> list[list[LabelScore]]:
        """Score a label set on image embeddings already computed, with each label's negation where it has one.

        Per label, ``score`` is sigmoid(exp(logit_scale) * cos(image, positive) + logit_bias),
        exactly as :meth:`zero_shot` computes it. When the label has a negative prompt,
        ``negative_score`` is the same sigmoid for the negative prompt and ``pair_probability``
        the softmax over the two logits, for the positive one: the model's bias cancels there,
        so it reads "finding rather than its absence" independently of how each prompt happens to
        be calibrated. The graph embeds a study's images once and derives zero-shot labels,
        classifier scores and similar cases from the same rows, hence this entry point.

        Args:
            image_embeddings: ``(n, dim)`` L2-normalised rows from :meth:`embed_images`.
            label_set: the set to score; all its prompts go through the text tower in one cached call.

        Returns:
            One list per image, in the set's label order.

        Raises:
            ModelOutputError: when the text encoding fails.
        """
        count = len(image_embeddings)
        if count == 0 or not label_set.labels:
            return [[] for _ in range(count)]
        labels = label_set.labels
        negatives = [item.negative_prompt for item in labels if item.negative_prompt]
        text_embeddings = self.embed_texts([*label_set.prompts, *negatives])
        scale, bias = self.logit_parameters()
        logits = scale * image_embeddings.float() @ text_embeddings.T + bias
        positive = logits[:, : len(labels)]
        # Column of each label's negative prompt among the logits (after the positives), or None.
        columns: list[int | None] = []
        next_column = len(labels)
        for item in labels:
            columns.append(next_column if item.negative_prompt else None)
            next_column += 1 if item.negative_prompt else 0
        rows: list[list[LabelScore]] = [[] for _ in range(count)]
        for index, (item, column) in enumerate(zip(labels, columns, strict=True)):
            pos_scores = torch.sigmoid(positive[:, index]).tolist()
            if column is None:
                for row, score in zip(rows, pos_scores, strict=True):
                    row.append(LabelScore(label=item.label, score=score))
                continue
            negative = logits[:, column]
            neg_scores = torch.sigmoid(negative).tolist()
            pairs = torch.softmax(torch.stack([positive[:, index], negative], dim=1), dim=1)[:, 0].tolist()
            for row, score, neg, pair in zip(rows, pos_scores, neg_scores, pairs, strict=True):
                row.append(LabelScore(label=item.label, score=score, negative_score=neg, pair_probability=pair))
        return rows

    @property
    def embedding_dim(self) -> int:
        """Return the length of the image and text embeddings (1152 for MedSigLIP-448)."""
        return self._embedding_dim()

    def logit_parameters(self) -> tuple[float, float]:
        """Return the model's own ``(exp(logit_scale), logit_bias)`` as floats."""
        scale = float(self.model.logit_scale.detach().float().exp().item())
        bias = float(self.model.logit_bias.detach().float().item())
        return scale, bias

    def _encode_images(self, batch: list[Image.Image]) -> torch.Tensor:
        try:
            inputs = self.processor(images=batch, return_tensors="pt")
            pixel_values = inputs["pixel_values"].to(self._device, dtype=self._dtype)
            with torch.inference_mode():
                output = self.model.get_image_features(pixel_values=pixel_values)
        except Exception as exc:
            raise ModelOutputError(
                f"MedSigLIP image encoding failed ({type(exc).__name__})",
                details={"model": self.identity.model_id, "error": str(exc)[:500]},
            ) from exc
        return _normalised(output)

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        try:
            inputs = self.processor(
                text=texts, padding="max_length", max_length=TEXT_MAX_LENGTH, truncation=True, return_tensors="pt"
            )
            # Only input_ids: SigLIP was trained without a text attention mask (pads attended,
            # last position pooled). transformers 5 returns a mask, and passing it changes the
            # embedding.
            input_ids = inputs["input_ids"].to(self._device)
            with torch.inference_mode():
                output = self.model.get_text_features(input_ids=input_ids)
        except Exception as exc:
            raise ModelOutputError(
                f"MedSigLIP text encoding failed ({type(exc).__name__})",
                details={"model": self.identity.model_id, "error": str(exc)[:500]},
            ) from exc
        return _normalised(output)

    def _embedding_dim(self) -> int:
        return int(self.model.config.vision_config.hidden_size)


def _normalised(output: Any) -> torch.Tensor:
    # transformers 5 returns an output object from get_*_features; older versions a tensor.
    embeddings = output if isinstance(output, torch.Tensor) else output.pooler_output
    return F.normalize(embeddings.float(), dim=-1).cpu()


def _as_rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")
