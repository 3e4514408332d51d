"""Prompt rendering per format: the seed's exact texts, stops and refusals."""

from __future__ import annotations

from dataclasses import replace

import pytest

from llmpoold.errors import ApiError
from llmpoold.prompts import FORMATS, capabilities_for, merge_stops, render
from llmpoold.testing import make_request
from llmpoold.types import Message


def req(fmt: str, **kwargs: object):
    return make_request(prompt_format=fmt, text="Hi", instructions="Be brief.", **kwargs)


def test_generic_is_chatml_with_native_stop() -> None:
    out = render(req("generic", stop=("END", "", "<|im_end|>")))
    assert out.text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                        "<|im_start|>assistant\n")
    assert out.stops == ("<|im_end|>", "END")


def test_qwen3_suppresses_thinking_unless_enabled() -> None:
    off = render(req("qwen3_template"))
    assert "/no_think\nHi" in off.text and off.text.endswith("<think>\n\n</think>\n\n")
    assert off.thinking_prefilled
    on = render(replace(make_request(prompt_format="qwen3_template", text="Hi"), thinking=True))
    assert "/no_think" not in on.text and on.reasoning_markers == ("<think>", "</think>")


def test_mistral_and_gemma_texts() -> None:
    assert render(req("mistral_template")).text == "<s>[INST] Be brief.\n\nHi [/INST]"
    assert render(req("gemma3_template")).text == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n")
    g4 = render(req("gemma4_template"))
    assert g4.text.startswith("<bos><start_of_turn>system\nBe brief.<end_of_turn>\n")
    assert g4.stops == ("<turn|>", "<end_of_turn>")


def test_multi_turn_rendering_keeps_turn_order() -> None:
    request = make_request(prompt_format="gemma3_template", text="x", instructions="Sys")
    request = replace(request, messages=(Message("user", "a"), Message("assistant", "b"), Message("user", "c")),
                      multi_turn=True)
    text = render(request).text
    assert text.index("Sys\n\na") < text.index("<start_of_turn>model\nb") < text.index("user\nc")


def test_single_turn_formats_refuse_conversations() -> None:
    request = make_request(prompt_format="raw", text="x")
    request = replace(request, messages=(Message("user", "a"), Message("assistant", "b"), Message("user", "c")),
                      multi_turn=True)
    with pytest.raises(ApiError) as info:
        render(request)
    assert info.value.status == 400 and info.value.code == "multi_turn_unsupported"


def test_translategemma_rules() -> None:
    with pytest.raises(ApiError, match="requires request.target_lang_code"):
        render(req("translategemma_template"))
    base = make_request(prompt_format="translategemma_template", text="Hallo")
    out = render(replace(base, target_lang_code="en", source_lang_code="de"))
    assert "de to en translator" in out.text and out.text.endswith("Hallo<end_of_turn>\n<start_of_turn>model\n")
    auto = render(replace(base, target_lang_code="fr", source_lang_code="AUTO"))
    assert "Detect the source language" in auto.text and "en to fr" in auto.text


def test_chat_template_is_left_to_the_runtime() -> None:
    out = render(req("chat_template"))
    assert out.text is None and out.messages[0] == {"role": "system", "content": "Be brief."}


def test_unknown_format_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="known: chat_template, gemma3_template"):
        render(req("nope"))


def test_capabilities_follow_the_format() -> None:
    assert capabilities_for("qwen3_template").thinking_modes == ("default", "enabled", "disabled")
    assert capabilities_for("raw").multi_turn is False
    assert set(FORMATS) >= {"generic", "qwen3_template", "mistral_template", "gemma4_template",
                            "translategemma_template", "gemma3_template", "chat_template", "raw"}
    assert merge_stops(["a", ""], ["b", "a"]) == ("a", "b")
