"""Stop strings, UTF-8 and reasoning markers across token boundaries."""

from __future__ import annotations

import queue
import random

import pytest

from llmpoold.textstream import (
    GenerationClock,
    IncrementalDetokenizer,
    ReasoningSplitter,
    StopFilter,
    TextPipeline,
    Utf8Stream,
    queue_items,
)
from llmpoold.types import BackendMetrics, CancelToken, TextDelta


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


# ----- TextPipeline and GenerationClock: what the local backends rely on -------------------


def texts(deltas: list[TextDelta], channel: str = "output") -> str:
    return "".join(d.text for d in deltas if d.channel == channel)


def test_pipeline_stop_across_pieces_ends_the_text_and_names_the_stop() -> None:
    pipe = TextPipeline(["<end_of_turn>"])
    out = [d for piece in ("Hi", " there<end", "_of_", "turn>tail") for d in pipe.push(piece)]
    assert texts(out) == "Hi there" and pipe.stopped and pipe.matched == "<end_of_turn>"
    assert pipe.push("more") == [] and pipe.finish() == []


def test_pipeline_bytes_hold_a_split_character_until_complete() -> None:
    data = "a👋b".encode()
    pipe = TextPipeline(decoder=Utf8Stream())
    steps = [pipe.push(data[i:i + 1]) for i in range(len(data))]
    assert [texts(s) for s in steps] == ["a", "", "", "", "👋", "b"]
    assert not pipe.stopped and pipe.finish() == []


def test_pipeline_token_ids_through_a_detokenizer() -> None:
    vocab = {1: b"Hel", 2: b"lo", 3: "é".encode()[:1], 4: "é".encode()[1:], 5: b" STOP", 6: b"x"}
    pipe = TextPipeline(["STOP"], decoder=IncrementalDetokenizer(
        lambda ids: b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")))
    out = [d for token in (1, 2, 3, 4, 5, 6) for d in pipe.push(token)] + pipe.finish()
    assert texts(out) == "Helloé " and pipe.matched == "STOP"


def test_pipeline_splits_reasoning_and_answer() -> None:
    pipe = TextPipeline(["<|im_end|>"], ("<think>", "</think>"))
    out = [d for piece in ("<thi", "nk>plan", "</think>\n\nAns", "wer<|im_", "end|>") for d in pipe.push(piece)]
    out += pipe.finish()
    assert texts(out, "reasoning") == "plan" and texts(out) == "Answer" and pipe.stopped


def test_pipeline_reasoning_open_starts_in_the_reasoning_channel() -> None:
    pipe = TextPipeline((), ("<think>", "</think>"), reasoning_open=True)
    out = pipe.push("hmm</think>ok") + pipe.finish()
    assert texts(out, "reasoning") == "hmm" and texts(out) == "ok"


def test_pipeline_finish_releases_held_text_in_order() -> None:
    """End of stream without a stop: the decoder's bytes, then the stop filter's held
    prefix, go through the splitter, then the splitter's own held text."""
    pipe = TextPipeline(["</answer>"], decoder=Utf8Stream())
    out = pipe.push(b"done </ans") + pipe.push("é".encode()[:1])
    assert texts(out) == "done "
    rest = pipe.finish()
    assert texts(rest) == "</ans\ufffd" and pipe.finish() == []


def test_pipeline_finish_flushes_an_unfinished_reasoning_block() -> None:
    pipe = TextPipeline((), ("<think>", "</think>"))
    assert pipe.push("<thi") == []
    assert pipe.finish() == [TextDelta("<thi")]
    pipe = TextPipeline(("STOP",), ("<think>", "</think>"))
    out = pipe.push("<think>a ST")
    assert texts(out + pipe.finish(), "reasoning") == "a ST"


def test_cancelled_finish_drops_what_the_decoder_and_stop_filter_hold() -> None:
    pipe = TextPipeline(["STOP"], decoder=Utf8Stream())
    out = pipe.push(b"ok ST") + pipe.push("👋".encode()[:2])
    assert texts(out) == "ok " and pipe.finish(cancelled=True) == [] and not pipe.stopped


def test_cancelled_finish_keeps_the_reasoning_already_split() -> None:
    pipe = TextPipeline((), ("<think>", "</think>"))
    out = pipe.push("<think>partial tho")
    out += pipe.finish(cancelled=True)
    assert texts(out, "reasoning") == "partial tho"


class FakeTime:
    """A clock the test moves by hand (no sleeping, no timing assertions on real time)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_clock_builds_the_metrics_from_its_marks() -> None:
    now = FakeTime()
    clock = GenerationClock(now=now)
    now.now += 0.002
    clock.tokenized()
    now.now += 0.1
    clock.first_token()
    now.now += 0.05
    clock.first_token()  # only the first counts
    now.now += 0.35
    m = clock.metrics(prompt_tokens=7, output_tokens=20)
    assert m == BackendMetrics(tokenize_ms=2.0, time_to_first_token_ms=100.0, generate_total_ms=500.0,
                               decode_after_first_token_ms=400.0, prompt_tokens=7, output_tokens=20,
                               tokens_per_second=40.0)


def test_clock_without_a_first_token_and_with_runtime_figures() -> None:
    now = FakeTime()
    clock = GenerationClock(now=now)
    clock.tokenized()
    now.now += 0.25
    m = clock.metrics(prompt_tokens=3, output_tokens=0)
    assert m.time_to_first_token_ms == 250.0 and m.decode_after_first_token_ms == 0.0
    assert m.tokens_per_second == 0.0
    measured = clock.metrics(prompt_tokens=3, output_tokens=10, cached_prompt_tokens=2, runtime_seconds=(0.5, 1.5))
    assert (measured.time_to_first_token_ms, measured.decode_after_first_token_ms, measured.generate_total_ms,
            measured.tokens_per_second, measured.cached_prompt_tokens) == (500.0, 1500.0, 2000.0, 5.0, 2)
    assert clock.partial(prompt_tokens=3) == BackendMetrics(tokenize_ms=0.0, prompt_tokens=3)


def test_queue_items_stop_at_cancel() -> None:
    source: queue.Queue[int] = queue.Queue()
    cancel = CancelToken()
    for i in range(3):
        source.put(i)
    seen = []
    for item in queue_items(source, cancel, poll_s=0.01):
        seen.append(item)
        if item == 1:
            cancel.set()
    assert seen == [0, 1]
