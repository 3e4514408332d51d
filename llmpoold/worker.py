"""The replica worker: one loaded runtime in a child process (``python -m llmpoold.worker``).

The daemon (:mod:`llmpoold.process_replica`) starts one worker per process-isolated
replica and talks to it over a connected Unix socket whose descriptor is passed as
``--fd``. The worker loads the plugin through the same entry points as the daemon and
calls the same hooks, so plugins do not know where they run.

Wire protocol
-------------
Every message, both ways, is one frame: a 4-byte big-endian length, then that many
bytes of UTF-8 JSON (an object). Daemon to worker (``id`` is chosen by the daemon and
names the operation or stream in every reply)::

    {"op": "load",     "id": n, "backend": b, "replica_id": r, "model": {...}}
    {"op": "estimate", "id": n, "backend": b, "model": {...}}
    {"op": "health",   "id": n}
    {"op": "stream",   "id": n, "request": GenerationRequest.to_wire()}
    {"op": "cancel",   "id": n}                  # n: the stream to cancel
    {"op": "unload",   "id": n}                  # the worker exits after replying

Worker to daemon::

    {"id": n, "t": "result", "value": ...}       # load / estimate / health / unload
    {"id": n, "t": "delta", ...}                 # stream items: item_to_wire() + id
    {"id": n, "t": "completion", ...}
    {"id": n, "t": "end"}                        # stream over; the runtime let go of it
    {"id": n, "t": "error", "kind": k, "type": name, "message": m, "status": s, "code": c,
     "headers": {...}, "extra": {...}}

``kind`` is ``api`` (a BackendError/ApiError, with status, code, the response headers
such as ``Retry-After`` and extra detail fields), ``load`` (a
LoadError) or ``exception`` (anything else; ``type`` is its class name). Streams are
multiplexed by id: several run at once when the runtime declares concurrency above 1,
each on its own thread. A cancelled stream still ends with ``end`` (or ``error``), once
the runtime has stopped, so the daemon knows the slot is free.

The worker exits when the socket reaches EOF (the daemon is gone) and asks the kernel to
kill it when its parent dies (``PR_SET_PDEATHSIG``), so it never outlives the daemon.
It ignores SIGINT (a terminal's Ctrl-C is the daemon's to handle). Its logs are JSON
lines on stderr, which the daemon reads and re-logs with the replica id bound; anything
a native library prints there is relayed too.

Extra plugin modules (``--plugin module.path``, repeatable) are imported and registered
besides the named entry points (``--entry-point name``); the daemon passes them for
plugins that are not installed entry points (the test backends).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import importlib
import importlib.metadata as md
import inspect
import json
import os
import signal
import socket
import struct
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict
from typing import Any

import structlog

from llmpoold.config import ModelConfig, resolve_model_options
from llmpoold.errors import ApiError, LoadError
from llmpoold.hookspecs import PROJECT
from llmpoold.plugins import PluginRegistry
from llmpoold.types import CancelToken, GenerationRequest, TextDelta, item_to_wire

HEADER = struct.Struct(">I")
MAX_FRAME = 64 * 2**20

log = structlog.get_logger("llmpoold.worker")


# ----- framing (shared with the daemon side) ------------------------------------------


def encode_frame(message: Mapping[str, Any]) -> bytes:
    payload = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return HEADER.pack(len(payload)) + payload


def decode_payload(payload: bytes) -> dict[str, Any]:
    message = json.loads(payload)
    if not isinstance(message, dict):
        raise ValueError("frame is not a JSON object")
    return message


def model_to_wire(model: ModelConfig) -> dict[str, Any]:
    """A ModelConfig as JSON: the common keys plus ``options`` dumped by its model."""
    data = model.model_dump(mode="json", exclude={"options"})
    options = model.options
    data["options"] = options.model_dump(mode="json") if hasattr(options, "model_dump") else None
    return data


def model_from_wire(data: Mapping[str, Any], registry: PluginRegistry, backend: str) -> ModelConfig:
    values = dict(data)
    options = values.pop("options", None)
    model = ModelConfig.model_validate(values)
    spec = registry.spec(backend)
    if options is not None:
        try:
            return model.model_copy(update={"options": spec.options_model.model_validate(options)})
        except Exception:  # noqa: BLE001 - fall back to the raw keys below
            pass
    return resolve_model_options(model, spec.options_model, backend=backend,
                                 requires_model_path=spec.requires_model_path)


def error_to_wire(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, ApiError):
        return {"t": "error", "kind": "api", "type": type(exc).__name__, "status": exc.status, "code": exc.code,
                "message": exc.message, "headers": dict(exc.headers), "extra": dict(exc.extra)}
    kind = "load" if isinstance(exc, LoadError) else "exception"
    return {"t": "error", "kind": kind, "type": type(exc).__name__, "message": str(exc)}


# ----- process hygiene ----------------------------------------------------------------

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int | None) -> None:
    """Ask Linux to SIGKILL this process when its parent exits; exit now if it already has."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the socket EOF still ends us
        pass
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


# ----- the worker ---------------------------------------------------------------------


class Worker:
    """Serves one replica over ``sock`` until unload or EOF."""

    def __init__(self, sock: socket.socket, registry: PluginRegistry) -> None:
        self.sock = sock
        self.registry = registry
        self.send_lock = threading.Lock()
        self.backend: str | None = None
        self.replica_id: str | None = None
        self.runtime: Any = None
        self.streams: dict[int, CancelToken] = {}
        self.streams_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- io

    def send(self, message: dict[str, Any]) -> None:
        frame = encode_frame(message)
        with self.send_lock:
            self.sock.sendall(frame)

    def _recv_exactly(self, n: int) -> bytes | None:
        chunks = []
        while n:
            chunk = self.sock.recv(min(n, 1 << 20))
            if not chunk:
                return None
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def serve(self) -> None:
        while True:
            header = self._recv_exactly(HEADER.size)
            if header is None:
                break
            (size,) = HEADER.unpack(header)
            if size > MAX_FRAME:
                log.error("worker_frame_too_large", size=size)
                break
            payload = self._recv_exactly(size)
            if payload is None:
                break
            self.dispatch(decode_payload(payload))
        # The daemon closed its end (or died): nobody is listening, leave at once.
        log.info("worker_parent_gone")
        os._exit(0)

    def dispatch(self, msg: dict[str, Any]) -> None:
        op, mid = msg.get("op"), int(msg.get("id", 0))
        if op == "cancel":
            with self.streams_lock:
                token = self.streams.get(mid)
            if token is not None:
                token.set()
            return
        if op == "health":
            self._reply(mid, self.health)
            return
        handler: Callable[[], Any]
        if op == "load":
            handler = lambda: self.load(msg)  # noqa: E731
        elif op == "estimate":
            handler = lambda: self.estimate(msg)  # noqa: E731
        elif op == "stream":
            self._start_stream(mid, msg["request"])
            return
        elif op == "unload":
            threading.Thread(target=self._unload_and_exit, args=(mid,), name="llmpool-worker-unload",
                             daemon=True).start()
            return
        else:
            self.send({"id": mid, **error_to_wire(ValueError(f"unknown op {op!r}"))})
            return
        threading.Thread(target=self._reply, args=(mid, handler), name=f"llmpool-worker-{op}", daemon=True).start()

    def _reply(self, mid: int, handler: Callable[[], Any]) -> None:
        try:
            value = handler()
        except BaseException as exc:  # noqa: BLE001 - reported to the daemon
            self.send({"id": mid, **error_to_wire(exc)})
            return
        self.send({"id": mid, "t": "result", "value": value})

    # -- operations

    def load(self, msg: dict[str, Any]) -> dict[str, Any]:
        backend = self.registry.canonical(msg["backend"])
        if backend is None:
            raise LoadError(f"no plugin in the worker provides backend '{msg['backend']}' "
                            f"(installed: {self.registry.describe_installed()})")
        self.backend, self.replica_id = backend, msg["replica_id"]
        structlog.contextvars.bind_contextvars(replica=self.replica_id)
        model = model_from_wire(msg["model"], self.registry, backend)
        runtime = self.registry.hook.llmpool_load(backend=backend, replica_id=self.replica_id, model=model)
        if runtime is None:
            raise LoadError(f"no installed plugin loaded backend '{backend}'")
        self.runtime = runtime
        log.info("worker_loaded", backend=backend, pid=os.getpid())
        return self.health()

    def estimate(self, msg: dict[str, Any]) -> dict[str, Any] | None:
        backend = self.registry.canonical(msg["backend"])
        if backend is None:
            return None
        model = model_from_wire(msg["model"], self.registry, backend)
        estimate = self.registry.hook.llmpool_estimate_memory(backend=backend, model=model)
        return None if estimate is None else {**asdict(estimate), "details": dict(estimate.details)}

    def health(self) -> dict[str, Any]:
        from llmpoold.replica import process_rss_mib

        with self.streams_lock:
            active = len(self.streams)
        return {"pid": os.getpid(), "rss_mib": process_rss_mib(), "loaded": self.runtime is not None,
                "active_streams": active}

    def unload(self) -> bool:
        with self.streams_lock:
            tokens = list(self.streams.values())
        for token in tokens:
            token.set()
        runtime, self.runtime = self.runtime, None
        if runtime is not None:
            self.registry.hook.llmpool_unload(backend=self.backend, runtime=runtime)
        log.info("worker_unloaded")
        return True

    def _unload_and_exit(self, mid: int) -> None:
        try:
            self._reply(mid, self.unload)
        finally:
            # Leave without waiting for threads a runtime may have left behind; the OS
            # takes the memory back.
            sys.stderr.flush()
            os._exit(0)

    # -- streams

    def _start_stream(self, mid: int, wire: dict[str, Any]) -> None:
        request = GenerationRequest.from_wire(wire)
        with self.streams_lock:
            self.streams[mid] = request.cancel
        threading.Thread(target=self._run_stream, args=(mid, request), name=f"llmpool-stream-{mid}",
                         daemon=True).start()

    def _run_stream(self, mid: int, request: GenerationRequest) -> None:
        structlog.contextvars.bind_contextvars(replica=self.replica_id, request_id=request.request_id)
        iterator: Any = None
        try:
            if self.runtime is None:
                raise ApiError(503, "replica_not_loaded", f"replica '{self.replica_id}' has no loaded runtime")
            iterator = self._items(request)
            for item in iterator:
                if request.cancel.is_set():
                    break
                self.send({"id": mid, **item_to_wire(item)})
                if request.cancel.is_set():
                    break
        except BaseException as exc:  # noqa: BLE001 - reported to the daemon
            self._close(iterator)
            iterator = None
            self._finish(mid, {"id": mid, **error_to_wire(exc)})
            return
        self._close(iterator)
        self._finish(mid, {"id": mid, "t": "end"})

    def _finish(self, mid: int, message: dict[str, Any]) -> None:
        with self.streams_lock:
            self.streams.pop(mid, None)
        try:
            self.send(message)
        except OSError:
            pass

    @staticmethod
    def _close(iterator: Any) -> None:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()

    def _items(self, request: GenerationRequest) -> Iterator[Any]:
        """The plugin's stream as a blocking iterator (sync, async, or generate)."""
        result = self.registry.hook.llmpool_stream(backend=self.backend, runtime=self.runtime, request=request)
        if result is None:
            generated = self.registry.hook.llmpool_generate(backend=self.backend, runtime=self.runtime,
                                                            request=request)
            if generated is None:
                raise LoadError(f"backend '{self.backend}' implements neither llmpool_stream nor llmpool_generate")
            if inspect.isawaitable(generated):
                generated = asyncio.run_coroutine_threadsafe(_awaited(generated), self._async_loop()).result()
            text, reasoning, completion = generated
            return iter([*([TextDelta(reasoning, channel="reasoning")] if reasoning else []), TextDelta(text),
                         completion])
        if hasattr(result, "__aiter__"):
            return self._drive_async(result, request)
        return iter(result)

    def _async_loop(self) -> asyncio.AbstractEventLoop:
        """One event loop thread for plugins that return async iterators or awaitables."""
        with self.streams_lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="llmpool-worker-loop", daemon=True).start()
                self._loop = loop
            return self._loop

    def _drive_async(self, result: Any, request: GenerationRequest) -> Iterator[Any]:
        loop = self._async_loop()
        agen = result.__aiter__()
        try:
            while True:
                try:
                    yield asyncio.run_coroutine_threadsafe(agen.__anext__(), loop).result()
                except StopAsyncIteration:
                    return
        finally:
            request.cancel.set()
            aclose = getattr(agen, "aclose", None)
            if aclose is not None:
                asyncio.run_coroutine_threadsafe(aclose(), loop).result()


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


# ----- entry --------------------------------------------------------------------------


def build_registry(entry_points: list[str], modules: list[str]) -> PluginRegistry:
    registry = PluginRegistry()
    if entry_points:
        for ep in md.entry_points(group=PROJECT):
            if ep.name in entry_points:
                dist = getattr(ep, "dist", None)
                try:
                    plugin = ep.load()
                except Exception as exc:  # noqa: BLE001 - reported at load
                    log.error("plugin_import_failed", plugin=ep.name, error=f"{type(exc).__name__}: {exc}")
                    continue
                registry.register(plugin, name=ep.name, distribution=dist.metadata["Name"] if dist else None,
                                  version=dist.version if dist else None)
    for path in modules:
        try:
            registry.register(importlib.import_module(path), name=path)
        except Exception as exc:  # noqa: BLE001
            log.error("plugin_import_failed", plugin=path, error=f"{type(exc).__name__}: {exc}")
    return registry


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m llmpoold.worker",
                                     description="llmpool replica worker (started by llmpoold, not by hand)")
    parser.add_argument("--fd", type=int, required=True, help="connected Unix socket to the daemon")
    parser.add_argument("--entry-point", action="append", default=[], help="llmpool entry point to load")
    parser.add_argument("--plugin", action="append", default=[], help="extra plugin module (import path)")
    parser.add_argument("--parent-pid", type=int, help="exit at once if the parent is not this pid")
    parser.add_argument("--log-level", default="info")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    die_with_parent(args.parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from llmpoold.logs import configure_logging

    configure_logging(args.log_level, json_lines=True)
    sock = socket.socket(fileno=args.fd)
    registry = build_registry(args.entry_point, args.plugin)
    Worker(sock, registry).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
