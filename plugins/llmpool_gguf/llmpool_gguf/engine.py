"""The decode loop: llama-server's slot loop on llama.cpp's low-level API.

One :class:`Engine` per replica owns a ``llama_model``, one ``llama_context`` made for
``gguf_parallel`` sequences (each with ``gguf_n_ctx`` cells of its own: the KV cache is
not unified, as llama-server's ``--parallel N``), one ``llama_batch`` of ``gguf_n_batch``
tokens and a thread that runs the loop. Each step builds one batch: the next token of
every generating sequence, then prompt chunks of newly admitted ones while room is left
(so a long prompt does not stall the others' decoding), calls ``llama_decode`` once and
samples each sequence that produced logits with its own sampler
(:class:`~llmpool_gguf.sampling.RequestSampler`, reading them with ``llama_get_logits_ith``).

Slots keep their KV cache after a request: a new request takes the free slot that keeps
the most (the prefix of its prompt the slot holds, minus the cached tokens it would
overwrite) and evaluates only the rest; a chat's next turn so skips the previous turns.

The high-level ``llama_cpp.Llama`` is not used: it keeps per-context Python buffers
(``scores``: ``n_batch × n_vocab`` float32, 512 MiB of address space for Gemma's 262k
vocabulary) that a loop sampling with ``llama_sampler_sample`` never needs.

Everything that touches the context runs on the loop thread; the request threads only
tokenize and detokenize (read-only vocabulary calls, thread-safe in llama.cpp) and talk
to the loop through queues: a job's ``events`` carries sampled token ids, then
``("done", finish_reason)`` or ``("error", exception)``.

Log probabilities (a job with ``logprobs`` set): after sampling, the loop reads that
sequence's raw logits, takes their log-softmax and puts ``(logprob of the sampled token,
[(token, logprob) of the top N]``) on the job's ``scored`` deque before the token's
event, so the request thread finds it there when it reads the token. The values are
the model's distribution: raw logits, before temperature, penalties, top-k/top-p and
the grammar (as OpenAI reports them), computed only for jobs that asked (a Gemma
vocabulary has 262k entries).
"""

from __future__ import annotations

import ctypes
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog

from llmpool_gguf.native import context_params, free_native, load_model, model_metadata, tokenize
from llmpool_gguf.native import low as _low
from llmpool_gguf.options import GgufOptions
from llmpool_gguf.sampling import RequestSampler
from llmpoold.errors import BackendError, LoadError
from llmpoold.types import Decoding

log = structlog.get_logger("llmpool_gguf")

_DECODE_ERRORS = {1: "no KV cache slot for the batch", 2: "aborted", -1: "invalid input batch"}


@dataclass(eq=False)
class Job:
    """One request inside the loop. The request thread sets ``stop`` when it no longer
    wants tokens (stop string matched, client gone); the loop then frees the slot."""

    prompt: list[int]
    budget: int
    decoding: Decoding
    cancel: Any
    grammar: str | None = None  # GBNF enforcing the request's response_format (llmpool_gguf.grammar)
    events: queue.Queue[Any] = field(default_factory=queue.Queue)
    stop: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    cached_tokens: int = 0  # prompt tokens whose KV cache was reused
    produced: int = 0
    logprobs: int | None = None  # None: off; else the number of top alternatives to score
    # per generated token, in order: (its logprob, [(token, logprob)] of the top ``logprobs``)
    scored: deque[tuple[float, list[tuple[int, float]]]] = field(default_factory=deque)


@dataclass(eq=False)
class _Slot:
    seq_id: int
    tokens: list[int] = field(default_factory=list)  # what this sequence's KV cache holds, in order
    job: Job | None = None
    sampler: RequestSampler | None = None
    pending: int | None = None  # the sampled token, decoded in the next step
    i_batch: int = -1  # index of this slot's logits in the current batch
    last_used: float = 0.0


class Engine:
    """A loaded GGUF model with ``gguf_parallel`` sequence slots and its decode loop."""

    def __init__(self, path: str, options: GgufOptions, replica_id: str) -> None:
        low = _low()
        self.options = options
        self.replica_id = replica_id
        self.n_parallel = options.gguf_parallel
        params = self._context_params(options)
        self.model = load_model(path, options)
        self.ctx: Any = None
        self.batch: Any = None
        try:
            self.vocab = low.llama_model_get_vocab(self.model)
            self.n_vocab = low.llama_vocab_n_tokens(self.vocab)
            self.bos = low.llama_vocab_bos(self.vocab)
            self.eos = low.llama_vocab_eos(self.vocab)
            self.add_bos = bool(low.llama_vocab_get_add_bos(self.vocab))
            self.ctx = low.llama_init_from_model(self.model, params)
            if not self.ctx:
                raise ValueError("llama_init_from_model failed (context too large for memory?)")
            self.memory = low.llama_get_memory(self.ctx)
            self.n_ctx_seq = low.llama_n_ctx_seq(self.ctx)
            self.n_batch = low.llama_n_batch(self.ctx)
            self.n_swa = 0 if options.gguf_swa_full else low.llama_model_n_swa(self.model)
            self.batch = low.llama_batch_init(self.n_batch, 0, 1)
        except BaseException:
            self._free()
            raise
        # A seam for fault injection in tests: called as decode(ctx, batch) -> int.
        self.decode = low.llama_decode
        self.slots = [_Slot(seq_id=i) for i in range(self.n_parallel)]
        # counters for tests and the benchmark's profile: steps, seconds inside llama_decode and
        # in whole steps, tokens decoded, most sequences in one batch
        self.stats: dict[str, float] = {"steps": 0, "decode_s": 0.0, "step_s": 0.0, "tokens": 0, "peak_sequences": 0}
        self._pending: queue.Queue[Job | None] = queue.Queue()
        self._waiting: deque[Job] = deque()
        self._closing = False
        self._readers, self._readers_lock = 0, threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"llmpool-gguf-{replica_id}", daemon=True)
        self._thread.start()

    def _context_params(self, options: GgufOptions) -> Any:
        params = context_params(options)
        params.n_seq_max = self.n_parallel
        params.kv_unified = False  # each sequence owns gguf_n_ctx cells
        params.n_ctx = options.gguf_n_ctx * self.n_parallel
        params.n_batch = params.n_ubatch = min(options.gguf_n_batch, params.n_ctx)
        # the loop asks for one row of logits per sequence per step
        params.n_outputs_max = self.n_parallel
        params.swa_full = options.gguf_swa_full
        return params

    # ----- vocabulary (any thread) -------------------------------------------------------

    def tokenize(self, data: bytes, *, special: bool) -> list[int]:
        """``data`` as tokens, no BOS added; ``special`` parses special-token markup."""
        return tokenize(self.vocab, data, add_bos=False, special=special)

    def piece(self, token: int) -> bytes:
        """The bytes of one generated token (special tokens render as nothing)."""
        low = _low()
        buf = ctypes.create_string_buffer(64)
        n = low.llama_token_to_piece(self.vocab, token, buf, 64, 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = low.llama_token_to_piece(self.vocab, token, buf, -n, 0, False)
        return buf.raw[:n]

    def token_text(self, token: int) -> str:
        if token == -1:
            return ""
        return (_low().llama_vocab_get_text(self.vocab, token) or b"").decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(_low().llama_vocab_is_eog(self.vocab, token))

    def metadata(self, key: str) -> str | None:
        """One GGUF metadata value as a string (None when absent)."""
        return model_metadata(self.model, key)

    # ----- requests (request threads) ----------------------------------------------------

    def new_sampler(self, decoding: Decoding, grammar: str | None = None) -> RequestSampler:
        """The sampler of one request (:mod:`llmpool_gguf.sampling`): ``decoding``'s
        chain, and ``grammar`` (GBNF) checked on each chosen token. Raises ValueError
        where llama.cpp cannot parse ``grammar``."""
        return RequestSampler(self.vocab, self.n_vocab, decoding, grammar, self.options.gguf_seed)

    def submit(self, job: Job) -> None:
        if self._closing:
            raise LoadError(f"replica {self.replica_id} is unloaded")
        self._pending.put(job)

    def reading(self) -> Any:
        """Context manager around a request thread's use of the vocabulary, so that
        :meth:`close` frees the model only once no request thread reads it."""
        engine = self

        class _Reading:
            def __enter__(self) -> None:
                with engine._readers_lock:
                    if engine.model is None:
                        raise LoadError(f"replica {engine.replica_id} is unloaded")
                    engine._readers += 1

            def __exit__(self, *exc: object) -> None:
                with engine._readers_lock:
                    engine._readers -= 1

        return _Reading()

    def busy_slots(self) -> int:
        return sum(1 for slot in self.slots if slot.job is not None)

    def close(self) -> None:
        """Stop the loop (jobs still inside get an error), then free llama.cpp's objects."""
        self._closing = True
        self._pending.put(None)
        self._thread.join(timeout=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the request threads leave on the loop's error
            with self._readers_lock:
                if self._readers == 0:
                    self._free()
                    return
            time.sleep(0.01)
        log.error("gguf_unload_with_readers", replica=self.replica_id, readers=self._readers)

    def _free(self) -> None:
        free_native(self)

    # ----- the loop (its own thread) -----------------------------------------------------

    def _run(self) -> None:
        try:
            while self._take_jobs():
                self._release_unwanted()
                self._admit()
                if any(slot.job is not None for slot in self.slots):
                    self._step()
        except BaseException as exc:  # noqa: BLE001 - the requests inside must hear of it
            log.error("gguf_loop_failed", replica=self.replica_id, error=repr(exc))
            self._fail_all(BackendError(500, "backend_error", f"llama.cpp decode loop failed: {exc}"))
            raise
        self._fail_all(LoadError(f"replica {self.replica_id} is unloaded"))

    def _take_jobs(self) -> bool:
        """Move new jobs to the waiting line; block only when there is nothing to do.
        False once the engine is closing."""
        idle = not self._waiting and all(slot.job is None for slot in self.slots)
        while True:
            try:
                job = self._pending.get(block=idle)
            except queue.Empty:
                return True
            if job is None:
                return False
            self._waiting.append(job)
            idle = False

    def _release_unwanted(self) -> None:
        for slot in self.slots:
            job = slot.job
            if job is not None and (job.stop.is_set() or job.cancel.is_set()):
                self._release(slot, ("done", "cancelled"))
        for job in list(self._waiting):
            if job.stop.is_set() or job.cancel.is_set():
                self._waiting.remove(job)
                job.events.put(("done", "cancelled"))

    def _admit(self) -> None:
        low = _low()
        while self._waiting:
            free = [slot for slot in self.slots if slot.job is None]
            if not free:
                return
            job = self._waiting.popleft()
            slot, shared = self._choose(free, job.prompt)
            # at least the last prompt token is evaluated: its logits give the first token
            n_past = min(shared, len(job.prompt) - 1)
            if not self._keep_prefix(slot, n_past):
                low.llama_memory_seq_rm(self.memory, slot.seq_id, -1, -1)
                n_past = 0
            del slot.tokens[n_past:]
            job.cached_tokens = n_past
            slot.job, slot.pending = job, None
            try:
                slot.sampler = self.new_sampler(job.decoding, job.grammar)
            except ValueError as exc:
                self._release(slot, ("error", BackendError(400, "invalid_response_format", str(exc))))

    @staticmethod
    def _choose(free: list[_Slot], prompt: list[int]) -> tuple[_Slot, int]:
        """The free slot that keeps the most: the prompt prefix it already holds minus the
        cached tokens the prompt would overwrite (ties: the least recently used). So a
        chat's next turn or a question after a cached system prompt reuses that cache, and
        a short unrelated prompt takes an empty or small slot rather than overwrite a long
        prefix only because both start with BOS. Returns the slot and the shared length."""
        best: tuple[int, float] | None = None
        choice, shared = free[0], 0
        for slot in free:
            n = 0
            for a, b in zip(slot.tokens, prompt, strict=False):
                if a != b:
                    break
                n += 1
            score = (n - (len(slot.tokens) - n), -slot.last_used)
            if best is None or score > best:
                best, choice, shared = score, slot, n
        return choice, shared

    def _keep_prefix(self, slot: _Slot, n_past: int) -> bool:
        """Drop the slot's cache from ``n_past`` on; False when the rest cannot be reused
        (a partial removal llama.cpp refuses, or sliding-window layers that no longer
        hold the window before ``n_past``)."""
        low = _low()
        if n_past <= 0:
            return False
        if not low.llama_memory_seq_rm(self.memory, slot.seq_id, n_past, -1):
            return False
        if self.n_swa > 0:
            pos_min = low.llama_memory_seq_pos_min(self.memory, slot.seq_id)
            if pos_min > max(0, n_past - self.n_swa):
                return False
        return True

    def _step(self) -> None:
        low = _low()
        started = time.perf_counter()
        batch, n = self.batch, 0
        chunks: list[tuple[_Slot, list[int]]] = []
        for slot in self.slots:
            slot.i_batch = -1
            if slot.job is not None and slot.pending is not None:
                self._put(batch, n, slot.pending, len(slot.tokens), slot.seq_id, True)
                slot.i_batch = n
                chunks.append((slot, [slot.pending]))
                n += 1
        for slot in self.slots:
            job = slot.job
            if job is None or slot.pending is not None or n >= self.n_batch:
                continue
            chunk = job.prompt[len(slot.tokens):len(slot.tokens) + self.n_batch - n]
            ends = len(slot.tokens) + len(chunk) == len(job.prompt)
            for k, token in enumerate(chunk):
                self._put(batch, n + k, token, len(slot.tokens) + k, slot.seq_id, ends and k == len(chunk) - 1)
            if ends:
                slot.i_batch = n + len(chunk) - 1
            chunks.append((slot, chunk))
            n += len(chunk)
        batch.n_tokens = n
        decode_started = time.perf_counter()
        ret = self.decode(self.ctx, batch)
        decoded = time.perf_counter()
        self.stats["decode_s"] += decoded - decode_started
        if ret != 0:
            meaning = _DECODE_ERRORS.get(ret, "fatal error")
            log.error("gguf_decode_failed", replica=self.replica_id, code=ret, tokens=n, sequences=len(chunks))
            for slot, _ in chunks:
                low.llama_memory_seq_rm(self.memory, slot.seq_id, -1, -1)
                slot.tokens.clear()
                self._release(slot, ("error", BackendError(
                    500, "backend_error", f"llama_decode failed ({ret}: {meaning}) for a batch of {n} tokens")))
            return
        for slot, chunk in chunks:
            slot.tokens.extend(chunk)
            if slot.i_batch < 0:
                continue
            job = slot.job
            assert job is not None and slot.sampler is not None
            token = slot.sampler.sample(self.ctx, slot.i_batch)
            job.produced += 1
            if self.is_eog(token):
                self._release(slot, ("done", "stop"))
                continue
            if job.logprobs is not None:
                job.scored.append(self._score(slot.i_batch, token, job.logprobs))
            job.events.put(token)
            slot.pending = token
            if job.produced >= job.budget:
                self._release(slot, ("done", "length"))
        self.stats["steps"] += 1
        self.stats["tokens"] += n
        self.stats["peak_sequences"] = max(self.stats["peak_sequences"], len(chunks))
        self.stats["step_s"] += time.perf_counter() - started

    def _score(self, i_batch: int, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
        """The log-softmax of the raw logits at ``i_batch``: ``token``'s log probability
        and the ``top`` most likely tokens with theirs, most likely first (ties: the
        lower id, as the greedy argmax picks). -inf is reported as -9999.0 (as OpenAI
        does), so the values stay valid JSON."""
        logits = np.ctypeslib.as_array(_low().llama_get_logits_ith(self.ctx, i_batch), shape=(self.n_vocab,))
        peak = float(logits.max())
        # stable: exp of (logit - max) in float32, summed in float64
        log_total = peak + float(np.log(np.exp(logits - peak).sum(dtype=np.float64)))

        def logprob(value: float) -> float:
            return max(float(value) - log_total, -9999.0)

        best: list[tuple[int, float]] = []
        if top > 0:
            # The top N lie among the logits near the peak (tens to a few thousand of 262k):
            # partitioning those costs a tenth of partitioning the whole vocabulary.
            for margin in (8.0, 16.0, float("inf")):
                candidates = np.flatnonzero(logits >= peak - margin)
                if len(candidates) >= top:
                    break
            if len(candidates) > top:
                candidates = candidates[np.argpartition(-logits[candidates], top - 1)[:top]]
            ids = candidates[np.lexsort((candidates, -logits[candidates]))]
            best = [(int(i), logprob(logits[i])) for i in ids]
        return logprob(logits[token]), best

    @staticmethod
    def _put(batch: Any, i: int, token: int, pos: int, seq_id: int, logits: bool) -> None:
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq_id
        batch.logits[i] = logits

    def _release(self, slot: _Slot, event: tuple[str, Any]) -> None:
        """The job leaves its slot; the slot's KV cache stays for the next prompt."""
        if slot.sampler is not None:
            slot.sampler.free()
            slot.sampler = None
        if slot.job is not None:
            slot.job.events.put(event)
        slot.job, slot.pending, slot.i_batch = None, None, -1
        slot.last_used = time.perf_counter()

    def _fail_all(self, exc: BaseException) -> None:
        for slot in self.slots:
            if slot.job is not None:
                self._release(slot, ("error", exc))
        while self._waiting:
            self._waiting.popleft().events.put(("error", exc))
        while True:
            try:
                job = self._pending.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.events.put(("error", exc))
