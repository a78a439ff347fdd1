"""MedGemma in-process: one greedy generation over instructions, context and images, whole or streamed.

Sits at the reasoning stage (and the planning step before it): the graph hands over a
:class:`~agent.inference.protocols.GenerationRequest` built from the thread's state, and gets
back the answer text with the counts and timing the trace keeps, either at once
(:meth:`MedGemma.generate`) or token by token (:meth:`MedGemma.stream`). The same code loads
``google/medgemma-4b-it`` / ``google/medgemma-1.5-4b-it`` and the tiny random-weight test model
through ``AutoModelForImageTextToText`` and ``AutoProcessor``, and the text-only
``google/medgemma-27b-text-it`` (config ``model_type`` ``gemma3_text``) through
``AutoModelForCausalLM`` and ``AutoTokenizer``.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any, cast

import torch
from PIL import Image

from agent.errors import ConfigError, ModelOutputError, ModelUnavailableError
from agent.inference.loading import load_pretrained, local_identity
from agent.inference.protocols import (
    FinishReason,
    GenerationRequest,
    GenerationResult,
    GenerationStream,
    ModelIdentity,
)
from agent.inference.thinking import THINKING_END, THINKING_START, StreamCleaner, clean_text, strip_thinking

__all__ = ["THINKING_END", "THINKING_START", "MedGemma", "strip_thinking"]

# Values at which the sampling knobs do nothing (transformers' own defaults).
_NEUTRAL_SAMPLING = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": None, "typical_p": 1.0}
#: ``model_type`` of a text-only Gemma 3 checkpoint such as medgemma-27b-text-it.
TEXT_ONLY_MODEL_TYPE = "gemma3_text"
# How long the streaming reader waits for the next piece beyond the call's own time limit before
# it decides the worker is stuck (a token never takes this long on any supported hardware).
_STREAM_GRACE_S = 60.0


class MedGemma:
    """A :class:`~agent.inference.protocols.Reasoner` backed by a local Gemma 3 checkpoint.

    Multimodal checkpoints take images; a text-only one (``supports_images`` False) refuses a
    request with images with a :class:`~agent.errors.ConfigError`: the request is fine, but the
    deployment chose a model that cannot see, which only its settings can fix.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        identity: ModelIdentity,
        *,
        call_timeout_s: float | None = None,
    ) -> None:
        """Wrap an already loaded model; use :meth:`load` to load one from a folder.

        Args:
            model: a ``Gemma3ForConditionalGeneration`` (or ``Gemma3ForCausalLM``) in eval mode.
            processor: its ``Gemma3Processor``, or for a text-only model its tokenizer (either
                carries the chat template).
            identity: what the trace records for calls to this model.
            call_timeout_s: upper bound on one generation's wall time (transformers' ``max_time``);
                the answer so far is returned with ``finish_reason="timeout"``. None: no bound.
        """
        self.model = model
        self.processor = processor
        self.identity = identity
        self.call_timeout_s = call_timeout_s
        self.tokenizer: Any = getattr(processor, "tokenizer", processor)
        #: Whether this checkpoint has a vision tower (False for medgemma-27b-text-it).
        self.supports_images = hasattr(processor, "image_processor")
        self._device = next(model.parameters()).device
        self._dtype = next(model.parameters()).dtype
        # Every special token's text, to remove after thinking blocks are stripped (the markers
        # must survive decoding until then, so decoding keeps special tokens).
        self._special_texts = sorted(
            {added.content for added in self.tokenizer.added_tokens_decoder.values() if added.special}
            | set(self.tokenizer.all_special_tokens),
            key=len,
            reverse=True,
        )
        eos = model.generation_config.eos_token_id
        self._eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        # One generation at a time: concurrent calls would fight for the same cores or GPU memory.
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls,
        path: Path,
        *,
        model_id: str,
        device: str,
        dtype: torch.dtype,
        test_model: bool,
        call_timeout_s: float | None = None,
    ) -> MedGemma:
        """Load a MedGemma checkpoint from a local folder: multimodal, or text-only Gemma 3.

        The folder's ``config.json`` decides: ``model_type`` ``gemma3_text`` loads with
        ``AutoModelForCausalLM`` + ``AutoTokenizer``; anything else with
        ``AutoModelForImageTextToText`` + ``AutoProcessor``.

        Args:
            path: the model folder (from :func:`~agent.inference.loading.resolve_model_path`).
            model_id: the name recorded in the trace.
            device: torch device string, from :func:`~agent.inference.loading.select_device`.
            dtype: weights dtype, from :func:`~agent.inference.loading.select_dtype`.
            test_model: whether these are tiny random weights (recorded in the trace).
            call_timeout_s: upper bound on one generation's wall time (None: no bound).

        Raises:
            ModelUnavailableError: when the folder cannot be loaded, or has no chat template.
        """
        if _model_type(path) == TEXT_ONLY_MODEL_TYPE:
            processor, model = _load_text_only(path, dtype=dtype, device=device, model_id=model_id)
        else:
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
        return cls(model, processor, identity, call_timeout_s=call_timeout_s)

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Run one generation; greedy unless the request asks for sampling.

        The system text goes into a system message, which MedGemma's chat template folds into
        the first user turn (the model has no real system turn). Images come before the user
        text, in the order given, each after its label when ``image_labels`` is set.

        Raises:
            ConfigError: images sent to a text-only checkpoint.
            ModelOutputError: when preparing the prompt or generating fails.
        """
        self._check_images(request)
        started = time.perf_counter()
        with self._lock:
            try:
                inputs = self._inputs(request)
                prompt_tokens = int(inputs["input_ids"].shape[-1])
                with torch.inference_mode():
                    output = self.model.generate(**inputs, generation_config=self._generation_config(request))
            except Exception as exc:
                raise self._failure(exc) from exc
        new_tokens = output[0, prompt_tokens:]
        raw = self.tokenizer.decode(new_tokens, skip_special_tokens=False)
        latency = time.perf_counter() - started
        return GenerationResult(
            text=clean_text(raw, self._special_texts),
            prompt_tokens=prompt_tokens,
            output_tokens=int(new_tokens.shape[-1]),
            latency_s=latency,
            parameters=self._parameters(request, streamed=False),
            finish_reason=self._finish_reason(new_tokens, request, latency),
        )

    def stream(self, request: GenerationRequest) -> GenerationStream:
        """Start one generation and yield the answer as it is decoded.

        The model runs in a worker thread feeding transformers' ``TextIteratorStreamer``; the
        deltas pass through a :class:`~agent.inference.thinking.StreamCleaner`, so nothing
        inside a thinking block is ever yielded. The model's lock is held from the first
        ``next()`` until the worker has finished; closing the stream early stops the worker at
        its next token. With greedy decoding the joined deltas equal :meth:`generate`'s text.

        Raises:
            ConfigError: images sent to a text-only checkpoint (raised here, before streaming).
            ModelOutputError: from iteration, when preparing the prompt or generating fails.
        """
        self._check_images(request)
        cancel = threading.Event()
        return GenerationStream(self._stream(request, cancel), on_close=cancel.set)

    def _stream(self, request: GenerationRequest, cancel: threading.Event) -> Generator[str, None, GenerationResult]:
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        class _Cancelled(StoppingCriteria):
            def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
                done = torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)
                return cast(torch.BoolTensor, done)

        started = time.perf_counter()
        wait_s = None if self.call_timeout_s is None else self.call_timeout_s + _STREAM_GRACE_S
        with self._lock:
            try:
                inputs = self._inputs(request)
            except Exception as exc:
                raise self._failure(exc) from exc
            prompt_tokens = int(inputs["input_ids"].shape[-1])
            streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, timeout=wait_s, skip_special_tokens=False)
            outcome: dict[str, Any] = {}

            def work() -> None:
                try:
                    with torch.inference_mode():
                        outcome["output"] = self.model.generate(
                            **inputs,
                            generation_config=self._generation_config(request),
                            streamer=streamer,
                            stopping_criteria=StoppingCriteriaList([_Cancelled()]),
                        )
                except BaseException as exc:  # handed to the reading thread, which raises it
                    outcome["error"] = exc
                    streamer.end()

            worker = threading.Thread(target=work, name="medgemma-stream", daemon=True)
            worker.start()
            cleaner = StreamCleaner(self._special_texts)
            pieces: list[str] = []
            try:
                for delta in streamer:
                    cleaned = cleaner.feed(delta)
                    if cleaned:
                        pieces.append(cleaned)
                        yield cleaned
            except Exception as exc:  # queue.Empty: the worker produced nothing for too long
                cancel.set()
                raise self._failure(exc) from exc
            finally:
                # Also reached when the consumer closes the stream early (GeneratorExit): the
                # worker stops at its next token and the lock is released only after it has.
                if not _finished(outcome):
                    cancel.set()
                worker.join()
            if "error" in outcome:
                raise self._failure(outcome["error"]) from outcome["error"]
        tail = cleaner.finish()
        if tail:
            pieces.append(tail)
            yield tail
        new_tokens = outcome["output"][0, prompt_tokens:]
        latency = time.perf_counter() - started
        return GenerationResult(
            text="".join(pieces),
            prompt_tokens=prompt_tokens,
            output_tokens=int(new_tokens.shape[-1]),
            latency_s=latency,
            parameters=self._parameters(request, streamed=True),
            finish_reason=self._finish_reason(new_tokens, request, latency),
        )

    def _check_images(self, request: GenerationRequest) -> None:
        if request.images and not self.supports_images:
            raise ConfigError(
                f"MedGemma checkpoint {self.identity.model_id!r} is text-only and cannot read the "
                f"{len(request.images)} image(s) in this request; configure a multimodal MedGemma "
                "(google/medgemma-4b-it or google/medgemma-1.5-4b-it) or send no images "
                "(MEDAGENT_MODELS__REASONER_MAX_IMAGES=0)",
                details={"model": self.identity.model_id, "images": len(request.images)},
            )

    def _inputs(self, request: GenerationRequest) -> Any:
        encoded = self.processor.apply_chat_template(
            _messages(request),
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            add_generation_prompt=True,
        )
        if self.supports_images:
            # The processor's BatchFeature casts pixel values to the weights' dtype, ids untouched.
            return encoded.to(self._device, dtype=self._dtype)
        return encoded.to(self._device)

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
        if self.call_timeout_s is not None:
            # transformers turns this into a MaxTimeCriteria: the call cannot run forever.
            config.max_time = self.call_timeout_s
        return config

    def _parameters(self, request: GenerationRequest, *, streamed: bool) -> dict[str, Any]:
        parameters: dict[str, Any] = {"max_new_tokens": request.max_new_tokens, "do_sample": request.do_sample}
        if self.call_timeout_s is not None:
            parameters["max_time_s"] = self.call_timeout_s
        if streamed:
            parameters["stream"] = True
        return parameters

    def _finish_reason(self, new_tokens: torch.Tensor, request: GenerationRequest, latency_s: float) -> FinishReason:
        count = int(new_tokens.shape[-1])
        if count and int(new_tokens[-1]) in self._eos_ids:
            return "stop"
        if count >= request.max_new_tokens:
            return "length"
        if self.call_timeout_s is not None and latency_s >= self.call_timeout_s:
            return "timeout"
        return "stop"

    def _failure(self, exc: BaseException) -> ModelOutputError:
        return ModelOutputError(
            f"MedGemma generation failed ({type(exc).__name__})",
            details={"model": self.identity.model_id, "error": str(exc)[:500]},
        )


def _finished(outcome: dict[str, Any]) -> bool:
    return "output" in outcome or "error" in outcome


def _messages(request: GenerationRequest) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = []
    labels = request.image_labels if request.image_labels is not None else [None] * len(request.images)
    for label, image in zip(labels, request.images, strict=True):
        if label is not None:
            content.append({"type": "text", "text": label})
        content.append({"type": "image", "image": _as_rgb(image)})
    content.append({"type": "text", "text": request.user_text})
    messages: list[dict[str, Any]] = []
    if request.system.strip():
        messages.append({"role": "system", "content": [{"type": "text", "text": request.system}]})
    messages.append({"role": "user", "content": content})
    return messages


def _as_rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def _model_type(path: Path) -> str | None:
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # the loader below reports the missing or broken folder
    value = config.get("model_type") if isinstance(config, dict) else None
    return value if isinstance(value, str) else None


def _load_text_only(path: Path, *, dtype: torch.dtype, device: str, model_id: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        return tokenizer, model.to(device).eval()
    except Exception as exc:
        raise ModelUnavailableError(
            f"could not load text-only MedGemma from {path}: {type(exc).__name__}: {exc}",
            details={"path": str(path), "model": model_id},
        ) from exc
