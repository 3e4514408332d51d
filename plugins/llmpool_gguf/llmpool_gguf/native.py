"""llama.cpp's native objects as the GGUF engines open and free them: the model, the
context parameters every context shares, and the release of model, context and batch.

Both :class:`~llmpool_gguf.engine.Engine` (generation) and
:class:`~llmpool_gguf.embedding.EmbeddingEngine` (embeddings) load a model the same way
and differ only in the context they make on it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from typing import Any

from llmpool_gguf.options import CACHE_TYPES, GgufOptions, ggml_type
from llmpoold.errors import BackendError, LoadError

_BACKEND_READY = False
_BACKEND_LOCK = threading.Lock()


def low() -> Any:
    """llama-cpp-python's low-level bindings (imported on first use: the plugin loads
    without them, and says so at model load)."""
    from llama_cpp import llama_cpp as bindings

    return bindings


def init_backend() -> None:
    global _BACKEND_READY
    with _BACKEND_LOCK:
        if not _BACKEND_READY:
            # llama-cpp-python prints llama.cpp's log lines unless its logger is above INFO
            logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
            low().llama_backend_init()
            _BACKEND_READY = True


def cache_type_id(key: str, name: str | None) -> int | None:
    if name is None:
        return None
    value = ggml_type(name)
    if value is None:
        raise LoadError(f"{key}: unsupported GGUF cache type: '{name}' (this llama.cpp build has no "
                        f"GGML_TYPE_{name.upper()}; try one of {', '.join(CACHE_TYPES)})")
    return value


def context_params(options: GgufOptions) -> Any:
    """The context parameters both engines share: threads, flash attention, the KV cache
    types, no perf counters. Raises LoadError for a cache type this build lacks (before
    any model is loaded)."""
    bindings = low()
    params = bindings.llama_context_default_params()
    threads = options.gguf_n_threads or os.cpu_count() or 1
    params.n_threads = params.n_threads_batch = threads
    params.flash_attn_type = {"on": bindings.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                              "off": bindings.LLAMA_FLASH_ATTN_TYPE_DISABLED,
                              "auto": bindings.LLAMA_FLASH_ATTN_TYPE_AUTO}[options.gguf_flash_attn]
    params.no_perf = True
    for key, name in (("type_k", options.gguf_type_k), ("type_v", options.gguf_type_v)):
        value = cache_type_id(f"gguf_{key}", name)
        if value is not None:
            setattr(params, key, value)
    return params


def load_model(path: str, options: GgufOptions) -> Any:
    """The ``llama_model`` of the GGUF at ``path`` (GPU layers and weight repacking from
    ``options``). Raises ValueError when llama.cpp cannot load it."""
    bindings = low()
    init_backend()
    mparams = bindings.llama_model_default_params()
    mparams.n_gpu_layers = 0x7FFFFFFF if options.gguf_n_gpu_layers == -1 else options.gguf_n_gpu_layers
    mparams.use_extra_bufts = options.gguf_repack
    model = bindings.llama_model_load_from_file(path.encode("utf-8"), mparams)
    if not model:
        raise ValueError("llama_model_load_from_file failed")
    return model


def tokenize(vocab: Any, data: bytes, *, add_bos: bool, special: bool) -> list[int]:
    """``data`` as tokens of ``vocab`` (thread-safe: read-only); ``add_bos`` puts the
    BOS token first where the vocabulary has one, ``special`` parses special-token markup."""
    bindings = low()
    size = len(data) + 8
    buf = (bindings.llama_token * size)()
    n = bindings.llama_tokenize(vocab, data, len(data), buf, size, add_bos, special)
    if n < 0:  # the buffer was short: -n is the size it needs
        size = -n
        buf = (bindings.llama_token * size)()
        n = bindings.llama_tokenize(vocab, data, len(data), buf, size, add_bos, special)
        if n < 0:
            raise BackendError(500, "backend_error", f"llama_tokenize failed ({n})")
    return list(buf[:n])


def model_metadata(model: Any, key: str) -> str | None:
    """One GGUF metadata value of a loaded ``llama_model`` as a string (None when absent)."""
    bindings = low()
    size = 4096
    while True:
        buf = ctypes.create_string_buffer(size)
        n = bindings.llama_model_meta_val_str(model, key.encode("utf-8"), buf, size)
        if n < 0:
            return None
        if n < size:
            return buf.value.decode("utf-8", errors="replace")
        size = n + 1


def free_native(holder: Any) -> None:
    """Free ``holder``'s ``batch``, ``ctx`` and ``model`` (in that order; each may be
    unset) and set them to None, so a second call is a no-op."""
    bindings = low()
    if holder.batch is not None:
        bindings.llama_batch_free(holder.batch)
        holder.batch = None
    if holder.ctx:
        bindings.llama_free(holder.ctx)
        holder.ctx = None
    if holder.model:
        bindings.llama_model_free(holder.model)
        holder.model = None
