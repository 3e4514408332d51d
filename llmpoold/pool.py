"""The pool: configured models, their lifecycle, replicas and admin views.

States: ``unloaded, loading, loaded, unloading, failed``; only ``loaded`` serves.
Loads are all-or-nothing across replicas (``name#1..N``). Nothing is ever written
back to the settings files.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from llmpoold.bridge import run_blocking
from llmpoold.config import AppSettings, ModelConfig, SettingsError, resolve_model_options
from llmpoold.errors import ApiError, unknown_model
from llmpoold.fairness import fair_queue_factory
from llmpoold.gpu import primary_gpu_used_mib
from llmpoold.hookspecs import BackendSpec
from llmpoold.metrics import PoolMetrics
from llmpoold.model_settings import resolve_catalog
from llmpoold.plugins import PluginRegistry
from llmpoold.process_replica import ProcessReplicaFactory
from llmpoold.replica import InlineReplica, Replica
from llmpoold.scheduler import FifoQueue, ModelScheduler, QueuePolicy
from llmpoold.types import Capabilities, MemoryEstimate, ModelTraits

log = structlog.get_logger("llmpoold.pool")

ReplicaFactory = Callable[..., Replica]
QueueFactory = Callable[[str, AppSettings], QueuePolicy]


def inline_replica_factory(*, registry: PluginRegistry, backend: str, replica_id: str, model: ModelConfig,
                           concurrency: int, isolation: str) -> Replica:
    return InlineReplica(registry, backend, replica_id, model, concurrency)


def fifo_queue_factory(model: str, settings: AppSettings) -> QueuePolicy:
    return FifoQueue(model, max_pending=settings.engine.fairness.max_pending_per_executor)


@dataclass(eq=False)
class ModelEntry:
    """Live state of one configured model."""

    config: ModelConfig
    backend: str | None
    spec: BackendSpec | None
    state: str = "unloaded"
    last_error: str | None = None
    scheduler: ModelScheduler | None = None
    replicas: list[Replica] = field(default_factory=list)
    inflight_requests: int = 0
    load_override: dict[str, Any] = field(default_factory=dict)
    active_config: ModelConfig | None = None
    observed_vram_mib: int | None = None
    observed_vram_replicas: int | None = None
    estimate: MemoryEstimate | None = None
    estimate_error: str | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def current(self) -> ModelConfig:
        """The config in force: the loaded one (with override) or the configured one."""
        return self.active_config or self.config


class Pool:
    """Every configured model and what is loaded of it."""

    def __init__(self, settings: AppSettings, registry: PluginRegistry, *,
                 replica_factory: ReplicaFactory | None = None,
                 queue_factory: QueueFactory = fair_queue_factory) -> None:
        self.registry = registry
        # Skipped models removed, options resolved; one bad model is `failed`, never fatal.
        self.catalog = resolve_catalog(settings, registry)
        self.settings = self.catalog.settings
        for warning in self.catalog.warnings:
            log.warning("settings_warning", warning=warning)
        # Default: inline or a worker process per model ``isolation`` (llmpoold.process_replica).
        self.replica_factory = replica_factory or ProcessReplicaFactory(settings.engine.workers)
        self.queue_factory = queue_factory
        self.entries: dict[str, ModelEntry] = self._build_entries(settings)
        self.startup_done = asyncio.Event()
        self.metrics = PoolMetrics(self)  # per pool: apps in one process do not share a registry

    def _build_entries(self, settings: AppSettings) -> dict[str, ModelEntry]:
        entries: dict[str, ModelEntry] = {}
        for name, item in self.catalog.models.items():
            entry = ModelEntry(config=item.config, backend=item.backend,
                               spec=self.registry.spec(item.backend) if item.backend else None)
            if item.error is not None:
                entry.state, entry.last_error = "failed", item.error
            entries[name] = entry
        return entries

    # ----- lookups -------------------------------------------------------------------

    def entry(self, name: str) -> ModelEntry:
        entry = self.entries.get(name)
        if entry is None:
            raise unknown_model(name)
        return entry

    def traits(self, entry: ModelEntry) -> ModelTraits:
        if entry.backend is None or entry.current.options is None:
            return ModelTraits(capabilities=Capabilities(modalities=entry.config.modalities))
        traits = self.registry.hook.llmpool_model_traits(backend=entry.backend, model=entry.current)
        return traits or ModelTraits(capabilities=Capabilities(modalities=entry.config.modalities))

    def loaded_names(self) -> list[str]:
        return sorted(name for name, e in self.entries.items() if e.state == "loaded")

    # ----- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Load every enabled model, one after another; failures leave it ``failed``."""
        try:
            for entry in list(self.entries.values()):
                if entry.config.enabled and entry.state == "unloaded":
                    try:
                        await self.load(entry.name)
                    except ApiError as exc:
                        log.error("startup_load_failed", model=entry.name, error=exc.message)
        finally:
            self.startup_done.set()

    async def load(self, name: str, fields: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Load a model (admin or startup). ``fields`` are the admin body's explicitly
        set keys. Returns the admin entry; raises ApiError."""
        fields = dict(fields or {})
        entry = self.entry(name)
        async with entry.lock:
            replicas_requested = fields.pop("replicas", None)
            if entry.state == "unloading":
                raise ApiError(409, "model_unloading", model=name)
            if entry.state in ("loaded", "loading"):
                if fields or replicas_requested is not None:
                    raise ApiError(400, "invalid_load_request",
                                   "replica count and load overrides can only be applied while the model is "
                                   "unloaded or failed; unload first", model=name)
                return await self.admin_entry(name)
            if entry.backend is None or entry.spec is None or entry.config.options is None:
                # no plugin, or settings the plugin refused: loading says why
                raise ApiError(500, "model_load_failed", entry.last_error, model=name)
            override = self._check_override(entry, fields)
            count = replicas_requested or entry.config.replicas
            if count > entry.config.replica_max:
                raise ApiError(400, "invalid_load_request",
                               f"replica count {count} exceeds replica_max {entry.config.replica_max} "
                               f"for model '{name}'", model=name)
            try:
                active = self._apply_override(entry, override)
            except (SettingsError, ValueError) as exc:
                raise ApiError(400, "invalid_load_request", str(exc), model=name) from None
            entry.state, entry.last_error = "loading", None
            await self._load_replicas(entry, active, override, count)
            if entry.state == "failed":
                raise ApiError(500, "model_load_failed", entry.last_error, model=name)
        return await self.admin_entry(name)

    def _check_override(self, entry: ModelEntry, fields: dict[str, Any]) -> dict[str, Any]:
        if not fields:
            return {}
        assert entry.spec is not None and entry.backend is not None
        allowed = set(entry.spec.load_override_keys)
        if not allowed:
            raise ApiError(400, "invalid_load_request",
                           f"load overrides are not supported for backend: '{entry.backend}'", model=entry.name)
        unknown = sorted(set(fields) - allowed)
        if unknown:
            raise ApiError(400, "invalid_load_request",
                           f"unsupported load override for {entry.backend} backend: {', '.join(unknown)}",
                           model=entry.name)
        override = dict(fields)
        if "target_inflight" in override:
            value = override["target_inflight"]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ApiError(400, "invalid_load_request", "target_inflight load override must be a positive integer",
                               model=entry.name)
        backend_part = {k: v for k, v in override.items() if k != "target_inflight"}
        if backend_part:
            try:
                checked = self.registry.hook.llmpool_check_load_override(backend=entry.backend, override=backend_part)
            except ValueError as exc:
                raise ApiError(400, "invalid_load_request", str(exc), model=entry.name) from None
            if checked is not None:
                override = {**({"target_inflight": override["target_inflight"]} if "target_inflight" in override
                               else {}), **checked}
        return override

    def _apply_override(self, entry: ModelEntry, override: dict[str, Any]) -> ModelConfig:
        assert entry.spec is not None and entry.backend is not None
        base = entry.config.model_copy(update={"enabled": True})
        if "target_inflight" in override:
            base = base.model_copy(update={"target_inflight": override["target_inflight"]})
        backend_part = {k: v for k, v in override.items() if k != "target_inflight"}
        return resolve_model_options(base, entry.spec.options_model, backend=entry.backend,
                                     requires_model_path=entry.spec.requires_model_path, override=backend_part)

    async def _load_replicas(self, entry: ModelEntry, active: ModelConfig, override: dict[str, Any],
                             count: int) -> None:
        assert entry.backend is not None and entry.spec is not None
        entry.active_config = active
        traits = self.traits(entry)
        isolation = active.isolation or ("inline" if entry.spec.remote else "process")
        replicas = [
            self.replica_factory(registry=self.registry, backend=entry.backend, replica_id=f"{entry.name}#{i}",
                                 model=active, concurrency=max(1, traits.concurrency), isolation=isolation)
            for i in range(1, count + 1)
        ]
        gpu_before = await run_blocking(primary_gpu_used_mib)
        results = await asyncio.gather(*(r.load() for r in replicas), return_exceptions=True)
        errors = [f"{r.replica_id}: {res or type(res).__name__}" for r, res in zip(replicas, results, strict=True)
                  if isinstance(res, BaseException)]
        if errors:
            await asyncio.gather(*(r.unload() for r, res in zip(replicas, results, strict=True)
                                   if not isinstance(res, BaseException)), return_exceptions=True)
            entry.state, entry.last_error, entry.active_config = "failed", "; ".join(errors), None
            log.error("model_load_failed", model=entry.name, error=entry.last_error)
            return
        gpu_after = await run_blocking(primary_gpu_used_mib)
        if gpu_before is not None and gpu_after is not None and gpu_after - gpu_before > 0:
            entry.observed_vram_mib, entry.observed_vram_replicas = gpu_after - gpu_before, count
        entry.replicas = replicas
        # A batching runtime is fed its declared concurrency unless target_inflight is
        # configured (or overridden) explicitly; the seed's default of 1 would idle it.
        explicit = "target_inflight" in entry.config.model_fields_set or "target_inflight" in override
        target = active.target_inflight if explicit else max(1, traits.concurrency)
        entry.scheduler = ModelScheduler(entry.name, replicas, target_inflight=target,
                                         queue=self.queue_factory(entry.name, self.settings))
        for replica in replicas:
            add_listener = getattr(replica, "add_listener", None)
            if add_listener is not None:  # process replicas report crashes and restarts
                add_listener(lambda r, event, entry=entry: self._replica_event(entry, r, event))
        entry.load_override = override
        entry.estimate, entry.estimate_error = None, None  # re-estimate with the override applied
        entry.state = "loaded"
        # What the replicas really are: a plugin not installed as a distribution runs inline.
        log.info("model_loaded", model=entry.name, backend=entry.backend, replicas=count,
                 isolation=replicas[0].isolation)

    def _replica_event(self, entry: ModelEntry, replica: Any, event: str) -> None:
        """A worker crashed, came back, or gave up (see llmpoold.process_replica)."""
        if replica not in entry.replicas:
            return
        if event == "crashed":
            entry.last_error = f"{replica.replica_id}: {replica.last_error}"
        elif event == "restarted" and entry.scheduler is not None:
            entry.scheduler.replica_available()
        elif event == "gave_up":
            entry.last_error = f"{replica.replica_id}: {replica.last_error}; not restarted again (restart limit)"
            if all(getattr(r, "gave_up", False) for r in entry.replicas) and entry.state == "loaded":
                # Nothing left to serve: fail the model and whoever was waiting for it.
                scheduler, entry.scheduler = entry.scheduler, None
                if scheduler is not None:
                    scheduler.accepting = False
                    for job in scheduler.queue.drain():
                        if job.future is not None and not job.future.done():
                            job.future.set_exception(ApiError(502, "replica_crashed", entry.last_error,
                                                              model=entry.name))
                entry.replicas, entry.active_config, entry.state = [], None, "failed"
                log.error("model_failed", model=entry.name, error=entry.last_error)

    async def unload(self, name: str) -> dict[str, Any]:
        """Graceful unload: queued requests get 409 ``model_unloading``, running ones
        finish, then every replica is released."""
        entry = self.entry(name)
        if entry.state == "loading":
            raise ApiError(409, "model_loading", model=name)
        if entry.state != "loaded":
            return await self.admin_entry(name)
        entry.state = "unloading"
        scheduler = entry.scheduler
        if scheduler is not None:
            scheduler.begin_shutdown()
            await scheduler.wait_idle()
        async with entry.lock:
            await asyncio.gather(*(r.unload() for r in entry.replicas), return_exceptions=True)
            entry.replicas, entry.scheduler, entry.active_config = [], None, None
            entry.state, entry.last_error, entry.load_override = "unloaded", None, {}
            entry.estimate, entry.estimate_error = None, None
        log.info("model_unloaded", model=name)
        return await self.admin_entry(name)

    async def close(self) -> None:
        """Unload everything (daemon shutdown)."""
        await asyncio.gather(*(self.unload(name) for name, e in self.entries.items() if e.state == "loaded"),
                             return_exceptions=True)

    # ----- admin views ---------------------------------------------------------------

    async def memory_estimate(self, entry: ModelEntry) -> MemoryEstimate | None:
        if entry.estimate is None and entry.estimate_error is None and entry.backend and entry.current.options:
            try:
                entry.estimate = await run_blocking(lambda: self.registry.hook.llmpool_estimate_memory(
                    backend=entry.backend, model=entry.current))
            except Exception as exc:  # noqa: BLE001 - an estimate is advisory
                entry.estimate_error = str(exc)
        return entry.estimate

    async def vram_fields(self, entry: ModelEntry) -> dict[str, Any]:
        if entry.observed_vram_mib is not None:
            return {"vram_estimate_mib": entry.observed_vram_mib,
                    "vram_estimate_replica_count": entry.observed_vram_replicas,
                    "vram_estimate_source": "observed_load_delta"}
        estimate = await self.memory_estimate(entry)
        if estimate is not None:
            return {"vram_estimate_mib": round(estimate.total_mib), "vram_estimate_replica_count": 1,
                    "vram_estimate_source": estimate.source}
        path = entry.config.model_path
        if path and os.path.exists(path):
            size = await run_blocking(_artifact_size, path)
            if size:
                return {"vram_estimate_mib": max(1, size // 2**20), "vram_estimate_replica_count": 1,
                        "vram_estimate_source": "model_artifact_size"}
        return {"vram_estimate_mib": None, "vram_estimate_replica_count": None, "vram_estimate_source": "unavailable"}

    async def admin_entry(self, name: str) -> dict[str, Any]:
        entry = self.entry(name)
        scheduler = entry.scheduler
        loaded = entry.state == "loaded"
        spec = entry.spec
        estimate = await self.memory_estimate(entry)
        return {
            "name": name,
            "resolved_backend": entry.backend or self.settings.resolved_backend(entry.config),
            "configured_enabled": entry.config.enabled,
            "runtime_state": entry.state,
            "is_loaded": loaded,
            "replicas": len(entry.replicas) if loaded else entry.config.replicas,
            "replica_max": entry.config.replica_max,
            "loaded_replicas": len(entry.replicas),
            "inflight_requests": entry.inflight_requests,
            "queue_depth": scheduler.queue_depth if scheduler else 0,
            "runtime_inflight": scheduler.runtime_inflight if scheduler else 0,
            "configured_target_inflight": entry.current.target_inflight,
            "effective_target_inflight": scheduler.effective_target_inflight if scheduler else 1,
            "fairness": scheduler.snapshot() if scheduler else
            {"rejected_per_key_limit": 0, "rejected_executor_limit": 0, "keys": []},
            "last_error": entry.last_error,
            **(await self.vram_fields(entry)),
            "memory_estimate": None if estimate is None else {
                "total_mib": round(estimate.total_mib, 1), "device": estimate.device,
                "weights_mib": estimate.weights_mib, "cache_mib": estimate.cache_mib,
                "source": estimate.source, "details": dict(estimate.details)},
            "load_constraints": dict(spec.load_constraints) if spec else {},
            "load_recommendations": dict(spec.load_recommendations) if spec else {},
            "load_override": dict(entry.load_override),
            "capabilities": self.traits(entry).capabilities.to_json(),
            "definition": entry.config.definition(),
            "replica_info": [r.info() for r in entry.replicas],
        }

    async def admin_models(self) -> list[dict[str, Any]]:
        return [await self.admin_entry(name) for name in self.entries]


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
