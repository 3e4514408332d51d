"""A fake OpenAI-compatible upstream for fault injection (aiohttp), named so.

Real behaviour is tested against llama-cpp-python's server; this fake only exists to
produce the failures a real server will not produce on demand: error statuses,
timeouts, garbage bodies, streams cut mid-way, stalls. Each ``POST /chat/completions``
takes the next behaviour from ``script`` (``"ok"`` once the script is empty) and is
recorded in ``calls``. The Files API (``POST /files``, ``GET /files/{id}/content``,
``DELETE /files/{id}``) keeps uploads in ``files``; its "extraction" is the file's text
prefixed with ``extracted:``; ``upload_status`` / ``delete_status`` make it fail.
Limits are probed with oversized answers (``big_json``, ``big_event``, ``endless_line``),
redirects (``redirect``: the target, ``POST /v1/elsewhere/chat/completions``, records
what reaches it in ``redirected``) and an upstream that ignores ``max_tokens`` (``flood``).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

WORDS = ("Hello", " from", " fake")
USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10,
         "prompt_tokens_details": {"cached_tokens": 3}}


@dataclass
class Call:
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class FakeUpstream:
    """Behaviours: ``"ok"``, ``"reasoning"`` (a reasoning chunk first), ``("status", code,
    body, headers)``, ``("sleep", seconds)`` before answering, ``"garbage"`` (200 with a
    body that is not JSON), ``"garbage_stream"``, ``"cut"`` (two deltas then the
    connection drops), ``("stall", seconds)`` after one delta, ``"slow"`` (one delta
    every 50 ms for 10 s), ``"error_chunk"`` (an error object mid-stream), ``("big_json",
    n, chunked)`` (a JSON completion whose content is ``n`` bytes, with or without
    Content-Length, even when a stream was asked for), ``("big_event", n)`` (one stream
    event with ``n`` bytes of content), ``("endless_line", n)`` (``n`` bytes of one
    event line that never ends, written in pieces, then the connection stays open), ``("redirect", status,
    location)`` (``location``: a path on the fake, or a full URL), ``("flood", n)`` (``n``
    content chunks, one a millisecond, whatever ``max_tokens`` says), ``"tool_call"`` (a
    call of the request's first tool or its ``tool_choice``, streamed in pieces)."""

    models: list[str] = field(default_factory=lambda: ["fake-model"])
    models_status: int = 200
    script: list[Any] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    active: int = 0
    max_active: int = 0
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    deleted: list[str] = field(default_factory=list)
    upload_status: int = 200
    delete_status: int = 200
    redirected: list[Call] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/files", self.upload)
        app.router.add_get("/v1/files/{id}/content", self.file_content)
        app.router.add_delete("/v1/files/{id}", self.delete_file)
        app.router.add_post("/v1/elsewhere/chat/completions", self.elsewhere)
        return app

    async def elsewhere(self, request: web.Request) -> web.Response:
        """A redirect's target: records the call (it must never be reached)."""
        self.redirected.append(Call(headers=dict(request.headers), body=await request.json()))
        return web.json_response(self.completion({"model": "elsewhere"}))

    async def upload(self, request: web.Request) -> web.Response:
        if self.upload_status != 200:
            return web.json_response({"error": {"message": "upload refused"}}, status=self.upload_status)
        form = await request.post()
        upload = form["file"]
        assert isinstance(upload, web.FileField)
        file_id = f"file-{len(self.files) + 1}"
        self.files[file_id] = {"purpose": form["purpose"], "filename": upload.filename,
                               "data": upload.file.read(), "auth": request.headers.get("Authorization")}
        return web.json_response({"id": file_id, "object": "file", "filename": upload.filename})

    async def file_content(self, request: web.Request) -> web.Response:
        file = self.files.get(request.match_info["id"])
        if file is None:
            return web.json_response({"error": {"message": "no such file"}}, status=404)
        return web.Response(text="extracted: " + file["data"].decode(), content_type="text/plain")

    async def delete_file(self, request: web.Request) -> web.Response:
        if self.delete_status != 200:
            return web.json_response({"error": {"message": "cannot delete"}}, status=self.delete_status)
        self.deleted.append(request.match_info["id"])
        return web.json_response({"id": request.match_info["id"], "deleted": True})

    async def list_models(self, request: web.Request) -> web.Response:
        if self.models_status != 200:
            return web.json_response({"error": {"message": "models unavailable"}}, status=self.models_status)
        return web.json_response({"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            return await self._chat(request)
        finally:
            self.active -= 1

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.calls.append(Call(headers=dict(request.headers), body=body))
        behaviour = self.script.pop(0) if self.script else "ok"
        kind = behaviour[0] if isinstance(behaviour, tuple) else behaviour
        if kind == "status":
            _, status, payload, headers = behaviour
            text = payload if isinstance(payload, str) else json.dumps(payload)
            return web.Response(status=status, text=text, content_type="application/json", headers=headers)
        if kind == "sleep":
            await asyncio.sleep(behaviour[1])
        if kind == "garbage":
            return web.Response(status=200, text="this is not json {", content_type="application/json")
        if kind == "redirect":
            _, status, location = behaviour
            target = location if "://" in location else str(request.url.with_path(location))
            return web.Response(status=status, headers={"Location": target})
        if kind == "big_json":
            _, size, chunked = behaviour
            payload = json.dumps(self.completion(body, content="x" * size)).encode()
            if not chunked:
                return web.Response(status=200, body=payload, content_type="application/json")
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            response.enable_chunked_encoding()
            await response.prepare(request)
            for start in range(0, len(payload), 65536):
                await response.write(payload[start:start + 65536])
            await response.write_eof()
            return response
        if not body.get("stream"):
            if kind == "tool_call":
                answer = self.completion(body, content=None)  # type: ignore[arg-type]
                answer["choices"][0]["message"]["tool_calls"] = [self.tool_call(body)]
                answer["choices"][0]["finish_reason"] = "tool_calls"
                return web.json_response(answer)
            return web.json_response(self.completion(body))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            await self.stream(request, response, kind, behaviour, body)
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnected.set()
            raise
        return response

    def completion(self, body: dict[str, Any], content: str = "".join(WORDS)) -> dict[str, Any]:
        return {"id": "chatcmpl-fake", "object": "chat.completion", "created": 1, "model": body["model"],
                "system_fingerprint": "fp_fake", "x_unknown": "dropped",
                "choices": [{"index": 0, "finish_reason": "stop", "logprobs": {"content": "secret"},
                             "message": {"role": "assistant", "content": content,
                                         "reasoning_content": "thinking hard"}}],
                "usage": USAGE}

    @staticmethod
    def tool_call(body: dict[str, Any]) -> dict[str, Any]:
        """A call of the request's first tool (or the one ``tool_choice`` names)."""
        choice = body.get("tool_choice")
        name = (choice["function"]["name"] if isinstance(choice, dict)
                else body["tools"][0]["function"]["name"])
        return {"id": "call_fake1", "type": "function",
                "function": {"name": name, "arguments": json.dumps({"city": "Paris", "days": 3})}}

    @staticmethod
    def chunk(model: str, delta: dict[str, Any], finish: str | None = None) -> bytes:
        data = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        return f"data: {json.dumps(data)}\n\n".encode()

    async def stream(self, request: web.Request, response: web.StreamResponse, kind: str, behaviour: Any,
                     body: dict[str, Any]) -> None:
        model = body["model"]
        await response.write(self.chunk(model, {"role": "assistant", "content": ""}))
        if kind == "reasoning":
            await response.write(self.chunk(model, {"reasoning_content": "thinking hard"}))
        if kind == "garbage_stream":
            await response.write(b"data: {not json\n\n")
            return
        if kind == "error_chunk":
            await response.write(self.chunk(model, {"content": "Hello"}))
            await response.write(b'data: {"error": {"message": "overloaded mid-way"}}\n\n')
            return
        if kind == "tool_call":  # the call in three pieces, as servers stream them
            call = self.tool_call(body)
            arguments = call["function"]["arguments"]
            await response.write(self.chunk(model, {"tool_calls": [
                {"index": 0, "id": call["id"], "type": "function",
                 "function": {"name": call["function"]["name"], "arguments": ""}}]}))
            for piece in (arguments[:8], arguments[8:]):
                await response.write(self.chunk(model, {"tool_calls": [
                    {"index": 0, "function": {"arguments": piece}}]}))
            await response.write(self.chunk(model, {}, finish="tool_calls"))
            await response.write(b"data: [DONE]\n\n")
            return
        if kind == "big_event":
            await response.write(self.chunk(model, {"content": "x" * behaviour[1]}))
            await response.write(b"data: [DONE]\n\n")
            return
        if kind == "endless_line":
            await response.write(b"data: ")
            for _ in range(0, behaviour[1], 65536):
                await response.write(b"x" * 65536)
                await asyncio.sleep(0.005)  # keeps writing: a client that left is noticed
            await asyncio.sleep(30)
            return
        if kind == "flood":
            for i in range(behaviour[1]):
                await response.write(self.chunk(model, {"content": f" t{i}"}))
                await asyncio.sleep(0.001)  # lets a client that stopped reading be noticed
            await response.write(self.chunk(model, {}, finish="stop"))
            await response.write(b"data: [DONE]\n\n")
            return
        if kind == "slow":
            for i in range(200):
                await response.write(self.chunk(model, {"content": f" w{i}"}))
                await asyncio.sleep(0.05)
            return
        for i, word in enumerate(WORDS):
            await response.write(self.chunk(model, {"content": word}))
            if kind == "cut" and i == 1:
                assert request.transport is not None
                request.transport.close()
                return
            if kind == "stall":
                await asyncio.sleep(behaviour[1])
        await response.write(self.chunk(model, {}, finish="stop"))
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": model,
                     "choices": [], "usage": USAGE}
            await response.write(f"data: {json.dumps(usage)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
