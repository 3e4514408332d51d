"""The OpenAI-compatible surface, beside the seed's ``/v1/responses``.

``GET /openai/v1/models``, ``POST /openai/v1/chat/completions`` (also at
``/v1/chat/completions``), ``POST /openai/v1/responses``, ``POST
/openai/v1/completions`` (:mod:`llmpoold.http.openai_completions`) and ``POST
/openai/v1/embeddings`` (:mod:`llmpoold.http.openai_embeddings`) take OpenAI's request
shapes (:mod:`llmpoold.http.openai_requests`), run them through the same driver as the
seed (:func:`llmpoold.http.respond.respond`: admission, remote gate, fair queue,
cancellation, metrics) and answer in OpenAI's shapes (:mod:`llmpoold.http.openai_shapes`),
JSON or SSE. Errors on these paths are OpenAI's
``{"error": {"message", "type", "code", "param"}}`` with the seed's statuses and codes.
The seed's timing metrics travel as an extra ``metrics`` field (ignored by OpenAI
clients) and, on JSON answers, as the ``X-Llmpool-Metrics`` header.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import ValidationError

from llmpoold.errors import ApiError, clip
from llmpoold.http import openai_completions, openai_embeddings
from llmpoold.http.keys import POOL, STARTED_AT
from llmpoold.http.openai_requests import chat_request, invalid_body, responses_request
from llmpoold.http.openai_shapes import ChatShape, ResponsesShape, error_body
from llmpoold.http.respond import Parsed, respond

PREFIX = "/openai/v1"
ROOT_CHAT_PATH = "/v1/chat/completions"


def is_openai_path(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/") or path == ROOT_CHAT_PATH


def error_response(exc: ApiError) -> web.Response:
    return web.json_response(error_body(exc), status=exc.status, headers=exc.headers)


def validation_response(exc: ValidationError) -> web.Response:
    return error_response(invalid_body(exc))


def _chat(data: Any) -> Parsed:
    body, seed = chat_request(data)
    usage = bool(body.stream_options and body.stream_options.include_usage)
    return seed, lambda _response_id: ChatShape(model=seed.model, include_usage=usage, logprobs=bool(body.logprobs))


def _responses(data: Any) -> Parsed:
    body, seed = responses_request(data)
    echo = body.model_dump(include={"instructions", "temperature", "top_p", "max_output_tokens", "metadata",
                                    "tools", "tool_choice", "parallel_tool_calls", "text", "top_logprobs"})
    return seed, lambda response_id: ResponsesShape(response_id=response_id, model=seed.model, echo=echo)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await respond(request, _chat)


async def responses(request: web.Request) -> web.StreamResponse:
    try:
        return await respond(request, _responses)
    except ApiError as exc:
        # admission names Chat's fields; the Responses API calls them text.format and input
        exc.param = {"response_format": "text.format", "messages": "input", "logprobs": "include"}.get(
            exc.param or "", exc.param)
        raise


def _model(request: web.Request, name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": request.app[STARTED_AT], "owned_by": "llmpool"}


async def list_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list",
                              "data": [_model(request, name) for name in request.app[POOL].servable_names()]})


async def retrieve_model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    if name not in request.app[POOL].servable_names():
        raise ApiError(404, "model_not_found", f"model {clip(name)} is not loaded or not configured",
                       extra={"param": "model"})
    return web.json_response(_model(request, name))


def setup(app: web.Application) -> None:
    """Add the OpenAI routes to ``app`` (the app's errors middleware renders failures on
    :func:`is_openai_path` paths with :func:`error_response`)."""
    app.router.add_get(f"{PREFIX}/models", list_models)
    app.router.add_get(f"{PREFIX}/models/{{model}}", retrieve_model)
    app.router.add_post(f"{PREFIX}/chat/completions", chat_completions)
    app.router.add_post(ROOT_CHAT_PATH, chat_completions)
    app.router.add_post(f"{PREFIX}/responses", responses)
    app.router.add_post(f"{PREFIX}/completions", openai_completions.completions)
    app.router.add_post(f"{PREFIX}/embeddings", openai_embeddings.embeddings)
