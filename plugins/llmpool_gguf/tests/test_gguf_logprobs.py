"""Token log probabilities from the GGUF decode loop (Gemma 3 270M Q4_K_M): the values
llama-cpp-python's own completion API reports, attached to the text they produced."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

from llmpoold.testing import collect, make_request
from llmpoold.types import Completion, TextDelta, TokenLogprob

pytestmark = pytest.mark.timeout(180)

PROMPT = "The capital of France is"


def run(registry: Any, runtime: Any, logprobs: int | None, **decoding: Any) -> tuple[list[TextDelta], Completion]:
    request = dataclasses.replace(make_request(model="g", prompt_format="raw", text=PROMPT, **decoding),
                                  logprobs=logprobs)
    items = collect(registry.hook.llmpool_stream(backend="gguf", runtime=runtime, request=request))
    assert isinstance(items[-1], Completion)
    return [i for i in items[:-1] if isinstance(i, TextDelta)], items[-1]


def entries(deltas: list[TextDelta]) -> list[TokenLogprob]:
    return [e for d in deltas for e in d.logprobs]


def test_logprobs_match_llama_cpp_itself(registry: Any, runtime: Any, gguf_path: str) -> None:
    import llama_cpp

    deltas, done = run(registry, runtime, 3, max_tokens=8)
    scored = entries(deltas)
    assert len(scored) == done.metrics.output_tokens == 8
    assert "".join(e.token for e in scored) == "".join(d.text for d in deltas)
    for e in scored:
        assert [alt.logprob for alt in e.top] == sorted((alt.logprob for alt in e.top), reverse=True)
        assert (e.top[0].token, e.top[0].logprob) == (e.token, e.logprob)  # greedy: the top-1
        assert sum(math.exp(alt.logprob) for alt in e.top) <= 1 + 1e-6
    # llama-cpp-python's reference: log-softmax of its kept logits (logits_all), the same
    # raw distribution before sampling
    llm = llama_cpp.Llama(gguf_path, n_ctx=64, logits_all=True, verbose=False)
    try:
        reference = llm.create_completion(PROMPT, max_tokens=8, temperature=0, top_k=1, logprobs=3)
    finally:
        llm.close()
    ref = reference["choices"][0]["logprobs"]
    assert [e.token for e in scored] == ref["tokens"]
    # Another context (batch shapes, attention kernel) moves this small quantized model's
    # logits by up to ~0.2 (our own engine's cold and cached prompts differ as much), so
    # the bound is loose; an unnormalised, tempered or misplaced value is off by far more.
    assert [e.logprob for e in scored] == pytest.approx(ref["token_logprobs"], abs=0.3)
    for e, top in zip(scored, ref["top_logprobs"], strict=True):
        shared = [alt for alt in e.top if alt.token in top]
        assert len(shared) >= 2 and all(alt.logprob == pytest.approx(top[alt.token], abs=0.3) for alt in shared)


def test_logprobs_do_not_change_the_text_and_stop_tokens_are_not_reported(registry: Any, runtime: Any) -> None:
    plain, _ = run(registry, runtime, None, max_tokens=12)
    assert entries(plain) == []
    deltas, _ = run(registry, runtime, 0, max_tokens=12)
    assert [d.text for d in deltas] == [d.text for d in plain]
    assert all(e.top == () and e.logprob <= 0 for e in entries(deltas))
    stopped, done = run(registry, runtime, 0, max_tokens=12, stop=(" of the country",))
    text = "".join(d.text for d in stopped)
    assert done.finish_reason == "stop" and text and "".join(d.text for d in plain).startswith(text + " of the")
    assert "".join(e.token for e in entries(stopped)) == text
