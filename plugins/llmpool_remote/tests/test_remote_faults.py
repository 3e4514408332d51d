"""Failures and mapping, through llmpoold, against the fake fault-injecting upstream."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from typing import Any

import llmpool_remote
import pytest
import structlog
from pydantic import ValidationError
from remote_test_support import KEY, KEY_ENV, free_port, remote_entry

from llmpoold.testing import sse_events

pytestmark = pytest.mark.timeout(60)

FAST_RETRY = {"remote_retry_backoff_s": 0.01}



def ask(stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {"model": "r", "input": "Say hello.", "allow_remote": True, "stream": stream, **extra}


@pytest.fixture
async def client(fake_upstream: Any, remote_key: str, make_remote_client: Any) -> Any:
    return await make_remote_client({"r": remote_entry(fake_upstream.base_url, "fake-model")})


async def error_of(resp: Any) -> tuple[int, dict[str, Any]]:
    return resp.status, (await resp.json())["detail"]


# ----- success path and mapping ---------------------------------------------------------


async def test_request_mapping_metrics_and_filtered_metadata(client: Any, fake_upstream: Any) -> None:
    fake_upstream.script = ["reasoning"]
    resp = await client.post("/v1/responses", json=ask(
        instructions="Be brief.",
        decoding={"temperature": 0.3, "top_p": 0.9, "max_tokens": 12, "stop": ["END"]}))
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["output_text"] == "Hello from fake" and body["reasoning_text"] == "thinking hard"
    m = body["metrics"]
    assert (m["engine_prompt_tokens"], m["engine_cached_prompt_tokens"], m["engine_output_tokens"]) == (7, 3, 3)
    assert m["engine_finish_reason"] == "stop" and m["engine_tokens_per_second"] > 0
    upstream = body["metadata"]["upstream_response"]
    assert upstream["usage"]["prompt_tokens"] == 7 and upstream["id"] == "chatcmpl-fake"
    assert upstream["choices"] == [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant"}}]
    assert "Hello" not in json.dumps(upstream) and "logprobs" not in json.dumps(upstream)

    call = fake_upstream.calls[-1]
    assert call.headers["Authorization"] == f"Bearer {KEY}"
    sent = call.body
    assert sent["model"] == "fake-model"
    assert sent["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]
    assert (sent["temperature"], sent["top_p"], sent["max_tokens"], sent["stop"]) == (0.3, 0.9, 12, ["END"])
    # A non-streaming request is one JSON call upstream (llmpool_generate), a streaming one streams.
    assert "stream" not in sent and "stream_options" not in sent
    assert "thinking" not in sent  # no remote_thinking: nothing about thinking goes upstream
    resp = await client.post("/v1/responses", json=ask(stream=True))
    assert sse_events(await resp.text())[-1][0] == "response.completed"
    sent = fake_upstream.calls[-1].body
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


async def test_stream_relays_reasoning_and_output(client: Any, fake_upstream: Any) -> None:
    fake_upstream.script = ["reasoning"]
    resp = await client.post("/v1/responses", json=ask(stream=True))
    events = sse_events(await resp.text())
    assert [n for n, _ in events] == [
        "response.created", "response.reasoning_text.delta", "response.output_text.delta",
        "response.output_text.delta", "response.output_text.delta", "response.metrics", "response.completed"]
    assert events[-2][1]["metrics"]["engine_prompt_tokens"] == 7
    assert events[-1][1]["output_text"] == "Hello from fake"


async def test_messages_pass_as_conversation(client: Any, fake_upstream: Any) -> None:
    resp = await client.post("/v1/responses", json={
        "model": "r", "allow_remote": True,
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                     {"role": "user", "content": [{"type": "text", "text": "More"}]}]})
    assert resp.status == 200
    sent = fake_upstream.calls[-1].body["messages"]
    assert sent[1:] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                        {"role": "user", "content": [{"type": "text", "text": "More"}]}]


async def test_gate_refuses_before_the_upstream_is_called(client: Any, fake_upstream: Any) -> None:
    resp = await client.post("/v1/responses", json={"model": "r", "input": "hi"})
    assert await error_of(resp) == (403, {"code": "remote_execution_disallowed", "model": "r",
                                          "message": "remote execution is not allowed for this request"})
    assert fake_upstream.calls == []


async def test_unsupported_decoding_is_ignored_and_logged_once(client: Any, fake_upstream: Any) -> None:
    with structlog.testing.capture_logs() as logs:
        for _ in range(2):
            resp = await client.post("/v1/responses", json=ask(decoding={"top_k": 5, "repetition_penalty": 1.2}))
            assert resp.status == 200
    warned = [e for e in logs if e["event"] == "remote_unsupported_decoding"]
    assert len(warned) == 1 and warned[0]["ignored"] == {"top_k": 5, "repetition_penalty": 1.2}
    assert "top_k" not in fake_upstream.calls[-1].body


# ----- error mapping ----------------------------------------------------------------------


@pytest.mark.parametrize(("status", "code"), [
    (400, "upstream_invalid_request"), (403, "upstream_authentication_failure"),
    (500, "upstream_server_error"), (503, "upstream_server_error"),
])
async def test_http_errors_map_to_502(client: Any, fake_upstream: Any, status: int, code: str) -> None:
    fake_upstream.script = [("status", status, {"error": {"message": "nope " * 200}}, {})]
    got_status, detail = await error_of(await client.post("/v1/responses", json=ask()))
    assert (got_status, detail["code"]) == (502, code)
    assert f"HTTP {status}: nope" in detail["message"] and len(detail["message"]) < 600


async def test_auth_failure_never_leaks_the_key(client: Any, fake_upstream: Any,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """The fake echoes the key back in its 401 body, as some APIs do."""
    fake_upstream.script = [("status", 401, {"error": {"message": f"Incorrect API key provided: {KEY}"}}, {})]
    caplog.set_level(logging.DEBUG)
    with structlog.testing.capture_logs() as logs:
        resp = await client.post("/v1/responses", json=ask())
        text = await resp.text()
        fake_upstream.script = [("status", 401, {"error": {"message": f"bad key {KEY}"}}, {})]
        stream_text = await (await client.post("/v1/responses", json=ask(stream=True))).text()
        admin = await (await client.get("/v1/admin/models")).text()
    assert resp.status == 502 and json.loads(text)["detail"]["code"] == "upstream_authentication_failure"
    assert "[redacted]" in text and "upstream_authentication_failure" in stream_text
    for seen in (text, stream_text, admin, caplog.text, repr(logs)):
        assert KEY not in seen
    assert KEY_ENV in admin


async def test_rate_limit_passes_retry_after(client: Any, fake_upstream: Any) -> None:
    fake_upstream.script = [("status", 429, {"error": {"message": "slow down"}}, {"Retry-After": "7"})]
    resp = await client.post("/v1/responses", json=ask())
    assert resp.status == 429 and resp.headers["Retry-After"] == "7"
    assert (await resp.json())["detail"]["code"] == "upstream_rate_limit"
    fake_upstream.script = [("status", 429, {"error": {"message": "slow down"}}, {"Retry-After": "7"})]
    # streamed: the refusal comes before the first token, so it is the HTTP answer too
    resp = await client.post("/v1/responses", json=ask(stream=True))
    assert resp.status == 429 and resp.headers["Retry-After"] == "7"
    assert resp.content_type == "application/json"
    assert (await resp.json())["detail"]["code"] == "upstream_rate_limit"


async def test_timeout_is_504(fake_upstream: Any, remote_key: str, make_remote_client: Any) -> None:
    client = await make_remote_client({"r": remote_entry(fake_upstream.base_url, "fake-model", remote_timeout_s=0.3)})
    fake_upstream.script = [("sleep", 2)]
    assert await error_of(await client.post("/v1/responses", json=ask())) == (
        504, {"code": "upstream_timeout", "model": "r", "message": "upstream chat completion timed out"})
    fake_upstream.script = [("stall", 2)]  # a stream that stalls after a token
    events = sse_events(await (await client.post("/v1/responses", json=ask(stream=True))).text())
    assert [n for n, _ in events][-2:] == ["response.output_text.delta", "error"]
    assert events[-1][1]["error"]["code"] == "upstream_timeout"


async def test_refused_connection_is_502(remote_key: str, make_remote_client: Any) -> None:
    client = await make_remote_client({"r": remote_entry(f"http://127.0.0.1:{free_port()}/v1", "m")})
    status, detail = await error_of(await client.post("/v1/responses", json=ask()))
    assert (status, detail["code"]) == (502, "upstream_connection_error")


@pytest.mark.parametrize("behaviour", ["garbage", "garbage_stream"])
async def test_unparseable_body_is_502(client: Any, fake_upstream: Any, behaviour: str) -> None:
    fake_upstream.script = [behaviour]
    if behaviour == "garbage":  # the JSON call of a non-streaming request
        status, detail = await error_of(await client.post("/v1/responses", json=ask()))
    else:  # the stream of a streaming request: refused before a token, so an HTTP error too
        status, detail = await error_of(await client.post("/v1/responses", json=ask(stream=True)))
    assert (status, detail["code"]) == (502, "upstream_response_parse_failure")


async def test_stream_cut_mid_way_ends_with_error_event(client: Any, fake_upstream: Any) -> None:
    fake_upstream.script = ["cut"]
    resp = await asyncio.wait_for(client.post("/v1/responses", json=ask(stream=True)), 10)
    events = sse_events(await asyncio.wait_for(resp.text(), 10))
    names = [n for n, _ in events]
    assert names[0] == "response.created" and "response.output_text.delta" in names and names[-1] == "error"
    assert events[-1][1]["error"]["code"] == "upstream_connection_error" and events[-1][1]["status"] == 502


async def test_error_object_mid_stream(client: Any, fake_upstream: Any) -> None:
    fake_upstream.script = ["error_chunk"]
    events = sse_events(await (await client.post("/v1/responses", json=ask(stream=True))).text())
    assert events[-1][0] == "error" and "overloaded mid-way" in events[-1][1]["error"]["message"]


async def test_missing_key_fails_the_load(fake_upstream: Any, make_remote_client: Any,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    client = await make_remote_client({"r": remote_entry(fake_upstream.base_url, "fake-model")})
    entry = (await (await client.get("/v1/admin/models")).json())["models"][0]
    assert entry["runtime_state"] == "failed"
    assert f"missing API key environment variable: {KEY_ENV}" in entry["last_error"]


# ----- retries ------------------------------------------------------------------------------


async def test_retry_succeeds_after_one_503(fake_upstream: Any, remote_key: str, make_remote_client: Any) -> None:
    client = await make_remote_client({"r": remote_entry(fake_upstream.base_url, "fake-model",
                                                         remote_max_retries=2, **FAST_RETRY)})
    fake_upstream.script = [("status", 503, {"error": "busy"}, {}), ("status", 429, {}, {"Retry-After": "0"})]
    resp = await client.post("/v1/responses", json=ask())
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["output_text"] == "Hello from fake" and body["metadata"]["upstream_retries"] == 2
    assert len(fake_upstream.calls) == 3


async def test_retries_are_bounded_and_skip_other_errors(fake_upstream: Any, remote_key: str,
                                                         make_remote_client: Any) -> None:
    client = await make_remote_client({"r": remote_entry(fake_upstream.base_url, "fake-model",
                                                         remote_max_retries=1, **FAST_RETRY)})
    fake_upstream.script = [("status", 503, {}, {})] * 3
    assert (await client.post("/v1/responses", json=ask())).status == 502
    assert len(fake_upstream.calls) == 2
    fake_upstream.script = [("status", 500, {}, {})]
    assert (await client.post("/v1/responses", json=ask())).status == 502
    assert len(fake_upstream.calls) == 3, "a 500 may have done the work: never retried"


async def test_no_retry_after_tokens(fake_upstream: Any, remote_key: str, make_remote_client: Any) -> None:
    client = await make_remote_client({"r": remote_entry(fake_upstream.base_url, "fake-model",
                                                         remote_max_retries=3, **FAST_RETRY)})
    fake_upstream.script = ["cut"]
    events = sse_events(await (await client.post("/v1/responses", json=ask(stream=True))).text())
    assert events[-1][0] == "error" and len(fake_upstream.calls) == 1


async def test_refused_connection_is_retried(remote_key: str, make_remote_client: Any) -> None:
    client = await make_remote_client({"r": remote_entry(f"http://127.0.0.1:{free_port()}/v1", "m",
                                                         remote_max_retries=2, **FAST_RETRY)})
    with structlog.testing.capture_logs() as logs:
        assert (await client.post("/v1/responses", json=ask())).status == 502
    assert [e["attempt"] for e in logs if e["event"] == "remote_retry"] == [1, 2]


# ----- health check, cancellation, config -----------------------------------------------------


async def test_health_check_lists_the_model(fake_upstream: Any, remote_key: str, make_remote_client: Any) -> None:
    client = await make_remote_client({
        "ok": remote_entry(fake_upstream.base_url, "fake-model", remote_health_check="models"),
        "absent": remote_entry(fake_upstream.base_url, "other-model", remote_health_check="models"),
    })
    entries = {m["name"]: m for m in (await (await client.get("/v1/admin/models")).json())["models"]}
    assert entries["ok"]["runtime_state"] == "loaded"
    assert entries["absent"]["runtime_state"] == "failed"
    assert "does not list remote_model 'other-model'" in entries["absent"]["last_error"]
    assert "fake-model" in entries["absent"]["last_error"]


async def test_health_check_failure_is_clear(fake_upstream: Any, remote_key: str, make_remote_client: Any) -> None:
    fake_upstream.models_status = 401
    client = await make_remote_client({"r": remote_entry(fake_upstream.base_url, "fake-model",
                                                         remote_health_check="models")})
    entry = (await (await client.get("/v1/admin/models")).json())["models"][0]
    assert entry["runtime_state"] == "failed"
    assert "health check GET" in entry["last_error"] and "upstream_authentication_failure" in entry["last_error"]
    assert KEY not in entry["last_error"]
    resp = await client.post("/v1/responses", json=ask())
    assert resp.status == 409 and (await resp.json())["detail"]["code"] == "model_failed"


async def test_client_disconnect_closes_the_upstream_connection(client: Any, fake_upstream: Any) -> None:
    fake_upstream.script = ["slow"]
    resp = await client.post("/v1/responses", json=ask(stream=True))
    while b"output_text.delta" not in await resp.content.readline():
        pass
    resp.close()
    await asyncio.wait_for(fake_upstream.disconnected.wait(), 5)
    resp = await client.post("/v1/responses", json=ask())
    assert (await resp.json())["output_text"] == "Hello from fake"


def test_options_validation() -> None:
    options = llmpool_remote.RemoteOptions
    good = {"remote_api_kind": "chat_completions", "remote_base_url": "https://api.example.com/v1/",
            "remote_api_key_env": "K", "remote_model": "m"}
    assert options.model_validate(good).remote_base_url == "https://api.example.com/v1"
    for bad, message in [
        ({**good, "remote_model": " "}, "remote_model is required for openai_compatible models"),
        ({k: v for k, v in good.items() if k != "remote_api_key_env"}, "remote_api_key_env is required"),
        ({**good, "remote_api_kind": "responses"}, "chat_completions"),
        ({**good, "remote_thinking": "maybe"}, "remote_thinking must be 'enabled', 'disabled', or omitted"),
        ({**good, "remote_timeout_s": 0}, "greater than 0"),
        ({**good, "remote_health_check": "ping"}, "config_only"),
        ({**good, "remote_max_retries": -1}, "greater than or equal to 0"),
        ({**good, "remote_base_url": "api.example.com"}, "must start with http"),
        ({**good, "remote_api_key": "sk-inline"}, "Extra inputs are not permitted"),
        ({**good, "remote_file_mode": "upload"},
         "remote_file_mode must be one of 'chat_completions_inline', 'files_extract'"),
        ({**good, "remote_file_mode": "files_extract"},
         "remote_file_purpose is required when remote_file_mode is 'files_extract'"),
    ]:
        with pytest.raises(ValidationError, match=message):
            options.model_validate(bad)


async def test_target_inflight_caps_concurrent_upstream_calls(fake_upstream: Any, remote_key: str,
                                                               make_remote_client: Any) -> None:
    client = await make_remote_client({"r": {**remote_entry(fake_upstream.base_url, "fake-model"),
                                             "target_inflight": 2}})
    fake_upstream.script = [("sleep", 0.2)] * 5
    responses = await asyncio.gather(*(client.post("/v1/responses", json=ask()) for _ in range(5)))
    assert [r.status for r in responses] == [200] * 5
    assert fake_upstream.max_active == 2


async def test_target_inflight_load_override(fake_upstream: Any, remote_key: str, make_remote_client: Any) -> None:
    """The seed's one load override for remote models: it caps the upstream calls for
    that load only; other keys are refused."""
    client = await make_remote_client({"r": remote_entry(fake_upstream.base_url, "fake-model", enabled=False)})
    resp = await client.post("/v1/admin/models/r/load", json={"remote_timeout_s": 5})
    assert (await error_of(resp))[1]["message"] == "unsupported load override for openai_compatible backend: " \
                                                   "remote_timeout_s"
    resp = await client.post("/v1/admin/models/r/load", json={"target_inflight": 3})
    entry = await resp.json()
    assert resp.status == 200, entry
    assert (entry["configured_target_inflight"], entry["effective_target_inflight"]) == (3, 3)
    assert entry["load_override"] == {"target_inflight": 3}
    assert entry["load_constraints"]["target_inflight"] == {"kind": "integer", "minimum": 1, "step": 1}
    fake_upstream.script = [("sleep", 0.2)] * 6
    responses = await asyncio.gather(*(client.post("/v1/responses", json=ask()) for _ in range(6)))
    assert [r.status for r in responses] == [200] * 6 and fake_upstream.max_active == 3
    await client.post("/v1/admin/models/r/unload")
    entry = [m for m in (await (await client.get("/v1/admin/models")).json())["models"] if m["name"] == "r"][0]
    assert (entry["configured_target_inflight"], entry["load_override"]) == (None, {})  # unset in settings


async def test_missing_key_at_call_time_is_500(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV)
    status, detail = await error_of(await client.post("/v1/responses", json=ask()))
    assert (status, detail["code"]) == (500, "missing_api_key_env") and KEY_ENV in detail["message"]


async def test_unload_closes_the_session(client: Any) -> None:
    from llmpoold.http.keys import POOL

    assert (await client.post("/v1/responses", json=ask())).status == 200
    runtime = client.app[POOL].entries["r"].replicas[0].runtime
    session = runtime._session
    assert session is not None and not session.closed
    assert (await client.post("/v1/admin/models/r/unload")).status == 200
    assert session.closed and runtime.closed


def test_thinking_and_reasoning_effort_mapping() -> None:
    import dataclasses

    from llmpoold.testing import make_request

    base = {"remote_api_kind": "chat_completions", "remote_base_url": "http://x/v1", "remote_api_key_env": "K",
            "remote_model": "m"}

    def body(options: dict[str, Any], **request: Any) -> dict[str, Any]:
        runtime = llmpool_remote.RemoteRuntime("r#1", "r", llmpool_remote.RemoteOptions.model_validate(
            {**base, **options}))
        return llmpool_remote.build_body(runtime, dataclasses.replace(make_request(), **request), stream=False)

    assert "thinking" not in body({}) and "stream" not in body({})
    assert body({"remote_thinking": "enabled"})["thinking"] == {"type": "enabled"}
    assert body({"remote_thinking": "enabled"}, thinking_mode="disabled")["thinking"] == {"type": "disabled"}
    high = body({}, reasoning_effort="high")  # no remote_thinking: the effort only, no thinking object
    assert "thinking" not in high and high["reasoning_effort"] == "high"
    high = body({"remote_thinking": "disabled"}, reasoning_effort="high")
    assert high["thinking"] == {"type": "enabled"} and high["reasoning_effort"] == "high"
    assert body({"remote_thinking": "enabled"}, reasoning_effort="none")["thinking"] == {"type": "disabled"}
    assert "prompt_cache_key" not in body({}, prompt_cache_key="k")
    assert body({"remote_prompt_cache_key_enabled": True}, prompt_cache_key="k")["prompt_cache_key"] == "k"


async def test_runs_in_a_worker_process_too(fake_upstream: Any, remote_key: str, make_remote_client: Any) -> None:
    """``isolation: process`` drives the async stream on the worker's own loop."""
    client = await make_remote_client({"r": {**remote_entry(fake_upstream.base_url, "fake-model"),
                                             "isolation": "process"}})
    resp = await client.post("/v1/responses", json=ask())
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["metrics"]["engine_prompt_tokens"] == 7
    fake_upstream.script = ["cut"]
    events = sse_events(await (await client.post("/v1/responses", json=ask(stream=True))).text())
    assert events[-1][0] == "error" and events[-1][1]["error"]["code"] == "upstream_connection_error"
    fake_upstream.script = [("status", 429, {}, {"Retry-After": "3"})]
    resp = await client.post("/v1/responses", json=ask())
    # The worker's error frame carries status and code only, not Retry-After (a core gap).
    assert resp.status == 429 and (await resp.json())["detail"]["code"] == "upstream_rate_limit"


# ----- file inputs ----------------------------------------------------------------------


def data_url(text: str) -> str:
    return "data:text/plain;base64," + base64.b64encode(text.encode()).decode()


def with_file(file_data: str, filename: str = "../Q3 report.txt") -> dict[str, Any]:
    return ask(input=None, messages=[{"role": "user", "content": [
        {"type": "text", "text": "Summarise the file."},
        {"type": "file", "file": {"filename": filename, "file_data": file_data}}]}])


async def file_client(fake_upstream: Any, make_remote_client: Any, mode: str | None) -> Any:
    keys = {} if mode is None else {"remote_file_mode": mode, "remote_file_purpose": "file-extract"}
    return await make_remote_client({"r": remote_entry(fake_upstream.base_url, "fake-model", **keys)})


async def test_files_extract_uploads_extracts_and_deletes(fake_upstream: Any, remote_key: str,
                                                          make_remote_client: Any) -> None:
    client = await file_client(fake_upstream, make_remote_client, "files_extract")
    resp = await client.post("/v1/responses", json=with_file(data_url("revenue rose 12%")))
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["output_text"] == "Hello from fake"
    [(file_id, upload)] = fake_upstream.files.items()
    assert upload["purpose"] == "file-extract" and upload["data"] == b"revenue rose 12%"
    assert upload["filename"] == "Q3_report.txt" and upload["auth"] == f"Bearer {KEY}"
    sent = fake_upstream.calls[-1].body["messages"]
    assert sent[1] == {"role": "system", "content": "extracted: revenue rose 12%"}
    assert sent[2] == {"role": "user", "content": [{"type": "text", "text": "Summarise the file."}]}
    assert fake_upstream.deleted == [file_id]


async def test_files_extract_streams_too_and_cleanup_failure_is_only_logged(
        fake_upstream: Any, remote_key: str, make_remote_client: Any) -> None:
    client = await file_client(fake_upstream, make_remote_client, "files_extract")
    fake_upstream.delete_status = 500
    with structlog.testing.capture_logs() as logs:
        resp = await client.post("/v1/responses", json={**with_file(data_url("a")), "stream": True})
        events = sse_events(await resp.text())
    assert events[-1][0] == "response.completed" and events[-1][1]["output_text"] == "Hello from fake"
    assert [e for e in logs if e["event"] == "remote_file_cleanup_failed"][0]["code"] == "upstream_server_error"


@pytest.mark.parametrize("file_data, message", [
    ("https://example.com/a.txt", "file 'bad.txt' must use a base64 data URL"),
    ("data:text/plain;base64,@@not base64@@", "file 'bad.txt' contains invalid base64 data"),
])
async def test_files_extract_refuses_a_bad_file_before_any_upload(
        fake_upstream: Any, remote_key: str, make_remote_client: Any, file_data: str, message: str) -> None:
    client = await file_client(fake_upstream, make_remote_client, "files_extract")
    resp = await client.post("/v1/responses", json=with_file(file_data, filename="bad.txt"))
    assert await error_of(resp) == (400, {"code": "invalid_file_input", "model": "r", "message": message})
    assert fake_upstream.files == {} and fake_upstream.calls == []


async def test_files_extract_upload_failure_names_the_operation(fake_upstream: Any, remote_key: str,
                                                                make_remote_client: Any) -> None:
    client = await file_client(fake_upstream, make_remote_client, "files_extract")
    fake_upstream.upload_status = 400
    resp = await client.post("/v1/responses", json=with_file(data_url("x")))
    status, detail = await error_of(resp)
    assert (status, detail["code"]) == (502, "upstream_invalid_request")
    assert detail["message"] == "upstream file upload rejected the request with HTTP 400: upload refused"
    assert fake_upstream.calls == []


async def test_chat_completions_inline_forwards_file_items(fake_upstream: Any, remote_key: str,
                                                           make_remote_client: Any) -> None:
    client = await file_client(fake_upstream, make_remote_client, "chat_completions_inline")
    resp = await client.post("/v1/responses", json=with_file(data_url("inline")))
    assert resp.status == 200, await resp.text()
    content = fake_upstream.calls[-1].body["messages"][1]["content"]
    assert content[1] == {"type": "file", "file": {"filename": "../Q3 report.txt", "file_data": data_url("inline")}}
    assert fake_upstream.files == {}


async def test_file_items_need_a_file_mode(client: Any, fake_upstream: Any) -> None:
    resp = await client.post("/v1/responses", json=with_file(data_url("x")))
    status, detail = await error_of(resp)
    assert (status, detail["code"]) == (400, "file_input_unsupported")
    assert fake_upstream.calls == []


def test_kimi_sampling_rule() -> None:
    """The seed's rule for ``kimi-`` models: temperature only when it is 0.6 with thinking
    disabled (1.0 otherwise), top_p only when it is 0.95; other models get both."""
    import dataclasses

    from llmpoold.testing import make_request
    from llmpoold.types import Decoding

    def body(model: str, temperature: float, top_p: float, **options: Any) -> dict[str, Any]:
        runtime = llmpool_remote.RemoteRuntime("r#1", "r", llmpool_remote.RemoteOptions.model_validate({
            "remote_api_kind": "chat_completions", "remote_base_url": "http://x/v1", "remote_api_key_env": "K",
            "remote_model": model, **options}))
        request = dataclasses.replace(make_request(), decoding=Decoding(temperature=temperature, top_p=top_p))
        return llmpool_remote.build_body(runtime, request, stream=False)

    sent = body("kimi-k2.6", 0.6, 0.95, remote_thinking="disabled")
    assert (sent["temperature"], sent["top_p"]) == (0.6, 0.95)
    sent = body("Kimi-K2.6", 0.1, 1.0, remote_thinking="disabled")
    assert "temperature" not in sent and "top_p" not in sent
    assert body("kimi-k2.6", 1.0, 1.0, remote_thinking="enabled")["temperature"] == 1.0
    assert "temperature" not in body("kimi-k2.6", 0.6, 1.0, remote_thinking="enabled")
    assert body("kimi-k2.6", 1.0, 1.0)["temperature"] == 1.0  # thinking unset counts as not disabled
    sent = body("fake-model", 0.1, 0.5)
    assert (sent["temperature"], sent["top_p"]) == (0.1, 0.5)


async def test_thinking_modes_only_with_remote_thinking(fake_upstream: Any, remote_key: str,
                                                        make_remote_client: Any) -> None:
    client = await make_remote_client({"r": remote_entry(fake_upstream.base_url, "fake-model"),
                                       "t": remote_entry(fake_upstream.base_url, "fake-model",
                                                         remote_thinking="Disabled")})
    resp = await client.post("/v1/responses", json=ask(thinking="enabled"))
    assert await error_of(resp) == (400, {"code": "thinking_unsupported", "model": "r",
                                          "message": "model 'r' does not support request-level thinking"})
    assert fake_upstream.calls == []
    admin = {m["name"]: m for m in (await (await client.get("/v1/admin/models")).json())["models"]}
    assert admin["r"]["capabilities"]["thinking_modes"] == ["default"]
    assert admin["t"]["capabilities"]["thinking_modes"] == ["default", "enabled", "disabled"]
    resp = await client.post("/v1/responses", json={**ask(thinking="enabled"), "model": "t"})
    assert resp.status == 200, await resp.text()
    assert fake_upstream.calls[-1].body["thinking"] == {"type": "enabled"}
    resp = await client.post("/v1/responses", json={**ask(), "model": "t"})
    assert fake_upstream.calls[-1].body["thinking"] == {"type": "disabled"}


async def test_response_format_is_relayed_upstream(client: Any, fake_upstream: Any) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": True}}
    resp = await client.post("/v1/responses", json=ask(response_format=fmt))
    assert resp.status == 200, await resp.text()
    assert fake_upstream.calls[-1].body["response_format"] == fmt
    resp = await client.post("/v1/responses", json=ask())
    assert "response_format" not in fake_upstream.calls[-1].body
    resp = await client.post("/v1/responses", json=ask(thinking_token_budget=10, thinking="enabled"))
    assert (await error_of(resp))[1]["code"] == "thinking_unsupported"
    resp = await client.post("/v1/responses", json=ask(thinking_token_budget=10))
    assert (await error_of(resp))[1]["code"] == "thinking_token_budget_unsupported"
