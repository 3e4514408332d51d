"""One request to the upstream: :func:`remote_stream` (what ``llmpool_stream`` returns)
and :func:`remote_generate` (what ``llmpool_generate`` returns).

Output is relayed up to the request's ``max_tokens``, counted in relayed deltas (a
server sends at least one token per content chunk, so the count never exceeds the
tokens): an upstream that sends more than it was asked for is cut there, its
connection dropped, and the answer finishes with ``length``.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from llmpool_remote.errors import connection_error, parse_error
from llmpool_remote.files import extract_files
from llmpool_remote.relay import Relay
from llmpool_remote.request import build_body
from llmpool_remote.runtime import RemoteRuntime, log
from llmpool_remote.transport import Deadline, open_upstream, read_body, read_whole, sse_data
from llmpoold.errors import BackendError
from llmpoold.types import Completion, GenerationRequest, StreamItem

if TYPE_CHECKING:
    import aiohttp


async def remote_stream(runtime: RemoteRuntime, request: GenerationRequest) -> AsyncIterator[StreamItem]:
    """Stream one request from the upstream (the async iterator ``llmpool_stream`` returns)."""
    import aiohttp

    started = time.perf_counter()
    deadline = Deadline.start(runtime.options)
    first_token: float | None = None
    done = capped = False
    response: aiohttp.ClientResponse | None = None
    relay = Relay()
    budget = request.decoding.max_tokens
    relayed = relayed_output = 0
    try:
        body = build_body(runtime, request, stream=True, file_texts=await extract_files(runtime, request, deadline))
        key = runtime.api_key()
        response, retries = await open_upstream(runtime, body, request, deadline)
        try:
            if "text/event-stream" in response.headers.get("Content-Type", ""):
                finished = False
                async for data in sse_data(response, runtime.options.remote_max_event_bytes):
                    if data.strip() == "[DONE]":
                        finished = True
                        break
                    try:
                        chunk = json.loads(data)
                    except ValueError:
                        raise parse_error("sent a stream chunk that is not valid JSON") from None
                    for delta in relay.take(chunk, key=key):
                        if relayed >= budget:
                            capped = True
                            break
                        relayed += 1
                        relayed_output += delta.channel == "output"
                        if first_token is None:
                            first_token = time.perf_counter()
                        yield delta
                    if capped:
                        relay.finish_reason = "length"
                        relay.content_chunks = relayed_output  # the output tokens, as far as we know
                        log.warning("remote_output_capped", model=runtime.model_name, max_tokens=budget)
                        break
                if not finished and not capped and relay.finish_reason is None:
                    raise BackendError(502, "upstream_connection_error",
                                       "upstream chat completion stream ended before it finished")
            else:  # an upstream that ignores "stream": one JSON completion
                data = await read_body(response, runtime.options.remote_max_response_bytes)
                for delta in relay.take(data, key=key):
                    first_token = first_token or time.perf_counter()
                    yield delta
        except TimeoutError:
            raise deadline.timeout_error() from None
        except aiohttp.ClientPayloadError:
            raise BackendError(502, "upstream_connection_error",
                               "upstream chat completion stream was cut off before it finished") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise connection_error(exc) from None
        except UnicodeDecodeError:
            raise parse_error("sent a stream that is not valid UTF-8") from None
        done = True
        yield relay.completion(started=started, first_token=first_token, ended=time.perf_counter(),
                               retries=retries, streamed=True)
    finally:
        if response is not None:
            if done and not capped:
                response.release()
            else:
                response.close()  # drops the connection: the upstream sees the client leave
        if not done:
            request.cancel.set()


async def remote_generate(runtime: RemoteRuntime, request: GenerationRequest) -> tuple[str, str | None, Completion]:
    """One non-streaming upstream call (the awaitable ``llmpool_generate`` returns). The
    answer is bounded by ``remote_max_response_bytes``; ``max_tokens`` is the upstream's
    to honour (there is no tokenizer here to cut a whole message by tokens)."""
    started = time.perf_counter()
    deadline = Deadline.start(runtime.options)
    relay = Relay()
    body = build_body(runtime, request, stream=False, file_texts=await extract_files(runtime, request, deadline))
    key = runtime.api_key()
    response, retries = await open_upstream(runtime, body, request, deadline)
    data = await read_whole(response, runtime, deadline)
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
