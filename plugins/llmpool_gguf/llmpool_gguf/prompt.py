"""From a request to prompt tokens, and from generated tokens to text deltas.

Two seams kept small on purpose: :func:`tokenize_prompt` is the only place a prompt is
tokenized, :class:`TextChain` the only place token bytes become text deltas
(``Utf8Stream`` → ``StopFilter`` → ``ReasoningSplitter``).
"""

from __future__ import annotations

from typing import Any

from llmpoold.errors import BackendError
from llmpoold.prompts import RenderedPrompt
from llmpoold.textstream import ReasoningSplitter, StopFilter, Utf8Stream
from llmpoold.types import GenerationRequest, TextDelta


def prompt_text(runtime: Any, request: GenerationRequest, rendered: RenderedPrompt) -> str:
    """The text to tokenize: the format's own rendering, or the GGUF's embedded template
    for ``chat_template``. ``gemma4_template`` prefers the embedded template, which carries
    Gemma 4's thinking switch (``enable_thinking``), as the seed does, and falls back to
    the rendered text for a GGUF without one."""
    gemma4_templated = (request.prompt_format == "gemma4_template"
                        and bool(runtime.engine.metadata("tokenizer.chat_template")))
    if rendered.text is None or gemma4_templated:
        return _chat_template_prompt(runtime, request, rendered.messages)
    return rendered.text


def _chat_template_prompt(runtime: Any, request: GenerationRequest, messages: Any) -> str:
    """Render the GGUF's embedded chat template (``tokenizer.chat_template``)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    engine = runtime.engine
    if runtime.chat_formatter is None:
        template = engine.metadata("tokenizer.chat_template")
        if not template:
            raise BackendError(400, "prompt_format_unsupported",
                               f"{runtime.model_path} has no embedded chat template; choose another prompt_format")
        runtime.chat_formatter = Jinja2ChatFormatter(template=template, eos_token=engine.token_text(engine.eos),
                                                     bos_token=engine.token_text(engine.bos))
    extra = {} if request.thinking is None else {"enable_thinking": request.thinking}
    return str(runtime.chat_formatter(messages=list(messages), **extra).prompt)


def tokenize_prompt(engine: Any, text: str) -> list[int]:
    """The prompt's tokens: ``text`` with special-token markup parsed, and the model's
    BOS first when the model wants one and the text did not write it (``raw``)."""
    tokens = engine.tokenize(text.encode("utf-8"), special=True)
    if engine.add_bos and engine.bos != -1 and tokens[:1] != [engine.bos]:
        tokens.insert(0, engine.bos)
    return tokens


class TextChain:
    """One request's generated token bytes → text deltas: split UTF-8 characters held
    until complete, stop strings never leaked, reasoning separated from the answer."""

    def __init__(self, rendered: RenderedPrompt) -> None:
        self._utf8 = Utf8Stream()
        self._stops = StopFilter(rendered.stops)
        self._splitter = ReasoningSplitter(rendered.reasoning_markers, inside=False)

    @property
    def stopped(self) -> bool:
        """A stop string has been matched: the request wants no more tokens."""
        return self._stops.stopped

    def push(self, piece: bytes) -> list[TextDelta]:
        return self._splitter.push(self._stops.push(self._utf8.push(piece)))

    def finish(self, *, cancelled: bool) -> list[TextDelta]:
        """What was held back, once generation has ended (nothing more after a stop
        string or a cancel)."""
        out = []
        if not self._stops.stopped and not cancelled:
            out += self._splitter.push(self._stops.push(self._utf8.flush()) + self._stops.flush())
        return out + self._splitter.flush()
