"""The replica worker: one loaded runtime in a child process (``python -m llmpoold.replicas.worker``).

The daemon (:mod:`llmpoold.replicas.process`) starts one worker per process-isolated
replica and talks to it over a connected Unix socket whose descriptor is passed as
``--fd``, in the frames of :mod:`llmpoold.replicas.wire`. The worker loads the plugin
through the same entry points as the daemon and calls it through the same
:class:`~llmpoold.backend.Backend`, so plugins do not know where they run. Streams run
on one event loop thread of the worker (a blocking iterator on a thread of its own,
as inline), several at once when the runtime declares concurrency above 1.

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
import concurrent.futures
import ctypes
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

import structlog

from llmpoold.backend import Backend
from llmpoold.errors import ApiError, LoadError
from llmpoold.gpu import process_rss_mib
from llmpoold.plugins import PluginRegistry
from llmpoold.replicas.wire import (
    HEADER,
    FrameError,
    decode_payload,
    embed_request_from_wire,
    embedding_to_wire,
    encode_frame,
    error_to_wire,
    frame_size,
    item_to_wire,
    model_from_wire,
    request_from_wire,
)
from llmpoold.types import CancelToken, EmbeddingRequest, GenerationRequest

log = structlog.get_logger("llmpoold.worker")

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


class Worker:
    """Serves one replica over ``sock`` until unload or EOF."""

    def __init__(self, sock: socket.socket, registry: PluginRegistry) -> None:
        self.sock = sock
        self.registry = registry
        self.send_lock = threading.Lock()
        self.backend: Backend | None = None
        self.replica_id: str | None = None
        self.runtime: Any = None
        self.streams: dict[int, tuple[CancelToken, concurrent.futures.Future[None]]] = {}
        self.streams_lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="llmpool-worker-loop", daemon=True).start()

    # -- io

    def send(self, message: dict[str, Any]) -> None:
        """Send one message; FrameError (nothing sent) when it cannot be a frame."""
        frame = encode_frame(message)
        with self.send_lock:
            self.sock.sendall(frame)

    def send_or_error(self, mid: int, message: dict[str, Any]) -> None:
        """Send ``message``, or when it cannot be a frame an error for ``mid`` in its
        place, so the daemon always hears an answer."""
        try:
            self.send(message)
        except FrameError as exc:
            self.send({"id": mid, **error_to_wire(ApiError(502, "backend_protocol_error",
                                                           f"the worker's answer cannot be sent: {exc}"))})

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
            try:
                size = frame_size(header)
            except ValueError as exc:
                log.error("worker_frame_too_large", error=str(exc))
                break
            payload = self._recv_exactly(size)
            if payload is None:
                break
            try:
                self.dispatch(decode_payload(payload))
            except (KeyError, TypeError, ValueError) as exc:  # the daemon is not speaking the protocol
                log.error("worker_protocol_error", error=f"{type(exc).__name__}: {exc}")
                os._exit(3)
        # The daemon closed its end (or died): nobody is listening, leave at once.
        log.info("worker_parent_gone")
        os._exit(0)

    def dispatch(self, msg: dict[str, Any]) -> None:
        op, mid = msg.get("op"), int(msg.get("id", 0))
        if op == "cancel":
            with self.streams_lock:
                token, future = self.streams.get(mid, (None, None))
            if token is not None and future is not None:
                token.set()
                future.cancel()  # thread-safe: cancels the stream's task on the loop
            return
        if op == "health":
            self._reply(mid, self.health)
        elif op == "load":
            threading.Thread(target=self._reply, args=(mid, lambda: self.load(msg)), name="llmpool-worker-load",
                             daemon=True).start()
        elif op == "stream":
            self._start_stream(mid, request_from_wire(msg["request"]), whole=bool(msg.get("whole")))
        elif op == "embed":
            self._start_embed(mid, embed_request_from_wire(msg["request"]))
        elif op == "unload":
            threading.Thread(target=self._unload_and_exit, args=(mid,), name="llmpool-worker-unload",
                             daemon=True).start()
        else:
            self.send({"id": mid, **error_to_wire(ValueError(f"unknown op {op!r}"))})

    def _reply(self, mid: int, handler: Callable[[], Any]) -> None:
        try:
            value = handler()
        except BaseException as exc:  # noqa: BLE001 - reported to the daemon
            self.send_or_error(mid, {"id": mid, **error_to_wire(exc)})
            return
        self.send_or_error(mid, {"id": mid, "t": "result", "value": value})

    # -- operations

    def load(self, msg: dict[str, Any]) -> dict[str, Any]:
        name = self.registry.canonical(msg["backend"])
        if name is None:
            raise LoadError(f"no plugin in the worker provides backend '{msg['backend']}' "
                            f"(installed: {self.registry.describe_installed()})")
        self.replica_id = msg["replica_id"]
        structlog.contextvars.bind_contextvars(replica=self.replica_id)
        backend = Backend(self.registry, name)
        self.runtime = backend.load(msg["replica_id"], model_from_wire(msg["model"], self.registry, name))
        self.backend = backend
        log.info("worker_loaded", backend=name, pid=os.getpid())
        return self.health()

    def health(self) -> dict[str, Any]:
        with self.streams_lock:
            active = len(self.streams)
        return {"pid": os.getpid(), "rss_mib": process_rss_mib(), "loaded": self.runtime is not None,
                "active_streams": active}

    def unload(self) -> bool:
        with self.streams_lock:
            streams = list(self.streams.values())
        for token, _future in streams:
            token.set()
        runtime, self.runtime = self.runtime, None
        if runtime is not None and self.backend is not None:
            self.backend.unload(runtime)
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

    def _start_stream(self, mid: int, request: GenerationRequest, *, whole: bool) -> None:
        with self.streams_lock:
            future = asyncio.run_coroutine_threadsafe(self._run_stream(mid, request, whole), self.loop)
            self.streams[mid] = (request.cancel, future)

    async def _run_stream(self, mid: int, request: GenerationRequest, whole: bool) -> None:
        structlog.contextvars.bind_contextvars(replica=self.replica_id, request_id=request.request_id)
        end: dict[str, Any] = {"id": mid, "t": "end"}
        try:
            if self.runtime is None or self.backend is None:
                raise ApiError(503, "replica_not_loaded", f"replica '{self.replica_id}' has no loaded runtime")
            source = self.backend.open(self.runtime, request, whole=whole)
            try:
                async for item in source:
                    self.send({"id": mid, **item_to_wire(item)})
            finally:
                await asyncio.shield(source.aclose())  # the runtime lets go before "end" is sent
        except asyncio.CancelledError:
            pass  # cancelled by the daemon: the stream still ends with "end"
        except FrameError as exc:  # an item the runtime produced cannot be sent (not UTF-8)
            end = {"id": mid, **error_to_wire(ApiError(502, "backend_protocol_error",
                                                       f"the backend's output cannot be sent: {exc}"))}
        except BaseException as exc:  # noqa: BLE001 - reported to the daemon
            end = {"id": mid, **error_to_wire(exc)}
        with self.streams_lock:
            self.streams.pop(mid, None)
        try:
            self.send_or_error(mid, end)
        except OSError:
            pass


    # -- embeddings

    def _start_embed(self, mid: int, request: EmbeddingRequest) -> None:
        """Embed on a thread of its own (a blocking hook); a ``cancel`` sets the token."""
        with self.streams_lock:
            self.streams[mid] = (request.cancel, concurrent.futures.Future())
        threading.Thread(target=self._embed, args=(mid, request), name="llmpool-worker-embed", daemon=True).start()

    def _embed(self, mid: int, request: EmbeddingRequest) -> None:
        structlog.contextvars.bind_contextvars(replica=self.replica_id, request_id=request.request_id)
        try:
            if self.runtime is None or self.backend is None:
                raise ApiError(503, "replica_not_loaded", f"replica '{self.replica_id}' has no loaded runtime")
            reply = {"id": mid, **embedding_to_wire(self.backend.embed(self.runtime, request))}
        except BaseException as exc:  # noqa: BLE001 - reported to the daemon
            reply = {"id": mid, **error_to_wire(exc)}
        with self.streams_lock:
            self.streams.pop(mid, None)
        try:
            self.send_or_error(mid, reply)
        except OSError:
            pass


# ----- entry --------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m llmpoold.replicas.worker",
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
    registry = PluginRegistry()
    registry.load_entry_points(names=args.entry_point)
    registry.load_modules(args.plugin)
    Worker(sock, registry).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
