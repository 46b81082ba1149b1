"""The slot scheduler (per-sequence KV streams) on a model of llama.cpp's streams
(fake_streams.py): every token sampled must be the one its own sequence's tokens give, through
in-place reuse, stream copies (applied at the next decode), waits for a prefix under way,
saves and restores through the tiers, sliding windows and aborts."""

from __future__ import annotations

import random

import pytest

from demesne.engine import tiers as tiers_module
from demesne.engine.kv_store import KVStore
from demesne.engine.request import Sequence
from demesne.engine.slots import SlotScheduler
from demesne.engine.tiers import Tiers
from demesne.protocol import SamplingParams

from fake_kv import model
from fake_streams import FakeStreams


def seq(rid: str, prompt: list[int], max_tokens: int) -> Sequence:
    return Sequence(rid=rid, client=b"gw", prompt_len=len(prompt), max_tokens=max_tokens,
                    params=SamplingParams(), tokens=list(prompt))


def expected(prompt: list[int], n: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(model(tokens))
    return tokens


class Sim:
    """A SlotScheduler on FakeStreams, stepped as core.Engine.step does."""

    def __init__(self, max_seqs: int, n_cells: int, budget: int, n_swa: int = 0, tiers: bool = True,
                 prefix_cache: bool = True, host_bytes: int = 1 << 30):
        self.kv = FakeStreams(max_seqs, n_cells, n_swa)
        self.n_cells = n_cells
        self.tiers = Tiers(self.kv, KVStore(host_bytes, "fake")) if tiers else None
        self.sched = SlotScheduler(max_seqs, budget, 1024, self.kv, prefix_cache, self.tiers, n_swa)
        self.prefill = 0

    def add(self, *seqs: Sequence) -> None:
        for s in seqs:
            assert s.prompt_len + s.max_tokens <= self.n_cells
            assert self.sched.add(s)

    def step(self) -> None:
        sched = self.sched
        plan = sched.schedule()
        assert not plan.node_chunks and plan.n_tokens <= sched.token_budget
        # By stream: llama.cpp batches separate streams into one ubatch only in id order.
        ids = [s.seq_id for s, _ in plan.chunks]
        assert ids == sorted(ids), f"batch rows out of stream order: {ids}"
        spans, outputs = [], []
        for s, n in plan.chunks:
            assert s in sched.running and 0 < n <= s.n_remaining and sched.slots[s.seq_id].owner is s
            start = s.n_computed
            last = start + n == len(s.tokens)
            spans.append((s.seq_id, start, s.tokens[start : start + n], last))
            if last:
                outputs.append(s)
            if start < s.prompt_len - 1 or n > 1:
                self.prefill += n
        sampled = self.kv.decode(spans) if spans else []
        if spans:
            sched.decoded()
        for s, n in plan.chunks:
            s.n_computed += n
        for s, token in zip(outputs, sampled):
            assert token == model(s.tokens), f"{s.rid} attended to other tokens than its own"
            s.append(token)
            if s.n_generated >= s.max_tokens:
                sched.finish(s)
        self.check()

    def check(self) -> None:
        sched = self.sched
        owners = [slot.owner for slot in sched.slots if slot.owner is not None]
        assert sorted(id(s) for s in owners) == sorted(id(s) for s in sched.running)
        for slot in sched.slots:
            if slot.owner is None and not slot.copying_in:
                st = self.kv.streams[slot.seq_id]
                assert st.used == set(range(len(slot.held))), f"slot {slot.seq_id} holds other positions"
                if not self.kv.pending:
                    assert [st.data[p] for p in range(len(slot.held))] == list(slot.held)
        for s in sched.running:
            assert self.kv.streams[s.seq_id].used == set(range(s.n_computed))
        assert sched.cells_used() == sum(len(sched._content(slot)) for slot in sched.slots)  # counted, as listed

    def run(self, max_steps: int = 20_000) -> None:
        for _ in range(max_steps):
            if not self.sched.has_work:
                return
            self.step()
        raise AssertionError("work left")


@pytest.fixture
def low_thresholds(monkeypatch):
    monkeypatch.setattr(tiers_module, "MIN_SAVE", 4)
    monkeypatch.setattr(tiers_module, "MIN_GAIN", 2)


def test_a_returning_conversation_continues_in_place(low_thresholds):
    sim = Sim(max_seqs=2, n_cells=64, budget=16)
    first = seq("a", list(range(10, 30)), 3)
    sim.add(first)
    sim.run()
    sim.prefill = 0
    again = seq("b", first.tokens + [7, 8, 9], 2)
    sim.add(again)
    sim.run()
    assert again.n_cached == len(first.tokens) - 1  # all but the last sampled token, never decoded
    assert sim.prefill <= 5 and again.tokens == expected(again.tokens[: again.prompt_len], 2)


def test_a_distinct_prompt_takes_an_empty_slot_not_an_idle_conversation(low_thresholds):
    """Sharing only a first token (a BOS) with an idle slot is not worth its conversation:
    the request takes an empty stream, nothing is saved on its first token's path, and the
    conversation still continues in place. Once no slot is empty, the least recently used
    one is taken (and saved)."""
    sim = Sim(max_seqs=3, n_cells=64, budget=64)

    def slot_of(s: Sequence) -> int:
        [slot] = [i for i, slot in enumerate(sim.sched.slots) if list(slot.held[: s.prompt_len]) == s.tokens[: s.prompt_len]]
        return slot

    a, b, c, d = (seq(r, [1] + list(range(k, k + 20)), 3) for r, k in (("a", 10), ("b", 40), ("c", 70), ("d", 100)))
    sim.add(a)
    sim.run()
    sim.add(b)
    sim.run()
    assert b.n_cached == 0 and slot_of(a) != slot_of(b)
    assert sim.tiers.counters.saves == 0  # a's slot was left alone
    sim.add(c)
    sim.run()
    assert len({slot_of(a), slot_of(b), slot_of(c)}) == 3 and sim.tiers.counters.saves == 0
    was_a = slot_of(a)
    sim.add(d)
    sim.run()
    assert slot_of(d) == was_a and sim.tiers.counters.saves > 0  # the least recently used, saved
    again = seq("b2", b.tokens + [5, 6], 2)
    sim.add(again)
    sim.run()
    assert again.n_cached == len(b.tokens) - 1  # in place: all but b's last sampled token
    for s in (a, b, c, d, again):
        assert s.tokens == expected(s.tokens[: s.prompt_len], s.max_tokens)


def test_concurrent_requests_on_one_new_prefix_compute_it_once(low_thresholds):
    sim = Sim(max_seqs=4, n_cells=128, budget=16)
    prefix = list(range(100, 160))
    seqs = [seq(f"s{i}", prefix + [i + 1, i + 2], 2) for i in range(4)]
    sim.add(*seqs)
    sim.run()
    assert sim.sched.n_waits == 3 and sim.sched.n_copies == 3 and sim.kv.n_stream_copies == 3
    assert sim.prefill <= len(prefix) + 4 * 2
    for s in seqs:
        assert s.tokens == expected(s.tokens[: s.prompt_len], 2)


def test_an_evicted_conversation_is_restored_from_the_host_tier(low_thresholds):
    sim = Sim(max_seqs=1, n_cells=64, budget=64)
    a = seq("a", list(range(10, 50)), 2)
    sim.add(a)
    sim.run()
    b = seq("b", list(range(200, 240)), 2)  # takes the only slot: a's stream is saved first
    sim.add(b)
    sim.run()
    assert sim.tiers.counters.saves == 2  # its prompt + output, and its prompt alone
    sim.prefill = 0
    c = seq("c", a.tokens + [5], 1)
    sim.add(c)
    sim.run()
    assert sim.tiers.counters.restores == 1 and sim.prefill <= 2


@pytest.mark.parametrize("n_swa", [0, 4])
def test_the_same_prompt_again_is_restored_too(low_thresholds, n_swa):
    """A slot's prompt is saved apart from prompt + output: the prompt sent again (a retry, a
    regenerated answer) restores all of it, though a saved state cannot be cut on an SWA
    model, and the conversation that continues restores prompt + output."""
    sim = Sim(max_seqs=1, n_cells=96, budget=64, n_swa=n_swa)
    a = seq("a", list(range(10, 50)), 6)
    sim.add(a)
    sim.run()
    sim.add(seq("b", list(range(200, 240)), 1))
    sim.run()
    assert sim.tiers.counters.saves == 2
    again = seq("again", a.tokens[: a.prompt_len], 6)
    sim.add(again)
    sim.run()
    assert again.n_cached == a.prompt_len - 1 and again.tokens == a.tokens
    sim.add(seq("b2", list(range(300, 340)), 1))
    sim.run()
    sim.prefill = 0
    more = seq("more", a.tokens + [5, 6], 1)
    sim.add(more)
    sim.run()
    assert more.n_cached == len(a.tokens) - 1 and sim.prefill == 3


def test_a_restored_window_gap_is_not_cut_into(low_thresholds):
    sim = Sim(max_seqs=1, n_cells=64, budget=64, n_swa=4)
    a = seq("a", list(range(10, 40)), 1)
    sim.add(a)
    sim.run()
    sim.add(seq("b", list(range(200, 230)), 1))
    sim.run()
    c = seq("c", a.tokens[:-1] + [5], 1)  # restores a's 30 tokens: window cells for the last 4 only
    sim.add(c)
    sim.run()
    assert sim.sched.slots[0].gap == 26
    d = seq("d", a.tokens[:20] + [6, 7], 1)  # parts inside the gap: recomputed, not cut
    sim.add(d)
    sim.run()
    assert d.n_cached == 0 and d.tokens == expected(d.tokens[:-1], 1)


def test_prefix_cache_off_keeps_nothing():
    sim = Sim(max_seqs=2, n_cells=64, budget=16, tiers=False, prefix_cache=False)
    a = seq("a", list(range(10, 30)), 2)
    sim.add(a)
    sim.run()
    b = seq("b", a.tokens + [3], 2)
    sim.add(b)
    sim.run()
    assert b.n_cached == 0 and all(not len(slot.held) for slot in sim.sched.slots)


def conversations_run(seed: int) -> Sim:
    """Conversations resending their history turn after turn, concurrent requests on shared
    system prompts, edits of earlier turns and aborts, through fewer slots than conversations
    and a host tier small enough to drop states; on a sliding-window model half the time."""
    rng = random.Random(seed)
    max_seqs = rng.randrange(1, 6)
    n_cells = rng.randrange(60, 140)
    n_swa = rng.choice([0, 3, 7]) if seed % 2 else 0
    sim = Sim(max_seqs, n_cells, rng.randrange(2 * max_seqs, 40), n_swa=n_swa,
              tiers=rng.random() < 0.8, host_bytes=rng.choice([1 << 30, 3000]))
    systems = [[1] + [rng.randrange(100, 120) for _ in range(rng.randrange(5, 25))] for _ in range(2)]
    histories = [rng.choice(systems) + [rng.randrange(4, 60) for _ in range(rng.randrange(1, 10))]
                 for _ in range(rng.randrange(2, 8))]
    for turn in range(rng.randrange(2, 6)):
        order = list(range(len(histories)))
        rng.shuffle(order)
        live = []
        for c in order:
            h = histories[c]
            if rng.random() < 0.2 and len(h) > 8:
                h = h[: rng.randrange(4, len(h))]
            h = h + [rng.randrange(4, 60) for _ in range(rng.randrange(1, 6))]
            n_out = rng.randrange(1, 6)
            if len(h) + n_out > n_cells:
                continue
            s = seq(f"c{c}.{turn}", h, n_out)
            sim.add(s)
            live.append((c, s))
            if rng.random() < 0.4:
                sim.step()
            if rng.random() < 0.1 and s in sim.sched.running + list(sim.sched.waiting):
                sim.sched.finish(s)  # an abort, wherever it is
                live.pop()
        sim.run()
        for c, s in live:
            assert s.tokens == expected(s.tokens[: s.prompt_len], s.max_tokens), s.rid
            histories[c] = s.tokens
    return sim


@pytest.mark.parametrize("seed", range(300))
def test_random_conversations_through_the_slots(seed, low_thresholds):
    conversations_run(seed)


def test_the_random_conversations_use_every_path(low_thresholds):
    sims = [conversations_run(seed) for seed in range(60)]
    assert sum(s.sched.n_copies for s in sims) > 20
    assert sum(s.sched.n_waits for s in sims) > 10
    assert sum(s.tiers.counters.restores for s in sims if s.tiers) > 20
    assert sum(s.tiers.counters.saves for s in sims if s.tiers) > 50
