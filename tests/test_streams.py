"""Streams and workers that cannot wedge a slot (issue 18): a stalled SSE reader, frames
that cannot be encoded, malformed worker frames, the worker environment, retries of a
replica that gave up.

The echo test backend is a fake runtime (named so); ``echo_repeat`` makes it produce
many large deltas, the fault a reader that stops reading needs.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
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


# ----- frames that cannot be sent, frames that are malformed ------------------------------


def echo_replica(**policy: Any) -> Any:
    """A process replica of the echo backend, built the way the pool builds one."""
    import echo_backend

    from llmpoold.config import WorkerSettings, resolve_model_options
    from llmpoold.replicas.factory import ProcessReplicaFactory
    from llmpoold.testing import make_registry, settings_from

    model = settings_from({"engine": {"backend": "echo", "models": {"e": {}}}}).engine.models["e"]
    model = resolve_model_options(model, echo_backend.EchoOptions, backend="echo", requires_model_path=False)
    factory = ProcessReplicaFactory(WorkerSettings(**policy), plugin_modules=("echo_backend",))
    return factory(registry=make_registry(echo_backend), backend="echo", replica_id="e#1", model=model,
                   concurrency=1, isolation="process")


async def collect_text(replica: Any, text: str) -> str:
    from llmpoold.testing import make_request
    from llmpoold.types import TextDelta

    out = []
    async for item in replica.stream(make_request(model="e", replica_id="e#1", text=text)):
        if isinstance(item, TextDelta):
            out.append(item.text)
    return "".join(out)


def test_frames_refuse_what_the_other_side_could_not_read() -> None:
    from llmpoold.replicas.wire import FrameError, decode_payload, encode_frame, error_to_wire, reply_from_wire

    with pytest.raises(FrameError, match="lone surrogate U[+]D800"):
        encode_frame({"id": 1, "text": "\ud800 hi"})
    # An error quoting bad input still goes out (the surrogate replaced).
    frame = encode_frame({"id": 1, **error_to_wire(ValueError("bad \ud800 input"))})
    assert decode_payload(frame[4:])["message"] == "bad ? input"
    for payload in (b"[1]", b"{nope", b"\xff\xfe", b'"x"'):
        with pytest.raises(FrameError):
            decode_payload(payload)
    for reply in ({"t": "delta"}, {"id": 1}, {"id": True, "t": "end"}, {"id": 2, "t": "bogus"},
                  {"id": 3, "t": "delta", "text": 5, "channel": "output"},
                  {"id": 3, "t": "delta", "text": "x", "channel": "elsewhere"},
                  {"id": 4, "t": "completion", "finish_reason": "stop", "metrics": {"nope": 1}, "metadata": {}},
                  {"id": 5, "t": "error", "kind": "api", "status": "five hundred"}):
        with pytest.raises(FrameError):
            reply_from_wire(reply)
    assert reply_from_wire({"id": 6, "t": "end"}) == (6, "end", None)


async def test_a_request_the_worker_frame_cannot_carry_fails_alone_without_a_hang() -> None:
    """A lone surrogate (the door refuses it; this is the defence behind it) is refused
    before the frame is written: a 400 for that request at once, no cancel wait for an
    end the worker would never send, and the worker goes on serving."""
    from llmpoold.errors import ApiError

    replica = echo_replica()
    await replica.load()
    try:
        pid = replica.pid
        started = time.monotonic()
        with pytest.raises(ApiError) as caught:
            await collect_text(replica, "\ud800 hi")
        assert time.monotonic() - started < 2
        assert (caught.value.status, caught.value.code) == (400, "invalid_json")
        assert "lone surrogate U+D800" in str(caught.value.message)
        assert await collect_text(replica, "still fine") == "still fine"
        assert replica.pid == pid and replica.state == "ready"
    finally:
        await replica.unload()


@pytest.mark.parametrize("payload", ['[1]', '{"t": "delta"}', '{nope', '{"id": 1, "t": "bogus"}'])
async def test_a_malformed_frame_is_a_crash_of_that_worker(make_client: Any, payload: str) -> None:
    from test_isolation import factory, replica_info

    client = await make_client({"engine": {"backend": "echo", "models": {
        "m": {"echo_raw_frame": payload, "echo_delay_s": 0.05}}}}, replica_factory=factory())
    old_pid = (await replica_info(client, "m"))["replica_info"][0]["pid"]
    started = time.monotonic()
    resp = await client.post("/v1/responses", json={"model": "m", "input": "please inject a bad frame"})
    assert time.monotonic() - started < 3
    assert resp.status == 502, await resp.text()
    detail = (await resp.json())["detail"]
    assert detail["code"] == "replica_crashed" and "malformed frame" in detail["message"]
    # Restarted like a crashed worker: the next request is served by a new process.
    resp = await client.post("/v1/responses", json={"model": "m", "input": "back again"})
    assert resp.status == 200 and (await resp.json())["output_text"] == "back again"
    info = (await replica_info(client, "m"))["replica_info"][0]
    assert info["pid"] != old_pid and info["restarts"] == 1
    assert "malformed frame" in (await replica_info(client, "m"))["last_error"]


# ----- what a worker can see ---------------------------------------------------------------


def proc_environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as fh:
        items = [entry.split(b"=", 1) for entry in fh.read().split(b"\0") if b"=" in entry]
    return {k.decode(): v.decode() for k, v in items}


async def test_a_worker_sees_an_allowlisted_environment(make_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon's default factory, as ``llmpoold`` builds it: a worker gets the runtime
    variables and the configured pass-through names, never the key variables (even one
    whose name a runtime prefix would let through) nor anything else."""
    env = {"LLMPOOL_TEST_API_KEY": "k-inference", "GGML_TEST_ADMIN": "k-admin",  # keys the settings name
           "HF_TOKEN": "hf-secret", "UNRELATED_SECRET_THING": "nope",  # not allowlisted
           "OMP_NUM_THREADS": "1", "HF_HOME": "/tmp/hf-home", "CUDA_VISIBLE_DEVICES": "",  # runtime variables
           "LC_ALL": "C.UTF-8", "MY_RUNTIME_FLAG": "on", "ACME_A": "a", "ACME_B": "b",  # passed through
           "LLMPOOL_WORKER_PLUGINS": "echo_backend"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    client = await make_client({
        "service": {"api_key_envs": ["LLMPOOL_TEST_API_KEY"], "admin_api_key_env": "GGML_TEST_ADMIN"},
        "engine": {"backend": "echo", "workers": {"env_passthrough": ["MY_RUNTIME_FLAG", "ACME_*"]},
                   "models": {"m": {"isolation": "process"}}}})
    entry = client.app[POOL].entry("m")
    assert entry.state == "loaded", entry.last_error
    seen = proc_environ(entry.replicas[0].pid)
    for name in ("LLMPOOL_TEST_API_KEY", "GGML_TEST_ADMIN", "HF_TOKEN", "UNRELATED_SECRET_THING",
                 "LLMPOOL_WORKER_PLUGINS"):
        assert name not in seen, name
    assert "k-inference" not in str(seen) and "k-admin" not in str(seen)
    for name in ("OMP_NUM_THREADS", "HF_HOME", "CUDA_VISIBLE_DEVICES", "LC_ALL", "MY_RUNTIME_FLAG", "ACME_A",
                 "ACME_B", "PATH", "HOME"):
        assert seen[name] == os.environ[name], name


def test_env_passthrough_names_are_validated() -> None:
    from llmpoold.config import SettingsError
    from llmpoold.testing import settings_from

    for bad in ("1ABC", "A-B", "A B", "*", "A*B", ""):
        with pytest.raises(SettingsError, match="env_passthrough"):
            settings_from({"engine": {"workers": {"env_passthrough": [bad]}}})
    for bad_retry in (-1, "inf"):
        with pytest.raises(SettingsError, match="gave_up_retry_s"):
            settings_from({"engine": {"workers": {"gave_up_retry_s": bad_retry}}})
    workers = settings_from({"engine": {"workers": {"env_passthrough": ["A_1", "_B*"]}}}).engine.workers
    assert workers.env_passthrough == ("A_1", "_B*") and workers.gave_up_retry_s == 300


# ----- a replica that gave up is tried again ---------------------------------------------


async def _kill_until_gave_up(client: Any, model: str, index: int) -> int:
    """SIGKILL replica ``index`` of ``model`` until its restart budget (1) is spent;
    returns the last pid killed."""
    from test_isolation import replica_info, wait_for

    async def ready_pid() -> Any:
        info = (await replica_info(client, model))["replica_info"]
        return len(info) > index and info[index]["state"] == "ready" and info[index]["pid"]

    first = await ready_pid()
    os.kill(first, signal.SIGKILL)

    async def restarted() -> bool:
        pid = await ready_pid()
        return bool(pid) and pid != first

    await wait_for(restarted)
    second = await ready_pid()
    os.kill(second, signal.SIGKILL)
    return int(second)


async def test_a_model_whose_replicas_all_gave_up_is_loaded_again_after_the_retry_delay(make_client: Any) -> None:
    from test_isolation import factory, replica_info, wait_for, worker_pids

    client = await make_client({"engine": {"backend": "echo", "workers": {"restart_max": 1, "gave_up_retry_s": 1},
                                           "models": {"m": {}}}},
                               replica_factory=factory(restart_max=1, gave_up_retry_s=1))
    last = await _kill_until_gave_up(client, "m", 0)

    async def state_is(state: str) -> bool:
        return (await replica_info(client, "m"))["runtime_state"] == state

    await wait_for(lambda: state_is("failed"))
    assert "restart limit" in (await replica_info(client, "m"))["last_error"]
    await wait_for(lambda: state_is("loaded"), timeout=20)
    resp = await client.post("/v1/responses", json={"model": "m", "input": "back"})
    assert resp.status == 200 and (await resp.json())["output_text"] == "back"
    pids = worker_pids(os.getpid())
    assert len(pids) == 1 and last not in pids


async def test_a_replica_that_gave_up_beside_a_serving_one_is_retried(make_client: Any) -> None:
    from test_isolation import factory, replica_info, wait_for

    client = await make_client({"engine": {"backend": "echo", "models": {"m": {"replicas": 2, "replica_max": 2}}}},
                               replica_factory=factory(restart_max=1, gave_up_retry_s=1))
    entry = client.app[POOL].entry("m")
    last = await _kill_until_gave_up(client, "m", 0)
    await wait_for(lambda: _async(entry.replicas[0].gave_up))
    assert (await replica_info(client, "m"))["runtime_state"] == "loaded"  # the other one serves

    async def back() -> bool:
        info = (await replica_info(client, "m"))["replica_info"][0]
        return info["state"] == "ready" and info["pid"] != last

    await wait_for(back, timeout=20)
    assert not entry.replicas[0].gave_up
    for _ in range(3):  # both replicas serve again
        resp = await client.post("/v1/responses", json={"model": "m", "input": "hi"})
        assert resp.status == 200


async def _async(value: Any) -> Any:
    return value


async def test_a_lone_surrogate_over_http_is_a_400_not_a_500(make_client: Any) -> None:
    from test_isolation import factory, sse_events

    client = await make_client({"engine": {"backend": "echo", "models": {"m": {}}}}, replica_factory=factory())
    started = time.monotonic()
    resp = await client.post("/v1/responses", json={"model": "m", "input": "\ud800 hi"})
    assert resp.status == 400, await resp.text()
    assert (await resp.json())["detail"]["code"] == "invalid_json"
    # Streaming: refused at the door (400) where the door checks text, else by the
    # replica once the SSE headers are out (an error event), never a 500 or a hang.
    resp = await client.post("/v1/responses", json={"model": "m", "input": "\ud800 hi", "stream": True})
    if resp.status == 200:
        events = await sse_events(resp)
        assert events[-1][0] == "error" and events[-1][1]["status"] == 400
        assert events[-1][1]["error"]["code"] == "invalid_json"
    else:
        assert resp.status == 400 and (await resp.json())["detail"]["code"] == "invalid_json"
    assert time.monotonic() - started < 3
    resp = await client.post("/v1/responses", json={"model": "m", "input": "fine"})
    assert resp.status == 200 and (await resp.json())["output_text"] == "fine"


async def test_a_streamed_client_gone_before_the_first_token_cancels_its_request(tmp_path: Any) -> None:
    """The SSE headers wait for the first token (a refusal before it is an HTTP error);
    a client that leaves during that wait must still stop its generation (the real
    daemon cancels the handler of a closed connection), not hold the slot to the end."""
    import sys
    from pathlib import Path

    import aiohttp

    sys.path.insert(0, str(Path(__file__).parent))
    from daemon_proc import running_daemon

    words = " ".join(f"w{i}" for i in range(20))  # 3 s a word: the first comes 2.6 s after the client left
    settings = {"engine": {"backend": "echo", "models": {"slow": {"echo_delay_s": 3.0}}}}
    with running_daemon(tmp_path, settings) as daemon:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(asyncio.TimeoutError):
                await session.post(f"{daemon.url}/v1/responses", json={"model": "slow", "input": words, "stream": True},
                                   timeout=aiohttp.ClientTimeout(total=0.4))
            left = time.monotonic()
            inflight = -1
            while time.monotonic() - left < 10:
                async with session.get(f"{daemon.url}/v1/admin/models") as resp:
                    models = (await resp.json())["models"]
                inflight = next(m for m in models if m["name"] == "slow")["inflight_requests"]
                if inflight == 0:
                    break
                await asyncio.sleep(0.1)
            assert inflight == 0, "the request still runs after its client left"
            assert time.monotonic() - left < 1.5  # at once, not when the first token finds the socket closed
    assert "client_disconnected" in daemon.log.read_text()
