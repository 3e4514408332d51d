"""llmpool backend plugin ``ct2``: CTranslate2 decoder models with dynamic batching.

One runtime is one ``ctranslate2.Generator`` plus its Hugging Face tokenizer (saved
next to ``model.bin``). A batcher thread per replica gathers the requests waiting for
it (up to ``ct2_max_batch_size``, for at most ``ct2_batch_wait_ms`` after the first)
and decodes each group of compatible requests in one ``generate_batch`` call. The
per-step ``callback`` hands each request its tokens as they are produced (``batch_id``
says whose) and returns True to end one request's decoding (stop string, max_tokens,
cancel) without disturbing the others. The replica declares the batch size as its
concurrency, so the scheduler sends it that many requests at once.

Requests in one call share the sampling settings that CTranslate2 takes per call
(``sampling_topk``, ``sampling_topp``, ``sampling_temperature``,
``repetition_penalty``, ``beam_size``, end tokens); requests that differ there go in
separate calls, one after the other. ``max_tokens`` is per request (via the callback).
Beam search (``beam_size`` > 1) has no per-step callback: its text arrives at the end.
"""

from __future__ import annotations

import functools
import json
import math
import os
import queue
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field

from llmpoold import hookimpl
from llmpoold.errors import BackendError, LoadError
from llmpoold.hookspecs import BackendSpec
from llmpoold.prompts import SEED_THINKING_FORMATS, RenderedPrompt, capabilities_for, render
from llmpoold.segments import PromptSegment, template_segments, tokenize_segments
from llmpoold.textstream import GenerationClock, IncrementalDetokenizer, TextPipeline, queue_items
from llmpoold.types import Completion, GenerationRequest, MemoryEstimate, ModelTraits, TextDelta

BACKEND = "ct2"
log = structlog.get_logger("llmpool_ct2")


class Ct2Options(BaseModel):
    """Per-model keys of the ``ct2`` backend."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device: Literal["auto", "cpu", "cuda"] = "auto"
    compute_type: str = "int8"
    ct2_device_index: int | list[int] = 0
    ct2_inter_threads: int = Field(1, ge=1)
    ct2_intra_threads: int = Field(0, ge=0, description="0: CTranslate2's default (the machine's cores)")
    ct2_max_batch_size: int = Field(8, ge=1, le=256)
    ct2_batch_wait_ms: float = Field(5.0, ge=0, le=1000)
    ct2_cache_static_prompt: bool = True
    ct2_max_context: int | None = Field(
        None, ge=1, description="prompt + max_tokens limit; null: the model's max_position_embeddings from "
        "config.json, else the tokenizer's model_max_length, else no limit is known")


def context_limit(path: str, options: Ct2Options, tokenizer: Any) -> int | None:
    """The model's context in tokens: ``ct2_max_context``, else ``max_position_embeddings``
    in the directory's ``config.json`` (top level or ``text_config``; a Hugging Face config
    copied next to ``model.bin``), else the tokenizer's ``model_max_length`` when it is a
    real number (transformers writes ~1e30 for "unknown"), else None (unknown)."""
    if options.ct2_max_context is not None:
        return options.ct2_max_context
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
            config = json.load(fh)
    except (OSError, ValueError):
        config = {}
    for section in (config, config.get("text_config") or {}):
        value = section.get("max_position_embeddings") if isinstance(section, dict) else None
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < 10**8 else None


@dataclass
class _Job:
    """One request inside the batcher. ``events`` carries token ids, then a final
    ``("done", finish_reason)`` or ``("error", exc)``; the consumer sets ``stop``."""

    request: GenerationRequest
    tokens: list[str]
    end_tokens: tuple[str, ...]
    # ``generic``'s system turn, decoded once per batch and cached by CTranslate2
    # (``static_prompt``); ``tokens`` is then the rest of the prompt.
    static: tuple[str, ...] = ()
    # token sequences the model must not produce (qwen3's think tags, thinking off)
    suppress: tuple[tuple[str, ...], ...] = ()
    submitted: float = field(default_factory=time.perf_counter)
    events: queue.Queue[Any] = field(default_factory=queue.Queue)
    produced: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    clock: GenerationClock = field(default_factory=GenerationClock)

    def group_key(self) -> tuple[Any, ...]:
        d = self.request.decoding
        return (d.beam_size, d.top_k, d.top_p, d.temperature, d.repetition_penalty, self.end_tokens, self.static,
                self.suppress)


class Ct2Runtime:
    """A loaded generator, its tokenizer and the batcher thread that feeds it."""

    def tokenize(self, text: str, special: bool) -> list[int]:
        """``text`` tokenized without BOS/EOS; special tokens written in it are parsed
        as such only with ``special`` (transformers' ``split_special_tokens``)."""
        return list(self.tokenizer(text, add_special_tokens=False, split_special_tokens=not special).input_ids)

    def prompt_ids(self, segments: tuple[PromptSegment, ...]) -> list[int]:
        """The prompt's ids (markup parsed, text as text), with the model's BOS first
        when the model wants one and the prompt did not write it (raw)."""
        ids = tokenize_segments(segments, self.tokenize)
        bos = self.tokenizer.bos_token_id
        if self.adds_bos and bos is not None and ids[:1] != [bos]:
            ids.insert(0, bos)
        return ids

    def _token_strings(self, segments: tuple[PromptSegment, ...], *, with_bos: bool) -> tuple[str, ...]:
        ids = self.prompt_ids(segments) if with_bos else tokenize_segments(segments, self.tokenize)
        return tuple(self.tokenizer.convert_ids_to_tokens(ids))

    def __init__(self, replica_id: str, path: str, options: Ct2Options, generator: Any, tokenizer: Any) -> None:
        self.replica_id = replica_id
        self.path = path
        self.options = options
        self.generator = generator
        self.tokenizer = tokenizer
        self.vocab = set(tokenizer.get_vocab())
        self.max_context = context_limit(path, options, tokenizer)
        probe = "x"
        self.adds_bos = tokenizer(probe).input_ids[:1] != tokenizer(probe, add_special_tokens=False).input_ids[:1]
        # The pieces every request of a format shares (a system turn, think tags) are
        # tokenized once, not per request.
        self.token_strings = functools.lru_cache(maxsize=256)(self._token_strings)
        self.batch_sizes: list[int] = []  # size of every generate_batch call, for tests and benchmarks
        self._pending: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=f"llmpool-ct2-{replica_id}", daemon=True)
        self._thread.start()

    # ----- batcher thread ----------------------------------------------------------------

    def submit(self, job: _Job) -> None:
        self._pending.put(job)

    def close(self) -> None:
        self._pending.put(None)
        self._thread.join(timeout=30)

    def _gather(self, first: _Job) -> tuple[list[_Job], bool]:
        """The first job plus whatever else arrives, up to the batch size: gathering goes
        on while requests keep coming within ``ct2_batch_wait_ms`` of each other (a burst
        lands in one batch), and never longer than 4 windows after the first."""
        jobs, closing = [first], False
        gap = self.options.ct2_batch_wait_ms / 1000
        cap = time.perf_counter() + 4 * gap
        while len(jobs) < self.options.ct2_max_batch_size:
            timeout = min(gap, cap - time.perf_counter())
            try:
                job = self._pending.get(timeout=timeout) if timeout > 0 else self._pending.get_nowait()
            except queue.Empty:
                break
            if job is None:
                closing = True
                break
            jobs.append(job)
        return jobs, closing

    def _run(self) -> None:
        while True:
            first = self._pending.get()
            if first is None:
                return
            jobs, closing = self._gather(first)
            groups: dict[tuple[Any, ...], list[_Job]] = {}
            for job in jobs:
                if job.request.cancel.is_set():
                    job.events.put(("done", "cancelled"))
                else:
                    groups.setdefault(job.group_key(), []).append(job)
            for group in groups.values():
                self._decode(group)
            if closing:
                return

    def _decode(self, jobs: list[_Job]) -> None:
        d = jobs[0].request.decoding
        self.batch_sizes.append(len(jobs))
        streaming = d.beam_size == 1

        def on_step(step: Any) -> bool:
            job = jobs[step.batch_id]
            if job.stop.is_set() or job.request.cancel.is_set():
                return True
            job.clock.first_token()
            job.produced += 1
            job.events.put(step.token_id)
            return job.produced >= job.request.decoding.max_tokens

        kwargs: dict[str, Any] = {
            "max_length": max(j.request.decoding.max_tokens for j in jobs), "beam_size": d.beam_size,
            "sampling_topk": d.top_k, "sampling_topp": d.top_p, "sampling_temperature": max(d.temperature, 1e-5),
            "repetition_penalty": d.repetition_penalty, "include_prompt_in_result": False,
            "end_token": list(jobs[0].end_tokens),
        }
        if d.temperature == 0:
            kwargs["sampling_topk"] = 1  # greedy
        if jobs[0].static:
            kwargs["static_prompt"] = list(jobs[0].static)
            kwargs["cache_static_prompt"] = self.options.ct2_cache_static_prompt
        if jobs[0].suppress:
            kwargs["suppress_sequences"] = [list(seq) for seq in jobs[0].suppress]
        if streaming:
            kwargs["callback"] = on_step
        try:
            results = self.generator.generate_batch([j.tokens for j in jobs], **kwargs)
        except Exception as exc:  # noqa: BLE001 - every request of the batch gets the error
            for job in jobs:
                job.events.put(("error", exc))
            return
        for job, result in zip(jobs, results, strict=True):
            if not streaming:
                ids = result.sequences_ids[0][: job.request.decoding.max_tokens]
                job.clock.first_token()
                for token_id in ids:
                    job.events.put(token_id)
                job.produced = len(ids)
            if job.request.cancel.is_set():
                reason = "cancelled"
            elif job.produced >= job.request.decoding.max_tokens and not job.stop.is_set():
                reason = "length"
            else:
                reason = "stop"
            job.events.put(("done", reason))


@hookimpl
def llmpool_backends() -> list[BackendSpec]:
    return [BackendSpec(name=BACKEND, description="CTranslate2 decoder models with dynamic batching",
                        options_model=Ct2Options)]


@hookimpl
def llmpool_model_traits(backend: str, model: Any) -> ModelTraits | None:
    if backend != BACKEND:
        return None
    return ModelTraits(capabilities=capabilities_for(model.prompt_format,
                                                     thinking_formats=SEED_THINKING_FORMATS["ct2"]),
                       concurrency=model.options.ct2_max_batch_size)


@hookimpl
def llmpool_estimate_memory(backend: str, model: Any) -> MemoryEstimate | None:
    """Weights as CTranslate2 will hold them: ``model.bin``'s variables converted to the
    model's ``compute_type`` (an int8 file loaded as float32 takes about four times its
    size). CTranslate2 allocates the KV cache per batch as it decodes, so the estimate
    has no fixed cache part. Falls back to the file size if the header cannot be read."""
    if backend != BACKEND:
        return None
    weights = os.path.join(os.path.expanduser(model.model_path or ""), "model.bin")
    if not os.path.isfile(weights):
        return None
    file_mib = os.path.getsize(weights) / 2**20
    compute_type = model.options.compute_type
    try:
        size_mib, source = weights_bytes(weights, compute_type) / 2**20, "model_bin_variables"
    except (OSError, ValueError, struct.error):
        size_mib, source = file_mib, "model_artifact_size"
    device = _resolve_device(model.options.device) if _ct2_available() else model.options.device
    return MemoryEstimate(total_mib=round(size_mib, 1), device=device, weights_mib=round(size_mib, 1), cache_mib=None,
                          source=source, details={"compute_type": compute_type, "file_mib": round(file_mib, 1)})


# CTranslate2's DataType enum, in order (include/ctranslate2/types.h).
_CT2_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
_CT2_FLOATS = frozenset({"float32", "float16", "bfloat16"})
# Bytes per element once loaded, by compute type: matrices (quantizable weights), and
# the other float variables. Types not listed (default, auto) keep what the file stores.
_WEIGHT_BYTES = {"int8": 1, "int8_float32": 1, "int8_float16": 1, "int8_bfloat16": 1, "float16": 2,
                 "bfloat16": 2, "float32": 4}
_FLOAT_BYTES = {"int8": 4, "int8_float32": 4, "int8_float16": 2, "int8_bfloat16": 2, "float16": 2,
                "bfloat16": 2, "float32": 4}


def weights_bytes(path: str, compute_type: str) -> int:
    """Bytes of ``model.bin``'s variables once converted to ``compute_type``. Reads the
    header of each variable (the layout ``ctranslate2.specs.ModelSpec._serialize``
    writes) and skips its data. Matrices (rank 2: linear and embedding weights) take the
    compute type's weight size; other float variables (norms, biases, scales) its float
    size; integer variables stay as stored. ``default``/``auto`` keep stored types."""
    kind = compute_type.lower()
    weight_size, float_size = _WEIGHT_BYTES.get(kind), _FLOAT_BYTES.get(kind)
    total = 0
    with open(path, "rb") as fh:
        def read(fmt: str) -> Any:
            return struct.unpack(fmt, fh.read(struct.calcsize(fmt)))[0]

        def skip_string() -> None:
            fh.seek(read("H"), os.SEEK_CUR)

        read("I")  # binary version
        skip_string()  # spec name
        read("I")  # revision
        for _ in range(read("I")):
            skip_string()
            dims = [read("I") for _ in range(read("B"))]
            dtype, num_bytes = read("B"), read("I")
            fh.seek(num_bytes, os.SEEK_CUR)
            if dtype >= len(_CT2_DTYPES):
                raise ValueError(f"unknown CTranslate2 dtype id {dtype}")
            stored, elements = _CT2_DTYPES[dtype], math.prod(dims)
            if len(dims) == 2 and (stored == "int8" or stored in _CT2_FLOATS) and weight_size is not None:
                total += elements * weight_size
            elif stored in _CT2_FLOATS and float_size is not None:
                total += elements * float_size
            else:
                total += num_bytes
    return total


def _ct2_available() -> bool:
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        return False
    return True


def _resolve_device(device: str) -> str:
    import ctranslate2

    if device == "auto":
        return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    return device


def _check_tokenizer(path: str, tokenizer: Any) -> None:
    """The tokenizer must produce the tokens the converted vocabulary holds."""
    vocab_file = os.path.join(path, "vocabulary.json")
    if not os.path.isfile(vocab_file):
        return
    with open(vocab_file, encoding="utf-8") as fh:
        vocabulary = json.load(fh)
    ids = tokenizer("The quick brown fox jumps over the lazy dog.", add_special_tokens=False).input_ids
    for token_id, token in zip(ids, tokenizer.convert_ids_to_tokens(ids), strict=True):
        if token_id >= len(vocabulary) or vocabulary[token_id] != token:
            raise LoadError(f"the tokenizer in {path} does not match the model's vocabulary (token {token!r} has "
                            f"id {token_id} in the tokenizer); save the tokenizer of the converted model there")


@hookimpl
def llmpool_load(backend: str, replica_id: str, model: Any) -> Ct2Runtime | None:
    if backend != BACKEND:
        return None
    path = os.path.expanduser(model.model_path)
    if not os.path.isdir(path):
        raise LoadError(f"CTranslate2 model directory not found: {path}")
    if not os.path.isfile(os.path.join(path, "model.bin")):
        raise LoadError(f"{path} is not a CTranslate2 model (no model.bin); convert one with "
                        "ct2-transformers-converter --model <hf model> --output_dir <dir>")
    try:
        import ctranslate2
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise LoadError(f"ctranslate2 and transformers are required for the ct2 backend: {exc}") from None
    options: Ct2Options = model.options
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
        raise LoadError(f"no usable Hugging Face tokenizer in {path} ({type(exc).__name__}: {exc}); save the "
                        "model's tokenizer next to model.bin (tokenizer.save_pretrained)") from None
    _check_tokenizer(path, tokenizer)
    try:
        generator = ctranslate2.Generator(path, device=_resolve_device(options.device),
                                          compute_type=options.compute_type, device_index=options.ct2_device_index,
                                          inter_threads=options.ct2_inter_threads,
                                          intra_threads=options.ct2_intra_threads)
    except (RuntimeError, ValueError) as exc:
        raise LoadError(f"CTranslate2 could not load {path}: {exc}") from None
    log.info("ct2_loaded", replica=replica_id, path=path, device=generator.device,
             compute_type=generator.compute_type, batch=options.ct2_max_batch_size)
    return Ct2Runtime(replica_id, path, options, generator, tokenizer)


@hookimpl
def llmpool_unload(backend: str, runtime: Ct2Runtime) -> bool | None:
    if backend != BACKEND:
        return None
    runtime.close()
    runtime.generator.unload_model()
    runtime.generator = None
    return True


# ----- generation ------------------------------------------------------------------------


def _prompt_ids(runtime: Ct2Runtime, request: GenerationRequest) -> tuple[list[int], RenderedPrompt]:
    rendered = render(request)
    tokenizer = runtime.tokenizer
    if rendered.text is None:  # chat_template: the tokenizer's own template
        if not getattr(tokenizer, "chat_template", None):
            raise BackendError(400, "prompt_format_unsupported",
                               f"the tokenizer in {runtime.path} has no chat template; choose another prompt_format")
        extra = {} if request.thinking is None else {"enable_thinking": request.thinking}

        def render_template(messages: list[dict[str, str]]) -> str:
            return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra))

        segments = template_segments(rendered.messages, render_template, runtime.tokenize, model=request.model)
    else:
        segments = rendered.segments
    return runtime.prompt_ids(segments), rendered


def _static_prefix(runtime: Ct2Runtime, request: GenerationRequest, rendered: RenderedPrompt,
                   tokens: list[str]) -> tuple[str, ...]:
    """The seed's cached static prompt for ``generic``: the tokens of the system turn
    (with BOS), when the prompt's tokens start with exactly those, so the model sees
    the same sequence either way. Empty otherwise (other formats, no instructions)."""
    if request.prompt_format != "generic" or not request.instructions or rendered.text is None:
        return ()
    system = f"<|im_start|>system\n{request.instructions}<|im_end|>\n"
    turn = rendered.segments[:4]  # <|im_start|>, "system\n{instructions}", <|im_end|>, "\n"
    if "".join(segment.text for segment in turn) != system:
        return ()
    prefix = list(runtime.token_strings(turn, with_bos=True))
    # at least one prompt token must follow: CTranslate2 starts decoding from them
    return tuple(prefix) if tokens[: len(prefix)] == prefix and len(tokens) > len(prefix) else ()


def _suppressed(runtime: Ct2Runtime, rendered: RenderedPrompt) -> tuple[tuple[str, ...], ...]:
    """With thinking off, a format that prefilled an empty think block (qwen3) must not
    open another: its reasoning markers become ``suppress_sequences`` (the seed's rule)."""
    if not rendered.thinking_prefilled or not rendered.reasoning_markers:
        return ()
    return tuple(runtime.token_strings((PromptSegment(marker, markup=True),), with_bos=False)
                 for marker in rendered.reasoning_markers)


@hookimpl
def llmpool_stream(backend: str, runtime: Ct2Runtime, request: GenerationRequest) -> Iterator[Any] | None:
    if backend != BACKEND:
        return None
    return _generate(runtime, request)


def _generate(runtime: Ct2Runtime, request: GenerationRequest) -> Iterator[TextDelta | Completion]:
    clock = GenerationClock()
    ids, rendered = _prompt_ids(runtime, request)
    tokenizer = runtime.tokenizer
    # Stop strings that are one token end decoding inside CTranslate2; others are
    # matched in the text. The tokenizer's EOS always ends it.
    end_tokens = tuple(dict.fromkeys(
        [t for t in (tokenizer.eos_token, *rendered.stops) if t and t in runtime.vocab]))
    limit = runtime.max_context
    if limit is not None and len(ids) + request.decoding.max_tokens > limit:
        raise BackendError(400, "context_length_exceeded",
                           f"prompt has {len(ids)} tokens and max_tokens is {request.decoding.max_tokens}: "
                           f"{len(ids) + request.decoding.max_tokens} tokens; the model's context is {limit} "
                           "tokens (ct2_max_context, or max_position_embeddings in config.json)", param="messages")
    tokens = tokenizer.convert_ids_to_tokens(ids)
    static = _static_prefix(runtime, request, rendered, tokens)
    job = _Job(request=request, tokens=tokens[len(static):], end_tokens=end_tokens, static=static,
               suppress=_suppressed(runtime, rendered), clock=clock)
    clock.tokenized()
    runtime.submit(job)
    pipeline = TextPipeline(rendered.stops, rendered.reasoning_markers, decoder=IncrementalDetokenizer(
        lambda seq: tokenizer.decode(seq, skip_special_tokens=True)))
    finish = "cancelled"  # unless the batcher says otherwise: leave now, the batch drops us at its next step
    try:
        for event in queue_items(job.events, request.cancel):
            if isinstance(event, tuple):
                kind, value = event
                if kind == "error":
                    raise BackendError(500, "backend_error", f"CTranslate2: {value}")
                finish = value
                break
            yield from pipeline.push(event)  # tokens decoded after a stop string are ignored
            if pipeline.stopped:
                job.stop.set()
        yield from pipeline.finish(cancelled=finish == "cancelled")
    finally:
        job.stop.set()  # a closed stream (client gone) leaves the batch at the next step
    if pipeline.stopped:
        finish = "stop"
    yield Completion(finish_reason=finish, metrics=clock.metrics(prompt_tokens=len(ids), output_tokens=job.produced))
