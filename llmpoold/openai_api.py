"""The OpenAI-compatible surface, beside the seed's ``/v1/responses``.

``GET /openai/v1/models``, ``POST /openai/v1/chat/completions`` (also at
``/v1/chat/completions``) and ``POST /openai/v1/responses`` take OpenAI's request
shapes, map them onto the seed's :class:`ResponseRequest` and run them through the
same :class:`Inference` (admission, remote gate, fair queue, cancellation, metrics),
then answer in OpenAI's shapes, JSON or SSE. Errors on these paths are OpenAI's
``{"error": {"message", "type", "code", "param"}}`` with the seed's statuses and codes.
The seed's timing metrics travel as an extra ``metrics`` field (ignored by OpenAI
clients) and, on JSON answers, as the ``X-Llmpool-Metrics`` header.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import aclosing
from typing import Any, Literal, Protocol

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmpoold import app as core  # the seed surface's helpers; used at call time (app imports us)
from llmpoold.errors import ApiError
from llmpoold.inference import Inference, InferenceResult
from llmpoold.schemas import ResponseRequest
from llmpoold.sse import open_sse, send_event
from llmpoold.types import TextDelta

PREFIX = "/openai/v1"
ROOT_CHAT_PATH = "/v1/chat/completions"
STARTED_AT = web.AppKey("openai_started_at", int)

Event = tuple[str | None, Any]  # (SSE event name or None, data)

# ----- errors ---------------------------------------------------------------------------

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 409: "conflict_error", 429: "rate_limit_error"}


def is_openai_path(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/") or path == ROOT_CHAT_PATH


def error_body(exc: ApiError) -> dict[str, Any]:
    """OpenAI's error object for an ApiError; ``code`` is the seed's code."""
    message = exc.message or exc.code.replace("_", " ")
    if exc.model is not None and f"'{exc.model}'" not in message:
        message = f"{message}: '{exc.model}'" if exc.message is None else f"{message} (model '{exc.model}')"
    param = exc.extra.get("param", "model" if exc.code == "unknown_model" else None)
    kind = _ERROR_TYPES.get(exc.status, "server_error" if exc.status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "code": exc.code, "param": param}}


def error_response(exc: ApiError) -> web.Response:
    return web.json_response(error_body(exc), status=exc.status, headers=exc.headers)


def validation_response(exc: ValidationError) -> web.Response:
    """A body that fails validation: 422 as on the seed surface, the first field as ``param``."""
    errors = exc.errors()
    param = ".".join(str(p) for p in errors[0]["loc"]) or None if errors else None
    message = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: "
                        f"{str(e['msg']).removeprefix('Value error, ')}" for e in errors)
    return error_response(ApiError(422, "invalid_body", message or "invalid request body", extra={"param": param}))


def _unsupported(param: str, message: str) -> ApiError:
    return ApiError(400, "unsupported_parameter", message, extra={"param": param})


# ----- request bodies -------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Part(_Body):
    """A content part of either API; converted by :func:`_content_item`."""

    type: str
    text: str | None = None
    image_url: Any = None  # chat: {"url", "detail"}; responses: a URL string
    detail: str | None = None
    input_audio: dict[str, Any] | None = None
    file: dict[str, Any] | None = None
    file_data: str | None = None
    filename: str | None = None
    file_id: str | None = None


class _Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[_Part] | None = None
    type: str = "message"


class _Extras(_Body):
    """Fields both APIs share, and llmpool's own, which OpenAI clients send via ``extra_body``."""

    model: str = Field(min_length=1)
    allow_remote: bool = False
    fairness_key: Any = None
    decoding: dict[str, Any] | None = None
    thinking: Any = None
    queue_timeout_s: Any = None
    prompt_cache_key: Any = None
    source_lang_code: Any = None
    target_lang_code: Any = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # as vLLM and llama.cpp's server accept it
    repetition_penalty: float | None = None
    stream: bool | None = False


class StreamOptions(_Body):
    include_usage: bool = False


class ChatBody(_Extras):
    messages: list[_Message] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    reasoning_effort: str | None = None
    stream_options: StreamOptions | None = None


class _Reasoning(_Body):
    effort: str | None = None


class ResponsesBody(_Extras):
    input: str | list[_Message]
    instructions: str | None = None
    max_output_tokens: int | None = None
    reasoning: _Reasoning | None = None
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None


def _content_item(part: _Part, param: str) -> dict[str, Any]:
    kind = part.type
    if kind in ("text", "input_text", "output_text"):
        return {"type": "text", "text": part.text or ""}
    if kind == "image_url" and isinstance(part.image_url, dict):
        return {"type": "image_url", "image_url": part.image_url}
    if kind == "input_image" and isinstance(part.image_url, str):
        return {"type": "image_url", "image_url": {"url": part.image_url, "detail": part.detail or "auto"}}
    if kind == "input_audio" and part.input_audio:
        audio = part.input_audio
        return {"type": "audio_url",
                "audio_url": {"url": f"data:audio/{audio.get('format', 'wav')};base64,{audio.get('data', '')}"}}
    file = part.file if kind == "file" else part.model_dump() if kind == "input_file" else None
    if file is not None and file.get("file_data") and file.get("filename"):
        return {"type": "file", "file": {"filename": file["filename"], "file_data": file["file_data"]}}
    if file is not None:
        raise _unsupported(param, "files must be sent inline with 'file_data' and 'filename' (no 'file_id')")
    raise _unsupported(param, f"content part type '{kind}' is not supported")


def _content(content: str | list[_Part] | None, param: str) -> str | list[dict[str, Any]]:
    if content is None:
        raise _unsupported(param, "a message needs 'content' (tool calls are not supported)")
    if isinstance(content, str):
        return content
    items = [_content_item(p, f"{param}[{i}]") for i, p in enumerate(content)]
    if all(item["type"] == "text" for item in items):
        return "\n".join(item["text"] for item in items)
    return items


def _conversation(messages: list[_Message], param: str, instructions: str | None) -> dict[str, Any]:
    """System/developer turns become ``instructions``; a lone user turn becomes ``input``."""
    system = [instructions] if instructions else []
    turns: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        where = f"{param}[{i}]"
        if message.type != "message":
            raise _unsupported(where, f"input item type '{message.type}' is not supported")
        if message.role in ("tool", "function"):
            raise _unsupported(f"{where}.role", f"'{message.role}' messages are not supported (no tool calling)")
        content = _content(message.content, f"{where}.content")
        if message.role in ("system", "developer"):
            if not isinstance(content, str):
                raise _unsupported(f"{where}.content", f"{message.role} messages take text only")
            system.append(content)
        else:
            turns.append({"role": message.role, "content": content})
    fields: dict[str, Any] = {"instructions": "\n\n".join(system)} if system else {}
    if len(turns) == 1 and turns[0]["role"] == "user":
        fields["input"] = turns[0]["content"]
    else:
        fields["messages"] = turns
    return fields


_PASSED = ("fairness_key", "thinking", "queue_timeout_s", "prompt_cache_key", "source_lang_code", "target_lang_code")


def _seed_request(body: _Extras, conversation: dict[str, Any], *, max_tokens: int | None, stop: Any = None,
                  reasoning_effort: str | None = None) -> ResponseRequest:
    """The seed request: ``decoding`` from extra_body, overridden by OpenAI's own fields."""
    decoding = dict(body.decoding or {})
    for key, value in (("max_tokens", max_tokens), ("temperature", body.temperature), ("top_p", body.top_p),
                       ("top_k", body.top_k), ("repetition_penalty", body.repetition_penalty),
                       ("stop", [stop] if isinstance(stop, str) else stop)):
        if value is not None:
            decoding[key] = value
    extras = {key: getattr(body, key) for key in _PASSED if getattr(body, key) is not None}
    return ResponseRequest.model_validate({
        "model": body.model, **conversation, **extras, "allow_remote": body.allow_remote, "stream": bool(body.stream),
        "reasoning_effort": reasoning_effort, "decoding": decoding})


def _object(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ApiError(422, "invalid_body", "request body must be a JSON object")
    return data


def chat_request(data: Any) -> tuple[ChatBody, ResponseRequest]:
    """A Chat Completions body as (the parsed body, the seed request it runs as)."""
    body = ChatBody.model_validate(_object(data))
    if body.n is not None and body.n != 1:
        raise _unsupported("n", "n must be 1: llmpool returns one choice per request")
    return body, _seed_request(body, _conversation(body.messages, "messages", None),
                               max_tokens=body.max_completion_tokens or body.max_tokens, stop=body.stop,
                               reasoning_effort=body.reasoning_effort)


def responses_request(data: Any) -> tuple[ResponsesBody, ResponseRequest]:
    """A Responses API body as (the parsed body, the seed request it runs as)."""
    body = ResponsesBody.model_validate(_object(data))
    if body.previous_response_id is not None:
        raise _unsupported("previous_response_id", "responses are not stored; send the whole conversation")
    if isinstance(body.input, str):
        conversation = {"input": body.input, **({"instructions": body.instructions} if body.instructions else {})}
    else:
        conversation = _conversation(body.input, "input", body.instructions)
    return body, _seed_request(body, conversation, max_tokens=body.max_output_tokens,
                               reasoning_effort=body.reasoning.effort if body.reasoning else None)


# ----- answers --------------------------------------------------------------------------


def _tokens(result: InferenceResult) -> tuple[int, int, int]:
    m = result.metrics
    return m["engine_prompt_tokens"] or 0, m["engine_output_tokens"] or 0, m["engine_cached_prompt_tokens"] or 0


def _chat_finish(result: InferenceResult) -> str:
    return "length" if result.finish_reason == "length" else "stop"


def chat_usage(result: InferenceResult) -> dict[str, Any]:
    prompt, output, cached = _tokens(result)
    return {"prompt_tokens": prompt, "completion_tokens": output, "total_tokens": prompt + output,
            "prompt_tokens_details": {"cached_tokens": cached}}


class ChatShape:
    """Chat Completions JSON and ``chat.completion.chunk`` events for one request."""

    def __init__(self, inf: Inference, body: ChatBody) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = inf.body.model
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def completion(self, result: InferenceResult) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": result.output_text, "refusal": None}
        if result.reasoning_text:
            message["reasoning_content"] = result.reasoning_text
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": message, "finish_reason": _chat_finish(result), "logprobs": None}],
                "usage": chat_usage(result), "system_fingerprint": None, "metrics": result.metrics}

    def _chunk(self, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
        if self.include_usage:
            chunk.setdefault("usage", None)
        return chunk

    def opening(self) -> list[Event]:
        return [(None, self._chunk({"role": "assistant", "content": ""}))]

    def delta(self, delta: TextDelta) -> list[Event]:
        key = "reasoning_content" if delta.channel == "reasoning" else "content"
        return [(None, self._chunk({key: delta.text}))]

    def finish(self, result: InferenceResult) -> list[Event]:
        events: list[Event] = [(None, self._chunk({}, _chat_finish(result), metrics=result.metrics))]
        if self.include_usage:
            events.append((None, {**self._chunk({}), "choices": [], "usage": chat_usage(result)}))
        return [*events, (None, "[DONE]")]

    def failure(self, exc: ApiError) -> list[Event]:
        return [(None, error_body(exc)), (None, "[DONE]")]


class ResponsesShape:
    """Responses API JSON and its typed stream events (with sequence numbers) for one request.

    Output items: a ``reasoning`` item when the model reasons, then one ``message``."""

    def __init__(self, inf: Inference, body: ResponsesBody) -> None:
        self.id = inf.response_id
        self.created_at = time.time()
        self.model = inf.body.model
        self.body = body
        self.item_ids = {"reasoning": f"rs_{uuid.uuid4().hex}", "output": f"msg_{uuid.uuid4().hex}"}
        self.sequence = 0
        self.texts = {"reasoning": "", "output": ""}
        self.open: str | None = None  # the channel whose output item is open
        self.items: list[dict[str, Any]] = []  # finished output items

    def response(self, *, status: str, result: InferenceResult | None = None) -> dict[str, Any]:
        body = self.body
        obj: dict[str, Any] = {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "model": self.model, "output": list(self.items), "instructions": body.instructions, "error": None,
            "incomplete_details": None, "metadata": body.metadata or {}, "parallel_tool_calls": False,
            "tool_choice": "auto", "tools": [], "temperature": body.temperature, "top_p": body.top_p,
            "max_output_tokens": body.max_output_tokens, "text": {"format": {"type": "text"}}, "usage": None,
        }
        if result is not None:
            prompt, output, cached = _tokens(result)
            obj["completed_at"] = time.time()
            obj["usage"] = {"input_tokens": prompt,
                            "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
                            "output_tokens": output, "output_tokens_details": {"reasoning_tokens": 0},
                            "total_tokens": prompt + output}
            if result.finish_reason == "length":
                obj["incomplete_details"] = {"reason": "max_output_tokens"}
            obj["metrics"] = result.metrics
        return obj

    def _part(self, channel: str) -> dict[str, Any]:
        if channel == "reasoning":
            return {"type": "reasoning_text", "text": self.texts[channel]}
        return {"type": "output_text", "text": self.texts[channel], "annotations": [], "logprobs": []}

    def _item(self, channel: str, status: str) -> dict[str, Any]:
        content = [self._part(channel)] if status == "completed" else []
        if channel == "reasoning":
            return {"type": "reasoning", "id": self.item_ids[channel], "status": status, "summary": [],
                    "content": content}
        return {"type": "message", "id": self.item_ids[channel], "status": status, "role": "assistant",
                "content": content}

    def _event(self, kind: str, **fields: Any) -> Event:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return kind, event

    def _where(self, channel: str) -> dict[str, Any]:
        return {"item_id": self.item_ids[channel], "output_index": len(self.items), "content_index": 0}

    def _open(self, channel: str) -> list[Event]:
        events = self._close()
        self.open = channel
        return [*events, self._event("response.output_item.added", output_index=len(self.items),
                                     item=self._item(channel, "in_progress")),
                self._event("response.content_part.added", **self._where(channel), part=self._part(channel))]

    def _close(self) -> list[Event]:
        channel = self.open
        if channel is None:
            return []
        where = self._where(channel)
        extra: dict[str, Any]
        done, extra = (("response.reasoning_text.done", {}) if channel == "reasoning"
                       else ("response.output_text.done", {"logprobs": []}))
        item = self._item(channel, "completed")
        events = [self._event(done, **where, text=self.texts[channel], **extra),
                  self._event("response.content_part.done", **where, part=self._part(channel)),
                  self._event("response.output_item.done", output_index=where["output_index"], item=item)]
        self.items.append(item)
        self.open = None
        return events

    def opening(self) -> list[Event]:
        started = self.response(status="in_progress")
        return [self._event("response.created", response=started),
                self._event("response.in_progress", response=started)]

    def delta(self, delta: TextDelta) -> list[Event]:
        channel = delta.channel
        if channel == "reasoning" and (self.texts["output"] or self.open == "output"):
            return []  # reasoning after the answer began: a closed item is never reopened
        events = self._open(channel) if self.open != channel else []
        self.texts[channel] += delta.text
        extra: dict[str, Any]
        name, extra = (("response.reasoning_text.delta", {}) if channel == "reasoning"
                       else ("response.output_text.delta", {"logprobs": []}))
        return [*events, self._event(name, **self._where(channel), delta=delta.text, **extra)]

    def finish(self, result: InferenceResult) -> list[Event]:
        events = [] if self.open == "output" else self._open("output")
        events += self._close()
        status = "incomplete" if result.finish_reason == "length" else "completed"
        return [*events, self._event(f"response.{status}", response=self.response(status=status, result=result))]

    def failure(self, exc: ApiError) -> list[Event]:
        error = error_body(exc)["error"]
        return [self._event("error", code=error["code"], message=error["message"], param=error["param"])]

    def json(self, result: InferenceResult) -> dict[str, Any]:
        """The non-streaming answer: the object the stream's last event carries."""
        if result.reasoning_text:
            self.delta(TextDelta(result.reasoning_text, channel="reasoning"))
        self.delta(TextDelta(result.output_text))
        return self.finish(result)[-1][1]["response"]


# ----- handlers -------------------------------------------------------------------------


class Shape(Protocol):
    def opening(self) -> list[Event]: ...
    def delta(self, delta: TextDelta) -> list[Event]: ...
    def finish(self, result: InferenceResult) -> list[Event]: ...
    def failure(self, exc: ApiError) -> list[Event]: ...


async def _start(request: web.Request, body: ResponseRequest, started: float) -> Inference:
    """Admission and queueing, exactly as ``POST /v1/responses``."""
    inf = Inference(request.app[core.POOL], body, request_id=request[core.REQUEST_ID], started_at=started)
    try:
        await inf.start()
    except ApiError as exc:
        core.log_inference(inf, stream=body.stream, status=exc.status, error=exc.code)
        raise
    return inf


async def _collect(inf: Inference, started: float) -> InferenceResult:
    try:
        async with aclosing(inf.events()) as events:
            async for _ in events:
                pass
    except ApiError as exc:
        core.log_inference(inf, stream=False, status=exc.status, error=exc.code)
        raise
    assert inf.result is not None
    core._finish_pool_time(inf.result, started)
    core.log_inference(inf, stream=False, status=200)
    return inf.result


def _json(data: dict[str, Any], result: InferenceResult) -> web.Response:
    return web.json_response(data, headers={"X-Llmpool-Metrics": json.dumps(result.metrics, separators=(",", ":"))})


async def _stream(request: web.Request, inf: Inference, shape: Shape, started: float) -> web.StreamResponse:
    try:
        response = await open_sse(request, headers={"X-Request-Id": request[core.REQUEST_ID]})
    except BaseException:
        inf.close_unstarted()
        raise

    async def send(events: list[Event]) -> None:
        for name, data in events:
            await send_event(response, data, event=name)

    try:
        await send(shape.opening())
        async with aclosing(inf.events()) as deltas:
            async for delta in deltas:
                await send(shape.delta(delta))
    except ApiError as exc:
        core.log_inference(inf, stream=True, status=exc.status, error=exc.code)
        await send(shape.failure(exc))
        await response.write_eof()
        return response
    except (ConnectionResetError, asyncio.CancelledError):
        core.log_inference(inf, stream=True, status=499, error="client_disconnected")
        inf.close_unstarted()  # no-op once events() has released the slot
        raise
    assert inf.result is not None
    core._finish_pool_time(inf.result, started)
    await send(shape.finish(inf.result))
    await response.write_eof()
    core.log_inference(inf, stream=True, status=200)
    return response


async def chat_completions(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter()
    body, seed = chat_request(await core.read_json(request))
    inf = await _start(request, seed, started)
    shape = ChatShape(inf, body)
    if seed.stream:
        return await _stream(request, inf, shape, started)
    result = await _collect(inf, started)
    return _json(shape.completion(result), result)


async def responses(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter()
    body, seed = responses_request(await core.read_json(request))
    inf = await _start(request, seed, started)
    shape = ResponsesShape(inf, body)
    if seed.stream:
        return await _stream(request, inf, shape, started)
    result = await _collect(inf, started)
    return _json(shape.json(result), result)


def _model(request: web.Request, name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": request.app[STARTED_AT], "owned_by": "llmpool"}


async def list_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list",
                              "data": [_model(request, name) for name in request.app[core.POOL].loaded_names()]})


async def retrieve_model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    if name not in request.app[core.POOL].loaded_names():
        raise ApiError(404, "model_not_found", f"model '{name}' is not loaded or not configured",
                       extra={"param": "model"})
    return web.json_response(_model(request, name))


def setup(app: web.Application) -> None:
    """Add the OpenAI routes to ``app`` (the app's errors middleware renders failures on
    :func:`is_openai_path` paths with :func:`error_response`)."""
    app[STARTED_AT] = int(time.time())
    app.router.add_get(f"{PREFIX}/models", list_models)
    app.router.add_get(f"{PREFIX}/models/{{model}}", retrieve_model)
    app.router.add_post(f"{PREFIX}/chat/completions", chat_completions)
    app.router.add_post(ROOT_CHAT_PATH, chat_completions)
    app.router.add_post(f"{PREFIX}/responses", responses)
