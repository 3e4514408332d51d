"""Structured output and tools through the remote backend, with the official ``openai``
SDK against llmpoold and the fake upstream (the fault-injecting fake: it answers tool
calls on demand). The SDK's sync client runs on a thread while the test loop serves."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import openai
import pytest
from pydantic import BaseModel
from remote_test_support import remote_entry

pytestmark = pytest.mark.timeout(60)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
REMOTE = {"allow_remote": True}


@pytest.fixture
async def aio(fake_upstream: Any, remote_key: str, make_remote_client: Any) -> openai.AsyncOpenAI:
    client = await make_remote_client({"r": remote_entry(fake_upstream.base_url, "fake-model")})
    return openai.AsyncOpenAI(base_url=str(client.make_url("/openai/v1")), api_key="x", max_retries=0)


async def test_chat_tool_call_relayed_json_and_stream(aio: openai.AsyncOpenAI, fake_upstream: Any) -> None:
    fake_upstream.script = ["tool_call"]
    completion = await aio.chat.completions.create(
        model="r", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER],
        tool_choice="required", parallel_tool_calls=False, extra_body=REMOTE)
    sent = fake_upstream.calls[-1].body
    assert sent["tools"] == [WEATHER] and sent["tool_choice"] == "required" and sent["parallel_tool_calls"] is False
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert (call.id, call.function.name, json.loads(call.function.arguments)) == (
        "call_fake1", "get_weather", {"city": "Paris", "days": 3})

    fake_upstream.script = ["tool_call"]
    stream = await aio.chat.completions.create(
        model="r", messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER], stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, extra_body=REMOTE)
    chunks = [chunk async for chunk in stream]
    pieces = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or []) if c.choices]
    assert len(pieces) == 3 and pieces[0].id == "call_fake1" and pieces[0].function.name == "get_weather"
    assert json.loads("".join(p.function.arguments or "" for p in pieces)) == {"city": "Paris", "days": 3}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    sent = fake_upstream.calls[-1].body
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert "parallel_tool_calls" not in sent  # not sent: the upstream's default


async def test_tool_results_go_back_upstream(aio: openai.AsyncOpenAI, fake_upstream: Any) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}
    completion = await aio.chat.completions.create(model="r", tools=[WEATHER], extra_body=REMOTE, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}])
    assert completion.choices[0].message.content == "Hello from fake"
    assert fake_upstream.calls[-1].body["messages"] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}]


async def test_responses_function_call_items(aio: openai.AsyncOpenAI, fake_upstream: Any) -> None:
    flat = {"type": "function", "name": "get_weather", "parameters": WEATHER["function"]["parameters"]}
    for stream in (False, True):
        fake_upstream.script = ["tool_call"]
        if stream:
            events = [e async for e in await aio.responses.create(model="r", input="Weather?", tools=[flat],
                                                                  stream=True, extra_body=REMOTE)]
            kinds = [e.type for e in events]
            assert "response.function_call_arguments.delta" in kinds
            assert "response.function_call_arguments.done" in kinds
            response = events[-1].response
        else:
            response = await aio.responses.create(model="r", input="Weather?", tools=[flat], extra_body=REMOTE)
        assert [item.type for item in response.output] == ["function_call"]
        item = response.output[0]
        assert (item.call_id, item.name, json.loads(item.arguments)) == ("call_fake1", "get_weather",
                                                                          {"city": "Paris", "days": 3})
        assert fake_upstream.calls[-1].body["tools"] == [{"type": "function", "function": {
            "name": "get_weather", "parameters": WEATHER["function"]["parameters"]}}]
    await aio.responses.create(model="r", tools=[flat], extra_body=REMOTE, input=[
        {"role": "user", "content": "Weather?"},
        {"type": "function_call", "call_id": "call_9", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_9", "output": "rain"}])
    assert fake_upstream.calls[-1].body["messages"][1:] == [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_9", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "content": "rain", "tool_call_id": "call_9"}]


class City(BaseModel):
    name: str
    country: str


async def test_structured_output_is_relayed(aio: openai.AsyncOpenAI, fake_upstream: Any,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fake_upstream, "completion", lambda body, content='{"name": "Paris", "country": "FR"}': {
        "id": "c", "object": "chat.completion", "created": 1, "model": body["model"],
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}]})
    parsed = await aio.beta.chat.completions.parse(model="r", messages=[{"role": "user", "content": "Paris?"}],
                                                   response_format=City, extra_body=REMOTE)
    assert parsed.choices[0].message.parsed == City(name="Paris", country="FR")
    fmt = fake_upstream.calls[-1].body["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["name"] == "City"
    assert fmt["json_schema"]["schema"]["required"] == ["name", "country"]
    await aio.chat.completions.create(model="r", messages=[{"role": "user", "content": "x"}],
                                      response_format={"type": "json_object"}, extra_body=REMOTE)
    assert fake_upstream.calls[-1].body["response_format"] == {"type": "json_object"}
    await aio.responses.create(model="r", input="x", extra_body=REMOTE, text={"format": {
        "type": "json_schema", "name": "city", "schema": {"type": "object"}, "strict": True}})
    assert fake_upstream.calls[-1].body["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "city", "schema": {"type": "object"}, "strict": True}}
    # A streamed request may carry one on the OpenAI surfaces (the seed's surface refuses the pair).
    stream = await aio.chat.completions.create(model="r", messages=[{"role": "user", "content": "x"}], stream=True,
                                               response_format={"type": "json_object"}, extra_body=REMOTE)
    assert [c async for c in stream]
    assert fake_upstream.calls[-1].body["response_format"] == {"type": "json_object"}


async def test_sync_sdk_refusals_are_bad_requests(aio: openai.AsyncOpenAI) -> None:
    sync = openai.OpenAI(base_url=str(aio.base_url), api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        await asyncio.to_thread(sync.chat.completions.create, model="r", messages=[{"role": "user", "content": "x"}],
                                tools=[{"type": "web_search"}], extra_body=REMOTE)
    assert err.value.code == "unsupported_parameter" and err.value.param == "tools[0].type"


async def test_legacy_completions_are_refused_for_a_chat_upstream(aio: openai.AsyncOpenAI,
                                                                  fake_upstream: Any) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        await aio.completions.create(model="r", prompt="Once upon a time", extra_body=REMOTE)
    assert (err.value.code, err.value.param) == ("completions_unsupported", "prompt")
    assert fake_upstream.calls == []
