"""The pool: configured models, their lifecycle, replicas and admin views.

States: ``unloaded, loading, loaded, unloading, failed``; only ``loaded`` serves.
Loads are all-or-nothing across replicas (``name#1..N``). Nothing is ever written
back to the settings files.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from llmpoold.backend import Backend
from llmpoold.config import AppSettings, ModelConfig, SettingsError, resolve_model_options
from llmpoold.entries import ACTIVE_STATES, ModelEntry, ModelState
from llmpoold.errors import ApiError, load_error_text, model_state_error, unknown_model
from llmpoold.fairness import fair_queue_factory
from llmpoold.gpu import primary_gpu_used_mib
from llmpoold.metrics import PoolMetrics
from llmpoold.model_settings import resolve_catalog
from llmpoold.plugins import PluginRegistry
from llmpoold.replicas import Replica
from llmpoold.replicas.bridge import run_blocking
from llmpoold.scheduler import FifoQueue, ModelScheduler, QueuePolicy
from llmpoold.types import MemoryEstimate, ModelTraits

log = structlog.get_logger("llmpoold.pool")

ReplicaFactory = Callable[..., Replica]
QueueFactory = Callable[[str, AppSettings], QueuePolicy]


def fifo_queue_factory(model: str, settings: AppSettings) -> QueuePolicy:
    return FifoQueue(model, max_pending=settings.engine.fairness.max_pending_per_executor)


class Pool:
    """Every configured model and what is loaded of it.

    ``replica_factory(registry=, backend=, replica_id=, model=, concurrency=, isolation=)``
    builds each replica; the app factory chooses it (inline or worker processes, see
    :mod:`llmpoold.replicas.factory`)."""

    def __init__(self, settings: AppSettings, registry: PluginRegistry, *, replica_factory: ReplicaFactory,
                 queue_factory: QueueFactory = fair_queue_factory) -> None:
        self.registry = registry
        # Skipped models removed, options resolved; one bad model is `failed`, never fatal.
        self.catalog = resolve_catalog(settings, registry)
        self.settings = self.catalog.settings
        for warning in self.catalog.warnings:
            log.warning("settings_warning", warning=warning)
        self.replica_factory = replica_factory
        self.queue_factory = queue_factory
        self.entries: dict[str, ModelEntry] = self._build_entries()
        self.startup_done = asyncio.Event()
        self.metrics = PoolMetrics(lambda: self.entries)  # per pool: apps in one process do not share a registry

    def _build_entries(self) -> dict[str, ModelEntry]:
        entries: dict[str, ModelEntry] = {}
        for name, item in self.catalog.models.items():
            entry = ModelEntry(config=item.config, backend=item.backend,
                               spec=self.registry.spec(item.backend) if item.backend else None)
            if item.error is not None:
                entry.state, entry.last_error = ModelState.FAILED, item.error
            entries[name] = entry
        return entries

    # ----- lookups -------------------------------------------------------------------

    def entry(self, name: str) -> ModelEntry:
        entry = self.entries.get(name)
        if entry is None:
            raise unknown_model(name)
        return entry

    def traits(self, entry: ModelEntry) -> ModelTraits:
        """The model's traits: cached while loaded, asked of the plugin otherwise."""
        if entry.traits is not None:
            return entry.traits
        if entry.backend is None:
            return Backend(self.registry, "").traits(entry.config.model_copy(update={"options": None}))
        return Backend(self.registry, entry.backend).traits(entry.current)

    def loaded_names(self) -> list[str]:
        return sorted(name for name, e in self.entries.items() if e.state == ModelState.LOADED)

    # ----- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Load every enabled model, one after another; failures leave it ``failed``."""
        try:
            for entry in list(self.entries.values()):
                if entry.config.enabled and entry.state == ModelState.UNLOADED:
                    try:
                        await self.load(entry.name)
                    except ApiError as exc:
                        log.error("startup_load_failed", model=entry.name, error=exc.message)
        finally:
            self.startup_done.set()

    async def load(self, name: str, fields: Mapping[str, Any] | None = None) -> ModelEntry:
        """Load a model (admin or startup). ``fields`` are the admin body's explicitly
        set keys. Returns the entry; raises ApiError (or the load override model's
        ValidationError, a 422)."""
        entry = self.entry(name)
        sent = {k: v for k, v in (fields or {}).items() if k != "replicas"}  # echoed as load_override
        fields = _typed_override(entry, dict(fields or {}))
        async with entry.lock:
            replicas_requested = fields.pop("replicas", None)
            if entry.state == ModelState.UNLOADING:
                raise model_state_error(name, entry.state)
            if entry.state in (ModelState.LOADED, ModelState.LOADING):
                if fields or replicas_requested is not None:
                    raise ApiError(400, "invalid_load_request",
                                   "replica count and load overrides can only be applied while the model is "
                                   "unloaded or failed; unload first", model=name)
                return entry
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
            entry.state, entry.last_error = ModelState.LOADING, None
            await self._load_replicas(entry, active, override, count)
            if entry.state == ModelState.FAILED:
                raise ApiError(500, "model_load_failed", entry.last_error, model=name)
            # The seed shows the override as sent, not as normalised ("Q8_0" stays); only a key
            # the check introduced (exllama_cache_quant from the bit pair) has its value.
            entry.load_override = {key: sent.get(key, value) for key, value in override.items()}
        return entry

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
        traits = entry.traits = Backend(self.registry, entry.backend).traits(active)
        isolation = active.isolation or ("inline" if entry.spec.remote else "process")
        replicas = [
            self.replica_factory(registry=self.registry, backend=entry.backend, replica_id=f"{entry.name}#{i}",
                                 model=active, concurrency=max(1, traits.concurrency), isolation=isolation)
            for i in range(1, count + 1)
        ]
        gpu_before = await run_blocking(primary_gpu_used_mib)
        results = await asyncio.gather(*(r.load() for r in replicas), return_exceptions=True)
        errors = [f"{r.replica_id}: {load_error_text(res)}" for r, res in zip(replicas, results, strict=True)
                  if isinstance(res, BaseException)]
        if errors:
            await asyncio.gather(*(r.unload() for r, res in zip(replicas, results, strict=True)
                                   if not isinstance(res, BaseException)), return_exceptions=True)
            entry.state, entry.last_error = ModelState.FAILED, "; ".join(errors)
            entry.active_config = entry.traits = None
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
        for replica in replicas:  # process replicas report crashes and restarts
            replica.add_listener(functools.partial(self._replica_event, entry))
        entry.load_override = override
        entry.estimate, entry.estimate_error = None, None  # re-estimate with the override applied
        entry.state = ModelState.LOADED
        # What the replicas really are: a plugin not installed as a distribution runs inline.
        log.info("model_loaded", model=entry.name, backend=entry.backend, replicas=count,
                 isolation=replicas[0].isolation)

    def _replica_event(self, entry: ModelEntry, replica: Replica, event: str) -> None:
        """A worker crashed, came back, or gave up (see llmpoold.replicas.process)."""
        if replica not in entry.replicas:
            return
        if event == "crashed":
            entry.last_error = f"{replica.replica_id}: {replica.last_error}"
        elif event == "restarted" and entry.scheduler is not None:
            entry.scheduler.replica_available()
        elif event == "gave_up":
            entry.last_error = f"{replica.replica_id}: {replica.last_error}; not restarted again (restart limit)"
            if all(r.gave_up for r in entry.replicas) and entry.state == ModelState.LOADED:
                # Nothing left to serve: fail the model and whoever was waiting for it.
                scheduler, entry.scheduler = entry.scheduler, None
                if scheduler is not None:
                    scheduler.accepting = False
                    for job in scheduler.queue.drain():
                        if job.future is not None and not job.future.done():
                            job.future.set_exception(ApiError(502, "replica_crashed", entry.last_error,
                                                              model=entry.name))
                entry.replicas, entry.active_config, entry.traits, entry.state = [], None, None, ModelState.FAILED
                log.error("model_failed", model=entry.name, error=entry.last_error)

    async def unload(self, name: str) -> ModelEntry:
        """Graceful unload: queued requests get 409 ``model_unloading``, running ones
        finish, then every replica is released. Returns the entry."""
        entry = self.entry(name)
        if entry.state == ModelState.LOADING:
            raise model_state_error(name, entry.state)
        if entry.state != ModelState.LOADED:
            return entry
        entry.state = ModelState.UNLOADING
        scheduler = entry.scheduler
        if scheduler is not None:
            scheduler.begin_shutdown()
            await scheduler.wait_idle()
        async with entry.lock:
            await asyncio.gather(*(r.unload() for r in entry.replicas), return_exceptions=True)
            entry.replicas, entry.scheduler, entry.active_config, entry.traits = [], None, None, None
            entry.state, entry.last_error, entry.load_override = ModelState.UNLOADED, None, {}
            entry.estimate, entry.estimate_error = None, None
        log.info("model_unloaded", model=name)
        return entry

    async def close(self) -> None:
        """Unload everything (daemon shutdown)."""
        await asyncio.gather(*(self.unload(name) for name, e in self.entries.items() if e.state == ModelState.LOADED),
                             return_exceptions=True)

    # ----- settings reload ---------------------------------------------------------

    def reload(self, new: AppSettings) -> dict[str, list[str]]:
        """Take ``new`` settings without loading or unloading anything (the seed's rules).

        A change that would alter an active model (or the decoding/fairness defaults
        while any model is active) is a 409 ``settings_reload_conflict`` and nothing
        changes; a new or changed model with no backend at all is a SettingsError (the
        seed's "backend cannot be empty"). Returns the added, removed, updated and
        unchanged model names."""
        fresh = Pool(new, self.registry, replica_factory=self.replica_factory, queue_factory=self.queue_factory)
        new = fresh.settings  # skipped models left out, as in self.settings
        old_models, new_models = self.settings.engine.models, new.engine.models
        active = {name for name, e in self.entries.items() if e.state in ACTIVE_STATES}
        conflicts = [f"engine.{block}" for block in ("decoding", "fairness")
                     if active and getattr(new.engine, block) != getattr(self.settings.engine, block)]
        added = sorted(set(new_models) - set(old_models))
        removed = sorted(set(old_models) - set(new_models))
        updated: list[str] = []
        unchanged: list[str] = []
        runtime_changed: set[str] = set()  # changed in more than `enabled`
        for name in sorted(set(old_models) & set(new_models)):
            same_backend = self.settings.resolved_backend(old_models[name]) == new.resolved_backend(new_models[name])
            old_cfg, new_cfg = _comparable(old_models[name]), _comparable(new_models[name])
            (unchanged if same_backend and old_cfg == new_cfg else updated).append(name)
            old_cfg.pop("enabled"), new_cfg.pop("enabled")
            if not same_backend or old_cfg != new_cfg:
                runtime_changed.add(name)
                if name in active:
                    conflicts.append(f"engine.models.{name}")
        conflicts += [f"engine.models.{name}" for name in removed if name in active]
        empty = [name for name in fresh.catalog.unresolved if name not in old_models or name in runtime_changed]
        if empty:
            raise SettingsError("; ".join(f"engine.models.{name}: backend cannot be empty (no backend and no "
                                          "engine.backend)" for name in empty))
        if conflicts:
            raise ApiError(409, "settings_reload_conflict", extra={"conflicts": sorted(set(conflicts))})
        entries: dict[str, ModelEntry] = {}
        for name, entry in fresh.entries.items():
            old = self.entries.get(name)
            if old is not None and name not in runtime_changed:
                # The seed keeps the same state object: a loaded model its runtime, a failed
                # one its last_error and observed VRAM; only `enabled` follows the file.
                old.config = old.config.model_copy(update={"enabled": new_models[name].enabled})
                entries[name] = old
            else:
                entries[name] = entry
        self.settings, self.entries, self.catalog = new, entries, fresh.catalog
        return {"added_models": added, "removed_models": removed, "updated_models": updated,
                "unchanged_models": unchanged}

    # ----- estimates -----------------------------------------------------------------

    async def memory_estimate(self, entry: ModelEntry) -> MemoryEstimate | None:
        """The plugin's estimate for one replica (cached until the config changes)."""
        if entry.estimate is None and entry.estimate_error is None and entry.backend and entry.current.options:
            try:
                entry.estimate = await run_blocking(Backend(self.registry, entry.backend).estimate, entry.current)
            except Exception as exc:  # noqa: BLE001 - an estimate is advisory
                entry.estimate_error = str(exc)
        return entry.estimate


def _typed_override(entry: ModelEntry, fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` with the backend's override keys checked against the plugin's
    ``load_override_model`` (types and schema bounds: a ValidationError, the seed's 422,
    before anything else); range rules are the plugin's ``llmpool_check_load_override``."""
    model = entry.spec.load_override_model if entry.spec is not None else None
    typed = {k: v for k, v in fields.items() if entry.spec is not None and k in entry.spec.load_override_keys
             and k != "target_inflight"}
    if model is None or not typed:
        return fields
    checked = model.model_validate(typed)
    return {**fields, **{k: getattr(checked, k) for k in typed}}


def _comparable(entry_config: ModelConfig) -> dict[str, Any]:
    return entry_config.model_dump(exclude={"options", "name"})
