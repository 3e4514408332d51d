"""The GGUF plugin's embeddings (``gguf_embedding: true``) on the real Gemma 3 270M: the
settings' checks, the hook contract (one unit vector per input, of llama.cpp's
``llama_model_n_embd``), a batch packed into as few ``llama_decode`` calls as
``gguf_n_ctx`` and ``gguf_parallel`` allow, overflow and cancellation, and generation refused."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from llmpoold.backend import Backend
from llmpoold.config import resolve_model_options
from llmpoold.errors import ApiError, BackendError
from llmpoold.testing import make_request, settings_from
from llmpoold.types import CancelToken, EmbeddingRequest

pytest.importorskip("llama_cpp")


def resolve(registry: Any, gguf_path: str, **keys: Any) -> Any:
    entry = {"backend": "gguf", "model_path": gguf_path, "gguf_n_ctx": 64, "gguf_embedding": True, **keys}
    settings = settings_from({"engine": {"models": {"e": entry}}})
    return resolve_model_options(settings.engine.models["e"], registry.spec("gguf").options_model,
                                 backend="gguf", requires_model_path=True)


@pytest.fixture(scope="module")
def model(registry: Any, gguf_path: str) -> Any:
    return resolve(registry, gguf_path, gguf_parallel=2)


@pytest.fixture(scope="module")
def runtime(registry: Any, model: Any) -> Iterator[Any]:
    runtime = registry.hook.llmpool_load(backend="gguf", replica_id="e#1", model=model)
    yield runtime
    registry.hook.llmpool_unload(backend="gguf", runtime=runtime)


def request(*inputs: str, cancel: CancelToken | None = None) -> EmbeddingRequest:
    return EmbeddingRequest(request_id="t", model="e", replica_id="e#1", inputs=inputs,
                            **({"cancel": cancel} if cancel else {}))


def test_settings_are_checked_with_the_key_named(registry: Any, gguf_path: str) -> None:
    assert resolve(registry, gguf_path).options.gguf_pooling is None  # the model's own, else mean
    assert resolve(registry, gguf_path, gguf_pooling="cls").options.gguf_pooling == "cls"
    for keys, message in (({"gguf_pooling": "max"}, "gguf_pooling"),
                          ({"gguf_embedding": "sometimes"}, "gguf_embedding"),
                          ({"gguf_embedding": False, "gguf_pooling": "mean"},
                           "gguf_pooling applies only with gguf_embedding: true")):
        with pytest.raises(ValueError, match=message):
            resolve(registry, gguf_path, **keys)


def test_traits_declare_embeddings_only(registry: Any, model: Any) -> None:
    caps = Backend(registry, "gguf").traits(model)
    assert caps.concurrency == 1  # one batch of inputs at a time; the fair queue orders requests
    assert caps.capabilities.embeddings and not caps.capabilities.generation
    assert caps.capabilities.to_json()["embeddings"] is True


def test_vectors_are_unit_length_of_the_models_dimension(registry: Any, runtime: Any) -> None:
    from llama_cpp import llama_cpp as low

    engine = runtime.engine
    assert engine.n_embd == low.llama_model_n_embd(engine.model) == 640 and engine.pooling == "mean"
    result = Backend(registry, "gguf").embed(runtime, request("hello world", "hello world", "goodbye moon"))
    vectors = np.array(result.vectors)
    assert vectors.shape == (3, 640)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # the same text in two rows of one batch: equal but for llama.cpp's last bits
    assert np.allclose(vectors[0], vectors[1], atol=1e-5) and not np.allclose(vectors[0], vectors[2], atol=1e-2)
    again = Backend(registry, "gguf").embed(runtime, request("hello world", "hello world", "goodbye moon"))
    assert again.vectors == result.vectors  # the same request, the same vectors
    assert result.metrics.prompt_tokens == sum(len(engine.tokenize(t)) for t in ("hello world",) * 2 +
                                               ("goodbye moon",))


def test_a_batch_takes_as_few_decodes_as_the_context_allows(registry: Any, runtime: Any) -> None:
    engine = runtime.engine
    assert engine.n_seq_max == 2 and engine.n_batch == 64
    before = engine.stats["decodes"]
    # 5 short inputs, at most 2 sequences per call: 3 calls
    Backend(registry, "gguf").embed(runtime, request(*(f"text number {i}" for i in range(5))))
    assert engine.stats["decodes"] - before == 3
    # two inputs of ~40 tokens do not fit one 64-token call together: 2 calls
    before = engine.stats["decodes"]
    Backend(registry, "gguf").embed(runtime, request("one two three four " * 9, "five six seven eight " * 9))
    assert engine.stats["decodes"] - before == 2


def test_overflow_and_cancel_and_generation_refused(registry: Any, runtime: Any) -> None:
    backend = Backend(registry, "gguf")
    before = runtime.engine.stats["decodes"]
    with pytest.raises(BackendError) as info:
        backend.embed(runtime, request("fine", "word " * 100))
    assert info.value.status == 400 and info.value.code == "context_length_exceeded"
    assert info.value.param == "input" and "input 1 has" in str(info.value)
    assert "context is 64 tokens" in str(info.value)
    assert runtime.engine.stats["decodes"] == before  # nothing evaluated
    cancel = CancelToken()
    cancel.set()
    with pytest.raises(BackendError) as info:  # checked between decode calls: the first call only
        backend.embed(runtime, request("a", "b", "c", cancel=cancel))
    assert runtime.engine.stats["decodes"] == before + 1
    with pytest.raises(ApiError) as refused:
        list(registry.hook.llmpool_stream(backend="gguf", runtime=runtime, request=make_request(model="e")))
    assert refused.value.code == "embeddings_only"


def test_a_generation_model_does_not_embed(registry: Any, gguf_path: str) -> None:
    settings = settings_from({"engine": {"models": {"g": {"backend": "gguf", "model_path": gguf_path,
                                                          "prompt_format": "raw", "gguf_n_ctx": 64,
                                                          "gguf_parallel": 1}}}})
    model = resolve_model_options(settings.engine.models["g"], registry.spec("gguf").options_model,
                                  backend="gguf", requires_model_path=True)
    backend = Backend(registry, "gguf")
    assert not backend.traits(model).capabilities.embeddings
    runtime = backend.load("g#1", model)
    try:
        with pytest.raises(ApiError) as info:
            backend.embed(runtime, request("hello"))
        assert info.value.status == 400 and info.value.code == "embeddings_unsupported"
    finally:
        backend.unload(runtime)
