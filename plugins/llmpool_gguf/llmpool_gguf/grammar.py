"""``response_format`` as a llama.cpp grammar (GBNF).

``json_schema`` goes through llama-cpp-python's port of llama.cpp's
``json-schema-to-grammar`` (:func:`llama_cpp.llama_grammar.json_schema_to_gbnf`);
``json_object`` is llama.cpp's ``grammars/json.gbnf`` (any JSON object). The engine puts a
``llama_sampler_init_grammar`` sampler first in the request's chain, so every sampled token
keeps the text a prefix of a sentence of the grammar, and end-of-generation is only
allowed once the JSON is complete.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from llmpoold.errors import BackendError


def grammar_for(response_format: Mapping[str, Any] | None, model: str) -> str | None:
    """The GBNF text (root rule ``root``) enforcing ``response_format``; None for free text.

    Raises a 400 ``invalid_response_format`` where the schema uses what the converter
    cannot express (an unresolvable ``$ref``, an unsupported ``format``...)."""
    if response_format is None or response_format.get("type", "text") == "text":
        return None
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    if response_format["type"] == "json_object":
        return JSON_GBNF
    schema = response_format["json_schema"]["schema"]
    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter raises bare Exception/ValueError/KeyError/AssertionError
        raise BackendError(400, "invalid_response_format",
                           f"model '{model}' cannot enforce this json_schema: {exc}") from None
