"""Token log probabilities aligned with the text deltas (llmpoold.logprobs), and across
the worker wire."""

from __future__ import annotations

from llmpoold.logprobs import LogprobText, token_logprob
from llmpoold.replicas.wire import item_from_wire, item_to_wire
from llmpoold.textstream import TextPipeline, Utf8Stream
from llmpoold.types import TextDelta, TokenLogprob


def run(pieces: list[bytes], stops: tuple[str, ...] = (), markers: tuple[str, str] | None = None, *,
        cancelled: bool = False) -> list[TextDelta]:
    text = LogprobText(TextPipeline(stops, markers, decoder=Utf8Stream()))
    out: list[TextDelta] = []
    for i, piece in enumerate(pieces):
        out += text.push(piece, token_logprob(piece, -float(i)))
        if text.stopped:
            break
    return out + text.finish(cancelled=cancelled)


def tokens(deltas: list[TextDelta]) -> list[str]:
    return [e.token for d in deltas for e in d.logprobs]


def test_each_token_rides_on_the_delta_that_releases_its_text() -> None:
    deltas = run([b"Hello", b" wor", b"ld"])
    assert [(d.text, [e.token for e in d.logprobs]) for d in deltas] == [
        ("Hello", ["Hello"]), (" wor", [" wor"]), ("ld", ["ld"])]
    assert [e.logprob for d in deltas for e in d.logprobs] == [0.0, -1.0, -2.0]


def test_a_split_character_is_reported_with_the_token_that_completes_it() -> None:
    e_acute = "é".encode()
    deltas = run([b"caf", e_acute[:1], e_acute[1:], b"!"])
    assert [d.text for d in deltas] == ["caf", "é", "!"]
    assert [len(d.logprobs) for d in deltas] == [1, 2, 1]
    half = deltas[1].logprobs[0]
    assert half.token == "\ufffd" and half.bytes == (e_acute[0],)
    assert b"".join(bytes(e.bytes) for d in deltas for e in d.logprobs).decode() == "café!"


def test_tokens_inside_a_stop_string_are_never_reported() -> None:
    deltas = run([b"Paris", b".", b" EN", b"D", b" more"], stops=(" END",))
    assert "".join(d.text for d in deltas) == "Paris."
    assert tokens(deltas) == ["Paris", "."]
    # a token that straddles the stop string's start is reported: its text began the answer's end
    deltas = run([b"Paris", b". E", b"ND"], stops=(" END",))
    assert "".join(d.text for d in deltas) == "Paris." and tokens(deltas) == ["Paris", ". E"]


def test_held_text_released_at_the_end_brings_its_tokens() -> None:
    deltas = run([b"a", b" E", b"N"], stops=(" END",))  # held as a possible stop, then released
    assert "".join(d.text for d in deltas) == "a EN" and tokens(deltas) == ["a", " E", "N"]
    cancelled = run([b"a", b" E", b"N"], stops=(" END",), cancelled=True)
    assert "".join(d.text for d in cancelled) == "a" and tokens(cancelled) == ["a"]


def test_reasoning_markers_ride_with_the_text_after_them() -> None:
    deltas = run([b"<think>", b"hmm", b"</think>", b"\n\n", b"Yes"], markers=("<think>", "</think>"))
    assert [(d.channel, d.text) for d in deltas] == [("reasoning", "hmm"), ("output", "Yes")]
    assert tokens(deltas) == ["<think>", "hmm", "</think>", "\n\n", "Yes"]


def test_without_logprobs_nothing_is_attached() -> None:
    text = LogprobText(TextPipeline((), None, decoder=Utf8Stream()))
    assert text.push(b"Hi") == [TextDelta("Hi")] and text.finish() == []


def test_a_delta_with_logprobs_crosses_the_worker_wire() -> None:
    top = (TokenLogprob("Hi", -0.25, (72, 105)), TokenLogprob(" Hi", -1.5, (32, 72, 105)))
    delta = TextDelta("Hi", logprobs=(TokenLogprob("Hi", -0.25, (72, 105), top),))
    wire = item_to_wire(delta)
    assert item_from_wire(wire) == delta
    assert item_from_wire(item_to_wire(TextDelta("x"))) == TextDelta("x")
    assert "logprobs" not in item_to_wire(TextDelta("x"))  # requests without them send what they did
