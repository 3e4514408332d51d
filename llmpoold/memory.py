"""The memory budget loads must fit in, and eviction to make them fit (issue 14).

Devices are ``ram`` and ``gpu<N>`` (an NVML index). Each has a budget in MiB
(:class:`~llmpoold.config.MemorySettings`). A model *holds* memory from the moment its
load starts until its unload ends; what it holds is its :class:`Cost`: the footprint
observed at its last load when known (worker RSS, or the VRAM it took), else the
plugin's estimate, else the size of its files. Every load runs
:meth:`MemoryBudget.make_room` under the pool's memory lock (loads one at a time, so
two loads never count on the same free memory): when the new model does not fit, idle
unpinned models are unloaded, least recently used first and none resident for less
than ``min_residency_s``; models with work only with ``evict_busy`` (drained for up to
``drain_timeout_s``). If it still does not fit, 503 ``insufficient_memory`` names what
it needs and what is held by whom.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from llmpoold.config import MemorySettings
from llmpoold.entries import ModelEntry, ModelState
from llmpoold.errors import ApiError
from llmpoold.gpu import gpu_memory
from llmpoold.replicas.bridge import run_blocking

if TYPE_CHECKING:
    from llmpoold.pool import Pool

log = structlog.get_logger("llmpoold.memory")

RAM = "ram"
HOLDING = frozenset({ModelState.LOADING, ModelState.LOADED, ModelState.UNLOADING})


@dataclass(frozen=True)
class Cost:
    """Memory a model needs or holds on one device; ``source`` is ``observed``, the
    plugin estimate's source, ``model_artifact_size`` or ``unknown`` (0 MiB)."""

    device: str
    mib: float
    source: str

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device, "mib": round(self.mib, 1), "source": self.source}


def _device(estimate_device: str) -> str:
    """``cpu`` → ``ram``; ``cuda`` / ``cuda:1`` → ``gpu0`` / ``gpu1``."""
    if not estimate_device.startswith("cuda"):
        return RAM
    _, _, index = estimate_device.partition(":")
    return f"gpu{int(index) if index.isdigit() else 0}"


def mem_total_mib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def compute_budgets(settings: MemorySettings) -> dict[str, float]:
    """Blocking (reads /proc and NVML): each device's budget in MiB."""
    budgets: dict[str, float] = {}
    total = mem_total_mib()
    if settings.ram_budget_mib is not None:
        budgets[RAM] = float(settings.ram_budget_mib)
    elif total is not None:
        budgets[RAM] = total * settings.ram_budget_share
    gpus, _error = gpu_memory()
    for gpu in gpus:
        budgets[f"gpu{gpu['index']}"] = float(max(0, gpu["total_mib"] - settings.vram_reserve_mib))
    for index, mib in settings.vram_budget_mib.items():
        budgets[f"gpu{index}"] = float(mib)
    return budgets


class MemoryBudget:
    """Budgets, holdings and eviction for one pool."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self._budgets: tuple[MemorySettings, dict[str, float]] | None = None

    @property
    def settings(self) -> MemorySettings:
        return self.pool.settings.engine.memory

    async def budgets(self) -> dict[str, float]:
        """Each device's budget (computed once per settings)."""
        if self._budgets is None or self._budgets[0] is not self.settings:
            settings = self.settings
            self._budgets = (settings, await run_blocking(compute_budgets, settings))
        return self._budgets[1]

    def cached_budgets(self) -> dict[str, float]:
        return self._budgets[1] if self._budgets is not None else {}

    # ----- costs ---------------------------------------------------------------------

    async def cost(self, entry: ModelEntry, replicas: int) -> Cost:
        """What loading ``replicas`` replicas of ``entry`` will hold."""
        if entry.observed_cost is not None:
            per_replica = entry.observed_cost
            return Cost(per_replica.device, per_replica.mib * replicas, "observed")
        estimate = await self.pool.memory_estimate(entry)
        if estimate is not None:
            return Cost(_device(estimate.device), estimate.total_mib * replicas, estimate.source)
        path = entry.current.model_path
        if path and os.path.isfile(path):
            return Cost(RAM, os.path.getsize(path) / 2**20 * replicas, "model_artifact_size")
        return Cost(RAM, 0.0, "unknown")

    async def observe(self, entry: ModelEntry) -> None:
        """After a load: what the replicas really hold (worker RSS or the load's RSS
        delta inline; VRAM when the model is on a GPU), kept per replica for next time."""
        if entry.held is None or not entry.replicas:
            return
        infos = [await run_blocking(r.info) for r in entry.replicas]
        if entry.held.device == RAM:
            values = [i.get("rss_mib") if i.get("isolation") == "process" else i.get("load_rss_delta_mib")
                      for i in infos]
        else:
            values = [i.get("vram_mib") for i in infos]
            if any(v is None for v in values) and entry.observed_vram_mib is not None:
                values = [entry.observed_vram_mib / len(entry.replicas)] * len(entry.replicas)
        measured = [float(v) for v in values if isinstance(v, (int, float)) and v > 0]
        if measured and len(measured) == len(values):
            total = sum(measured)
            entry.observed_cost = Cost(entry.held.device, total / len(measured), "observed")
            entry.held = Cost(entry.held.device, total, "observed")

    def held(self, device: str) -> list[tuple[ModelEntry, Cost]]:
        return [(e, e.held) for e in list(self.pool.entries.values())
                if e.state in HOLDING and e.held is not None and e.held.device == device]

    # ----- eviction ------------------------------------------------------------------

    def _evictable(self, entry: ModelEntry, loading: ModelEntry, now: float) -> str | None:
        """None when ``entry`` may be evicted for ``loading``, else why it is kept."""
        if entry is loading or entry.state != ModelState.LOADED:
            return str(entry.state)
        if entry.config.pinned:
            return "pinned"
        if entry.loaded_at is not None and now - entry.loaded_at < self.settings.min_residency_s:
            return "min_residency"
        if entry.inflight_requests and not self.settings.evict_busy:
            return "busy"
        return None

    async def make_room(self, entry: ModelEntry, replicas: int, *, force: bool = False) -> None:
        """Hold ``entry``'s cost, evicting others as needed; raise 503
        ``insufficient_memory`` when it cannot fit (nothing is evicted then)."""
        cost = await self.cost(entry, replicas)
        budget = (await self.budgets()).get(cost.device)
        if force or budget is None or cost.mib <= 0:
            entry.held = cost
            return
        while True:
            holdings = self.held(cost.device)
            in_use = sum(c.mib for e, c in holdings if e is not entry)
            if in_use + cost.mib <= budget:
                entry.held = cost
                return
            now = time.monotonic()
            kept = {e.name: self._evictable(e, entry, now) for e, _ in holdings if e is not entry}
            candidates = [e for e, _ in holdings if e is not entry and kept[e.name] is None]
            # Idle before busy, then least recently used first.
            victims = sorted(candidates, key=lambda e: (e.inflight_requests > 0, e.last_used_at or 0.0))
            needed = in_use + cost.mib - budget
            if sum(e.held.mib if e.held else 0.0 for e in candidates) < needed:
                raise self._insufficient(entry, cost, budget, holdings, kept)
            victim = victims[0]
            busy = victim.inflight_requests > 0
            log.info("model_evicted", model=victim.name, reason="busy_drained" if busy else "idle_lru",
                     for_model=entry.name, device=cost.device, needed_mib=round(cost.mib, 1),
                     freed_mib=round(victim.held.mib, 1) if victim.held else None)
            await self.pool.unload(victim.name, reason="evicted",
                                   drain_timeout_s=self.settings.drain_timeout_s if busy else None)

    def _insufficient(self, entry: ModelEntry, cost: Cost, budget: float,
                      holdings: list[tuple[ModelEntry, Cost]], kept: dict[str, str | None]) -> ApiError:
        others = [(e, c) for e, c in holdings if e is not entry]
        held = [{"model": e.name, "mib": round(c.mib, 1), "state": str(e.state), "kept": kept.get(e.name)}
                for e, c in others]
        by_whom = ", ".join(f"{e.name} {c.mib:.0f} MiB ({kept.get(e.name) or 'evictable'})" for e, c in others)
        message = (f"model '{entry.name}' needs {cost.mib:.0f} MiB of {cost.device} ({cost.source}); the budget is "
                   f"{budget:.0f} MiB and {sum(c.mib for _, c in others):.0f} MiB is held by: {by_whom or 'nobody'}")
        return ApiError(503, "insufficient_memory", message, model=entry.name,
                        extra={"device": cost.device, "needed_mib": round(cost.mib, 1),
                               "budget_mib": round(budget, 1), "held": held})

    # ----- admin view ----------------------------------------------------------------

    async def snapshot(self) -> dict[str, Any]:
        """``GET /v1/admin/memory``: each budget, who holds what, estimate vs observed."""
        budgets = await self.budgets()
        devices = sorted(set(budgets) | {c.device for e in self.pool.entries.values() if (c := e.held)})
        out = []
        for device in devices:
            holdings = self.held(device)
            out.append({"device": device, "budget_mib": round(budgets[device], 1) if device in budgets else None,
                        "held_mib": round(sum(c.mib for _, c in holdings), 1),
                        "held_by": [{"model": e.name, **c.to_json(), "state": str(e.state)} for e, c in holdings]})
        models = []
        for entry in list(self.pool.entries.values()):
            estimate = await self.pool.memory_estimate(entry)
            models.append({"name": entry.name, "runtime_state": entry.state, "pinned": entry.config.pinned,
                           "held": entry.held.to_json() if entry.held and entry.state in HOLDING else None,
                           "estimate": None if estimate is None else
                           {"device": _device(estimate.device), "mib": round(estimate.total_mib, 1),
                            "source": estimate.source},
                           "observed_per_replica": entry.observed_cost.to_json() if entry.observed_cost else None})
        settings = self.settings
        return {"devices": out, "models": models,
                "evict_busy": settings.evict_busy, "drain_timeout_s": settings.drain_timeout_s,
                "min_residency_s": settings.min_residency_s}
