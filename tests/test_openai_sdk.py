"""The OpenAI-compatible surface through the official ``openai`` SDK, echo test backend.

The test server runs on the test's event loop, so the sync client is driven from a
thread (``asyncio.to_thread``) while the loop keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import echo_backend
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response

from llmpoold import hookimpl
from llmpoold.hookspecs import BackendSpec
from llmpoold.http.app import create_app
from llmpoold.http.keys import POOL
from llmpoold.http.openai_requests import chat_request, responses_request
from llmpoold.testing import make_registry, settings_from
from llmpoold.types import BackendMetrics, Capabilities, Completion, ModelTraits, TextDelta

pytestmark = pytest.mark.timeout(60)

MODELS = {"echo": {}, "slow": {"echo_delay_s": 0.03}, "bad": {"echo_fail_after": 1}, "off": {"enabled": False}}


def settings(**service: Any) -> dict[str, Any]:
    return {"service": service, "engine": {"backend": "echo", "models": MODELS}}


def sdk(client: Any, *, root: bool = False, key: str = "test-key") -> tuple[openai.OpenAI, openai.AsyncOpenAI]:
    """Sync and async SDK clients on the test server (no retries: errors surface at once)."""
    base = str(client.make_url("/v1" if root else "/openai/v1"))
    return (openai.OpenAI(base_url=base, api_key=key, max_retries=0),
            openai.AsyncOpenAI(base_url=base, api_key=key, max_retries=0))


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


@pytest.fixture
async def client(make_client: Any) -> Any:
    return await make_client(settings())


@pytest.fixture
async def clients(client: Any) -> tuple[openai.OpenAI, openai.AsyncOpenAI]:
    return sdk(client)


# ----- models ---------------------------------------------------------------------------


async def test_models_list_sync_and_async(clients: Any) -> None:
    sync, aio = clients
    page = await asyncio.to_thread(sync.models.list)
    assert sorted(m.id for m in page.data) == ["bad", "echo", "slow"]
    assert all(m.object == "model" and m.owned_by == "llmpool" and m.created > 0 for m in page.data)
    assert sorted(m.id for m in (await aio.models.list()).data) == ["bad", "echo", "slow"]
    assert (await aio.models.retrieve("echo")).id == "echo"
    with pytest.raises(openai.NotFoundError):
        await aio.models.retrieve("off")


# ----- chat completions -----------------------------------------------------------------


async def test_chat_completion_json_sync(clients: Any) -> None:
    sync, _ = clients
    completion = await asyncio.to_thread(
        sync.chat.completions.create, model="echo",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "one two three"}])
    assert isinstance(completion, ChatCompletion) and completion.id.startswith("chatcmpl-")
    choice = completion.choices[0]
    assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", "one two three", "stop")
    assert completion.usage is not None
    usage = completion.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (3, 3, 6)
    metrics = completion.model_extra["metrics"]  # the seed's timing metrics, an extra field the SDK keeps
    assert metrics["pool_total_wall_ms"] >= metrics["engine_total_wall_ms"] >= metrics["backend_inference_wall_ms"]


async def test_chat_completion_metrics_header_and_length(clients: Any) -> None:
    _, aio = clients
    raw = await aio.chat.completions.with_raw_response.create(
        model="echo", messages=[{"role": "user", "content": "a b c d"}], max_completion_tokens=2)
    completion = raw.parse()
    assert completion.choices[0].message.content == "a b" and completion.choices[0].finish_reason == "length"
    header = json.loads(raw.headers["X-Llmpool-Metrics"])
    assert header["engine_output_tokens"] == 2 and header["engine_finish_reason"] == "length"
    assert raw.headers["X-Request-Id"]


async def test_chat_stream_async_with_usage(clients: Any) -> None:
    _, aio = clients
    stream = await aio.chat.completions.create(model="slow", messages=[{"role": "user", "content": "a b c"}],
                                               stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    assert all(isinstance(c, ChatCompletionChunk) and c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "a b c"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == "stop" and set(finish[:-1]) == {None}
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert (usage_chunk.usage.completion_tokens, usage_chunk.usage.prompt_tokens) == (3, 3)
    assert all(c.usage is None for c in chunks[:-1])
    finishing = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
    assert finishing.model_extra["metrics"]["engine_output_tokens"] == 3


async def test_chat_stream_sync_without_usage(clients: Any) -> None:
    sync, _ = clients

    def run() -> list[ChatCompletionChunk]:
        return list(sync.chat.completions.create(model="slow", messages=[{"role": "user", "content": "x y"}],
                                                 stream=True))

    chunks = await asyncio.to_thread(run)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "x y"
    assert chunks[-1].choices[0].finish_reason == "stop" and all(c.usage is None for c in chunks)


async def test_chat_at_the_root_path(client: Any) -> None:
    _, aio = sdk(client, root=True)
    completion = await aio.chat.completions.create(model="echo", messages=[{"role": "user", "content": "root"}])
    assert completion.choices[0].message.content == "root"


async def test_multi_turn_and_content_parts(clients: Any) -> None:
    _, aio = clients
    completion = await aio.chat.completions.create(model="echo", messages=[
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "two"}]}])
    assert completion.choices[0].message.content == "part onetwo"  # text parts concatenate, as the seed does


# ----- responses ------------------------------------------------------------------------


async def test_responses_json_sync_and_incomplete(clients: Any) -> None:
    sync, aio = clients
    response = await asyncio.to_thread(sync.responses.create, model="echo", input="hello there world",
                                       instructions="Be brief.")
    assert isinstance(response, Response) and response.id.startswith("resp_")
    assert response.output_text == "hello there world" and response.status == "completed"
    assert response.instructions == "Be brief."
    assert response.usage is not None and (response.usage.input_tokens, response.usage.output_tokens) == (3, 3)
    assert response.model_extra["metrics"]["engine_finish_reason"] == "stop"
    cut = await aio.responses.create(model="echo", input="a b c", max_output_tokens=1)
    assert cut.output_text == "a" and cut.status == "incomplete"
    assert cut.incomplete_details is not None and cut.incomplete_details.reason == "max_output_tokens"


async def test_responses_stream_events(clients: Any) -> None:
    _, aio = clients
    stream = await aio.responses.create(model="slow", input=[{"role": "developer", "content": "Be brief."},
                                                             {"role": "user", "content": "a b c"}], stream=True)
    events = [event async for event in stream]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        *["response.output_text.delta"] * 3, "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed"]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert "".join(e.delta for e in deltas) == "a b c"
    done = events[-1].response
    assert done.output_text == "a b c" and done.status == "completed" and done.usage.output_tokens == 3
    assert done.output[0].id == deltas[0].item_id == events[2].item.id
    assert done.model_extra["metrics"]["engine_output_tokens"] == 3


async def test_responses_stream_helper_sync(clients: Any) -> None:
    sync, _ = clients

    def run() -> Response:
        with sync.responses.stream(model="slow", input="x y z") as stream:
            return stream.get_final_response()

    assert (await asyncio.to_thread(run)).output_text == "x y z"


# ----- errors ---------------------------------------------------------------------------


async def test_auth_failure_is_authentication_error(make_client: Any) -> None:
    client = await make_client(settings(api_keys=["sk-good"]))
    _, bad = sdk(client, key="sk-wrong")
    with pytest.raises(openai.AuthenticationError) as info:
        await bad.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x"}])
    assert info.value.body["code"] == "unauthorized" and info.value.body["type"] == "authentication_error"
    sync_bad, _ = sdk(client, key="sk-wrong")
    with pytest.raises(openai.AuthenticationError):
        await asyncio.to_thread(sync_bad.models.list)
    _, good = sdk(client, key="sk-good")
    assert (await good.responses.create(model="echo", input="ok")).output_text == "ok"


@pytest.mark.parametrize(("kwargs", "error", "code", "param"), [
    ({"model": "nope"}, openai.NotFoundError, "unknown_model", "model"),
    ({"model": "off"}, openai.ConflictError, "model_not_loaded", None),
    ({"model": "echo", "n": 2}, openai.BadRequestError, "unsupported_parameter", "n"),
    ({"model": "echo", "logprobs": True}, openai.BadRequestError, "logprobs_unsupported", "logprobs"),
    ({"model": "echo", "top_logprobs": 3}, openai.BadRequestError, "invalid_request", "top_logprobs"),
    ({"model": "echo", "logprobs": True, "top_logprobs": 21}, openai.UnprocessableEntityError, "invalid_body",
     "top_logprobs"),
    ({"model": "echo", "temperature": 9}, openai.UnprocessableEntityError, "invalid_body", "temperature"),
    ({"model": "echo", "max_tokens": 5000}, openai.UnprocessableEntityError, "invalid_body", "max_tokens"),
    ({"model": "echo", "extra_body": {"decoding": {"top_k": 0}}}, openai.UnprocessableEntityError, "invalid_body",
     "decoding.top_k"),
    ({"model": "echo", "extra_body": {"fairness_key": " "}}, openai.UnprocessableEntityError, "invalid_body",
     "fairness_key"),
])
async def test_errors_in_openai_shape(clients: Any, kwargs: dict, error: type, code: str, param: str | None) -> None:
    _, aio = clients
    with pytest.raises(error) as info:
        await aio.chat.completions.create(messages=[{"role": "user", "content": "x"}], **kwargs)
    body = info.value.body
    assert set(body) == {"message", "type", "code", "param"}
    assert (body["code"], body["param"]) == (code, param) and body["message"]


async def test_unsupported_inputs_are_400(clients: Any) -> None:
    _, aio = clients
    with pytest.raises(openai.BadRequestError, match="tool"):
        await aio.chat.completions.create(model="echo", messages=[
            {"role": "user", "content": "x"}, {"role": "tool", "content": "r", "tool_call_id": "c1"}])
    with pytest.raises(openai.BadRequestError, match="not stored"):
        await aio.responses.create(model="echo", input="x", previous_response_id="resp_1")
    with pytest.raises(openai.BadRequestError, match="does not support tool calling") as info:
        await aio.responses.create(model="echo", input=[  # a tool result needs a backend with tools
            {"role": "user", "content": "x"}, {"type": "function_call_output", "call_id": "c1", "output": "42"}])
    assert (info.value.body["code"], info.value.body["param"]) == ("tools_unsupported", "input")
    with pytest.raises(openai.BadRequestError, match="input item type 'web_search_call'") as info:
        await aio.responses.create(model="echo", input=[{"type": "web_search_call", "id": "ws_1"}])
    assert (info.value.body["code"], info.value.body["param"]) == ("unsupported_parameter", "input[0]")
    with pytest.raises(openai.BadRequestError, match="needs a 'role'"):
        await aio.chat.completions.create(model="echo", messages=[{"content": "x"}])  # type: ignore[list-item]


async def test_unknown_path_and_raw_errors_use_openai_shape(client: Any) -> None:
    resp = await client.get("/openai/v1/nothing")
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
    resp = await client.post("/openai/v1/chat/completions", data="{", headers={"Content-Type": "application/json"})
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid_json"
    resp = await client.post("/v1/responses", json={"model": "nope", "input": "x"})
    assert (await resp.json())["detail"]["code"] == "unknown_model"  # the seed surface keeps its envelope


async def test_queue_full_is_rate_limit_error(make_client: Any) -> None:
    client = await make_client({"engine": {"backend": "echo", "fairness": {"max_pending_per_executor": 1},
                                            "models": {"slow": {"echo_delay_s": 0.03}}}})
    sched = client.server.app[POOL].entries["slow"].scheduler
    _, aio = sdk(client)
    words = " ".join(f"w{i}" for i in range(8))
    ask = [{"role": "user", "content": words}]
    tasks = [asyncio.create_task(aio.chat.completions.create(model="slow", messages=ask))]
    await until(lambda: sched.runtime_inflight == 1)
    tasks.append(asyncio.create_task(aio.responses.create(model="slow", input=words)))
    await until(lambda: sched.queue_depth == 1)
    with pytest.raises(openai.RateLimitError) as info:
        await aio.chat.completions.create(model="slow", messages=[{"role": "user", "content": "x"}])
    assert info.value.body["code"] == "executor_queue_full" and info.value.body["type"] == "rate_limit_error"
    assert int(info.value.response.headers["Retry-After"]) >= 1
    first, second = await asyncio.gather(*tasks)
    assert first.choices[0].message.content == words and second.output_text == words


async def test_failure_mid_stream(clients: Any) -> None:
    _, aio = clients
    stream = await aio.chat.completions.create(model="bad", messages=[{"role": "user", "content": "a b c"}],
                                               stream=True)
    seen = []
    with pytest.raises(openai.APIError, match="echo failed"):
        async for chunk in stream:
            seen.append(chunk.choices[0].delta.content)
    assert seen == ["", "a"]
    events = [e async for e in await aio.responses.create(model="bad", input="a b c", stream=True)]
    assert events[-1].type == "error" and events[-1].code == "echo_failed"


# ----- the core path: cancellation and the remote gate -----------------------------------


async def test_closing_a_stream_cancels_the_generation(make_client: Any) -> None:
    before = {id(r) for r in echo_backend.RUNTIMES}
    client = await make_client({"engine": {"backend": "echo", "models": {"slow": {"echo_delay_s": 0.03}}}})
    runtime = next(r for r in echo_backend.RUNTIMES if id(r) not in before)
    _, aio = sdk(client)
    words = " ".join(f"w{i}" for i in range(200))
    stream = await aio.chat.completions.create(model="slow", messages=[{"role": "user", "content": words}],
                                               stream=True)
    async for chunk in stream:
        if chunk.choices[0].delta.content:
            break
    await stream.close()
    await until(lambda: bool(runtime.cancelled))
    assert (await aio.responses.create(model="slow", input="next one")).output_text == "next one"


async def test_prometheus_metrics_count_openai_requests(client: Any, clients: Any) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    _, aio = clients
    await aio.chat.completions.create(model="echo", messages=[{"role": "user", "content": "a b"}])
    [e async for e in await aio.responses.create(model="echo", input="c", stream=True)]
    with pytest.raises(openai.ConflictError):
        await aio.responses.create(model="off", input="x")
    text = await (await client.get("/metrics")).text()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("llmpool_requests_total", (("model", "echo"), ("outcome", "ok")))] == 2
    assert samples[("llmpool_output_tokens_total", (("model", "echo"),))] == 3
    assert samples[("llmpool_rejected_requests_total", (("model", "off"), ("reason", "model_not_loaded")))] == 1


class FakeRemote:
    """A remote backend stand-in (no network): it only has to be declared remote."""

    @staticmethod
    @hookimpl
    def llmpool_backends() -> list[BackendSpec]:
        return [BackendSpec(name="fake_remote", remote=True, requires_model_path=False)]

    @staticmethod
    @hookimpl
    def llmpool_model_traits(backend: str, model: Any) -> ModelTraits | None:
        return ModelTraits(capabilities=Capabilities(multi_turn=True)) if backend == "fake_remote" else None

    @staticmethod
    @hookimpl
    def llmpool_load(backend: str, replica_id: str, model: Any) -> object | None:
        return object() if backend == "fake_remote" else None

    @staticmethod
    @hookimpl
    def llmpool_stream(backend: str, runtime: Any, request: Any) -> Iterator[Any] | None:
        if backend != "fake_remote":
            return None
        return iter([TextDelta("let me see", channel="reasoning"), TextDelta("remote"), TextDelta(" ok"),
                     Completion(finish_reason="stop", metrics=BackendMetrics(output_tokens=2))])

    @staticmethod
    @hookimpl
    def llmpool_unload(backend: str, runtime: Any) -> bool | None:
        return True if backend == "fake_remote" else None


async def test_remote_gate_and_extra_body(aiohttp_client: Any) -> None:
    app = create_app(settings_from({"engine": {"models": {"r": {"backend": "fake_remote"}}}}),
                     make_registry(FakeRemote()))
    client = await aiohttp_client(app)
    await app[POOL].startup_done.wait()
    _, aio = sdk(client)
    with pytest.raises(openai.PermissionDeniedError) as info:
        await aio.chat.completions.create(model="r", messages=[{"role": "user", "content": "x"}])
    assert info.value.body["code"] == "remote_execution_disallowed"
    completion = await aio.chat.completions.create(model="r", messages=[{"role": "user", "content": "x"}],
                                                   extra_body={"allow_remote": True, "fairness_key": "team-a"})
    assert completion.choices[0].message.content == "remote ok"
    assert completion.choices[0].message.model_extra["reasoning_content"] == "let me see"
    response = await aio.responses.create(model="r", input="x", extra_body={"allow_remote": True})
    assert response.output_text == "remote ok"
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.output[0].content[0].text == "let me see"  # type: ignore[union-attr,index]


async def test_reasoning_streams(aiohttp_client: Any) -> None:
    app = create_app(settings_from({"engine": {"models": {"r": {"backend": "fake_remote"}}}}),
                     make_registry(FakeRemote()))
    client = await aiohttp_client(app)
    await app[POOL].startup_done.wait()
    _, aio = sdk(client)
    ask = {"model": "r", "stream": True, "extra_body": {"allow_remote": True}}
    chunks = [c async for c in await aio.chat.completions.create(messages=[{"role": "user", "content": "x"}], **ask)]
    assert [c.choices[0].delta.model_extra.get("reasoning_content") for c in chunks][1] == "let me see"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "remote ok"
    events = [e async for e in await aio.responses.create(input="x", **ask)]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    assert kinds[2:9] == ["response.output_item.added", "response.content_part.added", "response.reasoning_text.delta",
                          "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
                          "response.output_item.added"]
    assert [e.output_index for e in events if e.type == "response.output_text.delta"] == [1, 1]
    final = events[-1].response
    assert [item.type for item in final.output] == ["reasoning", "message"] and final.output_text == "remote ok"


# ----- mapping onto the seed request ----------------------------------------------------


def test_chat_body_maps_onto_the_seed_request() -> None:
    body, seed = chat_request({
        "model": "m", "messages": [{"role": "system", "content": "S1"}, {"role": "developer", "content": "S2"},
                                   {"role": "user", "content": [{"type": "text", "text": "Q"}]}],
        "max_tokens": 9, "max_completion_tokens": 7, "temperature": 0.2, "top_p": 0.5, "stop": "END",
        "seed": 1, "presence_penalty": 0.1, "logit_bias": {}, "user": "u",  # ignored, as OpenAI servers do
        "fairness_key": "k", "decoding": {"top_k": 3, "temperature": 1.0}, "stream": True})
    assert (seed.instructions, seed.input, seed.messages) == ("S1\n\nS2", "Q", None)
    d = seed.decoding
    assert (d.max_tokens, d.temperature, d.top_p, d.top_k, d.stop) == (7, 0.2, 0.5, 3, ["END"])
    assert seed.fairness_key == "k" and seed.stream and not seed.allow_remote
    _, seed = chat_request({"model": "m", "messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]}]})
    assert seed.input is None and [m.role for m in seed.messages or []] == ["user", "assistant", "user"]
    assert seed.messages[-1].content[0].type == "image_url"  # type: ignore[index, union-attr]


def test_responses_body_maps_onto_the_seed_request() -> None:
    _, seed = responses_request({
        "model": "m", "instructions": "I", "max_output_tokens": 5, "reasoning": {"effort": "low"},
        "input": [{"type": "message", "role": "system", "content": "S"},
                  {"role": "user", "content": [{"type": "input_text", "text": "Q"}]}],
        "store": False, "text": {"format": {"type": "text"}}})
    assert (seed.instructions, seed.input, seed.decoding.max_tokens, seed.reasoning_effort) == ("I\n\nS", "Q", 5, "low")
