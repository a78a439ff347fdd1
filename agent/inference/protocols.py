"""The model interfaces the graph depends on, and the records a model call leaves.

Implementations load real checkpoints with transformers' Auto classes; tests load tiny
random-weight models of the same classes through the same code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from agent.domain.imaging import LabelScore

if TYPE_CHECKING:  # torch is heavy; the service imports this module without loading models
    import torch

    from agent.inference.labels import LabelSet


class ModelIdentity(BaseModel):
    """Which weights answered: what the trace records for every model call."""

    model_id: str = Field(description="Hub id or local path as configured")
    backend: str = Field(description="'transformers' (in-process) or a remote backend name")
    revision: str | None = Field(None, description="Hub commit, or a hash of the weights' index")
    device: str = "cpu"
    dtype: str = "float32"
    test_model: bool = Field(False, description="True for tiny random-weight models")


class GenerationRequest(BaseModel):
    """One MedGemma call: instructions, user text and images (in order)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    system: str
    user_text: str
    images: list[Image.Image] = Field(default_factory=list)
    max_new_tokens: int = 256
    do_sample: bool = False


class GenerationResult(BaseModel):
    """What came back, with the counts and timing the trace keeps."""

    text: str
    prompt_tokens: int
    output_tokens: int
    latency_s: float
    parameters: dict[str, Any] = Field(default_factory=dict)


class ImageScorer(Protocol):
    """MedSigLIP: embeddings of images and texts in one space, and zero-shot scores of labels on images."""

    identity: ModelIdentity

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Return one L2-normalised embedding per image, shape ``(len(images), dim)``."""
        ...

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Return one L2-normalised embedding per text, shape ``(len(texts), dim)``."""
        ...

    def score_embeddings(self, image_embeddings: torch.Tensor, label_set: LabelSet) -> list[list[LabelScore]]:
        """Score a label set on already computed image embeddings (one list per image, label order)."""
        ...

    def zero_shot(self, images: list[Image.Image], labels: list[str]) -> list[list[LabelScore]]:
        """Score every label on every image: sigmoid(exp(logit_scale) * cos + logit_bias).

        Returns one list per image, in label order.
        """
        ...


class Reasoner(Protocol):
    """MedGemma: text (and images) in, text out."""

    identity: ModelIdentity

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Run one greedy generation; thinking blocks are stripped from ``text``."""
        ...
