"""MedGemma behind any OpenAI-compatible chat endpoint (vLLM, TGI, Vertex AI, ``transformers serve``).

The remote twin of :mod:`agent.inference.medgemma`: the same
:class:`~agent.inference.protocols.Reasoner` interface, so the graph cannot tell which backend
answered, except through the identity and parameters the trace records. Used when MedGemma runs
on a GPU server rather than in this process (``MEDAGENT_MODELS__BACKEND=remote``).

What it adds over a bare HTTP call: images as ``data:`` URLs, streaming over server-sent events,
thinking blocks removed from the answer (whole and streamed), retries with backoff and jitter on
429 (honouring ``Retry-After``), 5xx and connection failures, a clear error when the server does
not serve the configured model, and specific errors for malformed answers. The API key is sent
but never recorded; the trace gets the endpoint's origin only.

The client is synchronous on purpose: the graph calls the reasoner in a worker thread.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Generator, Iterator
from typing import Any

import httpx
from PIL import Image

from agent.errors import ConfigError, ModelOutputError, ModelUnavailableError
from agent.inference.protocols import (
    FinishReason,
    GenerationRequest,
    GenerationResult,
    GenerationStream,
    ModelIdentity,
)
from agent.inference.thinking import GEMMA_SPECIAL_TEXTS, StreamCleaner, clean_text
from agent.sources.fhir_http import parse_retry_after
from agent.sources.http_clients import sync_client

logger = logging.getLogger(__name__)

BACKEND_NAME = "openai-compatible"
#: Statuses worth another try: the server is overloaded or briefly broken, not refusing the request.
RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
_FINISH_REASONS: dict[str, FinishReason] = {"stop": "stop", "eos": "stop", "length": "length"}


class RemoteMedGemma:
    """A :class:`~agent.inference.protocols.Reasoner` that calls ``POST {base_url}/chat/completions``.

    On the first call it asks ``GET {base_url}/models`` whether the server serves ``model``
    (servers without that listing are trusted until a call fails).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        max_retries: int = 3,
        identity: ModelIdentity | None = None,
        call_timeout_s: float | None = None,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 8.0,
        retry_after_max_s: float = 60.0,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        """Configure the endpoint; nothing is sent until the first call.

        Args:
            base_url: the OpenAI API root, e.g. ``http://127.0.0.1:8001/v1``.
            model: the model name the server serves (the request's ``model``).
            api_key: sent as ``Authorization: Bearer``; never recorded.
            timeout_s: timeout of each HTTP request (connect, and each read while streaming).
            max_retries: further attempts after a 429, 5xx, timeout or connection failure.
            identity: what the trace records; by default backend ``openai-compatible`` with the
                model name as ``model_id`` and the server's ``system_fingerprint`` (once seen)
                as ``revision``.
            call_timeout_s: upper bound on one call including retries and streaming; a stream
                still running then ends with ``finish_reason="timeout"``. None: no bound.
            backoff_base_s: first retry's nominal wait; it doubles with each further retry.
            backoff_max_s: upper bound on one computed wait.
            retry_after_max_s: the longest ``Retry-After`` honoured; asking for more fails the call.
            transport: an httpx transport (tests); the default network transport when omitted.
            sleep: how to wait between attempts (tests pass a recorder).
            rng: source of jitter (tests pass a seeded one).

        Raises:
            ConfigError: for a base URL that is not http(s) with a host, or an empty model name.
        """
        url = httpx.URL(base_url.rstrip("/"))
        if url.scheme not in ("http", "https") or not url.host:
            raise ConfigError(
                f"remote MedGemma URL must be an http(s) OpenAI API root such as http://127.0.0.1:8001/v1, "
                f"got a {url.scheme or 'scheme-less'} URL",
                details={"setting": "MEDAGENT_MODELS__REMOTE_URL"},
            )
        if not model.strip():
            raise ConfigError(
                "remote MedGemma model name is empty", details={"setting": "MEDAGENT_MODELS__REMOTE_MODEL"}
            )
        self.base_url = str(url)
        self.model = model
        #: Scheme, host and port only: no path secrets, no user info, never the key.
        self.origin = f"{url.scheme}://{url.host}" + (f":{url.port}" if url.port else "")
        self.identity = identity or ModelIdentity(model_id=model, backend=BACKEND_NAME, device="remote", dtype="remote")
        #: The server decides; a text-only model answers a request with images with an error.
        self.supports_images = True
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.call_timeout_s = call_timeout_s
        self._backoff_base_s = backoff_base_s
        self._backoff_max_s = backoff_max_s
        self._retry_after_max_s = retry_after_max_s
        self._sleep = sleep
        self._rng = rng or random.Random()
        headers = {"Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._client = sync_client(timeout=timeout_s, headers=headers, transport=transport)
        self._model_checked = False
        self._check_lock = threading.Lock()

    def close(self) -> None:
        """Close the HTTP connections."""
        self._client.close()

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Run one generation on the server (temperature 0 unless the request asks for sampling).

        Raises:
            ModelUnavailableError: the server is unreachable, keeps failing, refuses the key, or
                does not serve the model.
            ModelOutputError: the server rejects the request or answers with something that is
                not a chat completion.
        """
        started = time.perf_counter()
        deadline = self._deadline()
        self._check_model(deadline)
        response, attempts = self._send("POST", "/chat/completions", self._payload(request, stream=False), deadline)
        data = _json_body(response, what="chat completion", origin=self.origin)
        choice = _first_choice(data, origin=self.origin)
        message = choice.get("message")
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, str | None):
            raise ModelOutputError(
                f"MedGemma endpoint {self.origin} answered a chat completion whose message content is not text",
                details={"endpoint": self.origin},
            )
        self._note_fingerprint(data)
        usage = data.get("usage")
        server_reason = choice.get("finish_reason")
        return GenerationResult(
            text=clean_text(content or "", GEMMA_SPECIAL_TEXTS),
            prompt_tokens=_usage_count(usage, "prompt_tokens"),
            output_tokens=_usage_count(usage, "completion_tokens"),
            latency_s=time.perf_counter() - started,
            parameters=self._parameters(request, streamed=False, usage=usage, attempts=attempts, reason=server_reason),
            finish_reason=_FINISH_REASONS.get(server_reason) if isinstance(server_reason, str) else None,
        )

    def stream(self, request: GenerationRequest) -> GenerationStream:
        """Start one generation on the server and yield the answer as server-sent events arrive.

        Retries happen only before the first event (once text has been shown it cannot be taken
        back); a failure after that raises. Thinking blocks are never yielded.

        Raises:
            ModelUnavailableError: from iteration, as for :meth:`generate`, or when the server
                stops sending for longer than ``timeout_s``.
            ModelOutputError: from iteration, for an error event or a malformed event.
        """
        return GenerationStream(self._stream(request))

    def _stream(self, request: GenerationRequest) -> Generator[str, None, GenerationResult]:
        started = time.perf_counter()
        deadline = self._deadline()
        self._check_model(deadline)
        response, attempts = self._send(
            "POST", "/chat/completions", self._payload(request, stream=True), deadline, stream=True
        )
        cleaner = StreamCleaner(GEMMA_SPECIAL_TEXTS)
        pieces: list[str] = []
        usage: Any = None
        server_reason: Any = None
        timed_out = False
        try:
            for event in _sse_events(response, origin=self.origin, timeout_s=self.timeout_s):
                self._note_fingerprint(event)
                if event.get("usage"):
                    usage = event["usage"]
                choices = event.get("choices")
                if not isinstance(choices, list):
                    raise ModelOutputError(
                        f"MedGemma endpoint {self.origin} sent a stream event without choices",
                        details={"endpoint": self.origin},
                    )
                for choice in choices[:1]:
                    if not isinstance(choice, dict):
                        continue
                    server_reason = choice.get("finish_reason") or server_reason
                    delta = choice.get("delta")
                    text = delta.get("content") if isinstance(delta, dict) else None
                    if isinstance(text, str) and text:
                        cleaned = cleaner.feed(text)
                        if cleaned:
                            pieces.append(cleaned)
                            yield cleaned
                if deadline is not None and time.monotonic() >= deadline:
                    timed_out = True
                    break
        finally:
            response.close()
        tail = cleaner.finish()
        if tail:
            pieces.append(tail)
            yield tail
        parameters = self._parameters(request, streamed=True, usage=usage, attempts=attempts, reason=server_reason)
        finish: FinishReason | None = "timeout" if timed_out else None
        if finish is None and isinstance(server_reason, str):
            finish = _FINISH_REASONS.get(server_reason)
        return GenerationResult(
            text="".join(pieces),
            prompt_tokens=_usage_count(usage, "prompt_tokens"),
            output_tokens=_usage_count(usage, "completion_tokens"),
            latency_s=time.perf_counter() - started,
            parameters=parameters,
            finish_reason=finish,
        )

    # -- request building ----------------------------------------------------------------------

    def _payload(self, request: GenerationRequest, *, stream: bool) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": _messages(request),
            "max_tokens": request.max_new_tokens,
            # Greedy decoding, as in all of Google's MedGemma examples; sampling keeps the
            # server's defaults.
            **({} if request.do_sample else {"temperature": 0.0}),
            "stream": stream,
        }
        if stream:
            payload["stream_options"] = {"include_usage": True}
        return payload

    def _parameters(
        self, request: GenerationRequest, *, streamed: bool, usage: Any, attempts: int, reason: Any
    ) -> dict[str, Any]:
        parameters: dict[str, Any] = {
            "max_new_tokens": request.max_new_tokens,
            "do_sample": request.do_sample,
            "temperature": None if request.do_sample else 0.0,
            "endpoint": self.origin,
            "model": self.model,
            "stream": streamed,
            "attempts": attempts,
        }
        if not isinstance(usage, dict) or "completion_tokens" not in usage:
            parameters["token_counts"] = "not reported by the server (recorded as 0)"
        if isinstance(reason, str) and reason not in _FINISH_REASONS:
            parameters["server_finish_reason"] = reason
        if self.call_timeout_s is not None:
            parameters["call_timeout_s"] = self.call_timeout_s
        return parameters

    def _note_fingerprint(self, data: dict[str, Any]) -> None:
        fingerprint = data.get("system_fingerprint")
        if isinstance(fingerprint, str) and fingerprint and fingerprint != self.identity.revision:
            self.identity = self.identity.model_copy(update={"revision": fingerprint})

    # -- the model check -------------------------------------------------------------------------

    def _check_model(self, deadline: float | None) -> None:
        """Fail clearly, once, when the server lists its models and ours is not among them."""
        if self._model_checked:
            return
        with self._check_lock:
            if self._model_checked:
                return
            response, _ = self._send("GET", "/models", None, deadline, accept_statuses=frozenset({404, 405, 501}))
            if response.status_code == 200:
                served = _served_models(response)
                if served is not None and self.model not in served:
                    raise ModelUnavailableError(
                        f"MedGemma endpoint {self.origin} does not serve model {self.model!r}; it serves "
                        f"{', '.join(repr(name) for name in served[:10]) or 'no models'}. Set "
                        "MEDAGENT_MODELS__REMOTE_MODEL to one of them.",
                        details={"endpoint": self.origin, "model": self.model, "served": served[:10]},
                    )
            # No listing (404/405/501) or an unreadable one: the first call will tell.
            self._model_checked = True

    # -- sending with retries --------------------------------------------------------------------

    def _deadline(self) -> float | None:
        return None if self.call_timeout_s is None else time.monotonic() + self.call_timeout_s

    def _send(
        self,
        method: str,
        path: str,
        payload: dict[str, Any] | None,
        deadline: float | None,
        *,
        stream: bool = False,
        accept_statuses: frozenset[int] = frozenset(),
    ) -> tuple[httpx.Response, int]:
        """Send one request, retrying transient failures; return the 2xx response and the attempts made.

        With ``stream`` the response is returned unread (the caller closes it).
        """
        total = self.max_retries + 1
        attempt = 0
        while True:
            attempt += 1
            retry_after: float | None = None
            try:
                request = self._client.build_request(method, self.base_url + path, json=payload)
                response = self._client.send(request, stream=stream)
            except httpx.TimeoutException as exc:
                cause: Exception | None = exc
                reason = f"did not answer within {self.timeout_s:g} s"
                status: int | None = None
            except httpx.TransportError as exc:
                cause = exc
                reason = f"could not be reached ({type(exc).__name__})"
                status = None
            else:
                status = response.status_code
                if 200 <= status < 300 or status in accept_statuses:
                    return response, attempt
                try:
                    body = response.read()
                finally:
                    response.close()
                if status not in RETRYABLE_STATUSES:
                    raise self._refusal(status, body, path, attempt)
                cause = None
                reason = f"answered HTTP {status}{_error_label(body)}"
                retry_after = parse_retry_after(response.headers.get("Retry-After"))

            details: dict[str, Any] = {"endpoint": self.origin, "attempts": attempt}
            if status is not None:
                details["status"] = status
            if attempt >= total:
                raise ModelUnavailableError(
                    f"MedGemma endpoint {self.origin} {reason} ({method} {path}, {_attempts(attempt)})",
                    details=details,
                ) from cause
            delay = retry_after if retry_after is not None else self._backoff_s(attempt)
            if retry_after is not None and retry_after > self._retry_after_max_s:
                raise ModelUnavailableError(
                    f"MedGemma endpoint {self.origin} {reason} and asked to retry after {retry_after:g} s, "
                    f"more than the {self._retry_after_max_s:g} s limit ({_attempts(attempt)})",
                    details={**details, "retry_after_s": retry_after},
                ) from cause
            if deadline is not None and time.monotonic() + delay >= deadline:
                raise ModelUnavailableError(
                    f"MedGemma endpoint {self.origin} {reason}; no time left for another attempt within the "
                    f"call's {self.call_timeout_s:g} s limit ({_attempts(attempt)})",
                    details=details,
                ) from cause
            logger.info(
                "MedGemma endpoint %s: attempt %d/%d %s, retrying in %.3g s", self.origin, attempt, total, reason, delay
            )
            self._sleep(delay)

    def _backoff_s(self, attempt: int) -> float:
        # Doubling, capped, jittered between half and all of the nominal wait, so clients that
        # failed together do not retry together.
        nominal = min(self._backoff_max_s, self._backoff_base_s * 2 ** (attempt - 1))
        return nominal * (0.5 + 0.5 * self._rng.random())

    def _refusal(self, status: int, body: bytes, path: str, attempts: int) -> Exception:
        details: dict[str, Any] = {"endpoint": self.origin, "status": status, "attempts": attempts}
        if status in (401, 403):
            return ModelUnavailableError(
                f"MedGemma endpoint {self.origin} refused the request: authentication failed (HTTP {status}); "
                "check MEDAGENT_MODELS__REMOTE_API_KEY",
                details=details,
            )
        text = body.decode("utf-8", errors="replace")
        if status in (400, 404) and _mentions_model(text, self.model):
            return ModelUnavailableError(
                f"MedGemma endpoint {self.origin} does not serve model {self.model!r} (HTTP {status}); set "
                "MEDAGENT_MODELS__REMOTE_MODEL to a model the server serves",
                details={**details, "model": self.model},
            )
        if status == 404:
            return ModelUnavailableError(
                f"MedGemma endpoint {self.origin} has no {path} (HTTP 404); MEDAGENT_MODELS__REMOTE_URL must be "
                "the OpenAI API root, usually ending in /v1",
                details=details,
            )
        # The server's own message may echo the prompt: only its error type reaches the message.
        return ModelOutputError(
            f"MedGemma endpoint {self.origin} rejected the request (HTTP {status}{_error_label(body)})",
            details=details,
        )


# -- helpers ----------------------------------------------------------------------------------------


def _messages(request: GenerationRequest) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = []
    labels = request.image_labels if request.image_labels is not None else [None] * len(request.images)
    for label, image in zip(labels, request.images, strict=True):
        if label is not None:
            content.append({"type": "text", "text": label})
        content.append({"type": "image_url", "image_url": {"url": image_data_url(image)}})
    content.append({"type": "text", "text": request.user_text})
    messages: list[dict[str, Any]] = []
    if request.system.strip():
        messages.append({"role": "system", "content": request.system})
    messages.append({"role": "user", "content": content})
    return messages


def image_data_url(image: Image.Image) -> str:
    """Return ``image`` as a ``data:image/png;base64,...`` URL (lossless: pixels arrive exactly)."""
    buffer = io.BytesIO()
    (image if image.mode in ("RGB", "L") else image.convert("RGB")).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _json_body(response: httpx.Response, *, what: str, origin: str) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError as exc:
        raise ModelOutputError(
            f"MedGemma endpoint {origin} answered a {what} request with a body that is not JSON",
            details={"endpoint": origin, "status": response.status_code},
        ) from exc
    if not isinstance(data, dict):
        raise ModelOutputError(
            f"MedGemma endpoint {origin} answered a {what} request with JSON that is not an object",
            details={"endpoint": origin},
        )
    return data


def _first_choice(data: dict[str, Any], *, origin: str) -> dict[str, Any]:
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ModelOutputError(
            f"MedGemma endpoint {origin} answered without choices; it is not an OpenAI-compatible chat completion",
            details={"endpoint": origin},
        )
    return choices[0]


def _sse_events(response: httpx.Response, *, origin: str, timeout_s: float) -> Iterator[dict[str, Any]]:
    """Yield the JSON events of a server-sent-event stream up to ``data: [DONE]``.

    A stream is complete at ``[DONE]`` (OpenAI, vLLM, TGI) or, for servers that close the stream
    after the last chunk instead (``transformers serve``), once a chunk carried a finish reason.
    Ending with neither means the answer was cut off.
    """
    done = False
    finished = False
    try:
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue  # comments (":"), "event:"/"id:" fields and the blank separators
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            try:
                event = json.loads(data)
            except ValueError as exc:
                raise ModelOutputError(
                    f"MedGemma endpoint {origin} sent a stream event that is not JSON", details={"endpoint": origin}
                ) from exc
            if not isinstance(event, dict):
                raise ModelOutputError(
                    f"MedGemma endpoint {origin} sent a stream event that is not a JSON object",
                    details={"endpoint": origin},
                )
            if "error" in event:
                raise ModelOutputError(
                    f"MedGemma endpoint {origin} reported an error during generation{_error_label(data.encode())}",
                    details={"endpoint": origin},
                )
            choices = event.get("choices")
            if isinstance(choices, list) and any(isinstance(c, dict) and c.get("finish_reason") for c in choices):
                finished = True
            yield event
    except httpx.TimeoutException as exc:
        raise ModelUnavailableError(
            f"MedGemma endpoint {origin} stopped sending for more than {timeout_s:g} s during generation",
            details={"endpoint": origin},
        ) from exc
    except httpx.TransportError as exc:
        raise ModelUnavailableError(
            f"MedGemma endpoint {origin} dropped the connection during generation ({type(exc).__name__})",
            details={"endpoint": origin},
        ) from exc
    if not done and not finished:
        raise ModelOutputError(
            f"MedGemma endpoint {origin} ended the stream without a finish reason or [DONE]; the answer may be cut off",
            details={"endpoint": origin},
        )


def _served_models(response: httpx.Response) -> list[str] | None:
    try:
        data = response.json()
    except ValueError:
        return None
    entries = data.get("data") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        return None
    return [entry["id"] for entry in entries if isinstance(entry, dict) and isinstance(entry.get("id"), str)]


def _usage_count(usage: Any, key: str) -> int:
    value = usage.get(key) if isinstance(usage, dict) else None
    return value if isinstance(value, int) and value >= 0 else 0


def _error_label(body: bytes) -> str:
    """Return ``": <type or code>"`` from an OpenAI-style error body, or ``""``; never its free text."""
    try:
        data = json.loads(body)
    except ValueError:
        return ""
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        for key in ("code", "type"):
            value = error.get(key)
            if isinstance(value, str) and value and len(value) <= 60:
                return f": {value}"
    return ""


def _mentions_model(text: str, model: str) -> bool:
    lowered = text.lower()
    return "model_not_found" in lowered or ("model" in lowered and model.lower() in lowered)


def _attempts(count: int) -> str:
    return f"{count} attempt" + ("" if count == 1 else "s")
