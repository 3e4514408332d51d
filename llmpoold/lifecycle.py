"""Models on demand and idle unloading (issue 14).

*On demand* (``on_demand``, default ``engine.on_demand``): a request for an unloaded
model starts its load (one load for any number of requests) and waits for it, then
for a slot in the model's queue, all within its ``queue_timeout_s``. A load that fails
answers every waiting request with the failure (500 ``model_load_failed`` and the
reason, or 503 ``insufficient_memory``); a failed model stays ``failed`` until an admin
load or a settings reload.

*Idle TTL* (``idle_ttl_s``, default ``engine.idle_ttl_s``): a loaded model with nothing
queued or running is unloaded ``idle_ttl_s`` after its last request ended (or after its
load, if none came). ``pinned`` models are never unloaded automatically.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

import structlog

from llmpoold.entries import ModelEntry, ModelState
from llmpoold.errors import ApiError

if TYPE_CHECKING:
    from llmpoold.pool import Pool

log = structlog.get_logger("llmpoold.lifecycle")

REAPER_INTERVAL_S = 0.25


class Lifecycle:
    """On-demand loads and the idle reaper of one pool."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self._reaper: asyncio.Task[None] | None = None

    def on_demand(self, entry: ModelEntry) -> bool:
        value = entry.config.on_demand
        return self.pool.settings.engine.on_demand if value is None else value

    def idle_ttl_s(self, entry: ModelEntry) -> float | None:
        if entry.config.pinned:
            return None
        value = entry.config.idle_ttl_s
        return self.pool.settings.engine.idle_ttl_s if value is None else value

    def idle_unload_at(self, entry: ModelEntry) -> float | None:
        """Wall-clock time the reaper will unload ``entry``, or None (pinned, no TTL,
        not loaded, or requests queued/running)."""
        ttl = self.idle_ttl_s(entry)
        if ttl is None or entry.state != ModelState.LOADED or entry.inflight_requests or entry.last_used_at is None:
            return None
        return entry.last_used_at + ttl

    def touch(self, entry: ModelEntry) -> None:
        """A request ended (or the model was loaded): the idle clock starts now."""
        entry.last_used_at = time.time()

    # ----- on demand -----------------------------------------------------------------

    async def ensure_loaded(self, name: str, timeout_s: float | None) -> float:
        """For an on-demand model that is not loaded: start (or join) its load and wait
        for it. Returns the seconds waited; raises ApiError (the load's failure, or 503
        ``queue_timeout`` when ``timeout_s`` passes first: the load goes on)."""
        entry = self.pool.entries.get(name)
        if entry is None or entry.state == ModelState.LOADED or not self.on_demand(entry):
            return 0.0
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        while entry.state != ModelState.LOADED:
            if entry.state == ModelState.FAILED:
                raise ApiError(500, "model_load_failed", entry.last_error, model=name)
            if entry.state == ModelState.UNLOADED:
                task = self.pool.begin_load(name, reason="on_demand")
            else:  # loading, or unloading (idle reaper, eviction): wait for it, then load
                task = entry.transition
            if task is None:
                raise ApiError(409, "model_not_loaded", model=name)
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            try:
                await asyncio.wait_for(asyncio.shield(task), remaining)
            except TimeoutError:
                raise ApiError(503, "queue_timeout",
                               f"request waited longer than {timeout_s:g}s for model '{name}' to load",
                               model=name, headers={"Retry-After": "1"}) from None
            if entry.state == ModelState.UNLOADED and entry.load_error is not None:
                raise entry.load_error
            if entry.state == ModelState.FAILED:
                raise ApiError(500, "model_load_failed", entry.last_error, model=name)
            if self.pool.entries.get(name) is not entry:  # settings reload replaced it
                return await self.ensure_loaded(name, None if deadline is None else deadline - loop.time())
        return time.perf_counter() - started

    # ----- idle reaper ---------------------------------------------------------------

    def start_reaper(self) -> None:
        """Start the idle reaper once (on the first load)."""
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._reap(), name="llmpool-idle-reaper")

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(REAPER_INTERVAL_S)
            now = time.time()
            for entry in list(self.pool.entries.values()):
                due = self.idle_unload_at(entry)
                if due is not None and now >= due and not (entry.scheduler and entry.scheduler.queue_depth):
                    log.info("model_idle_unload", model=entry.name, idle_s=round(now - (entry.last_used_at or now), 1))
                    # Its own task: the reaper goes on while this one drains.
                    self.pool.spawn_unload(entry.name, reason="idle")
