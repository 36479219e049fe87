"""Grammar-constrained sampling that checks the grammar on the chosen token first.

llama-cpp-python puts llama.cpp's grammar sampler into the sampler chain, so the grammar is
applied to the whole vocabulary (49k tokens for SmolLM2) before every token: constrained decoding
then runs several times slower than free decoding. llama.cpp's own common sampler
(`common_sampler_sample`) does it the other way round, and this module does the same:

1. the chain *without* the grammar picks a token from the model's logits (greedy: the argmax);
2. the grammar judges only that token (a one-element candidate array);
3. only when it is rejected, the grammar masks the full candidate array and the chain picks again
   (greedy: the grammar first masks only the 256 highest logits, which settles most rejections);
4. the chosen token is accepted into the grammar and into the chain.

For greedy decoding the result is the token the full-vocabulary path picks: the argmax of the
masked logits is the unmasked argmax whenever the grammar allows that token. For temperature > 0
every token still satisfies the grammar, but an allowed first draw is kept and a rejection draws
again from the masked distribution, as in llama.cpp, so sampled text may differ from the stock
path's (whose single draw is from the masked distribution).

`GrammarSecondSampler` owns one native grammar sampler and frees it on `close()` (or when it is
collected), so thousands of calls leak nothing. It never logs: counts go to `DecodeStats`.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from typing import Any

import llama_cpp
import numpy as np
import numpy.typing as npt
from llama_cpp import _internals as internals
from llama_cpp.llama_grammar import LlamaGrammar

from service.llm.base import EngineError

# A rejected greedy token is replaced by the best allowed one among this many highest logits when
# that is certain to be the best allowed one overall (it usually is), before masking everything.
TOP_FIRST = 256

_TOKEN_DATA = np.dtype([("id", np.intc), ("logit", np.float32), ("p", np.float32)])


@dataclass
class DecodeStats:
    """Running counts of one engine (never any text or token id)."""

    tokens: int = 0  # tokens sampled under a grammar by the grammar-second sampler
    grammar_checks: int = 0  # single-token grammar checks
    fallbacks: int = 0  # checks that rejected the token
    full_masks: int = 0  # fallbacks that masked the whole vocabulary (not settled among the top logits)
    prompt_tokens_evaluated: int = 0  # prompt tokens the model actually read (after any reuse)
    prompt_tokens_reused: int = 0  # prompt tokens taken from the context or a kept prefix instead
    prefix_restores: int = 0  # calls that started from a kept template prefix
    prefix_saves: int = 0  # template prefixes evaluated and kept

    def snapshot(self) -> DecodeStats:
        return DecodeStats(**vars(self))


class Candidates:
    """A llama.cpp candidate array over the whole vocabulary, allocated once per model and reused
    by every call's sampler (one call at a time holds the model)."""

    def __init__(self, n_vocab: int) -> None:
        self.n_vocab = n_vocab
        self._ids = np.arange(n_vocab, dtype=np.intc)
        self._data = (llama_cpp.llama_token_data * n_vocab)()
        self.view: npt.NDArray[np.void] = np.frombuffer(memoryview(self._data), dtype=_TOKEN_DATA)
        self.array = llama_cpp.llama_token_data_array(
            data=ctypes.cast(self._data, llama_cpp.llama_token_data_p),
            size=n_vocab,
            selected=-1,
            sorted=False,
        )

    def fill(self, logits: npt.NDArray[np.float32], ids: npt.NDArray[np.intc] | None = None) -> Any:
        """The array holding every token with its logit in id order, or only the tokens `ids` (with
        `logits` theirs); a pointer for llama.cpp."""
        n = self.n_vocab if ids is None else len(ids)
        self.view["id"][:n] = self._ids if ids is None else ids
        self.view["logit"][:n] = logits
        self.view["p"][:n] = 0.0
        self.array.size = n
        self.array.selected = -1
        self.array.sorted = False
        return ctypes.byref(self.array)


class GrammarSecondSampler:
    """Stands in for llama-cpp-python's `LlamaSampler` in `Llama.sample` (which only calls
    `.sample(ctx, idx)`): the chain picks, the grammar checks that one token, and masks the whole
    vocabulary only when it rejects it."""

    def __init__(
        self,
        chain: internals.LlamaSampler,
        vocab: llama_cpp.llama_vocab_p,
        candidates: Candidates,
        grammar: LlamaGrammar,
        *,
        greedy: bool,
        stats: DecodeStats,
    ) -> None:
        self._chain = chain
        self._grammar: Any = llama_cpp.llama_sampler_init_grammar(
            vocab, grammar._grammar.encode("utf-8"), grammar._root.encode("utf-8")
        )
        if not self._grammar:
            raise EngineError("llama.cpp could not build a sampler from the request's grammar")
        self._candidates = candidates
        self._n_vocab = candidates.n_vocab
        # greedy = the chain is a bare argmax (temperature 0, no penalties, no logits processors),
        # so the first pick needs no candidate array at all.
        self._greedy = greedy
        self._stats = stats
        # Any: ctypes fields take plain ints and floats, whatever their stubs say
        self._one: Any = llama_cpp.llama_token_data(id=0, logit=1.0, p=0.0)
        self._one_array = llama_cpp.llama_token_data_array(
            data=ctypes.pointer(self._one), size=1, selected=-1, sorted=False
        )

    def sample(self, ctx: internals.LlamaContext, idx: int = -1) -> int:
        pointer = llama_cpp.llama_get_logits_ith(ctx.ctx, idx)
        return self.choose(np.ctypeslib.as_array(pointer, shape=(self._n_vocab,)))

    def choose(self, logits: npt.NDArray[np.float32]) -> int:
        """The next token for these logits (one per vocabulary entry), accepted into the grammar."""
        token = int(np.argmax(logits)) if self._greedy else self._pick(logits, masked=False)
        self._stats.grammar_checks += 1
        if not self._allows(token):
            self._stats.fallbacks += 1
            best = self._best_allowed_of_top(logits) if self._greedy else None
            if best is None:
                self._stats.full_masks += 1
                best = self._pick(logits, masked=True)
            token = best
        llama_cpp.llama_sampler_accept(self._grammar, token)
        self._chain.accept(token)
        self._stats.tokens += 1
        return token

    def _allows(self, token: int) -> bool:
        self._one.id = token
        self._one.logit = 1.0
        self._one_array.size = 1
        self._one_array.selected = -1
        self._one_array.sorted = False
        llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(self._one_array))
        return not math.isinf(self._one.logit)

    def _best_allowed_of_top(self, logits: npt.NDArray[np.float32]) -> int | None:
        """Greedy only: the masked argmax found among the `TOP_FIRST` highest logits, when it is
        certain to be the masked argmax over the whole vocabulary; None when it is not.

        The grammar judges each candidate on its own, so masking a subset marks the same tokens as
        masking everything. The best allowed token of the subset is the whole vocabulary's when its
        logit is above every logit left out (the subset holds all tokens above its lowest logit);
        among equal logits the lowest id wins, as with `np.argmax` and llama.cpp's greedy sampler.
        """
        if len(logits) <= TOP_FIRST:
            return None
        top = np.argpartition(logits, -TOP_FIRST)[-TOP_FIRST:].astype(np.intc)
        top_logits = logits[top]
        llama_cpp.llama_sampler_apply(self._grammar, self._candidates.fill(top_logits, top))
        masked = self._candidates.view["logit"][:TOP_FIRST]
        allowed = ~np.isinf(masked)
        if not allowed.any():
            return None
        best = masked[allowed].max()
        if not best > top_logits.min():
            return None  # a token left out may have the same logit (and a lower id)
        return int(top[allowed & (masked == best)].min())

    def _pick(self, logits: npt.NDArray[np.float32], *, masked: bool) -> int:
        """The chain's pick over the full candidate array, grammar-masked first when `masked`."""
        candidates = self._candidates.fill(logits)
        if masked:
            llama_cpp.llama_sampler_apply(self._grammar, candidates)
        view = self._candidates.view
        if self._greedy:  # the chain is a bare argmax: skip the ctypes round trip
            return int(view["id"][int(np.argmax(view["logit"]))])
        llama_cpp.llama_sampler_apply(self._chain.sampler, candidates)
        cur = self._candidates.array
        if not 0 <= cur.selected < cur.size:
            raise EngineError("llama.cpp's sampler chain selected no token")
        return int(cur.data[cur.selected].id)

    def close(self) -> None:
        if self._grammar is not None:
            llama_cpp.llama_sampler_free(self._grammar)
            self._grammar = None
        chain: Any = self._chain  # llama-cpp-python's sampler wrapper is untyped
        chain.close()

    def __del__(self) -> None:
        self.close()
