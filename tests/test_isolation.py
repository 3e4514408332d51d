"""Process isolation with the echo test backend: each replica in a worker process.

The echo backend is not an installed entry point, so the factory is told to let the
worker import it (``plugin_modules``); everything else is the daemon's real path.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import structlog

from llmpoold.config import WorkerSettings
from llmpoold.http.keys import POOL
from llmpoold.replicas.factory import ProcessReplicaFactory
from llmpoold.replicas.process import ProcessReplica
from llmpoold.replicas.supervise import describe_exit
from llmpoold.replicas.wire import decode_payload, encode_frame, error_from_wire, error_to_wire

pytestmark = pytest.mark.timeout(60)

TESTS = Path(__file__).parent


def worker_pids(parent: int | None = None) -> list[int]:
    """Live llmpoold workers (of ``parent``, default: any) from the process table."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                argv = fh.read().split(b"\0")
            with open(f"/proc/{entry}/stat", "rb") as fh:
                state = fh.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if b"llmpoold.replicas.worker" not in argv or state == b"Z":
            continue
        flag = argv.index(b"--parent-pid") if b"--parent-pid" in argv else None
        if parent is None or (flag is not None and argv[flag + 1] == str(parent).encode()):
            found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def factory(**policy: Any) -> ProcessReplicaFactory:
    return ProcessReplicaFactory(WorkerSettings(**{"restart_backoff_s": 0.1, **policy}),
                                 plugin_modules=("echo_backend",))


async def sse_events(resp: Any) -> list[tuple[str, dict[str, Any]]]:
    events, name = [], None
    async for raw in resp.content:
        line = raw.decode().strip()
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            events.append((name, json.loads(line[5:])))
    return events


async def replica_info(client: Any, model: str) -> dict[str, Any]:
    resp = await client.get("/v1/admin/models")
    entry = next(m for m in (await resp.json())["models"] if m["name"] == model)
    return entry


async def wait_for(predicate: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached in time")


# ----- protocol pieces ----------------------------------------------------------------------


def test_frames_and_errors_round_trip() -> None:
    frame = encode_frame({"id": 3, "t": "delta", "text": "é", "channel": "output"})
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    assert decode_payload(frame[4:]) == {"id": 3, "t": "delta", "text": "é", "channel": "output"}
    from llmpoold.errors import BackendError, WorkerError

    sent = BackendError(429, "upstream_rate_limit", "m", headers={"Retry-After": "3"}, extra={"x": 1}, param="p")
    api = error_from_wire(error_to_wire(sent))
    assert isinstance(api, BackendError)
    assert (api.status, api.code, api.message, api.headers, api.extra, api.param) == (
        429, "upstream_rate_limit", "m", {"Retry-After": "3"}, {"x": 1}, "p")
    exc = error_from_wire(error_to_wire(ValueError("bad")))
    assert isinstance(exc, WorkerError) and (exc.type_name, str(exc)) == ("ValueError", "bad")
    odd = error_from_wire({"t": "error", "kind": "exception", "type": "LlamaError", "message": "boom"})
    assert isinstance(odd, WorkerError) and (odd.type_name, str(odd)) == ("LlamaError", "boom")
    assert describe_exit(-9) == "killed by signal 9 (SIGKILL)"
    assert describe_exit(3) == "exited with status 3"


# ----- through the HTTP API -----------------------------------------------------------------


async def test_request_through_worker_and_admin_view(make_client: Any) -> None:
    client = await make_client({"engine": {"backend": "echo", "models": {
        "echo": {}, "inl": {"isolation": "inline"}}}}, replica_factory=factory())
    resp = await client.post("/v1/responses", json={"model": "echo", "input": "hello from a worker"})
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["output_text"] == "hello from a worker"
    assert body["metrics"]["engine_output_tokens"] == 4
    resp = await client.post("/v1/responses", json={"model": "echo", "input": "a b c", "stream": True})
    events = await sse_events(resp)
    deltas = "".join(d["delta"] for name, d in events if name == "response.output_text.delta")
    assert deltas == "a b c" and events[-1][0] == "response.completed"

    info = (await replica_info(client, "echo"))["replica_info"][0]
    assert info["isolation"] == "process" and info["state"] == "ready"
    assert info["pid"] != os.getpid() and alive(info["pid"])
    assert info["rss_mib"] and info["rss_mib"] > 5
    assert "vram_mib" in info
    assert (await replica_info(client, "inl"))["replica_info"][0]["isolation"] == "inline"
    resp = await client.get("/v1/admin/gpu-memory")
    gpu_models = {m["name"]: m for m in (await resp.json())["models"]}
    assert gpu_models["echo"]["replica_info"][0]["pid"] == info["pid"]

    replica = client.app[POOL].entry("echo").replicas[0]
    assert isinstance(replica, ProcessReplica)
    health = await replica.health()
    assert health == {"pid": info["pid"], "rss_mib": health["rss_mib"], "loaded": True, "active_streams": 0}


async def test_kill_9_during_stream(make_client: Any) -> None:
    client = await make_client({"engine": {"backend": "echo", "models": {
        "slow": {"echo_delay_s": 0.2}, "other": {}}}}, replica_factory=factory())
    old_pid = (await replica_info(client, "slow"))["replica_info"][0]["pid"]
    resp = await client.post("/v1/responses", json={"model": "slow", "stream": True,
                                                    "input": " ".join(f"w{i}" for i in range(40))})
    assert resp.status == 200
    seen_delta = False
    async for raw in resp.content:  # wait until tokens flow, then kill the worker
        if raw.startswith(b"event: response.output_text.delta"):
            seen_delta = True
            break
    assert seen_delta
    killed_at = time.monotonic()
    os.kill(old_pid, signal.SIGKILL)
    events = await sse_events(resp)
    elapsed = time.monotonic() - killed_at
    assert events[-1][0] == "error", events
    detail = events[-1][1]
    assert detail["status"] == 502 and detail["error"]["code"] == "replica_crashed"
    assert "signal 9" in detail["error"]["message"]
    assert elapsed < 2.0

    # The daemon is up and the other model never noticed.
    resp = await client.post("/v1/responses", json={"model": "other", "input": "still here"})
    assert resp.status == 200 and (await resp.json())["output_text"] == "still here"
    entry = await replica_info(client, "slow")
    assert "SIGKILL" in entry["last_error"] and entry["runtime_state"] == "loaded"

    # A request sent while the worker restarts waits for it, then is served.
    resp = await client.post("/v1/responses", json={"model": "slow", "input": "back again"})
    assert resp.status == 200 and (await resp.json())["output_text"] == "back again"
    info = (await replica_info(client, "slow"))["replica_info"][0]
    assert info["state"] == "ready" and info["restarts"] == 1 and info["pid"] != old_pid
    assert info["exit_status"] == -9 and not alive(old_pid)


async def test_restart_limit_then_model_failed(make_client: Any) -> None:
    client = await make_client({"engine": {"backend": "echo", "models": {"m": {}}}},
                               replica_factory=factory(restart_max=1))

    async def pid_ready() -> Any:
        info = (await replica_info(client, "m"))["replica_info"]
        return info and info[0]["state"] == "ready" and info[0]["pid"]

    first = await pid_ready()
    os.kill(first, signal.SIGKILL)
    await wait_for(lambda: _changed(pid_ready, first))
    os.kill(await pid_ready(), signal.SIGKILL)

    async def failed() -> bool:
        return (await replica_info(client, "m"))["runtime_state"] == "failed"

    await wait_for(failed)
    entry = await replica_info(client, "m")
    assert "signal 9" in entry["last_error"] and "restart limit" in entry["last_error"]
    resp = await client.post("/v1/responses", json={"model": "m", "input": "x"})
    assert resp.status == 409 and (await resp.json())["detail"]["code"] == "model_failed"
    assert worker_pids(os.getpid()) == []
    resp = await client.post("/v1/admin/models/m/load")  # an operator can load it again
    assert resp.status == 200 and (await resp.json())["runtime_state"] == "loaded"


async def _changed(get: Any, old: Any) -> bool:
    value = await get()
    return bool(value) and value != old


async def test_worker_that_fails_to_load(make_client: Any) -> None:
    client = await make_client({"engine": {"backend": "echo", "models": {
        "bad": {"echo_fail_load": "weights file is corrupt"}, "good": {}}}}, replica_factory=factory())
    entry = await replica_info(client, "bad")
    assert entry["runtime_state"] == "failed"
    assert "weights file is corrupt" in entry["last_error"]
    good_pid = (await replica_info(client, "good"))["replica_info"][0]["pid"]
    assert worker_pids(os.getpid()) == [good_pid]  # the failed worker is gone
    resp = await client.post("/v1/responses", json={"model": "good", "input": "ok"})
    assert resp.status == 200


async def test_load_that_hangs_is_killed_after_the_load_timeout(make_client: Any) -> None:
    """A runtime stuck in its load (here: a 60 s sleep) must not hold the model in
    ``loading`` for ever: the worker is killed and the model fails with the reason."""
    started = time.monotonic()
    # The timeout holds for the good model's load too: 5 s leaves room for a worker's
    # start-up on a loaded 2-core machine, and is still far below the stuck load's 60 s.
    client = await make_client({"engine": {"backend": "echo", "models": {
        "stuck": {"echo_load_delay_s": 60}, "good": {}}}}, replica_factory=factory(load_timeout_s=5))
    assert time.monotonic() - started < 30
    entry = await replica_info(client, "stuck")
    assert entry["runtime_state"] == "failed"
    assert "did not finish loading within 5 s" in entry["last_error"]
    good_pid = (await replica_info(client, "good"))["replica_info"][0]["pid"]
    assert worker_pids(os.getpid()) == [good_pid]  # the stuck worker was killed
    resp = await client.get("/readyz")
    assert resp.status == 200


async def test_explicit_process_isolation_needs_a_hostable_plugin(make_client: Any) -> None:
    client = await make_client({"engine": {"backend": "echo", "models": {"p": {"isolation": "process"}}}},
                               replica_factory=ProcessReplicaFactory(plugin_modules=()))
    entry = await replica_info(client, "p")
    assert entry["runtime_state"] == "failed" and "entry point" in entry["last_error"]


async def test_unload_ends_the_worker(make_client: Any) -> None:
    client = await make_client({"engine": {"backend": "echo", "models": {"m": {"replicas": 2, "replica_max": 2}}}},
                               replica_factory=factory())
    pids = [r["pid"] for r in (await replica_info(client, "m"))["replica_info"]]
    assert len(set(pids)) == 2 and all(alive(p) for p in pids)
    resp = await client.post("/v1/admin/models/m/unload")
    assert resp.status == 200 and (await resp.json())["runtime_state"] == "unloaded"
    assert not any(alive(p) for p in pids)
    assert worker_pids(os.getpid()) == []


async def test_concurrent_streams_share_one_worker(make_client: Any) -> None:
    client = await make_client({"engine": {"backend": "echo", "models": {
        "b": {"echo_concurrency": 4, "target_inflight": 4, "echo_delay_s": 0.1}}}}, replica_factory=factory())
    started = time.monotonic()
    texts = [f"r{i} one two three" for i in range(4)]
    resps = await asyncio.gather(*(client.post("/v1/responses", json={"model": "b", "input": t}) for t in texts))
    outputs = [(await r.json())["output_text"] for r in resps]
    assert outputs == texts
    assert time.monotonic() - started < 0.4 * 4 * 0.9  # ran together, not one after another


async def test_client_disconnect_cancels_in_worker(make_client: Any) -> None:
    client = await make_client({"engine": {"backend": "echo", "models": {"slow": {"echo_delay_s": 0.1}}}},
                               replica_factory=factory())
    replica = client.app[POOL].entry("slow").replicas[0]
    resp = await client.post("/v1/responses", json={"model": "slow", "stream": True,
                                                    "input": " ".join(["w"] * 100)})
    async for raw in resp.content:
        if raw.startswith(b"event: response.output_text.delta"):
            break
    resp.close()

    async def idle() -> bool:
        return (await replica.health())["active_streams"] == 0

    await wait_for(idle, timeout=3)
    resp = await client.post("/v1/responses", json={"model": "slow", "input": "next one"})
    assert resp.status == 200 and (await resp.json())["output_text"] == "next one"


async def test_worker_logs_reach_daemon_log_with_replica_id(make_client: Any) -> None:
    with structlog.testing.capture_logs() as logs:
        client = await make_client({"engine": {"backend": "echo", "models": {"m": {}}}}, replica_factory=factory())
        await client.post("/v1/admin/models/m/unload")
    loaded = [e for e in logs if e["event"] == "worker_loaded"]
    assert loaded and loaded[0]["replica"] == "m#1" and loaded[0]["worker_pid"] == loaded[0]["pid"]
    assert any(e["event"] == "worker_unloaded" and e["replica"] == "m#1" for e in logs)


# ----- a real daemon process ----------------------------------------------------------------


def _start_daemon(tmp_path: Path, settings: dict[str, Any]) -> tuple[subprocess.Popen[str], int]:
    from test_shutdown import free_port  # type: ignore[import-not-found]

    port = free_port()
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(settings))
    env = {**os.environ, "LLMPOOL_WORKER_PLUGINS": "echo_backend"}
    proc = subprocess.Popen([sys.executable, str(TESTS / "echo_daemon.py"), "--settings", str(path),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as resp:
                if json.load(resp)["ready"]:
                    return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"daemon did not become ready: {proc.communicate()[0]}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_daemon_exit_leaves_no_orphan_workers(tmp_path: Path, sig: signal.Signals) -> None:
    sys.path.insert(0, str(TESTS))
    proc, port = _start_daemon(tmp_path, {"engine": {"backend": "echo", "models": {
        "a": {}, "b": {"replicas": 2, "replica_max": 2}}}})
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/admin/models", timeout=5) as resp:
            models = json.load(resp)["models"]
        pids = sorted(r["pid"] for m in models for r in m["replica_info"])
        assert len(pids) == 3 and proc.pid not in pids
        assert sorted(worker_pids(proc.pid)) == pids
        os.kill(proc.pid, sig)
        output, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    if sig == signal.SIGTERM:
        assert proc.returncode == 0, output
        assert output.count("worker_exited") == 3 and "worker_crashed" not in output
    deadline = time.monotonic() + 5  # SIGKILL: the kernel kills the workers (PR_SET_PDEATHSIG)
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    assert not any(alive(p) for p in pids), output
    assert worker_pids(proc.pid) == []


async def test_crash_of_one_replica_other_replica_serves(make_client: Any) -> None:
    client = await make_client({"engine": {"backend": "echo", "models": {"m": {"replicas": 2, "replica_max": 2}}}},
                               replica_factory=factory(restart_backoff_s=30))
    first, second = ((await replica_info(client, "m"))["replica_info"])
    os.kill(first["pid"], signal.SIGKILL)

    async def first_down() -> bool:
        return (await replica_info(client, "m"))["replica_info"][0]["state"] == "restarting"

    await wait_for(first_down)
    started = time.monotonic()
    resps = await asyncio.gather(*(client.post("/v1/responses", json={"model": "m", "input": f"req {i}"})
                                   for i in range(4)))
    assert [(await r.json())["output_text"] for r in resps] == [f"req {i}" for i in range(4)]
    assert time.monotonic() - started < 5  # served by the live replica, not after the 30 s backoff
    infos = (await replica_info(client, "m"))["replica_info"]
    assert infos[0]["state"] == "restarting" and infos[1]["pid"] == second["pid"]


async def test_unload_forces_a_stuck_worker(make_client: Any) -> None:
    client = await make_client({"engine": {"backend": "echo", "models": {"m": {}}}},
                               replica_factory=factory(unload_timeout_s=0.5))
    pid = (await replica_info(client, "m"))["replica_info"][0]["pid"]
    os.kill(pid, signal.SIGSTOP)  # it will never answer the unload request
    started = time.monotonic()
    resp = await client.post("/v1/admin/models/m/unload")
    assert resp.status == 200 and (await resp.json())["runtime_state"] == "unloaded"
    assert time.monotonic() - started < 5
    assert not alive(pid)


async def test_hung_worker_is_killed_by_the_health_check_and_restarted(make_client: Any) -> None:
    """A worker that stops answering (here: SIGSTOP) is not a crash the kernel reports;
    the watchdog's health check finds it, kills it and the replica restarts and serves."""
    client = await make_client({"engine": {"backend": "echo", "models": {"m": {}}}},
                               replica_factory=factory(health_interval_s=0.2, health_timeout_s=0.5))
    pid = (await replica_info(client, "m"))["replica_info"][0]["pid"]
    os.kill(pid, signal.SIGSTOP)
    started = time.monotonic()

    async def restarted() -> bool:
        info = (await replica_info(client, "m"))["replica_info"][0]
        return info["pid"] not in (None, pid) and info["state"] == "ready"

    await wait_for(restarted)
    assert time.monotonic() - started < 10
    assert not alive(pid)
    info = (await replica_info(client, "m"))["replica_info"][0]
    assert "did not answer a health check within 0.5 s" in info["last_error"] and info["restarts"] == 1
    resp = await client.post("/v1/responses", json={"model": "m", "input": "alive again"})
    assert (await resp.json())["output_text"] == "alive again"
