"""OpenAI request bodies (Chat Completions, Responses API) mapped onto the seed's
:class:`~llmpoold.schemas.ResponseRequest`; refusals are ApiError 400/422 with ``param``."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmpoold.config import MAX_STOP_CHARS, Stop
from llmpoold.errors import ApiError, clip, cut
from llmpoold.http import openai_tools
from llmpoold.http.respond import parse_body
from llmpoold.schemas import (
    MAX_CONTENT_ITEMS,
    MAX_INSTRUCTIONS_CHARS,
    MAX_MESSAGES,
    MAX_MODEL_CHARS,
    MAX_NAME_CHARS,
    AgentFields,
    ResponseRequest,
    Text,
)
from llmpoold.types import Message

_Kind = Annotated[str, Field(max_length=64)]  # a part's or an item's ``type``
_Effort = Annotated[str, Field(max_length=32)]


def invalid_body(exc: ValidationError, *, renamed: dict[str, str] | None = None) -> ApiError:
    """422 ``invalid_body`` as on the seed surface; ``param`` is the first bad field, named
    as the client sent it (``renamed`` maps seed paths such as ``decoding.max_tokens`` back)."""
    names = [cut(".".join(str(p) for p in e["loc"])) for e in exc.errors()]
    names = [(renamed or {}).get(name, name) for name in names]
    message = "; ".join(f"{name or 'body'}: {cut(str(e['msg']).removeprefix('Value error, '))}"
                        for name, e in zip(names, exc.errors(), strict=True))
    param = names[0] or None if names else None
    return ApiError(422, "invalid_body", message or "invalid request body", extra={"param": param})


def _unsupported(param: str, message: str) -> ApiError:
    return ApiError(400, "unsupported_parameter", message, extra={"param": param})


# ----- request bodies -------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Part(_Body):
    """A content part of either API; converted by :func:`_content_item`."""

    type: _Kind
    text: Text | None = None
    image_url: Any = None  # chat: {"url", "detail"}; responses: a URL string
    detail: str | None = Field(None, max_length=16)
    input_audio: dict[str, Any] | None = None
    file: dict[str, Any] | None = None
    file_data: str | None = None
    filename: str | None = Field(None, max_length=MAX_NAME_CHARS)
    file_id: str | None = Field(None, max_length=MAX_NAME_CHARS)


class _Message(_Body):
    # role is checked in _conversation, so that a Responses item of another type
    # gets the 400 that names it, not a validation error.
    role: Literal["system", "developer", "user", "assistant", "tool", "function"] | None = None
    content: Text | Annotated[list[_Part], Field(max_length=MAX_CONTENT_ITEMS)] | None = None
    type: _Kind = "message"
    # tool turns: Chat's assistant ``tool_calls`` and ``tool`` ``tool_call_id``; Responses'
    # ``function_call`` (call_id, name, arguments) and ``function_call_output`` (call_id, output)
    tool_calls: Annotated[list[Any], Field(max_length=openai_tools.MAX_TOOLS)] | None = None
    tool_call_id: str | None = Field(None, max_length=MAX_NAME_CHARS)
    call_id: str | None = Field(None, max_length=MAX_NAME_CHARS)
    name: str | None = Field(None, max_length=MAX_NAME_CHARS)
    arguments: Text | None = None
    output: Text | Annotated[list[Any], Field(max_length=MAX_CONTENT_ITEMS)] | None = None


class OpenAIExtras(_Body):
    """Fields both APIs share, and llmpool's own, which OpenAI clients send via ``extra_body``."""

    model: str = Field(min_length=1, max_length=MAX_MODEL_CHARS)
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
    tools: list[Any] | None = None  # checked by openai_tools (bounded there)
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class ChatBody(OpenAIExtras):
    messages: list[_Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: Annotated[str, Field(max_length=MAX_STOP_CHARS)] | Stop | None = None
    n: int | None = None
    reasoning_effort: _Effort | None = None
    stream_options: StreamOptions | None = None
    response_format: Any = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)  # OpenAI's bounds


class _Reasoning(_Body):
    effort: _Effort | None = None


class ResponsesBody(OpenAIExtras):
    input: Text | Annotated[list[_Message], Field(max_length=MAX_MESSAGES)]
    instructions: str | None = Field(None, max_length=MAX_INSTRUCTIONS_CHARS)
    max_output_tokens: int | None = None
    reasoning: _Reasoning | None = None
    previous_response_id: str | None = Field(None, max_length=MAX_NAME_CHARS)
    text: dict[str, Any] | None = None  # {"format": {...}}
    # As OpenAI bounds it (it is echoed in the answer): 16 pairs, keys of 64 and values of 512 characters.
    metadata: Annotated[dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
                        Field(max_length=16)] | None = None
    # logprobs: ``include: ["message.output_text.logprobs"]`` (or ``top_logprobs`` > 0) turns them on
    include: Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=16)] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)


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
    raise _unsupported(param, f"content part type {clip(kind)} is not supported")


def _content(content: str | list[_Part] | None, param: str) -> str | list[dict[str, Any]]:
    if content is None:
        raise _unsupported(param, "a message needs 'content'")
    if isinstance(content, str):
        return content
    items = [_content_item(p, f"{param}[{i}]") for i, p in enumerate(content)]
    if all(item["type"] == "text" for item in items):
        return "".join(item["text"] for item in items)  # the seed concatenates text items
    return items


def _message(turn: dict[str, Any]) -> Message:
    content = turn["content"]
    return Message(role=turn["role"], content=content if isinstance(content, str) else tuple(content),
                   tool_calls=tuple(turn.get("tool_calls") or ()), tool_call_id=turn.get("tool_call_id"))


def _tool_turn(message: _Message, where: str, turns: list[dict[str, Any]]) -> bool:
    """Add a tool turn (a call or a result) to ``turns``; False for any other message."""
    if message.type == "function_call":
        call = openai_tools.tool_call(message.model_dump(), where, flat=True)
        last = turns[-1] if turns else None
        if last is not None and last["role"] == "assistant" and last.get("tool_calls") and not last["content"]:
            last["tool_calls"].append(call)  # consecutive calls are one assistant turn
        else:
            turns.append({"role": "assistant", "content": "", "tool_calls": [call]})
        return True
    if message.type == "function_call_output":
        if not message.call_id:
            raise _unsupported(f"{where}.call_id", "a function_call_output needs its 'call_id'")
        turns.append({"role": "tool", "tool_call_id": message.call_id,
                      "content": openai_tools.output_text(message.output, f"{where}.output")})
        return True
    if message.role == "tool":
        if not message.tool_call_id:
            raise openai_tools.malformed(f"{where}.tool_call_id", "a tool message needs its 'tool_call_id'")
        text = _content(message.content, f"{where}.content")
        if not isinstance(text, str):
            raise _unsupported(f"{where}.content", "tool messages take text only")
        turns.append({"role": "tool", "tool_call_id": message.tool_call_id, "content": text})
        return True
    if message.role == "assistant" and message.tool_calls:
        calls = [openai_tools.tool_call(c, f"{where}.tool_calls[{j}]", flat=False)
                 for j, c in enumerate(message.tool_calls)]
        content = "" if message.content is None else _content(message.content, f"{where}.content")
        turns.append({"role": "assistant", "content": content, "tool_calls": calls})
        return True
    return False


def _conversation(messages: list[_Message], param: str, instructions: str | None) -> dict[str, Any]:
    """System/developer turns become ``instructions``; a lone user turn becomes ``input``.
    A conversation with tool turns is also returned whole under ``agent_messages`` (the
    seed's ``messages`` get a stand-in for validation and admission: a tool result as a
    user turn, a call as an assistant turn with its text)."""
    system = [instructions] if instructions else []
    turns: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        where = f"{param}[{i}]"
        if _tool_turn(message, where, turns):
            continue
        if message.type != "message":
            raise _unsupported(where, f"input item type {clip(message.type)} is not supported")
        if message.role is None:
            raise _unsupported(f"{where}.role", "a message needs a 'role'")
        if message.role == "function":
            raise _unsupported(f"{where}.role", "'function' messages are not supported; use 'tool' messages")
        content = _content(message.content, f"{where}.content")
        if message.role in ("system", "developer"):
            if not isinstance(content, str):
                raise _unsupported(f"{where}.content", f"{message.role} messages take text only")
            system.append(content)
        else:
            turns.append({"role": message.role, "content": content})
    fields: dict[str, Any] = {"instructions": "\n\n".join(system)} if system else {}
    if any(t["role"] == "tool" or t.get("tool_calls") for t in turns):
        fields["agent_messages"] = tuple(_message(t) for t in turns)
        turns = [{"role": "user" if t["role"] == "tool" else t["role"], "content": t["content"]} for t in turns]
    if len(turns) == 1 and turns[0]["role"] == "user":
        fields["input"] = turns[0]["content"]
    else:
        fields["messages"] = turns
    return fields


_PASSED = ("fairness_key", "thinking", "queue_timeout_s", "prompt_cache_key", "source_lang_code", "target_lang_code")


def seed_request_of(body: OpenAIExtras, conversation: dict[str, Any], *, conversation_param: str,
                  max_tokens: tuple[int | None, str], stop: Any = None,
                  reasoning_effort: str | None = None, response_format: Any = None,
                  flat: bool = False) -> ResponseRequest:
    """The seed request: ``decoding`` from extra_body, overridden by OpenAI's own fields;
    tools, tool turns and the response format as its :class:`AgentFields`.

    ``max_tokens`` is (value, the OpenAI field it came from); ``flat``: the Responses
    API's shapes (``text.format``, flat function tools). Raises ApiError 400/422."""
    fmt_param = "text.format" if flat else "response_format"
    tools = openai_tools.tools(body.tools, "tools", flat=flat)
    agent = AgentFields(tools=tools, tool_choice=openai_tools.tool_choice(body.tool_choice, tools, "tool_choice",
                                                                          flat=flat),
                        parallel_tool_calls=body.parallel_tool_calls if tools else None,
                        messages=conversation.pop("agent_messages", None),
                        response_format=openai_tools.response_format(response_format, fmt_param, flat=flat))
    decoding = dict(body.decoding or {})
    renamed = {"input": conversation_param, "messages": conversation_param}
    for key, value, name in (("max_tokens", *max_tokens), ("temperature", body.temperature, "temperature"),
                             ("top_p", body.top_p, "top_p"), ("top_k", body.top_k, "top_k"),
                             ("repetition_penalty", body.repetition_penalty, "repetition_penalty"),
                             ("stop", [stop] if isinstance(stop, str) else stop, "stop")):
        if value is not None:
            decoding[key] = value
            renamed[f"decoding.{key}"] = name
    extras = {key: getattr(body, key) for key in _PASSED if getattr(body, key) is not None}
    try:
        return ResponseRequest.model_validate({
            "model": body.model, **conversation, **extras, "allow_remote": body.allow_remote,
            "stream": bool(body.stream), "reasoning_effort": reasoning_effort, "decoding": decoding}
        ).with_agent(agent)
    except ValidationError as exc:
        raise invalid_body(exc, renamed=renamed) from None


def chat_request(data: Any) -> tuple[ChatBody, ResponseRequest]:
    """A Chat Completions body as (the parsed body, the seed request it runs as)."""
    body: ChatBody = parse_body(ChatBody, data)
    if body.n is not None and body.n != 1:
        raise _unsupported("n", "n must be 1: llmpool returns one choice per request")
    if body.top_logprobs and not body.logprobs:  # as OpenAI answers it (0 is neutral)
        raise ApiError(400, "invalid_request", "the 'top_logprobs' parameter is only allowed when 'logprobs' is "
                       "enabled", extra={"param": "top_logprobs"})
    limit = ((body.max_completion_tokens, "max_completion_tokens") if body.max_completion_tokens is not None
             else (body.max_tokens, "max_tokens"))
    seed = seed_request_of(body, _conversation(body.messages, "messages", None), conversation_param="messages",
                           max_tokens=limit, stop=body.stop, reasoning_effort=body.reasoning_effort,
                           response_format=body.response_format)
    if body.logprobs:  # admission refuses it for a model without Capabilities.logprobs
        assert seed.agent is not None
        seed.with_agent(replace(seed.agent, logprobs=body.top_logprobs or 0))
    return body, seed


RESPONSES_LOGPROBS = "message.output_text.logprobs"


def responses_logprobs(body: ResponsesBody) -> int | None:
    """How many top alternatives a Responses request wants per token; None: no logprobs."""
    if RESPONSES_LOGPROBS in (body.include or ()) or body.top_logprobs:
        return body.top_logprobs or 0
    return None


def responses_request(data: Any) -> tuple[ResponsesBody, ResponseRequest]:
    """A Responses API body as (the parsed body, the seed request it runs as)."""
    body: ResponsesBody = parse_body(ResponsesBody, data)
    if body.previous_response_id is not None:
        raise _unsupported("previous_response_id", "responses are not stored; send the whole conversation")
    if isinstance(body.input, str):
        conversation = {"input": body.input, **({"instructions": body.instructions} if body.instructions else {})}
    else:
        conversation = _conversation(body.input, "input", body.instructions)
    seed = seed_request_of(body, conversation, conversation_param="input",
                           max_tokens=(body.max_output_tokens, "max_output_tokens"),
                           reasoning_effort=body.reasoning.effort if body.reasoning else None,
                           response_format=(body.text or {}).get("format"), flat=True)
    logprobs = responses_logprobs(body)
    if logprobs is not None:  # admission refuses it for a model without Capabilities.logprobs
        assert seed.agent is not None
        seed.with_agent(replace(seed.agent, logprobs=logprobs))
    return body, seed
