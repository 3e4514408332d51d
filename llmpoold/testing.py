"""Test helpers for llmpoold and its plugins, and the backend contract suite.

A plugin's tests subclass :class:`BackendContractSuite`::

    class TestGgufContract(BackendContractSuite):
        backend = "gguf"

        @pytest.fixture(scope="class")
        @classmethod
        def model_entry(cls):
            return {"backend": "gguf", "model_path": path, "gguf_n_ctx": 1024}

The suite goes through the installed entry point (as the daemon does) and checks
what every backend promises in :mod:`llmpoold.hookspecs`.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Iterator, Mapping
from enum import StrEnum
from types import ModuleType
from typing import Annotated, Any

import pytest
from pydantic import BaseModel, Field

from llmpoold.backend import Backend
from llmpoold.config import AppSettings, ModelConfig, parse_settings, resolve_model_options
from llmpoold.hookspecs import BackendSpec
from llmpoold.plugins import PluginRegistry
from llmpoold.types import (
    Completion,
    Decoding,
    GenerationRequest,
    MemoryEstimate,
    Message,
    ModelTraits,
    StreamItem,
    TextDelta,
)


def make_registry(*plugins: ModuleType | object | str) -> PluginRegistry:
    """A registry with exactly these plugins: module objects, or entry-point names of
    installed plugins (``"gguf"``)."""
    registry = PluginRegistry()
    wanted = {p for p in plugins if isinstance(p, str)}
    if wanted:
        registry.load_entry_points(names=wanted)
    for plugin in plugins:
        if not isinstance(plugin, str):
            registry.register(plugin, name=getattr(plugin, "__name__", type(plugin).__name__))
    return registry


def settings_from(data: Mapping[str, Any]) -> AppSettings:
    """Validated settings from a dict shaped like settings.json."""
    return parse_settings(data, source="test settings")


def make_request(*, model: str = "m", replica_id: str = "m#1", prompt_format: str = "generic",
                 text: str = "Say hello.", instructions: str = "You are a helpful assistant.",
                 max_tokens: int = 8, **decoding: Any) -> GenerationRequest:
    """A greedy single-turn request for hook-level tests."""
    return GenerationRequest(
        request_id="test", model=model, replica_id=replica_id, prompt_format=prompt_format,
        instructions=instructions, messages=(Message(role="user", content=text),),
        decoding=Decoding(max_tokens=max_tokens, temperature=0.0, top_k=1, **decoding),
    )


def sse_events(text: str) -> list[tuple[str, Any]]:
    """Parse a server-sent-events body into (event name, JSON data) pairs
    (``"message"`` where a block names no event)."""
    import json

    events = []
    for block in text.strip().split("\n\n"):
        name, data = "message", ""
        for line in block.splitlines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data += line[5:].strip()
        events.append((name, json.loads(data)))
    return events


def collect(stream: Iterator[StreamItem] | AsyncIterator[StreamItem]) -> list[StreamItem]:
    """Drain a stream returned by ``llmpool_stream`` (sync or async)."""
    if hasattr(stream, "__aiter__"):
        async def drain() -> list[StreamItem]:
            return [item async for item in stream]  # type: ignore[union-attr]
        return asyncio.run(drain())
    return list(stream)  # type: ignore[arg-type]


def cancel_after(stream: Iterator[StreamItem], request: GenerationRequest, items: int) -> Completion:
    """Read ``stream``, set ``request``'s cancel token once ``items`` items have come,
    and return the stream's last item (which must be its Completion)."""
    seen = 0
    for item in stream:
        seen += 1
        if seen == items:
            request.cancel.set()
        if isinstance(item, Completion):
            return item
    raise AssertionError("the stream ended without a Completion")


# A structured-output schema with a nested object, an enum and an array, for tests of
# ``response_format`` on real models. The bounds keep a small model from looping inside
# a string or an array until ``max_tokens``.
Word = Annotated[str, Field(max_length=16)]


class Colour(StrEnum):
    red = "red"
    green = "green"
    blue = "blue"


class Address(BaseModel):
    city: Word
    zip_code: int


class Person(BaseModel):
    name: Word
    favourite: Colour
    address: Address
    tags: list[Word] = Field(min_length=1, max_length=3)


class BackendContractSuite:
    """What every backend plugin promises. Subclass it; set ``backend`` and provide a
    class-scoped ``model_entry`` fixture (a raw ``engine.models`` entry)."""

    backend: str = ""
    prompt_text: str = "Count from one to five."

    @pytest.fixture(scope="class")
    @classmethod
    def model_entry(cls) -> dict[str, Any]:
        raise NotImplementedError("provide the model_entry fixture")

    @pytest.fixture(scope="class")
    @classmethod
    def registry(cls) -> PluginRegistry:
        return make_registry(cls.backend)

    @pytest.fixture(scope="class")
    @classmethod
    def spec(cls, registry: PluginRegistry) -> BackendSpec:
        assert cls.backend in registry.backends, (
            f"backend '{cls.backend}' not declared; plugins: {[p.to_json() for p in registry.plugins]}")
        return registry.spec(cls.backend)

    @pytest.fixture(scope="class")
    @classmethod
    def model(cls, spec: BackendSpec, model_entry: dict[str, Any]) -> ModelConfig:
        settings = settings_from({"engine": {"models": {"contract": model_entry}}})
        raw = settings.engine.models["contract"]
        return resolve_model_options(raw, spec.options_model, backend=cls.backend,
                                     requires_model_path=spec.requires_model_path)

    @pytest.fixture(scope="class")
    @classmethod
    def runtime(cls, registry: PluginRegistry, model: ModelConfig) -> Iterator[Any]:
        runtime = registry.hook.llmpool_load(backend=cls.backend, replica_id="contract#1", model=model)
        assert runtime is not None, "llmpool_load returned None for its own backend"
        yield runtime
        assert registry.hook.llmpool_unload(backend=cls.backend, runtime=runtime) is True

    def request(self, model: ModelConfig, **kwargs: Any) -> GenerationRequest:
        return make_request(model="contract", replica_id="contract#1", prompt_format=model.prompt_format,
                            text=self.prompt_text, **kwargs)

    def test_entry_point_name_is_backend_name(self, registry: PluginRegistry) -> None:
        info = next(p for p in registry.plugins if self.backend in p.backends)
        assert info.error is None and info.name == self.backend

    def test_aliases_resolve(self, registry: PluginRegistry, spec: BackendSpec) -> None:
        for alias in spec.aliases:
            assert registry.canonical(alias) == self.backend

    def test_options_reject_unknown_key(self, spec: BackendSpec) -> None:
        from pydantic import ValidationError

        with pytest.raises(ValidationError):
            spec.options_model.model_validate({"no_such_key_for_any_backend": 1})

    def test_other_backends_get_none(self, registry: PluginRegistry, model: ModelConfig) -> None:
        assert registry.hook.llmpool_load(backend="__none__", replica_id="x#1", model=model) is None
        assert registry.hook.llmpool_estimate_memory(backend="__none__", model=model) is None

    def test_traits(self, registry: PluginRegistry, model: ModelConfig) -> None:
        traits = registry.hook.llmpool_model_traits(backend=self.backend, model=model)
        if traits is not None:
            assert isinstance(traits, ModelTraits) and traits.concurrency >= 1
            assert "text" in traits.capabilities.modalities

    def test_estimate(self, registry: PluginRegistry, model: ModelConfig) -> None:
        estimate = registry.hook.llmpool_estimate_memory(backend=self.backend, model=model)
        if estimate is not None:
            assert isinstance(estimate, MemoryEstimate) and estimate.total_mib >= 0

    def test_stream_yields_deltas_then_one_completion(self, registry: PluginRegistry, runtime: Any,
                                                      model: ModelConfig) -> None:
        stream = registry.hook.llmpool_stream(backend=self.backend, runtime=runtime,
                                              request=self.request(model, max_tokens=8))
        assert stream is not None
        assert not inspect.iscoroutine(stream), "llmpool_stream must return an iterator, not a coroutine"
        items = collect(stream)
        assert items and isinstance(items[-1], Completion)
        assert all(isinstance(i, TextDelta) for i in items[:-1])
        assert "".join(i.text for i in items[:-1] if isinstance(i, TextDelta) and i.channel == "output").strip()
        metrics = items[-1].metrics
        if metrics.output_tokens is not None:
            assert 1 <= metrics.output_tokens <= 8

    def test_max_tokens_ends_with_length(self, registry: PluginRegistry, runtime: Any, model: ModelConfig) -> None:
        stream = registry.hook.llmpool_stream(backend=self.backend, runtime=runtime,
                                              request=self.request(model, max_tokens=3))
        completion = collect(stream)[-1]
        assert isinstance(completion, Completion)
        if completion.metrics.output_tokens is not None:
            assert completion.metrics.output_tokens <= 3
        assert completion.finish_reason in ("length", "stop")

    def test_cancel_stops_the_stream(self, registry: PluginRegistry, runtime: Any, model: ModelConfig) -> None:
        request = self.request(model, max_tokens=64)

        async def first_then_cancel() -> int:
            # As the daemon drives it: closing the stream sets the token and waits for the runtime.
            source = Backend(registry, self.backend).open(runtime, request)
            count = 0
            async for item in source:
                if isinstance(item, TextDelta):
                    count += 1
                    break
            await source.aclose()
            return count

        assert asyncio.run(first_then_cancel()) == 1
        assert request.cancel.is_set()
        # The runtime must serve the next request normally after a cancel.
        items = collect(registry.hook.llmpool_stream(backend=self.backend, runtime=runtime,
                                                     request=self.request(model, max_tokens=4)))
        assert isinstance(items[-1], Completion)
