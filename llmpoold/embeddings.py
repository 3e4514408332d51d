"""One embeddings request from admission to its vectors, on the path generation takes.

:class:`Embedding` is an :class:`~llmpoold.inference.Inference` whose work is one
``Replica.embed`` call instead of a token stream: the same API-key admission, on-demand
load, the model's fair queue and scheduler lease (held while the runtime embeds; a
client that leaves frees it only once the runtime has let go), metrics, usage and the
``inference`` log line. Only a model whose capabilities declare ``embeddings`` is
admitted (400 ``embeddings_unsupported``, ``param`` ``model``); an embedding model in
turn refuses generation (400 ``embeddings_only``, :mod:`llmpoold.request_checks`).
"""

from __future__ import annotations

import time

from llmpoold.entries import ModelEntry, ModelState
from llmpoold.errors import ApiError, model_state_error
from llmpoold.inference import Inference
from llmpoold.pool import Pool
from llmpoold.schemas import ResponseRequest
from llmpoold.tenants import Tenant
from llmpoold.types import Completion, EmbeddingRequest, EmbeddingResult


class Embedding(Inference):
    """Admission, queueing and the vectors of one embeddings request.

    ``body`` carries what admission reads (``model``, ``fairness_key``,
    ``queue_timeout_s``, ``allow_remote``); ``inputs`` are the texts to embed."""

    def __init__(self, pool: Pool, body: ResponseRequest, inputs: tuple[str, ...], *, request_id: str | None = None,
                 started_at: float | None = None, tenant: Tenant | None = None) -> None:
        super().__init__(pool, body, request_id=request_id, started_at=started_at, tenant=tenant)
        self.inputs = inputs

    def _admit(self) -> ModelEntry:
        name = self.body.model
        entry = self.pool.entry(name)
        if entry.state != ModelState.LOADED or entry.scheduler is None:
            raise model_state_error(name, entry.state)
        if not self.pool.traits(entry).capabilities.embeddings:
            raise ApiError(400, "embeddings_unsupported", f"model '{name}' does not serve embeddings "
                           "(a GGUF model configured with gguf_embedding: true does)", model=name, param="model")
        return entry

    async def embed(self) -> EmbeddingResult:
        """The vectors, once :meth:`start` has a lease; sets ``result`` (metrics).
        Raises ApiError; the lease is released and the outcome recorded on every path."""
        assert self.entry is not None and self.lease is not None and self.request is not None
        entry, lease = self.entry, self.lease
        # The generation request start() built is not run; its cancel token is the one
        # an unload's abort sets, so the runtime hears of it too.
        job = EmbeddingRequest(request_id=self.request_id, model=entry.name, replica_id=lease.replica.replica_id,
                               inputs=self.inputs, cancel=self.request.cancel)
        backend_start = time.perf_counter()
        result: EmbeddingResult | None = None
        failure: ApiError | None = None
        try:
            result = await lease.replica.embed(job)
            if self._aborted is not None:
                raise self._aborted
        except BaseException as exc:
            failure = self.backend_failure(exc)
            if failure is None:
                raise
            raise failure from None
        finally:
            backend_end = self._settle(backend_start, failure, done=result is not None)
        self.pool.metrics.latency.labels(entry.name).observe(backend_end - self.started_at)
        self.result = self._result(Completion(finish_reason="stop", metrics=result.metrics), "", None,
                                   backend_start, backend_end)
        self.record("ok")
        return result
