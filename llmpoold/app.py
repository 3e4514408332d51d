"""The aiohttp application: ``create_app()`` and the seed's HTTP API."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

import structlog
from aiohttp import web
from pydantic import BaseModel, ValidationError

from llmpoold import openai_api
from llmpoold.bridge import run_blocking
from llmpoold.config import AppSettings
from llmpoold.errors import ApiError
from llmpoold.gpu import gpu_memory
from llmpoold.http import console, openapi, public
from llmpoold.inference import Inference, InferenceResult
from llmpoold.plugins import PluginRegistry
from llmpoold.pool import Pool, ReplicaFactory
from llmpoold.schemas import AdminLoadRequest, ResponseRequest
from llmpoold.sse import open_sse, send_event

log = structlog.get_logger("llmpoold.http")

POOL = web.AppKey("pool", Pool)
REGISTRY = web.AppKey("registry", PluginRegistry)
SETTINGS = web.AppKey("settings", AppSettings)
REQUEST_ID = web.RequestKey("request_id", str)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(exc: ApiError) -> web.Response:
    return web.json_response({"detail": exc.detail()}, status=exc.status, headers=exc.headers)


def validation_response(exc: ValidationError) -> web.Response:
    """FastAPI's 422 shape: ``{"detail": [{"loc", "msg", "type"}]}``."""
    details = [{"loc": ["body", *err["loc"]], "msg": str(err["msg"]).removeprefix("Value error, "),
                "type": err["type"]} for err in exc.errors()]
    return web.json_response({"detail": details}, status=422)


async def read_json(request: web.Request) -> Any:
    """The request body as JSON, or ApiError 415/400 (never a 500)."""
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type",
                       f"expected Content-Type application/json, got '{request.content_type}'")
    raw = await request.read()
    try:
        return json.loads(raw) if raw else None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, "invalid_json", f"request body is not valid JSON: {exc}") from None


def parse_body(model: type[BaseModel], data: Any) -> Any:
    if not isinstance(data, dict):
        raise ApiError(422, "invalid_body", "request body must be a JSON object")
    return model.model_validate(data)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bind a request id to every log line; turn every failure into the envelope."""
    request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
    request[REQUEST_ID] = request_id
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    render, invalid = ((openai_api.error_response, openai_api.validation_response)  # OpenAI's error shape there
                       if openai_api.is_openai_path(request.path) else (error_response, validation_response))
    try:
        response = await handler(request)
    except ApiError as exc:
        response = render(exc)
    except ValidationError as exc:
        response = invalid(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = render(ApiError(exc.status, _HTTP_CODES.get(exc.status, "http_error"), exc.reason))
    except Exception as exc:  # noqa: BLE001 - never a traceback in a response
        log.exception("unhandled_error", path=request.path)
        response = render(ApiError(500, "internal_error", f"{type(exc).__name__}: {exc}"))
    if not response.prepared:
        response.headers["X-Request-Id"] = request_id
    return response


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return request.headers.get("X-Api-Key")


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Admin paths need the admin key, inference paths an API key (when configured)."""
    service = request.app[SETTINGS].service
    path = request.path
    if path in ("/healthz", "/readyz", "/metrics") or public.is_public(request.method, path):
        return await handler(request)
    admin_key = service.resolved_admin_key()
    api_keys = service.resolved_api_keys()
    token = _bearer(request)
    if path.startswith("/v1/admin"):
        allowed = {admin_key} if admin_key else set()
    else:
        allowed = set(api_keys) | ({admin_key} if admin_key and api_keys else set())
    if allowed and token not in allowed:
        raise ApiError(401, "unauthorized", "missing or invalid API key",
                       headers={"WWW-Authenticate": "Bearer"})
    return await handler(request)


# ----- inference ------------------------------------------------------------------------


def log_inference(inf: Inference, *, stream: bool, status: int, error: str | None = None) -> None:
    log.info("inference", model=inf.body.model, fairness_key=inf.body.fairness_key or "anonymous", stream=stream,
             status=status, error=error, metrics=inf.result.metrics if inf.result else None)


def parse_inference_body(model: type[BaseModel], data: Any) -> Any:
    """``parse_body`` that also writes the request's ``inference`` log line when the
    body is refused (every request gets one)."""
    try:
        return parse_body(model, data)
    except (ApiError, ValidationError) as exc:
        code = exc.code if isinstance(exc, ApiError) else "invalid_request_body"
        log.info("inference", model=data.get("model") if isinstance(data, dict) else None, status=422, error=code)
        raise


async def start_inference(request: web.Request, body: ResponseRequest, started: float) -> Inference:
    """Admit ``body`` and wait for a replica slot; log the line of a request that is
    refused or whose client leaves while it is queued."""
    inf = Inference(request.app[POOL], body, request_id=request[REQUEST_ID], started_at=started)
    try:
        await inf.start()
    except ApiError as exc:
        log_inference(inf, stream=body.stream, status=exc.status, error=exc.code)
        raise
    except asyncio.CancelledError:
        log_inference(inf, stream=body.stream, status=499, error="client_disconnected")
        raise
    return inf


async def collect_inference(inf: Inference, started: float) -> InferenceResult:
    """Run a started request to the end (non-streaming) and log its line."""
    try:
        async with aclosing(inf.events()) as events:
            async for _ in events:
                pass
    except ApiError as exc:
        log_inference(inf, stream=False, status=exc.status, error=exc.code)
        raise
    except asyncio.CancelledError:
        log_inference(inf, stream=False, status=499, error="client_disconnected")
        raise
    assert inf.result is not None
    _finish_pool_time(inf.result, started)
    log_inference(inf, stream=False, status=200)
    return inf.result


async def responses(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter()
    body: ResponseRequest = parse_inference_body(ResponseRequest, await read_json(request))
    inf = await start_inference(request, body, started)
    if body.stream:
        return await _stream_response(request, inf, started)
    return web.json_response(response_object(inf, await collect_inference(inf, started)))


def _finish_pool_time(result: InferenceResult, started: float) -> None:
    pool_ms = round((time.perf_counter() - started) * 1000, 3)
    result.metrics["pool_total_wall_ms"] = max(pool_ms, result.metrics["engine_total_wall_ms"] or 0.0)


def response_object(inf: Inference, result: InferenceResult) -> dict[str, Any]:
    return {
        "id": inf.response_id, "object": "response", "model": inf.body.model,
        "output": [{"type": "output_text", "text": result.output_text}],
        "output_text": result.output_text, "reasoning_text": result.reasoning_text,
        "metrics": result.metrics, "metadata": result.metadata,
    }


async def _stream_response(request: web.Request, inf: Inference, started: float) -> web.StreamResponse:
    rid = inf.response_id
    try:
        response = await open_sse(request, headers={"X-Request-Id": request[REQUEST_ID]})
    except BaseException:
        inf.close_unstarted()
        raise
    await send_event(response, {"id": rid, "model": inf.body.model, "object": "response"}, event="response.created")
    sent_output = False
    try:
        async with aclosing(inf.events()) as events:
            async for delta in events:
                name = "response.reasoning_text.delta" if delta.channel == "reasoning" else "response.output_text.delta"
                sent_output |= delta.channel == "output"
                await send_event(response, {"id": rid, "delta": delta.text}, event=name)
    except ApiError as exc:
        log_inference(inf, stream=True, status=exc.status, error=exc.code)
        await send_event(response, {"id": rid, "error": exc.detail(), "status": exc.status}, event="error")
        await response.write_eof()
        return response
    except (ConnectionResetError, asyncio.CancelledError):
        log_inference(inf, stream=True, status=499, error="client_disconnected")
        raise
    assert inf.result is not None
    result = inf.result
    if not sent_output:
        await send_event(response, {"id": rid, "delta": ""}, event="response.output_text.delta")
    _finish_pool_time(result, started)
    await send_event(response, {"id": rid, "metrics": result.metrics}, event="response.metrics")
    await send_event(response, {"id": rid, "output_text": result.output_text, "reasoning_text": result.reasoning_text,
                                "metadata": result.metadata}, event="response.completed")
    await response.write_eof()
    log_inference(inf, stream=True, status=200)
    return response


# ----- models and admin -----------------------------------------------------------------


async def list_models(request: web.Request) -> web.Response:
    return web.json_response({"models": request.app[POOL].loaded_names()})


async def admin_models(request: web.Request) -> web.Response:
    return web.json_response({"models": await request.app[POOL].admin_models()})


async def admin_plugins(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    return web.json_response({"plugins": [p.to_json() for p in registry.plugins],
                              "backends": {name: {"aliases": list(spec.aliases), "remote": spec.remote,
                                                  "description": spec.description}
                                           for name, spec in sorted(registry.backends.items())}})


async def admin_load(request: web.Request) -> web.Response:
    name = request.match_info["model_name"]
    data = await read_json(request) if request.can_read_body else None
    fields: dict[str, Any] = {}
    if data is not None:
        parsed = parse_body(AdminLoadRequest, data)
        fields = {key: getattr(parsed, key) for key in parsed.model_fields_set}
        fields.update(parsed.model_extra or {})
    return web.json_response(await request.app[POOL].load(name, fields))


async def admin_unload(request: web.Request) -> web.Response:
    return web.json_response(await request.app[POOL].unload(request.match_info["model_name"]))


async def admin_gpu_memory(request: web.Request) -> web.Response:
    pool = request.app[POOL]
    gpus, error = await run_blocking(gpu_memory)
    models = []
    for entry in pool.entries.values():
        scheduler = entry.scheduler
        models.append({"name": entry.name, "runtime_state": entry.state, "is_loaded": entry.state == "loaded",
                       "configured_target_inflight": entry.current.target_inflight,
                       "effective_target_inflight": scheduler.effective_target_inflight if scheduler else 1,
                       **(await pool.vram_fields(entry)),
                       "replica_info": [r.info() for r in entry.replicas]})
    return web.json_response({"gpus": gpus, "models": models, "error": error})


async def admin_reload(request: web.Request) -> web.Response:
    from llmpoold.reload import reload_settings

    return web.json_response(await reload_settings(request.app))


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus exposition; open like /healthz (no key), see README."""
    body, content_type = request.app[POOL].metrics.render()
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


async def readyz(request: web.Request) -> web.Response:
    pool = request.app[POOL]
    ready = pool.startup_done.is_set()
    body = {"ready": ready, "loaded_models": pool.loaded_names(),
            "failed_models": sorted(n for n, e in pool.entries.items() if e.state == "failed")}
    return web.json_response(body, status=200 if ready else 503)


# ----- factory --------------------------------------------------------------------------


def create_app(settings: AppSettings, registry: PluginRegistry, *,
               replica_factory: ReplicaFactory | None = None, load_on_startup: bool = True,
               settings_paths: tuple[str | None, str | None] = (None, None)) -> web.Application:
    """Build the app for ``settings`` with exactly the plugins in ``registry``.

    ``settings_paths`` are re-read by ``POST /v1/admin/settings/reload``.
    Raises SettingsError when a model's backend keys are invalid.
    """
    from llmpoold.reload import RELOAD_STATE, SETTINGS_PATHS

    app = web.Application(middlewares=[errors_middleware, auth_middleware],
                          client_max_size=settings.service.max_body_bytes)
    pool = Pool(settings, registry, replica_factory=replica_factory)
    app[POOL] = pool
    app[REGISTRY] = registry
    app[SETTINGS] = settings
    app[SETTINGS_PATHS] = settings_paths
    app[RELOAD_STATE] = {"service": settings.service, "workers": settings.engine.workers,
                         "restart_required": False}
    app.router.add_post("/v1/responses", responses)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/admin/models", admin_models)
    app.router.add_get("/v1/admin/plugins", admin_plugins)
    app.router.add_post("/v1/admin/models/{model_name}/load", admin_load)
    app.router.add_post("/v1/admin/models/{model_name}/unload", admin_unload)
    app.router.add_post("/v1/admin/settings/reload", admin_reload)
    app.router.add_get("/v1/admin/gpu-memory", admin_gpu_memory)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    openai_api.setup(app)
    console.setup(app)
    openapi.setup(app)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        import asyncio

        task = asyncio.create_task(pool.start()) if load_on_startup else None
        if task is None:
            pool.startup_done.set()
        yield
        if task is not None and not task.done():
            task.cancel()
        await pool.close()

    app.cleanup_ctx.append(lifecycle)
    return app
