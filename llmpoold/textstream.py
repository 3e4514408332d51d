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

Local backends use them through two small classes, so that the chain and its flush
order exist once:

- :class:`TextPipeline`: ``push(piece)`` per generated token, ``finish(cancelled=...)``
  once at the end; both return the :class:`~llmpoold.types.TextDelta` items to yield.
- :class:`GenerationClock`: marks tokenization, the first token and the end, and builds
  the request's :class:`~llmpoold.types.BackendMetrics`.
- :func:`queue_items`: what a batching runtime's thread hands one request, until the
  request is cancelled.
"""

from __future__ import annotations

import codecs
import queue
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from llmpoold.types import BackendMetrics, CancelToken, TextDelta


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


class Decoder(Protocol):
    """What turns a runtime's per-token pieces into text: :class:`Utf8Stream` (bytes),
    :class:`IncrementalDetokenizer` (token ids) or :class:`PlainText` (text)."""

    def push(self, piece: Any, /) -> str: ...

    def flush(self) -> str: ...


class PlainText:
    """The decoder for runtimes that already hand out text per step (ExLlamaV3)."""

    def push(self, piece: str) -> str:
        return piece

    def flush(self) -> str:
        return ""


class TextPipeline:
    """One request's output chain: decoder → :class:`StopFilter` →
    :class:`ReasoningSplitter`.

    ``push(piece)`` for every piece the runtime produces (bytes, a token id or text,
    as the ``decoder`` takes; default: text) returns the deltas to send now.
    ``finish(cancelled=...)`` once at the end returns the rest, in the one correct order:
    unless a stop string matched or the request was cancelled, the decoder's held bytes
    and the stop filter's held prefix are released as output; then the splitter's held
    text. A cancelled request drops what the decoder and the stop filter hold (it could
    be half a character or half a stop string) but keeps reasoning text already split.

    After a stop string matched, :attr:`stopped` is True, :attr:`matched` names it, and
    further pieces are ignored: the runtime should end generation.

    :attr:`decoded` counts the characters the decoder has produced, :attr:`released`
    those the stop filter has let through (what is not a stop string or held as a
    possible start of one); :class:`llmpoold.logprobs.LogprobText` aligns tokens with
    text by them.
    """

    def __init__(self, stops: Sequence[str] = (), reasoning_markers: tuple[str, str] | None = None, *,
                 reasoning_open: bool = False, decoder: Decoder | None = None) -> None:
        self.decoder: Decoder = decoder if decoder is not None else PlainText()
        self.stop_filter = StopFilter(stops)
        self.splitter = ReasoningSplitter(reasoning_markers, inside=reasoning_open)
        self._finished = False
        self.decoded = 0
        self.released = 0

    @property
    def stopped(self) -> bool:
        """True once a stop string has been completed."""
        return self.stop_filter.stopped

    @property
    def matched(self) -> str | None:
        """The stop string that ended the text, if any."""
        return self.stop_filter.matched

    def push(self, piece: bytes | int | str) -> list[TextDelta]:
        if self.stopped or self._finished:
            return []
        text = self.decoder.push(piece)
        self.decoded += len(text)
        passed = self.stop_filter.push(text)
        self.released += len(passed)
        return self.splitter.push(passed)

    def finish(self, *, cancelled: bool = False) -> list[TextDelta]:
        """The deltas still held, once; later calls return []."""
        if self._finished:
            return []
        self._finished = True
        out: list[TextDelta] = []
        if not self.stopped and not cancelled:
            text = self.decoder.flush()
            self.decoded += len(text)
            passed = self.stop_filter.push(text) + self.stop_filter.flush()
            self.released += len(passed)
            out += self.splitter.push(passed)
        return out + self.splitter.flush()


class GenerationClock:
    """Wall-clock marks of one generation and the :class:`BackendMetrics` they give.

    Created when the request starts (tokenization begins); :meth:`tokenized` when the
    prompt ids are ready (generation begins); :meth:`first_token` when the runtime
    produced its first token (later calls are ignored; safe from another thread);
    :meth:`metrics` at the end. Times are from ``time.perf_counter``.

    The metrics: ``tokenize_ms`` = tokenized − start; ``generate_total_ms`` = end −
    tokenized; ``time_to_first_token_ms`` = first token − tokenized;
    ``decode_after_first_token_ms`` = end − first token; ``tokens_per_second`` = output
    tokens / generation seconds. Without a first token, the first token counts as the end.
    """

    def __init__(self, *, now: Callable[[], float] = time.perf_counter) -> None:
        self._now = now
        self.started = now()
        self.tokenized_at: float | None = None
        self.first_token_at: float | None = None

    def tokenized(self) -> None:
        self.tokenized_at = self._now()

    def first_token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = self._now()

    def metrics(self, *, prompt_tokens: int | None, output_tokens: int | None,
                cached_prompt_tokens: int | None = None,
                runtime_seconds: tuple[float, float] | None = None) -> BackendMetrics:
        """The request's metrics, ending now.

        :param runtime_seconds: (time to first token, decode after the first token) as
            the runtime measured them (ExLlamaV3's ``time_prefill``/``time_generate``),
            used instead of this clock's marks; tokenization is still this clock's.
        """
        ended = self._now()
        tokenized = self.tokenized_at if self.tokenized_at is not None else ended
        if runtime_seconds is not None:
            first_s, decode_s = runtime_seconds
        else:
            first = self.first_token_at if self.first_token_at is not None else ended
            first_s, decode_s = first - tokenized, ended - first
        total_s = first_s + decode_s
        return BackendMetrics(
            tokenize_ms=_ms(tokenized - self.started), time_to_first_token_ms=_ms(first_s),
            generate_total_ms=_ms(total_s), decode_after_first_token_ms=_ms(decode_s),
            prompt_tokens=prompt_tokens, cached_prompt_tokens=cached_prompt_tokens, output_tokens=output_tokens,
            tokens_per_second=round(output_tokens / total_s, 2) if output_tokens is not None and total_s > 0 else None)

    def partial(self, *, prompt_tokens: int | None) -> BackendMetrics:
        """Metrics of a generation that ended without the runtime's own figures (a
        cancelled job): tokenization and prompt size only."""
        tokenized = self.tokenized_at if self.tokenized_at is not None else self._now()
        return BackendMetrics(tokenize_ms=_ms(tokenized - self.started), prompt_tokens=prompt_tokens)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def queue_items(source: queue.Queue[Any] | queue.SimpleQueue[Any], cancel: CancelToken, *,
                poll_s: float = 0.05) -> Iterator[Any]:
    """The items a runtime thread puts on ``source``, as they arrive, until ``cancel``
    is set (seen within ``poll_s``). The iteration ends only on cancel; the caller
    breaks out on its own last item, so ``for ... else`` tells the two apart."""
    while not cancel.is_set():
        try:
            item = source.get(timeout=poll_s)
        except queue.Empty:
            continue
        yield item
