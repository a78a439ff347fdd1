"""The shared HTTP client pieces: one TLS context per process, and JSON parsing that loses nothing."""

from __future__ import annotations

import gc
import json

import pytest

from agent.sources.http_clients import async_client, loads_json, shared_ssl_context, sync_client


def test_clients_reuse_one_tls_context() -> None:
    # Building a context loads the CA bundle (tens of ms); every run opens clients.
    assert shared_ssl_context() is shared_ssl_context()
    with sync_client(timeout=1) as client:
        assert client._transport._pool._ssl_context is shared_ssl_context()  # type: ignore[attr-defined]


async def test_async_client_takes_an_explicit_verify() -> None:
    async with async_client(timeout=1, verify=False) as client:
        assert client._transport._pool._ssl_context is not shared_ssl_context()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "body",
    [
        b'{"resourceType":"Observation","valueQuantity":{"value":0.1}}',
        '{"resourceType":"Patient","name":[{"family":"Sjöberg"}]}'.encode(),
        b'{"resourceType":"Basic","extension":[{"valueInteger64":123456789012345678901234567890}]}',
        b'{"resourceType":"Basic","value":NaN}',
    ],
)
def test_loads_json_reads_what_the_standard_parser_reads(body: bytes) -> None:
    assert loads_json(body) == json.loads(body) or body.endswith(b"NaN}")
    if body.endswith(b"NaN}"):  # NaN != NaN: compare its type instead
        assert loads_json(body)["value"] != loads_json(body)["value"]


def test_loads_json_rejects_what_is_not_json_with_a_value_error() -> None:
    with pytest.raises(ValueError):
        loads_json(b"<html>502 Bad Gateway</html>")


@pytest.mark.parametrize("enabled", [True, False])
def test_loads_json_leaves_the_garbage_collector_as_it_found_it(enabled: bool) -> None:
    was = gc.isenabled()
    try:
        (gc.enable if enabled else gc.disable)()
        loads_json(b'{"a": [1, 2, 3]}')
        assert gc.isenabled() is enabled
        with pytest.raises(ValueError):
            loads_json(b"{not json")
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()
