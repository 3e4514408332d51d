"""Process-isolated replicas: the daemon side of :mod:`llmpoold.replicas.worker`.

:class:`ProcessReplica` implements the :class:`~llmpoold.replicas.Replica` protocol by
running the plugin in a child process (``python -m llmpoold.replicas.worker``) and
speaking :mod:`llmpoold.replicas.wire` over a Unix socket pair. A crash in a native
runtime then takes down one replica, not the daemon:

- in-flight requests of the dead worker end at once with 502 ``replica_crashed``; a
  worker that sends a malformed frame is killed and handled the same way (its state can
  no longer be trusted), and so is one that stops answering health checks;
- the replica stops accepting work (``accepting`` is False, so the scheduler routes to
  the others or keeps requests queued), records the exit status or signal in
  ``last_error`` and is restarted with exponential backoff, at most
  ``engine.workers.restart_max`` times per ``restart_window_s``, after which it is
  ``failed`` (``gave_up``) and tried again every ``gave_up_retry_s`` (0: never) until
  it starts or is unloaded;
- listeners (the pool) hear ``crashed``, ``restarted`` and ``gave_up`` (again after
  each failed retry).

The watchdog and the restart policy are :class:`~llmpoold.replicas.restarts.Supervision`,
a mixin kept beside this module.

Unload asks the worker to unload and exit, then SIGTERM, then SIGKILL after
``unload_timeout_s``; ending the process is what gives the memory back to the OS.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import sys
import time
from collections.abc import AsyncGenerator, Collection
from typing import Any

import structlog

from llmpoold.config import ModelConfig, WorkerSettings
from llmpoold.errors import ApiError, LoadError
from llmpoold.gpu import process_rss_mib, process_vram_mib
from llmpoold.replicas import Listener
from llmpoold.replicas.restarts import Supervision
from llmpoold.replicas.supervise import (
    LIVE,
    RestartBudget,
    WorkerPlugins,
    WorkerState,
    describe_exit,
    relay_logs,
    spawn_worker,
    wait_or_force,
    worker_env,
)
from llmpoold.replicas.wire import (
    HEADER,
    FrameError,
    decode_payload,
    embed_request_to_wire,
    encode_frame,
    frame_size,
    model_to_wire,
    reply_from_wire,
    request_to_wire,
)
from llmpoold.types import CancelToken, EmbeddingRequest, EmbeddingResult, GenerationRequest, StreamItem

log = structlog.get_logger("llmpoold.process_replica")


class ProcessReplica(Supervision):
    """One replica whose runtime lives in a worker process."""

    isolation = "process"

    def __init__(self, *, backend: str, replica_id: str, model: ModelConfig, concurrency: int,
                 plugins: WorkerPlugins | None, policy: WorkerSettings | None = None,
                 python: str = sys.executable, unhosted_reason: str | None = None,
                 secret_envs: Collection[str] = ()) -> None:
        self.backend = backend
        self.replica_id = replica_id
        self.model = model
        self.concurrency = concurrency
        self.plugins = plugins
        self.policy = policy or WorkerSettings()
        self.python = python
        self.unhosted_reason = unhosted_reason
        self.secret_envs = frozenset(secret_envs)  # in no worker's environment but their own model's
        self.state = WorkerState.STOPPED
        self.pid: int | None = None
        self.last_error: str | None = None
        self.exit_status: int | None = None
        self.restarts = 0
        self.gave_up = False
        self._restarts = RestartBudget(self.policy)
        self._listeners: list[Listener] = []
        self._ids = itertools.count(1)
        self._streams: dict[int, asyncio.Queue[tuple[str, Any]]] = {}
        self._ops: dict[int, asyncio.Future[Any]] = {}
        self._proc: asyncio.subprocess.Process | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._log_task: asyncio.Task[None] | None = None
        self._restart_task: asyncio.Task[None] | None = None
        self._watchdog_task: asyncio.Task[None] | None = None
        self._hung = False
        self._malformed: str | None = None  # why the reader killed the worker, if it did
        self._state_changed: asyncio.Event | None = None
        self._stopping = False
        self._tail: collections.deque[str] = collections.deque(maxlen=20)
        self._vram: tuple[float, float | None] = (0.0, None)

    # ----- public --------------------------------------------------------------------

    @property
    def accepting(self) -> bool:
        """Whether the scheduler may route new work here."""
        return self.state == WorkerState.READY

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    async def load(self) -> None:
        if self.plugins is None:
            raise LoadError(self.unhosted_reason or f"backend '{self.backend}' cannot run in a worker process")
        self._stopping = False
        self._set_state(WorkerState.STARTING)
        try:
            await self._spawn_and_load()
        except BaseException:
            self._stopping = True  # the worker is ended on purpose, not crashed
            await self._kill()
            self._set_state(WorkerState.FAILED)
            raise
        self._set_state(WorkerState.READY)
        self._start_watchdog()

    async def stream(self, request: GenerationRequest, *, whole: bool = False) -> AsyncGenerator[StreamItem, None]:
        if self.state != WorkerState.READY:
            await self._wait_ready()
        mid = next(self._ids)
        try:  # encoded before the stream exists: a refused frame never reached the worker
            frame = encode_frame({"op": "stream", "id": mid, "request": request_to_wire(request), "whole": whole})
        except FrameError as exc:
            raise ApiError(400, "invalid_json", f"request cannot be sent to the worker: {exc}") from None
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._streams[mid] = queue
        ended = False
        try:
            self._write(frame)
            while True:
                kind, value = await queue.get()
                if kind == "delta" or kind == "completion":
                    yield value
                elif kind == "end":
                    ended = True
                    return
                elif kind == "error":
                    ended = True
                    raise value
                else:  # "crash": the worker died under this stream
                    ended = True
                    raise self._crash_error()
        finally:
            if not ended:
                request.cancel.set()
                await self._cancel_stream(mid, queue)
            self._streams.pop(mid, None)

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        if self.state != WorkerState.READY:
            await self._wait_ready()
        try:
            result: EmbeddingResult = await self._call({"op": "embed", "request": embed_request_to_wire(request)},
                                                       cancel=request.cancel)
        except FrameError as exc:
            raise ApiError(400, "invalid_json", f"request cannot be sent to the worker: {exc}") from None
        return result

    async def unload(self) -> None:
        """Unload and end the worker: politely, then SIGTERM, then SIGKILL."""
        self._stopping = True
        if self._watchdog_task is not None:
            self._watchdog_task.cancel()
            self._watchdog_task = None
        if self._restart_task is not None:
            self._restart_task.cancel()
            self._restart_task = None
        proc = self._proc
        if proc is not None and proc.returncode is None:
            deadline = time.monotonic() + self.policy.unload_timeout_s
            try:
                await asyncio.wait_for(self._call({"op": "unload"}), self.policy.unload_timeout_s)
            except Exception as exc:  # noqa: BLE001 - then by force
                log.warning("worker_unload_failed", replica=self.replica_id, pid=proc.pid, error=str(exc) or
                            type(exc).__name__)
            await wait_or_force(proc, max(0.5, deadline - time.monotonic()), self.replica_id)
        if self._reader_task is not None:
            await asyncio.gather(self._reader_task, return_exceptions=True)
        if self._log_task is not None:
            await asyncio.gather(self._log_task, return_exceptions=True)
        self._set_state(WorkerState.STOPPED)

    async def health(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """The worker's own view: pid, RSS, whether it is loaded, active streams."""
        result: dict[str, Any] = await asyncio.wait_for(self._call({"op": "health"}), timeout_s)
        return result

    def info(self) -> dict[str, Any]:
        pid = self.pid if self._proc is not None and self._proc.returncode is None else None
        return {"replica_id": self.replica_id, "isolation": self.isolation, "pid": pid, "state": self.state,
                "rss_mib": process_rss_mib(pid) if pid else None, "vram_mib": self._vram_mib(pid),
                "concurrency": self.concurrency, "restarts": self.restarts, "last_error": self.last_error,
                "exit_status": self.exit_status}

    # ----- process -------------------------------------------------------------------

    async def _spawn_and_load(self) -> None:
        assert self.plugins is not None
        # The model's own key variables (a remote model asked to run in a worker) are its
        # to see; every other key the settings name is not.
        own = self.model.key_envs()
        env = worker_env(os.environ, (*self.policy.env_passthrough, *own), self.secret_envs - own)
        proc, parent = await spawn_worker(self.python, self.plugins, env)
        self._proc, self.pid = proc, proc.pid
        self._tail.clear()
        self._malformed = None
        reader, writer = await asyncio.open_unix_connection(sock=parent)
        self._writer = writer
        self._reader_task = asyncio.create_task(self._read_loop(reader, proc), name=f"worker-read-{self.replica_id}")
        self._log_task = asyncio.create_task(relay_logs(proc, self.replica_id, self._tail),
                                             name=f"worker-log-{self.replica_id}")
        log.info("worker_started", replica=self.replica_id, pid=proc.pid, backend=self.backend)
        limit = self.policy.load_timeout_s
        try:
            await asyncio.wait_for(self._call({"op": "load", "backend": self.backend, "replica_id": self.replica_id,
                                               "model": model_to_wire(self.model)}), limit)
        except TimeoutError:
            # The caller kills the worker: a runtime stuck in its load cannot be interrupted.
            raise LoadError(f"worker did not finish loading within {limit:g} s "
                            "(engine.workers.load_timeout_s); it was killed") from None
        except ApiError as exc:
            if exc.code == "replica_crashed":
                tail = " | ".join(self._tail)
                raise LoadError(f"worker {self.last_error} while loading" + (f"; output: {tail}" if tail else "")) \
                    from None
            raise

    async def _kill(self) -> None:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        if self._reader_task is not None:
            await asyncio.gather(self._reader_task, return_exceptions=True)

    async def _read_loop(self, reader: asyncio.StreamReader, proc: asyncio.subprocess.Process) -> None:
        try:
            while True:
                size = frame_size(await reader.readexactly(HEADER.size))
                mid, kind, value = reply_from_wire(decode_payload(await reader.readexactly(size)))
                queue = self._streams.get(mid)
                if queue is not None:
                    queue.put_nowait((kind, value))
                    continue
                future = self._ops.pop(mid, None)
                if future is None or future.done():
                    continue
                if kind == "error":
                    future.set_exception(value)
                else:
                    future.set_result(value)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        except ValueError as exc:  # a malformed or oversized frame: the worker is not sane
            self._malformed = f"sent a malformed frame ({exc})"
            log.error("worker_protocol_error", replica=self.replica_id, pid=proc.pid, error=str(exc))
            if proc.returncode is None:
                proc.kill()
        # EOF: the worker ended (or closed its end; then make sure it ends).
        try:
            code = await asyncio.wait_for(proc.wait(), 5.0)
        except TimeoutError:
            proc.kill()
            code = await proc.wait()
        self._on_exit(proc, code)

    def _on_exit(self, proc: asyncio.subprocess.Process, code: int | None) -> None:
        LIVE.pop(proc.pid, None)
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self.exit_status = code
        description = f"process {proc.pid} {describe_exit(code)}"
        if self._stopping:
            log.info("worker_exited", replica=self.replica_id, pid=proc.pid, status=code)
            self._fail_pending(ApiError(503, "replica_unloaded", f"replica '{self.replica_id}' was unloaded"))
            return
        if self._hung:
            self._hung = False
            description = (f"process {proc.pid} did not answer a health check within "
                           f"{self.policy.health_timeout_s:g} s and was killed")
        elif self._malformed:
            description = f"process {proc.pid} {self._malformed} and was killed"
            self._malformed = None
        self.last_error = description
        was_ready = self.state == WorkerState.READY
        log.error("worker_crashed", replica=self.replica_id, pid=proc.pid, status=code, error=description)
        self._fail_pending(self._crash_error())
        if was_ready:
            self._set_state(WorkerState.FAILED)
            self._notify("crashed")
            self._schedule_restart()

    def _crash_error(self) -> ApiError:
        return ApiError(502, "replica_crashed",
                        f"replica '{self.replica_id}' crashed: worker {self.last_error or 'ended'}")

    def _fail_pending(self, error: ApiError) -> None:
        for queue in self._streams.values():
            queue.put_nowait(("crash", None))
        ops, self._ops = self._ops, {}
        for future in ops.values():
            if not future.done():
                future.set_exception(error)

    # ----- helpers -------------------------------------------------------------------

    def _set_state(self, state: WorkerState) -> None:
        self.state = state
        event = self._state_changed
        if event is not None:
            event.set()
            self._state_changed = None

    async def _wait_ready(self) -> None:
        """A request routed here while restarting waits for the restart (or the end)."""
        while self.state != WorkerState.READY:
            if self.gave_up or self._stopping or self.state == WorkerState.STOPPED or (
                    self.state == WorkerState.FAILED and self._restart_task is None):
                raise self._crash_error() if self.last_error else ApiError(
                    503, "replica_unavailable", f"replica '{self.replica_id}' is not running")
            if self._state_changed is None:
                self._state_changed = asyncio.Event()
            await self._state_changed.wait()

    def _notify(self, event: str) -> None:
        for listener in list(self._listeners):
            try:
                listener(self, event)
            except Exception as exc:  # noqa: BLE001 - a listener must not break the replica
                log.warning("replica_listener_failed", replica=self.replica_id, replica_event=event, error=str(exc))

    def _send(self, msg: dict[str, Any]) -> None:
        """Send one message (FrameError, nothing sent, when it cannot be a frame)."""
        self._write(encode_frame(msg))

    def _write(self, frame: bytes) -> None:
        writer = self._writer
        if writer is None or writer.is_closing():
            raise self._crash_error()
        writer.write(frame)

    async def _call(self, msg: dict[str, Any], *, cancel: CancelToken | None = None) -> Any:
        """Send one operation and await its reply. With ``cancel`` (work on the runtime,
        an embed) a caller that leaves first asks the worker to cancel and waits until
        the runtime has let go, so a released slot is a free runtime."""
        mid = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._ops[mid] = future
        try:
            self._send({**msg, "id": mid})
            return await (future if cancel is None else asyncio.shield(future))
        except asyncio.CancelledError:
            if cancel is not None and not future.done():
                cancel.set()
                try:
                    self._send({"op": "cancel", "id": mid})
                    await asyncio.wait_for(asyncio.shield(future), self.policy.unload_timeout_s)
                except Exception:  # noqa: BLE001 - its answer (or the worker's end) is not ours to report
                    log.warning("worker_cancel_slow", replica=self.replica_id, stream=mid)
            raise
        finally:
            self._ops.pop(mid, None)

    async def _cancel_stream(self, mid: int, queue: asyncio.Queue[tuple[str, Any]]) -> None:
        """Tell the worker to stop this stream and wait until its runtime has let go."""
        try:
            self._send({"op": "cancel", "id": mid})
        except ApiError:
            return
        deadline = time.monotonic() + self.policy.unload_timeout_s
        try:
            while (left := deadline - time.monotonic()) > 0:
                kind, _value = await asyncio.wait_for(queue.get(), left)
                if kind in ("end", "error", "crash"):
                    return
        except (TimeoutError, asyncio.CancelledError):
            log.warning("worker_cancel_slow", replica=self.replica_id, stream=mid)

    def _vram_mib(self, pid: int | None) -> float | None:
        if pid is None:
            return None
        now = time.monotonic()
        if now - self._vram[0] > 5.0:
            self._vram = (now, process_vram_mib(pid))
        return self._vram[1]


