"""A worker hosts plugins whose streams are async iterators, or that only implement
``llmpool_generate`` (returning an awaitable), through the same hooks as inline; a
plugin with both answers non-streaming requests with ``llmpool_generate``.

This module is itself the test plugin: the worker imports it by its module name.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest

from llmpoold import hookimpl
from llmpoold.config import WorkerSettings
from llmpoold.hookspecs import BackendSpec
from llmpoold.replicas.factory import ProcessReplicaFactory
from llmpoold.types import BackendMetrics, Completion, TextDelta

pytestmark = pytest.mark.timeout(60)


@hookimpl
def llmpool_backends() -> list[BackendSpec]:
    return [BackendSpec(name=name, requires_model_path=False) for name in ("agen", "genonly", "both")]


@hookimpl
def llmpool_load(backend: str, replica_id: str, model: Any) -> Any:
    return {"backend": backend} if backend in ("agen", "genonly", "both") else None


@hookimpl
def llmpool_stream(backend: str, runtime: Any, request: Any) -> Any:
    if backend == "both":  # a blocking iterator
        return iter([TextDelta("streamed"), Completion(finish_reason="stop")])
    if backend != "agen":
        return None

    async def items() -> AsyncIterator[Any]:
        for word in str(request.messages[-1].content).split():
            await asyncio.sleep(0)
            yield TextDelta(word + " ")
        yield Completion(finish_reason="stop", metrics=BackendMetrics(output_tokens=2))

    return items()


@hookimpl
def llmpool_generate(backend: str, runtime: Any, request: Any) -> Any:
    if backend == "both":
        return "generated", None, Completion(finish_reason="stop")  # a plain tuple, not an awaitable
    if backend != "genonly":
        return None

    async def answer() -> tuple[str, str | None, Completion]:
        await asyncio.sleep(0)
        return f"generated: {request.messages[-1].content}", "thought", Completion(finish_reason="stop")

    return answer()


@hookimpl
def llmpool_unload(backend: str, runtime: Any) -> bool | None:
    return True if backend in ("agen", "genonly", "both") else None


async def test_async_stream_and_generate_only_plugins_in_a_worker() -> None:
    from llmpoold.http.app import create_app
    from llmpoold.testing import make_registry, settings_from

    me = sys.modules[__name__]
    factory = ProcessReplicaFactory(WorkerSettings(), plugin_modules=(__name__,))
    app = create_app(settings_from({"engine": {"models": {
        "a": {"backend": "agen", "isolation": "process"}, "g": {"backend": "genonly", "isolation": "process"}}}}),
        make_registry(me), replica_factory=factory)
    from aiohttp.test_utils import TestClient, TestServer

    from llmpoold.http.keys import POOL

    async with TestClient(TestServer(app)) as client:
        await app[POOL].startup_done.wait()
        for name in ("a", "g"):
            entry = app[POOL].entry(name)
            assert entry.state == "loaded", entry.last_error
            assert entry.replicas[0].info()["isolation"] == "process"
        body = await (await client.post("/v1/responses", json={"model": "a", "input": "two words"})).json()
        assert body["output_text"] == "two words"
        body = await (await client.post("/v1/responses", json={"model": "g", "input": "hi"})).json()
        assert body["output_text"] == "generated: hi" and body["reasoning_text"] == "thought"


@pytest.mark.parametrize("isolation", ["inline", "process"])
async def test_non_streaming_requests_use_generate_when_the_plugin_has_it(isolation: str) -> None:
    """``llmpool_generate`` answers a non-streaming request; a streaming one streams."""
    from aiohttp.test_utils import TestClient, TestServer

    from llmpoold.http.app import create_app
    from llmpoold.http.keys import POOL
    from llmpoold.testing import make_registry, settings_from

    factory = ProcessReplicaFactory(WorkerSettings(), plugin_modules=(__name__,))
    app = create_app(settings_from({"engine": {"models": {"b": {"backend": "both", "isolation": isolation}}}}),
                     make_registry(sys.modules[__name__]), replica_factory=factory)
    async with TestClient(TestServer(app)) as client:
        await app[POOL].startup_done.wait()
        assert app[POOL].entry("b").replicas[0].info()["isolation"] == isolation
        body = await (await client.post("/v1/responses", json={"model": "b", "input": "x"})).json()
        assert body["output_text"] == "generated"
        text = await (await client.post("/v1/responses", json={"model": "b", "input": "x", "stream": True})).text()
        assert '"output_text": "streamed"' in text  # the seed's json.dumps separators
        chat = await (await client.post("/v1/chat/completions", json={
            "model": "b", "messages": [{"role": "user", "content": "x"}]})).json()
        assert chat["choices"][0]["message"]["content"] == "generated"
