"""Step costs kept across starts (engine/costs_file.py): a start takes an earlier start's
measurements only where sizes timed again agree with them, and the file never stops one."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random

import pytest

from demesne.config import EngineConfig
from demesne.engine import costs_file, speculate
from demesne.engine.runner import ModelRunner
from demesne.engine.speculate import RETIMED, StepCosts

from conftest import make_engine
from test_padding import CPU_ROWS


class Machine:
    """Decodes that take ``CPU_ROWS`` ms times ``speed``, with ``reshape`` overriding sizes;
    ``busy``: every decode preempted like one beside another process; ``jitter``: each decode
    up to that factor slower, at random (no preemptions seen: a hypervisor's)."""

    def __init__(self, speed: float = 1.0, reshape: dict[int, float] | None = None, busy: bool = False,
                 jitter: float = 1.0, seed: int = 0):
        self.speed, self.reshape, self.busy, self.jitter = speed, reshape or {}, busy, jitter
        self.calls, self.switches = 0, 0
        self.random = random.Random(seed)

    def time_rows(self, n: int) -> float:
        self.calls += 1
        seconds = self.speed * self.reshape.get(n, CPU_ROWS.get(n, 10 * n)) / 1e3
        seconds *= self.random.uniform(1.0, self.jitter)
        self.switches += 1000 if self.busy else 0
        return seconds

    def calibrate(self, costs: StepCosts, known: dict | None) -> bool:
        return costs.calibrate(self.time_rows, 12, budget=10.0, preemptions=lambda: self.switches, every=12, known=known)


def measured_once(machine: Machine | None = None) -> StepCosts:
    costs = StepCosts()
    assert (machine or Machine()).calibrate(costs, None)
    return costs


def test_a_later_start_times_a_few_sizes_again_and_keeps_the_least_times():
    first = measured_once()
    known = first.measurements()
    assert known == {"quiet": {n: CPU_ROWS[n] / 1e3 for n in CPU_ROWS}, "noisy": {}, "starts": 1, "drift": 0.0}
    slower = Machine(speed=1.2)  # a slower day: every size keeps its time of the first start
    again = StepCosts()
    assert not slower.calibrate(again, known)
    assert slower.calls == 1 + 2 * (1 + RETIMED)  # the warm-up, then two of 1 row and of 3 sizes
    assert again.quiet == first.quiet and again.knots == first.knots and 3 not in again.knots
    assert again.curve == pytest.approx(first.curve) and again.starts == 2


def test_sizes_a_disturbance_made_dear_are_corrected_in_turn_over_starts():
    """The first start measured 4 and 10 rows while the machine was busy (no preemptions
    seen: a hypervisor's); later starts time every size again in turn, and each keeps its
    least time, so 4 rows are again cheaper than 3 and the odd sizes are dear."""
    first = measured_once(Machine(reshape={4: 80.0, 10: 130.0}))
    assert 3 in first.knots  # 3 rows looked cheaper than 4
    known, cheap = first.measurements(), len(CPU_ROWS) - 1
    for _ in range(-(-cheap // RETIMED)):
        costs = StepCosts()
        assert not Machine().calibrate(costs, known)
        known = costs.measurements()
    assert costs.quiet == pytest.approx({n: CPU_ROWS[n] / 1e3 for n in CPU_ROWS})
    assert costs.knots == measured_once().knots and 3 not in costs.knots
    assert costs.starts == 1 + -(-cheap // RETIMED)


@pytest.mark.parametrize("seed", range(5))
def test_a_jittery_machine_keeps_its_entry_over_many_starts(seed):
    """Each size keeps its least time, so the kept times fall below a typical timing: after
    many starts a re-timing is typically well slower than what is kept (here, without the
    drift, two seeds in five measure again within 60 starts), which is no reason to measure
    again; 2x slower than typical still is."""
    costs = StepCosts()
    assert Machine(jitter=2.0, seed=1000 * seed).calibrate(costs, None)
    for start in range(1, 61):
        again = StepCosts()
        assert not Machine(jitter=2.0, seed=1000 * seed + start).calibrate(again, costs.measurements()), start
        costs = again
    assert costs.starts == 61 and 0.1 < costs.drift < math.log(2.0)
    assert costs.quiet == pytest.approx({n: CPU_ROWS[n] / 1e3 for n in costs.quiet}, rel=0.15)
    assert Machine(speed=2.0, jitter=2.0, seed=99).calibrate(StepCosts(), costs.measurements())


@pytest.mark.parametrize(
    "machine",
    [
        Machine(speed=2.0),  # far slower than when measured: another machine, or a throttled one
        Machine(speed=0.5),  # far faster: the earlier start ran beside something
    ],
    ids=["slower", "faster"],
)
def test_measurements_that_no_longer_hold_are_measured_again(machine):
    known = measured_once().measurements()
    costs = StepCosts()
    assert machine.calibrate(costs, known)
    assert machine.calls > 1 + 2 * (1 + RETIMED) and costs.starts == 1
    expected = {n: machine.speed * CPU_ROWS[n] / 1e3 for n in CPU_ROWS}
    assert costs.quiet and costs.quiet == pytest.approx({n: expected[n] for n in costs.quiet})


def test_a_busy_machine_keeps_what_earlier_starts_measured():
    first = measured_once()
    busy = Machine(speed=3.0, busy=True)  # every timing disturbed, and slow
    costs = StepCosts()
    assert not busy.calibrate(costs, first.measurements())
    assert busy.calls == 1 + 2 * (1 + RETIMED)
    assert costs.quiet == first.quiet and costs.knots == first.knots


def test_starts_that_measured_nothing_undisturbed_keep_their_least_times():
    """A machine busy at every start (a test suite's): each start's disturbed times merge,
    and the sizes a quiet start times become undisturbed ones."""
    costs = StepCosts()
    Machine(speed=2.0, busy=True).calibrate(costs, None)
    known = costs.measurements()
    assert not known["quiet"] and known["noisy"]
    again = StepCosts()
    assert not Machine(speed=1.5, busy=True).calibrate(again, known)
    assert not again.quiet and again.measurements()["noisy"][1] == pytest.approx(1.5 * CPU_ROWS[1] / 1e3)
    quiet = StepCosts()
    assert not Machine().calibrate(quiet, again.measurements())
    assert 1 in quiet.quiet and len(quiet.quiet) == 1 + RETIMED


def test_the_file_keeps_each_setup_apart_and_survives_damage(tmp_path, caplog):
    path = str(tmp_path / "sub" / "step-costs.json")
    assert costs_file.load(path, "a") is None  # no file yet: quietly None
    known = measured_once().measurements()
    costs_file.save(path, "a", known)
    costs_file.save(path, "b", {"quiet": {1: 0.5}, "noisy": {2: 0.9}, "starts": 3, "drift": 0.2})
    assert costs_file.load(path, "a") == known
    assert costs_file.load(path, "b") == {"quiet": {1: 0.5}, "noisy": {2: 0.9}, "starts": 3, "drift": 0.2}
    assert costs_file.load(path, "c") is None
    assert [f for f in os.listdir(tmp_path / "sub")] == ["step-costs.json"]  # no partial file left

    with open(path) as f:
        entries = json.load(f)
    entries["a"]["quiet"]["4"] = -1.0  # a time no decode takes
    entries["b"]["noisy"] = "x"
    with open(path, "w") as f:
        json.dump(entries, f)
    assert costs_file.load(path, "a") is None and costs_file.load(path, "b") is None
    for junk in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        with open(path, "wb") as f:
            f.write(junk)
        assert costs_file.load(path, "a") is None
        costs_file.save(path, "a", known)  # a damaged file is replaced
        assert costs_file.load(path, "a") == known
    assert "measuring step costs" in caplog.text

    blocked = str(tmp_path / "sub" / "step-costs.json" / "x.json")  # its directory is a file
    costs_file.save(blocked, "a", known)  # logged, not raised
    assert costs_file.load(blocked, "a") is None


def test_the_file_keeps_the_most_recent_setups(tmp_path, monkeypatch):
    path = str(tmp_path / "step-costs.json")
    monkeypatch.setattr(costs_file, "MAX_ENTRIES", 3)
    for key in "abcde":
        costs_file.save(path, key, {"quiet": {1: 0.02}, "noisy": {}, "starts": 1})
    assert [costs_file.load(path, k) is not None for k in "abcde"] == [False, False, True, True, True]


def stop(engine) -> None:
    engine.close()
    engine.runner.close()


def test_an_engine_starts_on_the_costs_an_earlier_start_measured(model_path, tmp_path, monkeypatch):
    """The real model: the first engine measures and keeps its costs; the second, with the
    same set-up, times only a few sizes again (told to take them whatever today's speed:
    this machine's noise is not what is tested here) and keeps each size's least time; one
    of more sequences measures only the sizes it lacks; another set-up measures its own."""
    path = str(tmp_path / "step-costs.json")
    calls = []
    time_rows = ModelRunner.time_rows
    monkeypatch.setattr(ModelRunner, "time_rows", lambda self, n: calls.append(n) or time_rows(self, n))

    first = make_engine(model_path, step_costs_file=path)
    measured = len(calls)
    quiet = first.speculator.costs.quiet
    stop(first)
    with open(path) as f:
        assert len(json.load(f)) == 1

    monkeypatch.setattr(speculate, "RECHECK_SPEED", 1e9)
    calls.clear()
    second = make_engine(model_path, step_costs_file=path)
    assert len(calls) == 1 + 2 * (1 + RETIMED) < measured
    again = second.speculator.costs
    assert again.starts == 2 and again.quiet.keys() == quiet.keys()
    assert all(again.quiet[n] <= quiet[n] for n in quiet)
    with open(path) as f:
        (key,) = json.load(f)
    assert costs_file.load(path, key)["quiet"] == again.quiet
    stop(second)

    calls.clear()  # more sequences: the sizes up to 16 the entry lacks are measured, once
    third = make_engine(model_path, step_costs_file=path, max_seqs=16)
    lacking = {9, 10, 11, 13, 14, 15}  # (12 and 16 rows are among the curve's sizes)
    assert len(calls) == 1 + 2 * (1 + RETIMED + len(lacking)) and lacking <= set(calls)
    assert set(range(1, 17)) <= third.speculator.costs.quiet.keys() | set(third.speculator.costs._noisy)
    stop(third)
    with open(path) as f:
        assert len(json.load(f)) == 1  # the same set-up: a decode of n rows costs what it did

    calls.clear()
    stop(make_engine(model_path, step_costs_file=path, ubatch_size=256))
    assert len(calls) > 1 + 2 * (1 + RETIMED)
    with open(path) as f:
        assert len(json.load(f)) == 2


def test_the_key_tells_set_ups_apart(monkeypatch):
    class Runner:
        fingerprint = "f"

        def kv_fingerprint(self):
            return self.fingerprint

        @staticmethod
        def system_info():
            return "CPU : AVX2 = 1"

    runner, config = Runner(), EngineConfig(model="m.gguf")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    key = costs_file.costs_key(config, runner)
    assert costs_file.costs_key(EngineConfig(model="m.gguf"), runner) == key
    # a decode of n rows of one sequence costs the same whatever the other sequences and cells
    assert costs_file.costs_key(dataclasses.replace(config, max_seqs=4, ctx_size=4096), runner) == key
    others = [
        costs_file.costs_key(dataclasses.replace(config, threads=1), runner),
        costs_file.costs_key(dataclasses.replace(config, ubatch_size=128), runner),
        costs_file.costs_key(dataclasses.replace(config, n_gpu_layers=-1), runner),
        costs_file.costs_key(dataclasses.replace(config, deterministic=True), runner),
    ]
    runner.fingerprint = "another model or KV type"
    others.append(costs_file.costs_key(config, runner))
    runner.fingerprint = "f"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # another GPU, the engine's device 0
    others.append(costs_file.costs_key(config, runner))
    assert len({key, *others}) == 1 + len(others)


def test_sizes_the_earlier_starts_lacked_are_measured_and_larger_ones_kept():
    small = StepCosts()  # an engine of 6 sequences, 48 rows at most
    assert small.calibrate(Machine().time_rows, 48, budget=10.0, preemptions=lambda: 0, every=6)
    known = small.measurements()
    machine = Machine()
    again = StepCosts()  # one of 12
    assert not machine.calibrate(again, known)
    assert machine.calls == 1 + 2 * (1 + RETIMED + 4)  # 7, 9, 10 and 11 rows: measured now
    assert set(range(1, 13)) <= again.quiet.keys()
    fewer = StepCosts()  # one of 2 sequences, 8 rows at most: the file keeps the larger sizes
    assert not fewer.calibrate(Machine().time_rows, 8, preemptions=lambda: 0, every=2, known=again.measurements())
    assert max(fewer.quiet) == 8
    assert fewer.measurements()["quiet"].keys() == again.measurements()["quiet"].keys() == known["quiet"].keys() | set(range(1, 13))
