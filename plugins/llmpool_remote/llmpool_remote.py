"""llmpool backend plugin ``openai_compatible``: an upstream OpenAI-compatible Chat
Completions API (aliases ``openai_remote``, ``remote``).

Nothing is loaded: a replica is an :class:`RemoteRuntime` holding the validated config
and an aiohttp ``ClientSession``, created lazily on the event loop the streams run on
(``llmpool_load`` runs on a worker thread, which has no loop of its own). Every request
calls ``POST <remote_base_url>/chat/completions`` with streaming and relays each
upstream delta at once; usage from the final chunk fills the metrics.

The API key is read from the environment variable named by ``remote_api_key_env`` at
call time. It is never logged, never put in an error message (upstream error text is
scrubbed of it) and never shown by admin (only the variable's name is config).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import random
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llmpoold import hookimpl
from llmpoold.errors import BackendError, LoadError
from llmpoold.hookspecs import BackendSpec
from llmpoold.types import (
    BackendMetrics,
    Capabilities,
    Completion,
    GenerationRequest,
    MemoryEstimate,
    ModelTraits,
    StreamItem,
    TextDelta,
)

if TYPE_CHECKING:
    import aiohttp

    from llmpoold.config import ModelConfig

BACKEND = "openai_compatible"
ALIASES = ("openai_remote", "remote")
log = structlog.get_logger("llmpool_remote")

DETAIL_LIMIT = 500
ERROR_BODY_LIMIT = 64 * 1024
MAX_BACKOFF_S = 30.0
# Top-level and per-choice keys kept in metadata.upstream_response (never content).
RESPONSE_KEYS = ("id", "object", "created", "model", "usage", "service_tier", "system_fingerprint")
CHOICE_KEYS = ("index", "finish_reason", "stop_reason")
REQUIRED = ("remote_api_kind", "remote_base_url", "remote_api_key_env", "remote_model")
FILE_MODES = ("chat_completions_inline", "files_extract")
DATA_URL = re.compile(r"data:[^;,]*;base64,(.*)", re.DOTALL)
CHAT = "chat completion"


# ----- config ------------------------------------------------------------------------


class RemoteOptions(BaseModel):
    """The backend's own model keys (see the README)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    remote_api_kind: Literal["chat_completions"]
    remote_base_url: str
    remote_api_key_env: str
    remote_model: str
    remote_timeout_s: float = Field(60.0, gt=0)
    remote_health_check: Literal["config_only", "models"] = "config_only"
    remote_max_retries: int = Field(0, ge=0, le=10)
    remote_retry_backoff_s: float = Field(0.5, ge=0, le=MAX_BACKOFF_S)
    remote_thinking: Literal["enabled", "disabled"] | None = None
    remote_prompt_cache_key_enabled: bool = False
    remote_file_mode: Literal["chat_completions_inline", "files_extract"] | None = None
    remote_file_purpose: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _required(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            data = dict(data)
            for name in REQUIRED:
                value = data.get(name)
                if value is None or (isinstance(value, str) and not value.strip()):
                    raise ValueError(f"{name} is required for {BACKEND} models")
                if isinstance(value, str):
                    data[name] = value.strip()
        return data

    @field_validator("remote_base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        value = value.rstrip("/")
        if not value.startswith(("http://", "https://")):
            raise ValueError("remote_base_url must start with http:// or https://")
        return value

    @field_validator("remote_thinking", mode="before")
    @classmethod
    def _thinking(cls, value: Any) -> Any:
        if value is not None and value not in ("enabled", "disabled"):
            raise ValueError("remote_thinking must be 'enabled', 'disabled', or omitted")
        return value

    @field_validator("remote_file_mode", mode="before")
    @classmethod
    def _file_mode(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip().lower() or None
        if value is not None and value not in FILE_MODES:
            raise ValueError("remote_file_mode must be one of 'chat_completions_inline', 'files_extract'")
        return value

    @model_validator(mode="after")
    def _file_purpose(self) -> RemoteOptions:
        if self.remote_file_mode == "files_extract" and not (self.remote_file_purpose or "").strip():
            raise ValueError("remote_file_purpose is required when remote_file_mode is 'files_extract'")
        return self


# ----- runtime -----------------------------------------------------------------------


class RemoteRuntime:
    """One replica: config plus an aiohttp session bound to the loop that uses it."""

    def __init__(self, replica_id: str, model_name: str, options: RemoteOptions) -> None:
        self.replica_id = replica_id
        self.model_name = model_name
        self.options = options
        self.closed = False
        self._lock = threading.Lock()
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._warned: set[str] = set()
        self._keepers: list[AsyncIterator[None]] = []

    # The session -----------------------------------------------------------------------

    async def session(self) -> aiohttp.ClientSession:
        """The session for the running loop, created on first use (or anew when the
        previous loop went away, as with ``asyncio.run`` per call in hook-level tests)."""
        import aiohttp

        loop = asyncio.get_running_loop()
        with self._lock:
            if self.closed:
                raise BackendError(503, "replica_unloaded", f"replica '{self.replica_id}' was unloaded")
            current = self._session
            if current is not None and self._loop is loop and not current.closed:
                return current
            if current is not None and self._loop is not None:
                _close_session(current, self._loop, wait=False)
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.options.remote_timeout_s,
                                            sock_read=self.options.remote_timeout_s)
            session = aiohttp.ClientSession(timeout=timeout, raise_for_status=False,
                                            headers={"Accept": "application/json"})
            self._session, self._loop = session, loop
        # The loop closes parked async generators when it shuts down (asyncio.run does):
        # park one that closes the session then, so no connection outlives its loop.
        keeper = _close_on_loop_shutdown(session)
        await keeper.__anext__()
        self._keepers.append(keeper)
        return session

    def close(self) -> None:
        with self._lock:
            self.closed = True
            session, loop, self._session, self._loop = self._session, self._loop, None, None
        if session is not None and loop is not None:
            _close_session(session, loop, wait=True)

    # Helpers ---------------------------------------------------------------------------

    def api_key(self) -> str:
        key = os.environ.get(self.options.remote_api_key_env, "")
        if not key:
            raise BackendError(500, "missing_api_key_env",
                               f"missing API key environment variable: {self.options.remote_api_key_env}")
        return key

    def warn_ignored(self, ignored: dict[str, Any]) -> None:
        fresh = {k: v for k, v in ignored.items() if k not in self._warned}
        if fresh:
            self._warned.update(fresh)
            log.warning("remote_unsupported_decoding", ignored=fresh, model=self.model_name)


async def _close_on_loop_shutdown(session: aiohttp.ClientSession) -> AsyncIterator[None]:
    try:
        yield
    finally:
        await session.close()


def _close_session(session: aiohttp.ClientSession, loop: asyncio.AbstractEventLoop, *, wait: bool) -> None:
    """Close ``session`` from any thread: on its own loop when that loop still runs,
    synchronously (transports only) when the loop is closed."""
    if session.closed:
        return
    if loop.is_closed() or not loop.is_running():
        connector = session.connector
        if connector is not None:
            # The loop is gone: close transports without scheduling anything on it.
            connector._close()
        return
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        loop.create_task(session.close())
        return
    future = asyncio.run_coroutine_threadsafe(session.close(), loop)
    if wait:
        try:
            future.result(timeout=10)
        except Exception as exc:  # noqa: BLE001 - unload is best effort
            log.warning("remote_session_close_failed", error=type(exc).__name__)


# ----- request mapping -----------------------------------------------------------------


def _content(content: Any, *, drop_files: bool = False) -> Any:
    if isinstance(content, str):
        return content
    return [{k: v for k, v in dict(item).items() if v is not None} for item in content
            if not (drop_files and item.get("type") == "file")]


def _file_items(request: GenerationRequest) -> list[Mapping[str, Any]]:
    return [item["file"] for m in request.messages if not isinstance(m.content, str)
            for item in m.content if item.get("type") == "file"]


def _decode_file(file: Mapping[str, Any]) -> tuple[str, bytes]:
    """(sanitized filename, bytes) of a file item; 400 ``invalid_file_input`` unless its
    ``file_data`` is a base64 data URL."""
    name = str(file.get("filename") or "file")
    match = DATA_URL.fullmatch(str(file.get("file_data") or "").strip())
    if match is None:
        raise BackendError(400, "invalid_file_input", f"file '{name}' must use a base64 data URL")
    try:
        data = base64.b64decode(re.sub(r"\s+", "", match.group(1)), validate=True)
    except (binascii.Error, ValueError):
        raise BackendError(400, "invalid_file_input", f"file '{name}' contains invalid base64 data") from None
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(name)).strip("._") or "file"
    return safe, data


async def extract_files(runtime: RemoteRuntime, request: GenerationRequest) -> tuple[str, ...]:
    """``files_extract``: upload each file item (``POST <base>/files``), read the text
    the upstream extracted (``GET <base>/files/<id>/content``), then delete it (best
    effort: a failed cleanup is only logged). Returns the texts in request order;
    nothing in the other file modes."""
    import aiohttp

    if runtime.options.remote_file_mode != "files_extract":
        return ()
    files = [_decode_file(f) for f in _file_items(request)]  # all checked before any upload
    purpose = str(runtime.options.remote_file_purpose)
    texts: list[str] = []
    for name, data in files:

        def form(name: str = name, data: bytes = data, purpose: str = purpose) -> aiohttp.FormData:
            fields = aiohttp.FormData()
            fields.add_field("purpose", purpose)
            fields.add_field("file", data, filename=name, content_type="application/octet-stream")
            return fields

        response, _ = await _open(runtime, None, request, path="/files", form=form, what="file upload")
        uploaded = await _read_whole(response, what="file upload")
        file_id = uploaded.get("id") if isinstance(uploaded, dict) else None
        if not isinstance(file_id, str) or not file_id:
            raise parse_error("returned no file id", what="file upload")
        try:
            response, _ = await _open(runtime, None, request, path=f"/files/{file_id}/content", method="GET",
                                      what="file content extraction")
            texts.append(await _read_whole(response, what="file content extraction", as_text=True))
        finally:
            try:
                deleted, _ = await _open(runtime, None, None, path=f"/files/{file_id}", method="DELETE",
                                         what="file cleanup")
                deleted.release()
            except BackendError as exc:
                log.warning("remote_file_cleanup_failed", model=runtime.model_name, file_id=file_id,
                            code=exc.code, error=exc.message)
    return tuple(texts)


def resolved_thinking(options: RemoteOptions, request: GenerationRequest) -> str | None:
    if request.reasoning_effort is not None:
        return "disabled" if request.reasoning_effort == "none" else "enabled"
    if request.thinking_mode in ("enabled", "disabled"):
        return request.thinking_mode
    return options.remote_thinking


def build_body(runtime: RemoteRuntime, request: GenerationRequest, *, stream: bool,
               file_texts: tuple[str, ...] = ()) -> dict[str, Any]:
    """The upstream Chat Completions request body for ``request``. With
    ``files_extract``, ``file_texts`` (see :func:`extract_files`) become one system
    message each, after the instructions, and the file items are dropped."""
    options, d = runtime.options, request.decoding
    drop_files = options.remote_file_mode == "files_extract"
    messages: list[dict[str, Any]] = [{"role": "system", "content": request.instructions}]
    messages += [{"role": "system", "content": text} for text in file_texts]
    messages += [{"role": m.role, "content": _content(m.content, drop_files=drop_files)} for m in request.messages]
    body: dict[str, Any] = {"model": options.remote_model, "messages": messages, "max_tokens": d.max_tokens,
                            "temperature": d.temperature, "top_p": d.top_p}
    if d.stop:
        body["stop"] = list(d.stop)
    thinking = resolved_thinking(options, request)
    if thinking is not None:
        body["thinking"] = {"type": thinking}
    if request.reasoning_effort is not None:
        body["reasoning_effort"] = request.reasoning_effort
    if options.remote_prompt_cache_key_enabled and request.prompt_cache_key:
        body["prompt_cache_key"] = request.prompt_cache_key
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    ignored = {name: value for name, value, neutral in (
        ("beam_size", d.beam_size, 1), ("top_k", d.top_k, 1), ("repetition_penalty", d.repetition_penalty, 1.0))
        if value != neutral}
    if ignored:
        runtime.warn_ignored(ignored)
    return body


# ----- errors ----------------------------------------------------------------------------


def _scrub(text: str, key: str | None) -> str:
    return text.replace(key, "[redacted]") if key else text


def error_detail(raw: str) -> str:
    """The upstream's error message: ``error.message``, else ``message`` / ``detail`` /
    ``error`` strings, else the JSON or raw body; at most 500 characters."""
    try:
        data = json.loads(raw)
    except ValueError:
        return raw.strip()[:DETAIL_LIMIT]
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"][:DETAIL_LIMIT]
        for name in ("message", "detail", "error"):
            if isinstance(data.get(name), str):
                return data[name][:DETAIL_LIMIT]
    return json.dumps(data)[:DETAIL_LIMIT]


def http_error(status: int, detail: str, *, retry_after: str | None = None, what: str = CHAT) -> BackendError:
    """The seed's mapping of an upstream HTTP error status (``what``: the operation)."""
    what = f"upstream {what}"
    if status in (401, 403):
        return BackendError(502, "upstream_authentication_failure",
                            f"{what} authentication failed with HTTP {status}: {detail}")
    if status == 429:
        return BackendError(429, "upstream_rate_limit", f"{what} was rate limited with HTTP 429: {detail}",
                            headers={"Retry-After": retry_after} if retry_after else None)
    if 400 <= status < 500:
        return BackendError(502, "upstream_invalid_request",
                            f"{what} rejected the request with HTTP {status}: {detail}")
    if status >= 500:
        return BackendError(502, "upstream_server_error", f"{what} failed with HTTP {status}: {detail}")
    return BackendError(502, "upstream_http_error", f"{what} returned HTTP {status}: {detail}")


def timeout_error(what: str = CHAT) -> BackendError:
    return BackendError(504, "upstream_timeout", f"upstream {what} timed out")


def connection_error(exc: BaseException, what: str = CHAT) -> BackendError:
    return BackendError(502, "upstream_connection_error",
                        f"upstream {what} connection failed: {type(exc).__name__}: {exc}")


def parse_error(message: str, what: str = CHAT) -> BackendError:
    return BackendError(502, "upstream_response_parse_failure", f"upstream {what} {message}")


def _retry_delay(options: RemoteOptions, attempt: int, retry_after: str | None) -> float:
    """Exponential backoff with full jitter; an upstream's numeric Retry-After is a floor."""
    base = options.remote_retry_backoff_s * (2 ** attempt)
    delay = random.uniform(base / 2, base)  # noqa: S311 - jitter, not cryptography
    if retry_after:
        try:
            delay = max(delay, float(retry_after))
        except ValueError:
            pass
    return min(delay, MAX_BACKOFF_S, options.remote_timeout_s)


async def _open(runtime: RemoteRuntime, body: dict[str, Any] | None, request: GenerationRequest | None,
                path: str = "/chat/completions", method: str = "POST", *,
                form: Callable[[], aiohttp.FormData] | None = None,
                what: str = CHAT) -> tuple[aiohttp.ClientResponse, int]:
    """Send the request (a JSON ``body``, or a multipart ``form`` built anew for each
    attempt), retrying where the upstream cannot have done the work (connection
    refused, 429, 503; always before any token). Returns the 2xx response (headers
    read, body not) and the number of retries. Errors name the operation ``what``."""
    import aiohttp

    options = runtime.options
    url = options.remote_base_url + path
    retries = 0
    while True:
        key = runtime.api_key()
        headers = {"Authorization": f"Bearer {key}"}
        retry_after: str | None = None
        try:
            payload: dict[str, Any] = {"data": form()} if form is not None else {}
            if body is not None:
                payload["json"] = body
            response = await (await runtime.session()).request(method, url, headers=headers, **payload)
        except TimeoutError:
            raise timeout_error(what) from None
        except aiohttp.ClientConnectorError as exc:
            failure: BackendError = connection_error(exc, what)
        except (aiohttp.ClientError, OSError) as exc:
            raise connection_error(exc, what) from None
        else:
            if response.status < 400:
                return response, retries
            try:
                raw = (await response.content.read(ERROR_BODY_LIMIT)).decode("utf-8", "replace")
            except TimeoutError:
                raise timeout_error(what) from None
            except (aiohttp.ClientError, OSError):
                raw = ""
            finally:
                response.release()
            retry_after = response.headers.get("Retry-After")
            failure = http_error(response.status, _scrub(error_detail(raw), key), retry_after=retry_after, what=what)
            if response.status not in (429, 503):
                raise failure
        if retries >= options.remote_max_retries or (request is not None and request.cancel.is_set()):
            raise failure
        delay = _retry_delay(options, retries, retry_after)
        log.info("remote_retry", model=runtime.model_name, attempt=retries + 1, code=failure.code,
                 delay_s=round(delay, 3))
        retries += 1
        await asyncio.sleep(delay)


# ----- responses ---------------------------------------------------------------------------


class _Relay:
    """State of one upstream response as it arrives: metadata, usage, finish reason."""

    def __init__(self) -> None:
        self.top: dict[str, Any] = {}
        self.choices: dict[int, dict[str, Any]] = {}
        self.usage: dict[str, Any] | None = None
        self.finish_reason: str | None = None
        self.content_chunks = 0

    def take(self, data: Any, *, key: str) -> list[TextDelta]:
        """Absorb one chunk (or a whole completion); return the text it carries."""
        if not isinstance(data, dict):
            raise parse_error("returned a chunk that is not a JSON object")
        if "error" in data and "choices" not in data:
            err = data["error"]
            detail = err.get("message") if isinstance(err, dict) else err
            raise BackendError(502, "upstream_server_error",
                               f"upstream chat completion failed mid-stream: {_scrub(str(detail), key)[:DETAIL_LIMIT]}")
        for name in RESPONSE_KEYS:
            if name in data and name != "usage":
                self.top[name] = data[name]
        if isinstance(data.get("usage"), dict):
            self.usage = data["usage"]
        choices = data.get("choices") or []
        if not isinstance(choices, list):
            raise parse_error("returned 'choices' that is not a list")
        out: list[TextDelta] = []
        for choice in choices:
            if not isinstance(choice, dict):
                raise parse_error("returned a choice that is not a JSON object")
            index = choice.get("index", 0)
            kept = self.choices.setdefault(index if isinstance(index, int) else 0, {})
            kept.update({k: choice[k] for k in CHOICE_KEYS if choice.get(k) is not None})
            part = choice.get("delta", choice.get("message"))
            if part is None:
                part = {}
            if not isinstance(part, dict):
                raise parse_error("returned a message that is not a JSON object")
            if isinstance(part.get("role"), str):
                kept["message"] = {"role": part["role"]}
            if choice.get("finish_reason") is not None and index in (0, None):
                self.finish_reason = str(choice["finish_reason"])
            if index not in (0, None):
                continue  # only the first choice is the answer
            reasoning = part.get("reasoning_content") or part.get("reasoning")
            if isinstance(reasoning, str) and reasoning:
                out.append(TextDelta(reasoning, channel="reasoning"))
            content = part.get("content")
            if content is not None and not isinstance(content, str):
                raise parse_error("returned message content that is not a string")
            if content:
                self.content_chunks += 1
                out.append(TextDelta(content))
        return out

    def completion(self, *, started: float, first_token: float | None, ended: float,
                   retries: int, streamed: bool) -> Completion:
        usage = self.usage or {}
        prompt = _int(usage.get("prompt_tokens"))
        output = _int(usage.get("completion_tokens"))
        total = _int(usage.get("total_tokens"))
        if output is None and total is not None and prompt is not None:
            output = total - prompt
        if output is None and streamed and self.content_chunks:
            output = self.content_chunks  # no usage sent: one content chunk per token, as servers stream
        details = usage.get("prompt_tokens_details")
        cached = _int(usage.get("cached_tokens"))
        if cached is None:
            cached = _int(usage.get("prompt_cache_hit_tokens"))
        if cached is None and isinstance(details, dict):
            cached = _int(details.get("cached_tokens"))
        wall_s = ended - started
        metrics = BackendMetrics(
            time_to_first_token_ms=round((first_token - started) * 1000, 3) if first_token is not None else None,
            generate_total_ms=round(wall_s * 1000, 3),
            decode_after_first_token_ms=round((ended - first_token) * 1000, 3) if first_token is not None else None,
            prompt_tokens=prompt, cached_prompt_tokens=cached, output_tokens=output,
            tokens_per_second=round(output / wall_s, 3) if output and wall_s > 0 else None)
        upstream = dict(self.top)
        if self.usage is not None:
            upstream["usage"] = self.usage
        upstream["choices"] = [{"index": i, **{k: v for k, v in c.items() if k != "index"}}
                               for i, c in sorted(self.choices.items())]
        metadata: dict[str, Any] = {"upstream_response": upstream}
        if retries:
            metadata["upstream_retries"] = retries
        return Completion(finish_reason=self.finish_reason, metrics=metrics, metadata=metadata)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


async def _sse_data(response: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """The ``data`` payload of each server-sent event, as the upstream sends it."""
    lines: list[str] = []
    async for raw in response.content:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if lines:
                yield "\n".join(lines)
                lines = []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if name == "data":
            lines.append(value[1:] if value.startswith(" ") else value)
    if lines:
        yield "\n".join(lines)


async def _read_json(response: aiohttp.ClientResponse, *, what: str = CHAT, as_text: bool = False) -> Any:
    """The whole body of a 2xx response, parsed as JSON (or UTF-8 text). Transport
    errors propagate: the caller maps them (see :func:`_read_whole`)."""
    raw = await response.read()
    try:
        return raw.decode("utf-8") if as_text else json.loads(raw)
    except ValueError:
        raise parse_error("returned a body that is not valid " + ("UTF-8 text" if as_text else "JSON"),
                          what=what) from None


async def _read_whole(response: aiohttp.ClientResponse, *, what: str = CHAT, as_text: bool = False) -> Any:
    """:func:`_read_json` with transport errors mapped to ``what``'s; releases the response."""
    import aiohttp

    try:
        return await _read_json(response, what=what, as_text=as_text)
    except TimeoutError:
        raise timeout_error(what) from None
    except (aiohttp.ClientError, OSError) as exc:
        raise connection_error(exc, what) from None
    finally:
        response.release()


async def remote_stream(runtime: RemoteRuntime, request: GenerationRequest) -> AsyncIterator[StreamItem]:
    """Stream one request from the upstream (the async iterator ``llmpool_stream`` returns)."""
    import aiohttp

    started = time.perf_counter()
    first_token: float | None = None
    done = False
    response: aiohttp.ClientResponse | None = None
    relay = _Relay()
    try:
        body = build_body(runtime, request, stream=True, file_texts=await extract_files(runtime, request))
        key = runtime.api_key()
        response, retries = await _open(runtime, body, request)
        try:
            if "text/event-stream" in response.headers.get("Content-Type", ""):
                finished = False
                async for data in _sse_data(response):
                    if data.strip() == "[DONE]":
                        finished = True
                        break
                    try:
                        chunk = json.loads(data)
                    except ValueError:
                        raise parse_error("sent a stream chunk that is not valid JSON") from None
                    for delta in relay.take(chunk, key=key):
                        if first_token is None:
                            first_token = time.perf_counter()
                        yield delta
                if not finished and relay.finish_reason is None:
                    raise BackendError(502, "upstream_connection_error",
                                       "upstream chat completion stream ended before it finished")
            else:  # an upstream that ignores "stream": one JSON completion
                for delta in relay.take(await _read_json(response), key=key):
                    first_token = first_token or time.perf_counter()
                    yield delta
        except TimeoutError:
            raise timeout_error() from None
        except aiohttp.ClientPayloadError:
            raise BackendError(502, "upstream_connection_error",
                               "upstream chat completion stream was cut off before it finished") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise connection_error(exc) from None
        except UnicodeDecodeError:
            raise parse_error("sent a stream that is not valid UTF-8") from None
        except ValueError:
            raise parse_error("sent a stream line that is too long") from None
        done = True
        yield relay.completion(started=started, first_token=first_token, ended=time.perf_counter(),
                               retries=retries, streamed=True)
    finally:
        if response is not None:
            if done:
                response.release()
            else:
                response.close()  # drops the connection: the upstream sees the client leave
        if not done:
            request.cancel.set()


async def remote_generate(runtime: RemoteRuntime, request: GenerationRequest) -> tuple[str, str | None, Completion]:
    """One non-streaming upstream call (the awaitable ``llmpool_generate`` returns)."""

    started = time.perf_counter()
    relay = _Relay()
    body = build_body(runtime, request, stream=False, file_texts=await extract_files(runtime, request))
    key = runtime.api_key()
    response, retries = await _open(runtime, body, request)
    data = await _read_whole(response)
    if not isinstance(data, dict):
        raise parse_error("returned a body that is not a JSON object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise parse_error("returned no choices")
    message = choices[0].get("message")
    if not isinstance(message, dict) or not isinstance(message.get("content"), str):
        raise parse_error("returned no message content string")
    deltas = relay.take(data, key=key)
    text = "".join(d.text for d in deltas if d.channel == "output").strip()
    reasoning = "".join(d.text for d in deltas if d.channel == "reasoning") or None
    completion = relay.completion(started=started, first_token=None, ended=time.perf_counter(), retries=retries,
                                  streamed=False)
    return text, reasoning, completion


# ----- health check --------------------------------------------------------------------------


def health_check(runtime: RemoteRuntime) -> None:
    """``remote_health_check: "models"``: the upstream must answer ``GET /models`` and
    list ``remote_model``. Raises LoadError. Blocking (its own short-lived loop)."""

    async def check() -> None:
        try:
            response, _ = await _open(runtime, None, None, path="/models", method="GET")
            try:
                data = await _read_json(response)
            finally:
                response.release()
        except BackendError as exc:
            raise LoadError(f"health check GET {runtime.options.remote_base_url}/models failed: "
                            f"{exc.code}: {exc.message}") from None
        finally:
            session, runtime._session = runtime._session, None
            runtime.closed = True
            if session is not None:
                await session.close()
        listed = [m.get("id") for m in data.get("data", []) if isinstance(m, dict)] if isinstance(data, dict) else []
        if runtime.options.remote_model not in listed:
            raise LoadError(f"health check: upstream {runtime.options.remote_base_url}/models does not list "
                            f"remote_model '{runtime.options.remote_model}' (listed: {listed[:20]})")

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(check())
        return
    with ThreadPoolExecutor(1) as pool:  # called on a loop thread: check on a thread of its own
        pool.submit(asyncio.run, check()).result()


# ----- hooks -------------------------------------------------------------------------------


@hookimpl
def llmpool_backends() -> list[BackendSpec]:
    # As the seed: target_inflight (the concurrent upstream calls) is the one load override.
    return [BackendSpec(name=BACKEND, aliases=ALIASES, options_model=RemoteOptions, remote=True,
                        requires_model_path=False, load_override_keys=frozenset({"target_inflight"}),
                        load_constraints={"target_inflight": {"kind": "integer", "minimum": 1, "step": 1}},
                        description="an upstream OpenAI-compatible Chat Completions API (remote execution)")]


@hookimpl
def llmpool_model_traits(backend: str, model: ModelConfig) -> ModelTraits | None:
    if backend != BACKEND:
        return None
    return ModelTraits(capabilities=Capabilities(modalities=model.modalities, multi_turn=True,
                                                 thinking_modes=("default", "enabled", "disabled"),
                                                 reasoning_efforts=model.reasoning_efforts,
                                                 file_inputs=model.options.remote_file_mode is not None),
                       concurrency=model.target_inflight)


@hookimpl
def llmpool_estimate_memory(backend: str, model: ModelConfig) -> MemoryEstimate | None:
    if backend != BACKEND:
        return None
    return MemoryEstimate(total_mib=0.0, device="cpu", source="remote_api")


@hookimpl
def llmpool_load(backend: str, replica_id: str, model: ModelConfig) -> RemoteRuntime | None:
    if backend != BACKEND:
        return None
    options: RemoteOptions = model.options
    if not os.environ.get(options.remote_api_key_env):
        raise LoadError(f"missing API key environment variable: {options.remote_api_key_env}")
    try:
        import aiohttp  # noqa: F401
    except ImportError as exc:  # pragma: no cover - aiohttp is the daemon's own dependency
        raise LoadError(f"the {BACKEND} backend needs aiohttp: {exc}") from None
    if options.remote_health_check == "models":
        health_check(RemoteRuntime(replica_id, model.name, options))
    return RemoteRuntime(replica_id, model.name, options)


@hookimpl
def llmpool_stream(backend: str, runtime: RemoteRuntime,
                   request: GenerationRequest) -> AsyncIterator[StreamItem] | None:
    if backend != BACKEND:
        return None
    return remote_stream(runtime, request)


@hookimpl
def llmpool_generate(backend: str, runtime: RemoteRuntime, request: GenerationRequest) -> Any:
    if backend != BACKEND:
        return None
    return remote_generate(runtime, request)


@hookimpl
def llmpool_unload(backend: str, runtime: RemoteRuntime) -> bool | None:
    if backend != BACKEND:
        return None
    runtime.close()
    return True
