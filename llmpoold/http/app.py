"""The aiohttp application: ``create_app()``, the middleware and the route table."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import structlog
from aiohttp import web
from pydantic import ValidationError

from llmpoold.config import AppSettings
from llmpoold.entries import ModelState
from llmpoold.errors import QUOTE_CHARS, ApiError, cut, internal_error
from llmpoold.http import admin, console, openai_api, openapi, security, seed
from llmpoold.http.keys import (
    DOOR,
    POOL,
    REGISTRY,
    RELOAD,
    REQUEST_ID,
    SETTINGS,
    STARTED_AT,
    TENANT,
    TENANTS,
    ReloadState,
)
from llmpoold.plugins import PluginRegistry
from llmpoold.pool import Pool, ReplicaFactory
from llmpoold.replicas.factory import ProcessReplicaFactory
from llmpoold.tenants import Tenants
from llmpoold.usage import UsageBook

log = structlog.get_logger("llmpoold.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")  # a client's X-Request-Id is kept only if it looks like one


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bind a request id to every log line; turn every failure into the envelope.

    A failure that is not an :class:`ApiError` is a 500 saying "internal error" with
    the request id; the traceback goes to the log only."""
    offered = request.headers.get("X-Request-Id", "")
    request_id = offered if _REQUEST_ID.fullmatch(offered) else uuid.uuid4().hex
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
    except Exception:  # noqa: BLE001 - never a traceback in a response
        log.exception("unhandled_error", method=request.method, path=cut(request.path, QUOTE_CHARS))
        response = render(internal_error(request_id))
    if not response.prepared:
        response.headers["X-Request-Id"] = request_id
    return response


async def cors_on_prepare(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """CORS headers for an allowed foreign origin, on every answer (SSE streams too,
    whose headers are sent before the handler returns)."""
    if isinstance(request, web.Request):
        response.headers.update(security.cors_headers(request, request.app[DOOR]))


@web.middleware
async def door_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The browser rules, then the keys (:mod:`llmpoold.http.security`); answers CORS
    preflights from allowed origins. A named key's tenant goes on the request."""
    door = request.app[DOOR]
    security.check_browser(request, door)
    preflight = security.preflight(request, door)
    if preflight is not None:
        return preflight
    tenant = security.authorize(request, door, request.app[TENANTS].ring)
    if tenant is not None:
        request[TENANT] = tenant
    return await handler(request)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus exposition; open on a loopback bind, else it takes a key (README)."""
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
    Raises SettingsError when a model's backend keys are invalid, a key variable is
    unset (keys are resolved here and on reload), or the usage store under
    ``engine.state_dir`` cannot be opened.
    """
    app = web.Application(middlewares=[errors_middleware, door_middleware],
                          client_max_size=settings.service.max_body_bytes)
    app[DOOR] = security.Door.from_settings(settings.service)
    app.on_response_prepare.append(cors_on_prepare)
    pool = Pool(settings, registry, replica_factory=replica_factory or ProcessReplicaFactory.from_settings(settings))
    app[POOL] = pool
    app[REGISTRY] = registry
    app[SETTINGS] = settings
    app[RELOAD] = ReloadState(paths=settings_paths, service=settings.service, workers=settings.engine.workers)
    app[STARTED_AT] = int(time.time())
    tenants = app[TENANTS] = Tenants(settings.service, state_dir=settings.engine.state_dir,
                                     usage=UsageBook(pool.metrics.registry))
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
        tenants.close()

    app.cleanup_ctx.append(lifecycle)
    return app
