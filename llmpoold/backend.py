"""The daemon's one handle on a backend: every hook call about a model goes through here.

Inline replicas, the worker process, the pool and :mod:`llmpoold.testing` call a
:class:`Backend` instead of ``registry.hook``, so the rules live once: a load that
returns None is a :class:`LoadError`, a stream is normalised once (blocking iterator
driven on its own thread, async iterator, or ``llmpool_generate``'s answer), and
traits fall back to text-only, concurrency 1.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncGenerator
from typing import Any

from llmpoold.config import ModelConfig
from llmpoold.errors import ApiError, LoadError
from llmpoold.hookspecs import BackendSpec
from llmpoold.plugins import PluginRegistry
from llmpoold.replicas.bridge import iterate_in_thread
from llmpoold.types import (
    Capabilities,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationRequest,
    MemoryEstimate,
    ModelTraits,
    StreamItem,
    TextDelta,
)


class Backend:
    """One canonical backend of a registry."""

    def __init__(self, registry: PluginRegistry, name: str) -> None:
        self.registry = registry
        self.name = name

    @property
    def spec(self) -> BackendSpec:
        return self.registry.spec(self.name)

    def traits(self, model: ModelConfig) -> ModelTraits:
        """The model's capabilities and per-replica concurrency (cheap; no load)."""
        traits = None
        if model.options is not None:
            traits = self.registry.hook.llmpool_model_traits(backend=self.name, model=model)
        return traits or ModelTraits(capabilities=Capabilities(modalities=model.modalities))

    def estimate(self, model: ModelConfig) -> MemoryEstimate | None:
        """Blocking: the plugin's memory estimate for one replica, or None."""
        estimate: MemoryEstimate | None = self.registry.hook.llmpool_estimate_memory(backend=self.name, model=model)
        return estimate

    def load(self, replica_id: str, model: ModelConfig) -> Any:
        """Blocking: load one replica and return its runtime handle. Raises LoadError."""
        runtime = self.registry.hook.llmpool_load(backend=self.name, replica_id=replica_id, model=model)
        if runtime is None:
            raise LoadError(f"no installed plugin loaded backend '{self.name}'")
        return runtime

    def embed(self, runtime: Any, request: EmbeddingRequest) -> EmbeddingResult:
        """Blocking: the request's vectors (``llmpool_embed``). Raises ApiError 400
        ``embeddings_unsupported`` when no plugin embeds for this backend."""
        result: EmbeddingResult | None = self.registry.hook.llmpool_embed(backend=self.name, runtime=runtime,
                                                                          request=request)
        if result is None:
            raise ApiError(400, "embeddings_unsupported", f"model '{request.model}' does not serve embeddings",
                           model=request.model, param="model")
        if len(result.vectors) != len(request.inputs):
            raise ApiError(502, "backend_protocol_error", f"backend '{self.name}' returned {len(result.vectors)} "
                           f"vectors for {len(request.inputs)} inputs", model=request.model)
        return result

    def unload(self, runtime: Any) -> None:
        """Blocking: release the runtime."""
        self.registry.hook.llmpool_unload(backend=self.name, runtime=runtime)

    async def open(self, runtime: Any, request: GenerationRequest, *,
                   whole: bool = False) -> AsyncGenerator[StreamItem, None]:
        """The request's items: TextDelta items, then one Completion.

        ``whole`` (a non-streaming request): use ``llmpool_generate`` when the plugin
        implements it (a cheaper non-streaming call, the remote backend's JSON call),
        else collect the stream. A stream that implements only ``llmpool_generate`` is
        served from it either way. Closing this generator early sets ``request.cancel``
        and closes the plugin's iterator (waiting for a blocking one to let go).
        """
        if whole:
            answer = await self._generate(runtime, request)
            if answer is not None:
                for item in answer:
                    yield item
                return
        result = self.registry.hook.llmpool_stream(backend=self.name, runtime=runtime, request=request)
        if result is None:
            answer = None if whole else await self._generate(runtime, request)
            if answer is None:
                raise LoadError(f"backend '{self.name}' implements neither llmpool_stream nor llmpool_generate")
            for item in answer:
                yield item
            return
        if hasattr(result, "__aiter__"):
            source = result.__aiter__()
        elif hasattr(result, "__iter__"):
            source = iterate_in_thread(lambda: result, cancel=request.cancel,
                                       name=f"llmpool-stream-{request.replica_id}")
        else:
            raise TypeError("llmpool_stream must return an iterator or an async iterator")
        try:
            async for item in source:
                yield item
        finally:
            request.cancel.set()  # a no-op once the runtime has finished
            aclose = getattr(source, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _generate(self, runtime: Any, request: GenerationRequest) -> list[StreamItem] | None:
        generated = self.registry.hook.llmpool_generate(backend=self.name, runtime=runtime, request=request)
        if generated is None:
            return None
        if inspect.isawaitable(generated):
            generated = await generated
        text, reasoning, completion = generated
        return [*([TextDelta(reasoning, channel="reasoning")] if reasoning else []), TextDelta(text), completion]
