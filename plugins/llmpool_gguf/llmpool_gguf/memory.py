"""Memory one replica needs, from the GGUF header alone (no weights loaded)."""

from __future__ import annotations

import struct
from typing import Any

from llmpool_gguf.options import CACHE_TYPE_BYTES, GgufOptions
from llmpoold.types import MemoryEstimate

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
# llama.cpp's vocabulary tables, compute buffers and the decode loop's per-sequence
# state beyond weights and KV cache, per vocabulary entry: measured as the RSS a loaded
# replica adds after its first tokens (Gemma 3 270M, 262k tokens; see the tests).
RUNTIME_BYTES_PER_VOCAB_ENTRY = 230


def read_gguf_metadata(path: str) -> tuple[dict[str, Any], list[tuple[tuple[int, ...], int]]]:
    """Scalar metadata and (shape, ggml type) of every tensor from a GGUF header.

    Arrays are skipped without being decoded: the tokenizer's vocabulary (262k strings
    for Gemma 3) would otherwise cost seconds of CPU (gguf.GGUFReader decodes it all).
    Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
    """
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

    meta, tensors = read_gguf_metadata(path)
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


def context_cells(options: GgufOptions) -> int:
    """KV cells the context holds: ``gguf_n_ctx`` for each of ``gguf_parallel``
    sequences (llama.cpp pads the total to a multiple of 256)."""
    total = options.gguf_n_ctx * options.gguf_parallel
    return -(-total // 256) * 256


def estimate(path: str, options: GgufOptions) -> MemoryEstimate:
    """Weights from the tensor sizes, runtime tables, plus the KV cache for every
    sequence: ``layers × gguf_n_ctx × gguf_parallel × kv_heads × (key_len × bytes(type_k)
    + value_len × bytes(type_v))``. Exact with ``gguf_swa_full`` (the default); an
    upper bound without it for models with sliding-window layers (llama.cpp then
    caches only the window there)."""
    header = read_gguf_header(path)
    k_bytes = CACHE_TYPE_BYTES.get(options.gguf_type_k or "f16", 2.0)
    v_bytes = CACHE_TYPE_BYTES.get(options.gguf_type_v or "f16", 2.0)
    cache = 0.0
    if header["n_layer"] and header["n_head_kv"] and header["key_length"]:
        cache = (header["n_layer"] * context_cells(options) * header["n_head_kv"]
                 * (header["key_length"] * k_bytes + header["value_length"] * v_bytes))
    weights_mib = header["weights_bytes"] / 2**20
    runtime_mib = (header["n_vocab"] or 0) * RUNTIME_BYTES_PER_VOCAB_ENTRY / 2**20
    cache_mib = cache / 2**20
    on_gpu = options.gguf_n_gpu_layers != 0 and _gpu_offload_supported()
    details = {k: v for k, v in header.items() if k != "weights_bytes"}
    details.update(parallel=options.gguf_parallel, runtime_mib=round(runtime_mib, 1))
    return MemoryEstimate(total_mib=weights_mib + cache_mib + runtime_mib, device="cuda" if on_gpu else "cpu",
                          weights_mib=round(weights_mib, 1), cache_mib=round(cache_mib, 1),
                          source="gguf_header", details=details)


def _gpu_offload_supported() -> bool:
    try:
        import llama_cpp
    except ImportError:
        return False
    return bool(llama_cpp.llama_supports_gpu_offload())
