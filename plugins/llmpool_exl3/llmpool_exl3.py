"""llmpool backend plugin ``exllamav3`` (alias ``exl3``): EXL3 models through ExLlamaV3.

One runtime is one ExLlamaV3 model + paged cache + dynamic generator. Unlike a
one-request-at-a-time runtime, the generator batches: every request becomes one
``exllamav3.Job`` in the same generator, and one driver thread per replica enqueues
jobs, calls ``Generator.iterate()`` while any job remains and routes each result to the
queue of the request it belongs to (by the job's ``identifier``). So the replica's
concurrency is ``exllama_max_batch_size``. A cancelled request's job is removed with
``Generator.cancel(job)`` while the others go on.

The exllamav3 calls follow its source (version 1.6.5, ``exllamav3/``):
``model/config.py`` ``Config.from_directory``; ``model/model.py`` ``Model.from_config``
and ``Model.load`` (→ ``load_gen(device=, use_per_device=, tensor_p=, tp_backend=,
progressbar=, max_chunk_size=, max_batch_size=)``); ``cache/cache.py``
``Cache(model, max_num_tokens=, layer_type=, **layer kwargs)`` with ``cache/quant.py``
``CacheLayer_quant(k_bits=, v_bits=)``; ``tokenizer/tokenizer.py`` ``Tokenizer.from_config``,
``hf_render_chat_template(messages, add_generation_prompt=, **template_kwargs)`` (the
chat template as text; the prompt is tokenized through ``Tokenizer.tokenizer``, the
Hugging Face tokenizer it wraps); ``generator/generator.py``
``Generator(model, cache, tokenizer, max_batch_size=, max_chunk_size=, max_q_size=)``,
``enqueue``, ``cancel``, ``iterate`` (result dicts documented there), ``clear_queue``;
``generator/job.py`` ``Job(input_ids, max_new_tokens=, sampler=, stop_conditions=,
identifier=, max_rq_tokens=)``; ``generator/sampler/presets.py`` ``ComboSampler``.

exllamav3 needs CUDA: without a GPU the plugin imports, declares its backend and
estimates memory, and loading fails with a :class:`~llmpoold.errors.LoadError` saying
that CUDA is required (``import exllamav3`` itself would try to compile its CUDA
extension, so it is never imported before that check).
"""

from __future__ import annotations

import gc
import importlib
import itertools
import json
import os
import queue
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator

from llmpoold import hookimpl
from llmpoold.errors import ApiError, BackendError, LoadError
from llmpoold.hookspecs import BackendSpec
from llmpoold.prompts import RenderedPrompt, capabilities_for, render
from llmpoold.segments import template_segments, tokenize_segments
from llmpoold.textstream import GenerationClock, TextPipeline, queue_items
from llmpoold.types import BackendMetrics, Completion, GenerationRequest, MemoryEstimate, ModelTraits, TextDelta

BACKEND = "exllamav3"
ALIASES = ("exl3",)
PAGE_SIZE = 256  # exllamav3/constants.py: the cache is paged in 256-token pages
log = structlog.get_logger("llmpool_exl3")

# Formats whose prompt comes from the model's own chat template (the tokenizer's
# ``hf_render_chat_template``), with the thinking switch passed as ``enable_thinking``. The
# seed renders qwen3/gemma4 this way; ``chat_template`` is llmpool's generic form.
TEMPLATE_FORMATS = frozenset({"chat_template", "qwen3_template", "gemma4_template"})

_BITS = [2, 3, 4, 5, 6, 7, 8]
_BITS_SHAPE = {"kind": "integer_or_null", "minimum": 2, "maximum": 8, "default": None, "null_means": "fp16",
               "allowed_values": _BITS}
LOAD_CONSTRAINTS = {
    "exllama_cache_size": {"kind": "integer", "minimum": 256, "step": 256},
    "exllama_max_rq_tokens": {"kind": "integer", "minimum": 1, "step": 1},
    "exllama_cache_k_bits": _BITS_SHAPE,
    "exllama_cache_v_bits": _BITS_SHAPE,
    "exllama_cache_quant": {"kind": "string_or_null", "format": "<bits>|<k_bits>,<v_bits>"},
}
LOAD_RECOMMENDATIONS = {"exllama_cache_bit_pairs": {
    "kind": "pair_presets", "fields": ["exllama_cache_k_bits", "exllama_cache_v_bits"],
    "recommended_pairs": [
        {"label": "fp16", "exllama_cache_k_bits": None, "exllama_cache_v_bits": None},
        {"label": "8/8", "exllama_cache_k_bits": 8, "exllama_cache_v_bits": 8},
        {"label": "8/4", "exllama_cache_k_bits": 8, "exllama_cache_v_bits": 4},
    ],
    "notes": ["Service-curated presets for ExLlamaV3 cache bits.",
              "These presets are not an exhaustive list of valid ExLlamaV3 K/V bit pairs."]}}
CACHE_QUANT_ERROR = "exllama_cache_quant must be '<bits>' or '<k_bits>,<v_bits>'"
CACHE_SIZE_ERROR = "exllama_cache_size must be a positive multiple of 256"


# ----- options ---------------------------------------------------------------------------


def parse_cache_quant(value: Any) -> tuple[int, int] | None:
    """``None`` → fp16; ``"8"`` → (8, 8); ``"8,4"`` → (8, 4). Bits are 2..8
    (``CacheLayer_quant`` asserts that range). ValueError with the seed's message."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(CACHE_QUANT_ERROR)
    parts = [p.strip() for p in str(value).split(",")]
    if len(parts) not in (1, 2):
        raise ValueError(CACHE_QUANT_ERROR)
    try:
        bits = [int(p) for p in parts]
    except ValueError:
        raise ValueError(CACHE_QUANT_ERROR) from None
    if any(b < 2 or b > 8 for b in bits):
        raise ValueError("exllama_cache_quant bits must be between 2 and 8")
    return (bits[0], bits[-1])


def normalize_cache_quant(value: Any) -> str | None:
    """The canonical text of a cache quant setting: ``"8"`` or ``"8,4"`` (None: fp16)."""
    bits = parse_cache_quant(value)
    if bits is None:
        return None
    return str(bits[0]) if bits[0] == bits[1] else f"{bits[0]},{bits[1]}"


def check_cache_size(value: Any, message: str = CACHE_SIZE_ERROR) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % PAGE_SIZE:
        raise ValueError(message)
    return value


class Exl3Options(BaseModel):
    """Per-model keys of the ``exllamav3`` backend (the seed's keys and defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device: str = "cuda"
    exllama_cache_size: int = 8192
    exllama_cache_quant: str | None = None
    exllama_gpu_split: tuple[float, ...] | Literal["auto"] | None = None
    exllama_tensor_parallel: bool = False
    exllama_tp_backend: Literal["native", "nccl"] = "native"
    exllama_max_batch_size: int = Field(64, ge=1)
    exllama_max_chunk_size: int = Field(2048, ge=1)
    exllama_max_q_size: int = Field(8, ge=1)
    exllama_max_rq_tokens: int | None = Field(None, ge=1)

    @field_validator("exllama_cache_size", mode="before")
    @classmethod
    def _cache_size(cls, value: Any) -> int:
        return check_cache_size(value)

    @field_validator("exllama_cache_quant", mode="before")
    @classmethod
    def _cache_quant(cls, value: Any) -> str | None:
        return normalize_cache_quant(value)

    @field_validator("exllama_gpu_split", mode="before")
    @classmethod
    def _gpu_split(cls, value: Any) -> Any:
        """GB to use per GPU: a list (``[20, 24]``), ``"20,24"``, or ``"auto"``/null (autosplit)."""
        if value is None:
            return None
        if isinstance(value, str):
            text = value.strip().lower()
            if text in ("", "auto"):
                return "auto" if text else None
            value = text.split(",")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)) or not value:
            raise ValueError("exllama_gpu_split must be 'auto' or a list of GB per GPU")
        try:
            split = tuple(float(v) for v in value)
        except (TypeError, ValueError):
            raise ValueError("exllama_gpu_split must be 'auto' or a list of GB per GPU") from None
        if any(v < 0 for v in split) or not any(v > 0 for v in split):
            raise ValueError("exllama_gpu_split values must be >= 0 GB with at least one > 0")
        return split

    @field_validator("exllama_tp_backend", mode="before")
    @classmethod
    def _tp_backend(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    def cache_bits(self) -> tuple[int, int] | None:
        return parse_cache_quant(self.exllama_cache_quant)


class Exl3LoadOverride(BaseModel):
    """The admin load override keys with the API's types and schema bounds (a 422);
    :func:`llmpool_check_load_override` applies the combination and range rules (a 400)."""

    exllama_cache_size: int | None = Field(None, ge=256)
    exllama_cache_k_bits: int | None = Field(None, ge=2, le=8)
    exllama_cache_v_bits: int | None = Field(None, ge=2, le=8)
    exllama_cache_quant: str | None = None
    exllama_max_rq_tokens: int | None = Field(None, ge=1)


# ----- static hooks ----------------------------------------------------------------------


@hookimpl
def llmpool_backends() -> list[BackendSpec]:
    return [BackendSpec(
        name=BACKEND, aliases=ALIASES, description="EXL3 models through ExLlamaV3 (NVIDIA GPU, CUDA)",
        options_model=Exl3Options, load_override_keys=frozenset(Exl3LoadOverride.model_fields),
        load_override_model=Exl3LoadOverride,
        load_constraints=LOAD_CONSTRAINTS, load_recommendations=LOAD_RECOMMENDATIONS)]


@hookimpl
def llmpool_model_traits(backend: str, model: Any) -> ModelTraits | None:
    if backend != BACKEND:
        return None
    options: Exl3Options = model.options
    return ModelTraits(capabilities=capabilities_for(model.prompt_format, ("text",)),
                       concurrency=options.exllama_max_batch_size)


@hookimpl
def llmpool_check_load_override(backend: str, override: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The seed's exllamav3 override rules. ``exllama_cache_k_bits``/``_v_bits`` become
    ``exllama_cache_quant`` (both null → fp16, both ints → ``"<k>,<v>"``)."""
    if backend != BACKEND:
        return None
    checked = dict(override)
    has_bits = "exllama_cache_k_bits" in checked or "exllama_cache_v_bits" in checked
    if has_bits:
        if "exllama_cache_quant" in checked:
            raise ValueError("exllama_cache_quant cannot be combined with exllama_cache_k_bits/exllama_cache_v_bits")
        if "exllama_cache_k_bits" not in checked or "exllama_cache_v_bits" not in checked:
            raise ValueError("exllama_cache_k_bits and exllama_cache_v_bits must be provided together")
        k_bits, v_bits = checked.pop("exllama_cache_k_bits"), checked.pop("exllama_cache_v_bits")
        if k_bits is None and v_bits is None:
            checked["exllama_cache_quant"] = None
        elif all(isinstance(b, int) and not isinstance(b, bool) for b in (k_bits, v_bits)):
            checked["exllama_cache_quant"] = f"{k_bits},{v_bits}"
        else:
            raise ValueError("exllama_cache_k_bits and exllama_cache_v_bits must both be integers or both be null")
    if "exllama_cache_size" in checked:
        check_cache_size(checked["exllama_cache_size"], "exllama_cache_size load override must be a positive "
                                                         "multiple of 256")
    if "exllama_cache_quant" in checked:
        value = checked["exllama_cache_quant"]
        if value is not None and not isinstance(value, str):
            raise ValueError(CACHE_QUANT_ERROR)
        parse_cache_quant(value)
    if "exllama_max_rq_tokens" in checked:
        value = checked["exllama_max_rq_tokens"]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError("exllama_max_rq_tokens load override must be a positive integer or null")
    return checked


# ----- memory estimate -------------------------------------------------------------------


def _text_config(directory: str) -> dict[str, Any]:
    with open(os.path.join(directory, "config.json"), encoding="utf-8") as fh:
        config = json.load(fh)
    text = config.get("text_config")
    return {**config, **text} if isinstance(text, dict) else config


def cache_bytes_per_token(directory: str, bits: tuple[int, int] | None) -> int | None:
    """K/V cache bytes per token over all attention layers, from ``config.json``.

    fp16 (``cache/fp16.py``): K and V of ``kv_heads × head_dim`` halves each.
    Quantized (``cache/quant.py``): ``token_dim/32 × bits`` int32 words for K and V plus
    one half scale per 32 elements for each. Sliding-window and recurrent layers are
    counted as full attention layers, so this is an upper bound for such models.
    """
    try:
        cfg = _text_config(directory)
    except (OSError, ValueError):
        return None
    layers = cfg.get("num_hidden_layers")
    heads = cfg.get("num_attention_heads")
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or (cfg["hidden_size"] // heads if cfg.get("hidden_size") and heads else None)
    if not (isinstance(layers, int) and isinstance(kv_heads, int) and isinstance(head_dim, int)):
        return None
    token_dim = kv_heads * head_dim
    if bits is None:
        per_layer = 2 * token_dim * 2
    else:
        per_layer = token_dim * (bits[0] + bits[1]) // 8 + 2 * (token_dim // 32) * 2
    return layers * per_layer


def tensor_file_bytes(directory: str) -> int:
    """Bytes of the model's ``*.safetensors`` files (EXL3 weights as stored)."""
    total = 0
    for name in os.listdir(directory):
        if name.endswith(".safetensors"):
            total += os.path.getsize(os.path.join(directory, name))
    return total


def estimate(directory: str, options: Exl3Options) -> MemoryEstimate | None:
    weights = tensor_file_bytes(directory)
    if not weights:
        return None
    per_token = cache_bytes_per_token(directory, options.cache_bits())
    cache = (per_token or 0) * options.exllama_cache_size
    weights_mib, cache_mib = weights / 2**20, cache / 2**20
    return MemoryEstimate(
        total_mib=round(weights_mib + cache_mib, 1), device="cuda", weights_mib=round(weights_mib, 1),
        cache_mib=round(cache_mib, 1) if per_token is not None else None, source="safetensors_and_cache",
        details={"cache_tokens": options.exllama_cache_size, "cache_quant": options.exllama_cache_quant or "fp16",
                 "cache_bytes_per_token": per_token})


@hookimpl
def llmpool_estimate_memory(backend: str, model: Any) -> MemoryEstimate | None:
    if backend != BACKEND:
        return None
    path = os.path.expanduser(model.model_path or "")
    if not os.path.isdir(path):
        return None
    return estimate(path, model.options)


# ----- load / unload ---------------------------------------------------------------------


def cuda_available() -> bool:
    """Whether torch sees a CUDA device (tests replace this to run against the fake)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _cuda_problem() -> str:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    built = torch.version.cuda
    return (f"torch {torch.__version__} sees no CUDA device" if built
            else f"torch {torch.__version__} is a CPU-only build")


def _import_exllamav3() -> Any:
    try:
        return importlib.import_module("exllamav3")
    except ImportError as exc:
        raise LoadError(f"exllamav3 is required for the exllamav3 backend ({exc}); "
                        "install it with: pip install exllamav3") from None
    except (OSError, RuntimeError) as exc:
        # ``import exllamav3`` builds its CUDA extension on first use (exllamav3/ext.py)
        raise LoadError(f"exllamav3 could not load its CUDA extension: {exc}") from None


def _check_directory(path: str) -> None:
    if not os.path.exists(path):
        raise LoadError(f"EXL3 model directory not found: {path}")
    if not os.path.isdir(path):
        raise LoadError(f"model_path must be an EXL3 model directory (config.json + *.safetensors), got a file: {path}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise LoadError(f"not an EXL3 model directory (no config.json): {path}")


def _load_kwargs(options: Exl3Options) -> dict[str, Any]:
    """Arguments for ``Model.load`` as the seed passes them: tensor-parallel, a manual
    split (GB per device), autosplit, or one device (``cuda`` → ``cuda:0``)."""
    kwargs: dict[str, Any] = {"progressbar": False}
    if options.exllama_tensor_parallel or options.exllama_gpu_split is not None:
        # "the maximum number of tokens to expect in a single forward pass; informs the
        # layer split only" (load_gen): the generator's prefill chunk
        kwargs["max_chunk_size"] = options.exllama_max_chunk_size
    if options.exllama_tensor_parallel:
        kwargs.update(tensor_p=True, tp_backend=options.exllama_tp_backend)
        if isinstance(options.exllama_gpu_split, tuple):
            kwargs["use_per_device"] = list(options.exllama_gpu_split)
    elif isinstance(options.exllama_gpu_split, tuple):
        kwargs["use_per_device"] = list(options.exllama_gpu_split)
    elif options.exllama_gpu_split != "auto":
        kwargs["device"] = "cuda:0" if options.device == "cuda" else options.device
    return kwargs


@dataclass
class Exl3Runtime:
    """One loaded replica: the exllamav3 objects and the thread that drives the generator.

    ``lock`` guards the generator (enqueue, cancel, iterate) and ``streams``; the driver
    holds it for one ``iterate()`` at a time, so a submit or cancel waits at most one
    step. ``streams`` maps a job identifier to the queue its results go to.
    """

    replica_id: str
    model_path: str
    options: Exl3Options
    exl3: Any
    config: Any
    model: Any
    cache: Any
    tokenizer: Any
    generator: Any
    # the model's Hugging Face tokenizer (``tokenizer.tokenizer``) and a copy of it that
    # never parses special tokens, for user text (see ``tokenize``)
    hf_tokenizer: Any = None
    text_tokenizer: Any = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    streams: dict[int, queue.SimpleQueue[Any]] = field(default_factory=dict)
    closed: bool = False
    driver: threading.Thread | None = None
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    _wake: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self._wake = threading.Condition(self.lock)

    def tokenize(self, text: str, special: bool) -> list[int]:
        """``text`` tokenized without BOS/EOS, special tokens parsed only with ``special``.

        Through the Hugging Face tokenizer exllamav3 holds: ``Tokenizer.encode(...,
        encode_special_tokens=False)`` only leaves out the post-processor's BOS
        (``encode_part`` passes the flag as ``add_special_tokens``) and still matches
        special tokens written in the text; tokenizers' own ``encode_special_tokens`` on
        a copy does not."""
        tokenizer = self.hf_tokenizer if special else self.text_tokenizer
        return list(tokenizer.encode(text, add_special_tokens=False).ids)

    def start(self) -> None:
        self.driver = threading.Thread(target=self._drive, name=f"exl3-driver-{self.replica_id}", daemon=True)
        self.driver.start()

    def next_id(self) -> int:
        return next(self._ids)

    def submit(self, job: Any, key: int) -> queue.SimpleQueue[Any]:
        """Enqueue ``job`` and return the queue its results will arrive on."""
        results: queue.SimpleQueue[Any] = queue.SimpleQueue()
        with self._wake:
            if self.closed:
                raise BackendError(503, "model_unloading", f"replica {self.replica_id} is unloading")
            try:
                self.generator.enqueue(job)
            except (AssertionError, ValueError) as exc:
                # Job.prepare_for_queue asserts that the prompt fits the cache
                raise BackendError(400, "context_length_exceeded",
                                   f"{exc} (exllama_cache_size is {self.options.exllama_cache_size})",
                                   param="messages") from None
            self.streams[key] = results
            self._wake.notify()
        return results

    def cancel(self, job: Any, key: int) -> None:
        """Drop a job that has not finished: ``Generator.cancel`` frees its pages."""
        with self._wake:
            if self.streams.pop(key, None) is not None:
                self.generator.cancel(job)

    def forget(self, key: int) -> None:
        with self._wake:
            self.streams.pop(key, None)

    def _drive(self) -> None:
        while True:
            with self._wake:
                while not self.closed and self.generator.num_remaining_jobs() == 0:
                    self._wake.wait()
                if self.closed:
                    return
                try:
                    results = self.generator.iterate()
                except Exception as exc:  # noqa: BLE001 - every job in flight fails with it
                    log.error("exl3_iterate_failed", replica=self.replica_id, error=str(exc))
                    for failed in self.streams.values():
                        failed.put(exc)
                    self.streams.clear()
                    try:
                        self.generator.clear_queue()
                    except Exception:  # noqa: BLE001
                        pass
                    continue
                for result in results:
                    key = result.get("identifier")
                    target = self.streams.get(key) if key is not None else None
                    if target is None:
                        continue
                    target.put(result)
                    if result.get("eos"):
                        del self.streams[key]
            # Let a waiting submit/cancel take the lock between steps.
            time.sleep(0)

    def stop(self) -> None:
        with self._wake:
            self.closed = True
            for stream in self.streams.values():
                stream.put(BackendError(503, "model_unloading", f"replica {self.replica_id} is unloading"))
            self.streams.clear()
            self._wake.notify_all()
        if self.driver is not None and self.driver is not threading.current_thread():
            self.driver.join(timeout=30)


@hookimpl
def llmpool_load(backend: str, replica_id: str, model: Any) -> Exl3Runtime | None:
    if backend != BACKEND:
        return None
    path = os.path.expanduser(model.model_path)
    _check_directory(path)
    if not cuda_available():
        raise LoadError(f"the exllamav3 backend requires CUDA (an NVIDIA GPU): {_cuda_problem()}")
    exl3 = _import_exllamav3()
    options: Exl3Options = model.options
    started = time.perf_counter()
    exl_model = None
    try:
        config = exl3.Config.from_directory(path)
        exl_model = exl3.Model.from_config(config)
        bits = options.cache_bits()
        if bits is None:
            cache = exl3.Cache(exl_model, max_num_tokens=options.exllama_cache_size, layer_type=exl3.CacheLayer_fp16)
        else:
            cache = exl3.Cache(exl_model, max_num_tokens=options.exllama_cache_size,
                               layer_type=exl3.CacheLayer_quant, k_bits=bits[0], v_bits=bits[1])
        # The cache must exist before load: Model.load allocates the attached caches.
        exl_model.load(**_load_kwargs(options))
        tokenizer = exl3.Tokenizer.from_config(config)
        generator = exl3.Generator(model=exl_model, cache=cache, tokenizer=tokenizer,
                                   max_batch_size=options.exllama_max_batch_size,
                                   max_chunk_size=options.exllama_max_chunk_size,
                                   max_q_size=options.exllama_max_q_size)
    except (AssertionError, ValueError, KeyError, TypeError, OSError, RuntimeError) as exc:
        # e.g. torch.cuda.OutOfMemoryError (a RuntimeError): free what was loaded
        if exl_model is not None:
            try:
                exl_model.unload()
            except Exception:  # noqa: BLE001
                pass
        raise LoadError(f"exllamav3 could not load {path}: {exc or type(exc).__name__}") from None
    runtime = Exl3Runtime(replica_id=replica_id, model_path=path, options=options, exl3=exl3, config=config,
                          model=exl_model, cache=cache, tokenizer=tokenizer, generator=generator,
                          hf_tokenizer=tokenizer.tokenizer, text_tokenizer=_text_tokenizer(tokenizer.tokenizer))
    runtime.start()
    log.info("exl3_loaded", replica=replica_id, path=path, cache_size=options.exllama_cache_size,
             cache_quant=options.exllama_cache_quant or "fp16", max_batch_size=options.exllama_max_batch_size,
             seconds=round(time.perf_counter() - started, 2))
    return runtime


def _text_tokenizer(hf_tokenizer: Any) -> Any:
    """A copy of a ``tokenizers.Tokenizer`` that encodes special-token spellings as
    text (its ``encode_special_tokens`` switch; a copy, so the generator's own
    tokenizer, used on the driver thread, is never switched)."""
    copy = type(hf_tokenizer).from_str(hf_tokenizer.to_str())
    copy.encode_special_tokens = True
    return copy


@hookimpl
def llmpool_unload(backend: str, runtime: Exl3Runtime) -> bool | None:
    """The seed's cleanup order: stop the driver, clear the queue, unload the model,
    detach the cache, drop references, then empty the CUDA allocator cache."""
    if backend != BACKEND:
        return None
    runtime.stop()
    steps = (
        ("clear_queue", lambda: runtime.generator.clear_queue()),
        ("close_generator", lambda: getattr(runtime.generator, "close", lambda: None)()),
        ("unload_model", lambda: runtime.model.unload()),
        ("detach_cache", lambda: runtime.cache.detach_from_model(runtime.model)),
    )
    for name, step in steps:
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - best effort, as the seed
            log.warning("exl3_unload_step_failed", replica=runtime.replica_id, step=name, error=str(exc))
    runtime.generator = runtime.cache = runtime.model = runtime.tokenizer = runtime.config = None
    runtime.hf_tokenizer = runtime.text_tokenizer = None
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass
    return True


# ----- generation ------------------------------------------------------------------------


def _encode(runtime: Exl3Runtime, request: GenerationRequest, rendered: RenderedPrompt) -> Any:
    """Prompt ids, shape (1, n), on the CPU (``Job`` asserts ``input_ids`` are in system memory).

    Tokenized by segment, markup parsed and the client's text as text: llmpool's own
    renderings, and the template formats' text from the model's chat template
    (``Tokenizer.hf_render_chat_template``, split by ``template_segments``)."""
    tokenizer = runtime.tokenizer
    text = rendered.text
    segments = rendered.segments
    if request.prompt_format in TEMPLATE_FORMATS:
        kwargs: dict[str, Any] = {}
        if request.prompt_format != "chat_template":
            kwargs["enable_thinking"] = bool(request.thinking)  # the seed: None → False
        elif request.thinking is not None:
            kwargs["enable_thinking"] = request.thinking

        def render_template(messages: list[dict[str, str]]) -> str:
            return str(tokenizer.hf_render_chat_template(messages, add_generation_prompt=True, **kwargs))

        try:
            segments = template_segments(rendered.messages, render_template, runtime.tokenize, model=request.model)
        except ApiError:
            raise
        except Exception as exc:  # noqa: BLE001 - no template, a Jinja error, transformers missing
            if text is None:
                raise BackendError(500, "backend_error",
                                   f"the model has no usable chat template for prompt_format 'chat_template': "
                                   f"{exc}") from None
            # no template in the model directory: llmpool's own rendering
    elif text is None:
        raise BackendError(500, "backend_error", f"prompt_format '{request.prompt_format}' has no rendering")
    import torch

    ids = tokenize_segments(segments, runtime.tokenize)
    bos = tokenizer.bos_token_id
    if request.prompt_format == "raw" and getattr(runtime.config, "bos_token_id", None) is not None and \
            bos is not None and ids[:1] != [bos]:
        ids.insert(0, bos)  # a base model's input still starts with its BOS
    return torch.tensor([ids], dtype=torch.long)


def _stop_conditions(runtime: Exl3Runtime, stops: tuple[str, ...]) -> list[int | str]:
    """Merged stop strings, plus the ids of stop strings that are single (special)
    tokens, plus the model's EOS ids (``eos_token_id`` and ``eos_token_id_list``).

    Special tokens decode to "" when ``decode_special_tokens`` is off, so a stop string
    like ``<end_of_turn>`` can only end a job through its token id."""
    conditions: dict[int | str, None] = dict.fromkeys(stops)
    tokenizer = runtime.tokenizer
    for stop in stops:
        try:
            token = tokenizer.single_id(stop)
        except Exception:  # noqa: BLE001 - not a single token
            token = None
        if isinstance(token, int):
            conditions.setdefault(token, None)
    eos_ids = [getattr(tokenizer, "eos_token_id", None)] + list(getattr(runtime.config, "eos_token_id_list", None)
                                                                 or [])
    for token in eos_ids:
        if isinstance(token, int):
            conditions.setdefault(token, None)
    return list(conditions)


def _prompt_opens_reasoning(runtime: Exl3Runtime, ids: Any, markers: tuple[str, str] | None) -> bool:
    """True when the prompt already ends inside a reasoning block (a template that
    prefills ``<think>``), so the output starts as reasoning."""
    if markers is None:
        return False
    try:
        tail = runtime.tokenizer.decode(ids[:, -8:], decode_special_tokens=True)
    except Exception:  # noqa: BLE001
        return False
    tail = tail[0] if isinstance(tail, list) else tail
    return str(tail).rstrip().endswith(markers[0])


_FINISH = {"max_new_tokens": "length"}


def _metrics(clock: GenerationClock, eos: Mapping[str, Any], *, prompt_tokens: int) -> BackendMetrics:
    """Metrics from the job's eos result (``generator/job.py`` ``emit``): ``time_prefill``
    is the time to the first token, ``time_generate`` the time from it to the last."""
    prefill, generate = eos.get("time_prefill"), eos.get("time_generate")
    measured = (prefill, generate) if prefill is not None and generate is not None else None
    return clock.metrics(prompt_tokens=int(eos.get("prompt_tokens") or prompt_tokens),
                         output_tokens=eos.get("new_tokens"), cached_prompt_tokens=eos.get("cached_tokens"),
                         runtime_seconds=measured)


@hookimpl
def llmpool_stream(backend: str, runtime: Exl3Runtime, request: GenerationRequest) -> Iterator[Any] | None:
    if backend != BACKEND:
        return None
    return _generate(runtime, request)


def _generate(runtime: Exl3Runtime, request: GenerationRequest) -> Iterator[TextDelta | Completion]:
    if runtime.generator is None:
        raise BackendError(503, "model_unloading", f"replica {runtime.replica_id} is unloaded")
    rendered = render(request)
    decoding = request.decoding
    if decoding.beam_size > 1:
        log.info("beam_size_ignored", beam_size=decoding.beam_size, model=request.model)
    exl3 = runtime.exl3
    clock = GenerationClock()
    ids = _encode(runtime, request, rendered)
    clock.tokenized()
    prompt_tokens = int(ids.shape[-1])
    # Honest limits (issue 16): the prompt and the whole max_tokens budget must fit the cache.
    limit, budget = runtime.options.exllama_cache_size, decoding.max_tokens
    if prompt_tokens + budget > limit:
        raise BackendError(400, "context_length_exceeded",
                           f"prompt has {prompt_tokens} tokens and max_tokens is {budget}: {prompt_tokens + budget} "
                           f"tokens; the model's context is {limit} tokens (exllama_cache_size)", param="messages")
    sampler = exl3.ComboSampler(rep_p=decoding.repetition_penalty, top_k=decoding.top_k, top_p=decoding.top_p,
                                temperature=decoding.temperature, min_p=0.0)
    key = runtime.next_id()
    job_kwargs: dict[str, Any] = {}
    if runtime.options.exllama_max_rq_tokens is not None:
        job_kwargs["max_rq_tokens"] = runtime.options.exllama_max_rq_tokens
    job = exl3.Job(input_ids=ids, max_new_tokens=decoding.max_tokens, sampler=sampler,
                   stop_conditions=_stop_conditions(runtime, rendered.stops), identifier=key, **job_kwargs)
    # exllamav3 holds stop strings too; the pipeline also covers the tail
    pipeline = TextPipeline(rendered.stops, rendered.reasoning_markers,
                            reasoning_open=_prompt_opens_reasoning(runtime, ids, rendered.reasoning_markers))
    results = runtime.submit(job, key)
    finished = False
    eos: Mapping[str, Any] | None = None
    try:
        for result in queue_items(results, request.cancel):
            if isinstance(result, BaseException):
                finished = True
                if isinstance(result, BackendError):
                    raise result
                raise BackendError(500, "backend_error", f"exllamav3 generator failed: {result}")
            if result.get("stage") == "error":
                finished = True
                raise BackendError(500, "backend_error", f"exllamav3 job failed: {result.get('error')}")
            if result.get("stage") != "streaming":
                continue
            clock.first_token()
            text = result.get("text") or ""
            if result.get("eos"):
                finished, eos = True, result
                if result.get("eos_reason") == "stop_token":
                    text += (result.get("held") or {}).get("text") or ""
            if text:
                yield from pipeline.push(text)
            if eos is not None or pipeline.stopped:
                break  # a stop string exllamav3 did not end the job on: cancel it below
    finally:
        if not finished:
            runtime.cancel(job, key)
    yield from pipeline.finish(cancelled=eos is None)
    if eos is None:
        yield Completion(finish_reason="stop" if pipeline.stopped else "cancelled",
                         metrics=clock.partial(prompt_tokens=prompt_tokens))
        return
    finish = "stop" if pipeline.stopped else _FINISH.get(str(eos.get("eos_reason")), "stop")
    yield Completion(finish_reason=finish, metrics=_metrics(clock, eos, prompt_tokens=prompt_tokens))
