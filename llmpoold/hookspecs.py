"""The plugin contract: every hook a backend plugin can implement.

A backend plugin is a module registered under the ``llmpool`` entry-point group; the
entry-point name is the backend name used in config. It implements these hooks with
``@llmpoold.hookimpl``. A minimal plugin::

    from llmpoold import hookimpl
    from llmpoold.hookspecs import BackendSpec
    from llmpoold.types import Completion, TextDelta

    @hookimpl
    def llmpool_backends():
        return [BackendSpec(name="echo")]

    @hookimpl
    def llmpool_load(backend, replica_id, model):
        if backend != "echo":
            return None
        return object()                       # the runtime handle

    @hookimpl
    def llmpool_stream(backend, runtime, request):
        if backend != "echo":
            return None
        def tokens():
            yield TextDelta(request.messages[-1].content)
            yield Completion(finish_reason="stop")
        return tokens()

Rules that hold for every hook below:

- Hooks that take ``backend`` are ``firstresult``: the plugin that owns ``backend``
  (its canonical name, never an alias) answers; every other plugin returns None.
- Never write ``async def`` hook implementations; pluggy would take the coroutine as a
  result. A hook may *return* an awaitable or an async iterator where it says so.
- Blocking hooks run on a thread the daemon provides (or in the replica's worker
  process), never on the event loop. Import the runtime library inside those hooks,
  not at module import time, so the plugin imports on a machine without it.
- Raise :class:`llmpoold.errors.LoadError` from ``llmpool_load`` and
  :class:`llmpoold.errors.BackendError` while generating for failures with a known
  meaning; any other exception is reported with its message and no traceback.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pluggy
from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from llmpoold.config import ModelConfig
    from llmpoold.types import (
        Completion,
        EmbeddingRequest,
        EmbeddingResult,
        GenerationRequest,
        MemoryEstimate,
        ModelTraits,
        StreamItem,
    )

PROJECT = "llmpool"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class NoOptions(BaseModel):
    """Options model for a backend without model keys of its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class BackendSpec:
    """Static facts about one backend, known without loading anything.

    :param name: canonical backend name (== the entry-point name).
    :param aliases: other names config may use for it (``llama_cpp`` for ``gguf``).
    :param options_model: pydantic model of the backend's own per-model keys
        (``gguf_n_ctx``, ``remote_base_url``...). Unknown keys must be rejected
        (``extra="forbid"``) so a typo in config is an error, not a silent default.
    :param load_override_keys: keys ``POST /v1/admin/models/{name}/load`` may set
        for this backend (besides ``replicas``); each is also an options key.
    :param load_override_model: pydantic model typing those keys with the API's schema
        bounds (all fields optional); the daemon validates an admin override with it
        once, a violation is a 422. Range rules with their own message belong in
        ``llmpool_check_load_override`` (a 400).
    :param load_constraints: the seed's ``load_constraints`` shapes, shown by admin.
    :param load_recommendations: the seed's ``load_recommendations`` shapes.
    :param remote: True for a backend that sends requests off the host; requests need
        ``allow_remote: true`` and the model runs inline (no worker process).
    :param requires_model_path: False for backends with nothing on disk (remote).
    """

    name: str
    aliases: tuple[str, ...] = ()
    description: str = ""
    options_model: type[BaseModel] = NoOptions
    load_override_keys: frozenset[str] = frozenset()
    load_override_model: type[BaseModel] | None = None
    load_constraints: Mapping[str, Any] = field(default_factory=dict)
    load_recommendations: Mapping[str, Any] = field(default_factory=dict)
    remote: bool = False
    requires_model_path: bool = True


@hookspec
def llmpool_backends() -> list[BackendSpec]:
    """Declare the backends this plugin provides.

    Called once when the plugin is registered, on the event loop thread; must be cheap
    and must not import the runtime library.
    """
    raise NotImplementedError


@hookspec(firstresult=True)
def llmpool_model_traits(backend: str, model: ModelConfig) -> ModelTraits | None:
    """Describe a configured model: capabilities and per-replica concurrency.

    Called without loading anything (config load, admin listing, admission).
    ``concurrency`` is the number of requests one replica can run at the same time;
    the scheduler never sends a replica more. A plugin that does not implement this
    gets text-only, single-turn capabilities and concurrency 1.

    :param model: the validated model config; ``model.options`` is an instance of the
        backend's ``options_model`` with any load override applied.
    """
    raise NotImplementedError


@hookspec(firstresult=True)
def llmpool_check_load_override(backend: str, override: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """Validate and normalize an admin load override for this backend.

    ``override`` holds only keys from ``BackendSpec.load_override_keys`` that the admin
    request set explicitly (values may be None). Return the normalized mapping, or raise
    ``ValueError`` with the message the admin should see (it becomes a 400
    ``invalid_load_request``). A plugin without this hook accepts the values as sent.
    """
    raise NotImplementedError


@hookspec(firstresult=True)
def llmpool_estimate_memory(backend: str, model: ModelConfig) -> MemoryEstimate | None:
    """Estimate the memory one replica of ``model`` will need, without loading it.

    Blocking (may read file headers); runs on a worker thread. Return None when no
    estimate can be made.
    """
    raise NotImplementedError


@hookspec(firstresult=True)
def llmpool_load(backend: str, replica_id: str, model: ModelConfig) -> Any | None:
    """Load one replica and return its runtime handle (any object).

    Blocking; runs on a worker thread or inside the replica's worker process. The
    handle is passed back unchanged to ``llmpool_stream``, ``llmpool_generate`` and
    ``llmpool_unload``. Raise ``LoadError`` with an actionable message (missing file,
    wrong format, runtime not installed, CUDA required...).
    """
    raise NotImplementedError


@hookspec(firstresult=True)
def llmpool_stream(
    backend: str, runtime: Any, request: GenerationRequest
) -> Iterator[StreamItem] | AsyncIterator[StreamItem] | None:
    """Generate for one request, yielding :class:`TextDelta` items as the runtime
    produces them, then exactly one :class:`Completion`. A backend that declares
    ``Capabilities.tools`` also yields :class:`ToolCallDelta` items for the calls it makes;
    one that declares ``response_formats`` beyond ``text`` must enforce
    ``request.response_format`` (admission refuses it elsewhere); one that declares
    ``Capabilities.logprobs`` attaches a :class:`TokenLogprob` per generated token to its
    deltas when ``request.logprobs`` is set (:class:`llmpoold.logprobs.LogprobText`).

    Return either a blocking iterator (the daemon drives it on its own thread, one
    ``next()`` per item) or an async iterator (driven on the event loop; it must never
    block). The call itself must return at once; work starts on the first ``next``.

    Cancellation: the daemon sets ``request.cancel`` and stops pulling; a blocking
    iterator is then closed (``GeneratorExit`` at its ``yield``), an async one
    ``aclose()``-d. Free per-request resources in ``finally``. A runtime that batches
    must also watch ``request.cancel`` to drop the request from its batch.
    Up to ``ModelTraits.concurrency`` streams run on one runtime at the same time.
    """
    raise NotImplementedError


@hookspec(firstresult=True)
def llmpool_generate(
    backend: str, runtime: Any, request: GenerationRequest
) -> tuple[str, str | None, Completion] | Awaitable[tuple[str, str | None, Completion]] | None:
    """Optional non-streaming path: return ``(output_text, reasoning_text, completion)``
    or an awaitable of it. Only worth implementing when the runtime has a cheaper
    non-streaming call (a remote API); otherwise return None and the daemon collects
    ``llmpool_stream``. Same threading and cancellation rules as ``llmpool_stream``.
    """
    raise NotImplementedError


@hookspec(firstresult=True)
def llmpool_embed(backend: str, runtime: Any, request: EmbeddingRequest) -> EmbeddingResult | None:
    """Embed ``request.inputs``: one vector per input, in order, each of the model's
    dimension and L2-normalised (unit length, as OpenAI returns them), with
    ``metrics.prompt_tokens`` counting every input's tokens.

    Only for a model whose traits declare ``Capabilities.embeddings`` (admission refuses
    the others with 400 ``embeddings_unsupported``; a plugin that returns None is
    answered the same). Blocking, like ``llmpool_load``: it runs on a thread the daemon
    provides or in the replica's worker process, and holds the runtime until it returns
    (the scheduler counts it as one of the replica's ``concurrency`` requests). Evaluate
    the inputs in as few runtime calls as the runtime allows. An input the model cannot
    take whole is a ``BackendError`` 400 ``context_length_exceeded`` naming its tokens and
    the limit (never truncated). ``request.cancel`` may be checked between runtime calls.
    """
    raise NotImplementedError


@hookspec(firstresult=True)
def llmpool_unload(backend: str, runtime: Any) -> bool | None:
    """Release everything the runtime holds (model weights, caches, sessions, threads).

    Blocking; runs on a worker thread or in the worker process after every stream on
    the runtime has ended. Return True. Exceptions are logged, never raised to clients.
    """
    raise NotImplementedError


__all__ = [
    "PROJECT",
    "BackendSpec",
    "NoOptions",
    "hookimpl",
    "hookspec",
]
