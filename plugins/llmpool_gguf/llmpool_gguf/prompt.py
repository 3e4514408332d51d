"""From a request to prompt tokens, and from generated tokens to text deltas.

Two seams kept small on purpose: :func:`prompt_tokens` is the only place a prompt is
tokenized (template markup with special-token parsing, the client's text without it:
user text cannot forge turns), :func:`text_pipeline` the only place token bytes become
text deltas (the SDK's :class:`~llmpoold.textstream.TextPipeline` over UTF-8 bytes).
"""

from __future__ import annotations

from typing import Any

from llmpoold.errors import BackendError
from llmpoold.prompts import RenderedPrompt
from llmpoold.segments import PromptSegment, template_segments, tokenize_segments
from llmpoold.textstream import TextPipeline, Utf8Stream
from llmpoold.types import GenerationRequest


def prompt_segments(runtime: Any, request: GenerationRequest, rendered: RenderedPrompt,
                    tools: list[dict[str, Any]] | None = None, source: str | None = None) -> tuple[PromptSegment, ...]:
    """The prompt as segments: the format's own rendering, or the GGUF's embedded
    template for ``chat_template``. ``gemma4_template`` prefers the embedded template,
    which carries Gemma 4's thinking switch (``enable_thinking``), as the seed does, and
    falls back to the rendered prompt for a GGUF without one. ``tools``: function tools
    the template renders, ``source``: the GGUF's ``tool_use`` template to render instead
    of its default one (:mod:`llmpool_gguf.tools`)."""
    gemma4_templated = (request.prompt_format == "gemma4_template"
                        and bool(runtime.engine.metadata("tokenizer.chat_template")))
    if rendered.text is None or gemma4_templated:
        return template_segments(rendered.messages,
                                 lambda msgs: _chat_template_prompt(runtime, request, msgs, tools, source),
                                 _tokenizer(runtime.engine), model=request.model)
    return rendered.segments


def _chat_template_prompt(runtime: Any, request: GenerationRequest, messages: Any,
                          tools: list[dict[str, Any]] | None = None, source: str | None = None) -> str:
    """Render the GGUF's embedded chat template (``tokenizer.chat_template``), or ``source``
    (its ``tool_use`` template)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    engine = runtime.engine
    if runtime.chat_formatter is None:
        template = engine.metadata("tokenizer.chat_template")
        if not template:
            raise BackendError(400, "prompt_format_unsupported",
                               f"{runtime.model_path} has no embedded chat template; choose another prompt_format")
        runtime.chat_formatter = Jinja2ChatFormatter(template=template, eos_token=engine.token_text(engine.eos),
                                                     bos_token=engine.token_text(engine.bos))
    formatter = runtime.chat_formatter
    if source is not None:
        if runtime.tool_formatter is None:
            runtime.tool_formatter = Jinja2ChatFormatter(template=source, eos_token=engine.token_text(engine.eos),
                                                         bos_token=engine.token_text(engine.bos))
        formatter = runtime.tool_formatter
    extra: dict[str, Any] = {} if request.thinking is None else {"enable_thinking": request.thinking}
    if tools:
        extra["tools"] = tools
    return str(formatter(messages=list(messages), **extra).prompt)


def _tokenizer(engine: Any) -> Any:
    return lambda text, special: engine.tokenize(text.encode("utf-8"), special=special)


def prompt_tokens(runtime: Any, request: GenerationRequest, rendered: RenderedPrompt,
                  tools: list[dict[str, Any]] | None = None, source: str | None = None) -> list[int]:
    """The prompt's tokens (markup parsed as special tokens, text as text), and the
    model's BOS first when the model wants one and the prompt did not write it (``raw``)."""
    engine = runtime.engine
    tokens = tokenize_segments(prompt_segments(runtime, request, rendered, tools, source), _tokenizer(engine))
    if engine.add_bos and engine.bos != -1 and tokens[:1] != [engine.bos]:
        tokens.insert(0, engine.bos)
    return tokens


def text_pipeline(rendered: RenderedPrompt) -> TextPipeline:
    """One request's generated token bytes → text deltas: split UTF-8 characters held
    until complete, stop strings never leaked, reasoning separated from the answer."""
    return TextPipeline(rendered.stops, rendered.reasoning_markers, decoder=Utf8Stream())
