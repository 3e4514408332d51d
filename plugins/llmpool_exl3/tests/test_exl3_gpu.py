"""exllamav3 plugin on a real GPU with a real EXL3 model (skipped without CUDA).

``LLMPOOL_EXL3_TEST_MODEL`` names the EXL3 model directory; ``scripts/gpu_check.sh``
prepares one (exllamav3's converter on a small model) and runs this file.
``LLMPOOL_EXL3_TEST_FORMAT`` picks its prompt format (default ``gemma3_template``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import time
from typing import Any

import llmpool_exl3
import pytest

from llmpoold.replicas.bridge import iterate_in_thread
from llmpoold.testing import BackendContractSuite, collect, make_registry, make_request
from llmpoold.types import Completion, TextDelta

MODEL_DIR = os.environ.get("LLMPOOL_EXL3_TEST_MODEL", "")
PROMPT_FORMAT = os.environ.get("LLMPOOL_EXL3_TEST_FORMAT", "gemma3_template")

pytestmark = [
    pytest.mark.skipif(not llmpool_exl3.cuda_available(), reason="needs an NVIDIA GPU with CUDA"),
    pytest.mark.skipif(not os.path.isdir(MODEL_DIR), reason="set LLMPOOL_EXL3_TEST_MODEL to an EXL3 model directory "
                                                            "(scripts/gpu_check.sh prepares one)"),
]


def entry(**keys: Any) -> dict[str, Any]:
    return {"backend": "exllamav3", "model_path": MODEL_DIR, "prompt_format": PROMPT_FORMAT,
            "exllama_cache_size": 4096, "exllama_max_batch_size": 8, **keys}


class TestExl3GpuContract(BackendContractSuite):
    backend = "exllamav3"

    @pytest.fixture(scope="class")
    @classmethod
    def model_entry(cls) -> dict[str, Any]:
        return entry()


class TestExl3GpuQuantCache(BackendContractSuite):
    """The same contract with a quantized (8-bit K, 4-bit V) cache."""

    backend = "exllamav3"

    @pytest.fixture(scope="class")
    @classmethod
    def model_entry(cls) -> dict[str, Any]:
        return entry(exllama_cache_quant="8,4", exllama_max_rq_tokens=256)


@pytest.fixture(scope="module")
def gpu_runtime() -> Any:
    from llmpoold.config import resolve_model_options
    from llmpoold.testing import settings_from

    registry = make_registry("exllamav3")
    raw = settings_from({"engine": {"models": {"gpu": entry()}}}).engine.models["gpu"]
    model = resolve_model_options(raw, llmpool_exl3.Exl3Options, backend="exllamav3", requires_model_path=True)
    runtime = registry.hook.llmpool_load(backend="exllamav3", replica_id="gpu#1", model=model)
    yield registry, runtime
    assert registry.hook.llmpool_unload(backend="exllamav3", runtime=runtime) is True


def request(max_tokens: int, text: str = "Write a short poem about the sea.") -> Any:
    base = make_request(prompt_format=PROMPT_FORMAT, text=text, max_tokens=max_tokens)
    return dataclasses.replace(base, model="gpu", replica_id="gpu#1")


def test_streams_tokens_as_they_come(gpu_runtime: Any) -> None:
    registry, runtime = gpu_runtime
    stream = registry.hook.llmpool_stream(backend="exllamav3", runtime=runtime, request=request(48))
    arrivals: list[float] = []
    items = []
    for item in stream:
        arrivals.append(time.perf_counter())
        items.append(item)
    completion = items[-1]
    assert isinstance(completion, Completion)
    deltas = [i for i in items[:-1] if isinstance(i, TextDelta)]
    m = completion.metrics
    print(f"\nexl3 gpu: {len(deltas)} deltas, {m.output_tokens} tokens, prompt {m.prompt_tokens}, "
          f"ttft {m.time_to_first_token_ms} ms, decode {m.decode_after_first_token_ms} ms, "
          f"{m.tokens_per_second} tok/s, finish {completion.finish_reason}: "
          f"{''.join(d.text for d in deltas)!r}")
    assert m.output_tokens and m.output_tokens <= 48 and m.prompt_tokens and m.prompt_tokens > 5
    if completion.finish_reason == "length":
        assert len(deltas) > 1 and arrivals[-1] > arrivals[0]  # text came in pieces, not at the end


def test_concurrent_requests_share_the_generator(gpu_runtime: Any) -> None:
    registry, runtime = gpu_runtime
    results: dict[int, list[Any]] = {}

    def run(n: int) -> None:
        req = request(32, text=f"Count to {n + 3}.")
        results[n] = collect(registry.hook.llmpool_stream(backend="exllamav3", runtime=runtime, request=req))

    started = time.perf_counter()
    threads = [threading.Thread(target=run, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    elapsed = time.perf_counter() - started
    tokens = sum(items[-1].metrics.output_tokens or 0 for items in results.values())
    print(f"\nexl3 gpu: 6 concurrent requests, {tokens} tokens in {elapsed:.2f}s ({tokens / elapsed:.1f} tok/s)")
    assert len(results) == 6 and all(isinstance(items[-1], Completion) for items in results.values())
    assert runtime.generator.num_remaining_jobs() == 0


def test_cancel_one_while_another_runs(gpu_runtime: Any) -> None:
    registry, runtime = gpu_runtime

    async def scenario() -> list[Any]:
        victim, survivor = request(400), request(24)
        source = iterate_in_thread(
            lambda: registry.hook.llmpool_stream(backend="exllamav3", runtime=runtime, request=victim),
            cancel=victim.cancel)
        other = asyncio.create_task(asyncio.to_thread(
            collect, registry.hook.llmpool_stream(backend="exllamav3", runtime=runtime, request=survivor)))
        async for item in source:
            if isinstance(item, TextDelta):
                break
        await source.aclose()
        return await other

    survivor_items = asyncio.run(scenario())
    assert isinstance(survivor_items[-1], Completion) and survivor_items[-1].finish_reason in ("length", "stop")
    assert runtime.generator.num_remaining_jobs() == 0 and not runtime.streams
