"""Token log probabilities aligned with the text deltas (llmpoold.logprobs), and across
the worker wire."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai

from llmpoold import hookimpl
from llmpoold.hookspecs import BackendSpec
from llmpoold.http.app import create_app
from llmpoold.http.keys import POOL
from llmpoold.logprobs import LogprobText, token_logprob
from llmpoold.replicas.wire import item_from_wire, item_to_wire
from llmpoold.testing import make_registry, settings_from
from llmpoold.textstream import TextPipeline, Utf8Stream
from llmpoold.types import BackendMetrics, Capabilities, Completion, ModelTraits, TextDelta, TokenLogprob


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


def scored(text: str, logprob: float) -> TokenLogprob:
    return token_logprob(text.encode(), logprob)


class ScriptedScores:
    """A stand-in for a runtime that scores its tokens (the real one, GGUF, is in
    tests/test_openai_gguf.py): an answer wrapped in whitespace that the daemon strips,
    and a reasoning token."""

    @staticmethod
    @hookimpl
    def llmpool_backends() -> list[BackendSpec]:
        return [BackendSpec(name="scripted", requires_model_path=False)]

    @staticmethod
    @hookimpl
    def llmpool_model_traits(backend: str, model: Any) -> ModelTraits | None:
        return ModelTraits(capabilities=Capabilities(logprobs=True)) if backend == "scripted" else None

    @staticmethod
    @hookimpl
    def llmpool_load(backend: str, replica_id: str, model: Any) -> object | None:
        return object() if backend == "scripted" else None

    @staticmethod
    @hookimpl
    def llmpool_stream(backend: str, runtime: Any, request: Any) -> Iterator[Any] | None:
        if backend != "scripted":
            return None
        assert request.logprobs is not None
        return iter([TextDelta("hmm", channel="reasoning", logprobs=(scored("hmm", -0.5),)),
                     TextDelta("\n", logprobs=(scored("\n", -0.1),)), TextDelta("Hi", logprobs=(scored("Hi", -0.2),)),
                     TextDelta(" there ", logprobs=(scored(" there ", -0.3),)),
                     TextDelta("\n", logprobs=(scored("\n", -0.4),)),
                     Completion(finish_reason="stop", metrics=BackendMetrics(output_tokens=5))])

    @staticmethod
    @hookimpl
    def llmpool_unload(backend: str, runtime: Any) -> bool | None:
        return True if backend == "scripted" else None


async def test_tokens_of_stripped_whitespace_are_still_reported(aiohttp_client: Any) -> None:
    """The daemon strips the answer's surrounding whitespace: the tokens of the leading
    whitespace ride with the first text, those of the trailing whitespace come on a last
    chunk of no text; reasoning tokens get none (OpenAI's shapes have no place for them)."""
    app = create_app(settings_from({"engine": {"models": {"s": {"backend": "scripted", "isolation": "inline"}}}}),
                     make_registry(ScriptedScores()))
    client = await aiohttp_client(app)
    await app[POOL].startup_done.wait()
    aio = openai.AsyncOpenAI(base_url=str(client.make_url("/openai/v1")), api_key="k", max_retries=0)
    ask: dict[str, Any] = {"model": "s", "messages": [{"role": "user", "content": "x"}], "logprobs": True}
    done = await aio.chat.completions.create(**ask)
    assert done.choices[0].message.content == "Hi there"
    assert done.choices[0].logprobs is not None and done.choices[0].logprobs.content is not None
    assert [(e.token, e.logprob) for e in done.choices[0].logprobs.content] == [
        ("\n", -0.1), ("Hi", -0.2), (" there ", -0.3), ("\n", -0.4)]
    chunks = [c.choices[0] async for c in await aio.chat.completions.create(stream=True, **ask) if c.choices]
    content = [(c.delta.content, [e.token for e in c.logprobs.content or ()]) for c in chunks
               if c.logprobs is not None]
    assert content == [("Hi", ["\n", "Hi"]), (" there", [" there "]), ("", ["\n"])]
