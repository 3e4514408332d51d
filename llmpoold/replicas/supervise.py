"""Worker processes as OS processes: start-up hygiene, exit descriptions, log relay,
forced ends. :class:`~llmpoold.replicas.process.ProcessReplica` keeps the protocol
and the restart policy; this module keeps what is about the process itself."""

from __future__ import annotations

import asyncio
import atexit
import collections
import json
import os
import signal
from typing import Any

import structlog

log = structlog.get_logger("llmpoold.process_replica")
worker_log = structlog.get_logger("llmpoold.worker")

# Worker processes alive in this daemon, killed at interpreter exit as a last resort
# (the workers also die with their parent through PR_SET_PDEATHSIG and socket EOF).
LIVE: dict[int, asyncio.subprocess.Process] = {}


@atexit.register
def _kill_leftover_workers() -> None:
    for pid, proc in list(LIVE.items()):
        if proc.returncode is None:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def describe_exit(code: int | None) -> str:
    """``exited with status 3`` / ``killed by signal 9 (SIGKILL)``."""
    if code is None:
        return "ended"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown"
        return f"killed by signal {-code} ({name})"
    return f"exited with status {code}"


async def relay_logs(proc: asyncio.subprocess.Process, replica_id: str, tail: collections.deque[str]) -> None:
    """Re-log the worker's stderr/stdout with the replica id bound; keep the last
    lines in ``tail`` (a load failure quotes them)."""
    assert proc.stdout is not None
    bound = worker_log.bind(replica=replica_id, worker_pid=proc.pid)
    while True:
        try:
            line = await proc.stdout.readline()
        except (ValueError, OSError):  # an over-long line: skip it
            continue
        if not line:
            return
        text = line.decode("utf-8", errors="replace").rstrip()
        if not text:
            continue
        tail.append(text[:500])
        data: Any = None
        if text.startswith("{"):
            try:
                data = json.loads(text)
            except ValueError:
                data = None
        if isinstance(data, dict) and "event" in data:
            event = str(data.pop("event"))
            level = str(data.pop("level", "info"))
            for key in ("timestamp", "replica"):
                data.pop(key, None)
            getattr(bound, level if level in ("debug", "info", "warning", "error", "critical") else "info")(
                event, **data)
        else:
            bound.info("worker_output", line=text)


async def wait_or_force(proc: asyncio.subprocess.Process, timeout_s: float, replica_id: str) -> None:
    """Wait ``timeout_s`` for the process to end, then SIGTERM, then SIGKILL."""
    for action in (None, proc.terminate, proc.kill):
        if action is not None:
            log.warning("worker_forced_exit", replica=replica_id, pid=proc.pid, action=action.__name__)
            try:
                action()
            except ProcessLookupError:
                pass
        try:
            await asyncio.wait_for(proc.wait(), timeout_s if action is None else 2.0)
            return
        except TimeoutError:
            continue
