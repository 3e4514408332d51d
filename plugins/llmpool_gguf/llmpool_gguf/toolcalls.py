"""Tool calls read back from generated text: :class:`~llmpoold.types.TextDelta` items in,
text deltas and :class:`~llmpoold.types.ToolCallDelta` items out (see :mod:`llmpool_gguf.tools`).

- :class:`NamedCall`: the whole output is one call's arguments (a named ``tool_choice``).
- :class:`RequiredCall`: the output is ``{"name": ..., "arguments": ...}`` as the
  ``required`` grammar lays it out (:func:`call_prefix`).
- :class:`HermesCalls`: free text with ``<tool_call>{"name": ..., "arguments": ...}</tool_call>``
  blocks (Hermes, Qwen 2.5/3 chat templates), for ``tool_choice: "auto"``.

Each streams: a call's first piece (its ``id`` ``call_<hex>`` and ``name``) is out as
soon as the name is known, its arguments as they are generated (``HermesCalls``: each
call when its block closes).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence

from llmpoold.types import TextDelta, ToolCallDelta

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"


def call_prefix(name: str) -> str:
    """What a ``required`` call's text starts with, up to its arguments."""
    return '{"name": ' + json.dumps(name) + ', "arguments": '


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class OutputStream:
    """The identity: text deltas pass through."""

    def push(self, delta: TextDelta) -> list[TextDelta | ToolCallDelta]:
        return [delta]

    def finish(self) -> list[TextDelta | ToolCallDelta]:
        return []


class NamedCall(OutputStream):
    """The output is the arguments of a call to ``name``: its first piece names the call,
    then the text streams as ``arguments`` (trailing whitespace held back and dropped)."""

    def __init__(self, name: str) -> None:
        self.name, self.id = name, new_call_id()
        self.started = False
        self.held = ""

    def _piece(self, arguments: str) -> list[TextDelta | ToolCallDelta]:
        if not self.started:
            self.started = True
            return [ToolCallDelta(0, id=self.id, name=self.name, arguments=arguments)]
        return [ToolCallDelta(0, arguments=arguments)] if arguments else []

    def push(self, delta: TextDelta) -> list[TextDelta | ToolCallDelta]:
        if delta.channel != "output":
            return [delta]
        text = self.held + delta.text
        body = text.rstrip()
        self.held = text[len(body):]
        return self._piece(body) if body else []



class RequiredCall(OutputStream):
    """The output is ``{"name": "<one of names>", "arguments": {...}}`` exactly as the
    ``required`` grammar lays it out: the call is named once its prefix is complete, then
    the arguments stream; the closing ``}`` (and whitespace before it) is held back and
    dropped. Text that never became a call (cut by max_tokens) is returned as text."""

    def __init__(self, names: Sequence[str]) -> None:
        self.prefixes = {call_prefix(n): n for n in names}
        self.id = new_call_id()
        self.buffer = ""
        self.name: str | None = None
        self.held = ""

    def push(self, delta: TextDelta) -> list[TextDelta | ToolCallDelta]:
        if delta.channel != "output":
            return [delta]
        if self.name is None:
            self.buffer += delta.text
            for prefix, name in self.prefixes.items():
                if self.buffer.startswith(prefix):
                    self.name, rest = name, self.buffer[len(prefix):]
                    return [ToolCallDelta(0, id=self.id, name=name, arguments=""), *self._arguments(rest)]
            return []
        return self._arguments(delta.text)

    def _arguments(self, text: str) -> list[TextDelta | ToolCallDelta]:
        text = self.held + text
        body = text.rstrip("} \t\r\n")
        self.held = text[len(body):]
        return [ToolCallDelta(0, arguments=body)] if body else []

    def finish(self) -> list[TextDelta | ToolCallDelta]:
        if self.name is None:
            return [TextDelta(self.buffer)] if self.buffer else []
        tail = self.held.rstrip()
        tail = tail[:-1].rstrip() if tail.endswith("}") else tail  # the wrapper's own "}"
        return [ToolCallDelta(0, arguments=tail)] if tail else []


class HermesCalls(OutputStream):
    """Free text with calls written ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
    (Hermes, Qwen 2.5/3): the text streams, with any tail that may open a call held
    back; each complete call becomes one :class:`ToolCallDelta` (index 0, 1...). A block
    that is not such a call is returned as the text it was. ``single``: calls after the
    first are dropped (``parallel_tool_calls: false``)."""

    def __init__(self, *, single: bool = False) -> None:
        self.single = single
        self.pending = ""
        self.in_call = False
        self.calls = 0

    def push(self, delta: TextDelta) -> list[TextDelta | ToolCallDelta]:
        if delta.channel != "output":
            return [delta]
        self.pending += delta.text
        out: list[TextDelta | ToolCallDelta] = []
        while True:
            if self.in_call:
                end = self.pending.find(CALL_CLOSE)
                if end < 0:
                    return out
                out += self._call(self.pending[:end])
                self.pending, self.in_call = self.pending[end + len(CALL_CLOSE):], False
                continue
            start = self.pending.find(CALL_OPEN)
            if start >= 0:
                out += self._text(self.pending[:start])
                self.pending, self.in_call = self.pending[start + len(CALL_OPEN):], True
                continue
            keep = _partial_suffix(self.pending, CALL_OPEN)
            out += self._text(self.pending[:len(self.pending) - keep])
            self.pending = self.pending[len(self.pending) - keep:]
            return out

    def _text(self, text: str) -> list[TextDelta | ToolCallDelta]:
        if self.calls and not text.strip():
            return []  # the whitespace between and after calls
        return [TextDelta(text)] if text else []

    def _call(self, block: str) -> list[TextDelta | ToolCallDelta]:
        call = parse_hermes_call(block)
        if call is None:
            return [TextDelta(CALL_OPEN + block + CALL_CLOSE)]
        index, self.calls = self.calls, self.calls + 1
        if self.single and index > 0:
            return []
        name, arguments = call
        return [ToolCallDelta(index, id=new_call_id(), name=name, arguments=arguments)]

    def finish(self) -> list[TextDelta | ToolCallDelta]:
        block, self.pending = self.pending, ""
        if not self.in_call:
            return self._text(block)
        self.in_call = False  # a call the model did not close: a call if it parses, else text
        return self._call(block) if parse_hermes_call(block) is not None else self._text(CALL_OPEN + block)


def parse_hermes_call(block: str) -> tuple[str, str] | None:
    """``{"name": ..., "arguments": {...}}`` (the text inside one ``<tool_call>`` block) as
    (name, arguments JSON); None when it is not such an object. ``parameters`` is read
    for ``arguments`` too (some fine-tunes write it); string arguments are kept as sent."""
    try:
        value = json.loads(block.strip())
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        return value["name"], arguments
    return value["name"], json.dumps(arguments, ensure_ascii=False)


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest tail of ``text`` that is a proper prefix of ``marker``."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
