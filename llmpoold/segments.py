"""A prompt as segments, and tokenizing them so that user text stays text.

A :class:`PromptSegment` is ``markup`` (a format's special tokens, tokenized with
special-token parsing) or text (the client's words, tokenized without it).
:func:`tokenize_segments` turns segments into token ids for any runtime's tokenizer;
:func:`template_segments` splits the output of a model's own chat template the same way.
:mod:`llmpoold.prompts` renders the formats into segments.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from llmpoold.errors import ApiError


@dataclass(frozen=True, slots=True)
class PromptSegment:
    """A run of prompt text. ``markup=True``: the format's special token(s), tokenized
    with special-token parsing. ``markup=False``: text (the client's words and the
    format's plain wording), tokenized without it."""

    text: str
    markup: bool = False


Tokenize = Callable[[str, bool], Sequence[int]]
"""``tokenize(text, special)``: the runtime's tokenizer, without adding BOS/EOS;
``special`` turns special-token parsing on."""


def tokenize_segments(segments: Iterable[PromptSegment], tokenize: Tokenize) -> list[int]:
    """Token ids of a segmented prompt: markup with special-token parsing, text without.

    Adjacent text segments are tokenized as one string, and a markup segment that
    holds no special token of this vocabulary (it tokenizes the same either way, e.g.
    ``[INST]`` in a vocabulary without it) joins the text around it, so tokenization
    breaks only at real special tokens, where the runtime's own tokenizer breaks too:
    a prompt without special-token spellings in its text gets the ids that tokenizing
    the whole text with special parsing gives.
    """
    ids: list[int] = []
    run: list[str] = []
    known: list[int] | None = None  # the ids of a run that is one markup segment (raw's input)

    def flush() -> None:
        nonlocal known
        if run:
            ids.extend(known if known is not None and len(run) == 1 else tokenize("".join(run), False))
            run.clear()
        known = None

    for segment in segments:
        if segment.markup and segment.text:
            special, plain = list(tokenize(segment.text, True)), list(tokenize(segment.text, False))
            if special != plain:
                flush()
                ids.extend(special)
                continue
            if not run:
                known = plain
        run.append(segment.text)
    flush()
    return ids


def template_segments(messages: Sequence[Mapping[str, str]], render_template: Callable[[list[dict[str, str]]], str],
                      tokenize: Tokenize, *, model: str | None = None) -> tuple[PromptSegment, ...]:
    """The runtime's own chat template (``chat_template``) as segments.

    ``render_template(messages)`` renders the model's template to text. It is rendered
    once with the messages and once with a unique placeholder for each message's
    (non-empty) content; the placeholder rendering split at the placeholders gives the
    markup, and the contents go between as text. That holds when putting the contents (as they are,
    or stripped: templates that ``trim``) into the placeholders reproduces the real
    rendering. A template that changes contents otherwise cannot be split: its output
    is used as markup when no content holds a special token of the vocabulary, else the
    request is refused (400) rather than letting the text act as markup.
    """
    real = render_template([dict(m) for m in messages])
    nonce = secrets.token_hex(8)
    # An empty content needs no placeholder (templates skip it: an assistant turn that
    # only calls tools); every other content gets one.
    holders = {i: f"LLMPOOL{nonce}SLOT{i}END" for i, m in enumerate(messages) if m["content"]}
    shaped = render_template([{**m, "content": holders[i]} if i in holders else dict(m)
                              for i, m in enumerate(messages)])
    parts = _split_at(shaped, list(holders.values()))
    contents = [messages[i]["content"] for i in holders]
    if parts is not None:
        for shape in (lambda c: c, str.strip):
            filled = [shape(c) for c in contents]
            if parts[0] + "".join(f + p for f, p in zip(filled, parts[1:], strict=True)) == real:
                segments = [PromptSegment(parts[0], markup=True)]
                for content, part in zip(filled, parts[1:], strict=True):
                    segments += [PromptSegment(content), PromptSegment(part, markup=True)]
                return tuple(s for s in segments if s.text)
    if any(list(tokenize(c, True)) != list(tokenize(c, False)) for c in contents):
        raise ApiError(400, "invalid_request", "the text contains special tokens of the model, and its chat template "
                       "cannot keep them apart from the markup; remove them or choose another prompt_format",
                       model=model)
    return (PromptSegment(real, markup=True),)


def _split_at(text: str, holders: list[str]) -> list[str] | None:
    """``text`` split at each holder, in order, each exactly once; None otherwise."""
    parts, rest = [], text
    for holder in holders:
        if text.count(holder) != 1 or holder not in rest:
            return None
        before, rest = rest.split(holder, 1)
        parts.append(before)
    return [*parts, rest]
