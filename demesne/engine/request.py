"""A sequence's state and counters: what it holds in KV, what it generated, what is unsent."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..protocol import SamplingParams
from .prefix_cache import Node


@dataclass(slots=True, eq=False)
class Sequence:
    """One request inside the engine.

    ``tokens`` is everything that belongs in the KV cache in the end: the prompt, then each
    sampled token. While admitted, ``tokens[:-1]`` is a path in the prefix trie ending at
    ``node`` (shared with whoever else has that prefix); once that path is computed the
    sequence *attaches* to it and ``n_computed`` of its tokens are visible to its own seq id.
    A step feeds ``tokens[n_computed:]`` (or a chunk) privately; when the chunk reaches the
    end, its last row yields logits and the sampled token is appended. Decoding is the case
    of one token left. After a preemption the tokens are kept in the trie and matched again.
    """

    rid: str
    client: bytes  # the gateway's ZeroMQ identity, where deltas go
    prompt_len: int
    max_tokens: int
    params: SamplingParams
    tokens: list[int]
    rng: np.random.Generator | None = None
    seq_id: int = -1  # llama.cpp sequence id while running, -1 while waiting
    node: Node | None = None  # end of its path in the prefix trie while admitted
    attached: bool = False  # its seq id is on the path's cells
    n_shared: int = 0  # of n_computed, the tokens that came from the trie path
    n_cached: int = 0  # prompt tokens already in the trie at first admission
    n_computed: int = 0
    n_generated: int = 0
    n_sent: int = 0  # generated tokens already sent to the gateway
    finish: str | None = None
    counted: bool = False  # prompt tokens counted in the engine's totals
    logprobs: list = field(default_factory=list)  # unsent entries, one per unsent token
    bias_ids: np.ndarray | None = None  # logit_bias as arrays, built once
    bias_values: np.ndarray | None = None
    constraint: object | None = None  # constraints.Constraint while the output is constrained
    spec: object | None = None  # speculate.SpecState once it has been offered a draft

    @property
    def n_remaining(self) -> int:
        """Tokens not yet in KV."""
        return len(self.tokens) - self.n_computed

    def unsent(self) -> tuple[list[int], list | None]:
        """Generated tokens not sent yet, and their logprobs when the request wants them."""
        start = self.prompt_len + self.n_sent
        self.n_sent = self.n_generated
        tokens = self.tokens[start : self.prompt_len + self.n_generated]
        if self.params.logprobs < 0:
            return tokens, None
        logprobs, self.logprobs = self.logprobs, []
        return tokens, logprobs

    def append(self, token: int) -> None:
        self.tokens.append(token)
        self.n_generated += 1

    @property
    def n_private(self) -> int:
        """KV cells this sequence holds alone."""
        return self.n_computed - self.n_shared

    def reset_kv(self) -> None:
        """Forget KV state (preempted or finished)."""
        self.seq_id = -1
        self.node = None
        self.attached = False
        self.n_shared = 0
        self.n_computed = 0
