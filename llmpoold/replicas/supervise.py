"""Worker processes as OS processes: start-up hygiene, exit descriptions, log relay,
forced ends. :class:`~llmpoold.replicas.process.ProcessReplica` keeps the protocol
and the restart policy; this module keeps what is about the process itself."""

from __future__ import annotations

import asyncio
import atexit
import collections
import json
import logging
import os
import re
import signal
import socket
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import structlog

from llmpoold.config import WorkerSettings

log = structlog.get_logger("llmpoold.process_replica")
worker_log = structlog.get_logger("llmpoold.worker")

@dataclass(frozen=True)
class WorkerPlugins:
    """What a worker must load to host one backend."""

    entry_points: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()

    def argv(self) -> list[str]:
        return [*(a for ep in self.entry_points for a in ("--entry-point", ep)),
                *(a for mod in self.modules for a in ("--plugin", mod))]


# What a worker may see of the daemon's environment (see :func:`worker_env`): what a
# process needs to run, and what the runtimes read (llama.cpp: GGML_*/LLAMA_*;
# CTranslate2: CT2_*, OMP_*, MKL_*; torch/ExLlamaV3: CUDA_*, PYTORCH_*, TORCH_*, HF_*,
# MAX_JOBS/CC/CXX for extension builds; ROCm: HIP_*/HSA_*/ROCR_*).
WORKER_ENV_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "XDG_CACHE_HOME", "PYTHONPATH",
    "VIRTUAL_ENV", "LD_LIBRARY_PATH", "CUDA_HOME", "CUDA_PATH", "ROCM_PATH", "MAX_JOBS", "CC", "CXX",
})
WORKER_ENV_PREFIXES = (
    "LC_", "PYTHON", "CUDA_", "NVIDIA_", "CUBLAS_", "CUDNN_", "NCCL_", "ROCM_", "ROCR_", "HIP_", "HSA_",
    "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TOKENIZERS_", "TORCH_", "PYTORCH_", "TRITON_", "OMP_", "KMP_",
    "OPENBLAS_", "MKL_", "GGML_", "LLAMA_", "CT2_", "EXLLAMA",
)
# A name under one of the prefixes above that looks like a credential (HF_TOKEN) is
# passed only when named in engine.workers.env_passthrough.
SECRET_LIKE = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL", re.IGNORECASE)


def worker_env(environ: Mapping[str, str], passthrough: Sequence[str] = (),
               deny: Collection[str] = ()) -> dict[str, str]:
    """The part of ``environ`` a worker gets: :data:`WORKER_ENV_NAMES`, names under
    :data:`WORKER_ENV_PREFIXES` that do not look like credentials, and ``passthrough``
    (names, or prefixes ending in ``*``); never a name in ``deny`` (the key variables the
    settings name), whatever else matches it."""
    exact = {p for p in passthrough if not p.endswith("*")}
    prefixes = tuple(p[:-1] for p in passthrough if p.endswith("*"))
    env = {}
    for name, value in environ.items():
        if name in deny:
            continue
        if (name in WORKER_ENV_NAMES or name in exact or name.startswith(prefixes)
                or (name.startswith(WORKER_ENV_PREFIXES) and not SECRET_LIKE.search(name))):
            env[name] = value
    return env


async def spawn_worker(python: str, plugins: WorkerPlugins, env: Mapping[str, str]) -> tuple[
        asyncio.subprocess.Process, socket.socket]:
    """Start ``python -m llmpoold.replicas.worker`` for ``plugins`` with environment
    ``env`` (see :func:`worker_env`); return the process and the daemon's end of its
    socket (stdout and stderr merged on a pipe, for :func:`relay_logs`). The process is
    in :data:`LIVE` until it has exited."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    # The daemon's own logger filters the relayed lines again; the worker sends at
    # least info so an unconfigured root logger (tests, embedding) still sees them.
    level = logging.getLevelName(min(logging.getLogger().getEffectiveLevel(), logging.INFO)).lower()
    cmd = [python, "-m", "llmpoold.replicas.worker", "--fd", str(child.fileno()), "--parent-pid", str(os.getpid()),
           "--log-level", level if level in ("debug", "info", "warning", "error") else "info", *plugins.argv()]
    env = dict(env)
    if plugins.paths:
        env["PYTHONPATH"] = os.pathsep.join([*plugins.paths, *filter(None, [env.get("PYTHONPATH")])])
    try:
        proc = await asyncio.create_subprocess_exec(
            *cmd, pass_fds=(child.fileno(),), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env)
    except BaseException:
        parent.close()
        raise
    finally:
        child.close()
    LIVE[proc.pid] = proc
    return proc, parent


class WorkerState(StrEnum):
    """A process replica's worker; only ``READY`` takes work (shown in ``replica_info``)."""

    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPED = "stopped"


class RestartBudget:
    """``engine.workers``' restart policy: at most ``restart_max`` restarts per sliding
    ``restart_window_s``, each after an exponential backoff."""

    def __init__(self, policy: WorkerSettings) -> None:
        self.policy = policy
        self.times: collections.deque[float] = collections.deque()

    def next_delay(self) -> float | None:
        """Seconds to wait before the next restart (counted now), or None: give up."""
        now = time.monotonic()
        while self.times and now - self.times[0] > self.policy.restart_window_s:
            self.times.popleft()
        if len(self.times) >= self.policy.restart_max:
            return None
        delay = min(self.policy.restart_backoff_s * 2 ** len(self.times), self.policy.restart_backoff_max_s)
        self.times.append(now)
        return delay


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
