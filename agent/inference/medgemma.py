"""MedGemma in-process: one greedy generation over instructions, context and images.

Sits at the reasoning stage (and the planning step before it): the graph hands over a
:class:`~agent.inference.protocols.GenerationRequest` built from the thread's state, and gets
back the answer text with the counts and timing the trace keeps. The same code loads
``google/medgemma-4b-it`` / ``google/medgemma-1.5-4b-it`` and the tiny random-weight test
model, through ``AutoModelForImageTextToText`` and ``AutoProcessor``.
"""

from __future__ import annotations

import copy
import re
import threading
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from agent.errors import ModelOutputError, ModelUnavailableError
from agent.inference.loading import load_pretrained, local_identity
from agent.inference.protocols import GenerationRequest, GenerationResult, ModelIdentity

#: MedGemma (1.5) may think before answering, between these two markers.
THINKING_START = "<unused94>"
THINKING_END = "<unused95>"
# Values at which the sampling knobs do nothing (transformers' own defaults).
_NEUTRAL_SAMPLING = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": None, "typical_p": 1.0}
_THINKING_BLOCK = re.compile(re.escape(THINKING_START) + r".*?" + re.escape(THINKING_END), re.DOTALL)


def strip_thinking(text: str) -> str:
    """Remove MedGemma's thinking blocks from decoded text, keeping only the answer.

    Handles a complete block (``<unused94>...<unused95>``), several blocks, a block cut off by
    ``max_new_tokens`` (everything from an unmatched ``<unused94>`` on is dropped), and a closing
    marker without its opener (the opener sat in the prompt: everything up to it is dropped).

    Args:
        text: generated text decoded with the special tokens still visible.

    Returns:
        The text outside thinking blocks, stripped of surrounding whitespace.
    """
    text = _THINKING_BLOCK.sub("", text)
    if THINKING_END in text:
        text = text.rsplit(THINKING_END, 1)[1]
    if THINKING_START in text:
        text = text.split(THINKING_START, 1)[0]
    return text.strip()


class MedGemma:
    """A :class:`~agent.inference.protocols.Reasoner` backed by a local Gemma 3 checkpoint."""

    def __init__(self, model: Any, processor: Any, identity: ModelIdentity) -> None:
        """Wrap an already loaded model; use :meth:`load` to load one from a folder.

        Args:
            model: a ``Gemma3ForConditionalGeneration`` in eval mode.
            processor: its ``Gemma3Processor`` (tokenizer with the chat template).
            identity: what the trace records for calls to this model.
        """
        self.model = model
        self.processor = processor
        self.identity = identity
        self._device = next(model.parameters()).device
        self._dtype = next(model.parameters()).dtype
        tokenizer = processor.tokenizer
        # Every special token's text, to remove after thinking blocks are stripped (the markers
        # must survive decoding until then, so decoding keeps special tokens).
        self._special_texts = sorted(
            {added.content for added in tokenizer.added_tokens_decoder.values() if added.special}
            | set(tokenizer.all_special_tokens),
            key=len,
            reverse=True,
        )
        # One generation at a time: concurrent calls would fight for the same cores or GPU memory.
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: Path, *, model_id: str, device: str, dtype: torch.dtype, test_model: bool) -> MedGemma:
        """Load a multimodal MedGemma checkpoint from a local folder.

        Args:
            path: the model folder (from :func:`~agent.inference.loading.resolve_model_path`).
            model_id: the name recorded in the trace.
            device: torch device string, from :func:`~agent.inference.loading.select_device`.
            dtype: weights dtype, from :func:`~agent.inference.loading.select_dtype`.
            test_model: whether these are tiny random weights (recorded in the trace).

        Raises:
            ModelUnavailableError: when the folder cannot be loaded as an image-text model.
        """
        from transformers import AutoModelForImageTextToText

        processor, model = load_pretrained(
            AutoModelForImageTextToText, path, dtype=dtype, device=device, label="MedGemma", model_id=model_id
        )
        if getattr(processor, "chat_template", None) is None:
            raise ModelUnavailableError(
                f"the processor in {path} has no chat template; MedGemma's prompt cannot be built",
                details={"path": str(path), "model": model_id},
            )
        identity = local_identity(path, model_id=model_id, device=device, dtype=dtype, test_model=test_model)
        return cls(model, processor, identity)

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Run one generation; greedy unless the request asks for sampling.

        The system text goes into a system message, which MedGemma's chat template folds into
        the first user turn (the model has no real system turn). Images come before the user
        text, in the order given.

        Raises:
            ModelOutputError: when preparing the prompt or generating fails.
        """
        messages = _messages(request)
        started = time.perf_counter()
        with self._lock:
            try:
                inputs = self.processor.apply_chat_template(
                    messages,
                    tokenize=True,
                    return_dict=True,
                    return_tensors="pt",
                    add_generation_prompt=True,
                ).to(self._device, dtype=self._dtype)
                prompt_tokens = int(inputs["input_ids"].shape[-1])
                with torch.inference_mode():
                    output = self.model.generate(**inputs, generation_config=self._generation_config(request))
            except Exception as exc:
                raise ModelOutputError(
                    f"MedGemma generation failed ({type(exc).__name__})",
                    details={"model": self.identity.model_id, "error": str(exc)[:500]},
                ) from exc
        new_tokens = output[0, prompt_tokens:]
        raw = self.processor.tokenizer.decode(new_tokens, skip_special_tokens=False)
        text = self._remove_special_tokens(strip_thinking(raw))
        return GenerationResult(
            text=text,
            prompt_tokens=prompt_tokens,
            output_tokens=int(new_tokens.shape[-1]),
            latency_s=time.perf_counter() - started,
            parameters={"max_new_tokens": request.max_new_tokens, "do_sample": request.do_sample},
        )

    def _generation_config(self, request: GenerationRequest) -> Any:
        # Start from the checkpoint's config (it holds the stop tokens <eos> and <end_of_turn>).
        # The real checkpoints ship sampling knobs (top_k=64, top_p=0.95); for greedy decoding
        # they are set to transformers' neutral values, because transformers 5 fills any field
        # left None from the checkpoint again and then warns that they are unused.
        config = copy.deepcopy(self.model.generation_config)
        config.max_new_tokens = request.max_new_tokens
        config.do_sample = request.do_sample
        if not request.do_sample:
            config.update(**_NEUTRAL_SAMPLING)
        return config

    def _remove_special_tokens(self, text: str) -> str:
        for special in self._special_texts:
            text = text.replace(special, "")
        return text.strip()


def _messages(request: GenerationRequest) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [{"type": "image", "image": _as_rgb(image)} for image in request.images]
    content.append({"type": "text", "text": request.user_text})
    messages: list[dict[str, Any]] = []
    if request.system.strip():
        messages.append({"role": "system", "content": [{"type": "text", "text": request.system}]})
    messages.append({"role": "user", "content": content})
    return messages


def _as_rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")
