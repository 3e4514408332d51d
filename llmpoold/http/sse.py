"""Server-sent events: one writer for every streaming surface.

Every event is written under a deadline (``service.stream_write_timeout_s``): a client
that stops reading lets the kernel buffers fill and would block the write, and with it
the replica slot, for as long as the socket lives. A write that does not finish in time
aborts the connection and raises :class:`StreamStalled`; the caller then lets go of the
inference (which cancels the generation and frees the slot).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from typing import Any

from aiohttp import web


class StreamStalled(Exception):
    """The client did not take an SSE event within the write timeout; the connection was
    aborted (nothing more can be sent on it)."""


async def open_sse(request: web.Request, *, headers: dict[str, str] | None = None) -> web.StreamResponse:
    """Start a ``text/event-stream`` response (headers are sent now)."""
    response = web.StreamResponse(status=200, headers={
        "Content-Type": "text/event-stream; charset=utf-8",
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",
        **(headers or {}),
    })
    await response.prepare(request)
    return response


def format_event(data: Any, *, event: str | None = None) -> bytes:
    """``event: <name>\\ndata: <json>\\n\\n`` (``data`` may be a preformatted str)."""
    # The seed's json.dumps defaults (", " and ": " separators, ASCII escapes).
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=True)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


async def send_event(request: web.Request, response: web.StreamResponse, data: Any, *, event: str | None = None,
                     timeout_s: float | None = None) -> None:
    """Write one event; within ``timeout_s`` (None: no deadline) or abort the connection
    and raise :class:`StreamStalled`."""
    await _within(request, response.write(format_event(data, event=event)), timeout_s)


async def end_sse(request: web.Request, response: web.StreamResponse, *, timeout_s: float | None = None) -> None:
    """Finish the response (its last chunk), under the same deadline as :func:`send_event`."""
    await _within(request, response.write_eof(), timeout_s)


async def _within(request: web.Request, write: Coroutine[Any, Any, None], timeout_s: float | None) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            await write
    except TimeoutError:
        transport = request.transport
        if transport is not None:
            transport.abort()  # drop what the kernel and the transport still buffer
        raise StreamStalled(f"client did not read the stream for {timeout_s:g} s") from None
