"""StepBudget: prompt chunks sized by time while streams decode (no model needed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from demesne.engine.budget import StepBudget


def scheduler(decoding: int, prefilling: int = 1):
    rows = [SimpleNamespace(attached=True, n_remaining=1) for _ in range(decoding)]
    rows += [SimpleNamespace(attached=False, n_remaining=500) for _ in range(prefilling)]
    return SimpleNamespace(
        decoding=lambda: [s for s in rows if s.attached and s.n_remaining == 1],
        first_token_waiters=lambda: sum(not s.attached for s in rows),
    )


def test_nobody_decoding_takes_the_whole_batch():
    budget = StepBudget(2048, target=0.5)
    budget.observe(0, 0.1)
    budget.observe(1000, 1.1)
    assert budget.tokens(scheduler(decoding=0)) == 2048


def test_decoding_streams_cap_the_prompt_chunk_by_time():
    budget = StepBudget(2048, target=0.5)
    for _ in range(5):
        budget.observe(0, 0.1)  # a decode-only step: 0.1 s
        budget.observe(1000, 1.1)  # + 1 ms per prompt token
    # 0.5 s target: 0.1 s of decode rows leaves 0.4 s, i.e. ~400 prompt tokens, plus 8 rows
    assert 390 <= budget.tokens(scheduler(decoding=8)) - 8 <= 410


def test_a_slow_machine_lets_prompts_take_a_share_of_the_step_rather_than_starve():
    budget = StepBudget(4096, target=0.5)
    budget.observe(0, 0.5)  # decode rows alone take the whole target (a full cache)
    budget.observe(1000, 1.5)  # 1 ms per prompt token
    assert budget.tokens(scheduler(decoding=16, prefilling=0)) == 16 + int(StepBudget.PROMPT_SHARE * 500)


@pytest.mark.parametrize(
    "decoding, waiting, times",
    [
        (1, 15, 15),  # a burst beside one stream about to finish: one long step, not 30 short ones
        (2, 8, 4),
        (1, 1, 1),  # one arrival beside one stream: the stream keeps its pace
        (15, 1, 1),
        (8, 8, 1),
        (4, 0, 1),
    ],
)
def test_where_more_wait_than_decode_the_prompt_time_grows_with_them(decoding, waiting, times):
    budget = StepBudget(8192, target=0.5)
    for _ in range(5):
        budget.observe(0, 0.1)
        budget.observe(1000, 1.1)  # 1 ms per prompt token: 0.4 s is ~400 tokens
    prompt = budget.tokens(scheduler(decoding=decoding, prefilling=waiting)) - decoding
    assert times * 390 <= prompt <= times * 401


def test_prompts_always_get_a_minimum_chunk():
    budget = StepBudget(512, target=0.5)
    budget.observe(0, 0.001)
    budget.observe(100, 10.0)  # 0.1 s per prompt token
    assert budget.tokens(scheduler(decoding=4)) == 4 + StepBudget.MIN_CHUNK


def test_no_target_and_no_measurements_mean_no_cap():
    assert StepBudget(512, target=0.0).tokens(scheduler(decoding=4)) == 512
    assert StepBudget(512, target=0.5).tokens(scheduler(decoding=4)) == 512  # nothing learned yet


def test_shrink_once_caps_only_the_next_step():
    budget = StepBudget(512, target=0.5)
    budget.shrink_once(100)
    assert budget.tokens(scheduler(decoding=0)) == 100
    assert budget.tokens(scheduler(decoding=0)) == 512
