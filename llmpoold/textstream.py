"""Turning a runtime's token stream into clean text deltas.

Three small state machines, fed in order, each safe to use from one thread:

- :class:`Utf8Stream` for runtimes that hand out bytes per token (llama.cpp): a
  character split across tokens is held until complete, never emitted broken.
- :class:`IncrementalDetokenizer` for runtimes that hand out token ids and decode
  through a tokenizer (CTranslate2 + transformers): emits only the text that the new
  ids added, holding back while the tail is an incomplete character.
- :class:`StopFilter`: stop strings matched across token boundaries; the text of a
  stop string never reaches the client, not even a prefix of it.
- :class:`ReasoningSplitter`: separates reasoning text between markers
  (``<think>``/``</think>``) from the answer, also across token boundaries.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence

from llmpoold.types import TextDelta


class Utf8Stream:
    """Incremental UTF-8 decoding of byte pieces; invalid bytes become U+FFFD."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, piece: bytes) -> str:
        return self._decoder.decode(piece)

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


class IncrementalDetokenizer:
    """Decode a growing list of token ids, returning only the newly completed text.

    ``decode`` maps ids to text (e.g. ``tokenizer.decode(ids, skip_special_tokens=True)``).
    Decoding the whole tail (from a few tokens back) keeps tokenizers that merge
    spaces or bytes across tokens (SentencePiece, byte-level BPE) exact.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._emitted = ""

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._decode(self._ids)
        if text.endswith("\ufffd"):
            return ""  # an incomplete character: wait for the next token
        new = text[len(self._emitted):] if text.startswith(self._emitted) else ""
        self._emitted = text
        return new

    def flush(self) -> str:
        text = self._decode(self._ids)
        new = text[len(self._emitted):] if text.startswith(self._emitted) else ""
        self._emitted = text
        return new

    @property
    def text(self) -> str:
        return self._emitted


class StopFilter:
    """Hold back text that might be the start of a stop string.

    ``push(text)`` returns the text that is certainly not part of a stop string;
    ``stopped`` becomes True when a stop string has been completed (everything from it
    on is dropped). ``flush()`` returns what was held back once the stream has ended
    without a stop.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False
        self.matched: str | None = None
        self.remainder = ""  # what followed the stop string in the text that completed it

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        buffer = self._held + text
        cut = None
        for stop in self.stops:
            index = buffer.find(stop)
            if index != -1 and (cut is None or index < cut):
                cut, self.matched = index, stop
        if cut is not None:
            assert self.matched is not None
            self.stopped = True
            self._held = ""
            self.remainder = buffer[cut + len(self.matched):]
            return buffer[:cut]
        keep = self._partial_suffix(buffer)
        self._held = buffer[len(buffer) - keep:] if keep else ""
        return buffer[:len(buffer) - keep]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _partial_suffix(self, buffer: str) -> int:
        """Length of the longest tail of ``buffer`` that is a proper prefix of a stop."""
        best = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(buffer)), best, -1):
                if buffer.endswith(stop[:size]):
                    best = size
                    break
        return best


class ReasoningSplitter:
    """Split generated text into reasoning and output deltas by start/end markers.

    ``inside=True`` starts in reasoning (a template that already opened the block).
    Text before the start marker is output; a start marker only counts at the very
    beginning of the output (after whitespace), as thinking models emit it.
    """

    def __init__(self, markers: tuple[str, str] | None, *, inside: bool = False) -> None:
        self.markers = markers
        self._inside = inside
        self._seen_start = inside
        self._filter: StopFilter | None = None
        self._pending = ""
        self._after_end = False
        if markers is not None:
            self._filter = StopFilter([markers[1]]) if inside else None

    def push(self, text: str) -> list[TextDelta]:
        if self.markers is None:
            return [TextDelta(text)] if text else []
        start, end = self.markers
        out: list[TextDelta] = []
        if not self._seen_start:
            self._pending += text
            stripped = self._pending.lstrip()
            if stripped.startswith(start):
                self._seen_start, self._inside = True, True
                rest = stripped[len(start):]
                self._pending = ""
                self._filter = StopFilter([end])
                return out + self.push(rest)
            if start.startswith(stripped):
                return out  # could still become the start marker
            self._seen_start = True  # no reasoning block: everything is output
            text, self._pending = self._pending, ""
            return [TextDelta(text)] if text else []
        if self._inside:
            assert self._filter is not None
            reasoning = self._filter.push(text)
            if reasoning:
                out.append(TextDelta(reasoning, channel="reasoning"))
            if self._filter.stopped:
                self._inside = False
                self._after_end = True
                out += self.push(self._filter.remainder)
            return out
        if self._after_end:
            # the answer starts after the blank line(s) that close a reasoning block
            text = text.lstrip("\n")
            self._after_end = not text
        return [TextDelta(text)] if text else []

    def flush(self) -> list[TextDelta]:
        if self.markers is None:
            return []
        if not self._seen_start:
            text, self._pending = self._pending, ""
            return [TextDelta(text)] if text else []
        if self._inside and self._filter is not None:
            rest = self._filter.flush()
            return [TextDelta(rest, channel="reasoning")] if rest else []
        return []
