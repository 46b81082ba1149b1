"""Where a request waits before it is admitted, and what each step feeds the model. Pure Python
apart from the KV operations it asks of ``kv`` (the runner) through the prefix trie.

Admission puts ``tokens[:-1]`` of a sequence into the prefix trie (prefix_cache.py): what
other in-flight or recent sequences share is matched, the rest becomes a new branch. A step
then feeds, within the token budget (``--batch-size``):

1. one row for each attached sequence: it has exactly one token not in KV (the last prompt
   token, whose logits give the first sampled token, or the last sampled one);
2. chunks of trie nodes not yet computed, each once, whoever waits on it.

A sequence whose trie path is computed *attaches*: its seq id joins the path's cells, and
everything but its last token is then in KV.

KV cells are one pool. Unheld trie leaves are evicted (least recently used first) before
anything waits for room. A waiting sequence is admitted only when what it lacks fits; when
decoding sequences outgrow the pool, the newest running sequence is preempted: its tokens
stay in the trie, its seq id is freed, and it waits at the head of the queue to be matched
again (recompute preemption, cheap when the trie still has its tokens). A full cache
therefore delays requests, never fails them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .prefix_cache import IdPool, KVOps, Node, RadixTrie
from .request import Sequence
from .tiers import Tiers

@dataclass(slots=True)
class StepPlan:
    chunks: list[tuple[Sequence, int]] = field(default_factory=list)  # private: (sequence, tokens)
    # Shared: (trie node, tokens, the seq ids its tokens carry: its own first, then those of
    # the nodes and sequences below it that compute or attach in this same step).
    node_chunks: list[tuple[Node, int, list[int]]] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return sum(n for _, n in self.chunks) + sum(n for _, n, _ in self.node_chunks)

    def __bool__(self) -> bool:
        return bool(self.chunks or self.node_chunks)


class Scheduler:
    def __init__(
        self,
        n_cells: int,
        max_seqs: int,
        token_budget: int,
        max_waiting: int,
        kv: KVOps,
        prefix_cache: bool = True,
        n_seq_ids: int = 256,
        max_kept_cells: int | None = None,
        tiers: Tiers | None = None,
        n_swa: int = 0,
    ):
        self.n_cells = n_cells
        self.token_budget = token_budget
        self.max_waiting = max_waiting
        self.kv = kv
        self.ids = IdPool(range(max_seqs))  # request seq ids; the trie has the rest
        # Sequence ids 0..max_seqs-1 are the requests'; the trie's nodes take the rest.
        self.tiers = tiers if prefix_cache else None
        self.trie = RadixTrie(
            kv, range(max_seqs, n_seq_ids), enabled=prefix_cache, n_swa=n_swa,
            on_evict=self.tiers.on_evict if self.tiers else None,
        )
        if self.tiers:
            self.tiers.trie = self.trie
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.n_preemptions = 0
        # Cells the trie may keep for nobody: every kept cell widens the attention window
        # of every decode step (a unified cache attends over all its used cells, masked).
        self.max_kept_cells = n_cells // 4 if max_kept_cells is None else max_kept_cells

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def cells_used(self) -> int:
        return self.trie.n_cells + sum(s.n_private for s in self.running)

    def free_cells(self) -> int:
        return self.n_cells - self.cells_used()

    def spare_cells(self, n_planned: int) -> int:
        """Cells left for draft tokens once the ``n_planned`` tokens of this step's plan are in."""
        return self.free_cells() - n_planned

    def add(self, seq: Sequence) -> bool:
        """Queue a new sequence; False when the queue is full."""
        if len(self.waiting) >= self.max_waiting:
            return False
        self.waiting.append(seq)
        return True

    def finish(self, seq: Sequence) -> None:
        """Take a sequence out (finished or aborted); the trie keeps what it computed."""
        if seq.seq_id >= 0:
            self.running.remove(seq)
            self._release(seq)
        else:
            self.waiting.remove(seq)

    def preempt(self, seq: Sequence) -> None:
        """Send a running sequence back to the head of the queue."""
        self.running.remove(seq)
        self._release(seq)
        self.waiting.appendleft(seq)
        self.n_preemptions += 1

    def detach(self, seq: Sequence) -> None:
        """Undo an attach whose step did not run: the sequence waits on its path again."""
        self.kv.remove(seq.seq_id)
        seq.attached = False
        seq.n_computed = seq.n_shared = 0

    def decoded(self) -> None:
        """A decode ran (nothing to do: the trie learns per chunk, see Engine._run)."""

    def cache_stats(self) -> dict[str, float]:
        return {"prefix_cache_nodes": self.trie.n_nodes, "prefix_cache_cells": self.trie.n_cells}

    def drop_cached(self) -> None:
        """Evict every trie leaf nobody holds (to the tiers, if worth it)."""
        self.trie.evict(1 << 62)

    def spill(self) -> None:
        """Hand every unheld trie leaf to the tiers (shutdown with a disk tier)."""
        self.trie.evict(1 << 62)

    def _release(self, seq: Sequence) -> None:
        if seq.attached:
            self.trie.retain(seq.seq_id, seq.tokens[: seq.n_computed])
        self.kv.remove(seq.seq_id)
        self.trie.unlock(seq.node)
        self.ids.release(seq.seq_id)
        seq.reset_kv()
        over = self.trie.evictable_cells() - self.max_kept_cells
        if over > 0:
            self.trie.evict(over)

    # -- one step ------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        while True:
            preempted = self._make_room_for_decode()
            if not preempted:  # a sequence preempted now must not be readmitted at once
                self._admit()
            plan = self._plan()
            if plan or not self.running:
                return plan
            # Every running sequence is stuck on cells held by the others: free the newest.
            self.preempt(self.running[-1])

    def decoding(self) -> list[Sequence]:
        """Running sequences with one token to feed: a decode row each."""
        return [s for s in self.running if s.attached and s.n_remaining == 1]

    def first_token_waiters(self) -> int:
        """Requests this step could feed a prompt to: admitted and not yet decoding, and
        waiting ones there are sequence ids for (a preempted request among them: it waits
        for its tokens to be fed again as a new one waits for its first)."""
        admitted = sum(not s.attached for s in self.running)
        return admitted + min(len(self.waiting), self.ids.n_free)

    def _evict_for(self, cells: int) -> None:
        """Evict unheld trie leaves until ``cells`` cells are free, if they allow."""
        if self.free_cells() < cells:
            self.trie.evict(cells - self.free_cells())

    def _make_room_for_decode(self) -> bool:
        need = len(self.decoding())
        self._evict_for(need)
        preempted = False
        while self.running and self.free_cells() < need:
            victim = self.running[-1]
            need -= victim.attached and victim.n_remaining == 1
            self.preempt(victim)  # its cells move into an unheld trie leaf: evict that next
            preempted = True
            self._evict_for(need)
        return preempted

    def _promised(self) -> tuple[int, set[Node]]:
        """Cells that admitted but unattached sequences will still take, and their nodes."""
        nodes: set[Node] = set()
        for seq in self.running:
            if not seq.attached:
                nodes.update(self.trie.needed(seq.node))
        waiting = sum(1 for s in self.running if not s.attached)
        return sum(len(n.tokens) - n.n_cached for n in nodes) + 2 * waiting, nodes

    def _admit(self) -> None:
        i = 0  # sequences waiting for a saved prefix to come off disk stay put; others pass
        while i < len(self.waiting) and self.ids.n_free:
            seq = self.waiting[i]
            if self.tiers and not self.tiers.before_admit(seq.tokens[:-1], self._room_for):
                i += 1
                continue
            hit = self.trie.insert(seq.tokens[:-1])
            if hit is None:
                return
            node, matched = hit
            self.trie.lock(node)
            promised, promised_nodes = self._promised()
            # What the path lacks beyond what running sequences are computing anyway, the
            # last token, and room for the first new one.
            lacking = sum(len(n.tokens) - n.n_cached for n in self.trie.needed(node) if n not in promised_nodes)
            short = lacking + 2 - (self.free_cells() - promised)
            if short > 0 and self.trie.evict(short) < short:
                self.trie.unlock(node)
                self.trie.prune(node)  # an empty leaf left here would look like work under way
                return
            del self.waiting[i]
            if seq.n_cached == 0 and seq.n_generated == 0:
                seq.n_cached = min(matched, seq.prompt_len - 1)
            seq.node = node
            seq.seq_id = self.ids.acquire()
            self.running.append(seq)

    def _room_for(self, cells: int) -> bool:
        """Free ``cells`` cells beyond what admitted sequences will take, if eviction allows."""
        need = cells + 2 - (self.free_cells() - self._promised()[0])
        return need <= 0 or self.trie.evict(need) >= need

    def _plan(self) -> StepPlan:
        plan = StepPlan()
        self._evict_for(self._demand())
        room = min(self.token_budget, self.free_cells())  # each token takes budget and a cell
        for seq in self.decoding():
            if room:
                plan.chunks.append((seq, 1))
                room -= 1
        for seq in self.running:  # paths already in KV: attach now, ahead of any prefill
            if room and not seq.attached and self.trie.next_to_compute(seq.node) is None:
                self._attach(seq, {})
                plan.chunks.append((seq, 1))
                room -= 1
        chunks: dict[Node, int] = {}  # root-first along every path
        attaching: list[Sequence] = []
        for seq in self.running:
            if seq.attached:
                continue
            room, complete = self._plan_path(seq, chunks, room)
            if complete and room:
                attaching.append(seq)
                room -= 1
        for node in chunks:
            self.trie.begin_chunk(node)
        tags = {node: [node.seq_id] for node in chunks}
        for node in chunks:
            self._tag_ancestors(node.parent, node.seq_id, tags)
        for seq in attaching:
            self._attach(seq, tags)
            plan.chunks.append((seq, 1))  # its last prompt token, after its path in the batch
        plan.node_chunks = [(node, n, tags[node]) for node, n in chunks.items()]
        return plan

    def _plan_path(self, seq: Sequence, chunks: dict[Node, int], room: int) -> tuple[int, bool]:
        """Schedule what ``seq``'s path lacks, root first, as far as ``room`` goes; whether
        the whole path is in KV after this step."""
        for node in self.trie.needed(seq.node):
            left = len(node.tokens) - node.n_cached
            if node not in chunks:
                if room == 0:
                    return room, False
                chunks[node] = min(left, room)
                room -= chunks[node]
            if chunks[node] < left:
                return room, False
        return room, True

    def _tag_ancestors(self, node: Node, seq_id: int, tags: dict[Node, list[int]]) -> None:
        """Tokens computed this step on the path to ``node`` carry ``seq_id`` too, up to the
        first computed node: ``seq_id`` has that node's cells, its whole path, already (what
        is computed above it is another request's; see RadixTrie.needed)."""
        while node is not self.trie.root and not node.computed:
            if node in tags:
                tags[node].append(seq_id)
            node = node.parent

    def _attach(self, seq: Sequence, tags: dict[Node, list[int]]) -> None:
        """Put ``seq`` on its path's cells: those already computed (one copy from the deepest
        node, whose seq id is on all of them) and those computed in this step (tags)."""
        node = seq.node
        if node is not self.trie.root:
            self.kv.copy(node.seq_id, seq.seq_id, -1, node.start + node.n_cached)
        self._tag_ancestors(node, seq.seq_id, tags)
        seq.attached = True
        seq.n_computed = seq.n_shared = node.end

    def _demand(self) -> int:
        """Tokens this step would like to feed, capped by the budget."""
        want = sum(s.n_remaining for s in self.running if s.attached)
        want += self._promised()[0]
        return min(want, self.token_budget)
