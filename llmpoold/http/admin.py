"""``/v1/admin/*``: model lifecycle, plugins, GPU memory, settings reload; and the
admin rendering of a model entry."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

import structlog
from aiohttp import web

from llmpoold.config import SettingsError, load_settings
from llmpoold.entries import ModelEntry, ModelState
from llmpoold.errors import ApiError, describe
from llmpoold.gpu import gpu_memory
from llmpoold.http.keys import POOL, REGISTRY, RELOAD, TENANTS
from llmpoold.http.respond import parse_body, read_json
from llmpoold.memory import HOLDING
from llmpoold.pool import Pool
from llmpoold.replicas.bridge import run_blocking
from llmpoold.schemas import AdminLoadRequest
from llmpoold.types import Capabilities

log = structlog.get_logger("llmpoold.admin")


def configured_target(entry: ModelEntry) -> int | None:
    """``configured_target_inflight``: the load override's or the settings' value; None
    when neither sets it (the scheduler then feeds the runtime its own concurrency)."""
    if "target_inflight" in entry.load_override:
        return int(entry.load_override["target_inflight"])
    return entry.config.target_inflight if "target_inflight" in entry.config.model_fields_set else None


async def vram_fields(pool: Pool, entry: ModelEntry) -> dict[str, Any]:
    """The seed's estimate and its source enum (``observed_load_delta``,
    ``model_artifact_size``, ``unavailable``); the plugin's own estimate is
    ``memory_estimate``."""
    if entry.observed_vram_mib is not None:
        return {"vram_estimate_mib": entry.observed_vram_mib,
                "vram_estimate_replica_count": entry.observed_vram_replicas,
                "vram_estimate_source": "observed_load_delta"}
    path = entry.config.model_path
    if path and os.path.exists(path):
        size = await run_blocking(_artifact_size, path)
        if size:
            return {"vram_estimate_mib": max(1, size // 2**20), "vram_estimate_replica_count": 1,
                    "vram_estimate_source": "model_artifact_size"}
    return {"vram_estimate_mib": None, "vram_estimate_replica_count": None, "vram_estimate_source": "unavailable"}


async def admin_entry(pool: Pool, entry: ModelEntry) -> dict[str, Any]:
    """One model as ``GET /v1/admin/models`` lists it (the seed's fields)."""
    name = entry.name
    scheduler = entry.scheduler
    loaded = entry.state == ModelState.LOADED
    spec = entry.spec
    estimate = await pool.memory_estimate(entry)
    try:
        capabilities = pool.traits(entry).capabilities.to_json()
    except Exception as exc:  # noqa: BLE001 - a plugin's traits hook failing is shown, not a 500
        log.warning("model_traits_failed", model=name, error=describe(exc))
        capabilities = Capabilities().to_json()
    return {
        "name": name,
        "resolved_backend": entry.backend or pool.settings.resolved_backend(entry.config),
        "configured_enabled": entry.config.enabled,
        "runtime_state": entry.state,
        "is_loaded": loaded,
        "replicas": len(entry.replicas) if loaded else entry.config.replicas,
        "replica_max": entry.config.replica_max,
        "loaded_replicas": len(entry.replicas),
        "inflight_requests": entry.inflight_requests,
        "queue_depth": scheduler.queue_depth if scheduler else 0,
        "runtime_inflight": scheduler.runtime_inflight if scheduler else 0,
        "configured_target_inflight": configured_target(entry),
        "effective_target_inflight": scheduler.effective_target_inflight if scheduler else 1,
        "fairness": scheduler.snapshot() if scheduler else
        {"rejected_per_key_limit": 0, "rejected_executor_limit": 0, "keys": []},
        "last_error": entry.last_error,
        **(await vram_fields(pool, entry)),
        "memory_estimate": None if estimate is None else {
            "total_mib": round(estimate.total_mib, 1), "device": estimate.device,
            "weights_mib": estimate.weights_mib, "cache_mib": estimate.cache_mib,
            "source": estimate.source, "details": dict(estimate.details)},
        "load_constraints": dict(spec.load_constraints) if spec else {},
        "load_recommendations": dict(spec.load_recommendations) if spec else {},
        "load_override": dict(entry.load_override),
        "capabilities": capabilities,
        "definition": entry.config.definition(),
        "replica_info": [r.info() for r in entry.replicas],
        **lifecycle_fields(pool, entry),
    }


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


def lifecycle_fields(pool: Pool, entry: ModelEntry) -> dict[str, Any]:
    """On demand, idle TTL and memory (issue 14); times are ISO 8601 UTC."""
    lifecycle = pool.lifecycle
    return {"on_demand": lifecycle.on_demand(entry), "pinned": entry.config.pinned,
            "idle_ttl_s": lifecycle.idle_ttl_s(entry), "loading_since": _iso(entry.load_started_at),
            "last_used_at": _iso(entry.last_used_at), "idle_unload_at": _iso(lifecycle.idle_unload_at(entry)),
            "memory_held": entry.held.to_json() if entry.held and entry.state in HOLDING else None}


def _artifact_size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for root, _dirs, files in os.walk(path):
        for fname in files:
            try:
                total += os.path.getsize(os.path.join(root, fname))
            except OSError:
                pass
    return total


# ----- views ----------------------------------------------------------------------------


async def safe_admin_entry(pool: Pool, entry: ModelEntry) -> dict[str, Any]:
    """:func:`admin_entry`, or the fields that need no plugin when rendering fails:
    one model never makes the listing fail for everyone."""
    try:
        return await admin_entry(pool, entry)
    except Exception as exc:  # noqa: BLE001
        log.exception("admin_entry_failed", model=entry.name)
        return {"name": entry.name, "resolved_backend": entry.backend, "configured_enabled": entry.config.enabled,
                "runtime_state": entry.state, "is_loaded": entry.state == ModelState.LOADED,
                "replicas": len(entry.replicas) or entry.config.replicas, "replica_max": entry.config.replica_max,
                "loaded_replicas": len(entry.replicas), "inflight_requests": entry.inflight_requests,
                "queue_depth": 0, "runtime_inflight": 0, "configured_target_inflight": entry.config.target_inflight,
                "effective_target_inflight": 1,
                "fairness": {"rejected_per_key_limit": 0, "rejected_executor_limit": 0, "keys": []},
                "last_error": entry.last_error or f"admin view failed: {describe(exc)}",
                "vram_estimate_mib": None, "vram_estimate_replica_count": None,
                "vram_estimate_source": "unavailable", "memory_estimate": None, "load_constraints": {},
                "load_recommendations": {}, "load_override": dict(entry.load_override), "capabilities": {},
                "definition": {}, "replica_info": [], **lifecycle_fields(pool, entry)}


async def admin_models(request: web.Request) -> web.Response:
    pool = request.app[POOL]
    return web.json_response({"models": [await safe_admin_entry(pool, entry) for entry in list(pool.entries.values())]})


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
    force = request.query.get("force", "").lower() in {"1", "true", "yes"}
    if isinstance(data, dict) and "force" in data:  # not a load override: beyond the memory budget
        data = dict(data)
        value = data.pop("force")
        if not isinstance(value, bool):
            raise ApiError(400, "invalid_load_request", "force must be true or false", model=name)
        force = force or value
    if data is not None:
        parsed = parse_body(AdminLoadRequest, data)
        fields = {key: getattr(parsed, key) for key in parsed.model_fields_set}
        fields.update(parsed.model_extra or {})
    pool = request.app[POOL]
    return web.json_response(await admin_entry(pool, await pool.load(name, fields, force=force)))


async def admin_unload(request: web.Request) -> web.Response:
    pool = request.app[POOL]
    return web.json_response(await admin_entry(pool, await pool.unload(request.match_info["model_name"])))


async def admin_gpu_memory(request: web.Request) -> web.Response:
    pool = request.app[POOL]
    gpus, error = await run_blocking(gpu_memory)
    models = []
    for entry in list(pool.entries.values()):
        scheduler = entry.scheduler
        models.append({"name": entry.name, "runtime_state": entry.state, "is_loaded": entry.state == ModelState.LOADED,
                       "configured_target_inflight": configured_target(entry),
                       "effective_target_inflight": scheduler.effective_target_inflight if scheduler else 1,
                       **(await vram_fields(pool, entry)),
                       "replica_info": [r.info() for r in entry.replicas]})
    return web.json_response({"gpus": gpus, "models": models, "error": error})


async def admin_memory(request: web.Request) -> web.Response:
    """Budgets, what each model holds, and estimate vs observed (see llmpoold.memory)."""
    return web.json_response(await request.app[POOL].memory.snapshot())


_LIVE_KEYS = {"api_keys", "api_key_envs", "admin_api_key", "admin_api_key_env"}


async def admin_reload(request: web.Request) -> web.Response:
    """Re-read the settings files, atomically (see :meth:`Pool.reload`): an invalid file
    is a 400 and nothing changes. The keys take effect at once (a removed key is refused
    from its next request); the rest of the service block and the worker policy are read
    only at start: reported as ``service_restart_required`` until the restart."""
    state = request.app[RELOAD]
    tenants = request.app[TENANTS]
    try:
        new = load_settings(*state.paths)
        keys = tenants.prepare(new.service)  # resolved first: an unset key variable changes nothing
        report: dict[str, Any] = request.app[POOL].reload(new)
    except (SettingsError, OSError) as exc:
        raise ApiError(400, "invalid_settings", str(exc)) from None
    tenants.install(keys)
    changed = new.service.model_dump(exclude=_LIVE_KEYS) != state.service.model_dump(exclude=_LIVE_KEYS)
    state.restart_required = state.restart_required or changed or new.engine.workers != state.workers
    return web.json_response({**report, "service_restart_required": state.restart_required})


async def admin_usage(request: web.Request) -> web.Response:
    """Each named API key's usage since start and its remote spend this month."""
    return web.json_response(request.app[TENANTS].report())


def setup(app: web.Application) -> None:
    app.router.add_get("/v1/admin/models", admin_models)
    app.router.add_get("/v1/admin/plugins", admin_plugins)
    app.router.add_post("/v1/admin/models/{model_name}/load", admin_load)
    app.router.add_post("/v1/admin/models/{model_name}/unload", admin_unload)
    app.router.add_post("/v1/admin/settings/reload", admin_reload)
    app.router.add_get("/v1/admin/gpu-memory", admin_gpu_memory)
    app.router.add_get("/v1/admin/usage", admin_usage)
    app.router.add_get("/v1/admin/memory", admin_memory)
