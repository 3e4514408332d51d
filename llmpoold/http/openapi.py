"""``GET /openapi.json`` (OpenAPI 3.1) and ``GET /docs`` (Swagger UI, offline).

The document is generated from the pydantic models the handlers validate with
(:mod:`llmpoold.schemas`, the OpenAI bodies in :mod:`llmpoold.http.openai_requests`) and the
answer models in :mod:`llmpoold.http.answers`, so the bounds a handler enforces
(``ge``/``le``, lengths, enums) are the bounds the document declares. :data:`ROUTES`
lists every API route once; ``tests/test_openapi.py`` checks that the app has no route
the table misses and runs schemathesis against a live daemon.

Swagger UI comes from the ``swagger-ui-py`` package (extra ``llmpoold[docs]``), which
ships Swagger UI 5 (OpenAPI 3.1); its files are served from ``/docs/assets/``. Without
that package ``/docs`` says how to install it and links the raw document.
"""

from __future__ import annotations

import importlib.resources
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from llmpoold import __version__
from llmpoold.http import answers as a
from llmpoold.http.keys import SETTINGS
from llmpoold.http.openai_completions import CompletionsBody
from llmpoold.http.openai_embeddings import EmbeddingsBody
from llmpoold.http.openai_requests import ChatBody, ResponsesBody
from llmpoold.schemas import AdminLoadRequest, ResponseRequest

STATIC = Path(__file__).parent / "static"
DOC = web.AppKey("openapi_doc", dict)
SWAGGER_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png")

Surface = Literal["seed", "openai", "open"]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    summary: str
    tag: str
    answer: type[BaseModel] | None  # None: not JSON (see ``content``)
    body: type[BaseModel] | None = None
    body_required: bool = True
    errors: tuple[int, ...] = ()
    surface: Surface = "seed"  # error shape: the seed envelope or OpenAI's; "open": no key
    stream: bool = False  # also answers text/event-stream
    content: str = "application/json"
    extra_answers: dict[int, type[BaseModel]] = field(default_factory=dict)


_INFER = (400, 401, 403, 404, 409, 413, 415, 422, 429, 500, 502, 503, 504)
_ADMIN_BODY = (400, 401, 404, 409, 413, 415, 422, 500)

ROUTES: tuple[Route, ...] = (
    Route("POST", "/v1/responses", "Generate (JSON, or SSE with stream: true)", "inference", a.SeedResponse,
          ResponseRequest, errors=_INFER, stream=True),
    Route("GET", "/v1/models", "Loaded model names", "models", a.ModelNames, errors=(401,)),
    Route("GET", "/v1/admin/models", "Every configured model: state, replicas, queue, memory", "admin",
          a.AdminModels, errors=(401,)),
    Route("GET", "/v1/admin/plugins", "Installed plugins and backends", "admin", a.Plugins, errors=(401,)),
    Route("POST", "/v1/admin/models/{model_name}/load", "Load a model, with optional load overrides", "admin",
          a.AdminModel, AdminLoadRequest, body_required=False, errors=_ADMIN_BODY),
    Route("POST", "/v1/admin/models/{model_name}/unload", "Unload a model gracefully", "admin", a.AdminModel,
          errors=(401, 404, 409)),
    Route("POST", "/v1/admin/settings/reload", "Re-read settings.json and local.json", "admin", a.Reload,
          errors=(400, 401, 409)),
    Route("GET", "/v1/admin/gpu-memory", "GPU memory (NVML) and per-model estimates", "admin", a.GpuMemory,
          errors=(401,)),
    Route("GET", "/v1/admin/usage", "Each named API key's usage since start, and its remote spend this month",
          "admin", a.Usage, errors=(401,)),
    Route("GET", "/v1/admin/memory", "Memory budgets, holdings by model, estimate vs observed", "admin", a.Memory,
          errors=(401,)),
    Route("GET", "/healthz", "Liveness", "health", a.Health, surface="open"),
    Route("GET", "/readyz", "Readiness: startup loads done", "health", a.Ready, surface="open",
          extra_answers={503: a.Ready}),
    Route("GET", "/metrics", "Prometheus metrics (a key off loopback binds)", "health", None, surface="open",
          content="text/plain", errors=(401,)),
    Route("GET", "/openai/v1/models", "Loaded and on-demand models (OpenAI)", "openai", a.OpenAIModelList,
          errors=(401,), surface="openai"),
    Route("GET", "/openai/v1/models/{model}", "One loaded or on-demand model (OpenAI)", "openai", a.OpenAIModel,
          errors=(401, 404), surface="openai"),
    Route("POST", "/openai/v1/chat/completions", "Chat Completions", "openai", a.ChatCompletion, ChatBody,
          errors=_INFER, surface="openai", stream=True),
    Route("POST", "/v1/chat/completions", "Chat Completions (alias)", "openai", a.ChatCompletion, ChatBody,
          errors=_INFER, surface="openai", stream=True),
    Route("POST", "/openai/v1/responses", "Responses API", "openai", a.OpenAIResponse, ResponsesBody,
          errors=_INFER, surface="openai", stream=True),
    Route("POST", "/openai/v1/completions", "Legacy text completions (raw prompt)", "openai", a.TextCompletion,
          CompletionsBody, errors=_INFER, surface="openai", stream=True),
    Route("POST", "/openai/v1/embeddings", "Embeddings (models configured to serve them)", "openai",
          a.EmbeddingList, EmbeddingsBody, errors=_INFER, surface="openai"),
    Route("GET", "/openapi.json", "This document", "pages", None, surface="open"),
    Route("GET", "/docs", "API docs (Swagger UI)", "pages", None, surface="open", content="text/html"),
    Route("GET", "/", "Web console (HTML), or a JSON index", "pages", None, surface="open", content="text/html"),
)

_BROWSER = (403, 421)  # every route: a foreign Origin, a foreign Host on a loopback bind (llmpoold.http.security)
_REASONS = {400: "Bad request", 401: "Missing or invalid key",
            403: "Origin not allowed, or not allowed for this key (model, remote)", 404: "Unknown model",
            409: "Model state conflict", 421: "Host not allowed (loopback bind)",
            413: "Body too large", 415: "Not JSON", 422: "Invalid body",
            429: "Queue full, or the key's limits (Retry-After)",
            500: "Internal or load error", 502: "Backend failure", 503: "Not ready / unavailable",
            504: "Backend timeout"}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _schemas() -> dict[str, Any]:
    """Every request and answer model, with shared definitions, as components."""
    requests: set[type[BaseModel]] = {r.body for r in ROUTES if r.body is not None}
    answers: set[type[BaseModel]] = {r.answer for r in ROUTES if r.answer is not None}
    answers |= {a.ErrorEnvelope, a.OpenAIError}
    pairs: list[tuple[type[BaseModel], Literal["validation", "serialization"]]] = [
        *((m, "validation") for m in sorted(requests, key=lambda m: m.__name__)),
        *((m, "serialization") for m in sorted(answers, key=lambda m: m.__name__))]
    mapping, defs = models_json_schema(pairs, ref_template="#/components/schemas/{model}")
    schemas: dict[str, Any] = dict(defs.get("$defs", {}))
    for (model, _mode), schema in mapping.items():  # top-level models by their class name
        if "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[1]
            if name != model.__name__:
                schemas[model.__name__] = schemas[name]
    return schemas


def _operation(route: Route, models: list[str]) -> dict[str, Any]:
    op_id = route.method.lower() + re.sub(r"[^A-Za-z0-9]+", "_", route.path).rstrip("_")
    op: dict[str, Any] = {"summary": route.summary, "tags": [route.tag], "operationId": op_id}
    if route.surface == "open":  # no key; a key optional where a 401 is possible (/metrics off loopback)
        op["security"] = [{}, {"bearer": []}, {"apiKey": []}] if 401 in route.errors else []
    params = [seg[1:-1] for seg in route.path.split("/") if seg.startswith("{")]
    if params:
        op["parameters"] = [{"name": p, "in": "path", "required": True,
                             "schema": {"type": "string", "minLength": 1}, "examples": {
                                 m: {"value": m} for m in models[:3]}} for p in params]
        if not models:
            del op["parameters"][0]["examples"]
    if route.body is not None:
        media: dict[str, Any] = {"schema": _ref(route.body)}
        if models and route.body is not AdminLoadRequest:
            media["example"] = _example(route, models[0])
        op["requestBody"] = {"required": route.body_required, "content": {"application/json": media}}
    ok: dict[str, Any] = {"description": "OK"}
    if route.answer is not None:
        ok["content"] = {"application/json": {"schema": _ref(route.answer)}}
    elif route.content == "text/html" and route.path == "/":
        ok["content"] = {"text/html": {"schema": {"type": "string"}},
                         "application/json": {"schema": {"type": "object"}}}
    else:
        ok["content"] = {route.content: {"schema": {"type": "object" if route.content == "application/json"
                                                    else "string"}}}
    if route.stream:
        ok["content"]["text/event-stream"] = {"schema": {"type": "string"}}
    responses: dict[str, Any] = {"200": ok}
    error = _ref(a.OpenAIError if route.surface == "openai" else a.ErrorEnvelope)
    for status in sorted({*route.errors, *_BROWSER}):
        responses[str(status)] = {"description": _REASONS[status], "content": {"application/json": {"schema": error}}}
    for status, model in route.extra_answers.items():
        responses[str(status)] = {"description": _REASONS[status],
                                  "content": {"application/json": {"schema": _ref(model)}}}
    op["responses"] = responses
    return op


def _example(route: Route, model: str) -> dict[str, Any]:
    if route.body is ChatBody:
        return {"model": model, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 16}
    if route.body is EmbeddingsBody:
        return {"model": model, "input": ["Hello there", "General Kenobi"]}
    if route.body is ResponsesBody:
        return {"model": model, "input": "Hello there", "max_output_tokens": 16}
    return {"model": model, "input": "The capital of France is", "decoding": {"max_tokens": 16}}


def build(models: list[str]) -> dict[str, Any]:
    """The OpenAPI 3.1 document; ``models`` (configured names) become examples."""
    paths: dict[str, Any] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, models)
    return {
        "openapi": "3.1.0",
        "info": {"title": "llmpoold", "version": __version__,
                 "description": "One HTTP API in front of the LLM runtimes on a host. Inference paths take an API "
                                "key and admin paths the admin key when keys are configured (Bearer or "
                                "X-Api-Key); health and these pages are open, /metrics too on a loopback bind. "
                                "A browser Origin other than the daemon's own or service.allowed_origins gets "
                                "403; on a loopback bind a Host that is not loopback or in "
                                "service.allowed_hosts gets 421 (README, Security model)."},
        "paths": paths,
        "components": {"schemas": _schemas(), "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-Api-Key"}}},
        "security": [{"bearer": []}, {"apiKey": []}],
    }


async def openapi_json(request: web.Request) -> web.Response:
    doc = request.app[DOC]  # built once per app, on first use
    if not doc:
        doc.update(build(sorted(request.app[SETTINGS].engine.models)))
    return web.json_response(doc)


def swagger_dir() -> Path | None:
    """Swagger UI's files from the ``swagger-ui-py`` package, or None when not installed."""
    try:
        root = importlib.resources.files("swagger_ui") / "static"
    except ModuleNotFoundError:
        return None
    path = Path(str(root))
    return path if (path / "swagger-ui-bundle.js").is_file() else None


async def docs_page(request: web.Request) -> web.Response:
    name = "docs.html" if swagger_dir() is not None else "docs-missing.html"
    return web.Response(text=(STATIC / name).read_text(encoding="utf-8"), content_type="text/html")


async def docs_asset(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    root = swagger_dir()
    if name == "docs.js":
        return web.FileResponse(STATIC / "docs.js")
    if root is None or name not in SWAGGER_FILES:
        raise web.HTTPNotFound()
    return web.FileResponse(root / name)


def setup(app: web.Application) -> None:
    """Add ``/openapi.json``, ``/docs`` and ``/docs/assets/{name}`` (public, read-only)."""
    app[DOC] = {}
    app.router.add_get("/openapi.json", openapi_json)
    app.router.add_get("/docs", docs_page)
    app.router.add_get("/docs/assets/{name}", docs_asset)
