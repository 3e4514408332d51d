"""Function tools on GGUF models: prompts that tell the model about the tools, grammars
that force a call, and the generated text turned into :class:`~llmpoold.types.ToolCallDelta`
items.

``tool_choice``:

- **a named function**: a llama.cpp grammar over that function's ``parameters`` schema;
  the whole output is the call's arguments (a JSON object), streamed as ``arguments``
  pieces as they are sampled. Works on any model.
- **``required``**: a grammar whose alternatives are, per tool,
  ``{"name": "<name>", "arguments": <that tool's parameters>}``; the name is read as soon
  as it is complete, then the arguments stream. One call per response (``parallel_tool_calls``
  is honoured by making one).
- **``auto``** (also ``tools`` without ``tool_choice``): only where the prompt is the
  model's own chat template (``chat_template``, or ``gemma4_template`` with an embedded
  template) and that template (or the GGUF's ``tool_use`` one) renders ``tools`` and the
  Hermes / Qwen call format (it mentions ``<tool_call>``). The model then writes free
  text and calls as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
  (:class:`~llmpool_gguf.toolcalls.HermesCalls` parses them; other formats are not
  recognised, so admission refuses ``auto`` there). With ``parallel_tool_calls: false``
  only the first call is kept.
- **``none``**: the tools are not offered; plain text.

The tools reach the model through the template when it renders ``tools`` (its Jinja
source mentions them; a GGUF's ``tokenizer.chat_template.tool_use`` template, as Hermes
2 Pro / Hermes 3 carry, is used for every request with tools or tool turns), with tool
turns as the template wants them (assistant ``tool_calls`` with arguments as objects,
``tool`` turns with ``tool_call_id`` and ``name``). Otherwise (llmpool's own prompt
formats, templates without tools) the tool list is a short text appended to the
instructions (:func:`tools_text`) and tool turns become plain text turns
(:func:`plain_turns`): an assistant call is the JSON object ``{"name": ..., "arguments":
...}`` it made, a result is a user turn ``Function <name> returned:\\n<result>``. Either
way the client's words stay text (never special tokens): in the plain text path they are
text segments; through a template, names, descriptions, schemas and arguments holding
special tokens of the vocabulary are refused with 400 (the template renders them into
its markup).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

from llmpool_gguf.memory import read_gguf_metadata
from llmpool_gguf.toolcalls import CALL_OPEN, HermesCalls, NamedCall, OutputStream, RequiredCall, call_prefix
from llmpoold.errors import BackendError, clip
from llmpoold.prompts import chat_messages, content_text, prompt_format
from llmpoold.types import GenerationRequest, Message

_EMPTY_PARAMETERS = {"type": "object", "properties": {}}
CHAT_TEMPLATE = "tokenizer.chat_template"
# A GGUF may carry a second template for requests with tools (llama.cpp's converter writes
# a Hugging Face tokenizer's named templates as ``tokenizer.chat_template.<name>``; Hermes
# 2 Pro / Hermes 3 name theirs ``tool_use``): used for every request with tools or tool turns.
TOOL_USE_TEMPLATE = "tokenizer.chat_template.tool_use"


# ----- what the model's template can do ------------------------------------------------


def template_renders_tools(template: str | None) -> bool:
    """Whether a chat template's Jinja source takes ``tools`` (so the tool list and tool
    turns go through it)."""
    return bool(template) and "tools" in str(template)


def template_calls_hermes(template: str | None) -> bool:
    """Whether the template renders tools and the Hermes / Qwen call format, the one
    :class:`HermesCalls` parses (what ``tool_choice: "auto"`` needs)."""
    return template_renders_tools(template) and CALL_OPEN in str(template)


def embedded_template_in_use(format_name: str, template: str | None) -> bool:
    """Whether prompts of this format are rendered by the GGUF's embedded template
    (as :func:`llmpool_gguf.prompt.prompt_segments` decides)."""
    return prompt_format(format_name).runtime_template or (format_name == "gemma4_template" and bool(template))


def header_templates(path: str | None) -> tuple[str | None, str | None]:
    """The chat template and the ``tool_use`` one (:data:`TOOL_USE_TEMPLATE`) from a GGUF
    header, without loading the model (cached per file version; None where absent, and
    for a missing or unreadable file)."""
    if not path:
        return None, None
    path = os.path.expanduser(path)
    try:
        stat = os.stat(path)
    except OSError:
        return None, None
    return _header_templates(path, stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=64)
def _header_templates(path: str, mtime_ns: int, size: int) -> tuple[str | None, str | None]:
    try:
        meta, _ = read_gguf_metadata(path)
    except Exception:  # noqa: BLE001 - a header that does not parse has no template to read
        return None, None
    default, tool_use = meta.get(CHAT_TEMPLATE), meta.get(TOOL_USE_TEMPLATE)
    return (default if isinstance(default, str) else None), (tool_use if isinstance(tool_use, str) else None)


def auto_supported(format_name: str, template: str | None, tool_template: str | None = None) -> bool:
    """``tool_choice: "auto"`` works: the embedded template renders the prompt and (its
    ``tool_use`` variant where the GGUF has one) speaks Hermes."""
    return embedded_template_in_use(format_name, template) and template_calls_hermes(tool_template or template)


# ----- grammars --------------------------------------------------------------------------


def _function(tool: Mapping[str, Any]) -> Mapping[str, Any]:
    return tool.get("function") or {}


def _parameters(tool: Mapping[str, Any]) -> dict[str, Any]:
    params = _function(tool).get("parameters")
    return json.loads(json.dumps(params)) if params else dict(_EMPTY_PARAMETERS)  # a copy: refs are rewritten


def tool_grammar(tools: Sequence[Mapping[str, Any]], choice: str | Mapping[str, Any] | None,
                 model: str) -> str | None:
    """The GBNF (root rule ``root``) forcing a call: a named function's arguments, or for
    ``required`` one of ``{"name": ..., "arguments": ...}`` per tool; None otherwise.
    Built with llama.cpp's JSON-schema converter, one rule set per tool in one grammar.
    Raises a 400 ``invalid_tools`` for a schema the converter cannot express."""
    named = named_function(choice)
    if named is None and choice != "required":
        return None
    from llama_cpp.llama_grammar import SchemaConverter

    converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    alternatives = []
    for i, tool in enumerate(tools):
        name = _function(tool).get("name")
        if named is not None and name != named:
            continue
        try:
            schema = converter.resolve_refs(_parameters(tool), f"tool{i}")
            rule = converter.visit(schema, f"tool{i}")
        except Exception as exc:  # noqa: BLE001 - the converter raises bare Exception/ValueError/KeyError/AssertionError
            raise BackendError(400, "invalid_tools", f"model '{model}' cannot enforce the parameters schema of "
                               f"tool {clip(name)}: {clip(str(exc))}", model=model, param="tools") from None
        alternatives.append(rule if named is not None else f"{json.dumps(call_prefix(str(name)))} {rule} \"}}\"")
    if not alternatives:  # the door checks that a named function is among the tools
        raise BackendError(400, "invalid_tools", f"tool_choice names no tool of the request: {clip(named)}",
                           model=model, param="tool_choice")
    return converter.format_grammar() + "\nroot ::= " + " | ".join(alternatives)


def named_function(choice: str | Mapping[str, Any] | None) -> str | None:
    if isinstance(choice, Mapping):
        return str((choice.get("function") or {}).get("name"))
    return None


# ----- prompts ---------------------------------------------------------------------------


def tools_text(tools: Sequence[Mapping[str, Any]], choice: str | Mapping[str, Any] | None) -> str:
    """The tool list as instructions, for prompts that do not render ``tools`` themselves."""
    lines = ["You can call these functions. Each is given as its name, what it does, and the JSON schema of "
             "its arguments:"]
    for tool in tools:
        function = _function(tool)
        description = str(function.get("description") or "").strip()
        lines.append(f"- {function.get('name')}: {description + ' ' if description else ''}"
                     f"Arguments: {json.dumps(_parameters(tool), ensure_ascii=False)}")
    named = named_function(choice)
    if named is not None:
        lines.append(f"Call the function {named} now: answer with its arguments as one JSON object, nothing else.")
    elif choice == "required":
        lines.append('Call one of these functions now: answer with one JSON object {"name": <the function name>, '
                     '"arguments": <its arguments>}, nothing else.')
    return "\n".join(lines)


def _arguments(text: str) -> Any:
    """A call's arguments as an object where they parse (templates ``tojson`` them),
    else the string as sent."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _call_names(messages: Sequence[Message]) -> dict[str, str]:
    return {str(c.get("id")): str((c.get("function") or {}).get("name", ""))
            for m in messages for c in m.tool_calls}


def plain_turns(messages: Sequence[Message]) -> tuple[Message, ...]:
    """Tool turns as plain text turns: an assistant's calls as the JSON objects it made
    (after its text, one a line), a tool result as a user turn naming the function."""
    names = _call_names(messages)
    out = []
    for m in messages:
        if m.role == "tool":
            name = names.get(str(m.tool_call_id), "")
            head = f"Function {name} returned:" if name else "A function returned:"
            out.append(Message("user", f"{head}\n{content_text(m.content)}"))
        elif m.tool_calls:
            calls = [json.dumps({"name": (c.get("function") or {}).get("name"),
                                 "arguments": _arguments(str((c.get("function") or {}).get("arguments", "")))},
                                ensure_ascii=False) for c in m.tool_calls]
            text = content_text(m.content)
            out.append(Message("assistant", "\n".join([text, *calls] if text else calls)))
        else:
            out.append(m)
    return tuple(out)


def template_messages(request: GenerationRequest) -> tuple[dict[str, Any], ...]:
    """The conversation for a template that renders tools: :func:`llmpoold.prompts.chat_messages`'
    turns plus the assistant's ``tool_calls`` (arguments as objects) and a ``tool`` turn's
    ``tool_call_id`` and function ``name``."""
    names = _call_names(request.messages)
    turns = list(chat_messages(request))
    offset = len(turns) - len(request.messages)
    for i, m in enumerate(request.messages):
        turn: dict[str, Any] = dict(turns[offset + i])
        if m.tool_calls:
            turn["tool_calls"] = [{"id": c.get("id"), "type": "function", "function": {
                "name": (c.get("function") or {}).get("name"),
                "arguments": _arguments(str((c.get("function") or {}).get("arguments", "")))}} for c in m.tool_calls]
        if m.role == "tool":
            turn["tool_call_id"] = m.tool_call_id
            turn["name"] = names.get(str(m.tool_call_id), "")
        turns[offset + i] = turn
    return tuple(turns)


def template_words(tools: Sequence[Mapping[str, Any]], messages: Sequence[Message]) -> list[str]:
    """The client's words a template renders into its markup: tool names, descriptions,
    schemas, and the calls' names and arguments (checked for special tokens)."""
    words = [json.dumps(dict(tool), ensure_ascii=False) for tool in tools]
    for m in messages:
        words += [json.dumps(dict(call), ensure_ascii=False) for call in m.tool_calls]
    return words


# ----- the plan for one request ------------------------------------------------------------


@dataclass(frozen=True)
class ToolPlan:
    """How one request's tools are rendered and read back.

    ``request``: the request to render (plain-text tool turns and tool list folded into
    it where the template does not render them). ``template_tools`` / ``template_messages``:
    what the embedded template gets (None: the rendered prompt's own), ``template_source``
    the template to render them with (None: the default one). ``grammar``: forces
    the call. ``output``: makes the output stream (text deltas in, deltas and calls out)."""

    request: GenerationRequest
    grammar: str | None = None
    template_tools: list[dict[str, Any]] | None = None
    template_messages: tuple[dict[str, Any], ...] | None = None
    template_source: str | None = None  # the ``tool_use`` template to render instead of the default one
    output: Callable[[], OutputStream] = OutputStream


def uses_tools(request: GenerationRequest) -> bool:
    return bool(request.tools) or any(m.role == "tool" or m.tool_calls for m in request.messages)


def plan_for(runtime: Any, request: GenerationRequest) -> ToolPlan:
    """:func:`plan` on a loaded runtime (its embedded template, its vocabulary)."""
    if not uses_tools(request):
        return ToolPlan(request)
    engine = runtime.engine

    def is_special(text: str) -> bool:
        data = text.encode("utf-8")
        return engine.tokenize(data, special=True) != engine.tokenize(data, special=False)

    return plan(request, engine.metadata(CHAT_TEMPLATE), tool_template=engine.metadata(TOOL_USE_TEMPLATE),
                is_special=is_special)


def plan(request: GenerationRequest, template: str | None, *, tool_template: str | None = None,
         is_special: Callable[[str], bool] = lambda text: False) -> ToolPlan:
    """The :class:`ToolPlan` for ``request`` on a model whose embedded chat template is
    ``template`` (and ``tool_template`` its ``tool_use`` one, if any). ``is_special(text)``:
    whether ``text`` holds a special token of the vocabulary.
    Raises a 400 ``tools_unsupported`` for ``auto`` where it cannot work (admission
    refuses it first; this guards requests made elsewhere)."""
    if not uses_tools(request):
        return ToolPlan(request)
    choice = request.tool_choice if request.tools else "none"
    choice = "auto" if choice is None else choice
    offered = list(request.tools) if choice != "none" else []
    if choice == "auto" and not auto_supported(request.prompt_format, template, tool_template):
        raise BackendError(400, "tools_unsupported", auto_refusal(request.model), model=request.model,
                           param="tool_choice")
    grammar = tool_grammar(offered, choice, request.model)
    output = _output_for(offered, choice, request.parallel_tool_calls)
    templated = embedded_template_in_use(request.prompt_format, template)
    if templated and template_renders_tools(tool_template or template):
        for word in template_words(offered, request.messages):
            if is_special(word):
                raise BackendError(400, "invalid_request", "the tools or tool calls contain special tokens of the "
                                   "model, which its chat template would render as markup; remove them",
                                   model=request.model, param="tools")
        return ToolPlan(request, grammar, template_tools=[dict(t) for t in offered] or None,
                        template_messages=template_messages(request), template_source=tool_template, output=output)
    instructions = request.instructions
    if offered:
        instructions = "\n\n".join(part for part in (instructions, tools_text(offered, choice)) if part)
    rewritten = replace(request, instructions=instructions, messages=plain_turns(request.messages))
    return ToolPlan(rewritten, grammar, output=output)


def auto_refusal(model: str) -> str:
    return (f"model '{model}' cannot choose tools itself (tool_choice 'auto'): its prompt is not a chat template "
            "that renders tools in a call format llmpool parses (Hermes <tool_call>); tool_choice 'required' "
            "or a named function works on this model")


def _output_for(offered: list[Mapping[str, Any]], choice: Any,
                parallel: bool | None) -> Callable[[], OutputStream]:
    named = named_function(choice)
    if named is not None:
        return lambda: NamedCall(named)
    if choice == "required":
        names = [str(_function(t).get("name")) for t in offered]
        return lambda: RequiredCall(names)
    if choice == "auto":
        return lambda: HermesCalls(single=parallel is False)
    return OutputStream
