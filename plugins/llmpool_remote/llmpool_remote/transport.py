"""Talking to the upstream: send with retries (:func:`open_upstream`), read a bounded
body (:func:`read_body`, :func:`read_whole`) or a bounded event stream
(:func:`sse_data`), all within one call's :class:`Deadline`.

Limits (see :class:`~llmpool_remote.options.RemoteOptions`): a body is cut at
``remote_max_response_bytes`` and an event at ``remote_max_event_bytes`` (502
``upstream_response_too_large``); a call that outlives ``remote_total_timeout_s`` is
504 ``upstream_timeout``; a redirect is 502 ``upstream_redirect`` (never followed: a
307 would re-send the prompt, a cross-origin one to another host).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmpool_remote.errors import (
    CHAT,
    connection_error,
    error_detail,
    http_error,
    parse_error,
    redirect_error,
    scrub,
    timeout_error,
    too_large_error,
)
from llmpool_remote.options import MAX_BACKOFF_S, RemoteOptions
from llmpool_remote.runtime import RemoteRuntime, log
from llmpoold.errors import BackendError
from llmpoold.types import GenerationRequest

if TYPE_CHECKING:
    import aiohttp

ERROR_BODY_LIMIT = 64 * 1024


@dataclass(frozen=True)
class Deadline:
    """The end of one call (``time.monotonic()`` seconds): every upstream request it
    makes, retries, backoff sleeps and body reads included, ends by then."""

    at: float
    total_s: float

    @classmethod
    def start(cls, options: RemoteOptions) -> Deadline:
        return cls(time.monotonic() + options.remote_total_timeout_s, options.remote_total_timeout_s)

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def timeout_error(self, what: str = CHAT) -> BackendError:
        """The 504 for a timeout seen now: the total one once the deadline has passed
        (aiohttp's timer may fire a little late, never early), else the inactivity one."""
        return timeout_error(what, total_s=self.total_s if self.remaining() <= 0.001 else None)


def retry_delay(options: RemoteOptions, attempt: int, retry_after: str | None) -> float:
    """Exponential backoff with full jitter; an upstream's numeric Retry-After is a floor."""
    base = options.remote_retry_backoff_s * (2 ** attempt)
    delay = random.uniform(base / 2, base)  # noqa: S311 - jitter, not cryptography
    if retry_after:
        try:
            delay = max(delay, float(retry_after))
        except ValueError:
            pass
    return min(delay, MAX_BACKOFF_S, options.remote_timeout_s)


async def open_upstream(runtime: RemoteRuntime, body: dict[str, Any] | None, request: GenerationRequest | None,
                        deadline: Deadline, path: str = "/chat/completions", method: str = "POST", *,
                        form: Callable[[], aiohttp.FormData] | None = None,
                        what: str = CHAT) -> tuple[aiohttp.ClientResponse, int]:
    """Send the request (a JSON ``body``, or a multipart ``form`` built anew for each
    attempt), retrying where the upstream cannot have done the work (connection
    refused, 429, 503; always before any token) while ``deadline`` allows. Returns the
    2xx response (headers read, body not; its reads share the deadline) and the number
    of retries. Errors name the operation ``what``."""
    import aiohttp

    options = runtime.options
    url = options.remote_base_url + path
    retries = 0
    while True:
        key = runtime.api_key()
        headers = {"Authorization": f"Bearer {key}"}
        retry_after: str | None = None
        left = deadline.remaining()
        if left <= 0:
            raise deadline.timeout_error(what)
        timeout = aiohttp.ClientTimeout(total=left, sock_connect=options.remote_timeout_s,
                                        sock_read=options.remote_timeout_s)
        try:
            payload: dict[str, Any] = {"data": form()} if form is not None else {}
            if body is not None:
                payload["json"] = body
            response = await (await runtime.session()).request(method, url, headers=headers, timeout=timeout,
                                                               allow_redirects=False, **payload)
        except TimeoutError:
            raise deadline.timeout_error(what) from None
        except aiohttp.ClientConnectorError as exc:
            failure: BackendError = connection_error(exc, what)
        except (aiohttp.ClientError, OSError) as exc:
            raise connection_error(exc, what) from None
        else:
            if response.status < 300:
                return response, retries
            if response.status < 400:
                response.release()
                raise redirect_error(response.status, scrub(response.headers.get("Location", ""), key), what)
            try:
                raw = (await response.content.read(ERROR_BODY_LIMIT)).decode("utf-8", "replace")
            except TimeoutError:
                raise deadline.timeout_error(what) from None
            except (aiohttp.ClientError, OSError):
                raw = ""
            finally:
                response.release()
            retry_after = response.headers.get("Retry-After")
            failure = http_error(response.status, scrub(error_detail(raw), key), retry_after=retry_after, what=what)
            if response.status not in (429, 503):
                raise failure
        if retries >= options.remote_max_retries or (request is not None and request.cancel.is_set()):
            raise failure
        delay = retry_delay(options, retries, retry_after)
        if delay >= deadline.remaining():
            raise failure  # no time left for another attempt: the upstream's own answer is clearer
        log.info("remote_retry", model=runtime.model_name, attempt=retries + 1, code=failure.code,
                 delay_s=round(delay, 3))
        retries += 1
        await asyncio.sleep(delay)


async def read_body(response: aiohttp.ClientResponse, limit: int, *, what: str = CHAT,
                    as_text: bool = False) -> Any:
    """The whole body of a 2xx response, at most ``limit`` bytes (after decompression:
    a declared larger ``Content-Length`` is refused before reading), parsed as JSON (or
    UTF-8 text). Transport errors propagate: the caller maps them (see :func:`read_whole`)."""
    declared = response.content_length
    if declared is not None and declared > limit:
        raise too_large_error(limit, "remote_max_response_bytes", what)
    raw = bytearray()
    async for chunk in response.content.iter_any():
        raw += chunk
        if len(raw) > limit:
            raise too_large_error(limit, "remote_max_response_bytes", what)
    try:
        return raw.decode("utf-8") if as_text else json.loads(raw)
    except ValueError:
        raise parse_error("returned a body that is not valid " + ("UTF-8 text" if as_text else "JSON"),
                          what=what) from None


async def read_whole(response: aiohttp.ClientResponse, runtime: RemoteRuntime, deadline: Deadline, *,
                     what: str = CHAT, as_text: bool = False) -> Any:
    """:func:`read_body` (limit ``remote_max_response_bytes``) with transport errors
    mapped to ``what``'s; always releases (or, when cut short, closes) the response."""
    import aiohttp

    complete = False
    try:
        data = await read_body(response, runtime.options.remote_max_response_bytes, what=what, as_text=as_text)
        complete = True
        return data
    except TimeoutError:
        raise deadline.timeout_error(what) from None
    except (aiohttp.ClientError, OSError) as exc:
        raise connection_error(exc, what) from None
    finally:
        if complete:
            response.release()
        else:
            response.close()


async def sse_data(response: aiohttp.ClientResponse, max_event_bytes: int, *,
                   what: str = CHAT) -> AsyncIterator[str]:
    """The ``data`` payload of each server-sent event, as the upstream sends it. An
    event (all its lines, comments included) over ``max_event_bytes`` is 502
    ``upstream_response_too_large``, checked as bytes arrive (a line without end cannot
    grow the buffer past the limit). Lines end with LF (a CR before it is dropped)."""
    pending = b""  # the unfinished line
    size = 0  # bytes of the event so far, its finished lines only
    lines: list[str] = []
    async for chunk in response.content.iter_any():
        parts = (pending + chunk).split(b"\n")
        pending = parts.pop()
        for raw in parts:
            size += len(raw) + 1
            if size > max_event_bytes:
                raise too_large_error(max_event_bytes, "remote_max_event_bytes", what, part="a stream event")
            line = raw.decode("utf-8").removesuffix("\r")
            if not line:
                if lines:
                    yield "\n".join(lines)
                    lines = []
                size = 0
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            if name == "data":
                lines.append(value[1:] if value.startswith(" ") else value)
        if size + len(pending) > max_event_bytes:
            raise too_large_error(max_event_bytes, "remote_max_event_bytes", what, part="a stream event")
    if pending:
        line = pending.decode("utf-8").removesuffix("\r")
        name, _, value = line.partition(":")
        if name == "data":
            lines.append(value[1:] if value.startswith(" ") else value)
    if lines:
        yield "\n".join(lines)
