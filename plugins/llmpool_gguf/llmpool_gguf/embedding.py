"""Embeddings on llama.cpp's low-level API, for a model configured ``gguf_embedding: true``.

An :class:`EmbeddingEngine` owns a ``llama_model`` and one ``llama_context`` made with
``embeddings=True`` and a pooling type (``gguf_pooling``, else the model's own from its
GGUF header, else mean), as llama-cpp-python's ``Llama.embed`` and llama-server's
``--embeddings`` do. It has no decode loop: :meth:`EmbeddingEngine.embed` packs the
inputs into as few ``llama_decode`` calls as the batch allows (each input one sequence,
at most ``gguf_parallel`` sequences and ``gguf_n_ctx`` tokens per call; a sequence is
never split, since pooling needs all of it in one batch), reads one pooled vector per
sequence with ``llama_get_embeddings_seq``, clears the memory and L2-normalises each
vector (as OpenAI and llama-server return them). An encoder-only model (BERT-like) is
evaluated with ``llama_encode``.

One lock serialises the calls that touch the context; the model's concurrency is 1, so
the pool's fair queue, not this lock, orders requests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmpool_gguf.native import context_params, free_native, load_model, model_metadata, tokenize
from llmpool_gguf.native import low as _low
from llmpool_gguf.options import GgufOptions
from llmpoold.errors import BackendError, LoadError
from llmpoold.types import BackendMetrics, CancelToken, EmbeddingResult

POOLING = {"mean": 1, "cls": 2, "last": 3}  # llama.cpp's LLAMA_POOLING_TYPE_* values


@dataclass
class EmbeddingRuntime:
    """The runtime handle of a model loaded with ``gguf_embedding: true``."""

    replica_id: str
    model_path: str
    engine: EmbeddingEngine


class EmbeddingEngine:
    """A loaded GGUF model that turns texts into pooled, normalised vectors."""

    def __init__(self, path: str, options: GgufOptions, replica_id: str) -> None:
        low = _low()
        self.options = options
        self.replica_id = replica_id
        params = context_params(options)  # a bad cache type fails before the model loads
        self.model = load_model(path, options)
        self.ctx: Any = None
        self.batch: Any = None
        self.lock = threading.Lock()
        try:
            self.vocab = low.llama_model_get_vocab(self.model)
            self.n_embd = int(low.llama_model_n_embd(self.model))
            self.pooling = options.gguf_pooling or self._model_pooling()
            self.ctx = low.llama_init_from_model(self.model, self._context_params(params))
            if not self.ctx:
                raise ValueError("llama_init_from_model failed (context too large for memory?)")
            self.memory = low.llama_get_memory(self.ctx)
            self.n_ctx = int(low.llama_n_ctx(self.ctx))
            self.n_batch = int(low.llama_n_batch(self.ctx))
            self.n_seq_max = int(low.llama_n_seq_max(self.ctx))
            self.batch = low.llama_batch_init(self.n_batch, 0, 1)
        except BaseException:
            self._free()
            raise
        self.encoder_only = bool(low.llama_model_has_encoder(self.model)) and not bool(
            low.llama_model_has_decoder(self.model))
        self.add_bos = bool(low.llama_vocab_get_add_bos(self.vocab))
        self.add_eos = bool(low.llama_vocab_get_add_eos(self.vocab))
        self.stats: dict[str, float] = {"calls": 0, "decodes": 0, "tokens": 0, "decode_s": 0.0}

    def _model_pooling(self) -> str:
        """The pooling the GGUF header names (``<arch>.pooling_type``) when it is one that
        yields a single vector per input, else mean (a generative model has none)."""
        arch = model_metadata(self.model, "general.architecture")
        value = model_metadata(self.model, f"{arch}.pooling_type") if arch else None
        by_id = {str(v): k for k, v in POOLING.items()}
        return by_id.get(value or "", "mean")

    def _context_params(self, params: Any) -> Any:
        options = self.options
        params.embeddings = True
        params.pooling_type = POOLING[self.pooling]
        params.n_ctx = options.gguf_n_ctx
        # A pooled sequence must be evaluated in one micro-batch: the batch is the context.
        params.n_batch = params.n_ubatch = options.gguf_n_ctx
        params.n_seq_max = options.gguf_parallel
        params.kv_unified = True  # the inputs of one call share the context's cells
        return params

    # ----- any thread ------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        """``text`` as the model reads it for an embedding: BOS and EOS where its
        vocabulary adds them, special-token markup not parsed (as ``Llama.embed``)."""
        tokens = tokenize(self.vocab, text.encode("utf-8"), add_bos=self.add_bos, special=False)
        if self.add_eos:
            tokens.append(_low().llama_vocab_eos(self.vocab))
        return tokens

    def embed(self, inputs: Sequence[str], cancel: CancelToken | None = None) -> EmbeddingResult:
        """One normalised vector per input, in order. Raises BackendError 400
        ``context_length_exceeded`` (nothing evaluated) when an input does not fit the
        context. ``cancel`` is checked between decode calls."""
        started = time.perf_counter()
        tokenized = [self.tokenize(text) for text in inputs]
        tokenize_ms = (time.perf_counter() - started) * 1000
        for i, tokens in enumerate(tokenized):
            if len(tokens) > self.n_batch:
                raise BackendError(400, "context_length_exceeded",
                                   f"input {i} has {len(tokens)} tokens; the model's context is {self.n_batch} "
                                   "tokens (gguf_n_ctx)", param="input")
            if not tokens:
                raise BackendError(400, "invalid_value", f"input {i} has no tokens", param="input")
        vectors: list[np.ndarray] = []
        with self.lock:
            if self.ctx is None:
                raise LoadError(f"replica {self.replica_id} is unloaded")
            group: list[list[int]] = []
            for tokens in tokenized:
                if group and (sum(map(len, group)) + len(tokens) > self.n_batch or len(group) >= self.n_seq_max):
                    vectors += self._evaluate(group)
                    group = []
                    if cancel is not None and cancel.is_set():
                        raise BackendError(499, "cancelled", "the request was cancelled")
                group.append(tokens)
            vectors += self._evaluate(group)
        self.stats["calls"] += 1
        total_ms = (time.perf_counter() - started) * 1000
        n_tokens = sum(map(len, tokenized))
        return EmbeddingResult(
            vectors=tuple(tuple(float(x) for x in v) for v in vectors),
            metrics=BackendMetrics(tokenize_ms=round(tokenize_ms, 3), generate_total_ms=round(total_ms, 3),
                                   prompt_tokens=n_tokens, cached_prompt_tokens=0, output_tokens=0))

    # ----- under the lock ----------------------------------------------------------------

    def _evaluate(self, group: list[list[int]]) -> list[np.ndarray]:
        """One decode (or encode) call for ``group`` (one sequence each); their vectors."""
        low = _low()
        batch = self.batch
        n = 0
        for seq_id, tokens in enumerate(group):
            for pos, token in enumerate(tokens):
                batch.token[n] = token
                batch.pos[n] = pos
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq_id
                batch.logits[n] = True  # every token is an output of a pooled sequence
                n += 1
        batch.n_tokens = n
        started = time.perf_counter()
        try:
            rc = (low.llama_encode if self.encoder_only else low.llama_decode)(self.ctx, batch)
            if rc != 0:
                raise BackendError(500, "backend_error", f"llama.cpp could not evaluate the inputs (code {rc})")
            out = []
            for seq_id in range(len(group)):
                ptr = low.llama_get_embeddings_seq(self.ctx, seq_id)
                if not ptr:
                    raise BackendError(500, "backend_error", "llama.cpp returned no pooled embedding")
                vector = np.ctypeslib.as_array(ptr, shape=(self.n_embd,)).astype(np.float32)
                norm = float(np.linalg.norm(vector))
                out.append(vector / norm if norm > 0 else vector)
            return out
        finally:
            low.llama_memory_clear(self.memory, True)
            self.stats["decodes"] += 1
            self.stats["tokens"] += n
            self.stats["decode_s"] += time.perf_counter() - started

    def close(self) -> None:
        with self.lock:
            self._free()

    def _free(self) -> None:
        free_native(self)
