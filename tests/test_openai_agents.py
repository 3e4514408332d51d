"""Structured output, tools and legacy completions on the OpenAI surfaces, through the
official ``openai`` SDK, echo test backend (the remote relay is tested in the remote
plugin's tests). A local backend refuses what it cannot honour with a 400 naming the
parameter, so the SDK raises ``BadRequestError``; nothing is ignored silently."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest
from pydantic import BaseModel

from llmpoold.http.keys import POOL

pytestmark = pytest.mark.timeout(60)

MODELS = {"echo": {}, "structured": {"echo_response_formats": ["text", "json_schema", "json_object"]}}
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
USER = [{"role": "user", "content": "hello there"}]


@pytest.fixture
async def client(make_client: Any) -> Any:
    return await make_client({"engine": {"backend": "echo", "models": MODELS}})


@pytest.fixture
def aio(client: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=str(client.make_url("/openai/v1")), api_key="x", max_retries=0)


def seen(client: Any, model: str) -> list[Any]:
    return client.server.app[POOL].entries[model].replicas[0].runtime.requests


class Answer(BaseModel):
    word: str


async def test_structured_output_refused_where_unsupported(aio: openai.AsyncOpenAI, client: Any) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        await aio.beta.chat.completions.parse(model="echo", messages=USER, response_format=Answer)
    assert (err.value.code, err.value.param) == ("response_format_unsupported", "response_format")
    with pytest.raises(openai.BadRequestError) as err:
        await aio.chat.completions.create(model="echo", messages=USER, response_format={"type": "json_object"},
                                          stream=True)
    assert err.value.code == "response_format_unsupported"
    with pytest.raises(openai.BadRequestError) as err:
        await aio.responses.create(model="echo", input="x", text={"format": {"type": "json_object"}})
    assert (err.value.code, err.value.param) == ("response_format_unsupported", "text.format")
    assert seen(client, "echo") == []  # never reached the backend
    # text is no constraint at all
    answer = await aio.chat.completions.create(model="echo", messages=USER, response_format={"type": "text"})
    assert answer.choices[0].message.content == "hello there" and seen(client, "echo")[-1].response_format is None


async def test_structured_output_reaches_a_backend_that_declares_it(aio: openai.AsyncOpenAI, client: Any) -> None:
    await aio.chat.completions.create(model="structured", messages=USER, response_format={
        "type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": True}})
    assert seen(client, "structured")[-1].response_format == {
        "type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": True}}
    await aio.responses.create(model="structured", input="x", text={"format": {
        "type": "json_schema", "name": "answer", "schema": {"type": "object"}, "description": "d"}})
    assert seen(client, "structured")[-1].response_format == {"type": "json_schema", "json_schema": {
        "name": "answer", "description": "d", "schema": {"type": "object"}, "strict": True}}
    stream = await aio.chat.completions.create(model="structured", messages=USER, stream=True,
                                               response_format={"type": "json_object"})
    assert [c async for c in stream] and seen(client, "structured")[-1].response_format == {"type": "json_object"}


@pytest.mark.parametrize(("fmt", "status", "param"), [
    ({"type": "xml"}, 400, "response_format.type"),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, 422, "response_format.json_schema.name"),
    ({"type": "json_schema"}, 422, "response_format.json_schema"),
])
async def test_malformed_response_format(client: Any, fmt: dict, status: int, param: str) -> None:
    resp = await client.post("/openai/v1/chat/completions", json={"model": "structured", "messages": USER,
                                                                  "response_format": fmt})
    assert resp.status == status
    assert (await resp.json())["error"]["param"] == param


async def test_tools_refused_by_a_local_backend(aio: openai.AsyncOpenAI, client: Any) -> None:
    for choice in ("auto", "none", "required", {"type": "function", "function": {"name": "lookup"}}):
        with pytest.raises(openai.BadRequestError) as err:
            await aio.chat.completions.create(model="echo", messages=USER, tools=[TOOL], tool_choice=choice)
        assert (err.value.code, err.value.param) == ("tools_unsupported", "tools")
    with pytest.raises(openai.BadRequestError) as err:
        await aio.responses.create(model="echo", input="x", tools=[{"type": "function", "name": "lookup"}])
    assert err.value.code == "tools_unsupported"
    with pytest.raises(openai.BadRequestError) as err:  # a tool turn without tools is tool calling too
        await aio.chat.completions.create(model="echo", messages=[
            *USER, {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "42"}])
    assert (err.value.code, err.value.param) == ("tools_unsupported", "messages")
    assert seen(client, "echo") == []


@pytest.mark.parametrize(("extra", "status", "param"), [
    ({"tools": [{"type": "web_search"}]}, 400, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, 422, "tools[0].function.name"),
    ({"tool_choice": "auto"}, 422, "tool_choice"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "other"}}}, 422, "tool_choice"),
    ({"tools": [TOOL], "tool_choice": "sometimes"}, 400, "tool_choice"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 422, "messages[0].tool_call_id"),
])
async def test_malformed_tools(client: Any, extra: dict, status: int, param: str) -> None:
    resp = await client.post("/openai/v1/chat/completions", json={"model": "echo", "messages": USER, **extra})
    assert resp.status == status, await resp.text()
    assert (await resp.json())["error"]["param"] == param


# ----- legacy completions ---------------------------------------------------------------


async def test_completions_json_stream_and_list(aio: openai.AsyncOpenAI, client: Any) -> None:
    done = await aio.completions.create(model="echo", prompt="The capital of France", max_tokens=2, stop=["\n"])
    assert done.object == "text_completion" and done.choices[0].text == "The capital"
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 2
    request = seen(client, "echo")[-1]
    assert request.prompt_format == "raw" and request.decoding.stop == ("\n",)
    chunks = [c async for c in await aio.completions.create(model="echo", prompt="a b c", stream=True,
                                                             stream_options={"include_usage": True})]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "a b c"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == 3
    many = await aio.completions.create(model="echo", prompt=["one two", "three"])
    assert [(c.index, c.text) for c in many.choices] == [(0, "one two"), (1, "three")]
    assert many.usage.completion_tokens == 3


@pytest.mark.parametrize(("extra", "param"), [
    ({"echo": True}, "echo"), ({"suffix": "x"}, "suffix"), ({"n": 2}, "n"),
    ({"best_of": 3}, "best_of"), ({"prompt": [[1, 2, 3]]}, "prompt"),
    ({"prompt": ["a", "b"], "stream": True}, "stream"),
])
async def test_completions_refusals_name_the_parameter(aio: openai.AsyncOpenAI, extra: dict, param: str) -> None:
    body = {"model": "echo", "prompt": "x", **extra}
    with pytest.raises(openai.BadRequestError) as err:
        await aio.completions.create(**body)
    assert (err.value.code, err.value.param) == ("unsupported_parameter", param)


async def test_completions_logprobs_need_a_model_that_scores_tokens(aio: openai.AsyncOpenAI) -> None:
    """``logprobs`` is admitted only where the model's backend returns them (GGUF:
    tests/test_openai_gguf.py), never ignored; beyond 20 it is malformed."""
    with pytest.raises(openai.BadRequestError) as err:
        await aio.completions.create(model="echo", prompt="x", logprobs=2)
    assert (err.value.code, err.value.param) == ("logprobs_unsupported", "logprobs")
    with pytest.raises(openai.UnprocessableEntityError) as malformed:
        await aio.completions.create(model="echo", prompt="x", logprobs=21)
    assert malformed.value.param == "logprobs"


async def test_completions_of_an_unknown_model_and_a_failure(aio: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        await aio.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.NotFoundError):
        await aio.completions.create(model="nope", prompt=["x", "y"])


async def test_sync_sdk_completions(client: Any) -> None:
    sync = openai.OpenAI(base_url=str(client.make_url("/openai/v1")), api_key="x", max_retries=0)
    done = await asyncio.to_thread(sync.completions.create, model="echo", prompt="sync works")
    assert done.choices[0].text == "sync works"


def test_tool_fields_cross_the_worker_wire() -> None:
    """A worker process gets the tools, the tool turns and the format, and sends tool call
    pieces back (llmpoold.replicas.wire)."""
    import dataclasses
    import json

    from llmpoold.replicas.wire import item_from_wire, item_to_wire, request_from_wire, request_to_wire
    from llmpoold.testing import make_request
    from llmpoold.types import Message, ToolCallDelta

    call = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
    request = dataclasses.replace(
        make_request(), tools=(TOOL,), tool_choice={"type": "function", "function": {"name": "lookup"}},
        response_format={"type": "json_object"}, thinking_token_budget=9,
        messages=(Message("user", "q"), Message("assistant", "", tool_calls=(call,)),
                  Message("tool", "42", tool_call_id="c1")))
    assert request_from_wire(json.loads(json.dumps(request_to_wire(request)))) == request
    piece = ToolCallDelta(0, id="c1", name="lookup", arguments='{"a"')
    assert item_from_wire(json.loads(json.dumps(item_to_wire(piece)))) == piece
