"""Streams and workers that cannot wedge a slot (issue 18): a stalled SSE reader, frames
that cannot be encoded, malformed worker frames, the worker environment, retries of a
replica that gave up.

The echo test backend is a fake runtime (named so); ``echo_repeat`` makes it produce
many large deltas, the fault a reader that stops reading needs.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

import pytest

from llmpoold.http.keys import POOL

pytestmark = pytest.mark.timeout(60)


def raw_stream_request(port: int, body: dict[str, Any]) -> socket.socket:
    """Send a streaming request on a plain socket with a tiny receive buffer and return
    the socket unread: a client that stops reading (its kernel buffers then fill)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    return sock


async def test_a_reader_that_stops_reading_is_cut_and_its_slot_freed(make_client: Any) -> None:
    client = await make_client({"service": {"stream_write_timeout_s": 1}, "engine": {"backend": "echo", "models": {
        "m": {"echo_repeat": 4096}}}})
    entry = client.app[POOL].entry("m")
    # 4096 deltas of 8 KiB: far more than the socket buffers on both sides hold.
    sock = raw_stream_request(client.server.port, {"model": "m", "stream": True, "decoding": {"max_tokens": 4096},
                                                   "input": "x" * 8192})
    try:
        deadline = time.monotonic() + 10
        while entry.inflight_requests == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert entry.inflight_requests == 1
        started = time.monotonic()
        # Concurrency 1: this request can only run once the stalled one let go of the slot.
        resp = await asyncio.wait_for(client.post("/v1/responses", json={"model": "m", "input": "again",
                                                                         "decoding": {"max_tokens": 1}}), 15)
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["output_text"] == "again"
        assert time.monotonic() - started < 10
        assert entry.inflight_requests == 0 and entry.scheduler is not None
        assert entry.scheduler.runtime_inflight == 0
    finally:
        sock.close()
