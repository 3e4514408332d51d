"""The aiohttp application: ``create_app()``, the middleware and the route table."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import structlog
from aiohttp import web
from pydantic import ValidationError

from llmpoold.config import AppSettings
from llmpoold.entries import ModelState
from llmpoold.errors import ApiError
from llmpoold.http import admin, console, openai_api, openapi, public, seed
from llmpoold.http.keys import POOL, REGISTRY, RELOAD, REQUEST_ID, SETTINGS, STARTED_AT, ReloadState
from llmpoold.plugins import PluginRegistry
from llmpoold.pool import Pool, ReplicaFactory
from llmpoold.replicas.factory import ProcessReplicaFactory

log = structlog.get_logger("llmpoold.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bind a request id to every log line; turn every failure into the envelope."""
    request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
    request[REQUEST_ID] = request_id
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    render, invalid = ((openai_api.error_response, openai_api.validation_response)  # OpenAI's error shape there
                       if openai_api.is_openai_path(request.path) else (seed.error_response, seed.validation_response))
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
            "failed_models": sorted(n for n, e in pool.entries.items() if e.state == ModelState.FAILED)}
    return web.json_response(body, status=200 if ready else 503)


def create_app(settings: AppSettings, registry: PluginRegistry, *,
               replica_factory: ReplicaFactory | None = None, load_on_startup: bool = True,
               settings_paths: tuple[str | None, str | None] = (None, None)) -> web.Application:
    """Build the app for ``settings`` with exactly the plugins in ``registry``.

    ``replica_factory`` defaults to inline or worker-process replicas per model
    ``isolation`` (:class:`~llmpoold.replicas.factory.ProcessReplicaFactory`).
    ``settings_paths`` are re-read by ``POST /v1/admin/settings/reload``.
    Raises SettingsError when a model's backend keys are invalid.
    """
    app = web.Application(middlewares=[errors_middleware, auth_middleware],
                          client_max_size=settings.service.max_body_bytes)
    pool = Pool(settings, registry, replica_factory=replica_factory or ProcessReplicaFactory.from_settings(settings))
    app[POOL] = pool
    app[REGISTRY] = registry
    app[SETTINGS] = settings
    app[RELOAD] = ReloadState(paths=settings_paths, service=settings.service, workers=settings.engine.workers)
    app[STARTED_AT] = int(time.time())
    seed.setup(app)
    admin.setup(app)
    openai_api.setup(app)
    console.setup(app)
    openapi.setup(app)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(pool.start()) if load_on_startup else None
        if task is None:
            pool.startup_done.set()
        yield
        if task is not None and not task.done():
            task.cancel()
        await pool.close()

    app.cleanup_ctx.append(lifecycle)
    return app
