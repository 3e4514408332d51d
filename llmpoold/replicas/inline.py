"""A replica whose runtime lives in the daemon process (blocking hooks on threads)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator
from typing import Any

import structlog

from llmpoold.backend import Backend
from llmpoold.config import ModelConfig
from llmpoold.gpu import process_rss_mib
from llmpoold.replicas import Listener
from llmpoold.replicas.bridge import run_blocking
from llmpoold.types import EmbeddingRequest, EmbeddingResult, GenerationRequest, StreamItem

log = structlog.get_logger("llmpoold.replica")


class InlineReplica:
    """Implements :class:`~llmpoold.replicas.Replica` in-process: it never crashes on its
    own, so it is always accepting and never gives up."""

    isolation = "inline"
    accepting = True
    gave_up = False
    last_error: str | None = None

    def __init__(self, backend: Backend, replica_id: str, model: ModelConfig, concurrency: int) -> None:
        self.backend = backend
        self.replica_id = replica_id
        self.model = model
        self.concurrency = concurrency
        self.runtime: Any = None
        self.load_rss_delta_mib: float | None = None

    def add_listener(self, listener: Listener) -> None:
        """Nothing to report: an inline runtime shares the daemon's fate."""

    async def load(self) -> None:
        before = process_rss_mib()
        runtime = await run_blocking(self.backend.load, self.replica_id, self.model)
        after = process_rss_mib()
        if before is not None and after is not None:
            self.load_rss_delta_mib = round(after - before, 1)
        self.runtime = runtime

    async def stream(self, request: GenerationRequest, *, whole: bool = False) -> AsyncGenerator[StreamItem, None]:
        source = self.backend.open(self.runtime, request, whole=whole)
        try:
            async for item in source:
                yield item
        finally:
            await source.aclose()

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        work = asyncio.ensure_future(run_blocking(self.backend.embed, self.runtime, request))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            request.cancel.set()
            await asyncio.gather(work, return_exceptions=True)  # the runtime lets go before the slot does
            raise

    async def unload(self) -> None:
        runtime, self.runtime = self.runtime, None
        if runtime is None:
            return
        try:
            await run_blocking(self.backend.unload, runtime)
        except Exception as exc:  # noqa: BLE001 - unload is best effort
            log.warning("replica_unload_failed", replica=self.replica_id, error=str(exc))

    def info(self) -> dict[str, Any]:
        return {"replica_id": self.replica_id, "isolation": self.isolation, "pid": os.getpid(),
                "rss_mib": process_rss_mib(), "load_rss_delta_mib": self.load_rss_delta_mib,
                "concurrency": self.concurrency}
