"""Reading a request body, and the one driver that answers an inference in any shape.

A *shape* turns one inference into a surface's answer: the seed's ``/v1/responses``
(:mod:`llmpoold.http.seed`), OpenAI Chat Completions and the Responses API
(:mod:`llmpoold.http.openai_shapes`). :func:`respond` runs every surface the same way:
read and parse the body, admit and queue the request (:class:`Inference`), then answer
JSON or server-sent events, and release the replica slot on every exit path, including
a client that leaves the moment the SSE headers are sent.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from contextlib import aclosing
from typing import Any, Protocol

import structlog
from aiohttp import web
from pydantic import BaseModel, ValidationError

from llmpoold.errors import ApiError, clip
from llmpoold.http.keys import POOL, REQUEST_ID, SETTINGS, TENANT
from llmpoold.http.sse import StreamStalled, end_sse, open_sse, send_event
from llmpoold.inference import Inference, InferenceResult, record_refused_body
from llmpoold.schemas import ResponseRequest
from llmpoold.types import TextDelta, ToolCallDelta

log = structlog.get_logger("llmpoold.http")

Event = tuple[str | None, Any]  # (SSE event name or None, data)


class Shape(Protocol):
    """One request's answer in a surface's shape: the JSON body, or the SSE events to
    send at the start, per delta, at the end, or on a failure after the headers."""

    metrics_header: bool  # JSON answers carry the metrics as ``X-Llmpool-Metrics`` too

    def json(self, result: InferenceResult) -> dict[str, Any]: ...
    def opening(self) -> list[Event]: ...
    def delta(self, delta: TextDelta | ToolCallDelta) -> list[Event]: ...
    def finish(self, result: InferenceResult) -> list[Event]: ...
    def failure(self, exc: ApiError) -> list[Event]: ...


# (the seed request to run, and the shape to answer in given the response id)
Parsed = tuple[ResponseRequest, Callable[[str], Shape]]


MAX_JSON_DEPTH = 32  # arrays and objects nested in a request body; real bodies use fewer than 8
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # only a \uD800-\uDFFF escape decodes to one


def _invalid_json(reason: str) -> ApiError:
    return ApiError(400, "invalid_json", f"request body is not valid JSON: {reason}")


def check_json(value: Any, *, surrogates: bool) -> None:
    """Raise ApiError 400 ``invalid_json`` when ``value`` nests deeper than
    :data:`MAX_JSON_DEPTH` or (``surrogates``) holds a string or key that is not valid
    Unicode (a lone surrogate escape such as ``"\\ud800"``, which no UTF-8 text can carry)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth >= MAX_JSON_DEPTH:
                raise _invalid_json(f"nested deeper than {MAX_JSON_DEPTH} levels")
            if isinstance(item, dict):
                if surrogates:
                    stack.extend((key, depth) for key in item)
                item = item.values()
            stack.extend((child, depth + 1) for child in item)
        elif surrogates and isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise _invalid_json("a string holds a lone surrogate (\\ud800-\\udfff), not valid UTF-8") from None


async def read_json(request: web.Request) -> Any:
    """The request body as JSON, or ApiError 415/400 (never a 500): the body must be
    UTF-8 JSON whose strings are valid Unicode, nested at most :data:`MAX_JSON_DEPTH`
    deep (its size is bounded by ``service.max_body_bytes``, a 413 beyond)."""
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type",
                       f"expected Content-Type application/json, got {clip(request.content_type)}")
    raw = await request.read()
    if not raw:
        return None
    try:
        text = raw.decode("utf-8")
        data = json.loads(text)
    except UnicodeDecodeError:
        raise _invalid_json("not UTF-8") from None
    except json.JSONDecodeError as exc:  # its message quotes no input, only a position
        raise _invalid_json(str(exc)) from None
    except ValueError:  # an integer of more digits than int() converts
        raise _invalid_json("a number is too long") from None
    except RecursionError:
        raise _invalid_json(f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    check_json(data, surrogates=_SURROGATE_ESCAPE.search(text) is not None)
    return data


def parse_body(model: type[BaseModel], data: Any) -> Any:
    """``data`` validated as ``model``; a body that is not an object is a 422."""
    if not isinstance(data, dict):
        raise ApiError(422, "invalid_body", "request body must be a JSON object")
    return model.model_validate(data)


async def respond(request: web.Request, parse: Callable[[Any], Parsed]) -> web.StreamResponse:
    """Answer one inference request; ``parse`` maps the JSON body to the seed request
    and its shape (raising ApiError or ValidationError, rendered by the middleware)."""
    started = time.perf_counter()
    data = await read_json(request)
    try:
        body, make_shape = parse(data)
    except (ApiError, ValidationError) as exc:  # every request gets its log line
        record_refused_body(data, exc.code if isinstance(exc, ApiError) else "invalid_request_body")
        raise
    inf = Inference(request.app[POOL], body, request_id=request[REQUEST_ID], started_at=started,
                    tenant=request.get(TENANT))
    await inf.start()  # records its own refusal
    shape = make_shape(inf.response_id)
    try:
        if not body.stream:
            result = await inf.collect()
            headers = {"X-Llmpool-Metrics": json.dumps(result.metrics, separators=(",", ":"))}
            return web.json_response(shape.json(result), headers=headers if shape.metrics_header else None)
        async with aclosing(inf.events()) as deltas:
            # The headers wait for the first delta: a refusal found once the backend has
            # the request (context overflow, an upstream's 4xx or 5xx, a failed load of a
            # worker) is then an HTTP status as on a JSON request and as the seed's
            # streams had it, not an error event after a 200.
            first = await anext(deltas, None)
            response = await open_sse(request, headers={"X-Request-Id": request[REQUEST_ID]})
            timeout_s = request.app[SETTINGS].service.stream_write_timeout_s

            async def send(events: list[Event]) -> None:
                for name, event in events:
                    await send_event(request, response, event, event=name, timeout_s=timeout_s)

            try:
                await send(shape.opening())
                try:
                    if first is not None:
                        await send(shape.delta(first))
                        async for delta in deltas:
                            await send(shape.delta(delta))
                except ApiError as exc:  # after the headers: an error event ends the stream
                    await send(shape.failure(exc))
                else:
                    assert inf.result is not None
                    await send(shape.finish(inf.result))
                await end_sse(request, response, timeout_s=timeout_s)
            except StreamStalled as exc:
                # A reader that stopped reading: the connection is aborted, leaving the
                # ``async with`` closed the generation, and ``finally`` frees the slot.
                log.warning("stream_write_timeout", request_id=request[REQUEST_ID], error=str(exc))
        return response  # after an abort, aiohttp sees a client that went away
    finally:
        inf.close()  # a no-op once events() released the slot; else the client left early
