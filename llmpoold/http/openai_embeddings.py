"""``POST /openai/v1/embeddings``: OpenAI's embeddings, for models that serve them.

Body: ``model``, ``input`` (a string, or a list of 1 to :data:`MAX_INPUTS` strings, each
non-empty and at most ``MAX_TEXT_CHARS`` characters; beyond the bounds a 422), ``encoding_format``
(``float``, the default, or ``base64``: the little-endian float32 bytes of each vector,
as OpenAI sends them and its SDKs decode by default), ``dimensions`` (accepted only
equal to the model's own: vectors are never cut) and ``user`` (ignored); llmpool's
``fairness_key``, ``queue_timeout_s`` and ``allow_remote`` as on the other surfaces.
Token-id inputs are 400 ``unsupported_parameter``. The request runs as
:class:`~llmpoold.embeddings.Embedding` (admission, fair queue, metrics); the answer is
OpenAI's list of ``embedding`` objects in input order with ``usage``, plus llmpool's
``metrics`` (also the ``X-Llmpool-Metrics`` header). A model without embeddings is 400
``embeddings_unsupported``; an input longer than the model's context is 400
``context_length_exceeded`` (``param`` ``input``), never truncated.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Annotated, Any, Literal

import numpy as np
from aiohttp import web
from pydantic import Field, ValidationError

from llmpoold.embeddings import Embedding
from llmpoold.errors import ApiError
from llmpoold.http.keys import POOL, REQUEST_ID, TENANT
from llmpoold.http.openai_requests import _Body, invalid_body
from llmpoold.http.openai_tools import unsupported
from llmpoold.http.respond import parse_body, read_json
from llmpoold.inference import record_refused_body
from llmpoold.schemas import MAX_MODEL_CHARS, MAX_TEXT_CHARS, ResponseRequest, Text

MAX_INPUTS = 256  # OpenAI takes 2048; 256 vectors of 4096 floats stay well inside a worker frame


class EmbeddingsBody(_Body):
    model: str = Field(min_length=1, max_length=MAX_MODEL_CHARS)
    input: Text | Annotated[list[Any], Field(min_length=1, max_length=MAX_INPUTS)]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(None, ge=1)
    user: str | None = Field(None, max_length=256)
    allow_remote: bool = False
    fairness_key: Any = None
    queue_timeout_s: Any = None


def embeddings_request(data: Any) -> tuple[EmbeddingsBody, ResponseRequest, tuple[str, ...]]:
    """The body, the seed request admission reads, and the inputs. Raises ApiError 400/422."""
    try:
        body: EmbeddingsBody = parse_body(EmbeddingsBody, data)
    except ValidationError as exc:
        raise invalid_body(exc) from None
    inputs = [body.input] if isinstance(body.input, str) else body.input
    if not all(isinstance(text, str) for text in inputs):
        raise unsupported("input", "input must be text: token-id arrays are not supported")
    for i, text in enumerate(inputs):
        if not text or len(text) > MAX_TEXT_CHARS:
            raise unsupported("input", f"input {i} must be a non-empty string of at most {MAX_TEXT_CHARS} characters")
    extras = {key: getattr(body, key) for key in ("fairness_key", "queue_timeout_s") if getattr(body, key) is not None}
    try:
        # admission reads model, key and timeout; input only makes the body valid (never run)
        seed = ResponseRequest.model_validate({"model": body.model, "input": inputs[0],
                                               "allow_remote": body.allow_remote, **extras})
    except ValidationError as exc:
        raise invalid_body(exc) from None
    return body, seed, tuple(inputs)


def _encode(vector: tuple[float, ...], encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return list(vector)


async def embeddings(request: web.Request) -> web.Response:
    started = time.perf_counter()
    data = await read_json(request)
    try:
        body, seed, inputs = embeddings_request(data)
    except ApiError as exc:
        record_refused_body(data, exc.code)
        raise
    run = Embedding(request.app[POOL], seed, inputs, request_id=request[REQUEST_ID], started_at=started,
                    tenant=request.get(TENANT))
    try:
        await run.start()  # records its own refusal
        result = await run.embed()
    finally:
        run.close()  # a no-op once embed() released the slot
    assert run.result is not None
    dimension = len(result.vectors[0])
    if body.dimensions is not None and body.dimensions != dimension:
        raise unsupported("dimensions", f"model '{body.model}' returns {dimension} dimensions; "
                          f"dimensions={body.dimensions} cannot be honoured (vectors are never cut)")
    tokens = run.result.metrics.get("engine_prompt_tokens") or 0
    encoding = body.encoding_format or "float"
    answer = {"object": "list", "model": body.model,
              "data": [{"object": "embedding", "index": i, "embedding": _encode(v, encoding)}
                       for i, v in enumerate(result.vectors)],
              "usage": {"prompt_tokens": tokens, "total_tokens": tokens}, "metrics": run.result.metrics}
    return web.json_response(answer, headers={"X-Llmpool-Metrics": json.dumps(run.result.metrics,
                                                                              separators=(",", ":"))})
