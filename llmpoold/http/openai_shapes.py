"""OpenAI's answer shapes for one llmpool inference: Chat Completions and the Responses API.

Pure functions of the deltas and the :class:`InferenceResult`; the driver in
:mod:`llmpoold.http.respond` runs them. Each ``opening``/``delta``/``finish``/``failure`` returns the SSE events to
send, as (event name or None, data) pairs.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from typing import Any

from llmpoold.errors import ApiError
from llmpoold.http.respond import Event
from llmpoold.inference import InferenceResult
from llmpoold.types import TextDelta, TokenLogprob, ToolCallDelta

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 409: "conflict_error", 429: "rate_limit_error"}


def error_body(exc: ApiError) -> dict[str, Any]:
    """OpenAI's error object for an ApiError; ``code`` is the seed's code."""
    message = exc.message or exc.code.replace("_", " ")
    if exc.model is not None and f"'{exc.model}'" not in message:
        message = f"{message}: '{exc.model}'" if exc.message is None else f"{message} (model '{exc.model}')"
    param = exc.param or exc.extra.get("param", "model" if exc.code == "unknown_model" else None)
    kind = _ERROR_TYPES.get(exc.status, "server_error" if exc.status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "code": exc.code, "param": param}}


def chat_logprob(entry: TokenLogprob) -> dict[str, Any]:
    """One token in Chat's ``logprobs.content`` shape, its top alternatives included."""
    return {"token": entry.token, "logprob": entry.logprob, "bytes": list(entry.bytes),
            "top_logprobs": [{"token": alt.token, "logprob": alt.logprob, "bytes": list(alt.bytes)}
                             for alt in entry.top]}


def chat_logprobs(entries: Iterable[TokenLogprob]) -> dict[str, Any]:
    """Chat's ``choices[].logprobs`` for these tokens (the values are the backend's; GGUF's
    are the log-softmax of the raw logits, before temperature, penalties and grammar)."""
    return {"content": [chat_logprob(entry) for entry in entries], "refusal": None}


def _tokens(result: InferenceResult) -> tuple[int, int, int]:
    m = result.metrics
    return m["engine_prompt_tokens"] or 0, m["engine_output_tokens"] or 0, m["engine_cached_prompt_tokens"] or 0


def chat_finish(result: InferenceResult) -> str:
    if result.finish_reason == "length":
        return "length"
    return "tool_calls" if result.tool_calls else "stop"


def chat_usage(result: InferenceResult) -> dict[str, Any]:
    prompt, output, cached = _tokens(result)
    return {"prompt_tokens": prompt, "completion_tokens": output, "total_tokens": prompt + output,
            "prompt_tokens_details": {"cached_tokens": cached}}


class ChatShape:
    """Chat Completions JSON and ``chat.completion.chunk`` events for one request."""

    metrics_header = True

    def __init__(self, *, model: str, include_usage: bool = False, logprobs: bool = False) -> None:
        """``logprobs``: the request asked for them (``choices[].logprobs`` is then an
        object on the answer and on every chunk of content, else null)."""
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage
        self.logprobs = logprobs
        self.calls_started: set[int] = set()

    def json(self, result: InferenceResult) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": result.output_text, "refusal": None}
        if result.reasoning_text:
            message["reasoning_content"] = result.reasoning_text
        if result.tool_calls:
            message["tool_calls"] = result.tool_calls
            message["content"] = result.output_text or None
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": message, "finish_reason": chat_finish(result),
                             "logprobs": chat_logprobs(result.logprobs) if self.logprobs else None}],
                "usage": chat_usage(result), "system_fingerprint": None, "metrics": result.metrics}

    def _chunk(self, delta: dict[str, Any], finish: str | None = None, logprobs: dict[str, Any] | None = None,
               **extra: Any) -> dict[str, Any]:
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}], **extra}
        if self.include_usage:
            chunk.setdefault("usage", None)
        return chunk

    def opening(self) -> list[Event]:
        return [(None, self._chunk({"role": "assistant", "content": ""}))]

    def delta(self, delta: TextDelta | ToolCallDelta) -> list[Event]:
        if isinstance(delta, ToolCallDelta):
            call: dict[str, Any] = {"index": delta.index, "function": {"arguments": delta.arguments}}
            if delta.index not in self.calls_started:  # the first piece names the call
                self.calls_started.add(delta.index)
                call = {"index": delta.index, "id": delta.id or f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                        "function": {"name": delta.name or "", "arguments": delta.arguments}}
            return [(None, self._chunk({"tool_calls": [call]}))]
        if delta.channel == "reasoning":  # OpenAI has no place for reasoning tokens' logprobs
            return [(None, self._chunk({"reasoning_content": delta.text}))]
        logprobs = chat_logprobs(delta.logprobs) if self.logprobs else None
        return [(None, self._chunk({"content": delta.text}, logprobs=logprobs))]

    def finish(self, result: InferenceResult) -> list[Event]:
        events: list[Event] = [(None, self._chunk({}, chat_finish(result), metrics=result.metrics))]
        if self.include_usage:
            events.append((None, {**self._chunk({}), "choices": [], "usage": chat_usage(result)}))
        return [*events, (None, "[DONE]")]

    def failure(self, exc: ApiError) -> list[Event]:
        return [(None, error_body(exc)), (None, "[DONE]")]


class ResponsesShape:
    """Responses API JSON and its typed stream events (with sequence numbers) for one request.

    Output items: a ``reasoning`` item when the model reasons, then one ``message`` (left
    out when the model only calls tools), then one ``function_call`` item per tool call.
    Channels: ``reasoning``, ``output`` and ``tool<index>``."""

    metrics_header = True

    def __init__(self, *, response_id: str, model: str, echo: dict[str, Any]) -> None:
        """``echo``: the request's ``instructions``, ``temperature``, ``top_p``,
        ``max_output_tokens``, ``metadata``, ``tools``, ``tool_choice`` and ``text``,
        repeated in the response object."""
        self.id = response_id
        self.created_at = time.time()
        self.model = model
        self.echo = echo
        self.item_ids = {"reasoning": f"rs_{uuid.uuid4().hex}", "output": f"msg_{uuid.uuid4().hex}"}
        self.sequence = 0
        self.texts = {"reasoning": "", "output": ""}
        self.calls: dict[str, dict[str, str]] = {}  # tool channel -> {"call_id", "name"}
        self.logprobs: list[dict[str, Any]] = []  # the message's tokens (requests that asked)
        self.open: str | None = None  # the channel whose output item is open
        self.items: list[dict[str, Any]] = []  # finished output items

    def response(self, *, status: str, result: InferenceResult | None = None) -> dict[str, Any]:
        echo = self.echo
        obj: dict[str, Any] = {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "model": self.model, "output": list(self.items), "instructions": echo.get("instructions"),
            "error": None, "incomplete_details": None, "metadata": echo.get("metadata") or {},
            "parallel_tool_calls": bool(echo.get("tools")) and echo.get("parallel_tool_calls") is not False,
            "tool_choice": echo.get("tool_choice") or "auto",
            "tools": echo.get("tools") or [], "temperature": echo.get("temperature"),
            "top_p": echo.get("top_p"), "max_output_tokens": echo.get("max_output_tokens"),
            "text": echo.get("text") or {"format": {"type": "text"}}, "usage": None,
            "top_logprobs": echo.get("top_logprobs"),
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
        return {"type": "output_text", "text": self.texts[channel], "annotations": [], "logprobs": list(self.logprobs)}

    def _item(self, channel: str, status: str) -> dict[str, Any]:
        if channel in self.calls:
            return {"type": "function_call", "id": self.item_ids[channel], "status": status,
                    "arguments": self.texts[channel], **self.calls[channel]}
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
        where = {"item_id": self.item_ids[channel], "output_index": len(self.items)}
        return where if channel in self.calls else {**where, "content_index": 0}

    def _open(self, channel: str) -> list[Event]:
        events = self._close()
        self.open = channel
        events.append(self._event("response.output_item.added", output_index=len(self.items),
                                  item=self._item(channel, "in_progress")))
        if channel not in self.calls:
            events.append(self._event("response.content_part.added", **self._where(channel),
                                      part=self._part(channel)))
        return events

    def _close(self) -> list[Event]:
        channel = self.open
        if channel is None:
            return []
        where = self._where(channel)
        item = self._item(channel, "completed")
        if channel in self.calls:
            events = [self._event("response.function_call_arguments.done", **where, arguments=self.texts[channel])]
        else:
            extra: dict[str, Any]
            done, extra = (("response.reasoning_text.done", {}) if channel == "reasoning"
                           else ("response.output_text.done", {"logprobs": list(self.logprobs)}))
            events = [self._event(done, **where, text=self.texts[channel], **extra),
                      self._event("response.content_part.done", **where, part=self._part(channel))]
        events.append(self._event("response.output_item.done", output_index=where["output_index"], item=item))
        self.items.append(item)
        self.open = None
        return events

    def opening(self) -> list[Event]:
        started = self.response(status="in_progress")
        return [self._event("response.created", response=started),
                self._event("response.in_progress", response=started)]

    def delta(self, delta: TextDelta | ToolCallDelta) -> list[Event]:
        if isinstance(delta, ToolCallDelta):
            channel = f"tool{delta.index}"
            events: list[Event] = []
            if channel not in self.calls:
                self.calls[channel] = {"call_id": delta.id or f"call_{uuid.uuid4().hex[:24]}", "name": delta.name or ""}
                self.item_ids[channel], self.texts[channel] = f"fc_{uuid.uuid4().hex}", ""
            if self.open != channel:
                events = self._open(channel)
            self.texts[channel] += delta.arguments
            return [*events, self._event("response.function_call_arguments.delta", **self._where(channel),
                                         delta=delta.arguments)]
        channel = delta.channel
        if channel == "reasoning" and (self.texts["output"] or self.open == "output" or self.calls):
            return []  # reasoning after the answer began: a closed item is never reopened
        if channel == "output" and self.open is not None and self.open in self.calls:
            return []  # text after a tool call: the message item is not reopened
        events = self._open(channel) if self.open != channel else []
        self.texts[channel] += delta.text
        extra: dict[str, Any]
        if channel == "reasoning":
            name, extra = "response.reasoning_text.delta", {}
        else:
            logprobs = [chat_logprob(entry) for entry in delta.logprobs]
            self.logprobs += logprobs
            name, extra = "response.output_text.delta", {"logprobs": logprobs}
        return [*events, self._event(name, **self._where(channel), delta=delta.text, **extra)]

    def finish(self, result: InferenceResult) -> list[Event]:
        has_message = any(item["type"] == "message" for item in self.items) or self.open == "output"
        events = [] if has_message or self.calls else self._open("output")
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
        if result.output_text or not result.tool_calls:
            self.delta(TextDelta(result.output_text, logprobs=tuple(result.logprobs)))
        for index, call in enumerate(result.tool_calls):
            self.delta(ToolCallDelta(index, id=call["id"], name=call["function"]["name"],
                                     arguments=call["function"]["arguments"]))
        return self.finish(result)[-1][1]["response"]
