"""The gguf decode loop on the real Gemma 3 270M (Q4_K_M): parallel sequences with
continuous batching, slot reuse, the prompt-prefix cache, cancel, errors."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from llmpoold.config import resolve_model_options
from llmpoold.errors import BackendError
from llmpoold.testing import cancel_after, collect, make_request, settings_from
from llmpoold.types import Completion, Message, TextDelta

pytestmark = pytest.mark.timeout(300)

# llama.cpp's CPU kernels are not batch-invariant: a matrix product over more rows takes
# other kernels (repacked GEMM with gguf_repack, llamafile's tiled sgemm, built in) that sum
# in another order, so the logits of a sequence decoded beside others differ from its
# logits alone by ~0.1 on average (the same whether the neighbours are other prompts or
# copies of it: nothing leaks between sequences), and a near-tie between two tokens can
# flip. See the README and ``bench/bench_gguf.py --sections divergence`` for how often.
# These prompts have no near-tie in their first 16 tokens (gguf_repack off); the others
# are used where the text is not compared.
PROMPTS = ("Once upon a time", "Water boils at", "def f(x):", "Dear diary, today", "The three primary colors are")
# A long shared prefix (a "system prompt") for the prefix-cache tests: ~300 tokens.
PREFIX = ("You are a careful assistant that answers questions about geography, history and science. "
          "Answer in one short sentence, without any preamble, and never repeat the question. ") * 8


def load(registry: Any, path: str, **options: Any) -> Any:
    entry = {"backend": "gguf", "model_path": path, "prompt_format": "raw", "gguf_n_ctx": 512, **options}
    settings = settings_from({"engine": {"models": {"g": entry}}})
    model = resolve_model_options(settings.engine.models["g"], registry.spec("gguf").options_model,
                                  backend="gguf", requires_model_path=True)
    return registry.hook.llmpool_load(backend="gguf", replica_id="g#1", model=model)


@pytest.fixture(scope="module")
def runtime(registry: Any, gguf_path: str) -> Iterator[Any]:
    runtime = load(registry, gguf_path, gguf_parallel=4)
    yield runtime
    registry.hook.llmpool_unload(backend="gguf", runtime=runtime)


def run(registry: Any, runtime: Any, text: str, prompt_format: str = "raw",
        **kw: Any) -> tuple[str, Completion]:
    request = kw.pop("request", None) or make_request(model="g", prompt_format=prompt_format, text=text, **kw)
    items = collect(registry.hook.llmpool_stream(backend="gguf", runtime=runtime, request=request))
    assert isinstance(items[-1], Completion)
    return "".join(i.text for i in items[:-1] if isinstance(i, TextDelta)), items[-1]


def run_together(registry: Any, runtime: Any, texts: tuple[str, ...], **kw: Any) -> list[tuple[str, Completion]]:
    results: list[Any] = [None] * len(texts)
    barrier = threading.Barrier(len(texts))

    def one(i: int) -> None:
        barrier.wait()
        results[i] = run(registry, runtime, texts[i], **kw)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    return results


def test_parallel_declared_as_concurrency(registry: Any, gguf_path: str) -> None:
    settings = settings_from({"engine": {"models": {
        "a": {"backend": "gguf", "model_path": gguf_path, "prompt_format": "raw"},
        "b": {"backend": "gguf", "model_path": gguf_path, "prompt_format": "raw", "gguf_parallel": 1}}}})
    options = registry.spec("gguf").options_model
    for name, expected in (("a", 4), ("b", 1)):
        model = resolve_model_options(settings.engine.models[name], options, backend="gguf", requires_model_path=True)
        assert registry.hook.llmpool_model_traits(backend="gguf", model=model).concurrency == expected


def test_same_greedy_text_alone_and_batched(registry: Any, gguf_path: str) -> None:
    """Several different prompts decoded in one batch give what each gives alone."""
    runtime = load(registry, gguf_path, gguf_parallel=4, gguf_repack=False)
    try:
        alone = [run(registry, runtime, p, max_tokens=16)[0] for p in PROMPTS[:3]]
        assert runtime.engine.stats["peak_sequences"] == 1
        together = run_together(registry, runtime, PROMPTS[:3], max_tokens=16)
        assert runtime.engine.stats["peak_sequences"] >= 3, "the requests were decoded together"
        assert [t for t, _ in together] == alone
        assert all(done.finish_reason == "length" and done.metrics.output_tokens == 16 for _, done in together)
    finally:
        registry.hook.llmpool_unload(backend="gguf", runtime=runtime)


def test_more_requests_than_slots_all_served_and_slots_reused(registry: Any, gguf_path: str) -> None:
    runtime = load(registry, gguf_path, gguf_parallel=2, gguf_repack=False)
    prompts = PROMPTS[:3] * 2
    try:
        alone = {p: run(registry, runtime, p, max_tokens=8)[0] for p in PROMPTS[:3]}
        results = run_together(registry, runtime, prompts, max_tokens=8)
        assert [t for t, _ in results] == [alone[p] for p in prompts]
        assert all(done.finish_reason == "length" for _, done in results)
        assert runtime.engine.stats["peak_sequences"] == 2
        assert runtime.engine.busy_slots() == 0
    finally:
        registry.hook.llmpool_unload(backend="gguf", runtime=runtime)


def test_cancel_is_seen_within_a_step_and_frees_the_slot(registry: Any, runtime: Any) -> None:
    request = make_request(model="g", prompt_format="raw", text="Once upon a time", max_tokens=200)
    other = threading.Thread(target=run, args=(registry, runtime, "Water boils at"), kwargs={"max_tokens": 40})
    other.start()  # a neighbour in the batch keeps the loop stepping
    item = cancel_after(registry.hook.llmpool_stream(backend="gguf", runtime=runtime, request=request), request, 3)
    assert item.finish_reason == "cancelled"
    assert item.metrics.output_tokens <= 5
    other.join(timeout=60)
    assert runtime.engine.busy_slots() == 0, "a finished stream has left its slot"


def test_closing_a_stream_early_frees_its_slot(registry: Any, runtime: Any) -> None:
    stream = registry.hook.llmpool_stream(backend="gguf", runtime=runtime, request=make_request(
        model="g", prompt_format="raw", text="Once upon a time", max_tokens=200))
    next(stream)
    stream.close()  # the client went away
    assert runtime.engine.busy_slots() == 0


def test_prefix_cache_hit_is_reported_and_answers_the_same(registry: Any, gguf_path: str) -> None:
    runtime = load(registry, gguf_path, gguf_parallel=2)
    try:
        question = PREFIX + "Question: What is the capital of Italy? Answer:"
        cold_text, cold = run(registry, runtime, question, max_tokens=12)
        assert cold.metrics.cached_prompt_tokens == 0
        _, other = run(registry, runtime, PREFIX + "Question: Who wrote Hamlet? Answer:", max_tokens=12)
        prefix_tokens = len(runtime.engine.tokenize(PREFIX.encode(), special=True))
        assert other.metrics.cached_prompt_tokens >= prefix_tokens
        # an unrelated prompt takes the other slot and leaves the prefix cached
        run(registry, runtime, "Water boils at", max_tokens=4)
        text, warm = run(registry, runtime, question, max_tokens=12)
        assert warm.metrics.cached_prompt_tokens >= prefix_tokens
        assert warm.metrics.prompt_tokens == cold.metrics.prompt_tokens
        # the reused cache answers the question as the cold run did (the texts need not be
        # equal to the bit: the rest of the prompt is evaluated in a batch of another size)
        assert cold_text.lstrip().startswith("Rome") and text.lstrip().startswith("Rome")
    finally:
        registry.hook.llmpool_unload(backend="gguf", runtime=runtime)


def test_second_turn_does_not_reevaluate_the_first(registry: Any, runtime: Any) -> None:
    first = make_request(model="g", prompt_format="gemma3_template", text="Name a large city in Japan.",
                         instructions="Answer briefly.", max_tokens=16)
    answer, done1 = run(registry, runtime, "", request=first)
    second = dataclasses.replace(first, multi_turn=True, messages=(
        *first.messages, Message(role="assistant", content=answer), Message(role="user", content="And in China?")))
    _, done2 = run(registry, runtime, "", request=second)
    assert done2.metrics.cached_prompt_tokens >= done1.metrics.prompt_tokens
    assert done2.metrics.prompt_tokens > done1.metrics.prompt_tokens


def test_context_overflow_is_refused_with_the_numbers(registry: Any, runtime: Any) -> None:
    tokens = len(runtime.engine.tokenize(("word " * 600).encode(), special=True)) + 1  # with BOS
    with pytest.raises(BackendError) as info:
        run(registry, runtime, "word " * 600, max_tokens=4)
    assert info.value.status == 400 and info.value.code == "context_length_exceeded"
    assert f"prompt has {tokens} tokens" in info.value.message and "512 tokens per sequence" in info.value.message
    # a prompt that fits with a budget that does not is refused too, never capped silently
    tokens = len(runtime.engine.tokenize(("word " * 450).encode(), special=True)) + 1
    with pytest.raises(BackendError) as info:
        run(registry, runtime, "word " * 450, max_tokens=100)
    assert info.value.status == 400 and info.value.code == "context_length_exceeded"
    assert f"prompt has {tokens} tokens and max_tokens is 100: {tokens + 100} tokens" in info.value.message
    # exactly the context is allowed and may use all of it
    _, done = run(registry, runtime, "word " * 450, max_tokens=512 - tokens)
    assert done.metrics.prompt_tokens + done.metrics.output_tokens <= 512


def test_decode_failure_fails_that_batch_only_and_the_loop_goes_on(registry: Any, gguf_path: str) -> None:
    runtime = load(registry, gguf_path, gguf_parallel=2)
    engine = runtime.engine
    real = engine.decode
    calls = {"n": 0}

    def failing_once(ctx: Any, batch: Any) -> int:  # fault injection: one llama_decode returns -3
        calls["n"] += 1
        return -3 if calls["n"] == 1 else real(ctx, batch)

    try:
        engine.decode = failing_once
        with pytest.raises(BackendError) as info:
            run(registry, runtime, "The capital of France is", max_tokens=8)
        assert info.value.status == 500 and "llama_decode failed (-3" in info.value.message
        assert engine.busy_slots() == 0
        text, done = run(registry, runtime, "The capital of France is", max_tokens=8)
        assert done.finish_reason == "length" and text.startswith(" the capital")
        assert done.metrics.cached_prompt_tokens == 0, "the failed sequence's cache was dropped"
    finally:
        engine.decode = real
        registry.hook.llmpool_unload(backend="gguf", runtime=runtime)


def test_a_long_prompt_does_not_stall_the_others(registry: Any, gguf_path: str) -> None:
    """With a small gguf_n_batch, a long prompt is evaluated in chunks while a running
    sequence keeps getting a token every step."""
    runtime = load(registry, gguf_path, gguf_parallel=2, gguf_n_batch=32)
    try:
        stamps: list[float] = []
        request = make_request(model="g", prompt_format="raw", text="Once upon a time", max_tokens=60)

        def runner() -> None:
            for item in registry.hook.llmpool_stream(backend="gguf", runtime=runtime, request=request):
                if isinstance(item, TextDelta):
                    stamps.append(time.perf_counter())

        thread = threading.Thread(target=runner)
        thread.start()
        while len(stamps) < 3:
            time.sleep(0.01)
        steps_before = runtime.engine.stats["steps"]
        began = time.perf_counter()
        _, done = run(registry, runtime, "word " * 300, max_tokens=2)  # ~10 chunks of 32
        ended = time.perf_counter()
        thread.join(timeout=120)
        assert done.finish_reason == "length"
        assert runtime.engine.stats["steps"] - steps_before >= 10
        # the running sequence got a token in (nearly) every one of those steps
        assert sum(1 for t in stamps if began <= t <= ended) >= 8
        assert runtime.engine.stats["peak_sequences"] == 2
    finally:
        registry.hook.llmpool_unload(backend="gguf", runtime=runtime)


def test_sampler_chains_per_request(registry: Any, runtime: Any) -> None:
    """Greedy takes the argmax; a repetition penalty or a temperature goes through a
    llama.cpp sampler chain of the request's own, next to greedy neighbours."""
    plain, _ = run(registry, runtime, "Water boils at", max_tokens=16)
    assert plain.count("Water boils at") >= 1, "the base model repeats itself when greedy"
    penalized, _ = run(registry, runtime, "Water boils at", max_tokens=16, repetition_penalty=1.5)
    assert penalized != plain
    sampled = run_together(registry, runtime, ("Once upon a time", "Once upon a time"), max_tokens=12)
    request = make_request(model="g", prompt_format="raw", text="Once upon a time", max_tokens=12)
    hot = dataclasses.replace(request, decoding=dataclasses.replace(request.decoding, temperature=1.0, top_k=40))
    text, done = run(registry, runtime, "", request=hot)
    assert done.finish_reason in ("length", "stop") and done.metrics.output_tokens >= 1 and text
    assert sampled[0][0] == sampled[1][0]
