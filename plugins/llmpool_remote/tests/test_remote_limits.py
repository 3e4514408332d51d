"""What an upstream may send is bounded (issue 18): body and event sizes, the call's total
time, redirects, output beyond ``max_tokens``. Against the fake fault-injecting upstream."""

from __future__ import annotations

import asyncio
from typing import Any

import llmpool_remote
import pytest
from pydantic import ValidationError
from remote_test_support import KEY, remote_entry

from llmpoold.testing import sse_events

pytestmark = pytest.mark.timeout(60)


def ask(stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {"model": "r", "input": "Say hello.", "allow_remote": True, "stream": stream, **extra}


async def limited_client(fake_upstream: Any, make_remote_client: Any, **keys: Any) -> Any:
    return await make_remote_client({"r": remote_entry(fake_upstream.base_url, "fake-model", **keys)})


async def error_of(resp: Any) -> tuple[int, dict[str, Any]]:
    return resp.status, (await resp.json())["detail"]


def last_error(text: str) -> dict[str, Any]:
    events = sse_events(text)
    assert events[-1][0] == "error", events
    return events[-1][1]


# ----- body and event size ----------------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_json_body_over_remote_max_response_bytes_is_502(fake_upstream: Any, remote_key: str,
                                                                  make_remote_client: Any, chunked: bool) -> None:
    client = await limited_client(fake_upstream, make_remote_client, remote_max_response_bytes=4096)
    fake_upstream.script = [("big_json", 100_000, chunked)]
    assert await error_of(await client.post("/v1/responses", json=ask())) == (502, {
        "code": "upstream_response_too_large", "model": "r",
        "message": "upstream chat completion sent a response body larger than remote_max_response_bytes (4096 bytes)"})
    fake_upstream.script = [("big_json", 100_000, chunked)]  # an upstream that answers a stream with JSON
    # refused before a token: the streamed request gets the HTTP error too
    assert (await error_of(await client.post("/v1/responses", json=ask(stream=True))))[1]["code"] == (
        "upstream_response_too_large")
    fake_upstream.script = [("big_json", 1000, chunked)]  # under the limit: relayed
    body = await (await client.post("/v1/responses", json=ask())).json()
    assert body["output_text"] == "x" * 1000


async def test_a_stream_event_over_remote_max_event_bytes_is_502(fake_upstream: Any, remote_key: str,
                                                                 make_remote_client: Any) -> None:
    client = await limited_client(fake_upstream, make_remote_client, remote_max_event_bytes=2048)
    fake_upstream.script = [("big_event", 5000)]
    status, error = await error_of(await client.post("/v1/responses", json=ask(stream=True)))
    assert status == 502 and error["code"] == "upstream_response_too_large"
    assert error["message"] == ("upstream chat completion sent a stream event larger than "
                                         "remote_max_event_bytes (2048 bytes)")
    fake_upstream.script = [("big_event", 1500)]  # under the limit: relayed
    events = sse_events(await (await client.post("/v1/responses", json=ask(stream=True))).text())
    assert events[-1][0] == "response.completed" and events[-1][1]["output_text"] == "x" * 1500


async def test_a_line_that_never_ends_is_cut_at_the_event_limit(fake_upstream: Any, remote_key: str,
                                                                make_remote_client: Any) -> None:
    """Checked as bytes arrive: no waiting for a newline, no buffer growing past the limit."""
    client = await limited_client(fake_upstream, make_remote_client, remote_max_event_bytes=64 * 1024)
    fake_upstream.script = [("endless_line", 16 * 1024 * 1024)]
    resp = await asyncio.wait_for(client.post("/v1/responses", json=ask(stream=True)), 10)
    assert (await error_of(resp))[1]["code"] == "upstream_response_too_large"
    await asyncio.wait_for(fake_upstream.disconnected.wait(), 5)  # the upstream connection was dropped


# ----- total deadline -----------------------------------------------------------------------


async def test_remote_total_timeout_s_bounds_a_stream_that_keeps_sending(fake_upstream: Any, remote_key: str,
                                                                        make_remote_client: Any) -> None:
    """``slow`` sends a token every 50 ms for 10 s: never idle, so only the total deadline ends it."""
    client = await limited_client(fake_upstream, make_remote_client, remote_total_timeout_s=0.6,
                                  remote_timeout_s=5)
    loop = asyncio.get_running_loop()
    started = loop.time()
    fake_upstream.script = ["slow"]
    text = await (await client.post("/v1/responses", json=ask(stream=True, decoding={"max_tokens": 4096}))).text()
    assert loop.time() - started < 5
    error = last_error(text)
    assert error["status"] == 504 and error["error"]["code"] == "upstream_timeout"
    assert error["error"]["message"] == "upstream chat completion did not finish within remote_total_timeout_s (0.6 s)"
    assert "response.output_text.delta" in text


async def test_remote_total_timeout_s_covers_waiting_and_retries(fake_upstream: Any, remote_key: str,
                                                                 make_remote_client: Any) -> None:
    client = await limited_client(fake_upstream, make_remote_client, remote_total_timeout_s=0.5,
                                  remote_timeout_s=5, remote_max_retries=5, remote_retry_backoff_s=0.2)
    fake_upstream.script = [("sleep", 3)]
    assert await error_of(await client.post("/v1/responses", json=ask())) == (504, {
        "code": "upstream_timeout", "model": "r",
        "message": "upstream chat completion did not finish within remote_total_timeout_s (0.5 s)"})
    fake_upstream.calls.clear()
    fake_upstream.script = [("status", 503, {}, {})] * 20
    loop = asyncio.get_running_loop()
    started = loop.time()
    status, detail = await error_of(await client.post("/v1/responses", json=ask()))
    assert loop.time() - started < 2 and status in (502, 504)
    assert 1 <= len(fake_upstream.calls) < 6, "retries stop at the deadline"


# ----- redirects ----------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "location"), [
    (307, "/v1/elsewhere/chat/completions"),  # same origin
    (308, "http://127.0.0.2:9/v1/chat/completions"),  # another origin
    (302, "/v1/elsewhere/chat/completions"),
])
async def test_redirects_are_never_followed(client_factory_args: Any, status: int, location: str) -> None:
    fake_upstream, client = client_factory_args
    fake_upstream.script = [("redirect", status, location)]
    got, detail = await error_of(await client.post("/v1/responses", json=ask()))
    assert (got, detail["code"]) == (502, "upstream_redirect")
    assert detail["message"].startswith(f"upstream chat completion answered with a redirect (HTTP {status}) to ")
    assert "redirects are not followed: set remote_base_url to the final address" in detail["message"]
    assert fake_upstream.redirected == []
    fake_upstream.script = [("redirect", status, location)]
    _, error = await error_of(await client.post("/v1/responses", json=ask(stream=True)))
    assert error["code"] == "upstream_redirect" and fake_upstream.redirected == []


@pytest.fixture
async def client_factory_args(fake_upstream: Any, remote_key: str, make_remote_client: Any) -> Any:
    return fake_upstream, await limited_client(fake_upstream, make_remote_client)


# ----- max_tokens -----------------------------------------------------------------------------


async def test_output_beyond_max_tokens_is_not_relayed(client_factory_args: Any) -> None:
    """An upstream that ignores ``max_tokens``: relaying stops at the budget, the
    connection is dropped and the answer finishes with ``length``."""
    fake_upstream, client = client_factory_args
    fake_upstream.script = [("flood", 5000)]
    events = sse_events(await (await client.post("/v1/responses", json=ask(
        stream=True, decoding={"max_tokens": 5}))).text())
    deltas = [e for n, e in events if n == "response.output_text.delta"]
    assert len(deltas) == 5 and events[-1][0] == "response.completed"
    assert events[-1][1]["output_text"] == "t0 t1 t2 t3 t4"
    metrics = events[-2][1]["metrics"]
    assert (metrics["engine_finish_reason"], metrics["engine_output_tokens"]) == ("length", 5)
    await asyncio.wait_for(fake_upstream.disconnected.wait(), 5)
    # A non-streaming request is one JSON call upstream (llmpool_generate): its size is
    # bounded by remote_max_response_bytes, not by counting relayed deltas.


async def test_an_upstream_that_keeps_to_max_tokens_is_relayed_whole(client_factory_args: Any) -> None:
    """Exactly ``max_tokens`` chunks, then the finish and usage chunks: nothing is cut."""
    fake_upstream, client = client_factory_args
    body = await (await client.post("/v1/responses", json=ask(decoding={"max_tokens": 3}))).json()
    assert body["output_text"] == "Hello from fake"
    assert body["metrics"]["engine_finish_reason"] == "stop" and body["metrics"]["engine_prompt_tokens"] == 7
    assert KEY not in str(body)


# ----- options ----------------------------------------------------------------------------------


def test_limit_options_defaults_and_validation() -> None:
    good = {"remote_api_kind": "chat_completions", "remote_base_url": "https://api.example.com/v1",
            "remote_api_key_env": "K", "remote_model": "m"}
    options = llmpool_remote.RemoteOptions.model_validate(good)
    assert (options.remote_total_timeout_s, options.remote_max_response_bytes, options.remote_max_event_bytes) == (
        600.0, 16 * 1024 * 1024, 1024 * 1024)
    for bad, message in [
        ({"remote_total_timeout_s": 0}, "greater than 0"),
        ({"remote_total_timeout_s": "inf"}, "finite number"),
        ({"remote_max_response_bytes": 100}, "greater than or equal to 1024"),
        ({"remote_max_event_bytes": 0}, "greater than or equal to 1024"),
    ]:
        with pytest.raises(ValidationError, match=message):
            llmpool_remote.RemoteOptions.model_validate({**good, **bad})
