"""Server-sent events: one writer for every streaming surface."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web


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


async def send_event(response: web.StreamResponse, data: Any, *, event: str | None = None) -> None:
    await response.write(format_event(data, event=event))
