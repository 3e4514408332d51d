"""How a process replica keeps its worker alive: the health watchdog (a hung worker is
killed, then handled as a crash) and the restart policy (back-off restarts within a
budget, then a long retry after giving up). A mixin of
:class:`~llmpoold.replicas.process.ProcessReplica`, which owns the state it uses."""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from llmpoold.config import WorkerSettings
from llmpoold.replicas.supervise import RestartBudget, WorkerState

log = structlog.get_logger("llmpoold.process_replica")


class Supervision:
    """Watchdog and restarts; the attributes and methods below are the replica's."""

    replica_id: str
    policy: WorkerSettings
    pid: int | None
    last_error: str | None
    restarts: int
    gave_up: bool
    _restarts: RestartBudget
    _proc: asyncio.subprocess.Process | None
    _restart_task: asyncio.Task[None] | None
    _watchdog_task: asyncio.Task[None] | None
    _hung: bool
    _stopping: bool

    async def _call(self, msg: dict[str, Any]) -> Any: ...
    async def _spawn_and_load(self) -> None: ...
    async def _kill(self) -> None: ...
    def _set_state(self, state: WorkerState) -> None: ...
    def _notify(self, event: str) -> None: ...

    # ----- health ---------------------------------------------------------------------

    def _start_watchdog(self) -> None:
        if self.policy.health_interval_s <= 0 or self._proc is None:
            return
        if self._watchdog_task is not None:
            self._watchdog_task.cancel()
        self._watchdog_task = asyncio.create_task(self._watchdog(self._proc),
                                                  name=f"worker-watchdog-{self.replica_id}")

    async def _watchdog(self, proc: asyncio.subprocess.Process) -> None:
        """Kill a worker that stops answering (a hang, not a crash): its streams then end
        with ``replica_crashed`` and the restart policy applies, as for a crash."""
        while True:
            await asyncio.sleep(self.policy.health_interval_s)
            if self._stopping or self._proc is not proc or proc.returncode is not None:
                return
            try:
                await asyncio.wait_for(self._call({"op": "health"}), self.policy.health_timeout_s)
            except TimeoutError:
                if self._stopping or proc.returncode is not None:
                    return
                log.error("worker_unresponsive", replica=self.replica_id, pid=proc.pid,
                          timeout_s=self.policy.health_timeout_s)
                self._hung = True
                proc.kill()
                return
            except Exception:  # noqa: BLE001 - it died: the exit path handles that
                return

    # ----- restarts ------------------------------------------------------------------

    def _schedule_restart(self) -> None:
        delay = self._restarts.next_delay()
        if delay is None:
            # Out of restarts in the window: failed, but tried again after the long
            # ``gave_up_retry_s`` (the cause may have been passing: a GPU reset, memory).
            self.gave_up = True
            self._restart_task = None
            self._set_state(WorkerState.FAILED)
            retry = self.policy.gave_up_retry_s
            log.error("worker_restart_gave_up", replica=self.replica_id, restarts=len(self._restarts.times),
                      window_s=self.policy.restart_window_s, retry_s=retry or None, error=self.last_error)
            if retry > 0:
                self._restart_task = asyncio.create_task(self._restart(retry), name=f"worker-retry-{self.replica_id}")
            self._notify("gave_up")
            return
        self._set_state(WorkerState.RESTARTING)
        log.info("worker_restart_scheduled", replica=self.replica_id, delay_s=delay)
        self._restart_task = asyncio.create_task(self._restart(delay), name=f"worker-restart-{self.replica_id}")

    async def _restart(self, delay: float) -> None:
        await asyncio.sleep(delay)
        if self._stopping:
            return
        self._set_state(WorkerState.STARTING)
        try:
            await self._spawn_and_load()
        except Exception as exc:  # noqa: BLE001 - counts as another crash
            await self._kill()
            self.last_error = f"restart failed: {exc}"
            log.error("worker_restart_failed", replica=self.replica_id, error=self.last_error)
            if not self._stopping:
                self._schedule_restart()
            return
        if self._stopping:
            return
        if self.gave_up:  # back after the long retry: a fresh restart budget
            self.gave_up = False
            self._restarts.times.clear()
        self.restarts += 1
        self._set_state(WorkerState.READY)
        self._start_watchdog()
        log.info("worker_restarted", replica=self.replica_id, pid=self.pid, restarts=self.restarts)
        self._notify("restarted")
