"""One inference from admission to the last token, shared by every HTTP surface.

:class:`Inference` is used in two steps so that refusals stay HTTP errors:
``await start()`` runs admission and waits in the model's queue for a replica
(raising :class:`ApiError`), then ``events()`` yields :class:`TextDelta` items as the
runtime produces them; afterwards ``result`` holds the final text and metrics.
Leaving ``events()`` early (client gone) cancels the generation and frees the slot;
wrap it in ``contextlib.aclosing`` so that happens at once, not at garbage collection.
:meth:`Inference.close` releases whatever is still held on any exit path.

Each request's outcome is recorded once, as the ``llmpool_requests_total`` metric and
the ``inference`` log line together (:meth:`Inference.record`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import structlog

from llmpoold.config import DecodingDefaults
from llmpoold.entries import ModelEntry, ModelState
from llmpoold.errors import QUOTE_CHARS, ApiError, WorkerError, clip, describe, internal_error, model_state_error
from llmpoold.pool import Pool
from llmpoold.request_checks import check_request
from llmpoold.scheduler import ABORT_GRACE_S, Job, Lease
from llmpoold.schemas import ResponseRequest, response_format_json
from llmpoold.tenants import Admission, Tenant
from llmpoold.types import (
    DEFAULT_INSTRUCTIONS,
    Completion,
    Decoding,
    GenerationRequest,
    Message,
    TextDelta,
    TokenLogprob,
    ToolCallDelta,
)

log = structlog.get_logger("llmpoold.http")

METRIC_FIELDS = (
    "engine_queue_wait_ms", "backend_inference_wall_ms", "engine_total_wall_ms", "engine_outside_backend_wall_ms",
    "pool_total_wall_ms", "engine_tokenize_ms", "gpu_time_to_first_token_ms", "gpu_generate_total_ms",
    "gpu_decode_after_first_token_ms", "engine_prompt_tokens", "engine_cached_prompt_tokens",
    "engine_output_tokens", "engine_finish_reason", "engine_tokens_per_second",
)


def record_refused_body(data: Any, code: str) -> None:
    """The ``inference`` line of a request whose body was refused (422) before an
    :class:`Inference` existed (no metric: the model name is not trusted yet)."""
    model = data.get("model") if isinstance(data, dict) else None
    if model is not None and not (isinstance(model, str) and len(model) <= QUOTE_CHARS):
        model = clip(model)
    log.info("inference", model=model, status=422, error=code)


def _ms(start: float, end: float) -> float:
    return round((end - start) * 1000, 3)


@dataclass
class InferenceResult:
    output_text: str
    reasoning_text: str | None
    finish_reason: str | None
    metrics: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # OpenAI's shape, whole
    # the output tokens' log probabilities, in order (requests that asked for them)
    logprobs: list[TokenLogprob] = field(default_factory=list)


def merge_tool_call(calls: dict[int, dict[str, Any]], delta: ToolCallDelta) -> None:
    """Add one tool call piece to ``calls`` (index -> OpenAI's tool call object)."""
    call = calls.setdefault(delta.index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
    call["id"] = call["id"] or delta.id or f"call_{uuid.uuid4().hex[:24]}"
    call["function"]["name"] += delta.name or ""
    call["function"]["arguments"] += delta.arguments


class _Trim:
    """Strip a stream as the seed strips final text: drop leading whitespace and hold
    trailing whitespace back until more text follows, so deltas join to the result."""

    def __init__(self, *, strip: bool = True) -> None:
        self.strip = strip
        self.started = False
        self.pending = ""

    def feed(self, text: str) -> str:
        if not self.strip:
            return text
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        text = self.pending + text
        body = text.rstrip()
        self.pending = text[len(body):]
        return body


def resolve_decoding(defaults: DecodingDefaults, body: ResponseRequest) -> Decoding:
    """The request's decoding fields where set, else the engine defaults."""
    values = {**defaults.model_dump(), **body.decoding.model_dump(exclude_none=True)}
    values["stop"] = tuple(s for s in (body.decoding.stop or defaults.stop) if s)
    return Decoding(**values)


def _content(value: Any) -> str | tuple[dict[str, Any], ...]:
    if isinstance(value, str):
        return value
    return tuple(item.model_dump(mode="json") for item in value)


class Inference:
    """Admission, queueing and streaming of one ``ResponseRequest``."""

    def __init__(self, pool: Pool, body: ResponseRequest, *, request_id: str | None = None,
                 started_at: float | None = None, tenant: Tenant | None = None) -> None:
        """``tenant``: the named API key that sent the request (its rules apply), if any."""
        self.pool = pool
        self.body = body
        self.request_id = request_id or uuid.uuid4().hex
        self.response_id = f"resp_{uuid.uuid4().hex}"
        self.started_at = started_at or time.perf_counter()
        self.entry: ModelEntry | None = None
        self.lease: Lease | None = None
        self.request: GenerationRequest | None = None
        self.result: InferenceResult | None = None
        self._counted = False
        self._outcome: str | None = None
        self.admission = Admission(tenant, pool, body)  # the API key's rules (llmpoold.tenants)
        self._aborted: ApiError | None = None
        self.load_wait_ms = 0.0  # waiting for an on-demand load (in engine_queue_wait_ms too)
        self._task: asyncio.Task[Any] | None = None

    # ----- admission -----------------------------------------------------------------

    def _admit(self) -> ModelEntry:
        body = self.body
        entry = self.pool.entry(body.model)
        if entry.state != ModelState.LOADED or entry.scheduler is None:
            raise model_state_error(body.model, entry.state)
        name = body.model
        if entry.spec is not None and entry.spec.remote and not body.allow_remote:
            raise ApiError(403, "remote_execution_disallowed", "remote execution is not allowed for this request",
                           model=name)
        check_request(body, self.pool.traits(entry).capabilities, name, prompt_format=entry.current.prompt_format,
                      default_max_tokens=self.pool.settings.engine.decoding.max_tokens)
        return entry

    def _generation_request(self, entry: ModelEntry, replica_id: str) -> GenerationRequest:
        body = self.body
        agent = body.agent
        if agent is not None and agent.messages is not None:
            messages = agent.messages
        elif body.messages is not None:
            messages = tuple(Message(role=m.role, content=_content(m.content)) for m in body.messages)
        else:
            messages = (Message(role="user", content=_content(body.input)),)
        if body.reasoning_effort is not None:
            thinking: bool | None = body.reasoning_effort != "none"
        elif body.thinking != "default":
            thinking = body.thinking == "enabled"
        else:
            thinking = entry.current.enable_thinking
        return GenerationRequest(
            request_id=self.request_id, model=entry.name, replica_id=replica_id,
            prompt_format="raw" if agent is not None and agent.raw_prompt else entry.current.prompt_format,
            instructions=body.instructions if body.instructions is not None else DEFAULT_INSTRUCTIONS,
            messages=messages, decoding=resolve_decoding(self.pool.settings.engine.decoding, body),
            multi_turn=body.messages is not None, thinking=thinking, thinking_mode=body.thinking,
            reasoning_effort=body.reasoning_effort, source_lang_code=body.source_lang_code,
            target_lang_code=body.target_lang_code, prompt_cache_key=body.prompt_cache_key,
            response_format=response_format_json(body.effective_response_format),
            thinking_token_budget=body.thinking_token_budget,
            tools=agent.tools if agent is not None else (),
            tool_choice=agent.tool_choice if agent is not None else None,
            parallel_tool_calls=agent.parallel_tool_calls if agent is not None else None,
            logprobs=agent.logprobs if agent is not None else None,
        )

    async def start(self) -> None:
        """Admit the request (loading an on-demand model first) and wait for a replica
        slot. Raises ApiError."""
        configured = self.pool.entries.get(self.body.model)
        timeout = self.body.queue_timeout_s or (configured.current.queue_timeout_s if configured else None)
        try:
            await self.admission.enter()  # the key's models, limits and places, before the model's own checks
            waited = await self.pool.lifecycle.ensure_loaded(self.body.model, timeout)
            entry = self._admit()
        except ApiError as exc:
            self.record("rejected", exc)
            raise
        except BaseException:  # client gone while waiting for its key's place or its model's load (which goes on)
            self.record("cancelled")
            raise
        self.load_wait_ms = round(waited * 1000, 3)
        if timeout is not None:
            timeout = max(0.001, timeout - waited)
        self.entry = entry
        assert entry.scheduler is not None
        entry.inflight_requests += 1
        self._counted = True
        try:
            adm = self.admission
            job = Job(model=entry.name, fairness_key=adm.fairness_key, fairness_group=adm.fairness_group,
                      fairness_weight=adm.fairness_weight)
            self.lease = await entry.scheduler.acquire(job, timeout_s=timeout)
        except ApiError as exc:
            self._finish()
            self.record("rejected", exc)
            raise
        except BaseException:  # client gone while queued: the scheduler dropped the job
            self._finish()
            self.record("cancelled")
            raise
        self.pool.metrics.queue_wait.labels(entry.name).observe(self.lease.queue_wait_ms / 1000)
        self.request = self._generation_request(entry, self.lease.replica.replica_id)
        self._task = asyncio.current_task()
        self.lease.on_abort = self._abort

    def _abort(self, error: ApiError) -> None:
        """The model is being unloaded and its drain time is over: stop with ``error``."""
        if self._aborted is not None:
            return
        self._aborted = error
        if self.request is not None:
            self.request.cancel.set()
        asyncio.get_running_loop().call_later(ABORT_GRACE_S, self._cut)

    def _cut(self) -> None:
        if self.lease is not None and not self.lease.released and self._task is not None:
            self._task.cancel()

    def record(self, outcome: str, error: ApiError | None = None) -> None:
        """Record the request's outcome once: the metric (under a configured model name
        only, so labels stay bounded) and the ``inference`` log line. ``outcome`` is
        ``ok``, ``error`` (failed while running), ``rejected`` (never ran) or
        ``cancelled`` (the client left: status 499). The API key's place is freed and
        its usage charged here too (:meth:`Admission.finish`)."""
        if self._outcome is not None:
            return
        self._outcome = outcome
        self.admission.finish(outcome, metrics=self.result.metrics if self.result else None, lease=self.lease)
        if self.body.model in self.pool.entries:
            self.pool.metrics.outcome(self.body.model, outcome,
                                      reason=error.code if outcome == "rejected" and error else None)
        status, code = ((error.status, error.code) if error is not None
                        else (499, "client_disconnected") if outcome == "cancelled" else (200, None))
        log.info("inference", model=self.body.model, key_name=self.admission.key_name,
                 fairness_key=self.admission.fairness_key or "anonymous",
                 stream=self.body.stream, status=status, error=code,
                 metrics=self.result.metrics if self.result else None)

    def _finish(self) -> None:
        if self._counted and self.entry is not None:
            self.entry.inflight_requests -= 1
            self._counted = False
            self.pool.lifecycle.touch(self.entry)  # the idle clock counts from the end of a request

    # ----- generation ----------------------------------------------------------------

    async def events(self) -> AsyncGenerator[TextDelta | ToolCallDelta, None]:
        """Yield output and reasoning deltas (and tool call pieces); set ``result`` when
        the runtime is done."""
        assert self.entry is not None and self.lease is not None and self.request is not None
        lease, request = self.lease, self.request
        backend_start = time.perf_counter()
        completion: Completion | None = None
        texts: dict[str, list[str]] = {"output": [], "reasoning": []}
        calls: dict[int, dict[str, Any]] = {}
        raw = self.body.agent is not None and self.body.agent.raw_prompt  # a continuation keeps its spaces
        trims = {"output": _Trim(strip=not raw), "reasoning": _Trim(strip=not raw)}
        # Output tokens' logprobs whose text was trimmed away so far ride on the next output
        # delta (or on one of no text at the end): every token of the answer is reported.
        # Reasoning tokens' are dropped: OpenAI's shapes have no place for them.
        held: tuple[TokenLogprob, ...] = ()
        logprobs: list[TokenLogprob] = []
        stream = lease.replica.stream(request, whole=not self.body.stream)
        metrics = self.pool.metrics
        first_text = True
        failure: ApiError | None = None
        try:
            async for item in stream:
                if self._aborted is not None:
                    break
                if isinstance(item, Completion):
                    completion = item
                    continue
                if isinstance(item, ToolCallDelta):
                    merge_tool_call(calls, item)
                    yield item
                    continue
                text = trims[item.channel].feed(item.text)
                carried: tuple[TokenLogprob, ...] = ()
                if item.channel == "output":
                    held += item.logprobs
                    if text:
                        carried, held = held, ()
                        logprobs += carried
                if text:
                    if first_text:
                        first_text = False
                        metrics.ttft.labels(self.entry.name).observe(time.perf_counter() - self.started_at)
                    texts[item.channel].append(text)
                    yield TextDelta(text, channel=item.channel, logprobs=carried)
            if held and completion is not None and self._aborted is None:
                logprobs += held
                yield TextDelta("", logprobs=held)
            if self._aborted is not None:
                raise self._aborted
            if completion is None:
                raise ApiError(502, "backend_protocol_error",
                               f"backend '{self.entry.backend}' ended the stream without a completion",
                               model=self.entry.name)
        except BaseException as exc:
            failure = self.backend_failure(exc)
            if failure is None:
                raise
            raise failure from None
        finally:
            if completion is None:
                request.cancel.set()
            await stream.aclose()
            backend_end = self._settle(backend_start, failure, done=completion is not None)
        assert completion is not None
        metrics.latency.labels(self.entry.name).observe(backend_end - self.started_at)
        if completion.metrics.output_tokens:
            metrics.output_tokens.labels(self.entry.name).inc(completion.metrics.output_tokens)
        self.result = self._result(completion, "".join(texts["output"]), "".join(texts["reasoning"]) or None,
                                   backend_start, backend_end)
        self.result.tool_calls = [calls[i] for i in sorted(calls)]
        self.result.logprobs = logprobs
        self.record("ok")

    def _settle(self, backend_start: float, failure: ApiError | None, *, done: bool) -> float:
        """The replica's part is over: release the lease, charged for the replica time
        used (cancelled or failed work included), count the request out, and record a
        failure or (not ``done``) a cancel; a done request's caller records ``ok``.
        Returns the time the replica's part ended."""
        assert self.entry is not None and self.entry.scheduler is not None and self.lease is not None
        backend_end = time.perf_counter()
        self.entry.scheduler.release(self.lease, service_ms=(backend_end - backend_start) * 1000)
        self._finish()
        if failure is not None:
            self.record("error", failure)
        elif not done:
            self.record("cancelled")
        return backend_end

    def backend_failure(self, exc: BaseException) -> ApiError | None:
        """What an exception from the replica means for the client, or None where it is
        to propagate as it is (the client left): a plugin's ApiError under the model's
        name; the unload's abort (our own cut of the task, undone here); any other plugin
        failure as 500 ``backend_error`` with the request id (the log has the exception)."""
        assert self.entry is not None
        if isinstance(exc, ApiError):
            return exc.with_model(self.entry.name)
        if isinstance(exc, asyncio.CancelledError):
            if self._aborted is None:
                return None
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()  # our own cut, not the client leaving: answer with the reason
            return self._aborted
        if not isinstance(exc, Exception):
            return None
        log.error("backend_error", model=self.entry.name, backend=self.entry.backend, error=describe(exc),
                  exc_info=not isinstance(exc, WorkerError))  # a worker's traceback is in the worker's log
        return internal_error(self.request_id, code="backend_error", model=self.entry.name)

    def _result(self, completion: Completion, output: str, reasoning: str | None, backend_start: float,
                backend_end: float) -> InferenceResult:
        assert self.lease is not None
        now = time.perf_counter()
        backend_ms = _ms(backend_start, backend_end)
        engine_ms = max(_ms(self.started_at, now), backend_ms)
        m = completion.metrics
        metrics = {
            "engine_queue_wait_ms": round(self.lease.queue_wait_ms + self.load_wait_ms, 3),
            "backend_inference_wall_ms": backend_ms,
            "engine_total_wall_ms": engine_ms,
            "engine_outside_backend_wall_ms": round(max(0.0, engine_ms - backend_ms), 3),
            "pool_total_wall_ms": engine_ms,
            "engine_tokenize_ms": m.tokenize_ms,
            "gpu_time_to_first_token_ms": m.time_to_first_token_ms,
            "gpu_generate_total_ms": m.generate_total_ms,
            "gpu_decode_after_first_token_ms": m.decode_after_first_token_ms,
            "engine_prompt_tokens": m.prompt_tokens,
            "engine_cached_prompt_tokens": m.cached_prompt_tokens,
            "engine_output_tokens": m.output_tokens,
            "engine_finish_reason": completion.finish_reason,
            "engine_tokens_per_second": m.tokens_per_second,
        }
        if self.load_wait_ms:  # only for a request that waited for an on-demand load
            metrics["engine_model_load_wait_ms"] = self.load_wait_ms
        return InferenceResult(output_text=output, reasoning_text=reasoning, finish_reason=completion.finish_reason,
                               metrics=metrics, metadata=dict(completion.metadata))

    async def collect(self) -> InferenceResult:
        """Run a started request to the end (non-streaming)."""
        async with aclosing(self.events()) as events:
            async for _ in events:
                pass
        assert self.result is not None
        return self.result

    def close(self) -> None:
        """Release whatever the request still holds; safe on every exit path and a no-op
        once ``events()`` has finished (the handler left before or while streaming)."""
        if self.lease is not None and not self.lease.released and self.entry and self.entry.scheduler:
            self.entry.scheduler.release(self.lease, service_ms=0.0, charge=False)
        self._finish()
        self.record("cancelled")
