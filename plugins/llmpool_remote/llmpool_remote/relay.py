"""Reading an upstream answer: :class:`Relay` absorbs chunks (or a whole completion),
returns the text they carry and builds the final :class:`~llmpoold.types.Completion`
(metrics from ``usage``, metadata without content)."""

from __future__ import annotations

from typing import Any

from llmpool_remote.errors import DETAIL_LIMIT, parse_error, scrub
from llmpoold.errors import BackendError
from llmpoold.types import BackendMetrics, Completion, TextDelta, ToolCallDelta

# Top-level and per-choice keys kept in metadata.upstream_response (never content).
RESPONSE_KEYS = ("id", "object", "created", "model", "usage", "service_tier", "system_fingerprint")
CHOICE_KEYS = ("index", "finish_reason", "stop_reason")


class Relay:
    """State of one upstream response as it arrives: metadata, usage, finish reason."""

    def __init__(self) -> None:
        self.top: dict[str, Any] = {}
        self.choices: dict[int, dict[str, Any]] = {}
        self.usage: dict[str, Any] | None = None
        self.finish_reason: str | None = None
        self.content_chunks = 0

    def take(self, data: Any, *, key: str) -> list[TextDelta | ToolCallDelta]:
        """Absorb one chunk (or a whole completion); return the text and tool call pieces
        it carries."""
        if not isinstance(data, dict):
            raise parse_error("returned a chunk that is not a JSON object")
        if "error" in data and "choices" not in data:
            err = data["error"]
            detail = err.get("message") if isinstance(err, dict) else err
            raise BackendError(502, "upstream_server_error",
                               f"upstream chat completion failed mid-stream: {scrub(str(detail), key)[:DETAIL_LIMIT]}")
        for name in RESPONSE_KEYS:
            if name in data and name != "usage":
                self.top[name] = data[name]
        if isinstance(data.get("usage"), dict):
            self.usage = data["usage"]
        choices = data.get("choices") or []
        if not isinstance(choices, list):
            raise parse_error("returned 'choices' that is not a list")
        out: list[TextDelta | ToolCallDelta] = []
        for choice in choices:
            if not isinstance(choice, dict):
                raise parse_error("returned a choice that is not a JSON object")
            index = choice.get("index", 0)
            kept = self.choices.setdefault(index if isinstance(index, int) else 0, {})
            kept.update({k: choice[k] for k in CHOICE_KEYS if choice.get(k) is not None})
            part = choice.get("delta", choice.get("message"))
            if part is None:
                part = {}
            if not isinstance(part, dict):
                raise parse_error("returned a message that is not a JSON object")
            if isinstance(part.get("role"), str):
                kept["message"] = {"role": part["role"]}
            if choice.get("finish_reason") is not None and index in (0, None):
                self.finish_reason = str(choice["finish_reason"])
            if index not in (0, None):
                continue  # only the first choice is the answer
            reasoning = part.get("reasoning_content") or part.get("reasoning")
            if isinstance(reasoning, str) and reasoning:
                out.append(TextDelta(reasoning, channel="reasoning"))
            content = part.get("content")
            if content is not None and not isinstance(content, str):
                raise parse_error("returned message content that is not a string")
            if content:
                self.content_chunks += 1
                out.append(TextDelta(content))
            out += _tool_calls(part.get("tool_calls"))
        return out

    def completion(self, *, started: float, first_token: float | None, ended: float,
                   retries: int, streamed: bool) -> Completion:
        usage = self.usage or {}
        prompt = _int(usage.get("prompt_tokens"))
        output = _int(usage.get("completion_tokens"))
        total = _int(usage.get("total_tokens"))
        if output is None and total is not None and prompt is not None:
            output = total - prompt
        if output is None and streamed and self.content_chunks:
            output = self.content_chunks  # no usage sent: one content chunk per token, as servers stream
        details = usage.get("prompt_tokens_details")
        cached = _int(usage.get("cached_tokens"))
        if cached is None:
            cached = _int(usage.get("prompt_cache_hit_tokens"))
        if cached is None and isinstance(details, dict):
            cached = _int(details.get("cached_tokens"))
        wall_s = ended - started
        metrics = BackendMetrics(
            time_to_first_token_ms=round((first_token - started) * 1000, 3) if first_token is not None else None,
            generate_total_ms=round(wall_s * 1000, 3),
            decode_after_first_token_ms=round((ended - first_token) * 1000, 3) if first_token is not None else None,
            prompt_tokens=prompt, cached_prompt_tokens=cached, output_tokens=output,
            tokens_per_second=round(output / wall_s, 3) if output and wall_s > 0 else None)
        upstream = dict(self.top)
        if self.usage is not None:
            upstream["usage"] = self.usage
        upstream["choices"] = [{"index": i, **{k: v for k, v in c.items() if k != "index"}}
                               for i, c in sorted(self.choices.items())]
        metadata: dict[str, Any] = {"upstream_response": upstream}
        if retries:
            metadata["upstream_retries"] = retries
        return Completion(finish_reason=self.finish_reason, metrics=metrics, metadata=metadata)


def _tool_calls(calls: Any) -> list[ToolCallDelta]:
    """A delta's (or a whole message's) ``tool_calls`` as pieces; a whole message's calls
    have no ``index`` and are numbered in order."""
    if calls is None:
        return []
    if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
        raise parse_error("returned 'tool_calls' that is not a list of objects")
    out: list[ToolCallDelta] = []
    for position, call in enumerate(calls):
        function = call.get("function") if isinstance(call.get("function"), dict) else {}
        index, call_id, name, arguments = (call.get("index", position), call.get("id"), function.get("name"),
                                           function.get("arguments") or "")
        if not (isinstance(index, int) and (call_id is None or isinstance(call_id, str))
                and (name is None or isinstance(name, str)) and isinstance(arguments, str)):
            raise parse_error("returned a tool call of the wrong shape")
        out.append(ToolCallDelta(index=index, id=call_id, name=name, arguments=arguments))
    return out


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
