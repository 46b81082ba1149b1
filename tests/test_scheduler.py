"""demesne.engine.scheduler with real Sequence objects, stepped the way Engine.step does it:
each chunk advances ``n_computed``, and a chunk that reaches the end yields a sampled token."""

import pytest

from demesne.engine.request import Sequence
from demesne.engine.scheduler import Scheduler, SeqIdPool, StepPlan
from demesne.protocol import SamplingParams

TOKEN = 7  # what the "model" samples every time


def seq(rid: str, n_prompt: int, max_tokens: int = 1000) -> Sequence:
    return Sequence(
        rid=rid,
        client=b"gw",
        prompt_len=n_prompt,
        max_tokens=max_tokens,
        params=SamplingParams(),
        tokens=list(range(100, 100 + n_prompt)),
    )


def step(sched: Scheduler) -> StepPlan:
    """One engine step: schedule, 'decode' every chunk, sample for chunks that reach the end,
    and release sequences that reached max_tokens (as core.Engine does)."""
    plan = sched.schedule()
    for s, n in plan.chunks:
        assert 0 < n <= s.n_remaining
        s.n_computed += n
        if s.n_computed == len(s.tokens):
            s.append(TOKEN)
            if s.n_generated >= s.max_tokens:
                sched.remove(s)
    assert plan.n_tokens <= sched.token_budget
    assert sched.cells_used() <= sched.n_cells
    return plan


def rows(plan: StepPlan) -> list[tuple[str, int]]:
    return [(s.rid, n) for s, n in plan.chunks]


# --- SeqIdPool ---------------------------------------------------------------------------------


def test_seq_id_pool_hands_out_lowest_free_id():
    pool = SeqIdPool(4)
    assert [pool.acquire() for _ in range(4)] == [0, 1, 2, 3]
    assert pool.acquire() is None and pool.n_free == 0
    pool.release(2)
    pool.release(0)
    pool.release(3)
    assert pool.n_free == 3
    assert pool.acquire() == 0
    assert pool.acquire() == 2
    pool.release(1)
    assert pool.acquire() == 1
    assert pool.acquire() == 3
    assert pool.acquire() is None


# --- the step plan ------------------------------------------------------------------------------


def test_long_prompt_is_split_by_the_token_budget():
    sched = Scheduler(n_cells=1024, max_seqs=4, token_budget=16, max_waiting=8)
    a = seq("a", 50)
    assert sched.add(a)
    sizes = []
    for _ in range(4):
        sizes.append(rows(step(sched)))
    assert sizes == [[("a", 16)], [("a", 16)], [("a", 16)], [("a", 2)]]
    assert a.n_generated == 1 and a.n_computed == 50 and len(a.tokens) == 51
    assert rows(step(sched)) == [("a", 1)]  # then it decodes, one row a step
    assert a.n_generated == 2


def test_decode_rows_come_before_prefill_chunks_and_share_the_budget():
    sched = Scheduler(n_cells=1024, max_seqs=8, token_budget=16, max_waiting=8)
    d1, d2 = seq("d1", 4), seq("d2", 5)
    sched.add(d1)
    sched.add(d2)
    assert rows(step(sched)) == [("d1", 4), ("d2", 5)]
    long = seq("long", 40)
    sched.add(long)
    plan = step(sched)
    assert rows(plan) == [("d1", 1), ("d2", 1), ("long", 14)]
    assert rows(step(sched)) == [("d1", 1), ("d2", 1), ("long", 14)]
    assert rows(step(sched)) == [("d1", 1), ("d2", 1), ("long", 12)]
    assert rows(step(sched)) == [("d1", 1), ("d2", 1), ("long", 1)]


def test_decode_rows_first_even_when_admitted_later():
    # An older sequence still prefilling and a newer one decoding: the decode row goes first.
    sched = Scheduler(n_cells=1024, max_seqs=8, token_budget=8, max_waiting=8)
    old, new = seq("old", 30), seq("new", 3)
    sched.add(old)
    sched.add(new)
    sched.schedule()  # admits both, in this order
    assert [s.rid for s in sched.running] == ["old", "new"]
    # As if "new" had been prefilled and had sampled its first token already.
    new.n_computed = 3
    new.append(TOKEN)
    old.n_computed = 8
    plan = sched.schedule()
    assert rows(plan) == [("new", 1), ("old", 7)]


def test_plan_never_exceeds_the_budget_with_many_decoders():
    sched = Scheduler(n_cells=4096, max_seqs=16, token_budget=16, max_waiting=64)
    for i in range(16):
        sched.add(seq(f"s{i}", 3))
    for _ in range(6):
        step(sched)
    # All 16 decode now: one row each, the budget is exactly spent.
    assert rows(step(sched)) == [(f"s{i}", 1) for i in range(16)]


# --- admission ------------------------------------------------------------------------------------


def test_admission_never_exceeds_max_seqs_and_reuses_freed_ids():
    sched = Scheduler(n_cells=1024, max_seqs=3, token_budget=64, max_waiting=16)
    seqs = [seq(f"s{i}", 4, max_tokens=3 if i == 1 else 1000) for i in range(5)]
    for s in seqs:
        assert sched.add(s)
    step(sched)
    assert [s.rid for s in sched.running] == ["s0", "s1", "s2"]
    assert [s.seq_id for s in sched.running] == [0, 1, 2]
    assert [s.rid for s in sched.waiting] == ["s3", "s4"]
    assert seqs[3].seq_id == -1
    for _ in range(3):  # s1 finishes (max_tokens 3) and frees id 1
        step(sched)
        assert len(sched.running) <= 3
    assert seqs[1] not in sched.running
    step(sched)
    assert seqs[3] in sched.running and seqs[3].seq_id == 1  # lowest free id
    assert [s.rid for s in sched.waiting] == ["s4"]


def test_admission_waits_for_kv_cells():
    sched = Scheduler(n_cells=64, max_seqs=8, token_budget=128, max_waiting=8)
    a, b = seq("a", 40, max_tokens=2), seq("b", 30)
    sched.add(a)
    sched.add(b)
    assert rows(step(sched)) == [("a", 40)]  # b needs 31 cells, 23 are left
    assert list(sched.waiting) == [b] and b.seq_id == -1
    assert rows(step(sched)) == [("a", 1)]  # a finishes (max_tokens 2), freeing its cells
    assert a not in sched.running
    assert rows(step(sched)) == [("b", 30)]
    assert not sched.waiting


def test_admission_counts_cells_promised_to_running_prefills():
    # 'a' is prefilled over three steps; 'b' must not take the cells 'a' still needs.
    sched = Scheduler(n_cells=64, max_seqs=8, token_budget=16, max_waiting=8)
    a = seq("a", 40)
    sched.add(a)
    step(sched)  # a: 16 of 40 in KV, 24 promised
    b = seq("b", 30)
    sched.add(b)
    plan = step(sched)
    assert rows(plan) == [("a", 16)]
    assert b in sched.waiting  # 64 - 16 - 24 = 24 free < 31, though 48 cells are unused
    c = seq("c", 3)  # behind b in the queue: first come, first served
    sched.add(c)
    assert rows(step(sched)) == [("a", 8)]
    assert list(sched.waiting) == [b, c]


def test_a_small_prompt_is_admitted_beside_a_running_prefill():
    sched = Scheduler(n_cells=64, max_seqs=8, token_budget=16, max_waiting=8)
    a = seq("a", 40)
    sched.add(a)
    step(sched)
    b = seq("b", 20)  # needs 21 <= 64 - 16 - 24
    sched.add(b)
    assert rows(step(sched)) == [("a", 16)]
    assert b in sched.running and b.seq_id == 1
    assert rows(step(sched)) == [("a", 8), ("b", 8)]


def test_queue_refuses_beyond_max_waiting():
    sched = Scheduler(n_cells=1024, max_seqs=1, token_budget=64, max_waiting=2)
    assert sched.add(seq("a", 4))
    assert sched.add(seq("b", 4))
    assert not sched.add(seq("c", 4))
    assert [s.rid for s in sched.waiting] == ["a", "b"]
    step(sched)  # admits a: room in the queue again
    assert sched.add(seq("c", 4))
    assert not sched.add(seq("d", 4))


def test_remove_a_waiting_sequence():
    sched = Scheduler(n_cells=1024, max_seqs=1, token_budget=64, max_waiting=8)
    a, b = seq("a", 4), seq("b", 4)
    sched.add(a)
    sched.add(b)
    step(sched)
    sched.remove(b)
    assert not sched.waiting
    sched.remove(a)
    assert not sched.has_work
    assert sched.ids.n_free == 1


# --- preemption -----------------------------------------------------------------------------------


def two_decoders_filling_the_cells():
    """a and b (8-token prompts) decode in 20 cells until they run out."""
    sched = Scheduler(n_cells=20, max_seqs=4, token_budget=32, max_waiting=8)
    a, b = seq("a", 8), seq("b", 8)
    sched.add(a)
    sched.add(b)
    assert rows(step(sched)) == [("a", 8), ("b", 8)]
    assert rows(step(sched)) == [("a", 1), ("b", 1)]
    assert rows(step(sched)) == [("a", 1), ("b", 1)]
    assert sched.cells_used() == 20
    return sched, a, b


def test_newest_running_sequence_is_preempted_when_decoders_outgrow_the_cells():
    sched, a, b = two_decoders_filling_the_cells()
    b_id = b.seq_id
    generated = list(b.tokens[b.prompt_len :])
    assert generated == [TOKEN] * 3
    plan = step(sched)
    assert plan.dropped == [b_id]
    assert rows(plan) == [("a", 1)]
    assert sched.running == [a]
    assert sched.waiting[0] is b
    assert b.seq_id == -1 and b.n_computed == 0
    assert b.tokens[b.prompt_len :] == generated and b.n_generated == 3  # kept
    assert sched.n_preemptions == 1
    assert sched.ids.n_free == 3 and b_id not in [s.seq_id for s in sched.running]


def test_preempted_sequence_waits_at_the_head_and_is_prefilled_anew():
    sched, a, b = two_decoders_filling_the_cells()
    late = seq("late", 2)
    sched.add(late)  # queued before the preemption: b still goes ahead of it
    step(sched)
    assert list(sched.waiting) == [b, late]
    sched.remove(a)  # a finishes: its cells are free
    plan = step(sched)
    # b is prefilled again, prompt and generated tokens alike, then samples its 4th token.
    assert plan.chunks[0] == (b, 11)
    assert b.n_generated == 4 and b.n_computed == 11 and len(b.tokens) == 12
    assert b.seq_id == 0


def test_a_sequence_preempted_in_a_step_is_not_readmitted_in_that_step():
    sched = Scheduler(n_cells=32, max_seqs=4, token_budget=64, max_waiting=8)
    a, b, c = seq("a", 9), seq("b", 9), seq("c", 9)
    for s in (a, b, c):
        sched.add(s)
    step(sched)  # 27 cells
    step(sched)  # 30 cells: 2 free, 3 decoders
    plan = step(sched)
    assert plan.dropped == [2]  # c, the newest, is preempted
    assert c in sched.waiting and c.seq_id == -1
    assert all(s is not c for s, _ in plan.chunks)


def test_every_sequence_finishes_under_cell_pressure():
    # Many sequences through a small cache: preemption delays them, never loses tokens.
    sched = Scheduler(n_cells=48, max_seqs=6, token_budget=24, max_waiting=32)
    seqs = [seq(f"s{i}", 5 + i % 7, max_tokens=12) for i in range(12)]
    for s in seqs:
        assert sched.add(s)
    for _ in range(400):
        if not sched.has_work:
            break
        step(sched)
        assert len(sched.running) <= 6
        assert len({s.seq_id for s in sched.running}) == len(sched.running)
    assert not sched.has_work
    assert sched.n_preemptions > 0  # the cache really was too small for all of them
    for s in seqs:
        assert s.n_generated == 12
        assert s.tokens == list(range(100, 100 + s.prompt_len)) + [TOKEN] * 12
