"""Prompt formats shared by the local backends (GGUF, CTranslate2, ExLlamaV3).

A model's ``prompt_format`` names one :class:`PromptFormat`. :func:`render` turns a
:class:`~llmpoold.types.GenerationRequest` into the prompt text plus the stop strings
and reasoning markers the backend needs. The seed's formats (section 5 of its
contract) are ``generic`` (ChatML), ``qwen3_template``, ``mistral_template``,
``gemma4_template`` and ``translategemma_template``; llmpool adds ``gemma3_template``,
``chat_template`` (the model's own Jinja template, rendered by the runtime) and ``raw``.

User text is text: a rendered prompt is also a sequence of :class:`PromptSegment`
items, ``markup`` (the format's special tokens, ``<start_of_turn>``, ``<|im_end|>``, the
BOS token where the model expects one) and text (the client's input, messages and
instructions, and the format's plain wording). Backends tokenize them with
:func:`llmpoold.segments.tokenize_segments`: markup with special-token parsing, text without, so a
client who writes ``<end_of_turn>`` gets the characters, not a forged turn. ``text``
is the same prompt as one string (logs, tests). ``raw`` is the exception: its input is
one markup segment, tokenized with special-token parsing as before (base models).
For ``chat_template`` (the runtime renders the model's own Jinja template),
:func:`llmpoold.segments.template_segments` renders the template with placeholders and splits its
output the same way.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from llmpoold.errors import ApiError
from llmpoold.segments import PromptSegment
from llmpoold.types import Capabilities, GenerationRequest

THINK_MARKERS = ("<think>", "</think>")
GEMMA4_THINK_MARKERS = ("<|channel>thought", "<channel|>")
TRANSLATE_AUTO_PREFIX = (
    "The source language may differ across the text. Detect the source language of each sentence or segment "
    "yourself and translate all translatable content to the target language. Preserve numbering, line breaks, "
    "and placeholders where possible. Return only the translation."
)


# A BCP-47-like language code: a 2-8 letter language, then letter/digit subtags of 1-8
# ("en", "pt-BR", "zh-Hant-TW", "es-419"; "_" accepted for "-"). The seed's "auto" and
# "mixed" fit. Codes are written into prompts, so nothing else gets through.
LANG_CODE = re.compile(r"[A-Za-z]{2,8}(?:[-_][A-Za-z0-9]{1,8}){0,7}")


def check_lang_code(value: object, field: str) -> object:
    """``value`` if it is None, blank (the prompt format says what it needs) or a
    language code; ValueError naming ``field`` otherwise."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{field} must be a string")
    if value.strip() and not LANG_CODE.fullmatch(value.strip()):
        raise ValueError(f"{field} must be a language code such as 'en' or 'pt-BR'")
    return value


@dataclass(frozen=True)
class PromptFormat:
    """Static facts about one prompt format.

    :param native_stops: stop strings the format always adds (the seed's table).
    :param multi_turn: whether ``messages`` with several turns can be rendered.
    :param thinking: whether the format has a thinking switch (request ``thinking``).
    :param runtime_template: True when the runtime renders the prompt from the model's
        own chat template (``chat_template``); :func:`render` then only resolves stops.
    :param reasoning_markers: (start, end) around reasoning text in the output, if any.
    """

    name: str
    native_stops: tuple[str, ...] = ()
    multi_turn: bool = True
    thinking: bool = False
    runtime_template: bool = False
    reasoning_markers: tuple[str, str] | None = None


FORMATS: dict[str, PromptFormat] = {f.name: f for f in (
    PromptFormat("generic", native_stops=("<|im_end|>",)),
    PromptFormat("qwen3_template", native_stops=("<|im_end|>",), thinking=True, reasoning_markers=THINK_MARKERS),
    PromptFormat("mistral_template"),
    PromptFormat("gemma3_template", native_stops=("<end_of_turn>",)),
    PromptFormat("gemma4_template", native_stops=("<turn|>", "<end_of_turn>"), thinking=True,
                 reasoning_markers=GEMMA4_THINK_MARKERS),
    PromptFormat("translategemma_template", native_stops=("<end_of_turn>",), multi_turn=False),
    PromptFormat("chat_template", runtime_template=True),
    PromptFormat("raw", multi_turn=False),
)}


@dataclass(frozen=True)
class RenderedPrompt:
    """What a backend feeds its runtime: ``segments`` to tokenize (see
    :func:`llmpoold.segments.tokenize_segments`) and ``text``, the same prompt as one string (both empty
    / None for ``runtime_template`` formats: render ``messages`` with the model's
    template instead, see :func:`llmpoold.segments.template_segments`), the merged stop strings, and the
    reasoning markers to split the output on."""

    text: str | None
    stops: tuple[str, ...]
    messages: tuple[dict[str, str], ...]
    reasoning_markers: tuple[str, str] | None = None
    thinking_prefilled: bool = False
    segments: tuple[PromptSegment, ...] = ()


def prompt_format(name: str) -> PromptFormat:
    """The format called ``name``; ValueError naming the known ones otherwise."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown prompt_format '{name}'; known: {', '.join(sorted(FORMATS))}") from None


# Where the seed lets a request switch thinking (its ``_THINKING_CONTROL_PROMPT_FORMATS``):
# a backend offers ``thinking`` modes only for these of its formats.
SEED_THINKING_FORMATS: dict[str, frozenset[str]] = {
    "ct2": frozenset({"qwen3_template"}),
    "exllamav3": frozenset({"gemma4_template", "qwen3_template"}),
    "gguf": frozenset({"gemma4_template"}),
}


def capabilities_for(format_name: str, modalities: tuple[str, ...] = ("text",), *,
                     thinking_formats: Collection[str] | None = None) -> Capabilities:
    """The capabilities a local text backend has with this prompt format.

    ``thinking_formats``: the formats on which this backend lets a request switch
    thinking (``SEED_THINKING_FORMATS[backend]``); None: every format with a switch."""
    fmt = prompt_format(format_name)
    thinking = fmt.thinking and (thinking_formats is None or fmt.name in thinking_formats)
    return Capabilities(modalities=modalities, multi_turn=fmt.multi_turn,
                        thinking_modes=("default", "enabled", "disabled") if thinking else ("default",))


def merge_stops(*groups: Iterable[str]) -> tuple[str, ...]:
    """Native stops first, then extras; empty strings dropped, duplicates removed in order."""
    seen: dict[str, None] = {}
    for group in groups:
        for stop in group:
            if stop:
                seen.setdefault(stop, None)
    return tuple(seen)


def content_text(content: str | tuple[Mapping[str, Any], ...]) -> str:
    """The text of a message: a string as is; content items' text parts concatenated
    with no separator, as the seed does (``[{"text": "a"}, {"text": "b"}]`` is ``"ab"``).

    Non-text items are refused by admission before a backend sees them.
    """
    if isinstance(content, str):
        return content
    return "".join(str(item.get("text", "")) for item in content if item.get("type") == "text")


def chat_messages(request: GenerationRequest, *, system: bool = True) -> tuple[dict[str, str], ...]:
    """The conversation as ``[{"role", "content"}]``, the instructions first as a system turn."""
    turns = [{"role": "system", "content": request.instructions}] if system and request.instructions else []
    turns += [{"role": m.role, "content": content_text(m.content)} for m in request.messages]
    return tuple(turns)


def check_request(fmt: PromptFormat, request: GenerationRequest) -> None:
    """Refuse what the format cannot render, with the 400 a client can act on."""
    if request.multi_turn and not fmt.multi_turn and len(request.messages) > 1:
        raise ApiError(400, "multi_turn_unsupported",
                       f"prompt_format '{fmt.name}' does not support multi-turn 'messages'; send 'input'",
                       model=request.model)
    if fmt.name == "translategemma_template":
        _translate_langs(request)


def render(request: GenerationRequest) -> RenderedPrompt:
    """Render ``request`` in its model's prompt format. Raises ApiError (400) for a
    request the format cannot express, ValueError for an unknown format."""
    fmt = prompt_format(request.prompt_format)
    check_request(fmt, request)
    stops = merge_stops(fmt.native_stops, request.decoding.stop)
    messages = chat_messages(request)
    if fmt.runtime_template:
        return RenderedPrompt(None, stops, messages, fmt.reasoning_markers)
    renderer = _RENDERERS[fmt.name]
    prompt, prefilled = renderer(request, messages)
    return RenderedPrompt(prompt.text(), stops, messages, fmt.reasoning_markers, thinking_prefilled=prefilled,
                          segments=tuple(prompt.segments))


# ----- renderers: (request, messages) -> (segments, thinking block prefilled) --------------


class _Prompt:
    """A prompt being built: ``markup`` for special tokens, ``text`` for everything else."""

    def __init__(self) -> None:
        self.segments: list[PromptSegment] = []

    def markup(self, token: str) -> _Prompt:
        if token:
            self.segments.append(PromptSegment(token, markup=True))
        return self

    def add(self, text: str) -> _Prompt:
        if not text:
            return self
        if self.segments and not self.segments[-1].markup:
            text = self.segments.pop().text + text
        self.segments.append(PromptSegment(text))
        return self

    def text(self) -> str:
        return "".join(s.text for s in self.segments)


def _chatml_turns(messages: tuple[dict[str, str], ...]) -> _Prompt:
    prompt = _Prompt()
    for m in messages:
        prompt.markup("<|im_start|>").add(f"{m['role']}\n{m['content']}").markup("<|im_end|>").add("\n")
    return prompt.markup("<|im_start|>").add("assistant\n")


def _chatml(request: GenerationRequest, messages: tuple[dict[str, str], ...]) -> tuple[_Prompt, bool]:
    return _chatml_turns(messages), False


def _qwen3(request: GenerationRequest, messages: tuple[dict[str, str], ...]) -> tuple[_Prompt, bool]:
    """ChatML; unless thinking is on, ``/no_think`` on the last user turn and an empty
    think block after the assistant header (the seed's rule)."""
    if request.thinking is True:
        return _chatml(request, messages)
    turns = list(messages)
    last = turns[-1]
    if not last["content"].lstrip().startswith("/no_think"):
        turns[-1] = {"role": last["role"], "content": "/no_think\n" + last["content"]}
    prompt = _chatml_turns(tuple(turns))
    return prompt.markup("<think>").add("\n\n").markup("</think>").add("\n\n"), True


def _mistral(request: GenerationRequest, messages: tuple[dict[str, str], ...]) -> tuple[_Prompt, bool]:
    """``<s>[INST] {sys}\\n\\n{user} [/INST]``; later turns ``{answer}</s>[INST] {user} [/INST]``."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    prompt, first = _Prompt().markup("<s>"), True
    for m in messages:
        if m["role"] == "user":
            user = m["content"]
            if first and system:
                user = "\n\n".join(system) + "\n\n" + user
            prompt.markup("[INST]").add(f" {user} ").markup("[/INST]")
            first = False
        elif m["role"] == "assistant":
            prompt.add(m["content"]).markup("</s>")
    return prompt, False


def _gemma(messages: tuple[dict[str, str], ...], *, system_turn: bool) -> _Prompt:
    """Gemma turns; ``assistant`` is ``model``. Gemma 3 has no system turn: the
    instructions open the first user turn."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    prompt = _Prompt().markup("<bos>")
    if system and system_turn:
        prompt.markup("<start_of_turn>").add(f"system\n{system}").markup("<end_of_turn>").add("\n")
    first_user = True
    for m in messages:
        if m["role"] == "system":
            continue
        content = m["content"]
        if m["role"] == "user" and first_user and system and not system_turn:
            content = f"{system}\n\n{content}"
        first_user = first_user and m["role"] != "user"
        role = "model" if m["role"] == "assistant" else "user"
        prompt.markup("<start_of_turn>").add(f"{role}\n{content}").markup("<end_of_turn>").add("\n")
    return prompt.markup("<start_of_turn>").add("model\n")


def _gemma3(request: GenerationRequest, messages: tuple[dict[str, str], ...]) -> tuple[_Prompt, bool]:
    return _gemma(messages, system_turn=False), False


def _gemma4(request: GenerationRequest, messages: tuple[dict[str, str], ...]) -> tuple[_Prompt, bool]:
    return _gemma(messages, system_turn=True), False


def _translate_langs(request: GenerationRequest) -> tuple[str, str, bool]:
    """(source, target, auto-detect) with the seed's rules, as 400s instead of 500s."""
    target = request.target_lang_code
    if target is None:
        raise ApiError(400, "invalid_request", "translategemma_template requires request.target_lang_code",
                       model=request.model)
    if not target.strip():
        raise ApiError(400, "invalid_request", "translategemma_template requires non-empty request.target_lang_code",
                       model=request.model)
    source = request.source_lang_code
    if source is not None and not source.strip():
        raise ApiError(400, "invalid_request", "translategemma_template requires non-empty request.source_lang_code",
                       model=request.model)
    for name, code in (("source_lang_code", source), ("target_lang_code", target)):
        try:
            check_lang_code(code, name)
        except ValueError as exc:  # the door refuses these (422); a request made elsewhere gets a 400
            raise ApiError(400, "invalid_request", str(exc), model=request.model) from None
    if source is None or source.strip().lower() in ("auto", "mixed"):
        return "en", target.strip(), True
    return source.strip(), target.strip(), False


def _translategemma(request: GenerationRequest, messages: tuple[dict[str, str], ...]) -> tuple[_Prompt, bool]:
    """TranslateGemma's own user-turn wording; ``instructions`` are ignored (seed)."""
    source, target, auto = _translate_langs(request)
    text = content_text(request.messages[-1].content)
    if auto:
        text = f"{TRANSLATE_AUTO_PREFIX}\n\n{text}"
    prompt = (f"You are a professional {source} to {target} translator. Your goal is to accurately convey the "
              f"meaning and nuances of the original text while adhering to {target} grammar, vocabulary, and "
              f"cultural sensitivities.\nProduce only the {target} translation, without any additional "
              f"explanations or commentary. Please translate the following {source} text into {target}:\n\n\n"
              f"{text}")
    turn = _Prompt().markup("<bos>").markup("<start_of_turn>").add(f"user\n{prompt}").markup("<end_of_turn>")
    return turn.add("\n").markup("<start_of_turn>").add("model\n"), False


def _raw(request: GenerationRequest, messages: tuple[dict[str, str], ...]) -> tuple[_Prompt, bool]:
    """The input as is, for base models: no instructions, no template. The input is
    tokenized with special-token parsing, as before llmpool split prompts into
    segments: a client of a base model may write the model's special tokens on purpose
    (``raw`` is the documented exception to "user text is text")."""
    return _Prompt().markup(content_text(request.messages[-1].content)), False


_RENDERERS = {
    "generic": _chatml,
    "qwen3_template": _qwen3,
    "mistral_template": _mistral,
    "gemma3_template": _gemma3,
    "gemma4_template": _gemma4,
    "translategemma_template": _translategemma,
    "raw": _raw,
}

