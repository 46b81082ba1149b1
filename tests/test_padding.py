"""Throwaway rows in decode steps (engine/padding.py): the plan is the cheapest, the rows
leave the idle streams they borrow as they were, and outputs do not change."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from demesne.engine.padding import IDLE, NONE, ROW, Padding, plan
from demesne.engine.speculate import StepCosts
from demesne.protocol import Generate, SamplingParams

from conftest import make_engine, run_engine
from test_speculate import MARGIN, teacher_forced

# ms by rows as measured on a 2-core CPU (Gemma 3 270M): odd sizes from 3 up are dear
CPU_ROWS = {1: 22, 2: 40, 3: 70, 4: 52, 5: 83, 6: 68, 7: 99, 8: 87, 9: 116, 10: 102, 11: 121, 12: 105}


def runs_cost(kinds: str, padded: set[int], cost, pad_cost: float) -> tuple[float, int]:
    """What a step costs with the ids in ``padded`` padded: its runs of consecutive ids."""
    total, runs, length = 0.0, 0, 0
    for i, kind in enumerate(kinds + NONE):
        if kind == ROW or i in padded:
            length += 1
            continue
        if length:
            total, runs, length = total + cost(length), runs + 1, 0
    return total + pad_cost * len(padded), runs


@pytest.mark.parametrize("seed", range(6))
def test_the_plan_is_the_cheapest_of_all_paddings(seed):
    rng = np.random.default_rng(seed)
    noisy = {n: c * rng.uniform(0.8, 1.2) for n, c in CPU_ROWS.items()}
    for _ in range(60):
        kinds = "".join(rng.choice([ROW, IDLE, NONE], size=int(rng.integers(1, 11)), p=[0.4, 0.4, 0.2]))
        pads, runs = plan(kinds, noisy.__getitem__, 0.5)
        idle = [i for i, kind in enumerate(kinds) if kind == IDLE]
        assert set(pads) <= set(idle)
        best = min(
            runs_cost(kinds, set(chosen), noisy.__getitem__, 0.5)[0]
            for r in range(len(idle) + 1)
            for chosen in itertools.combinations(idle, r)
        )
        got, got_runs = runs_cost(kinds, set(pads), noisy.__getitem__, 0.5)
        assert got == pytest.approx(best) and runs == got_runs, kinds


def test_odd_rows_become_even_and_gaps_close_only_where_that_is_cheaper():
    cost = CPU_ROWS.__getitem__
    assert plan("rrrppppp", cost, 0.5) == ((3,), 1)  # 3 rows (70) -> 4 (52)
    assert plan("rrppp", cost, 0.5) == ((), 1)  # 2 rows are cheaper than 4
    assert plan("r-rrr", cost, 0.5) == ((), 2)  # no idle id to pad with: two ubatches
    assert plan("rprrr", cost, 0.5) == ((1,), 1)  # 1 + 3 rows (92) -> one of 5 (83)
    assert plan("rpprrppp", cost, 0.5) == ((), 2)  # 1 + 2 rows (62) beat any padding
    assert plan("rrrrrrrr", cost, 0.5) == ((), 1)
    flat = plan("rrrppppp", lambda n: 10.0 + 0.1 * n, 0.5)  # a GPU: rows nearly free, nothing to gain
    assert flat == ((), 1)


def test_a_full_stream_takes_no_throwaway_row():
    held = {3: 99, 4: 10}  # id 3's stream has no cell left (100 cells a stream)
    padding = Padding(CPU_ROWS.__getitem__, 100, lambda i: held.get(i, -1))
    pads, runs = padding.pads([0, 1, 2], [3, 4, 5], 6)
    assert pads == {} and runs == 1  # 3 is full; 4 would leave a gap: no padding pays
    for full, other in ((0, 6), (6, 0)):  # 5 rows: padding either end makes 6
        held = {full: 99, other: 40}
        padding = Padding(CPU_ROWS.__getitem__, 100, lambda i: held.get(i, -1))
        assert padding.pads([1, 2, 3, 4, 5], [0, 6], 7) == ({other: 41}, 1)
        assert padding.rows == 1


def test_calibration_measures_every_step_size_and_no_dear_size_is_a_knot():
    costs = StepCosts()
    costs.calibrate(lambda n: CPU_ROWS.get(n, 10 * n) / 1e3, 12, budget=10.0, preemptions=lambda: 0, every=12)
    assert costs.quiet == pytest.approx({n: c / 1e3 for n, c in CPU_ROWS.items()})
    assert {3, 5, 7, 9, 11}.isdisjoint(costs.knots) and {1, 2, 4, 6, 8, 12} <= costs.knots
    assert costs.unpadded(3) == pytest.approx(0.070) and costs.predict(3) == pytest.approx(0.052)


def test_measuring_every_size_is_bounded_on_a_slow_machine():
    calls = []

    def slow(n: int) -> float:  # a large model on a CPU: a second a row
        calls.append(n)
        return 1.0 * n

    StepCosts().calibrate(slow, 64, budget=2.0, preemptions=lambda: 0, every=16)
    assert max(calls) == 2  # both budgets spent on 1 and 2 rows: start-up stays seconds, not minutes


def test_padded_steps_keep_outputs_and_leave_idle_streams_as_they_were(model_path):
    """Three requests decoding beside the one idle slot of four, which holds an earlier
    request's KV: each step pads with it (the step costs here say 3 rows cost more than 4),
    greedy outputs are those of an engine without padding (or teacher-forced equal: the
    step's shape differs), and the idle stream still holds exactly what it held."""
    engines = [make_engine(model_path, speculative="off", max_seqs=4, pad_steps=pad) for pad in (True, False)]
    assert engines[1].padding is None
    padded = engines[0]
    padded.padding.cost = CPU_ROWS.__getitem__  # this machine's measurement may say otherwise
    padded.padding._plans.clear()
    rng = np.random.default_rng(7)
    prompts = [[2] + rng.integers(1000, 20000, 60).tolist() for _ in range(4)]
    greedy = SamplingParams(temperature=0.0, ignore_eos=True)
    outs = []
    for engine in engines:
        out = run_engine(engine, [Generate("first", prompts[0], 8, greedy)])
        slot = next(s for s in engine.scheduler.slots if len(s.held))
        held = engine.runner.pos_max(slot.seq_id)
        out |= run_engine(engine, [Generate(f"r{i}", prompts[i], 24, greedy) for i in (1, 2, 3)])
        assert engine.runner.pos_max(slot.seq_id) == held and slot.held.size == held + 1
        out |= run_engine(engine, [Generate("again", prompts[0], 8, greedy)])  # from that stream
        outs.append(out)
    assert padded.stats()["step_pad_rows_total"] >= 23  # every step of the three but the first
    for rid, tokens in outs[0].items():
        if tokens != outs[1][rid]:
            prompt = prompts[0] if rid in ("first", "again") else prompts[int(rid[1])]
            gaps = teacher_forced(engines[1], prompt, tokens)
            assert max(gap for _, gap in gaps) <= MARGIN, (rid, gaps)
