"""``POST /openai/v1/completions``: OpenAI's legacy text completions.

``prompt`` (a string, or a list of strings: one choice each, in order) is continued as
is: the request runs on the raw prompt path (the ``raw`` prompt format: no template, no
instructions, the model's special tokens parsed as written; output not stripped), with
the same admission, fair queue, cancellation and metrics as every other surface.
``max_tokens``, ``stop``, ``temperature``, ``top_p`` and llmpool's own fields map as
on Chat Completions. ``logprobs: N`` (0..20; OpenAI's limit is 5) returns each token's
log probability and the N most likely alternatives in the legacy shape (``tokens``,
``token_logprobs``, ``top_logprobs``, ``text_offset``: character offsets in the choice's
text, from 0 as no prompt is echoed), on models with ``Capabilities.logprobs`` (else 400
``logprobs_unsupported``). ``echo: true``, ``suffix``, ``best_of`` > 1, ``n`` > 1
and token-id prompts are 400 ``unsupported_parameter``; several prompts stream only one
at a time (a list with ``stream: true`` is refused). A model that cannot continue a raw
prompt (the remote backend, whose upstream is a chat API) is 400
``completions_unsupported``.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import time
import uuid
from collections.abc import Iterable
from dataclasses import replace
from typing import Annotated, Any

from aiohttp import web
from pydantic import Field

from llmpoold.config import MAX_STOP_CHARS, Stop
from llmpoold.errors import ApiError
from llmpoold.http.keys import POOL, REQUEST_ID
from llmpoold.http.openai_requests import OpenAIExtras, StreamOptions, seed_request_of
from llmpoold.http.openai_shapes import chat_finish, chat_usage, error_body
from llmpoold.http.openai_tools import unsupported
from llmpoold.http.respond import Event, Parsed, parse_body, read_json, respond
from llmpoold.inference import Inference, InferenceResult, record_refused_body
from llmpoold.schemas import MAX_TEXT_CHARS, ResponseRequest, Text
from llmpoold.types import TextDelta, TokenLogprob, ToolCallDelta

MAX_PROMPTS = 16


class CompletionsBody(OpenAIExtras):
    prompt: Text | Annotated[list[Any], Field(max_length=MAX_PROMPTS)]
    max_tokens: int | None = None
    stop: str | Stop | None = Field(None)
    echo: bool | None = None
    suffix: str | None = None
    logprobs: int | None = Field(None, ge=0, le=20)  # OpenAI allows 5; llama.cpp's server 20
    best_of: int | None = None
    n: int | None = None
    stream_options: StreamOptions | None = None


def completions_request(data: Any) -> tuple[CompletionsBody, list[ResponseRequest]]:
    """The body and one seed request per prompt. Raises ApiError 400/422."""
    body: CompletionsBody = parse_body(CompletionsBody, data)
    for name, value, neutral in (("echo", body.echo, False), ("suffix", body.suffix, None),
                                 ("best_of", body.best_of, 1), ("n", body.n, 1)):
        if value is not None and value != neutral:
            raise unsupported(name, f"{name}={value!r} is not supported on completions")
    if body.tools is not None or body.tool_choice is not None:
        raise unsupported("tools", "completions take no tools; use chat completions")
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts or not all(isinstance(p, str) and len(p) <= MAX_TEXT_CHARS for p in prompts):
        raise unsupported("prompt", "prompt must be a string or a non-empty list of strings (no token ids)")
    if len(prompts) > 1 and body.stream:
        raise unsupported("stream", "stream takes one prompt; send the prompts as separate requests")
    if isinstance(body.stop, str) and len(body.stop) > MAX_STOP_CHARS:
        raise unsupported("stop", f"a stop string is at most {MAX_STOP_CHARS} characters")
    seeds = []
    for prompt in prompts:
        seed = seed_request_of(body, {"input": prompt}, conversation_param="prompt",
                             max_tokens=(body.max_tokens, "max_tokens"), stop=body.stop)
        assert seed.agent is not None
        seeds.append(seed.with_agent(replace(seed.agent, raw_prompt=True, logprobs=body.logprobs)))
    return body, seeds


class TextLogprobs:
    """The legacy ``logprobs`` object of one choice, built token by token (a stream's
    chunks continue the text offsets of the chunks before)."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._offset = 0

    def of(self, entries: Iterable[TokenLogprob]) -> dict[str, Any]:
        out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for entry in entries:
            out["tokens"].append(entry.token)
            out["token_logprobs"].append(entry.logprob)
            top = {alt.token: alt.logprob for alt in entry.top}
            top.setdefault(entry.token, entry.logprob)  # as OpenAI: the sampled token is always there
            out["top_logprobs"].append(top)
            out["text_offset"].append(self._offset)  # a partial character's tokens share its offset
            self._offset += len(self._decoder.decode(bytes(entry.bytes)))
        return out


class CompletionShape:
    """``text_completion`` objects, JSON and streamed, for one or several prompts."""

    metrics_header = True

    def __init__(self, *, model: str, include_usage: bool = False, logprobs: bool = False) -> None:
        """``logprobs``: the request asked for them (each choice then has its object)."""
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage
        self.logprobs = TextLogprobs() if logprobs else None

    def _object(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "system_fingerprint": None, **extra}

    @staticmethod
    def _choice(index: int, text: str, finish: str | None, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def many(self, results: list[InferenceResult]) -> dict[str, Any]:
        usages = [chat_usage(r) for r in results]
        usage = {key: sum(u[key] for u in usages) for key in ("prompt_tokens", "completion_tokens", "total_tokens")}
        choices = [self._choice(i, r.output_text, chat_finish(r),
                                TextLogprobs().of(r.logprobs) if self.logprobs is not None else None)
                   for i, r in enumerate(results)]
        return self._object(choices, usage=usage, metrics=[r.metrics for r in results])

    def json(self, result: InferenceResult) -> dict[str, Any]:
        body = self.many([result])
        body["metrics"] = result.metrics
        return body

    def opening(self) -> list[Event]:
        return []

    def delta(self, delta: TextDelta | ToolCallDelta) -> list[Event]:
        if isinstance(delta, ToolCallDelta) or delta.channel != "output":
            return []  # a completion is text: reasoning and tool calls have no place in it
        logprobs = self.logprobs.of(delta.logprobs) if self.logprobs is not None else None
        return [(None, self._object([self._choice(0, delta.text, None, logprobs)]))]

    def finish(self, result: InferenceResult) -> list[Event]:
        events: list[Event] = [(None, self._object([self._choice(0, "", chat_finish(result))],
                                                   metrics=result.metrics))]
        if self.include_usage:
            events.append((None, self._object([], usage=chat_usage(result))))
        return [*events, (None, "[DONE]")]

    def failure(self, exc: ApiError) -> list[Event]:
        return [(None, error_body(exc)), (None, "[DONE]")]


def _parse(data: Any) -> Parsed:
    body, seeds = completions_request(data)
    usage = bool(body.stream_options and body.stream_options.include_usage)
    logprobs = body.logprobs is not None
    return seeds[0], lambda _response_id: CompletionShape(model=seeds[0].model, include_usage=usage,
                                                          logprobs=logprobs)


async def completions(request: web.Request) -> web.StreamResponse:
    data = await read_json(request)  # aiohttp keeps the body: respond() reads it again
    if not (isinstance(data, dict) and isinstance(data.get("prompt"), list) and len(data["prompt"]) > 1):
        return await respond(request, _parse)
    started = time.perf_counter()
    try:
        body, seeds = completions_request(data)
    except ApiError as exc:
        record_refused_body(data, exc.code)
        raise
    pool = request.app[POOL]
    runs = [Inference(pool, seed, request_id=f"{request[REQUEST_ID]}-{i}", started_at=started)
            for i, seed in enumerate(seeds)]

    async def run(inf: Inference) -> InferenceResult:
        await inf.start()
        return await inf.collect()

    tasks = [asyncio.ensure_future(run(inf)) for inf in runs]
    try:
        results = await asyncio.gather(*tasks)
    except BaseException:  # one failed or the client left: stop the others too
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    finally:
        for inf in runs:
            inf.close()
    answer = CompletionShape(model=body.model, logprobs=body.logprobs is not None).many(list(results))
    return web.json_response(answer, headers={"X-Llmpool-Metrics": json.dumps([r.metrics for r in results])})
