"""The model interfaces the graph depends on, and the records a model call leaves.

Implementations load real checkpoints with transformers' Auto classes; tests load tiny
random-weight models of the same classes through the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Protocol, Self

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

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
    """One MedGemma call: instructions, user text and images (in order).

    Without ``image_labels`` the user turn is the images, then the user text. With them (one
    label per image) it is label 1, image 1, label 2, image 2, ..., then the user text: how
    MedGemma 1.5 is shown a CT series, each slice preceded by ``"SLICE n"``.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    system: str
    user_text: str
    images: list[Image.Image] = Field(default_factory=list)
    image_labels: list[str] | None = Field(None, description="One text label per image, placed before it")
    max_new_tokens: int = 256
    do_sample: bool = False

    @model_validator(mode="after")
    def _labels_match_images(self) -> Self:
        if self.image_labels is not None and len(self.image_labels) != len(self.images):
            raise ValueError(
                f"image_labels has {len(self.image_labels)} labels for {len(self.images)} images; give one per image"
            )
        return self


#: Why generation stopped: an end token, ``max_new_tokens``, or the call's time limit.
FinishReason = Literal["stop", "length", "timeout"]


class GenerationResult(BaseModel):
    """What came back, with the counts and timing the trace keeps.

    Image references are not repeated here: the caller knows which images it sent and records
    them beside the prompt.
    """

    text: str
    prompt_tokens: int
    output_tokens: int
    latency_s: float
    parameters: dict[str, Any] = Field(default_factory=dict)
    finish_reason: FinishReason | None = Field(None, description="None when the backend did not say")


class GenerationStream:
    """The answer of one generation as it is produced: iterate for text deltas, then read ``result``.

    Iterating yields pieces of the answer (thinking blocks already removed); joined, they equal
    ``result.text``. Once iteration has ended, :attr:`result` holds the same record
    :meth:`Reasoner.generate` returns (counts, latency, finish reason). Stopping early: call
    :meth:`close` (or use the stream as a context manager), which ends the generation behind it
    and releases the model; ``result`` is then unavailable.

    Backends build one from a generator that yields the deltas and *returns* the result.
    """

    def __init__(
        self, chunks: Generator[str, None, GenerationResult], on_close: Callable[[], None] | None = None
    ) -> None:
        """Wrap a generator of deltas whose return value is the final result.

        Args:
            chunks: yields answer deltas and returns the :class:`GenerationResult`.
            on_close: called once when the stream is closed before or after exhaustion.
        """
        self._chunks = chunks
        self._on_close = on_close
        self._result: GenerationResult | None = None
        self._closed = False

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if self._result is not None or self._closed:
            raise StopIteration
        try:
            return next(self._chunks)
        except StopIteration as stop:
            self._result = stop.value
            self.close()
            raise
        except BaseException:
            # The generation failed: release what it held before the error reaches the caller.
            self.close()
            raise

    @property
    def result(self) -> GenerationResult:
        """The final record; raises ``RuntimeError`` until the stream has been read to the end."""
        if self._result is None:
            raise RuntimeError("the generation stream has not been read to the end; iterate over it first")
        return self._result

    @property
    def done(self) -> bool:
        """Whether the stream was read to the end (``result`` is available)."""
        return self._result is not None

    def text(self) -> str:
        """Read the rest of the stream and return the whole answer (``result.text``)."""
        for _ in self:
            pass
        return self.result.text

    def close(self) -> None:
        """Stop the generation if it is still running and release what it holds; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._chunks.close()
        finally:
            if self._on_close is not None:
                self._on_close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


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

    def stream(self, request: GenerationRequest) -> GenerationStream:
        """Start the same generation as :meth:`generate`, yielding answer text as it is produced.

        Thinking blocks are never yielded. After the stream is exhausted its ``result`` equals
        what :meth:`generate` would have returned (with greedy decoding, the same text).
        """
        ...
