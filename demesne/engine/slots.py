"""The scheduler for per-sequence KV streams (``--kv-layout streams``, the default).

llama.cpp with ``kv_unified=false`` gives each sequence id its own *stream* of
``ctx_size / max_seqs`` cells, and a decode step attends each row over its own stream only.
A unified cache attends every row over every used cell of every sequence, so on a cache full
of concurrent conversations a prompt chunk costs several times more (kv_layout_bench: 16
sequences of 900 tokens, a 256-token chunk beside 15 decode rows, 1,130 ms unified against
543 ms with streams on a 2-core CPU). The price: a request holds at most one stream's cells,
and streams cannot share cells, so a shared prefix is copied, not referenced.

A *slot* is one stream (seq id ``i``). A running request owns one; when it leaves, the slot
keeps its tokens' KV (an idle slot) until a request needs the slot. Admitting a request takes
the best of:

- **in place**: the idle slot whose tokens share the longest prefix with the prompt keeps
  that prefix (``seq_rm`` of the rest) — a returning conversation whose slot is still idle;
- **copy**: another slot (typically a running request with the same system prompt) shares
  more; its whole stream is copied into the target (``llama_memory_seq_cp`` with p0 = p1 =
  -1, applied at the next decode) and the copy's tail is cut;
- **restore**: the host or disk tier (tiers.py) holds a saved state of a longer prefix;
- **wait**: a running request is computing a longer shared prefix right now: the request
  waits in the queue (others pass) and copies it once computed, so a prefix is decoded once
  however many requests arrive with it together.

The target of a copy or restore is the least recently used idle slot (an empty one first), as
it is for a request that would gain fewer than ``MIN_GAIN`` tokens in place where that would
cut as many from the slot (a distinct prompt: its BOS alone is not worth a conversation);
whatever a slot's tokens lose (the whole stream or a cut tail) is saved to the host tier first
when worth keeping. On an SWA model a restored state lacks the sliding-window layers' cells
below its last ``n_swa`` positions (its *gap*): it may be continued from its end, or kept up
to a point whose window lies above the gap, else it is recomputed.

Requests never run out of cells (the engine admits a request only if prompt + max_tokens fit
one stream), so there is no preemption for room.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .request import Sequence
from .scheduler import StepPlan
from . import tiers as tiering  # its thresholds read at call time (tests lower them)

_EMPTY = np.zeros(0, np.int32)


class StreamOps(Protocol):
    def copy_stream(self, src: int, dst: int) -> None: ...
    def remove(self, seq_id: int, p0: int = -1, p1: int = -1) -> None: ...


@dataclass(eq=False, slots=True)
class Slot:
    seq_id: int
    held: np.ndarray  # while idle: the tokens whose KV the stream holds, positions 0..n-1
    owner: Sequence | None = None
    last_used: int = 0
    gap: int = 0  # positions [0, gap) lack sliding-window cells (a restored state)
    prompt_end: int = 0  # while idle: held[:prompt_end] is its last request's prompt (less its last token)
    # A stream copy queued before the next decode (llama.cpp moves the data then): a slot
    # copied into is no source yet, and no restore or copy may overwrite either end; cutting
    # a source in place is fine (the copy runs before the decode writes).
    copying_in: bool = False
    copying_out: bool = False

    @property
    def busy(self) -> bool:
        return self.copying_in or self.copying_out


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


class SlotScheduler:
    def __init__(
        self,
        max_seqs: int,
        token_budget: int,
        max_waiting: int,
        kv: StreamOps,
        prefix_cache: bool = True,
        tiers: tiering.Tiers | None = None,
        n_swa: int = 0,
    ):
        self.token_budget = token_budget
        self.max_waiting = max_waiting
        self.kv = kv
        self.prefix_cache = prefix_cache
        self.tiers = tiers if prefix_cache else None
        self.n_swa = n_swa
        self.slots = [Slot(i, _EMPTY) for i in range(max_seqs)]
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.n_preemptions = 0
        self.n_copies = 0  # admissions served by copying another stream
        self.n_waits = 0  # requests that waited for a running request's prefix
        self._waited: set[Sequence] = set()
        self._clock = itertools.count(1)

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # -- requests in and out ------------------------------------------------------------

    def add(self, seq: Sequence) -> bool:
        if len(self.waiting) >= self.max_waiting:
            return False
        self.waiting.append(seq)
        return True

    def finish(self, seq: Sequence) -> None:
        if seq.seq_id >= 0:
            self.running.remove(seq)
            self._release(seq)
        else:
            self.waiting.remove(seq)

    def preempt(self, seq: Sequence) -> None:
        """Back to the head of the queue; its slot keeps its tokens, so it resumes in place."""
        self.running.remove(seq)
        self._release(seq)
        self.waiting.appendleft(seq)
        self.n_preemptions += 1

    def detach(self, seq: Sequence) -> None:
        """A step that did not run: the stream still holds what admission gave it."""

    def decoded(self) -> None:
        """A decode ran: llama.cpp has applied the stream copies queued before it."""
        for slot in self.slots:
            slot.copying_in = slot.copying_out = False

    def _release(self, seq: Sequence) -> None:
        slot = self.slots[seq.seq_id]
        slot.owner = None
        slot.last_used = next(self._clock)
        if self.prefix_cache:
            slot.held = np.asarray(seq.tokens[: seq.n_computed], np.int32)
            slot.prompt_end = min(seq.prompt_len - 1, len(slot.held))
        else:
            self.kv.remove(slot.seq_id)
            slot.held, slot.gap = _EMPTY, 0
        seq.reset_kv()

    # -- one step ------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        self._admit()
        plan = StepPlan()
        room = self.token_budget
        for seq in self.running:  # decode rows first: every stream moves each step
            if room and seq.n_remaining == 1:
                plan.chunks.append((seq, 1))
                room -= 1
        for seq in self.running:  # then prompts, oldest first
            if room and seq.n_remaining > 1:
                n = min(seq.n_remaining, room)
                plan.chunks.append((seq, n))
                room -= n
        # In the batch, by stream: llama.cpp puts into one ubatch only sequences whose ids
        # follow each other in batch order (split_equal, sequential for separate streams), so
        # rows in admission order split one step into several ubatches, each reading every
        # weight again (1.7x slower 16-row steps once slots were reused out of order).
        plan.chunks.sort(key=lambda chunk: chunk[0].seq_id)
        return plan

    def idle_ids(self) -> list[int]:
        """Seq ids whose stream no request holds or is copying: each may take a throwaway
        row after its last cell (padding.py)."""
        return [s.seq_id for s in self.slots if s.owner is None and not s.busy]

    def decoding(self) -> list[Sequence]:
        return [s for s in self.running if s.n_remaining == 1]

    def first_token_waiters(self) -> int:
        """Requests this step could feed a prompt to (see Scheduler.first_token_waiters)."""
        free = sum(slot.owner is None for slot in self.slots)
        return sum(s.n_remaining > 1 for s in self.running) + min(len(self.waiting), free)

    def cells_used(self) -> int:
        # (counted, not listed: _content makes an array of a running sequence's tokens)
        return sum(len(s.held) if s.owner is None else s.owner.n_computed for s in self.slots)

    def spare_cells(self, n_planned: int) -> int:
        """Cells left for draft tokens: a request's stream holds its prompt and max_tokens, and
        a draft never goes past max_tokens."""
        return 1 << 30

    def cache_stats(self) -> dict[str, float]:
        idle = [s for s in self.slots if s.owner is None and len(s.held)]
        return {
            "prefix_cache_nodes": len(idle),
            "prefix_cache_cells": sum(len(s.held) for s in idle),
            "kv_stream_copies_total": self.n_copies,
            "kv_prefix_waits_total": self.n_waits,
        }

    def drop_cached(self) -> None:
        """Empty the streams of idle slots (what is worth it is saved to the tiers first)."""
        for slot in self.slots:
            if slot.owner is None and not slot.busy:
                self._save(slot, 0)
                self.kv.remove(slot.seq_id)
                slot.held, slot.gap = _EMPTY, 0

    def spill(self) -> None:
        """Save every idle slot's tokens to the tiers (shutdown with a disk tier)."""
        if self.tiers:
            for slot in self.slots:
                if slot.owner is None and not slot.busy:
                    self._save(slot, 0)

    # -- admission -----------------------------------------------------------------------

    def _admit(self) -> None:
        i = 0  # a request that waits (a disk read, a prefix being computed) lets others pass
        while i < len(self.waiting):
            if not any(s.owner is None and not s.busy for s in self.slots):
                return
            seq = self.waiting[i]
            if not self._place(seq):
                i += 1
                continue
            del self.waiting[i]
            self.running.append(seq)

    def _content(self, slot: Slot) -> np.ndarray:
        if slot.owner is None:
            return slot.held
        return np.asarray(slot.owner.tokens[: slot.owner.n_computed], np.int32)

    def _usable(self, slot: Slot, matched: int, length: int) -> int:
        """How much of ``matched`` shared tokens the slot's stream can be continued from."""
        if matched >= length or slot.gap == 0 or matched >= slot.gap + self.n_swa:
            return matched
        return 0  # the window of the cut point reaches into a restored state's gap

    def _place(self, seq: Sequence) -> bool:
        """Give ``seq`` a slot holding as much of its prompt as can be had; False to wait."""
        want = np.asarray(seq.tokens[:-1], np.int32)
        idle = [s for s in self.slots if s.owner is None and not s.busy]
        if not self.prefix_cache:
            return self._start(seq, min(idle, key=lambda s: s.last_used), 0)
        in_place, in_place_m = None, -1
        source, source_m = None, 0
        for slot in self.slots:
            if slot.copying_in:
                continue
            content = self._content(slot)
            m = self._usable(slot, common_prefix(content, want), len(content))
            if slot.owner is None and (m > in_place_m or (m == in_place_m and slot.last_used < in_place.last_used)):
                in_place, in_place_m = slot, m
            if m > source_m:
                source, source_m = slot, m
        best = max(in_place_m, source_m)
        if self._worth_waiting(want, best):
            if seq not in self._waited:
                self._waited.add(seq)
                self.n_waits += 1
            return False
        self._waited.discard(seq)
        entry = None
        if self.tiers:
            ready, entry = self.tiers.lookup(want, best)
            if not ready:
                return False  # its state comes off disk in the background meanwhile
        target = min(idle, key=lambda s: (len(s.held) > 0, s.last_used))
        if entry is not None:
            self._save(target, 0)
            self.kv.remove(target.seq_id)
            target.held, target.gap = _EMPTY, 0
            n = self.tiers.restore_into(entry, target.seq_id)
            if n:
                target.gap = max(0, n - self.n_swa) if self.n_swa else 0
                return self._start(seq, target, n)
            if in_place is target:
                in_place_m = 0
        if in_place_m < tiering.MIN_GAIN and not len(target.held) and len(in_place.held) >= in_place_m + tiering.MIN_GAIN:
            # A few shared tokens (a BOS) are not worth what the idle slot would lose (saved to
            # the tiers on the first token's path, or gone): an empty slot takes the request.
            in_place, in_place_m = target, 0
        if source is not in_place and source_m >= in_place_m + tiering.MIN_GAIN:
            self._save(target, 0)
            self.kv.copy_stream(source.seq_id, target.seq_id)
            self.kv.remove(target.seq_id, source_m, -1)
            target.gap = source.gap
            target.copying_in = source.copying_out = True
            self.n_copies += 1
            return self._start(seq, target, source_m)
        self._save(in_place, in_place_m)
        self.kv.remove(in_place.seq_id, in_place_m, -1)
        if in_place_m == 0:
            in_place.gap = 0
        return self._start(seq, in_place, in_place_m)

    def _worth_waiting(self, want: np.ndarray, have: int) -> bool:
        """Whether a running request is computing a prefix of ``want`` that goes well beyond
        ``have`` (its prompt, not yet all in KV)."""
        for other in self.running:
            if other.n_remaining > 1 and other.n_computed < have + tiering.MIN_GAIN:
                ahead = np.asarray(other.tokens[: other.prompt_len - 1], np.int32)
                if common_prefix(ahead, want) >= have + tiering.MIN_GAIN:
                    return True
        return False

    def _save(self, slot: Slot, keep: int) -> None:
        """Before a slot's tokens beyond ``keep`` leave its stream: save them if worth it (a
        cut of a few tokens, a re-rendered end of turn, is not).

        A saved state serves only prompts it is a prefix of (on an SWA model it cannot be cut:
        it lacks the window below its last ``n_swa`` cells). Prompt + output serves the
        conversation that continues; it would miss the same prompt sent again, a regenerated
        answer or a branch after the prompt. So both are saved: the whole content, then the
        stream is cut back to its last request's prompt (exact: the live stream has every
        cell) and that is saved too."""
        if not self.tiers or len(slot.held) < keep + tiering.MIN_GAIN:
            return
        self.tiers.save(slot.held, slot.seq_id)
        cut = slot.prompt_end
        if keep + tiering.MIN_GAIN <= cut < len(slot.held) and self._usable(slot, cut, len(slot.held)):
            self.kv.remove(slot.seq_id, cut, -1)
            slot.held = slot.held[:cut]
            self.tiers.save(slot.held, slot.seq_id)

    def _start(self, seq: Sequence, slot: Slot, n: int) -> bool:
        slot.owner = seq
        slot.held = _EMPTY
        slot.last_used = next(self._clock)
        seq.seq_id = slot.seq_id
        seq.attached = True
        seq.n_computed = seq.n_shared = n
        if seq.n_cached == 0 and seq.n_generated == 0:
            seq.n_cached = min(n, seq.prompt_len - 1)
        return True
