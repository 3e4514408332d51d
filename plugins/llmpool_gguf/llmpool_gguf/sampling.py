"""One request's token choice inside the decode loop (loop thread only).

A :class:`RequestSampler` holds the request's llama.cpp sampler chain (repetition
penalty, then greedy, or top-k, top-p, temperature and a draw, as llama-cpp-python's
``Llama.generate`` builds it) and, for ``response_format`` and forced tool calls, a
grammar sampler kept beside the chain rather than first in it.

Why beside: a grammar sampler checks every candidate token against the grammar, 262k of
them per step for a Gemma vocabulary, which made constrained decoding 4x slower than
free text. llama.cpp's own ``common_sampler_sample`` instead samples without the grammar,
checks only the chosen token, and samples again with the grammar applied to all
candidates only when that token is rejected. The result is the same token (a token the
grammar allows keeps the logits it had; the chain then picks as it would have), and most
steps cost one check. The grammar then accepts the token (it must never accept an
end-of-generation token it did not allow: llama.cpp aborts the process, so the check
comes first).

Plain greedy decoding with neither penalty nor grammar has no chain at all: the argmax
of the logits is the token llama.cpp's greedy sampler picks (the first of the highest),
without copying 262k candidates per token.
"""

from __future__ import annotations

import ctypes
import math
from typing import Any

import numpy as np

from llmpool_gguf.native import low as _low
from llmpoold.types import Decoding

# How many of the highest logits a greedy constrained step shows the grammar before all.
_LEADS = (64, 2048)
_CANDIDATE = np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)], align=True)


class RequestSampler:
    """The sampler of one request. Raises ValueError where llama.cpp cannot parse
    ``grammar``; :meth:`free` gives the llama.cpp objects back (call it once)."""

    def __init__(self, vocab: Any, n_vocab: int, decoding: Decoding, grammar: str | None, seed: int) -> None:
        low = _low()
        self.n_vocab = n_vocab
        self.chain: Any = None
        self.grammar: Any = None
        self._candidates: Any = None  # (numpy records, llama_token_data_array), made on first need
        if grammar is not None:
            self.grammar = low.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
            if not self.grammar:
                self.grammar = None
                raise ValueError("llama.cpp could not parse the grammar")
        greedy = decoding.temperature <= 0 or decoding.top_k == 1
        if greedy and decoding.repetition_penalty == 1.0:
            return
        chain = self.chain = low.llama_sampler_chain_init(low.llama_sampler_chain_default_params())
        if decoding.repetition_penalty != 1.0:
            low.llama_sampler_chain_add(chain, low.llama_sampler_init_penalties(
                n_vocab, 64, decoding.repetition_penalty, 0.0, 0.0))
        if greedy:
            low.llama_sampler_chain_add(chain, low.llama_sampler_init_greedy())
            return
        if decoding.top_k > 0:
            low.llama_sampler_chain_add(chain, low.llama_sampler_init_top_k(decoding.top_k))
        if decoding.top_p < 1.0:
            low.llama_sampler_chain_add(chain, low.llama_sampler_init_top_p(decoding.top_p, 1))
        low.llama_sampler_chain_add(chain, low.llama_sampler_init_temp(decoding.temperature))
        low.llama_sampler_chain_add(chain, low.llama_sampler_init_dist(seed or low.LLAMA_DEFAULT_SEED))

    def sample(self, ctx: Any, i_batch: int) -> int:
        """The next token from the logits of row ``i_batch``; the chain and the grammar
        have accepted it when this returns."""
        low = _low()
        if self.grammar is None:
            if self.chain is None:
                return int(self._logits(ctx, i_batch).argmax())
            return int(low.llama_sampler_sample(self.chain, ctx, i_batch))  # applies and accepts
        logits = self._logits(ctx, i_batch)
        token = self._pick(logits, constrained=False)
        if not self._allowed(token):
            token = self._pick(logits, constrained=True)
        return self._accept(token)

    def sample_grammar_first(self, ctx: Any, i_batch: int) -> int:
        """:meth:`sample` in the reference order (llama.cpp's ``grammar_first``): the
        grammar applied to every candidate, then the chain. The same tokens, about five
        times slower on a 262k vocabulary: for tests and the benchmark."""
        assert self.grammar is not None
        return self._accept(self._pick(self._logits(ctx, i_batch), constrained=True, leads=()))

    def _accept(self, token: int) -> int:
        low = _low()
        if self.chain is not None:
            low.llama_sampler_accept(self.chain, token)
        low.llama_sampler_accept(self.grammar, token)
        return token

    def free(self) -> None:
        low = _low()
        for sampler in (self.chain, self.grammar):
            if sampler is not None:
                low.llama_sampler_free(sampler)
        self.chain = self.grammar = None

    def _logits(self, ctx: Any, i_batch: int) -> Any:
        return np.ctypeslib.as_array(_low().llama_get_logits_ith(ctx, i_batch), shape=(self.n_vocab,))

    def _pick(self, logits: Any, *, constrained: bool, leads: tuple[int, ...] = _LEADS) -> int:
        """The chain's choice (or the argmax) over all candidates, the grammar applied
        first when ``constrained`` (under greedy decoding to the ``leads`` highest
        logits before all); nothing is accepted here."""
        if self.chain is None and not constrained:
            return int(logits.argmax())
        low = _low()
        if self.chain is None:
            # Greedy: the best token the grammar allows is the first allowed one in logit
            # order, so the grammar need only see the leading candidates (all of them only
            # when none of those is allowed).
            for lead in (n for n in leads if n < self.n_vocab):
                token = self._best_allowed(logits, lead)
                if token is not None:
                    return token
        records, array = self._fill(logits)
        if constrained:
            low.llama_sampler_apply(self.grammar, ctypes.byref(array))
        if self.chain is None:
            return int(records["id"][int(records["logit"][:array.size].argmax())])
        low.llama_sampler_apply(self.chain, ctypes.byref(array))
        return int(records["id"][array.selected])

    def _best_allowed(self, logits: Any, lead: int) -> int | None:
        """The highest-logit token among the ``lead`` highest that the grammar allows
        (ties: the lower id, as the argmax), or None."""
        low = _low()
        ids = np.argpartition(-logits, lead)[:lead]
        ids = ids[np.lexsort((ids, -logits[ids]))]
        records = np.empty(lead, dtype=_CANDIDATE)
        records["id"], records["logit"], records["p"] = ids, logits[ids], 0.0
        array = low.llama_token_data_array(data=records.ctypes.data_as(low.llama_token_data_p),
                                           size=lead, selected=-1, sorted=False)
        low.llama_sampler_apply(self.grammar, ctypes.byref(array))
        allowed = np.flatnonzero(~np.isinf(records["logit"][:array.size]))
        return int(records["id"][allowed[0]]) if len(allowed) else None

    def _fill(self, logits: Any) -> tuple[Any, Any]:
        low = _low()
        if self._candidates is None:
            records = np.empty(self.n_vocab, dtype=_CANDIDATE)
            array = low.llama_token_data_array(data=records.ctypes.data_as(low.llama_token_data_p),
                                               size=self.n_vocab, selected=-1, sorted=False)
            self._candidates = (records, array)
        records, array = self._candidates
        records["id"] = np.arange(self.n_vocab, dtype=np.intc)
        records["logit"] = logits
        records["p"] = 0.0
        array.size, array.selected, array.sorted = self.n_vocab, -1, False
        return records, array

    def _allowed(self, token: int) -> bool:
        """Whether the grammar lets ``token`` come next (an end-of-generation token only
        where the grammar is complete)."""
        low = _low()
        one = (low.llama_token_data * 1)(low.llama_token_data(token, 1.0, 0.0))
        array = low.llama_token_data_array(data=one, size=1, selected=-1, sorted=False)
        low.llama_sampler_apply(self.grammar, ctypes.byref(array))
        return not math.isinf(one[0].logit)
