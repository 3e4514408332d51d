"""FAKE ``exllamav3`` for CPU tests: the classes and calls llmpool_exl3 uses, with the
signatures of exllamav3 1.6.5, recording every call. No model, no CUDA.

Mirrors (file:definition in exllamav3):
- ``model/config.py`` ``Config.from_directory(directory, **kwargs)``
- ``model/model.py`` ``Model.from_config(config, component="text", **kwargs)``,
  ``Model.load(*args, **kwargs)`` → ``load_gen(device=None, ..., use_per_device=None,
  tensor_p=False, progressbar=False, ..., tp_backend="native", ...)``, ``Model.unload()``
- ``cache/cache.py`` ``Cache(model, max_num_tokens, layer_type=None, max_batch_size=16,
  max_history=0, recurrent_dtype=..., **kwargs)`` (kwargs go to the layer type),
  ``detach_from_model(model=None)``; ``cache/quant.py`` ``CacheLayer_quant(..., k_bits, v_bits)``
  asserts 2..8 bits; ``max_num_tokens`` must be a multiple of 256
- ``tokenizer/tokenizer.py`` ``Tokenizer.from_config(config)``, ``encode(text, add_bos=False,
  add_eos=False, encode_special_tokens=False, ...)`` → LongTensor (1, n), ``decode(ids,
  decode_special_tokens=False)``, ``hf_render_chat_template(messages,
  add_generation_prompt=True, **template_kwargs)`` → the template's text, ``single_id(token)``,
  ``eos_token_id``
- ``Tokenizer.tokenizer``: the ``tokenizers.Tokenizer`` exllamav3 wraps, faked by
  :class:`FakeHfTokenizer` with the parts llmpool_exl3 uses (``encode(sequence,
  add_special_tokens=True)`` → an encoding with ``ids``, the ``encode_special_tokens``
  switch, ``to_str``/``from_str``) over the same vocabulary
- ``generator/generator.py`` ``Generator(model, cache, tokenizer, max_batch_size=256,
  max_chunk_size=2048, ..., max_q_size=8, ...)``, ``enqueue(job)``, ``cancel(job)``,
  ``iterate()`` → result dicts (stages "started", "prefill", "streaming"; eos results carry
  ``eos_reason``, ``full_completion``, ``new_tokens``, ``prompt_tokens``, ``time_enqueued``,
  ``time_prefill``, ``time_generate``, ``cached_tokens``), ``num_remaining_jobs()``,
  ``clear_queue()``, ``close()``
- ``generator/job.py`` ``Job(input_ids, max_new_tokens=None, min_new_tokens=0, max_skips=4,
  sampler=None, seed=None, stop_conditions=None, ..., identifier=None, ..., max_rq_tokens=None,
  ...)``: stop strings are held back while they may still match and never emitted
- ``generator/sampler/presets.py`` ``ComboSampler(rep_p=1.0, ..., temperature=1.0, min_p=0.0,
  top_k=0, top_p=1.0, ...)``

The "model" answers every prompt with ``RESPONDER(prompt_text)``: a string (split into
word pieces) or an explicit list of pieces; it then emits the EOS token. Tests replace
``RESPONDER``, set ``STEP_DELAY`` to slow iterate() down, ``FAIL_ITERATE`` to make
iterate() raise, or ``FAIL_JOB`` (an identifier) to reap one job with an error result.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

PAGE_SIZE = 256
SPECIAL = ["<bos>", "<eos>", "<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>"]
DEFAULT_RESPONSE = ("One, two, three, four, five. " + " ".join(f"word{i}" for i in range(200)))

CALLS: list[tuple[str, dict[str, Any]]] = []
RESPONDER: Callable[[str], str | list[str]] = lambda prompt: DEFAULT_RESPONSE  # noqa: E731
STEP_DELAY = 0.0
FAIL_ITERATE: BaseException | None = None
FAIL_JOB: object | None = None
ITERATIONS: list[list[object]] = []  # per iterate(): identifiers that got a token
_lock = threading.Lock()


def reset() -> None:
    global RESPONDER, STEP_DELAY, FAIL_ITERATE, FAIL_JOB
    CALLS.clear()
    ITERATIONS.clear()
    RESPONDER = lambda prompt: DEFAULT_RESPONSE  # noqa: E731
    STEP_DELAY = 0.0
    FAIL_ITERATE = None
    FAIL_JOB = None


def record(name: str, **kwargs: Any) -> None:
    with _lock:
        CALLS.append((name, kwargs))


def calls(name: str) -> list[dict[str, Any]]:
    return [kwargs for call, kwargs in CALLS if call == name]


class Config:
    def __init__(self, directory: str, **kwargs: Any) -> None:
        import json
        import os

        with open(os.path.join(directory, "config.json"), encoding="utf8") as f:
            config_dict = json.load(f)
        assert "architectures" in config_dict, "No architecture defined in config.json"
        self.directory = directory
        self.architecture = config_dict["architectures"][0]
        self.bos_token_id = config_dict.get("bos_token_id")
        self.eos_token_id = config_dict.get("eos_token_id", 1)
        self.eos_token_id_list = [self.eos_token_id]

    @staticmethod
    def from_directory(directory: str, **kwargs: Any) -> Config:
        record("Config.from_directory", directory=directory, **kwargs)
        return Config(directory, **kwargs)


class Model:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.loaded = False
        self.cache_weakrefs: dict[int, Any] = {}

    @staticmethod
    def from_config(config: Config, component: str = "text", **kwargs: Any) -> Model:
        record("Model.from_config", config=config, component=component, **kwargs)
        return Model(config)

    def load(self, device: Any = None, tp_output_device: Any = None, reserve_per_device: Any = None,
             use_per_device: Any = None, tensor_p: bool = False, progressbar: bool = False,
             max_chunk_size: int = 2048, max_output_size: int = 32, max_output_factor: int = 1,
             callback: Any = None, generator: bool = True, tp_dev_limits: Any = None, tp_backend: str = "native",
             verbose: bool = False, max_batch_size: int = 1, tp_options: Any = None,
             autosplit_no_forward: bool = False, draft_model: Any = None) -> None:
        record("Model.load", device=device, use_per_device=use_per_device, tensor_p=tensor_p,
               tp_backend=tp_backend, progressbar=progressbar, reserve_per_device=reserve_per_device,
               max_chunk_size=max_chunk_size)
        if device is not None:
            assert not reserve_per_device and not use_per_device, \
                "Cannot specify reserve_per_device or use_per_device when loading to single device."
            assert not tensor_p, "Cannot use tensor_p when loading to single device."
        self.loaded = True
        for ref in self.cache_weakrefs.values():
            ref.initialized = True

    def unload(self) -> None:
        record("Model.unload")
        self.loaded = False


class CacheLayer_fp16:  # noqa: N801 - exllamav3's name
    def __init__(self, config: Any, attention: Any, cache_id: int, max_num_tokens: int) -> None:
        assert max_num_tokens % PAGE_SIZE == 0, f"max_num_tokens must be a multiple of {PAGE_SIZE}."


class CacheLayer_quant:  # noqa: N801 - exllamav3's name
    def __init__(self, config: Any, attention: Any, cache_id: int, max_num_tokens: int, k_bits: int,
                 v_bits: int, compand_a: float = 0.0) -> None:
        assert max_num_tokens % PAGE_SIZE == 0, f"max_num_tokens must be a multiple of {PAGE_SIZE}."
        assert (2 <= k_bits <= 8) and (2 <= v_bits <= 8), "quantized cache must be from 2 to 8 bits"
        self.k_bits, self.v_bits = k_bits, v_bits


class Cache:
    def __init__(self, model: Model, max_num_tokens: int, layer_type: type | None = None, max_batch_size: int = 16,
                 max_history: int = 0, recurrent_dtype: torch.dtype = torch.half, **kwargs: Any) -> None:
        record("Cache", model=model, max_num_tokens=max_num_tokens, layer_type=layer_type, **kwargs)
        assert not model.loaded, "Construct the Cache BEFORE calling model.load()"
        self.model = model
        self.max_num_tokens = max_num_tokens
        self.layer_type = layer_type or CacheLayer_fp16
        self.layer = self.layer_type(model.config, None, id(self), max_num_tokens, **kwargs)
        self.initialized = False
        model.cache_weakrefs[id(self)] = self

    def detach_from_model(self, model: Model | None = None) -> None:
        record("Cache.detach_from_model", model=model)
        del (model or self.model).cache_weakrefs[id(self)]


class FakeHfTokenizer:
    """FAKE ``tokenizers.Tokenizer`` over a :class:`Tokenizer`'s vocabulary. As in
    tokenizers, special tokens written in the text are matched unless
    ``encode_special_tokens`` is set; ``add_special_tokens`` would add the
    post-processor's tokens (none here)."""

    _saved: dict[str, Tokenizer] = {}

    def __init__(self, owner: Tokenizer) -> None:
        self.owner = owner
        self.encode_special_tokens = False

    def encode(self, sequence: str, pair: Any = None, is_pretokenized: bool = False,
               add_special_tokens: bool = True) -> Any:
        record("HfTokenizer.encode", sequence=sequence, add_special_tokens=add_special_tokens,
               encode_special_tokens=self.encode_special_tokens)
        pieces = Tokenizer.split(sequence, not self.encode_special_tokens)
        return type("Encoding", (), {"ids": [self.owner.piece_id(p) for p in pieces]})()

    def to_str(self, pretty: bool = False) -> str:
        key = f"fake-tokenizer-{id(self.owner)}"
        FakeHfTokenizer._saved[key] = self.owner
        return key

    @staticmethod
    def from_str(json: str) -> FakeHfTokenizer:
        return FakeHfTokenizer(FakeHfTokenizer._saved[json])


class Tokenizer:
    """Word-piece tokenizer over a vocabulary that grows as it sees text."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.pieces: list[str] = list(SPECIAL)
        self.ids: dict[str, int] = {p: i for i, p in enumerate(self.pieces)}
        self.bos_token_id = self.ids["<bos>"]
        self.eos_token_id = config.eos_token_id
        self.hf_calls: list[dict[str, Any]] = []
        self.tokenizer = FakeHfTokenizer(self)

    @staticmethod
    def from_config(config: Config) -> Tokenizer:
        record("Tokenizer.from_config", config=config)
        return Tokenizer(config)

    def piece_id(self, piece: str) -> int:
        if piece not in self.ids:
            self.ids[piece] = len(self.pieces)
            self.pieces.append(piece)
        return self.ids[piece]

    @staticmethod
    def split(text: str, special: bool) -> list[str]:
        pattern = "|".join(re.escape(s) for s in SPECIAL) if special else None
        parts = re.split(f"({pattern})", text) if pattern else [text]
        out: list[str] = []
        for part in parts:
            if not part:
                continue
            if special and part in SPECIAL:
                out.append(part)
            else:
                for piece in re.findall(r"\s*\S+|\s+", part):
                    # a special token's spelling in text is several ordinary pieces
                    out += list(piece) if any(s in piece for s in SPECIAL) else [piece]
        return out

    def encode(self, text: str | list[str], add_bos: bool = False, add_eos: bool = False,
               encode_special_tokens: bool = False, return_offsets: bool = False, embeddings: Any = None) -> Any:
        record("Tokenizer.encode", text=text, add_bos=add_bos, encode_special_tokens=encode_special_tokens)
        assert isinstance(text, str)
        ids = [self.piece_id(p) for p in self.split(text, encode_special_tokens)]
        if add_bos:
            ids.insert(0, self.bos_token_id)
        return torch.tensor([ids], dtype=torch.long)

    def decode(self, ids: Any, decode_special_tokens: bool = False) -> str | list[str]:
        rows = ids.tolist() if hasattr(ids, "tolist") else ids
        texts = ["".join(self.pieces[i] for i in row if decode_special_tokens or self.pieces[i] not in SPECIAL)
                 for row in rows]
        return texts

    def hf_render_chat_template(self, messages: list, add_generation_prompt: bool = True,
                                **template_kwargs: Any) -> str:
        record("Tokenizer.hf_render_chat_template", messages=messages, add_generation_prompt=add_generation_prompt,
               **template_kwargs)
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        if add_generation_prompt:
            text += "<|im_start|>assistant\n"
            if template_kwargs.get("enable_thinking") is False:
                text += "<think>\n\n</think>\n\n"
        return text

    def single_id(self, token: str) -> int | None:
        return self.ids.get(token) if token in SPECIAL else None


class ComboSampler:
    def __init__(self, rep_p: float = 1.0, freq_p: float = 0.0, pres_p: float = 0.0,
                 rep_sustain_range: int = int(10e7), rep_decay_range: int = 0, dry_multiplier: float = 0.0,
                 dry_base: float = 1.75, dry_allowed_length: int = 2, dry_range: int = 0,
                 dry_sequence_breakers: Any = None, temperature: float = 1.0, min_p: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, temp_last: bool = False, adaptive_target: float = 1.0,
                 adaptive_decay: float = 0.9, logit_bias: Any = None) -> None:
        self.kwargs = {"rep_p": rep_p, "temperature": temperature, "min_p": min_p, "top_k": top_k, "top_p": top_p}
        record("ComboSampler", **self.kwargs)


class Job:
    def __init__(self, input_ids: Any, max_new_tokens: int | None = None, min_new_tokens: int = 0,
                 max_skips: int | None = 4, sampler: Any = None, seed: int | None = None,
                 stop_conditions: list | tuple | set | None = None, decode_special_tokens: bool = False,
                 return_top_tokens: int = 0, return_logits: bool = False, return_probs: bool = False,
                 filters: Any = None, token_healing: bool = False, identifier: object | None = None,
                 banned_strings: Any = None, embeddings: Any = None, max_rq_tokens: int | None = None,
                 stop_on_loop: Any = None, rq_state: dict | None = None, **kwargs: Any) -> None:
        assert input_ids.device.type == "cpu", "input_ids must reside in system memory"
        assert input_ids.shape[0] == 1 and input_ids.shape[-1] > 0
        assert max_new_tokens is None or max_new_tokens >= 1, "max_new_tokens must be >= 1, or None for no limit"
        record("Job", input_ids=input_ids, max_new_tokens=max_new_tokens, sampler=sampler,
               stop_conditions=stop_conditions, identifier=identifier, max_rq_tokens=max_rq_tokens, **kwargs)
        self.input_ids = input_ids
        self.max_new_tokens = max_new_tokens
        self.sampler = sampler
        self.identifier = identifier
        self.max_rq_tokens = max_rq_tokens
        self.stop_tokens: set[int] = set()
        self.stop_strings: set[str] = set()
        for t in stop_conditions or []:
            if isinstance(t, int):
                self.stop_tokens.add(t)
            elif isinstance(t, str):
                self.stop_strings.add(t)
            else:
                raise ValueError("Unsupported type in stop_conditions")
        self.serial_number: int | None = None
        self.pieces: list[str] = []
        self.new_tokens = 0
        self.held_text = ""
        self.full_completion = ""
        self.time_enqueue = self.time_first_token = 0.0


class Generator:
    def __init__(self, model: Model, cache: Cache, tokenizer: Tokenizer, max_batch_size: int = 256,
                 max_chunk_size: int = 2048, shared_chunk_size: int | None = None, prefill_cooldown: int | None = 4,
                 max_q_size: int = 8, draft_model: Any = None, draft_cache: Any = None, **kwargs: Any) -> None:
        record("Generator", model=model, cache=cache, tokenizer=tokenizer, max_batch_size=max_batch_size,
               max_chunk_size=max_chunk_size, max_q_size=max_q_size, **kwargs)
        self.model, self.cache, self.tokenizer = model, cache, tokenizer
        self.max_batch_size = max_batch_size
        self.max_total_tokens = cache.max_num_tokens
        self.pending_jobs: list[Job] = []
        self.active_jobs: list[Job] = []
        self.job_serial = 0
        self.closed = False

    def num_remaining_jobs(self) -> int:
        return len(self.pending_jobs) + len(self.active_jobs)

    def num_active_jobs(self) -> int:
        return len(self.active_jobs)

    def num_pending_jobs(self) -> int:
        return len(self.pending_jobs)

    def enqueue(self, job: Job) -> int:
        record("Generator.enqueue", identifier=job.identifier)
        pages = -(-(job.input_ids.shape[-1] + 1) // PAGE_SIZE)
        max_pages = self.max_total_tokens // PAGE_SIZE
        assert pages <= max_pages, (f"Job requires {pages} pages (only {max_pages} available) and cannot be "
                                    f"enqueued. Total cache allocated is {max_pages} * {PAGE_SIZE} = "
                                    f"{self.max_total_tokens} tokens")
        room = self.max_total_tokens - job.input_ids.shape[-1] - 1
        job.max_new_tokens = room if job.max_new_tokens is None else min(job.max_new_tokens, room)
        job.serial_number = self.job_serial
        job.time_enqueue = time.time()
        self.job_serial += 1
        self.pending_jobs.append(job)
        return job.serial_number

    def cancel(self, job: Job) -> None:
        record("Generator.cancel", identifier=job.identifier)
        if job in self.pending_jobs:
            self.pending_jobs.remove(job)
        elif job in self.active_jobs:
            self.active_jobs.remove(job)

    def clear_queue(self) -> None:
        record("Generator.clear_queue")
        self.active_jobs.clear()
        self.pending_jobs.clear()

    def close(self) -> None:
        record("Generator.close")
        self.closed = True

    def _result(self, job: Job, stage: str, **extra: Any) -> dict[str, Any]:
        r = {"job": job, "stage": stage, "serial": job.serial_number, "eos": False, **extra}
        if job.identifier is not None:
            r["identifier"] = job.identifier
        return r

    def iterate(self) -> list[dict[str, Any]]:
        assert self.cache.initialized, "Cache tensors were never allocated."
        if STEP_DELAY:
            time.sleep(STEP_DELAY)
        if FAIL_ITERATE is not None:
            raise FAIL_ITERATE
        results: list[dict[str, Any]] = []
        while self.pending_jobs and len(self.active_jobs) < self.max_batch_size:
            job = self.pending_jobs.pop(0)
            prompt = self.tokenizer.decode(job.input_ids, decode_special_tokens=True)[0]
            answer = RESPONDER(prompt)
            job.pieces = list(answer) if isinstance(answer, list) else Tokenizer.split(answer, True)
            self.active_jobs.append(job)
            results.append(self._result(job, "started"))
            results.append(self._result(job, "prefill", curr_progress=job.input_ids.shape[-1],
                                        max_progress=job.input_ids.shape[-1]))
        stepped: list[object] = []
        for job in list(self.active_jobs):
            if FAIL_JOB is not None and job.identifier == FAIL_JOB:
                self.active_jobs.remove(job)
                results.append(self._result(job, "error", eos=True, error=RuntimeError("fake job failure")))
                continue
            stepped.append(job.identifier)
            results.append(self._step(job))
        ITERATIONS.append(stepped)
        return results

    def _step(self, job: Job) -> dict[str, Any]:
        if job.new_tokens == 0:
            job.time_first_token = time.time()
        piece = job.pieces[job.new_tokens] if job.new_tokens < len(job.pieces) else "<eos>"
        token = self.tokenizer.piece_id(piece if piece != "<eos>" else "<eos>")
        if piece == "<eos>":
            token = self.tokenizer.eos_token_id
        job.new_tokens += 1
        if token in job.stop_tokens:
            return self._eos(job, "stop_token", emit_held=False, eos_triggering_token_id=token)
        job.held_text += "" if piece in SPECIAL else piece
        for stop in job.stop_strings:
            index = job.held_text.find(stop)
            if index != -1:
                job.held_text = job.held_text[:index]
                return self._eos(job, "stop_string", emit_held=True, eos_triggering_string=stop)
        if job.new_tokens >= job.max_new_tokens:
            return self._eos(job, "max_new_tokens", emit_held=True)
        if any(job.held_text.endswith(stop[:n]) for stop in job.stop_strings for n in range(1, len(stop))):
            return self._result(job, "streaming")  # hold: may be the start of a stop string
        text, job.held_text = job.held_text, ""
        job.full_completion += text
        return self._result(job, "streaming", text=text, token_ids=torch.tensor([[token]]))

    def _eos(self, job: Job, reason: str, *, emit_held: bool, **extra: Any) -> dict[str, Any]:
        self.active_jobs.remove(job)
        r = self._result(job, "streaming", eos=True, eos_reason=reason, **extra)
        if emit_held and job.held_text:
            r["text"] = job.held_text
            job.full_completion += job.held_text
            job.held_text = ""
        elif job.held_text:
            r["held"] = {"text": job.held_text}
        now = time.time()
        r.update(full_completion=job.full_completion, new_tokens=job.new_tokens,
                 prompt_tokens=job.input_ids.shape[-1], time_enqueued=0.001,
                 time_prefill=max(job.time_first_token - job.time_enqueue, 0.0),
                 time_generate=max(now - job.time_first_token, 1e-6), cached_pages=0, cached_tokens=0)
        return r
