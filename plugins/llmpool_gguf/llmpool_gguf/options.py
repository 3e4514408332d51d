"""Per-model keys of the ``gguf`` backend, their checks, and what admin advertises."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
# Bytes per element of the KV cache types llama.cpp accepts (block size / elements).
CACHE_TYPE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
                    "iq4_nl": 18 / 32, "q5_0": 22 / 32, "q5_1": 24 / 32}
_CACHE_TYPE_SHAPE = {"kind": "string_or_null", "format": "ggml_type_name", "default": "f16",
                     "allowed_values": list(CACHE_TYPES), "examples": ["f16", "q8_0", "q4_0"]}
LOAD_CONSTRAINTS = {
    # The seed's minimum; a prompt that does not fit is a 400 context_length_exceeded at
    # request time, naming the numbers.
    "gguf_n_ctx": {"kind": "integer", "minimum": 1, "step": 1},
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
# llama.cpp's LLAMA_MAX_SEQ: the most sequences one context can hold.
MAX_PARALLEL = 256


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
    """Per-model keys of the ``gguf`` backend (the seed's, plus threads, batch and the
    parallel sequences of the decode loop)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gguf_n_gpu_layers: int = -1
    gguf_n_ctx: int = Field(4096, ge=1, description="context per sequence (prompt + output of one request)")
    gguf_flash_attn: Literal["on", "off", "auto"] = "auto"
    gguf_type_k: str | None = None
    gguf_type_v: str | None = None
    gguf_n_threads: int | None = Field(None, ge=1, description="default: the machine's cores")
    gguf_n_batch: int = Field(512, ge=1, description="most tokens one llama_decode call takes")
    gguf_seed: int = Field(0, ge=0)
    gguf_parallel: int = Field(4, ge=1, le=MAX_PARALLEL,
                               description="sequences decoded together (continuous batching); 1: one at a time")
    gguf_repack: bool = Field(True, description="repacked weights for the CPU's matrix kernels (llama.cpp's extra "
                                                "buffer types); faster, but batched and lone decoding may differ "
                                                "in the last bits")
    gguf_swa_full: bool = Field(True, description="full-size cache for sliding-window layers, so a cached prompt "
                                                  "prefix can be reused from any point (llama-server's --swa-full)")
    gguf_embedding: bool = Field(False, description="serve embeddings (POST /openai/v1/embeddings) instead of "
                                                    "generating (llama-server's --embeddings)")
    gguf_pooling: Literal["mean", "cls", "last"] | None = Field(
        None, description="how an embedding model pools its token vectors into one; default: the model's own "
                          "(its GGUF header), else mean")

    @field_validator("gguf_flash_attn", mode="before")
    @classmethod
    def _flash(cls, value: Any) -> str:
        return normalize_flash_attn(value)

    @model_validator(mode="after")
    def _pooling_needs_embedding(self) -> GgufOptions:
        if self.gguf_pooling is not None and not self.gguf_embedding:
            raise ValueError("gguf_pooling applies only with gguf_embedding: true")
        return self

    @field_validator("gguf_type_k", "gguf_type_v", mode="before")
    @classmethod
    def _cache_type(cls, value: Any) -> str | None:
        return normalize_cache_type(value, check_build=False)


class GgufLoadOverride(BaseModel):
    """The admin load override keys with the API's types and schema bounds (a 422);
    :func:`llmpool_gguf.llmpool_check_load_override` applies the range rules (a 400)."""

    gguf_n_ctx: int | None = Field(None, ge=1)
    gguf_flash_attn: Any = None
    gguf_type_k: str | None = None
    gguf_type_v: str | None = None
