"""Prompt formats shared by the local backends (GGUF, CTranslate2, ExLlamaV3).

A model's ``prompt_format`` names one :class:`PromptFormat`. :func:`render` turns a
:class:`~llmpoold.types.GenerationRequest` into the prompt text plus the stop strings
and reasoning markers the backend needs. The seed's formats (section 5 of its
contract) are ``generic`` (ChatML), ``qwen3_template``, ``mistral_template``,
``gemma4_template`` and ``translategemma_template``; llmpool adds ``gemma3_template``,
``chat_template`` (the model's own Jinja template, rendered by the runtime) and ``raw``.

Rendered text carries the format's special tokens literally, the BOS token included
where the model expects one: backends tokenize it with special-token parsing on and
without adding another BOS.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from llmpoold.errors import ApiError
from llmpoold.types import Capabilities, GenerationRequest

THINK_MARKERS = ("<think>", "</think>")
GEMMA4_THINK_MARKERS = ("<|channel>thought", "<channel|>")
TRANSLATE_AUTO_PREFIX = (
    "The source language may differ across the text. Detect the source language of each sentence or segment "
    "yourself and translate all translatable content to the target language. Preserve numbering, line breaks, "
    "and placeholders where possible. Return only the translation."
)


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
    """What a backend feeds its runtime: ``text`` (None for ``runtime_template``
    formats: render ``messages`` with the model's template instead), the merged stop
    strings, and the reasoning markers to split the output on."""

    text: str | None
    stops: tuple[str, ...]
    messages: tuple[dict[str, str], ...]
    reasoning_markers: tuple[str, str] | None = None
    thinking_prefilled: bool = False


def prompt_format(name: str) -> PromptFormat:
    """The format called ``name``; ValueError naming the known ones otherwise."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown prompt_format '{name}'; known: {', '.join(sorted(FORMATS))}") from None


def capabilities_for(format_name: str, modalities: tuple[str, ...] = ("text",)) -> Capabilities:
    """The capabilities a local text backend has with this prompt format."""
    fmt = prompt_format(format_name)
    return Capabilities(modalities=modalities, multi_turn=fmt.multi_turn,
                        thinking_modes=("default", "enabled", "disabled") if fmt.thinking else ("default",))


def merge_stops(*groups: Iterable[str]) -> tuple[str, ...]:
    """Native stops first, then extras; empty strings dropped, duplicates removed in order."""
    seen: dict[str, None] = {}
    for group in groups:
        for stop in group:
            if stop:
                seen.setdefault(stop, None)
    return tuple(seen)


def content_text(content: str | tuple[Mapping[str, Any], ...]) -> str:
    """The text of a message: a string as is; content items' text parts joined.

    Non-text items are refused by admission before a backend sees them.
    """
    if isinstance(content, str):
        return content
    return "\n".join(str(item.get("text", "")) for item in content if item.get("type") == "text")


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
    text, prefilled = renderer(request, messages)
    return RenderedPrompt(text, stops, messages, fmt.reasoning_markers, thinking_prefilled=prefilled)


# ----- renderers: (request, messages) -> (text, thinking block prefilled) -----------------


def _chatml(request: GenerationRequest, messages: tuple[dict[str, str], ...]) -> tuple[str, bool]:
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + "<|im_start|>assistant\n", False


def _qwen3(request: GenerationRequest, messages: tuple[dict[str, str], ...]) -> tuple[str, bool]:
    """ChatML; unless thinking is on, ``/no_think`` on the last user turn and an empty
    think block after the assistant header (the seed's rule)."""
    if request.thinking is True:
        return _chatml(request, messages)
    turns = list(messages)
    last = turns[-1]
    if not last["content"].lstrip().startswith("/no_think"):
        turns[-1] = {"role": last["role"], "content": "/no_think\n" + last["content"]}
    text, _ = _chatml(request, tuple(turns))
    return text + "<think>\n\n</think>\n\n", True


def _mistral(request: GenerationRequest, messages: tuple[dict[str, str], ...]) -> tuple[str, bool]:
    """``<s>[INST] {sys}\\n\\n{user} [/INST]``; later turns ``{answer}</s>[INST] {user} [/INST]``."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    text, first = "<s>", True
    for m in messages:
        if m["role"] == "user":
            user = m["content"]
            if first and system:
                user = "\n\n".join(system) + "\n\n" + user
            text += f"[INST] {user} [/INST]"
            first = False
        elif m["role"] == "assistant":
            text += f"{m['content']}</s>"
    return text, False


def _gemma(messages: tuple[dict[str, str], ...], *, system_turn: bool) -> str:
    """Gemma turns; ``assistant`` is ``model``. Gemma 3 has no system turn: the
    instructions open the first user turn."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    text = "<bos>"
    if system and system_turn:
        text += f"<start_of_turn>system\n{system}<end_of_turn>\n"
    first_user = True
    for m in messages:
        if m["role"] == "system":
            continue
        content = m["content"]
        if m["role"] == "user" and first_user and system and not system_turn:
            content = f"{system}\n\n{content}"
        first_user = first_user and m["role"] != "user"
        role = "model" if m["role"] == "assistant" else "user"
        text += f"<start_of_turn>{role}\n{content}<end_of_turn>\n"
    return text + "<start_of_turn>model\n"


def _gemma3(request: GenerationRequest, messages: tuple[dict[str, str], ...]) -> tuple[str, bool]:
    return _gemma(messages, system_turn=False), False


def _gemma4(request: GenerationRequest, messages: tuple[dict[str, str], ...]) -> tuple[str, bool]:
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
    if source is None or source.strip().lower() in ("auto", "mixed"):
        return "en", target.strip(), True
    return source.strip(), target.strip(), False


def _translategemma(request: GenerationRequest, messages: tuple[dict[str, str], ...]) -> tuple[str, bool]:
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
    return f"<bos><start_of_turn>user\n{prompt}<end_of_turn>\n<start_of_turn>model\n", False


def _raw(request: GenerationRequest, messages: tuple[dict[str, str], ...]) -> tuple[str, bool]:
    """The input as is, for base models: no instructions, no markup."""
    return content_text(request.messages[-1].content), False


_RENDERERS = {
    "generic": _chatml,
    "qwen3_template": _qwen3,
    "mistral_template": _mistral,
    "gemma3_template": _gemma3,
    "gemma4_template": _gemma4,
    "translategemma_template": _translategemma,
    "raw": _raw,
}

