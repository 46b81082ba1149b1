"""demesne.engine.scheduler with real Sequence objects and a model of llama.cpp's unified KV cache
(tests/fake_kv.py), stepped the way Engine.step does it: feed ``plan.node_chunks`` under the
nodes' seq ids and ``plan.chunks`` under the sequences' own, then ``trie.computed`` and
``n_computed``, then a sampled token for every private chunk that reached the end of its
sequence. After every step the KV cache is checked against the scheduler's books:

(a) the cells in use are exactly ``cells_used()``;
(b) every attached sequence's seq id is on one cell per position ``0..n_computed-1`` holding its
    own tokens (the shared part being its trie path's very cells, the rest its alone), and an
    unattached one holds none;
(c) every trie node's seq id is on one cell per position of its path computed so far.

The fake model samples a token from what the sequence attends to, so a sequence that saw any
other tokens would also sample a wrong one.
"""

from __future__ import annotations

import itertools
import random

import pytest

from demesne.engine.request import Sequence
from demesne.engine.scheduler import Scheduler, StepPlan
from demesne.protocol import SamplingParams
from fake_kv import FakeKV, check_trie, model

_bases = itertools.count(10_000, 1_000)


def seq(rid: str, n_prompt: int = 0, max_tokens: int = 1000, prompt: list[int] | None = None) -> Sequence:
    """A sequence with a prompt no other sequence shares unless ``prompt`` is given."""
    if prompt is None:
        base = next(_bases)
        prompt = list(range(base, base + n_prompt))
    return Sequence(
        rid=rid,
        client=b"gw",
        prompt_len=len(prompt),
        max_tokens=max_tokens,
        params=SamplingParams(),
        tokens=list(prompt),
    )


def expected_tokens(prompt: list[int], n: int) -> list[int]:
    """The prompt and ``n`` tokens the fake model samples after it, alone in a cache."""
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(model(tokens))
    return tokens


class Sim:
    """A Scheduler on a FakeKV, stepped as core.Engine.step does."""

    def __init__(self, n_cells, max_seqs, token_budget, max_waiting, prefix_cache=True, n_seq_ids=256):
        self.kv = FakeKV(n_cells, n_seq_ids)
        self.sched = Scheduler(
            n_cells=n_cells,
            max_seqs=max_seqs,
            token_budget=token_budget,
            max_waiting=max_waiting,
            kv=self.kv,
            prefix_cache=prefix_cache,
            n_seq_ids=n_seq_ids,
        )
        self.max_seqs = max_seqs
        self.node_ids = range(max_seqs, n_seq_ids)
        self.finished: list[Sequence] = []
        self.fed_nodes: list[tuple[int, int]] = []  # the last step's shared chunks: (position, tokens)

    def add(self, *seqs: Sequence) -> None:
        for s in seqs:
            assert self.sched.add(s)

    def step(self) -> StepPlan:
        sched = self.sched
        plan = sched.schedule()
        self.check_plan(plan)
        spans, outputs = [], []
        self.fed_nodes = []
        for node, n in plan.node_chunks:
            c = node.n_cached
            spans.append((node.seq_id, node.start + c, node.tokens[c : c + n], False))
            self.fed_nodes.append((node.start + c, n))
        for s, n in plan.chunks:
            start = s.n_computed
            last = start + n == len(s.tokens)
            spans.append((s.seq_id, start, s.tokens[start : start + n], last))
            if last:
                outputs.append(s)
        sampled = self.kv.decode(spans) if spans else []
        for s, n in plan.chunks:
            s.n_computed += n
        for node, n in plan.node_chunks:
            sched.trie.computed(node, n)
        for s, token in zip(outputs, sampled):
            assert token == model(s.tokens), f"{s.rid} attended to other tokens than its own"
            s.append(token)
            if s.n_generated >= s.max_tokens or len(s.tokens) >= sched.n_cells:
                sched.finish(s)
                self.finished.append(s)
        self.check()
        return plan

    def run(self, max_steps: int = 10_000) -> int:
        for n in range(max_steps):
            if not self.sched.has_work:
                return n
            self.step()
        raise AssertionError(f"work left after {max_steps} steps")

    def check_plan(self, plan: StepPlan) -> None:
        sched = self.sched
        assert plan.n_tokens <= sched.token_budget
        assert len({id(node) for node, _ in plan.node_chunks}) == len(plan.node_chunks)
        for node, n in plan.node_chunks:
            assert 0 < n <= len(node.tokens) - node.n_cached
            assert node.parent is sched.trie.root or node.parent.computed
        assert len({id(s) for s, _ in plan.chunks}) == len(plan.chunks)
        for s, n in plan.chunks:
            assert s in sched.running and s.attached and 0 < n <= s.n_remaining
        # Decode rows are never starved by prefill.
        planned = {id(s) for s, _ in plan.chunks}
        decoding = [s for s in sched.running if s.attached and s.n_remaining == 1]
        if any(id(s) not in planned for s in decoding):
            assert not plan.node_chunks and all(n == 1 for _, n in plan.chunks)

    def check(self) -> None:
        sched, kv = self.sched, self.kv
        paths = check_trie(sched.trie, kv, self.node_ids, [s.node for s in sched.running])
        assert kv.n_used() == sched.cells_used() <= sched.n_cells  # (a)
        ids = [s.seq_id for s in sched.running]
        assert len(set(ids)) == len(ids) and all(0 <= i < self.max_seqs for i in ids)
        assert set(sched.ids._free) | set(ids) == set(range(self.max_seqs)), "request seq ids leak"
        assert not set(sched.ids._free) & set(ids)
        for s in sched.waiting:
            assert s.seq_id == -1 and s.node is None and not s.attached and s.n_computed == 0
        for s in sched.running:
            self.check_sequence(s, paths)
        node_ids = {n.seq_id for n in paths if n is not sched.trie.root}
        assert kv.seq_ids() <= node_ids | set(ids), "cells held by a seq id nobody owns"

    def check_sequence(self, s: Sequence, paths) -> None:  # (b)
        held = self.kv.held(s.seq_id)
        if not s.attached:
            assert not held, f"{s.rid} holds cells before attaching"
            return
        assert s.n_shared == s.node.end and s.n_computed >= s.n_shared
        assert sorted(held) == list(range(s.n_computed)), f"{s.rid} holds positions {sorted(held)}"
        for p, cells in held.items():
            assert len(cells) == 1, f"{s.rid} has {len(cells)} cells at position {p}"
            cell = self.kv.cells[cells[0]]
            assert cell.token == s.tokens[p], f"{s.rid} sees a wrong token at position {p}"
            if p < s.n_shared:
                assert cells[0] == paths[s.node][p], f"{s.rid} at {p}: not its trie path's cell"
            else:
                assert cell.seqs == {s.seq_id}, f"{s.rid} at {p}: a private cell others hold"


def rows(plan: StepPlan) -> list[tuple[str, int]]:
    """The private chunks: (request id, tokens)."""
    return [(s.rid, n) for s, n in plan.chunks]

