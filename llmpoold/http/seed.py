"""The seed's surface: ``POST /v1/responses``, ``GET /v1/models`` and its error envelope."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import ValidationError

from llmpoold.errors import ApiError, cut
from llmpoold.http.keys import POOL
from llmpoold.http.respond import Event, Parsed, parse_body, respond
from llmpoold.inference import InferenceResult
from llmpoold.schemas import ResponseRequest
from llmpoold.types import TextDelta, ToolCallDelta


def error_response(exc: ApiError) -> web.Response:
    """The seed's envelope ``{"detail": {"code", "model", "message"}}``."""
    return web.json_response({"detail": exc.detail()}, status=exc.status, headers=exc.headers)


def validation_response(exc: ValidationError) -> web.Response:
    """FastAPI's 422 shape: ``{"detail": [{"loc", "msg", "type"}]}``; ``msg`` is pydantic's
    as FastAPI passes it on (``"Value error, messages must not be empty"``)."""
    details = [{"loc": ["body", *(cut(p) if isinstance(p, str) else p for p in err["loc"])],
                "msg": cut(str(err["msg"])), "type": err["type"]}
               for err in exc.errors(include_input=False, include_url=False)]
    return web.json_response({"detail": details}, status=422)


class SeedShape:
    """The seed's response object and its ``response.*`` stream events."""

    metrics_header = False

    def __init__(self, *, response_id: str, model: str) -> None:
        self.id = response_id
        self.model = model
        self.sent_output = False

    def json(self, result: InferenceResult) -> dict[str, Any]:
        return {
            "id": self.id, "object": "response", "model": self.model,
            "output": [{"type": "output_text", "text": result.output_text}],
            "output_text": result.output_text, "reasoning_text": result.reasoning_text,
            "metrics": result.metrics, "metadata": result.metadata,
        }

    def opening(self) -> list[Event]:
        return [("response.created", {"id": self.id, "model": self.model, "object": "response"})]

    def delta(self, delta: TextDelta | ToolCallDelta) -> list[Event]:
        if isinstance(delta, ToolCallDelta):
            return []  # the seed's surface has no tools; an upstream's unasked call is not text
        reasoning = delta.channel == "reasoning"
        self.sent_output |= not reasoning
        name = "response.reasoning_text.delta" if reasoning else "response.output_text.delta"
        return [(name, {"id": self.id, "delta": delta.text})]

    def finish(self, result: InferenceResult) -> list[Event]:
        empty: list[Event] = [] if self.sent_output else [("response.output_text.delta", {"id": self.id, "delta": ""})]
        return [*empty, ("response.metrics", {"id": self.id, "metrics": result.metrics}),
                ("response.completed", {"id": self.id, "output_text": result.output_text,
                                        "reasoning_text": result.reasoning_text, "metadata": result.metadata})]

    def failure(self, exc: ApiError) -> list[Event]:
        return [("error", {"id": self.id, "error": exc.detail(), "status": exc.status})]


def seed_request(data: Any) -> Parsed:
    body: ResponseRequest = parse_body(ResponseRequest, data)
    return body, lambda response_id: SeedShape(response_id=response_id, model=body.model)


async def responses(request: web.Request) -> web.StreamResponse:
    return await respond(request, seed_request)


async def list_models(request: web.Request) -> web.Response:
    return web.json_response({"models": request.app[POOL].loaded_names()})


def setup(app: web.Application) -> None:
    app.router.add_post("/v1/responses", responses)
    app.router.add_get("/v1/models", list_models)
