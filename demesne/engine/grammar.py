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
import re
from itertools import accumulate

import llama_cpp
import numpy as np

_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
STAGES = (512, 16384)  # candidates checked, likeliest first, before the whole vocabulary
TOP = STAGES[0]


# What llama.cpp's grammar parser is handed at most. It recurses once per nested group, and
# past about 20,000 levels overflows its stack (the process dies, nothing to catch; it refuses
# more than about 1,000 itself, but only after parsing); its check for left recursion
# recurses along chains of rules (a chain of 200,000 overflows, 10,000 take 2 s).
MAX_GRAMMAR_CHARS = 1 << 20
MAX_GRAMMAR_NESTING = 2048  # groups inside one another
MAX_GRAMMAR_RULES = 10_000  # named rules

# Text whose brackets are not grammar structure: string literals, character classes, comments.
_OPAQUE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|\[[^\]\\]*(?:\\.[^\]\\]*)*\]|#[^\n]*')
_GROUP = re.compile(r"[()]")


class GrammarError(ValueError):
    """The grammar does not compile, or is too big to hand to llama.cpp."""


def grammar_problem(text: str) -> str | None:
    """Why ``text`` must not reach llama.cpp's grammar parser (too long, too deep, too many
    rules), or None. Cheap: a regex pass and a count, no parsing."""
    if len(text) > MAX_GRAMMAR_CHARS:
        return f"the grammar is longer than {MAX_GRAMMAR_CHARS} characters"
    bare = _OPAQUE.sub(" ", text)
    groups = _GROUP.findall(bare)
    if bare.count("::=") > MAX_GRAMMAR_RULES:
        return f"the grammar has more than {MAX_GRAMMAR_RULES} rules"
    if max(accumulate(1 if g == "(" else -1 for g in groups), default=0) > MAX_GRAMMAR_NESTING:
        return f"the grammar nests groups deeper than {MAX_GRAMMAR_NESTING} levels"
    return None


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
        problem = grammar_problem(text)
        if problem:
            raise GrammarError(problem)
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
