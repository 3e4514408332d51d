"""Replicas: one loaded runtime each, behind one async interface.

:class:`InlineReplica` runs the plugin's hooks inside the daemon (threads from
:mod:`llmpoold.bridge` for blocking runtimes). A process-isolated replica (see
:mod:`llmpoold.worker`) implements the same :class:`Replica` protocol, so the
scheduler never knows where a runtime lives.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import AsyncGenerator
from typing import Any, Protocol

import structlog

from llmpoold.bridge import iterate_in_thread, run_blocking
from llmpoold.config import ModelConfig
from llmpoold.errors import LoadError
from llmpoold.plugins import PluginRegistry
from llmpoold.types import Completion, GenerationRequest, StreamItem, TextDelta

log = structlog.get_logger("llmpoold.replica")


class Replica(Protocol):
    """One loaded runtime of a model.

    ``stream`` yields TextDelta items then one Completion; closing the iterator early
    (``aclose()``, task cancellation) cancels the generation in the runtime.

    Optional: ``accepting`` (bool, default True when absent): the scheduler routes no
    new work to a replica that is not accepting (a crashed worker being restarted,
    see :mod:`llmpoold.process_replica`); ``add_listener(callback)`` lets the pool
    hear ``crashed`` / ``restarted`` / ``gave_up``.
    """

    replica_id: str
    concurrency: int
    isolation: str  # "inline" or "process"

    async def load(self) -> None: ...

    def stream(self, request: GenerationRequest) -> AsyncGenerator[StreamItem, None]: ...

    async def unload(self) -> None: ...

    def info(self) -> dict[str, Any]: ...


def process_rss_mib(pid: int | None = None) -> float | None:
    """Resident memory of a process in MiB (Linux /proc), or None."""
    try:
        with open(f"/proc/{pid or os.getpid()}/statm", encoding="ascii") as fh:
            pages = int(fh.read().split()[1])
        return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError):
        return None


async def _aiter_items(result: Any, request: GenerationRequest) -> AsyncGenerator[StreamItem, None]:
    """Normalize what ``llmpool_stream`` returned (sync or async iterator)."""
    if hasattr(result, "__aiter__"):
        agen = result.__aiter__()
        try:
            async for item in agen:
                yield item
        finally:
            request.cancel.set()
            aclose = getattr(agen, "aclose", None)
            if aclose is not None:
                await aclose()
        return
    raise TypeError("llmpool_stream must return an iterator or an async iterator")


class InlineReplica:
    """A replica whose runtime lives in the daemon process."""

    isolation = "inline"

    def __init__(self, registry: PluginRegistry, backend: str, replica_id: str, model: ModelConfig,
                 concurrency: int) -> None:
        self.registry = registry
        self.backend = backend
        self.replica_id = replica_id
        self.model = model
        self.concurrency = concurrency
        self.runtime: Any = None
        self.load_rss_delta_mib: float | None = None

    async def load(self) -> None:
        before = process_rss_mib()
        runtime = await run_blocking(self._load_blocking)
        after = process_rss_mib()
        if before is not None and after is not None:
            self.load_rss_delta_mib = round(after - before, 1)
        self.runtime = runtime

    def _load_blocking(self) -> Any:
        runtime = self.registry.hook.llmpool_load(backend=self.backend, replica_id=self.replica_id, model=self.model)
        if runtime is None:
            raise LoadError(f"no installed plugin loaded backend '{self.backend}'")
        return runtime

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[StreamItem, None]:
        result = self.registry.hook.llmpool_stream(backend=self.backend, runtime=self.runtime, request=request)
        if result is None:
            generated = self.registry.hook.llmpool_generate(backend=self.backend, runtime=self.runtime,
                                                            request=request)
            if generated is None:
                raise LoadError(f"backend '{self.backend}' implements neither llmpool_stream nor llmpool_generate")
            if inspect.isawaitable(generated):
                generated = await generated
            text, reasoning, completion = generated
            if reasoning:
                yield TextDelta(reasoning, channel="reasoning")
            yield TextDelta(text)
            yield completion
            return
        if hasattr(result, "__aiter__"):
            source = _aiter_items(result, request)
        else:
            source = iterate_in_thread(lambda: result, cancel=request.cancel,
                                       name=f"llmpool-stream-{self.replica_id}")
        try:
            async for item in source:
                yield item
        finally:
            await source.aclose()

    async def generate(self, request: GenerationRequest) -> tuple[str, str | None, Completion] | None:
        """The plugin's non-streaming path, or None when it only streams."""
        generated = self.registry.hook.llmpool_generate(backend=self.backend, runtime=self.runtime, request=request)
        if generated is None:
            return None
        if inspect.isawaitable(generated):
            return await generated
        return generated  # type: ignore[no-any-return]

    async def unload(self) -> None:
        runtime, self.runtime = self.runtime, None
        if runtime is None:
            return
        try:
            await run_blocking(lambda: self.registry.hook.llmpool_unload(backend=self.backend, runtime=runtime))
        except Exception as exc:  # noqa: BLE001 - unload is best effort
            log.warning("replica_unload_failed", replica=self.replica_id, error=str(exc))

    def info(self) -> dict[str, Any]:
        return {"replica_id": self.replica_id, "isolation": self.isolation, "pid": os.getpid(),
                "rss_mib": process_rss_mib(), "load_rss_delta_mib": self.load_rss_delta_mib,
                "concurrency": self.concurrency}
