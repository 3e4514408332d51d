"""Token log probabilities aligned with the text a :class:`~llmpoold.textstream.TextPipeline`
emits, for runtimes that score each generated token (llama.cpp).

The pipeline holds text back (a character split across tokens, a possible start of a
stop string, a reasoning marker), so a token's text can reach the client deltas later
than the token. :class:`LogprobText` wraps the pipeline and attaches each token's
:class:`~llmpoold.types.TokenLogprob` to the last delta of the push that first lets
(part of) the token's text through; the rule, by character positions in the decoded
text (``TextPipeline.decoded`` / ``released``):

- a token is reported once its text starts before the released end: so the tokens of
  the deltas, joined, cover the text; a token that straddles the start of a stop string
  is reported (its text then goes beyond the answer's end);
- tokens entirely inside a matched stop string are never reported, nor are the tokens
  still held when a request is cancelled;
- a token of no text (part of a UTF-8 character, a special token) rides with the text
  that follows it; tokens left at the end with nothing to ride on are reported on a
  delta of no text.
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace

from llmpoold.textstream import TextPipeline
from llmpoold.types import TextDelta, TokenLogprob


def token_logprob(piece: bytes, logprob: float, top: tuple[TokenLogprob, ...] = ()) -> TokenLogprob:
    """A token's entry from its bytes (its text decoded with U+FFFD for a partial character)."""
    return TokenLogprob(token=piece.decode("utf-8", errors="replace"), logprob=logprob, bytes=tuple(piece), top=top)


class LogprobText:
    """``push(piece, entry)`` per generated token, ``finish(cancelled=...)`` once, as
    :class:`TextPipeline` (whose ``stopped``/``matched`` it passes on); ``entry`` is the
    token's log probability, or None when the request did not ask for them."""

    def __init__(self, pipeline: TextPipeline) -> None:
        self.pipeline = pipeline
        self._waiting: deque[tuple[int, TokenLogprob]] = deque()  # (start in the decoded text, entry)

    @property
    def stopped(self) -> bool:
        return self.pipeline.stopped

    @property
    def matched(self) -> str | None:
        return self.pipeline.matched

    def push(self, piece: bytes | int | str, entry: TokenLogprob | None = None) -> list[TextDelta]:
        if entry is not None:  # after a stop it never becomes ready: never reported
            self._waiting.append((self.pipeline.decoded, entry))
        return self._attach(self.pipeline.push(piece), final=False)

    def finish(self, *, cancelled: bool = False) -> list[TextDelta]:
        deltas = self.pipeline.finish(cancelled=cancelled)
        return deltas if cancelled else self._attach(deltas, final=True)

    def _attach(self, deltas: list[TextDelta], *, final: bool) -> list[TextDelta]:
        if not self._waiting or not (deltas or final):
            return deltas
        released = self.pipeline.released
        ready: list[TokenLogprob] = []
        while self._waiting and self._waiting[0][0] < released:
            ready.append(self._waiting.popleft()[1])
        if final and not self.pipeline.stopped:
            ready += [entry for _, entry in self._waiting]  # of no text, at the very end
            self._waiting.clear()
        if not ready:
            return deltas
        if not deltas:
            return [TextDelta("", logprobs=tuple(ready))]
        last = deltas[-1]
        return [*deltas[:-1], replace(last, logprobs=last.logprobs + tuple(ready))]
