"""The remote backend against a real OpenAI-compatible server: llama-cpp-python's own
server serving Gemma 3 270M on loopback, started once for the session."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from remote_test_support import KEY_ENV, LLAMA_MODEL, remote_entry

from llmpoold.config import resolve_model_options
from llmpoold.testing import BackendContractSuite, make_registry, make_request, settings_from, sse_events

pytestmark = pytest.mark.timeout(120)

PROMPT = {"instructions": "You are a helpful assistant.", "input": "Count from one to five.",
          "decoding": {"max_tokens": 8, "temperature": 0}}



@pytest.fixture
async def llama_client(llama_upstream: str, make_remote_client: Any) -> Any:
    return await make_remote_client({"gemma-remote": remote_entry(llama_upstream, LLAMA_MODEL,
                                                                  remote_health_check="models")})


class TestRemoteContract(BackendContractSuite):
    backend = "openai_compatible"

    @pytest.fixture(scope="class")
    @classmethod
    def model_entry(cls, llama_upstream: str) -> dict[str, Any]:
        return remote_entry(llama_upstream, LLAMA_MODEL, remote_timeout_s=60)


async def test_json_response_through_llmpoold(llama_client: Any) -> None:
    resp = await llama_client.post("/v1/responses", json={"model": "gemma-remote", "allow_remote": True, **PROMPT})
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["output_text"].strip()
    metrics = body["metrics"]
    assert 1 <= metrics["engine_output_tokens"] <= 8
    assert metrics["engine_finish_reason"] in ("length", "stop")
    # A non-streaming request is one JSON call upstream (llmpool_generate): no first token to time.
    assert metrics["engine_tokens_per_second"] > 0 and metrics["gpu_time_to_first_token_ms"] is None
    upstream = body["metadata"]["upstream_response"]
    assert upstream["model"] == LLAMA_MODEL and upstream["id"].startswith("chatcmpl")
    assert "content" not in json.dumps(upstream["choices"])


async def test_streamed_response_through_llmpoold(llama_client: Any) -> None:
    resp = await llama_client.post("/v1/responses", json={"model": "gemma-remote", "allow_remote": True,
                                                          "stream": True, **PROMPT})
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(await resp.text())
    names = [n for n, _ in events]
    assert names[0] == "response.created" and names[-2:] == ["response.metrics", "response.completed"]
    deltas = [d["delta"] for n, d in events if n == "response.output_text.delta"]
    assert len(deltas) >= 2, "the upstream's deltas are relayed one by one"
    assert "".join(deltas) == events[-1][1]["output_text"] != ""
    assert 1 <= events[-2][1]["metrics"]["engine_output_tokens"] <= 8


async def test_gate_refuses_without_allow_remote(llama_client: Any) -> None:
    resp = await llama_client.post("/v1/responses", json={"model": "gemma-remote", **PROMPT})
    assert resp.status == 403
    assert (await resp.json())["detail"]["code"] == "remote_execution_disallowed"


async def test_multi_turn_messages(llama_client: Any) -> None:
    resp = await llama_client.post("/v1/responses", json={
        "model": "gemma-remote", "allow_remote": True, "decoding": {"max_tokens": 4},
        "messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"},
                     {"role": "user", "content": [{"type": "text", "text": "Say yes."}]}]})
    assert resp.status == 200, await resp.text()


async def test_admin_shows_remote_model_without_the_key(llama_client: Any) -> None:
    import os

    text = await (await llama_client.get("/v1/admin/models")).text()
    entry = next(m for m in json.loads(text)["models"] if m["name"] == "gemma-remote")
    assert entry["runtime_state"] == "loaded" and entry["definition"]["remote_api_key_env"] == KEY_ENV
    assert KEY_ENV in text and os.environ[KEY_ENV] not in text


def test_generate_hook_reads_usage(llama_upstream: str) -> None:
    """The non-streaming hook path: one JSON call, usage from the upstream."""
    registry = make_registry("openai_compatible")
    spec = registry.spec("openai_compatible")
    raw = settings_from({"engine": {"models": {"g": remote_entry(llama_upstream, LLAMA_MODEL)}}}).engine.models["g"]
    model = resolve_model_options(raw, spec.options_model, backend="openai_compatible", requires_model_path=False)
    runtime = registry.hook.llmpool_load(backend="openai_compatible", replica_id="g#1", model=model)
    try:
        request = make_request(model="g", text="Count from one to five.", max_tokens=6)
        result = registry.hook.llmpool_generate(backend="openai_compatible", runtime=runtime, request=request)
        text, reasoning, completion = asyncio.run(result)
        assert text and reasoning is None
        assert completion.metrics.prompt_tokens and completion.metrics.prompt_tokens > 5
        assert completion.metrics.output_tokens == 6 and completion.finish_reason == "length"
    finally:
        assert registry.hook.llmpool_unload(backend="openai_compatible", runtime=runtime) is True


async def test_structured_output_relayed_to_llama_cpp_server(llama_client: Any) -> None:
    """``response_format`` goes upstream, where llama.cpp's server enforces it with its JSON
    grammar (it takes ``json_object``; a ``json_schema`` it refuses comes back as a 502
    naming its reason): the answer starts as a JSON object (a few tokens only: grammar
    sampling is slow on a small CPU)."""
    import openai

    aio = openai.AsyncOpenAI(base_url=str(llama_client.make_url("/openai/v1")), api_key="x", max_retries=0)
    chat = await aio.chat.completions.create(
        model="gemma-remote", messages=[{"role": "user", "content": "Name the capital of France."}],
        max_tokens=6, temperature=0, extra_body={"allow_remote": True}, response_format={"type": "json_object"})
    assert (chat.choices[0].message.content or "").lstrip().startswith("{")
    with pytest.raises(openai.InternalServerError, match="json_object"):
        await aio.chat.completions.create(
            model="gemma-remote", messages=[{"role": "user", "content": "x"}], max_tokens=4,
            extra_body={"allow_remote": True},
            response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object"}}})
