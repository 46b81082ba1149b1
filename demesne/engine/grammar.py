"""Grammar-constrained sampling (GBNF, llama.cpp's grammar sampler), one per sequence.

Beside runner.py the one engine module that touches llama_cpp. The batched sampler picks a
token as usual; only if the grammar rejects it is the row masked and sampled again, so a
constrained row costs little while the model follows the grammar.

The mask looks at the row's likeliest tokens first, in widening stages (:data:`STAGES`):
llama.cpp's grammar check costs about 0.1 µs a token, which is 28 ms over Gemma's 262,144
(half a 16-row decode step on this CPU) but 0.05 ms over 512 and 1.6 ms over 16,384. The
first stage with an allowed token decides; only when none has one is the whole vocabulary
checked. So a rejected token is replaced by one drawn from the allowed tokens among the
likeliest 512 (or 16,384), a cut far below what top-p or min-p would keep.
"""

from __future__ import annotations

import ctypes

import llama_cpp
import numpy as np

_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
STAGES = (512, 16384)  # candidates checked, likeliest first, before the whole vocabulary
TOP = STAGES[0]


class GrammarError(ValueError):
    """The grammar does not compile."""


class Grammars:
    """Makes grammar samplers for one vocabulary and holds the buffer they mask rows in."""

    def __init__(self, vocab, n_vocab: int):
        self.vocab = vocab
        self._full = np.zeros(n_vocab, _TOKEN_DATA)
        self._full["id"] = np.arange(n_vocab, dtype=np.int32)
        self._full_array = _token_array(self._full)
        self._one = np.zeros(1, _TOKEN_DATA)
        self._one_array = _token_array(self._one)
        self._stages = [np.zeros(size, _TOKEN_DATA) for size in STAGES if size < n_vocab]
        self._stage_arrays = [_token_array(stage) for stage in self._stages]
        self._masked = np.full(n_vocab, -np.inf, np.float32)
        self.masks = 0  # rows masked after the grammar rejected the sampled token
        self.full_masks = 0  # ...of which none of the likeliest STAGES[-1] tokens was allowed

    def new(self, text: str, triggers: list[str] | None = None, tokens: list[int] | None = None) -> Grammar:
        """A grammar sampler; with ``triggers`` (regexes whose first group marks where the
        grammar starts) or trigger ``tokens``, a lazy one that lets anything through until the
        output matches a pattern or one of the tokens is sampled."""
        triggers, tokens = triggers or [], tokens or []
        if not triggers and not tokens:
            sampler = llama_cpp.llama_sampler_init_grammar(self.vocab, text.encode("utf-8"), b"root")
        else:
            patterns = (ctypes.c_char_p * len(triggers))(*(t.encode("utf-8") for t in triggers))
            ids = (llama_cpp.llama_token * len(tokens))(*tokens)
            sampler = llama_cpp.llama_sampler_init_grammar_lazy_patterns(
                self.vocab, text.encode("utf-8"), b"root", patterns, len(triggers), ids, len(tokens)
            )
        if not sampler:
            raise GrammarError("the grammar does not compile")
        return Grammar(self, sampler)


class Grammar:
    def __init__(self, owner: Grammars, sampler):
        self._owner = owner
        self._sampler = sampler

    def allows(self, token: int) -> bool:
        one = self._owner._one
        one["id"], one["logit"] = token, 0.0
        self._apply(self._owner._one_array)
        return bool(np.isfinite(one["logit"][0]))

    def mask(self, row: np.ndarray) -> np.ndarray:
        """``row`` with every token the grammar forbids at -inf (a new array); among the
        likeliest tokens of the first stage that has an allowed one (see the module docstring)."""
        owner = self._owner
        owner.masks += 1
        for stage, array in zip(owner._stages, owner._stage_arrays):
            stage["id"] = np.argpartition(row, -stage.size)[-stage.size :]
            stage["logit"] = row[stage["id"]]
            self._apply(array)
            allowed = stage["id"][np.isfinite(stage["logit"])]
            if allowed.size:
                out = owner._masked.copy()
                out[allowed] = row[allowed]
                return out
        owner.full_masks += 1
        full = owner._full
        full["logit"] = row
        self._apply(owner._full_array)
        return full["logit"].copy()

    def accept(self, token: int) -> None:
        llama_cpp.llama_sampler_accept(self._sampler, token)

    def close(self) -> None:
        if self._sampler:
            llama_cpp.llama_sampler_free(self._sampler)
            self._sampler = None

    def _apply(self, array: llama_cpp.llama_token_data_array) -> None:
        array.selected = -1
        array.sorted = False
        llama_cpp.llama_sampler_apply(self._sampler, ctypes.byref(array))


def _token_array(buffer: np.ndarray) -> llama_cpp.llama_token_data_array:
    data = buffer.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data))
    return llama_cpp.llama_token_data_array(data=data, size=buffer.size, selected=-1, sorted=False)
