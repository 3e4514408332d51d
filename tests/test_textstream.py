"""Stop strings, UTF-8 and reasoning markers across token boundaries."""

from __future__ import annotations

import random

import pytest

from llmpoold.textstream import IncrementalDetokenizer, ReasoningSplitter, StopFilter, Utf8Stream


def feed(stops: list[str], pieces: list[str]) -> tuple[list[str], StopFilter]:
    f = StopFilter(stops)
    out = [f.push(p) for p in pieces]
    out.append(f.flush())
    return out, f


def test_stop_split_across_tokens_never_leaks() -> None:
    out, f = feed(["<|im_end|>"], ["Hello", " world", "<|im", "_e", "nd|>", "ignored"])
    assert "".join(out) == "Hello world"
    assert f.stopped and f.matched == "<|im_end|>"
    assert all("<" not in piece for piece in out), "no prefix of the stop string is ever emitted"


def test_partial_stop_prefix_is_released_when_it_does_not_complete() -> None:
    out, f = feed(["</s>"], ["a <", "/b> c"])
    assert "".join(out) == "a </b> c" and not f.stopped
    assert out[0] == "a ", "the '<' waits until it cannot start a stop"


def test_earliest_of_several_stops_wins_and_remainder_is_kept() -> None:
    out, f = feed(["STOP", "END"], ["xx END yy STOP"])
    assert out[0] == "xx " and f.matched == "END" and f.remainder == " yy STOP"


@pytest.mark.parametrize("seed", range(20))
def test_random_splits_give_the_same_text(seed: int) -> None:
    rng = random.Random(seed)
    text = "The answer is 42.\n\nQ: next<end_of_turn>tail"
    cuts = sorted(rng.sample(range(1, len(text)), 8))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    out, _ = feed(["<end_of_turn>", "\n\nQ:"], pieces)
    assert "".join(out) == "The answer is 42."


def test_utf8_split_inside_a_character_is_held() -> None:
    data = "héllo 👋 wörld".encode()
    stream = Utf8Stream()
    pieces = [stream.push(data[i:i + 1]) for i in range(len(data))]
    assert "".join(pieces) + stream.flush() == "héllo 👋 wörld"
    assert all("\ufffd" not in p for p in pieces)
    emoji = "👋".encode()
    s = Utf8Stream()
    assert s.push(emoji[:2]) == "" and s.push(emoji[2:]) == "👋"


def test_utf8_invalid_bytes_become_replacement_not_an_exception() -> None:
    s = Utf8Stream()
    assert s.push(b"ok\xff") == "ok\ufffd"
    assert s.push(b"\xf0\x9f") == "" and s.flush() == "\ufffd"


def test_incremental_detokenizer_waits_for_complete_characters() -> None:
    vocab = {1: b"H", 2: b"i ", 3: "👋".encode()[:2], 4: "👋".encode()[2:], 5: b"!"}

    def decode(ids: list[int]) -> str:
        return b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")

    detok = IncrementalDetokenizer(decode)
    out = [detok.push(i) for i in (1, 2, 3, 4, 5)]
    assert out == ["H", "i ", "", "👋", "!"]
    assert detok.flush() == "" and detok.text == "Hi 👋!"


def split(markers: tuple[str, str], pieces: list[str], *, inside: bool = False) -> tuple[str, str]:
    splitter = ReasoningSplitter(markers, inside=inside)
    deltas = [d for p in pieces for d in splitter.push(p)] + splitter.flush()
    reasoning = "".join(d.text for d in deltas if d.channel == "reasoning")
    output = "".join(d.text for d in deltas if d.channel == "output")
    return reasoning, output


def test_reasoning_block_split_across_tokens() -> None:
    reasoning, output = split(("<think>", "</think>"), ["<th", "ink>", "let me", " think</th", "ink>\n\nAnswer", "."])
    assert reasoning == "let me think" and output == "Answer."


def test_no_reasoning_block_is_all_output() -> None:
    assert split(("<think>", "</think>"), ["<", "b>bold</b>"]) == ("", "<b>bold</b>")
    assert split(("<|channel>thought", "<channel|>"), ["Plain answer"]) == ("", "Plain answer")


def test_unterminated_reasoning_gives_empty_answer() -> None:
    assert split(("<|channel>thought", "<channel|>"), ["<|channel>thought", "\nhmm"]) == ("\nhmm", "")
