"""Remote MedGemma over an OpenAI-compatible API: a real `transformers serve`, and scripted faults."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import SecretStr

from agent.config import ModelSettings
from agent.errors import ConfigError, ModelOutputError, ModelUnavailableError
from agent.inference.factory import load_models
from agent.inference.protocols import GenerationRequest
from agent.inference.remote_medgemma import RemoteMedGemma, image_data_url
from tests.support.model_server import Reply, ScriptedChatServer, ServedModel, chunk, completion

MODEL = "medgemma-test"


@pytest.fixture
def server() -> Iterator[ScriptedChatServer]:
    with ScriptedChatServer(models=[MODEL]) as running:
        yield running


class _Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def sleeps() -> _Sleeps:
    return _Sleeps()


_OPEN_CLIENTS: list[RemoteMedGemma] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    """Close every client a test made: their pooled keep-alive sockets would otherwise leak."""
    yield
    while _OPEN_CLIENTS:
        _OPEN_CLIENTS.pop().close()


def _client(server: ScriptedChatServer, sleeps: _Sleeps, **kwargs: object) -> RemoteMedGemma:
    options: dict[str, object] = {"timeout_s": 5.0, "max_retries": 2, "sleep": sleeps}
    options.update(kwargs)
    client = RemoteMedGemma(server.base_url, MODEL, **options)  # type: ignore[arg-type]
    _OPEN_CLIENTS.append(client)
    return client


def _request(**kwargs: object) -> GenerationRequest:
    return GenerationRequest(system="Be brief.", user_text="Findings?", max_new_tokens=8, **kwargs)  # type: ignore[arg-type]


# -- against a real transformers serve ---------------------------------------------------------------


def _served_client(served: ServedModel, model: str | None = None) -> RemoteMedGemma:
    client = RemoteMedGemma(served.base_url, model or served.model, timeout_s=60, max_retries=0)
    _OPEN_CLIENTS.append(client)
    return client


def test_real_server_generate(medgemma_server: ServedModel) -> None:
    client = _served_client(medgemma_server)
    result = client.generate(_request())
    assert result.text
    assert "\ufffd" not in result.text
    assert result.prompt_tokens > 0
    assert 0 < result.output_tokens <= 8
    assert result.parameters["endpoint"] == medgemma_server.base_url.removesuffix("/v1")
    assert client.identity.backend == "openai-compatible"
    assert client.identity.model_id == medgemma_server.model


def test_real_server_stream_equals_generate(medgemma_server: ServedModel) -> None:
    client = _served_client(medgemma_server)
    whole = client.generate(_request())
    stream = client.stream(_request())
    deltas = list(stream)
    assert deltas
    assert "".join(deltas) == stream.result.text == whole.text


def test_real_server_reads_an_image_as_data_url(medgemma_server: ServedModel) -> None:
    client = _served_client(medgemma_server)
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, size=(64, 64, 3), dtype=np.uint8))
    without = client.generate(_request())
    with_image = client.generate(_request(images=[image]))
    assert with_image.text
    # The tiny model turns an image into its soft tokens: the prompt grows by at least that many.
    assert with_image.prompt_tokens - without.prompt_tokens >= 4


def test_real_server_unknown_model_is_a_clear_error(medgemma_server: ServedModel) -> None:
    client = _served_client(medgemma_server, model="google/medgemma-4b-it")
    with pytest.raises(ModelUnavailableError, match="does not serve model 'google/medgemma-4b-it'") as caught:
        client.generate(_request())
    assert medgemma_server.model in caught.value.message  # it names what the server does serve


# -- request shape -------------------------------------------------------------------------------------


def test_request_carries_messages_images_labels_and_greedy_settings(
    server: ScriptedChatServer, sleeps: _Sleeps
) -> None:
    rng = np.random.default_rng(5)
    images = [Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)) for _ in range(2)]
    result = _client(server, sleeps, api_key="sk-secret").generate(
        _request(images=images, image_labels=["SLICE 1", "SLICE 2"])
    )
    assert result.text == "Scripted answer."
    sent = server.chat_requests()[0]
    assert sent.headers["Authorization"] == "Bearer sk-secret"
    body = sent.body
    assert (body["model"], body["max_tokens"], body["temperature"], body["stream"]) == (MODEL, 8, 0.0, False)
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    parts = body["messages"][1]["content"]
    assert [part["type"] for part in parts] == ["text", "image_url", "text", "image_url", "text"]
    assert [parts[0]["text"], parts[2]["text"], parts[4]["text"]] == ["SLICE 1", "SLICE 2", "Findings?"]
    for part, image in zip([parts[1], parts[3]], images, strict=True):
        url = part["image_url"]["url"]
        assert url.startswith("data:image/png;base64,")
        decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        assert np.array_equal(np.asarray(decoded), np.asarray(image))  # lossless
    # What the trace records: counts, the endpoint's origin, never the key.
    assert (result.prompt_tokens, result.output_tokens, result.finish_reason) == (7, 3, "stop")
    assert result.parameters["endpoint"] == server.origin
    assert "sk-secret" not in json.dumps(result.parameters)


def test_image_data_url_is_png() -> None:
    url = image_data_url(Image.new("L", (4, 4), 128))
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).format == "PNG"


# -- streaming ---------------------------------------------------------------------------------------


def test_stream_hides_thinking_and_reads_usage_and_fingerprint(server: ScriptedChatServer, sleeps: _Sleeps) -> None:
    server.script.append(
        Reply(
            events=[
                chunk("<unused94>the history men", system_fingerprint="fp-abc"),
                chunk("tions effusion<unus"),
                chunk("ed95>No acute "),
                chunk("finding.", finish_reason="stop"),
                json.dumps({"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 9}}),
                "[DONE]",
            ]
        )
    )
    client = _client(server, sleeps)
    stream = client.stream(_request())
    deltas = list(stream)
    assert "".join(deltas) == "No acute finding."
    assert not any(word in delta for delta in deltas for word in ("history", "effusion", "<"))
    assert server.chat_requests()[0].body["stream_options"] == {"include_usage": True}
    result = stream.result
    assert (result.prompt_tokens, result.output_tokens, result.finish_reason) == (11, 9, "stop")
    assert "token_counts" not in result.parameters
    assert client.identity.revision == "fp-abc"


def test_stream_without_usage_records_zero_and_says_so(server: ScriptedChatServer, sleeps: _Sleeps) -> None:
    server.script.append(Reply(events=[chunk("Stable."), chunk(finish_reason="length"), "[DONE]"]))
    stream = _client(server, sleeps).stream(_request())
    assert stream.text() == "Stable."
    assert (stream.result.output_tokens, stream.result.finish_reason) == (0, "length")
    assert "not reported" in stream.result.parameters["token_counts"]


def test_stream_cut_off_without_done_is_an_error(server: ScriptedChatServer, sleeps: _Sleeps) -> None:
    server.script.append(Reply(events=[chunk("Partial")]))
    with pytest.raises(ModelOutputError, match=r"without a finish reason or \[DONE\]"):
        list(_client(server, sleeps).stream(_request()))


def test_stream_error_event_is_an_error(server: ScriptedChatServer, sleeps: _Sleeps) -> None:
    server.script.append(Reply(events=[chunk("Par"), json.dumps({"error": {"type": "InternalServerError"}})]))
    with pytest.raises(ModelOutputError, match="reported an error during generation: InternalServerError"):
        list(_client(server, sleeps).stream(_request()))


def test_stream_retries_before_the_first_event(server: ScriptedChatServer, sleeps: _Sleeps) -> None:
    server.script.extend([Reply(503, {"error": {"type": "overloaded"}}), Reply(events=[chunk("Ok."), "[DONE]"])])
    stream = _client(server, sleeps).stream(_request())
    assert stream.text() == "Ok."
    assert stream.result.parameters["attempts"] == 2
    assert len(sleeps) == 1


# -- faults ------------------------------------------------------------------------------------------


def test_429_waits_as_retry_after_says_in_seconds(server: ScriptedChatServer, sleeps: _Sleeps) -> None:
    server.script.extend([Reply(429, {"error": {"type": "rate_limited"}}, headers=[("Retry-After", "2")])])
    result = _client(server, sleeps).generate(_request())
    assert result.text == "Scripted answer."
    assert sleeps == [2.0]
    assert result.parameters["attempts"] == 2
    assert len(server.chat_requests()) == 2


def test_429_retry_after_as_http_date(server: ScriptedChatServer, sleeps: _Sleeps) -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    server.script.append(Reply(429, {}, headers=[("Retry-After", when)]))
    _client(server, sleeps).generate(_request())
    assert len(sleeps) == 1 and 25 < sleeps[0] <= 30


def test_retry_after_beyond_the_limit_fails_at_once(server: ScriptedChatServer, sleeps: _Sleeps) -> None:
    server.script.append(Reply(429, {}, headers=[("Retry-After", "3600")]))
    with pytest.raises(ModelUnavailableError, match="retry after 3600 s"):
        _client(server, sleeps).generate(_request())
    assert sleeps == []


def test_503_then_success_backs_off_with_jitter(server: ScriptedChatServer, sleeps: _Sleeps) -> None:
    server.script.extend([Reply(503, {"error": {"type": "overloaded"}}), Reply(502, b"bad gateway")])
    result = _client(server, sleeps, backoff_base_s=0.5).generate(_request())
    assert result.text == "Scripted answer."
    assert result.parameters["attempts"] == 3
    assert 0.25 <= sleeps[0] <= 0.5 and 0.5 <= sleeps[1] <= 1.0  # doubling, jittered into [half, full]


def test_5xx_on_every_attempt_names_status_and_attempts(server: ScriptedChatServer, sleeps: _Sleeps) -> None:
    server.script.extend([Reply(500, {"error": {"type": "server_error"}}) for _ in range(3)])
    with pytest.raises(ModelUnavailableError, match=r"answered HTTP 500: server_error .*3 attempts") as caught:
        _client(server, sleeps).generate(_request())
    assert caught.value.details["status"] == 500
    assert len(server.chat_requests()) == 3


def test_invalid_json_is_a_model_output_error_without_retry(server: ScriptedChatServer, sleeps: _Sleeps) -> None:
    server.script.append(Reply(200, b"<html>proxy error page</html>"))
    with pytest.raises(ModelOutputError, match="not JSON"):
        _client(server, sleeps).generate(_request())
    assert len(server.chat_requests()) == 1


def test_missing_choices_is_a_model_output_error(server: ScriptedChatServer, sleeps: _Sleeps) -> None:
    server.script.append(Reply(200, {"id": "x", "object": "chat.completion"}))
    with pytest.raises(ModelOutputError, match="without choices"):
        _client(server, sleeps).generate(_request())


def test_timeout_is_retried_then_reported(server: ScriptedChatServer, sleeps: _Sleeps) -> None:
    server.script.extend([Reply(200, completion("late"), delay_s=1.0) for _ in range(2)])
    with pytest.raises(ModelUnavailableError, match=r"did not answer within 0.2 s .*2 attempts"):
        _client(server, sleeps, timeout_s=0.2, max_retries=1).generate(_request())
    assert len(sleeps) == 1


def test_unreachable_server_is_model_unavailable(sleeps: _Sleeps) -> None:
    with ScriptedChatServer() as stopped:
        url = stopped.base_url
    client = RemoteMedGemma(url, MODEL, max_retries=1, sleep=sleeps, timeout_s=2)
    with pytest.raises(ModelUnavailableError, match="could not be reached"):
        client.generate(_request())


def test_model_not_in_the_servers_list(sleeps: _Sleeps) -> None:
    with ScriptedChatServer(models=["google/medgemma-27b-text-it"]) as other:
        client = RemoteMedGemma(other.base_url, "google/medgemma-4b-it", sleep=sleeps)
        with pytest.raises(ModelUnavailableError, match="does not serve model 'google/medgemma-4b-it'") as caught:
            client.generate(_request())
        assert caught.value.details["served"] == ["google/medgemma-27b-text-it"]
        assert other.chat_requests() == []  # refused before any generation was asked for


def test_model_not_found_404_without_a_models_list(sleeps: _Sleeps) -> None:
    body = {"error": {"message": "The model `other` does not exist.", "type": "NotFoundError", "code": 404}}
    with ScriptedChatServer(models_status=404) as server:
        server.script.append(Reply(404, body))
        with pytest.raises(ModelUnavailableError, match="does not serve model 'other'"):
            RemoteMedGemma(server.base_url, "other", sleep=sleeps).generate(_request())


def test_authentication_failure_is_not_retried(server: ScriptedChatServer, sleeps: _Sleeps) -> None:
    server.script.append(Reply(401, {"error": {"type": "invalid_api_key"}}))
    with pytest.raises(ModelUnavailableError, match="REMOTE_API_KEY"):
        _client(server, sleeps).generate(_request())
    assert sleeps == []


def test_bad_request_does_not_echo_the_servers_text(server: ScriptedChatServer, sleeps: _Sleeps) -> None:
    server.script.append(Reply(400, {"error": {"type": "invalid_request", "message": "prompt: Jane Doe, 1950"}}))
    with pytest.raises(ModelOutputError) as caught:
        _client(server, sleeps).generate(_request())
    assert "invalid_request" in caught.value.message
    assert "Jane" not in json.dumps(caught.value.to_dict())


def test_call_timeout_ends_retries(server: ScriptedChatServer, sleeps: _Sleeps) -> None:
    server.script.append(Reply(503, {}, headers=[("Retry-After", "5")]))
    with pytest.raises(ModelUnavailableError, match="no time left"):
        _client(server, sleeps, call_timeout_s=1.0).generate(_request())


@pytest.mark.parametrize("url", ["ftp://host/v1", "127.0.0.1:8001/v1"])
def test_unusable_url_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError, match="OpenAI API root"):
        RemoteMedGemma(url, MODEL)


# -- factory -----------------------------------------------------------------------------------------


def test_factory_needs_url_and_model_for_the_remote_backend(tmp_path: Path) -> None:
    settings = ModelSettings(backend="remote", remote_url="http://127.0.0.1:9/v1", test_models_dir=tmp_path)
    with pytest.raises(ConfigError, match="MEDAGENT_MODELS__REMOTE_MODEL") as caught:
        load_models(settings)
    assert caught.value.details["missing"] == ["MEDAGENT_MODELS__REMOTE_MODEL"]


def test_factory_builds_the_remote_reasoner_with_a_local_image_model(
    server: ScriptedChatServer, test_models_dir: Path
) -> None:
    settings = ModelSettings(
        backend="remote",
        remote_url=server.base_url,
        remote_model=MODEL,
        remote_api_key=SecretStr("k"),
        remote_max_retries=0,
        use_test_models=True,
        test_models_dir=test_models_dir,
        device="cpu",
        dtype="float32",
    )
    loaded = load_models(settings)
    assert isinstance(loaded.reasoner, RemoteMedGemma)
    assert loaded.scorer.identity.backend == "transformers"
    assert loaded.banner and "MedSigLIP" in loaded.banner
    assert loaded.reasoner.generate(_request()).text == "Scripted answer."
    assert server.chat_requests()[0].headers["Authorization"] == "Bearer k"
