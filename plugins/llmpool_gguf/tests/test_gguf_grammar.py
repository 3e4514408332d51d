"""``response_format`` on the GGUF backend: a llama.cpp grammar sampler keeps the real
model's output inside the JSON schema (or inside JSON at all, for ``json_object``)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from llmpoold.errors import BackendError
from llmpoold.testing import Colour, Person, collect, make_request
from llmpoold.types import Completion, TextDelta

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.timeout(300)


def run(registry: Any, runtime: Any, text: str, response_format: dict[str, Any] | None,
        max_tokens: int = 200) -> tuple[str, Completion]:
    request = dataclasses.replace(make_request(model="g", prompt_format="raw", text=text, max_tokens=max_tokens),
                                  response_format=response_format)
    items = collect(registry.hook.llmpool_stream(backend="gguf", runtime=runtime, request=request))
    assert isinstance(items[-1], Completion)
    return "".join(i.text for i in items[:-1] if isinstance(i, TextDelta)), items[-1]


def test_json_schema_output_validates(registry: Any, runtime: Any) -> None:
    schema = {"type": "json_schema", "json_schema": {"name": "Person", "schema": Person.model_json_schema()}}
    text, done = run(registry, runtime, "A person as JSON:", schema)
    assert done.finish_reason == "stop", text  # the grammar let the model end: the JSON is complete
    person = Person.model_validate_json(text)
    assert isinstance(person.favourite, Colour) and isinstance(person.address.zip_code, int)
    free, _ = run(registry, runtime, "A person as JSON:", None, max_tokens=24)
    with pytest.raises(ValueError):  # the guard: without the grammar the same prompt is no such JSON
        Person.model_validate_json(free)


def test_json_object_output_is_a_json_object(registry: Any, runtime: Any) -> None:
    text, done = run(registry, runtime, "The capital of France is", {"type": "json_object"})
    assert done.finish_reason == "stop", text
    assert isinstance(json.loads(text), dict)


def test_schema_the_converter_cannot_express_is_a_400(registry: Any, runtime: Any) -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/missing"}}}
    with pytest.raises(BackendError) as err:
        run(registry, runtime, "x", bad)
    assert (err.value.status, err.value.code) == (400, "invalid_response_format")


def test_traits_declare_the_formats(registry: Any, model: Any) -> None:
    traits = registry.hook.llmpool_model_traits(backend="gguf", model=model)
    assert traits.capabilities.response_formats == ("text", "json_schema", "json_object")


def test_checking_the_chosen_token_gives_the_grammar_first_tokens(registry: Any, runtime: Any,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The sampler shows the grammar the chosen token, then the leading candidates, and
    all 262k only when none of those is allowed (llmpool_gguf.sampling). Its tokens must
    be those of the grammar applied to every candidate first, then the argmax."""
    from llmpool_gguf.sampling import RequestSampler

    schema = {"type": "json_schema", "json_schema": {"name": "Person", "schema": Person.model_json_schema()}}
    run(registry, runtime, "A person as JSON:", schema)  # both runs below then start from the same cached prompt
    checked = [run(registry, runtime, "A person as JSON:", fmt)[0] for fmt in (schema, {"type": "json_object"})]

    monkeypatch.setattr(RequestSampler, "sample", RequestSampler.sample_grammar_first)
    reference = [run(registry, runtime, "A person as JSON:", fmt)[0] for fmt in (schema, {"type": "json_object"})]
    assert checked == reference
    assert Person.model_validate_json(checked[0])  # json_object's free JSON may run past the budget here
