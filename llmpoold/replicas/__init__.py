"""Replicas: one loaded runtime each, behind one async interface.

``inline`` runs the plugin inside the daemon; ``process`` runs it in a worker process
(``worker``, speaking ``wire``) supervised by ``supervise``; ``factory`` chooses per
model. The scheduler and the pool see only the :class:`Replica` protocol.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from typing import Any, Protocol

from llmpoold.types import EmbeddingRequest, EmbeddingResult, GenerationRequest, StreamItem

Listener = Callable[["Replica", str], None]


class Replica(Protocol):
    """One loaded runtime of a model.

    ``stream`` yields TextDelta items then one Completion; closing the iterator early
    (``aclose()``, task cancellation) cancels the generation in the runtime. ``whole``
    marks a non-streaming request (see :meth:`llmpoold.backend.Backend.open`).
    ``embed`` returns one vector per input (``llmpool_embed``); when its caller is
    cancelled it sets ``request.cancel`` and returns only once the runtime has let go.

    ``accepting``: the scheduler routes no new work to a replica that is not accepting
    (a crashed worker being restarted). ``add_listener(callback)`` lets the pool hear
    ``crashed`` / ``restarted`` / ``gave_up`` (``callback(replica, event)``);
    ``gave_up`` is True once the replica will not be restarted again; ``last_error``
    says why it failed.
    """

    replica_id: str
    concurrency: int
    isolation: str  # "inline" or "process"
    gave_up: bool
    last_error: str | None

    @property
    def accepting(self) -> bool: ...

    def add_listener(self, listener: Listener) -> None: ...

    async def load(self) -> None: ...

    def stream(self, request: GenerationRequest, *, whole: bool = False) -> AsyncGenerator[StreamItem, None]: ...

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult: ...

    async def unload(self) -> None: ...

    def info(self) -> dict[str, Any]: ...
