"""The worker protocol: framing and every codec, both sides of the socket.

Every message, both ways, is one frame: a 4-byte big-endian length, then that many
bytes of UTF-8 JSON (an object). Daemon to worker (``id`` is chosen by the daemon and
names the operation or stream in every reply)::

    {"op": "load",     "id": n, "backend": b, "replica_id": r, "model": {...}}
    {"op": "health",   "id": n}
    {"op": "stream",   "id": n, "request": request_to_wire(...), "whole": bool}
    {"op": "embed",    "id": n, "request": embed_request_to_wire(...)}
    {"op": "cancel",   "id": n}                  # n: the stream (or embed) to cancel
    {"op": "unload",   "id": n}                  # the worker exits after replying

Worker to daemon::

    {"id": n, "t": "result", "value": ...}       # load / health / unload
    {"id": n, "t": "delta", ...}                 # stream items: item_to_wire() + id
    {"id": n, "t": "completion", ...}
    {"id": n, "t": "end"}                        # stream over; the runtime let go of it
    {"id": n, "t": "embedding", "vectors": [[...]], "metrics": {...}}  # embed's answer
    {"id": n, "t": "error", "kind": k, "type": name, "message": m, "status": s, "code": c,
     "headers": {...}, "extra": {...}}

``kind`` is ``api`` (a BackendError/ApiError, with status, code, the response headers
such as ``Retry-After`` and extra detail fields), ``load`` (a LoadError) or
``exception`` (anything else; ``type`` is its class name, and the daemon raises a
:class:`~llmpoold.errors.WorkerError`). Streams are multiplexed by id. A cancelled
stream still ends with ``end`` (or ``error``), once the runtime has stopped, so the
daemon knows the slot is free.

Neither side sends what the other could not read: :func:`encode_frame` raises
:class:`FrameError` for a message that is not valid UTF-8 (a lone surrogate in some
text) or is over :data:`MAX_FRAME`, before anything is written, so the error belongs to
that one request or reply. The daemon checks every reply with :func:`reply_from_wire`;
a malformed one (bad JSON, not an object, a missing or mistyped field) is a protocol
error, which the daemon handles as a crash of that worker.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import asdict, fields
from typing import Any

from llmpoold.config import ModelConfig, resolve_model_options
from llmpoold.errors import ApiError, BackendError, LoadError, WorkerError
from llmpoold.plugins import PluginRegistry
from llmpoold.types import (
    BackendMetrics,
    Completion,
    Decoding,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationRequest,
    Message,
    StreamItem,
    TextDelta,
    TokenLogprob,
    ToolCallDelta,
)

HEADER = struct.Struct(">I")
MAX_FRAME = 64 * 2**20
CHANNELS = ("output", "reasoning")


class FrameError(ValueError):
    """A message that cannot be a frame (sending side), or a frame that is not a valid
    message (receiving side). Its text is ASCII and never quotes the offending value."""


def encode_frame(message: Mapping[str, Any]) -> bytes:
    """``message`` as one frame; FrameError (nothing sent) when it cannot be one."""
    text = json.dumps(message, separators=(",", ":"), ensure_ascii=False)
    try:
        payload = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        char = ord(exc.object[exc.start])
        raise FrameError(f"text is not valid UTF-8 (lone surrogate U+{char:04X})") from None
    if len(payload) > MAX_FRAME:
        raise FrameError(f"message of {len(payload)} bytes is over the frame limit of {MAX_FRAME}")
    return HEADER.pack(len(payload)) + payload


def frame_size(header: bytes) -> int:
    """The payload length a header announces. Raises ValueError over :data:`MAX_FRAME`."""
    (size,) = HEADER.unpack(header)
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes (limit {MAX_FRAME})")
    return int(size)


def decode_payload(payload: bytes) -> dict[str, Any]:
    """A frame's payload as its JSON object; FrameError when it is not one."""
    try:
        message = json.loads(payload)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise FrameError(f"frame is not UTF-8 JSON ({type(exc).__name__} at {getattr(exc, 'pos', None) or 0})") \
            from None
    if not isinstance(message, dict):
        raise FrameError(f"frame is a JSON {type(message).__name__}, not an object")
    return message


REPLY_KINDS = frozenset({"result", "delta", "completion", "end", "error", "embedding"})


def reply_from_wire(msg: Mapping[str, Any]) -> tuple[int, str, Any]:
    """A worker's reply checked and decoded: ``(id, t, value)``, where value is the
    :class:`StreamItem` of a delta or completion, the exception of an error, the value of
    a result, the :class:`EmbeddingResult` of an embedding, None for an end. Raises
    FrameError for anything malformed."""
    mid, kind = msg.get("id"), msg.get("t")
    if type(mid) is not int or mid < 1:
        raise FrameError("reply without a positive integer id")
    if kind not in REPLY_KINDS:
        raise FrameError(f"reply {mid} has no valid 't' (one of {', '.join(sorted(REPLY_KINDS))})")
    try:
        if kind == "result":
            return mid, kind, msg.get("value")
        if kind == "end":
            return mid, kind, None
        if kind == "error":
            return mid, kind, error_from_wire(msg)
        if kind == "embedding":
            return mid, kind, embedding_from_wire(msg)
        return mid, kind, item_from_wire(msg)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise FrameError(f"malformed '{kind}' reply {mid} ({type(exc).__name__})") from None


# ----- values -------------------------------------------------------------------------


def model_to_wire(model: ModelConfig) -> dict[str, Any]:
    """A ModelConfig as JSON: the common keys plus ``options`` dumped by its model."""
    data = model.model_dump(mode="json", exclude={"options"})
    options = model.options
    data["options"] = options.model_dump(mode="json") if hasattr(options, "model_dump") else None
    return data


def model_from_wire(data: Mapping[str, Any], registry: PluginRegistry, backend: str) -> ModelConfig:
    values = dict(data)
    options = values.pop("options", None)
    model = ModelConfig.model_validate(values)
    spec = registry.spec(backend)
    if options is not None:
        try:
            return model.model_copy(update={"options": spec.options_model.model_validate(options)})
        except Exception:  # noqa: BLE001 - fall back to the raw keys below
            pass
    return resolve_model_options(model, spec.options_model, backend=backend,
                                 requires_model_path=spec.requires_model_path)


def request_to_wire(request: GenerationRequest) -> dict[str, Any]:
    data = {f.name: getattr(request, f.name) for f in fields(request) if f.name != "cancel"}
    data["decoding"] = asdict(request.decoding)
    data["messages"] = [{"role": m.role, "content": m.content if isinstance(m.content, str) else list(m.content),
                         "tool_calls": list(m.tool_calls), "tool_call_id": m.tool_call_id}
                        for m in request.messages]
    data["tools"] = list(request.tools)
    return data


def request_from_wire(data: Mapping[str, Any]) -> GenerationRequest:
    values = dict(data)
    decoding = dict(values.pop("decoding"))
    decoding["stop"] = tuple(decoding.get("stop") or ())
    messages = tuple(Message(role=m["role"], content=m["content"] if isinstance(m["content"], str)
                             else tuple(m["content"]), tool_calls=tuple(m.get("tool_calls") or ()),
                             tool_call_id=m.get("tool_call_id")) for m in values.pop("messages"))
    values["tools"] = tuple(values.get("tools") or ())
    return GenerationRequest(decoding=Decoding(**decoding), messages=messages, **values)


def logprob_to_wire(entry: TokenLogprob) -> dict[str, Any]:
    data: dict[str, Any] = {"token": entry.token, "logprob": entry.logprob, "bytes": list(entry.bytes)}
    if entry.top:
        data["top"] = [logprob_to_wire(alt) for alt in entry.top]
    return data


def logprob_from_wire(data: Mapping[str, Any]) -> TokenLogprob:
    """KeyError/TypeError when malformed."""
    token, logprob, raw = data["token"], data["logprob"], data["bytes"]
    if not isinstance(token, str) or not isinstance(logprob, int | float) or not isinstance(raw, list) \
            or not all(isinstance(b, int) and 0 <= b < 256 for b in raw):
        raise TypeError("a logprob needs a string token, a number logprob and a list of bytes")
    return TokenLogprob(token=token, logprob=float(logprob), bytes=tuple(raw),
                        top=tuple(logprob_from_wire(alt) for alt in data.get("top") or ()))


def item_to_wire(item: StreamItem) -> dict[str, Any]:
    if isinstance(item, TextDelta):
        data: dict[str, Any] = {"t": "delta", "text": item.text, "channel": item.channel}
        if item.logprobs:  # only on requests that asked for them
            data["logprobs"] = [logprob_to_wire(entry) for entry in item.logprobs]
        return data
    if isinstance(item, ToolCallDelta):
        return {"t": "delta", "channel": "tool", "index": item.index, "call_id": item.id, "name": item.name,
                "arguments": item.arguments}
    return {"t": "completion", "finish_reason": item.finish_reason,
            "metrics": asdict(item.metrics), "metadata": dict(item.metadata)}


def item_from_wire(data: Mapping[str, Any]) -> StreamItem:
    """A delta or completion frame as its item (KeyError/TypeError/ValueError when malformed)."""
    if data["t"] == "delta" and data["channel"] == "tool":
        index, call_id, name, arguments = data["index"], data["call_id"], data["name"], data["arguments"]
        if not isinstance(index, int) or not all(isinstance(v, (str, type(None))) for v in (call_id, name, arguments)):
            raise TypeError("a tool-call delta needs an integer index and string (or null) id, name, arguments")
        return ToolCallDelta(index=index, id=call_id, name=name, arguments=arguments)
    if data["t"] == "delta":
        text, channel = data["text"], data["channel"]
        if not isinstance(text, str) or channel not in CHANNELS:
            raise ValueError("delta text must be a string and channel one of " + ", ".join(CHANNELS))
        return TextDelta(text=text, channel=channel,
                         logprobs=tuple(logprob_from_wire(entry) for entry in data.get("logprobs") or ()))
    finish, metrics, metadata = data["finish_reason"], data["metrics"], data["metadata"]
    if not isinstance(finish, str) or not isinstance(metrics, dict) or not isinstance(metadata, dict):
        raise TypeError("completion needs a finish_reason string, metrics and metadata objects")
    return Completion(finish_reason=finish, metrics=BackendMetrics(**metrics), metadata=metadata)


def embed_request_to_wire(request: EmbeddingRequest) -> dict[str, Any]:
    return {"request_id": request.request_id, "model": request.model, "replica_id": request.replica_id,
            "inputs": list(request.inputs)}


def embed_request_from_wire(data: Mapping[str, Any]) -> EmbeddingRequest:
    inputs = data["inputs"]
    if not isinstance(inputs, list) or not all(isinstance(text, str) for text in inputs):
        raise TypeError("embed inputs must be a list of strings")
    return EmbeddingRequest(request_id=str(data["request_id"]), model=str(data["model"]),
                            replica_id=str(data["replica_id"]), inputs=tuple(inputs))


def embedding_to_wire(result: EmbeddingResult) -> dict[str, Any]:
    return {"t": "embedding", "vectors": [list(v) for v in result.vectors], "metrics": asdict(result.metrics)}


def embedding_from_wire(data: Mapping[str, Any]) -> EmbeddingResult:
    """An embedding frame as its result (TypeError when malformed: vectors must be lists
    of numbers, all of one length)."""
    vectors, metrics = data["vectors"], data["metrics"]
    if not isinstance(vectors, list) or not isinstance(metrics, dict) or not all(
            isinstance(v, list) and all(type(x) in (float, int) for x in v) for v in vectors):
        raise TypeError("an embedding needs a list of number lists and a metrics object")
    if len({len(v) for v in vectors}) > 1:
        raise ValueError("embedding vectors differ in length")
    return EmbeddingResult(vectors=tuple(tuple(float(x) for x in v) for v in vectors),
                           metrics=BackendMetrics(**metrics))


# ----- errors -------------------------------------------------------------------------


def _utf8(text: str) -> str:
    """``text`` with anything UTF-8 cannot carry (lone surrogates) replaced: an error
    message quoting bad input must still reach the other side."""
    return text.encode("utf-8", "replace").decode("utf-8")


def error_to_wire(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, ApiError):
        message = None if exc.message is None else _utf8(exc.message)
        return {"t": "error", "kind": "api", "type": type(exc).__name__, "status": exc.status, "code": exc.code,
                "message": message, "headers": dict(exc.headers), "extra": dict(exc.extra), "param": exc.param}
    kind = "load" if isinstance(exc, LoadError) else "exception"
    return {"t": "error", "kind": kind, "type": type(exc).__name__, "message": _utf8(str(exc))}


def error_from_wire(msg: Mapping[str, Any]) -> Exception:
    """The worker's error message as the exception the daemon raises for it."""
    message = str(msg.get("message") or "")
    if msg.get("kind") == "api":
        return BackendError(int(msg.get("status") or 500), str(msg.get("code") or "backend_error"),
                            msg.get("message"), headers=dict(msg.get("headers") or {}),
                            extra=dict(msg.get("extra") or {}),
                            param=msg["param"] if isinstance(msg.get("param"), str) else None)
    if msg.get("kind") == "load":
        return LoadError(message)
    return WorkerError(str(msg.get("type") or "Exception"), message)
