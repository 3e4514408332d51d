"""llmpool backend plugin ``gguf`` (alias ``llama_cpp``): GGUF models through llama-cpp-python.

One runtime is one ``llama_cpp.Llama`` and generates one request at a time
(concurrency 1; run more replicas for more parallelism). Prompts are rendered by
:mod:`llmpoold.prompts` (``chat_template`` renders the Jinja template embedded in the
GGUF through llama-cpp-python's ``Jinja2ChatFormatter``), tokens are sampled with
``Llama.generate`` one at a time, so each token reaches the client as soon as llama.cpp
produces it, a cancel is seen within one token, and stop strings and split UTF-8
characters are handled by :mod:`llmpoold.textstream`.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator

from llmpoold import hookimpl
from llmpoold.errors import BackendError, LoadError
from llmpoold.hookspecs import BackendSpec
from llmpoold.prompts import RenderedPrompt, capabilities_for, render
from llmpoold.textstream import ReasoningSplitter, StopFilter, Utf8Stream
from llmpoold.types import BackendMetrics, Completion, GenerationRequest, MemoryEstimate, ModelTraits, TextDelta

BACKEND = "gguf"
log = structlog.get_logger("llmpool_gguf")

CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
# Bytes per element of the KV cache types llama.cpp accepts (block size / elements).
_CACHE_TYPE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
                     "iq4_nl": 18 / 32, "q5_0": 22 / 32, "q5_1": 24 / 32}
_CACHE_TYPE_SHAPE = {"kind": "string_or_null", "format": "ggml_type_name", "default": "f16",
                     "allowed_values": list(CACHE_TYPES), "examples": ["f16", "q8_0", "q4_0"]}
LOAD_CONSTRAINTS = {
    # The seed says minimum 1; llmpool refuses contexts under 16 tokens (no prompt fits),
    # and the constraint a UI reads says what the server accepts.
    "gguf_n_ctx": {"kind": "integer", "minimum": 16, "step": 1},
    "gguf_flash_attn": {"kind": "enum", "default": "auto", "allowed_values": ["on", "off", "auto"],
                        "examples": ["auto", "on", "off"]},
    "gguf_type_k": _CACHE_TYPE_SHAPE,
    "gguf_type_v": _CACHE_TYPE_SHAPE,
}
LOAD_RECOMMENDATIONS = {"gguf_cache_type_pairs": {
    "kind": "pair_presets", "fields": ["gguf_type_k", "gguf_type_v"],
    "recommended_pairs": [{"label": f"{t}/{t}", "gguf_type_k": t, "gguf_type_v": t} for t in ("f16", "q8_0", "q4_0")],
    "notes": ["Service-curated presets for GGUF cache types.",
              "Prefer symmetric GGUF K/V pairs by default; asymmetric pairs may reduce or disable GPU offload in "
              "upstream llama.cpp."]}}


def normalize_cache_type(value: Any, *, check_build: bool = True) -> str | None:
    """The seed's GGUF cache type rules: strip, lower, ``[a-z0-9_]``, and (with
    ``check_build``, when llama-cpp-python is installed) a type this build has.

    settings.json is checked for the spelling only: whether the installed llama.cpp has
    the type is a property of the host, so a type it lacks fails that model's load
    (the model becomes ``failed``), not the whole daemon's start."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError("GGUF cache type must be a non-empty GGML type name")
    name = value.strip().lower()
    if not re.fullmatch(r"[a-z0-9_]+", name):
        raise ValueError("GGUF cache type must contain only letters, digits, and underscores")
    if check_build:
        try:
            missing = ggml_type(name) is None
        except ImportError:
            return name
        if missing:
            raise ValueError(f"unsupported GGUF cache type: '{value}'")
    return name


def ggml_type(name: str) -> int | None:
    """llama.cpp's ``GGML_TYPE_<NAME>`` constant; None when this build has none."""
    from llama_cpp import llama_cpp as low

    value = getattr(low, f"GGML_TYPE_{name.upper()}", None)
    return None if value is None else int(value)


def normalize_flash_attn(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, str) and value.strip().lower() in ("on", "off", "auto"):
        return value.strip().lower()
    raise ValueError("gguf_flash_attn must be one of: on, off, auto")


class GgufOptions(BaseModel):
    """Per-model keys of the ``gguf`` backend (the seed's, plus threads and batch)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gguf_n_gpu_layers: int = -1
    gguf_n_ctx: int = Field(4096, ge=16)
    gguf_flash_attn: Literal["on", "off", "auto"] = "auto"
    gguf_type_k: str | None = None
    gguf_type_v: str | None = None
    gguf_n_threads: int | None = Field(None, ge=1, description="default: the machine's cores")
    gguf_n_batch: int = Field(512, ge=1)
    gguf_seed: int = Field(0, ge=0)

    @field_validator("gguf_flash_attn", mode="before")
    @classmethod
    def _flash(cls, value: Any) -> str:
        return normalize_flash_attn(value)

    @field_validator("gguf_type_k", "gguf_type_v", mode="before")
    @classmethod
    def _cache_type(cls, value: Any) -> str | None:
        return normalize_cache_type(value, check_build=False)


class GgufLoadOverride(BaseModel):
    """The admin load override keys with the API's types and schema bounds (a 422);
    :func:`llmpool_check_load_override` applies the range rules (a 400)."""

    gguf_n_ctx: int | None = Field(None, ge=1)
    gguf_flash_attn: Any = None
    gguf_type_k: str | None = None
    gguf_type_v: str | None = None


@dataclass
class GgufRuntime:
    """One loaded model. ``lock`` serialises generation (llama.cpp contexts are not
    re-entrant); ``chat_formatter`` is built on first use of ``chat_template``."""

    replica_id: str
    model_path: str
    options: GgufOptions
    llm: Any
    lock: threading.Lock = field(default_factory=threading.Lock)
    chat_formatter: Any = None
    rss_after_load_mib: float | None = None


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
    return ModelTraits(capabilities=capabilities_for(model.prompt_format, ("text",)), concurrency=1)


@hookimpl
def llmpool_check_load_override(backend: str, override: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The seed's llama_cpp override rules; values are normalised (``Q8_0`` → ``q8_0``)."""
    if backend != BACKEND:
        return None
    checked = dict(override)
    if "gguf_n_ctx" in checked:
        value = checked["gguf_n_ctx"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 16:
            raise ValueError("gguf_n_ctx load override must be an integer of at least 16")
    if "gguf_flash_attn" in checked:
        value = checked["gguf_flash_attn"]
        if value is None or not isinstance(value, str):
            raise ValueError("gguf_flash_attn load override must be one of: on, off, auto")
        checked["gguf_flash_attn"] = normalize_flash_attn(value)
    for key in ("gguf_type_k", "gguf_type_v"):
        if key in checked:
            checked[key] = normalize_cache_type(checked[key])
    return checked


# ----- memory estimate -------------------------------------------------------------------


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def _read_gguf_metadata(path: str) -> tuple[dict[str, Any], list[tuple[tuple[int, ...], int]]]:
    """Scalar metadata and (shape, ggml type) of every tensor from a GGUF header.

    Arrays are skipped without being decoded: the tokenizer's vocabulary (262k strings
    for Gemma 3) would otherwise cost seconds of CPU (gguf.GGUFReader decodes it all).
    Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
    """
    import struct

    with open(path, "rb") as fh:
        def unpack(fmt: str) -> Any:
            size = struct.calcsize(fmt)
            return struct.unpack(fmt, fh.read(size))[0]

        def string() -> str:
            return fh.read(unpack("<Q")).decode("utf-8", errors="replace")

        def skip_value(kind: int) -> None:
            if kind == 8:
                fh.seek(unpack("<Q"), 1)
            elif kind == 9:
                item, count = unpack("<I"), unpack("<Q")
                if item in _SCALARS:
                    fh.seek(struct.calcsize(_SCALARS[item]) * count, 1)
                else:
                    for _ in range(count):
                        skip_value(item)
            else:
                fh.seek(struct.calcsize(_SCALARS[kind]), 1)

        if fh.read(4) != b"GGUF":
            raise ValueError(f"not a GGUF file: {path}")
        unpack("<I")  # version
        n_tensors, n_kv = unpack("<Q"), unpack("<Q")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key, kind = string(), unpack("<I")
            if kind == 8:
                meta[key] = string()
            elif kind in _SCALARS:
                meta[key] = unpack(_SCALARS[kind])
            else:  # an array: keep only its length
                item, count = unpack("<I"), unpack("<Q")
                meta[f"{key}.length"] = count
                if item in _SCALARS:
                    fh.seek(struct.calcsize(_SCALARS[item]) * count, 1)
                else:
                    for _ in range(count):
                        skip_value(item)
        tensors = []
        for _ in range(n_tensors):
            string()
            dims = tuple(unpack("<Q") for _ in range(unpack("<I")))
            kind = unpack("<I")
            unpack("<Q")  # offset
            tensors.append((dims, kind))
    return meta, tensors


def read_gguf_header(path: str) -> dict[str, Any]:
    """Architecture facts and tensor bytes from the GGUF header (no weights loaded)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    meta, tensors = _read_gguf_metadata(path)
    weights = 0
    for dims, kind in tensors:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        count = 1
        for d in dims:
            count *= d
        weights += count // block * size
    arch = meta.get("general.architecture")
    heads = meta.get(f"{arch}.attention.head_count")
    kv_heads = meta.get(f"{arch}.attention.head_count_kv") or heads
    embedding = meta.get(f"{arch}.embedding_length")
    head_dim = embedding // heads if embedding and heads else None
    return {
        "architecture": arch,
        "weights_bytes": weights,
        "n_layer": meta.get(f"{arch}.block_count"),
        "n_head_kv": kv_heads,
        "key_length": meta.get(f"{arch}.attention.key_length") or head_dim,
        "value_length": meta.get(f"{arch}.attention.value_length") or head_dim,
        "context_length": meta.get(f"{arch}.context_length"),
        "n_vocab": meta.get("tokenizer.ggml.tokens.length"),
    }


def estimate(path: str, options: GgufOptions) -> MemoryEstimate:
    """Weights from the tensor sizes, runtime tables, plus the KV cache for ``gguf_n_ctx`` tokens:
    ``layers × n_ctx × kv_heads × (key_len × bytes(type_k) + value_len × bytes(type_v))``.
    An upper bound for models with sliding-window layers (llama.cpp caches less there)."""
    header = read_gguf_header(path)
    k_bytes = _CACHE_TYPE_BYTES.get(options.gguf_type_k or "f16", 2.0)
    v_bytes = _CACHE_TYPE_BYTES.get(options.gguf_type_v or "f16", 2.0)
    cache = 0.0
    if header["n_layer"] and header["n_head_kv"] and header["key_length"]:
        cache = (header["n_layer"] * options.gguf_n_ctx * header["n_head_kv"]
                 * (header["key_length"] * k_bytes + header["value_length"] * v_bytes))
    weights_mib = header["weights_bytes"] / 2**20
    # llama.cpp's vocabulary tables and compute buffers: about 230 bytes per vocabulary
    # entry, measured on Gemma 3 (262k tokens: ~60 MiB beyond weights and KV cache).
    runtime_mib = (header["n_vocab"] or 0) * 230 / 2**20
    cache_mib = cache / 2**20
    on_gpu = options.gguf_n_gpu_layers != 0 and _gpu_offload_supported()
    return MemoryEstimate(total_mib=weights_mib + cache_mib + runtime_mib, device="cuda" if on_gpu else "cpu",
                          weights_mib=round(weights_mib, 1), cache_mib=round(cache_mib, 1),
                          source="gguf_header", details={k: v for k, v in header.items() if k != "weights_bytes"})


def _gpu_offload_supported() -> bool:
    try:
        import llama_cpp
    except ImportError:
        return False
    return bool(llama_cpp.llama_supports_gpu_offload())


@hookimpl
def llmpool_estimate_memory(backend: str, model: Any) -> MemoryEstimate | None:
    if backend != BACKEND:
        return None
    if not model.model_path or not os.path.isfile(model.model_path):
        return None
    return estimate(model.model_path, model.options)


# ----- load / unload ---------------------------------------------------------------------

_FLASH_LOCK = threading.Lock()


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


def _cache_type_id(key: str, name: str | None) -> int | None:
    if name is None:
        return None
    value = ggml_type(name)
    if value is None:
        raise LoadError(f"{key}: unsupported GGUF cache type: '{name}' (this llama.cpp build has no "
                        f"GGML_TYPE_{name.upper()}; try one of {', '.join(CACHE_TYPES)})")
    return value


def _construct(path: str, options: GgufOptions) -> Any:
    import llama_cpp
    from llama_cpp import llama_cpp as low

    kwargs: dict[str, Any] = {
        "model_path": path, "n_gpu_layers": options.gguf_n_gpu_layers, "n_ctx": options.gguf_n_ctx,
        "n_batch": min(options.gguf_n_batch, options.gguf_n_ctx), "n_threads": options.gguf_n_threads or os.cpu_count(),
        "seed": options.gguf_seed, "verbose": False,
        "type_k": _cache_type_id("gguf_type_k", options.gguf_type_k),
        "type_v": _cache_type_id("gguf_type_v", options.gguf_type_v),
    }
    if options.gguf_flash_attn != "auto":
        return llama_cpp.Llama(flash_attn=options.gguf_flash_attn == "on", **kwargs)
    # llama-cpp-python maps flash_attn=False to LLAMA_FLASH_ATTN_TYPE_DISABLED; "auto"
    # needs LLAMA_FLASH_ATTN_TYPE_AUTO, which the constructor cannot express. As the
    # seed does, swap the constant for the duration of one construction.
    with _FLASH_LOCK:
        saved = low.LLAMA_FLASH_ATTN_TYPE_DISABLED
        low.LLAMA_FLASH_ATTN_TYPE_DISABLED = low.LLAMA_FLASH_ATTN_TYPE_AUTO
        try:
            return llama_cpp.Llama(flash_attn=False, **kwargs)
        finally:
            low.LLAMA_FLASH_ATTN_TYPE_DISABLED = saved


@hookimpl
def llmpool_load(backend: str, replica_id: str, model: Any) -> GgufRuntime | None:
    if backend != BACKEND:
        return None
    path = os.path.expanduser(model.model_path)
    _check_file(path)
    try:
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        raise LoadError(f"llama-cpp-python is required for the gguf backend: {exc}") from None
    started = time.perf_counter()
    try:
        llm = _construct(path, model.options)
    except ValueError as exc:
        raise LoadError(f"llama.cpp could not load {path}: {exc} (corrupt file, or an architecture this "
                        "llama.cpp build does not support?)") from None
    log.info("gguf_loaded", replica=replica_id, path=path, n_ctx=model.options.gguf_n_ctx,
             seconds=round(time.perf_counter() - started, 2))
    return GgufRuntime(replica_id=replica_id, model_path=path, options=model.options, llm=llm)


@hookimpl
def llmpool_unload(backend: str, runtime: GgufRuntime) -> bool | None:
    if backend != BACKEND:
        return None
    with runtime.lock:
        llm, runtime.llm, runtime.chat_formatter = runtime.llm, None, None
        if llm is not None:
            llm.close()
    return True


# ----- generation ------------------------------------------------------------------------


def prompt_text(runtime: GgufRuntime, request: GenerationRequest, rendered: RenderedPrompt) -> str:
    """The text to tokenize: the format's own rendering, or the GGUF's embedded template
    for ``chat_template``. ``gemma4_template`` prefers the embedded template, which carries
    Gemma 4's thinking switch (``enable_thinking``), as the seed does, and falls back to
    the rendered text for a GGUF without one."""
    gemma4_templated = (request.prompt_format == "gemma4_template"
                        and bool(runtime.llm.metadata.get("tokenizer.chat_template")))
    if rendered.text is None or gemma4_templated:
        return _chat_template_prompt(runtime, request, rendered.messages)
    return rendered.text


def _chat_template_prompt(runtime: GgufRuntime, request: GenerationRequest, messages: Any) -> str:
    """Render the GGUF's embedded chat template (``tokenizer.chat_template``)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = runtime.llm
    if runtime.chat_formatter is None:
        template = llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise BackendError(400, "prompt_format_unsupported",
                               f"{runtime.model_path} has no embedded chat template; choose another prompt_format")
        vocab = llm._model  # token texts for the template's bos/eos variables

        def text(token: int) -> str:
            return vocab.token_get_text(token) if token != -1 else ""

        runtime.chat_formatter = Jinja2ChatFormatter(template=template, eos_token=text(llm.token_eos()),
                                                     bos_token=text(llm.token_bos()))
    extra = {} if request.thinking is None else {"enable_thinking": request.thinking}
    return str(runtime.chat_formatter(messages=list(messages), **extra).prompt)


@hookimpl
def llmpool_stream(backend: str, runtime: GgufRuntime, request: GenerationRequest) -> Iterator[Any] | None:
    if backend != BACKEND:
        return None
    return _generate(runtime, request)


def _generate(runtime: GgufRuntime, request: GenerationRequest) -> Iterator[TextDelta | Completion]:
    rendered = render(request)
    decoding = request.decoding
    if decoding.beam_size > 1:
        log.info("beam_size_ignored", beam_size=decoding.beam_size, model=request.model)
    with runtime.lock:
        llm = runtime.llm
        if llm is None:
            raise LoadError(f"replica {runtime.replica_id} is unloaded")
        started = time.perf_counter()
        text = prompt_text(runtime, request, rendered)
        prompt = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        bos = llm.token_bos()
        if llm._model.add_bos_token() and bos != -1 and prompt[:1] != [bos]:
            prompt.insert(0, bos)  # formats without markup (raw) still need the model's BOS
        tokenized = time.perf_counter()
        if len(prompt) + 1 > llm.n_ctx():
            raise BackendError(400, "context_length_exceeded",
                               f"prompt has {len(prompt)} tokens; the model's context is {llm.n_ctx()} "
                               "(gguf_n_ctx)")
        budget = min(decoding.max_tokens, llm.n_ctx() - len(prompt))
        utf8, stops = Utf8Stream(), StopFilter(rendered.stops)
        splitter = ReasoningSplitter(rendered.reasoning_markers, inside=False)
        produced, finish, first_at = 0, "length", None
        import llama_cpp

        vocab = llm._model.vocab  # end-of-generation covers EOS and <end_of_turn>-like tokens
        tokens = llm.generate(prompt, top_k=decoding.top_k, top_p=decoding.top_p, min_p=0.0, temp=decoding.temperature,
                              repeat_penalty=decoding.repetition_penalty, reset=True)
        try:
            for token in tokens:
                if first_at is None:
                    first_at = time.perf_counter()
                if request.cancel.is_set():
                    finish = "cancelled"
                    break
                produced += 1
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    finish = "stop"
                    break
                piece = stops.push(utf8.push(llm.detokenize([token], special=False)))
                for delta in splitter.push(piece):
                    yield delta
                if stops.stopped:
                    finish = "stop"
                    break
                if produced >= budget:
                    break
            else:
                finish = "stop"
            if not stops.stopped and finish != "cancelled":
                for delta in splitter.push(stops.push(utf8.flush()) + stops.flush()):
                    yield delta
            for delta in splitter.flush():
                yield delta
        finally:
            tokens.close()
        ended = time.perf_counter()
    first = first_at or ended
    generate_s = ended - tokenized
    yield Completion(finish_reason=finish, metrics=BackendMetrics(
        tokenize_ms=round((tokenized - started) * 1000, 3),
        time_to_first_token_ms=round((first - tokenized) * 1000, 3),
        generate_total_ms=round(generate_s * 1000, 3),
        decode_after_first_token_ms=round((ended - first) * 1000, 3),
        prompt_tokens=len(prompt), output_tokens=produced,
        tokens_per_second=round(produced / generate_s, 2) if generate_s > 0 else None))
