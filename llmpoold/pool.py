"""The pool: configured models, their lifecycle, replicas and admin views.

States: ``unloaded, loading, loaded, unloading, failed``; only ``loaded`` serves.
Loads are all-or-nothing across replicas (``name#1..N``). Loads and unloads run as the
pool's own tasks (a caller that leaves does not stop them) and always settle in
``loaded``, ``failed`` or ``unloaded``. Each load first fits in the memory budget
(:mod:`llmpoold.memory`); on-demand loads and the idle reaper are in
:mod:`llmpoold.lifecycle`. Nothing is ever written back to the settings files.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import structlog

from llmpoold.backend import Backend
from llmpoold.config import AppSettings, ModelConfig, SettingsError
from llmpoold.entries import ModelEntry, ModelState
from llmpoold.errors import ApiError, describe, load_error_text, model_state_error, unknown_model
from llmpoold.fairness import fair_queue_factory
from llmpoold.gpu import primary_gpu_used_mib
from llmpoold.lifecycle import Lifecycle
from llmpoold.memory import MemoryBudget
from llmpoold.metrics import PoolMetrics
from llmpoold.model_settings import resolve_catalog
from llmpoold.overrides import apply_override, check_override, typed_override
from llmpoold.plugins import PluginRegistry
from llmpoold.reload import reload_pool
from llmpoold.replicas import Replica
from llmpoold.replicas.bridge import run_blocking
from llmpoold.scheduler import ABORT_GRACE_S, FifoQueue, ModelScheduler, QueuePolicy
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
        self._tasks: set[asyncio.Task[None]] = set()  # loads and unloads in progress
        self._retries: set[asyncio.Task[None]] = set()  # models retried after every replica gave up
        self.memory = MemoryBudget(self)
        self.memory_lock = asyncio.Lock()
        self.lifecycle = Lifecycle(self)
        self.metrics = PoolMetrics(lambda: self.entries)  # per pool: apps in one process do not share a registry
        self.metrics.lifecycle.watch(self.memory)

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

    def servable_names(self) -> list[str]:
        """Loaded models and on-demand ones that a request would load."""
        return sorted(name for name, e in self.entries.items() if e.state == ModelState.LOADED
                      or (self.lifecycle.on_demand(e) and e.state != ModelState.FAILED and e.backend is not None))

    # ----- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Load every enabled model, one after another. Any failure (a plugin raising
        anything at all) leaves that model ``failed`` and the next one still loads."""
        try:
            await self.memory.budgets()
            for entry in list(self.entries.values()):
                if entry.config.enabled and entry.state == ModelState.UNLOADED:
                    try:
                        await self.load(entry.name, reason="startup")
                    except ApiError as exc:
                        log.error("startup_load_failed", model=entry.name, error=exc.message)
                    except Exception:  # noqa: BLE001 - one model never stops the others
                        log.exception("startup_load_failed", model=entry.name)
        finally:
            self.startup_done.set()

    def _spawn(self, entry: ModelEntry, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run a load or unload as the pool's own task: the caller awaits it shielded,
        so a client that leaves (its handler cancelled) does not stop it halfway."""
        task = asyncio.create_task(coro, name=f"llmpool-lifecycle:{entry.name}")
        entry.transition = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def load(self, name: str, fields: Mapping[str, Any] | None = None, *, reason: str = "admin",
                   force: bool = False) -> ModelEntry:
        """Load a model (admin or startup). ``fields`` are the admin body's explicitly
        set keys; ``force`` loads even beyond the memory budget. Returns the entry; raises
        ApiError (or the load override model's ValidationError, a 422). The load itself
        is a pool task (:meth:`begin_load`): it ends the same whether or not the caller waits."""
        task = self.begin_load(name, fields, reason=reason, force=force)
        entry = self.entry(name)
        if task is not None:
            await asyncio.shield(task)
        return self._loaded_or_raise(entry)

    def begin_load(self, name: str, fields: Mapping[str, Any] | None = None, *, reason: str = "admin",
                   force: bool = False) -> asyncio.Task[None] | None:
        """Check the request and start the load task (or return the one in progress;
        None when already loaded). Raises ApiError for a request that cannot start.
        ``reason``: ``startup``, ``admin`` or ``on_demand`` (the loads metric's label)."""
        entry = self.entry(name)
        sent = {k: v for k, v in (fields or {}).items() if k != "replicas"}  # echoed as load_override
        fields = typed_override(entry, dict(fields or {}))
        replicas_requested = fields.pop("replicas", None)
        if entry.state == ModelState.UNLOADING:
            raise model_state_error(name, entry.state)
        if entry.state in (ModelState.LOADED, ModelState.LOADING):
            if fields or replicas_requested is not None:
                raise ApiError(400, "invalid_load_request",
                               "replica count and load overrides can only be applied while the model is "
                               "unloaded or failed; unload first", model=name)
            return entry.transition if entry.state == ModelState.LOADING else None
        if entry.backend is None or entry.spec is None or entry.config.options is None:
            # no plugin, or settings the plugin refused: loading says why
            raise ApiError(500, "model_load_failed", entry.last_error, model=name)
        override = check_override(self.registry, entry, fields)
        count = replicas_requested or entry.config.replicas
        if count > entry.config.replica_max:
            raise ApiError(400, "invalid_load_request",
                           f"replica count {count} exceeds replica_max {entry.config.replica_max} "
                           f"for model '{name}'", model=name)
        try:
            active = apply_override(entry, override)
        except (SettingsError, ValueError) as exc:
            raise ApiError(400, "invalid_load_request", str(exc), model=name) from None
        # Set before the first await: a settings reload now sees the model as active.
        entry.state, entry.last_error, entry.load_error = ModelState.LOADING, None, None
        entry.load_started_at = time.time()
        # The seed shows the override as sent, not as normalised ("Q8_0" stays); only a key
        # the check introduced (exllama_cache_quant from the bit pair) has its value.
        shown = {key: sent.get(key, value) for key, value in override.items()}
        return self._spawn(entry, self._run_load(entry, active, override, shown, count, reason, force))

    @staticmethod
    def _loaded_or_raise(entry: ModelEntry) -> ModelEntry:
        if entry.state == ModelState.UNLOADED and entry.load_error is not None:
            raise entry.load_error
        if entry.state == ModelState.FAILED:
            raise ApiError(500, "model_load_failed", entry.last_error, model=entry.name)
        return entry

    async def _run_load(self, entry: ModelEntry, active: ModelConfig, override: dict[str, Any],
                        shown: dict[str, Any], count: int, reason: str, force: bool) -> None:
        """The load task: every exit path leaves the model ``loaded``, ``failed``, or
        ``unloaded`` with ``load_error`` (it did not fit in memory)."""
        started = time.perf_counter()
        try:
            async with self.memory_lock:  # one load at a time: each counts on the memory it found
                try:
                    await self.memory.make_room(entry, count, force=force)
                except ApiError as exc:
                    entry.state, entry.last_error, entry.load_error, entry.held = (
                        ModelState.UNLOADED, exc.message, exc, None)
                    log.warning("model_load_refused", model=entry.name, error=exc.message)
                    return
                await self._load_replicas(entry, active, override, count)
                if entry.state == ModelState.LOADED:
                    entry.load_override = shown
                if entry.state == ModelState.LOADED:
                    await self.memory.observe(entry)
            if entry.state == ModelState.LOADED and self.entries.get(entry.name) is not entry:
                # Replaced meanwhile (cannot happen while reload treats `loading` as active;
                # kept so that no path ever leaves workers without an owner).
                await self._release(entry, ModelState.UNLOADED, None)
            elif entry.state == ModelState.LOADED:
                self.metrics.lifecycle.loaded(entry.name, reason, time.perf_counter() - started)
                entry.loaded_at = time.monotonic()
                self.lifecycle.touch(entry)
                self.lifecycle.start_reaper()
        except asyncio.CancelledError:
            self._fail(entry, "load cancelled: the daemon is shutting down")
            raise
        except Exception as exc:  # noqa: BLE001 - a plugin may raise anything
            log.exception("model_load_crashed", model=entry.name)
            self._fail(entry, describe(exc))
        finally:
            if entry.state == ModelState.LOADING:
                self._fail(entry, entry.last_error or "load did not complete")
            entry.load_started_at = None

    def _fail(self, entry: ModelEntry, error: str) -> None:
        entry.state, entry.last_error, entry.held = ModelState.FAILED, error, None
        entry.replicas, entry.scheduler, entry.active_config, entry.traits = [], None, None, None
        log.error("model_load_failed", model=entry.name, error=error)

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
        try:
            results = await asyncio.gather(*(r.load() for r in replicas), return_exceptions=True)
        except BaseException:  # cancelled (shutdown): give back whatever did load
            await asyncio.gather(*(r.unload() for r in replicas), return_exceptions=True)
            raise
        errors = [f"{r.replica_id}: {load_error_text(res)}" for r, res in zip(replicas, results, strict=True)
                  if isinstance(res, BaseException)]
        if errors:
            await asyncio.gather(*(r.unload() for r, res in zip(replicas, results, strict=True)
                                   if not isinstance(res, BaseException)), return_exceptions=True)
            self._fail(entry, "; ".join(errors))
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
                dropped = entry.replicas
                entry.replicas, entry.active_config, entry.traits, entry.state = [], None, None, ModelState.FAILED
                log.error("model_failed", model=entry.name, error=entry.last_error)
                task = asyncio.create_task(self._retry_gave_up(entry, dropped), name=f"llmpool-retry:{entry.name}")
                self._retries.add(task)
                task.add_done_callback(self._retries.discard)

    async def _retry_gave_up(self, entry: ModelEntry, dropped: list[Replica]) -> None:
        """Every replica gave up: end them (a process replica would otherwise retry on its
        own, with no owner), then load the model again every ``gave_up_retry_s`` for as
        long as it stays failed and nobody else touched it (same entry, same error)."""
        await asyncio.gather(*(r.unload() for r in dropped), return_exceptions=True)
        delay, error = self.settings.engine.workers.gave_up_retry_s, entry.last_error
        while delay > 0:
            await asyncio.sleep(delay)
            if self.entries.get(entry.name) is not entry or entry.state != ModelState.FAILED or \
                    entry.last_error != error:
                return
            log.info("model_retry_after_gave_up", model=entry.name)
            try:
                await self.load(entry.name, dict(entry.load_override))
                return
            except Exception:  # noqa: BLE001 - still failed (last_error says why): try again later
                error = entry.last_error

    async def unload(self, name: str, *, reason: str = "admin", drain_timeout_s: float | None = None) -> ModelEntry:
        """Graceful unload: queued requests get 409 ``model_unloading``, running ones
        finish within ``drain_timeout_s`` (default ``engine.unload_drain_timeout_s``;
        then they are stopped with 503 ``model_unloaded``), then every replica is
        released. A pool task that always ends ``unloaded``. Returns the entry.
        ``reason``: ``admin``, ``idle``, ``evicted`` or ``shutdown`` (the metric's label)."""
        entry = self.entry(name)
        if entry.state == ModelState.LOADING:
            raise model_state_error(name, entry.state)
        task = self.spawn_unload(name, reason=reason, drain_timeout_s=drain_timeout_s)
        if task is not None:
            await asyncio.shield(task)
        return entry

    def spawn_unload(self, name: str, *, reason: str,
                     drain_timeout_s: float | None = None) -> asyncio.Task[None] | None:
        """Start unloading a loaded model (or return the unload in progress)."""
        entry = self.entry(name)
        if entry.state == ModelState.UNLOADING:
            return entry.transition
        if entry.state != ModelState.LOADED:
            return None
        entry.state = ModelState.UNLOADING
        drain = drain_timeout_s if drain_timeout_s is not None else self.settings.engine.unload_drain_timeout_s
        setting = "engine.memory.drain_timeout_s" if reason == "evicted" else "engine.unload_drain_timeout_s"
        return self._spawn(entry, self._run_unload(entry, drain, reason, setting))

    async def _run_unload(self, entry: ModelEntry, drain_timeout_s: float, reason: str, setting: str) -> None:
        """The unload task: drain, stop what is left, release the replicas."""
        try:
            scheduler = entry.scheduler
            if scheduler is not None:
                scheduler.begin_shutdown()
                if not await scheduler.wait_idle(drain_timeout_s):
                    stopped = scheduler.abort_running(ApiError(
                        503, "model_unloaded", f"model '{entry.name}' was unloaded ({reason}) while this request "
                        f"ran: it was still running after the {drain_timeout_s:g} s drain time ({setting})",
                        model=entry.name))
                    log.warning("unload_drain_timeout", model=entry.name, stopped_requests=stopped,
                                drain_timeout_s=drain_timeout_s)
                    await scheduler.wait_idle(ABORT_GRACE_S + self.settings.engine.workers.unload_timeout_s)
        finally:
            await self._release(entry, ModelState.UNLOADED, None)
        self.metrics.lifecycle.unloaded(entry.name, reason)
        log.info("model_unloaded", model=entry.name, reason=reason)

    async def _release(self, entry: ModelEntry, state: ModelState, error: str | None) -> None:
        """Give back every replica (best effort) and leave ``state``, whatever happens."""
        replicas = entry.replicas
        entry.replicas, entry.scheduler, entry.active_config, entry.traits = [], None, None, None
        try:
            await asyncio.gather(*(r.unload() for r in replicas), return_exceptions=True)
        finally:
            entry.state, entry.last_error, entry.load_override = state, error, {}
            entry.held, entry.loaded_at = None, None
            entry.estimate, entry.estimate_error = None, None

    async def close(self) -> None:
        """Stop loads in progress, wait for unloads, unload everything (daemon shutdown)."""
        for task in list(self._retries):
            task.cancel()
        for task in list(self._tasks):
            if task.get_name().startswith("llmpool-lifecycle:") and not task.done():
                entry = self.entries.get(task.get_name().split(":", 1)[1])
                if entry is not None and entry.state == ModelState.LOADING:
                    task.cancel()
        await self.lifecycle.stop()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(self.unload(name, reason="shutdown") for name, e in self.entries.items()
                               if e.state == ModelState.LOADED), return_exceptions=True)

    # ----- settings reload ---------------------------------------------------------

    def reload(self, new: AppSettings) -> dict[str, list[str]]:
        """Take ``new`` settings without loading or unloading anything (the seed's rules,
        see :func:`llmpoold.reload.reload_pool`). Returns the report."""
        return reload_pool(self, new)

    # ----- estimates -----------------------------------------------------------------

    async def memory_estimate(self, entry: ModelEntry) -> MemoryEstimate | None:
        """The plugin's estimate for one replica (cached until the config changes)."""
        if entry.estimate is None and entry.estimate_error is None and entry.backend and entry.current.options:
            try:
                entry.estimate = await run_blocking(Backend(self.registry, entry.backend).estimate, entry.current)
            except Exception as exc:  # noqa: BLE001 - an estimate is advisory
                entry.estimate_error = str(exc)
        return entry.estimate
