"""Where a request waits before it is admitted, and what each step feeds the model. Pure Python.

Each step gets a token budget (``--batch-size``). Running sequences with one token left
(decoding) come first, one row each, so streams keep flowing; the rest of the budget goes to
prompt chunks, oldest sequence first, so a long prompt is prefilled over several steps.

KV cells are one shared pool. A waiting sequence is admitted only when its whole remaining
prompt fits beside what running prefills still need; when decoding sequences outgrow the
pool, the newest running sequence is preempted: its cells are freed and it waits again at
the head of the queue, keeping its generated tokens, to be prefilled anew (recompute
preemption). A full cache therefore delays requests, never fails them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .request import Sequence


class SeqIdPool:
    """Hands out llama.cpp sequence ids ``0 .. n-1``; lowest free id first."""

    def __init__(self, n: int):
        self._free = list(range(n - 1, -1, -1))

    def acquire(self) -> int | None:
        return self._free.pop() if self._free else None

    def release(self, seq_id: int) -> None:
        self._free.append(seq_id)
        self._free.sort(reverse=True)

    @property
    def n_free(self) -> int:
        return len(self._free)


@dataclass(slots=True)
class StepPlan:
    chunks: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens fed)
    dropped: list[int] = field(default_factory=list)  # seq ids of preempted sequences: drop their KV

    @property
    def n_tokens(self) -> int:
        return sum(n for _, n in self.chunks)


class Scheduler:
    def __init__(self, n_cells: int, max_seqs: int, token_budget: int, max_waiting: int):
        self.n_cells = n_cells
        self.token_budget = token_budget
        self.max_waiting = max_waiting
        self.ids = SeqIdPool(max_seqs)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.n_preemptions = 0

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def cells_used(self) -> int:
        return sum(s.n_computed for s in self.running)

    def add(self, seq: Sequence) -> bool:
        """Queue a new sequence; False when the queue is full."""
        if len(self.waiting) >= self.max_waiting:
            return False
        self.waiting.append(seq)
        return True

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out (finished or aborted); the caller drops its KV."""
        if seq.seq_id >= 0:
            self.running.remove(seq)
            self.ids.release(seq.seq_id)
        else:
            self.waiting.remove(seq)

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        while True:
            self._preempt_for_decode(plan)
            if not plan.dropped:  # a sequence preempted now must not be readmitted at once
                self._admit()
            self._plan_chunks(plan)
            if plan.chunks or not self.running:
                return plan
            # Every running sequence is stuck on cells held by the others: free the newest.
            plan.dropped.append(self.preempt(self.running[-1]))

    def _preempt_for_decode(self, plan: StepPlan) -> None:
        decoding = sum(1 for s in self.running if s.n_remaining == 1)
        while self.running and self.n_cells - self.cells_used() < decoding:
            victim = self.running[-1]
            decoding -= victim.n_remaining == 1
            plan.dropped.append(self.preempt(victim))

    def preempt(self, seq: Sequence) -> int:
        """Send a running sequence back to the head of the queue; returns the id to drop."""
        seq_id = seq.seq_id
        self.running.remove(seq)
        self.ids.release(seq_id)
        seq.reset_kv()
        self.waiting.appendleft(seq)
        self.n_preemptions += 1
        return seq_id

    def _admit(self) -> None:
        # Cells that running prefills will still take, so admission does not starve them.
        promised = sum(s.n_remaining for s in self.running if s.n_remaining > 1)
        free = self.n_cells - self.cells_used() - promised
        while self.waiting and self.ids.n_free:
            seq = self.waiting[0]
            need = seq.n_remaining + 1  # its prompt, and room for the first generated token
            if need > free:
                break
            self.waiting.popleft()
            seq.seq_id = self.ids.acquire()
            self.running.append(seq)
            free -= need

    def _plan_chunks(self, plan: StepPlan) -> None:
        budget = self.token_budget
        free = self.n_cells - self.cells_used()
        # Decoding rows first (stable sort keeps admission order within each group).
        for seq in sorted(self.running, key=lambda s: s.n_remaining > 1):
            n = min(seq.n_remaining, budget, free)
            if n <= 0:
                continue
            plan.chunks.append((seq, n))
            budget -= n
            free -= n
