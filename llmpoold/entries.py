"""A configured model's live state: :class:`ModelState` and :class:`ModelEntry`."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from llmpoold.config import ModelConfig
from llmpoold.hookspecs import BackendSpec
from llmpoold.types import MemoryEstimate, ModelTraits

if TYPE_CHECKING:
    from llmpoold.errors import ApiError
    from llmpoold.memory import Cost
    from llmpoold.replicas import Replica
    from llmpoold.scheduler import ModelScheduler


class ModelState(StrEnum):
    """A model's lifecycle; only ``LOADED`` serves. The values are the API's strings."""

    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"
    FAILED = "failed"


ACTIVE_STATES = frozenset({ModelState.LOADING, ModelState.LOADED, ModelState.UNLOADING})


@dataclass(eq=False)
class ModelEntry:
    """Live state of one configured model."""

    config: ModelConfig
    backend: str | None
    spec: BackendSpec | None
    state: ModelState = ModelState.UNLOADED
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
    traits: ModelTraits | None = None  # asked of the plugin once per load, while loaded
    # The pool-owned load or unload in progress (a client leaving does not cancel it).
    transition: asyncio.Task[None] | None = None
    load_started_at: float | None = None  # wall clock, while ``loading``
    load_error: ApiError | None = None  # why the last load did not happen (insufficient_memory)
    # Memory and idleness (issue 14, llmpoold.memory / llmpoold.lifecycle)
    held: Cost | None = None  # what the model holds while loading/loaded/unloading
    observed_cost: Cost | None = None  # per replica, measured at the last load (kept after unload)
    loaded_at: float | None = None  # monotonic
    last_used_at: float | None = None  # wall clock: end of the last request (or the load)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def current(self) -> ModelConfig:
        """The config in force: the loaded one (with override) or the configured one."""
        return self.active_config or self.config
