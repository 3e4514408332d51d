"""llmpool backend plugin ``gguf`` (alias ``llama_cpp``): GGUF models through llama-cpp-python.

One runtime is one :class:`~llmpool_gguf.engine.Engine`: a llama.cpp model and context
decoding up to ``gguf_parallel`` requests together (continuous batching, llama-server's
slot loop, with its prompt-prefix cache), declared to the pool as the runtime's
concurrency. Prompts are rendered by :mod:`llmpoold.prompts` (``chat_template`` renders
the Jinja template embedded in the GGUF through llama-cpp-python's
``Jinja2ChatFormatter``); each request's tokens reach the client as the loop samples
them, a cancel is seen within one step, and stop strings and split UTF-8 characters are
handled by :mod:`llmpoold.textstream` (:class:`~llmpool_gguf.prompt.TextChain`).

Token log probabilities (``Capabilities.logprobs``) are scored by the decode loop from
the raw logits (:mod:`llmpool_gguf.engine`) and follow the text through
:class:`~llmpoold.logprobs.LogprobText`.

Modules: ``options`` (per-model keys), ``memory`` (estimate from the GGUF header),
``native`` (llama.cpp's model, context parameters and their release), ``engine`` (the
context and decode loop), ``sampling`` (one request's token choice, grammar checked on
the chosen token), ``prompt`` (tokens in, text out),
``grammar`` (``response_format`` as a llama.cpp grammar), ``tools`` (function tools:
prompts and grammars), ``toolcalls`` (calls read back from the output), ``embedding``
(a model configured ``gguf_embedding: true``: pooled vectors through ``llmpool_embed``,
no generation; such a runtime is an :class:`~llmpool_gguf.embedding.EmbeddingRuntime`).

Function tools (``tools``, ``tool_choice``, tool turns; :mod:`llmpool_gguf.tools`):
``tool_choice`` ``required`` or a named function works on every multi-turn prompt
format, forced by a llama.cpp grammar over the parameters schema (one call per
response); ``auto`` (the default with tools) only where the prompt is the GGUF's own
chat template and that template (or its ``tool_use`` one) renders tools in the Hermes /
Qwen format (``<tool_call>{"name": ..., "arguments": ...}</tool_call>``, the one format
parsed), else admission refuses it (400 ``tools_unsupported``, ``param:
"tool_choice"``); ``none`` generates text without offering the tools. ``raw`` and
``translategemma_template`` (single-turn, no instructions) take no tools.
"""

from __future__ import annotations

import os
import queue
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import structlog

from llmpool_gguf.embedding import EmbeddingEngine, EmbeddingRuntime
from llmpool_gguf.engine import Engine, Job
from llmpool_gguf.grammar import grammar_for
from llmpool_gguf.memory import estimate, read_gguf_header
from llmpool_gguf.options import (
    CACHE_TYPES,
    LOAD_CONSTRAINTS,
    LOAD_RECOMMENDATIONS,
    GgufLoadOverride,
    GgufOptions,
    ggml_type,
    normalize_cache_type,
    normalize_flash_attn,
)
from llmpool_gguf.prompt import _chat_template_prompt, prompt_segments, prompt_tokens, text_pipeline
from llmpool_gguf.tools import ToolPlan, auto_supported, header_templates, plan_for
from llmpoold import hookimpl
from llmpoold.errors import ApiError, BackendError, LoadError
from llmpoold.hookspecs import BackendSpec
from llmpoold.logprobs import LogprobText, token_logprob
from llmpoold.prompts import SEED_THINKING_FORMATS, capabilities_for, render
from llmpoold.textstream import GenerationClock
from llmpoold.types import (
    Capabilities,
    Completion,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationRequest,
    MemoryEstimate,
    ModelTraits,
    TextDelta,
    TokenLogprob,
    ToolCallDelta,
)

__all__ = ["BACKEND", "CACHE_TYPES", "GgufOptions", "GgufRuntime", "_chat_template_prompt", "estimate", "ggml_type",
           "normalize_cache_type", "normalize_flash_attn", "prompt_segments", "prompt_tokens", "read_gguf_header"]

BACKEND = "gguf"
RESPONSE_FORMATS = ("text", "json_schema", "json_object")
log = structlog.get_logger("llmpool_gguf")
# How long a request thread waits for the loop to let go of a job it stopped (one step
# normally; the bound only guards against a wedged loop).
_RELEASE_WAIT_S = 30.0


@dataclass
class GgufRuntime:
    """One loaded model; ``chat_formatter`` is built on first use of ``chat_template``
    (``tool_formatter`` on first use of the GGUF's ``tool_use`` template)."""

    replica_id: str
    model_path: str
    options: GgufOptions
    engine: Engine
    chat_formatter: Any = None
    tool_formatter: Any = None


@hookimpl
def llmpool_backends() -> list[BackendSpec]:
    return [BackendSpec(
        name=BACKEND, aliases=("llama_cpp",), description="GGUF models through llama.cpp (llama-cpp-python)",
        options_model=GgufOptions,
        load_override_keys=frozenset(GgufLoadOverride.model_fields), load_override_model=GgufLoadOverride,
        load_constraints=LOAD_CONSTRAINTS, load_recommendations=LOAD_RECOMMENDATIONS)]


@hookimpl
def llmpool_model_traits(backend: str, model: Any) -> ModelTraits | None:
    if backend != BACKEND:
        return None
    if model.options.gguf_embedding:  # vectors only, one request at a time (one batch of inputs each)
        return ModelTraits(capabilities=Capabilities(embeddings=True, generation=False, raw_prompt=False),
                           concurrency=1)
    capabilities = capabilities_for(model.prompt_format, ("text",), thinking_formats=SEED_THINKING_FORMATS["gguf"])
    # response_format and forced tool calls are enforced by a llama.cpp grammar sampler
    # (llmpool_gguf.grammar, .tools); "auto" needs a template with a call format we parse
    # (read from the GGUF header, cached per file version); logprobs are scored from the
    # raw logits in the decode loop (llmpool_gguf.engine).
    templated = model.prompt_format in ("chat_template", "gemma4_template")
    template, tool_template = header_templates(model.model_path) if templated else (None, None)
    capabilities = replace(capabilities, response_formats=RESPONSE_FORMATS, logprobs=True,
                           tools=capabilities.multi_turn,
                           tools_auto=auto_supported(model.prompt_format, template, tool_template))
    return ModelTraits(capabilities=capabilities, concurrency=model.options.gguf_parallel)


@hookimpl
def llmpool_check_load_override(backend: str, override: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The seed's llama_cpp override rules; values are normalised (``Q8_0`` → ``q8_0``)."""
    if backend != BACKEND:
        return None
    checked = dict(override)
    if "gguf_n_ctx" in checked:
        value = checked["gguf_n_ctx"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError("gguf_n_ctx load override must be a positive integer")
    if "gguf_flash_attn" in checked:
        value = checked["gguf_flash_attn"]
        if value is None or not isinstance(value, str):
            raise ValueError("gguf_flash_attn load override must be one of: on, off, auto")
        checked["gguf_flash_attn"] = normalize_flash_attn(value)
    for key in ("gguf_type_k", "gguf_type_v"):
        if key in checked:
            checked[key] = normalize_cache_type(checked[key])
    return checked


@hookimpl
def llmpool_estimate_memory(backend: str, model: Any) -> MemoryEstimate | None:
    if backend != BACKEND:
        return None
    if not model.model_path or not os.path.isfile(model.model_path):
        return None
    return estimate(model.model_path, model.options)


# ----- load / unload ---------------------------------------------------------------------


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise LoadError(f"GGUF model file not found: {path}")
    if os.path.isdir(path):
        raise LoadError(f"model_path is a directory, expected a .gguf file: {path}")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise LoadError(f"cannot read GGUF model file {path}: {exc.strerror or exc}") from None
    if magic != b"GGUF":
        raise LoadError(f"not a GGUF file (bad magic {magic!r}): {path}")


@hookimpl
def llmpool_load(backend: str, replica_id: str, model: Any) -> GgufRuntime | EmbeddingRuntime | None:
    if backend != BACKEND:
        return None
    path = os.path.expanduser(model.model_path)
    _check_file(path)
    try:
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        raise LoadError(f"llama-cpp-python is required for the gguf backend: {exc}") from None
    started = time.perf_counter()
    if model.options.gguf_embedding:
        try:
            embedder = EmbeddingEngine(path, model.options, replica_id)
        except ValueError as exc:
            raise LoadError(f"llama.cpp could not load {path} for embeddings: {exc}") from None
        log.info("gguf_loaded", replica=replica_id, path=path, embedding=True, n_embd=embedder.n_embd,
                 pooling=embedder.pooling, n_ctx=embedder.n_ctx, seconds=round(time.perf_counter() - started, 2))
        return EmbeddingRuntime(replica_id=replica_id, model_path=path, engine=embedder)
    try:
        engine = Engine(path, model.options, replica_id)
    except ValueError as exc:
        raise LoadError(f"llama.cpp could not load {path}: {exc} (corrupt file, or an architecture this "
                        "llama.cpp build does not support?)") from None
    log.info("gguf_loaded", replica=replica_id, path=path, n_ctx_per_sequence=engine.n_ctx_seq,
             parallel=engine.n_parallel, seconds=round(time.perf_counter() - started, 2))
    return GgufRuntime(replica_id=replica_id, model_path=path, options=model.options, engine=engine)


@hookimpl
def llmpool_unload(backend: str, runtime: GgufRuntime | EmbeddingRuntime) -> bool | None:
    if backend != BACKEND:
        return None
    if isinstance(runtime, EmbeddingRuntime):
        log.info("gguf_unloaded", replica=runtime.replica_id, **runtime.engine.stats)
        runtime.engine.close()
        return True
    stats = runtime.engine.stats
    log.info("gguf_unloaded", replica=runtime.replica_id, steps=stats["steps"],
             decode_s=round(stats["decode_s"], 2), step_s=round(stats["step_s"], 2))
    runtime.chat_formatter = runtime.tool_formatter = None
    runtime.engine.close()
    return True


# ----- generation ------------------------------------------------------------------------


@hookimpl
def llmpool_stream(backend: str, runtime: GgufRuntime, request: GenerationRequest) -> Iterator[Any] | None:
    if backend != BACKEND:
        return None
    if isinstance(runtime, EmbeddingRuntime):  # admission refuses it first (Capabilities.generation)
        raise BackendError(400, "embeddings_only", f"model '{request.model}' serves only embeddings",
                           param="model")
    return _generate(runtime, request)


@hookimpl
def llmpool_embed(backend: str, runtime: GgufRuntime | EmbeddingRuntime,
                  request: EmbeddingRequest) -> EmbeddingResult | None:
    if backend != BACKEND or not isinstance(runtime, EmbeddingRuntime):
        return None
    return runtime.engine.embed(request.inputs, request.cancel)


def _generate(runtime: GgufRuntime, request: GenerationRequest) -> Iterator[TextDelta | ToolCallDelta | Completion]:
    engine = runtime.engine
    with engine.reading():  # the plan reads the model's template and vocabulary
        tools = plan_for(runtime, request)
    request = tools.request  # the tool list and tool turns as text where the template does not render them
    rendered = render(request)
    if tools.template_messages is not None:
        rendered = replace(rendered, messages=tools.template_messages)
    if request.decoding.beam_size > 1:
        log.info("beam_size_ignored", beam_size=request.decoding.beam_size, model=request.model)
    with engine.reading():
        yield from _stream(runtime, engine, request, rendered, tools)


def _stream(runtime: GgufRuntime, engine: Engine, request: GenerationRequest,
            rendered: Any, tools: ToolPlan | None = None) -> Iterator[TextDelta | ToolCallDelta | Completion]:
    decoding = request.decoding
    tools = tools or ToolPlan(request)
    grammar = tools.grammar or grammar_for(request.response_format, request.model)  # a forced call wins
    output = tools.output()  # text deltas in, text deltas and tool calls out
    clock = GenerationClock()
    prompt = prompt_tokens(runtime, request, rendered, tools.template_tools, tools.template_source)
    clock.tokenized()
    # Honest limits (issue 16): the prompt and the whole max_tokens budget must fit the
    # sequence's context; a budget is never capped silently.
    if len(prompt) + decoding.max_tokens > engine.n_ctx_seq:
        raise BackendError(400, "context_length_exceeded",
                           f"prompt has {len(prompt)} tokens and max_tokens is {decoding.max_tokens}: "
                           f"{len(prompt) + decoding.max_tokens} tokens; the model's context is {engine.n_ctx_seq} "
                           "tokens per sequence (gguf_n_ctx)", param="messages")
    job = Job(prompt=prompt, budget=decoding.max_tokens, decoding=decoding, cancel=request.cancel, grammar=grammar,
              logprobs=request.logprobs)
    engine.submit(job)
    text = LogprobText(text_pipeline(rendered))
    finish: str | None = None
    left = False  # the loop has let go of the job (its last event was read)
    try:
        while finish is None:
            try:
                event = job.events.get(timeout=0.05)
            except queue.Empty:
                event = None
            if isinstance(event, tuple):
                kind, value = event
                left = True
                if kind == "error":
                    raise value if isinstance(value, ApiError | LoadError) else BackendError(
                        500, "backend_error", f"llama.cpp: {value}")
                finish = "cancelled" if request.cancel.is_set() else value
            elif request.cancel.is_set():
                finish = "cancelled"
            elif event is not None:
                clock.first_token()
                for item in text.push(engine.piece(event), _scored(engine, job, event)):
                    yield from output.push(item)
                if text.stopped:
                    finish = "stop"
        for item in text.finish(cancelled=finish == "cancelled"):
            yield from output.push(item)
        yield from output.finish()
    finally:
        if not left:
            _let_go(job)
    yield Completion(finish_reason=finish, metrics=clock.metrics(
        prompt_tokens=len(prompt), cached_prompt_tokens=job.cached_tokens, output_tokens=job.produced))


def _scored(engine: Engine, job: Job, token: int) -> TokenLogprob | None:
    """The token's TokenLogprob (with its top alternatives) when the request asked for
    logprobs; the loop put its values on ``job.scored`` before the token's event."""
    if job.logprobs is None:
        return None
    logprob, top = job.scored.popleft()
    return token_logprob(engine.piece(token), logprob,
                         tuple(token_logprob(engine.piece(alt), value) for alt, value in top))


def _let_go(job: Job) -> None:
    """Tell the loop this request wants no more tokens and wait until it has left its
    slot (within one step), so a finished stream means a free slot."""
    job.stop.set()
    deadline = time.monotonic() + _RELEASE_WAIT_S
    while time.monotonic() < deadline:
        try:
            event = job.events.get(timeout=0.05)
        except queue.Empty:
            continue
        if isinstance(event, tuple):
            return
