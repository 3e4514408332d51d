"""Structured output and function tools of the OpenAI surfaces, mapped onto what backends
get (:class:`~llmpoold.schemas.AgentFields`, :class:`~llmpoold.types.GenerationRequest`).

- ``response_format`` (Chat Completions) and ``text.format`` (Responses): ``text`` is
  free text; ``json_object`` and ``json_schema`` become the seed's ``response_format``.
- ``tools`` (function tools only), ``tool_choice`` (``auto``, ``none``, ``required`` or a
  named function that must be among the tools) in Chat Completions' nested shape
  ``{"type": "function", "function": {...}}`` whichever surface sent them.
- Tool turns: an assistant turn's ``tool_calls`` and ``tool`` results (Chat Completions),
  ``function_call`` / ``function_call_output`` items (Responses).

Malformed values are 422 ``invalid_body``, unsupported ones 400 ``unsupported_parameter``,
each with ``param`` naming the field as the client sent it. Whether the model can honour
them is admission's (400 ``response_format_unsupported`` / ``tools_unsupported``).
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import ValidationError

from llmpoold.errors import ApiError, clip, cut
from llmpoold.schemas import JsonObjectFormat, JsonSchemaFormat

MAX_TOOLS = 128
_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,128}")  # OpenAI: letters, digits, _ and -, at most 64


def unsupported(param: str, message: str) -> ApiError:
    return ApiError(400, "unsupported_parameter", message, param=param)


def malformed(param: str, message: str) -> ApiError:
    return ApiError(422, "invalid_body", f"{param}: {message}", param=param)


def _schema_format(spec: Any, param: str) -> JsonSchemaFormat:
    if not isinstance(spec, dict):
        raise malformed(param, "must be an object")
    spec = {**spec, "schema": spec.get("schema", {})}  # OpenAI: optional; an empty schema is any JSON
    try:
        return JsonSchemaFormat.model_validate({"type": "json_schema", "json_schema": spec})
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"][1:])
        raise malformed(f"{param}.{where}" if where else param, cut(str(error["msg"]))) from None


def response_format(value: Any, param: str, *, flat: bool) -> JsonSchemaFormat | JsonObjectFormat | None:
    """Chat's ``response_format`` (``flat=False``: the schema under ``json_schema``) or
    Responses' ``text.format`` (``flat=True``: ``name``/``schema`` beside ``type``)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise malformed(param, "must be an object")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return JsonObjectFormat(type="json_object")
    if kind == "json_schema":
        if flat:
            return _schema_format({k: v for k, v in value.items() if k != "type"}, param)
        return _schema_format(value.get("json_schema"), f"{param}.json_schema")
    raise unsupported(f"{param}.type", f"response format type {clip(kind)} is not supported "
                                       "(text, json_object, json_schema)")


def tools(value: Any, param: str, *, flat: bool) -> tuple[dict[str, Any], ...]:
    """Function tools in Chat Completions' shape. ``flat``: Responses' shape (``name``,
    ``parameters``... beside ``type``)."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise malformed(param, "must be a list")
    if len(value) > MAX_TOOLS:
        raise malformed(param, f"at most {MAX_TOOLS} tools are accepted")
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(value):
        where = f"{param}[{i}]"
        if not isinstance(tool, dict):
            raise malformed(where, "must be an object")
        if tool.get("type") != "function":
            raise unsupported(f"{where}.type", f"tool type {clip(tool.get('type'))} is not supported "
                                               "(only 'function' tools)")
        spec = tool if flat else tool.get("function")
        if not isinstance(spec, dict):
            raise malformed(f"{where}.function", "must be an object")
        name = spec.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise malformed(f"{where}.name" if flat else f"{where}.function.name",
                            "must be 1-128 letters, digits, '_', '-', '.' or ':'")
        function: dict[str, Any] = {"name": name}
        for key in ("description", "parameters", "strict"):
            if spec.get(key) is not None:
                function[key] = spec[key]
        if not isinstance(function.get("parameters", {}), dict):
            raise malformed(f"{where}.parameters", "must be a JSON schema object")
        out.append({"type": "function", "function": function})
    names = [t["function"]["name"] for t in out]
    if len(set(names)) != len(names):
        raise malformed(param, "tool names must be unique")
    return tuple(out)


def tool_choice(value: Any, declared: tuple[dict[str, Any], ...], param: str, *,
                flat: bool) -> str | dict[str, Any] | None:
    """``auto``/``none``/``required``, or ``{"type": "function", "function": {"name"}}``
    naming one of ``declared``; never accepted without tools."""
    if value is None:
        return None
    if not declared:
        raise malformed(param, "tool_choice needs 'tools'")
    if value in ("auto", "none", "required"):
        return str(value)
    if isinstance(value, dict) and value.get("type") == "function":
        spec = value if flat else value.get("function")
        name = spec.get("name") if isinstance(spec, dict) else None
        if name not in {t["function"]["name"] for t in declared}:
            raise malformed(param, f"names a function that is not among the tools: {clip(name)}")
        return {"type": "function", "function": {"name": name}}
    raise unsupported(param, "tool_choice must be 'auto', 'none', 'required' or a function tool")


def tool_call(call: Any, param: str, *, flat: bool) -> dict[str, Any]:
    """An assistant turn's call (``{"id", "type", "function": {"name", "arguments"}}``;
    ``flat``: a Responses ``function_call`` item, ``call_id``/``name``/``arguments``)."""
    if not isinstance(call, dict):
        raise malformed(param, "must be an object")
    spec = call if flat else call.get("function")
    call_id = call.get("call_id" if flat else "id")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise malformed(param, "a tool call needs a function 'name'")
    arguments = spec.get("arguments", "")
    if not isinstance(call_id, str) or not call_id or not isinstance(arguments, str):
        raise malformed(param, "a tool call needs an id and string 'arguments'")
    return {"id": call_id, "type": "function", "function": {"name": spec["name"], "arguments": arguments}}


def output_text(value: Any, param: str) -> str:
    """A tool result as text: a string, or text parts concatenated."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    raise malformed(param, "a tool result must be a string or text parts")
