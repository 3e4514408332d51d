"""The upstream Chat Completions request body for a
:class:`~llmpoold.types.GenerationRequest` (:func:`build_body`), and the decoding of
file content items."""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Mapping
from typing import Any

from llmpool_remote.options import RemoteOptions
from llmpool_remote.runtime import RemoteRuntime
from llmpoold.errors import BackendError
from llmpoold.types import GenerationRequest, Message

DATA_URL = re.compile(r"data:[^;,]*;base64,(.*)", re.DOTALL)


def message_content(content: Any, *, drop_files: bool = False) -> Any:
    if isinstance(content, str):
        return content
    return [{k: v for k, v in dict(item).items() if v is not None} for item in content
            if not (drop_files and item.get("type") == "file")]


def upstream_message(message: Message, *, drop_files: bool = False) -> dict[str, Any]:
    """One conversation turn in Chat Completions' shape, tool calls and results included
    (an assistant turn that only calls tools has ``content: null``)."""
    out: dict[str, Any] = {"role": message.role, "content": message_content(message.content, drop_files=drop_files)}
    if message.tool_calls:
        out["tool_calls"] = [dict(call) for call in message.tool_calls]
        out["content"] = out["content"] or None
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


def file_items(request: GenerationRequest) -> list[Mapping[str, Any]]:
    return [item["file"] for m in request.messages if not isinstance(m.content, str)
            for item in m.content if item.get("type") == "file"]


def decode_file(file: Mapping[str, Any]) -> tuple[str, bytes]:
    """(sanitized filename, bytes) of a file item; 400 ``invalid_file_input`` unless its
    ``file_data`` is a base64 data URL."""
    name = str(file.get("filename") or "file")
    match = DATA_URL.fullmatch(str(file.get("file_data") or "").strip())
    if match is None:
        raise BackendError(400, "invalid_file_input", f"file '{name}' must use a base64 data URL")
    try:
        data = base64.b64decode(re.sub(r"\s+", "", match.group(1)), validate=True)
    except (binascii.Error, ValueError):
        raise BackendError(400, "invalid_file_input", f"file '{name}' contains invalid base64 data") from None
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(name)).strip("._") or "file"
    return safe, data


def resolved_thinking(options: RemoteOptions, request: GenerationRequest) -> str | None:
    """The ``thinking.type`` to send: the request's switch over ``remote_thinking``;
    None (nothing sent) for a model without ``remote_thinking``, as the seed offers
    request-level thinking only on those (admission refuses ``thinking`` elsewhere)."""
    if options.remote_thinking is None:
        return None
    if request.reasoning_effort is not None:
        return "disabled" if request.reasoning_effort == "none" else "enabled"
    if request.thinking_mode in ("enabled", "disabled"):
        return request.thinking_mode
    return options.remote_thinking


def build_body(runtime: RemoteRuntime, request: GenerationRequest, *, stream: bool,
               file_texts: tuple[str, ...] = ()) -> dict[str, Any]:
    """The upstream Chat Completions request body for ``request``. With
    ``files_extract``, ``file_texts`` (see :func:`extract_files`) become one system
    message each, after the instructions, and the file items are dropped."""
    options, d = runtime.options, request.decoding
    drop_files = options.remote_file_mode == "files_extract"
    messages: list[dict[str, Any]] = [{"role": "system", "content": request.instructions}]
    messages += [{"role": "system", "content": text} for text in file_texts]
    messages += [upstream_message(m, drop_files=drop_files) for m in request.messages]
    body: dict[str, Any] = {"model": options.remote_model, "messages": messages, "max_tokens": d.max_tokens}
    thinking = resolved_thinking(options, request)
    kimi = options.remote_model.strip().lower().startswith("kimi-")
    # The seed's Kimi rule: Kimi models accept only their fixed sampling values
    # (temperature 0.6 with thinking disabled, else 1.0; top_p 0.95), so others are omitted.
    if not kimi or d.temperature == (0.6 if thinking == "disabled" else 1.0):
        body["temperature"] = d.temperature
    if not kimi or d.top_p == 0.95:
        body["top_p"] = d.top_p
    if d.stop:
        body["stop"] = list(d.stop)
    if thinking is not None:
        body["thinking"] = {"type": thinking}
    if request.response_format is not None:
        body["response_format"] = dict(request.response_format)
    if request.tools:
        body["tools"] = [dict(tool) for tool in request.tools]
    if request.parallel_tool_calls is not None:
        body["parallel_tool_calls"] = request.parallel_tool_calls
    if request.tool_choice is not None:
        body["tool_choice"] = request.tool_choice if isinstance(request.tool_choice, str) else dict(request.tool_choice)
    if request.reasoning_effort is not None:
        body["reasoning_effort"] = request.reasoning_effort
    if options.remote_prompt_cache_key_enabled and request.prompt_cache_key:
        body["prompt_cache_key"] = request.prompt_cache_key
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    ignored = {name: value for name, value, neutral in (
        ("beam_size", d.beam_size, 1), ("top_k", d.top_k, 1), ("repetition_penalty", d.repetition_penalty, 1.0))
        if value != neutral}
    if ignored:
        runtime.warn_ignored(ignored)
    return body
