"""What a request asks of its model against what the model can do (its
:class:`~llmpoold.types.Capabilities`): the seed's admission rules, in the seed's order.
Every refusal is an :class:`ApiError` 400 and the backend is never called."""

from __future__ import annotations

from llmpoold.errors import ApiError
from llmpoold.schemas import ResponseRequest
from llmpoold.types import Capabilities


def check_request(body: ResponseRequest, caps: Capabilities, name: str, *, prompt_format: str,
                  default_max_tokens: int) -> None:
    """Content types, multi-turn, thinking and reasoning controls, then
    :func:`check_requested_features`. ``name`` is the model's, ``prompt_format`` its
    format in force, ``default_max_tokens`` the engine's decoding default. An embedding
    model (``Capabilities.generation`` False) is refused first: 400 ``embeddings_only``."""
    if not caps.generation:
        raise ApiError(400, "embeddings_only", f"model '{name}' serves only embeddings (POST /openai/v1/embeddings)",
                       model=name, param="model")
    if _has_type(body, "file") and not caps.file_inputs:
        raise ApiError(400, "file_input_unsupported", f"model '{name}' does not support file inputs", model=name)
    for kind, modality in (("image_url", "image"), ("audio_url", "audio")):
        if _has_type(body, kind) and modality not in caps.modalities:
            raise ApiError(400, "modality_unsupported", f"model '{name}' does not support {modality} content",
                           model=name)
    if body.messages is not None and not caps.multi_turn:
        raise ApiError(400, "multi_turn_unsupported",
                       f"model '{name}' (prompt_format '{prompt_format}') does not support "
                       "multi-turn 'messages'; send 'input'", model=name)
    if body.thinking != "default" and body.thinking not in caps.thinking_modes:
        raise ApiError(400, "thinking_unsupported", f"model '{name}' does not support request-level thinking",
                       model=name)
    effort = body.reasoning_effort
    if effort is not None:
        if effort not in caps.reasoning_efforts:
            raise ApiError(400, "reasoning_effort_unsupported",
                           f"model '{name}' does not support reasoning_effort='{effort}'", model=name)
        if effort == "none" and body.thinking == "enabled":
            raise ApiError(400, "reasoning_control_conflict",
                           "reasoning_effort='none' conflicts with thinking='enabled'", model=name)
        if effort != "none" and body.thinking == "disabled":
            raise ApiError(400, "reasoning_control_conflict",
                           "a non-'none' reasoning_effort conflicts with thinking='disabled'", model=name)
    check_requested_features(body, caps, name, default_max_tokens)


def check_requested_features(body: ResponseRequest, caps: Capabilities, name: str, default_max_tokens: int) -> None:
    """The seed's ``thinking_token_budget`` and ``response_format`` admission, in its
    order (after the reasoning controls), then the OpenAI surfaces' tools, logprobs and raw
    prompts: ApiError 400 when the model cannot honour them (the backend is never called)."""
    budget = body.thinking_token_budget
    if budget is not None:
        effort = body.reasoning_effort
        refusal = (
            ("unsupported", f"model '{name}' does not support thinking_token_budget")
            if caps.thinking_token_budget is None else
            ("out_of_range", f"thinking_token_budget must be at most {caps.thinking_token_budget} for model '{name}'")
            if budget > caps.thinking_token_budget else
            ("requires_thinking", "thinking_token_budget requires enabled thinking")
            if not (body.thinking == "enabled" or (effort is not None and effort != "none")) else
            ("exhausts_output", "thinking_token_budget must be lower than decoding.max_tokens")
            if budget >= (body.decoding.max_tokens or default_max_tokens) else None)
        if refusal is not None:
            raise ApiError(400, f"thinking_token_budget_{refusal[0]}", refusal[1], model=name,
                           param="thinking_token_budget")
    fmt = body.effective_response_format
    if fmt is not None and fmt.type not in caps.response_formats:
        raise ApiError(400, "response_format_unsupported", f"model '{name}' does not support response_format",
                       model=name, param="response_format")
    agent = body.agent
    if agent is not None and agent.uses_tools and not caps.tools:
        raise ApiError(400, "tools_unsupported", f"model '{name}' does not support tool calling", model=name,
                       param="tools" if agent.tools else "messages")
    if agent is not None and agent.tools and agent.tool_choice in (None, "auto") and not caps.tools_auto:
        raise ApiError(400, "tools_unsupported",
                       f"model '{name}' cannot choose tools itself (tool_choice 'auto', the default with tools): "
                       "tool_choice 'required' or a named function works on this model", model=name,
                       param="tool_choice")
    if agent is not None and agent.logprobs is not None and not caps.logprobs:
        raise ApiError(400, "logprobs_unsupported",
                       f"model '{name}' does not return token log probabilities (logprobs)", model=name,
                       param="logprobs")
    if agent is not None and agent.raw_prompt and not caps.raw_prompt:
        raise ApiError(400, "completions_unsupported",
                       f"model '{name}' cannot continue a raw prompt (legacy completions); use chat completions",
                       model=name, param="prompt")


def _has_type(body: ResponseRequest, kind: str) -> bool:
    lists = [body.input] if isinstance(body.input, list) else []
    lists += [m.content for m in body.messages or [] if isinstance(m.content, list)]
    return any(item.type == kind for items in lists for item in items)
