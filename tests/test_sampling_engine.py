"""The sampler's parameters in the engine, on the real model: logit_bias, penalties, min_p,
and logprobs against a reference computed from the raw logits."""

from __future__ import annotations

import numpy as np
import pytest

from demesne.engine.core import Engine, token_logprobs
from demesne.protocol import Generate, SamplingParams

from conftest import make_engine

PROMPT = "1, 2, 3, 4,"


@pytest.fixture(scope="module")
def engine(model_path):
    engine = make_engine(model_path, prefix_cache=False)
    yield engine
    engine.runner.close()


def generate(engine: Engine, prompt: list[int], max_tokens: int, **params) -> tuple[list[int], list]:
    rid = f"r{engine.counters.steps}-{len(engine.by_rid)}"
    assert engine.submit(b"t", Generate(rid, prompt, max_tokens, SamplingParams(**params))) is None
    tokens, logprobs = [], []
    while engine.has_work:
        for _c, d in engine.step():
            tokens.extend(d.tokens)
            logprobs.extend(d.logprobs or [])
    return tokens, logprobs


def test_logit_bias_forces_and_forbids(engine, tokenizer):
    prompt = tokenizer.encode(PROMPT)
    greedy, _ = generate(engine, prompt, 6, temperature=0.0)
    banned, _ = generate(engine, prompt, 6, temperature=0.0, logit_bias=[[greedy[0], -100.0]])
    assert banned[0] != greedy[0]
    forced_token = tokenizer.encode(" banana", add_special=False)[0]
    forced, _ = generate(engine, prompt, 5, temperature=0.9, seed=1, logit_bias=[[forced_token, 100.0]])
    assert forced == [forced_token] * 5


def test_penalties_change_greedy_output(engine, tokenizer):
    prompt = tokenizer.encode(PROMPT)
    plain, _ = generate(engine, prompt, 24, temperature=0.0)
    # " 5, 6, 7, ..." repeats "," every other token; a strong frequency penalty breaks that.
    penalised, _ = generate(engine, prompt, 24, temperature=0.0, frequency_penalty=2.0)
    comma = tokenizer.encode(",", add_special=False)[0]
    assert plain.count(comma) > penalised.count(comma)
    repeated, _ = generate(engine, prompt, 24, temperature=0.0, repetition_penalty=1.8)
    assert repeated != plain
    story = tokenizer.encode("Once upon a time")
    plain_story, _ = generate(engine, story, 24, temperature=0.0)
    present, _ = generate(engine, story, 24, temperature=0.0, presence_penalty=2.0)
    assert present != plain_story


def test_min_p_one_is_greedy_at_any_temperature(engine, tokenizer):
    prompt = tokenizer.encode("Once upon a time")
    greedy, _ = generate(engine, prompt, 12, temperature=0.0)
    hot, _ = generate(engine, prompt, 12, temperature=1.5, min_p=1.0, seed=3)
    assert hot == greedy


def test_logprobs_match_a_reference_from_raw_logits(engine, tokenizer):
    """The engine's logprobs for each generated token against logits computed here, one
    fresh sequence decoding the same tokens in the same chunks (prompt, then one by one)."""
    prompt = tokenizer.encode("The capital of France is")
    tokens, logprobs = generate(engine, prompt, 6, temperature=0.0, logprobs=5)
    assert len(logprobs) == len(tokens) == 6
    runner, batch = engine.runner, engine.runner.batch
    seq = prompt + tokens
    # The engine fed prompt[:-1] as a trie node and the last prompt token alone.
    bounds = [0, len(prompt) - 1] + list(range(len(prompt), len(seq)))
    batch.clear()
    batch.add_span(seq[: len(prompt) - 1], 0, 0, False)
    runner.decode()
    for k, token in enumerate(tokens):
        pos = len(prompt) - 1 + k
        batch.clear()
        batch.add_span([seq[pos]], pos, 0, True)
        row = runner.decode()[0]
        ref = token_logprobs(row, token, 5)
        got = logprobs[k]
        assert abs(ref[0] - got[0]) < 1e-3, (k, ref[0], got[0])
        assert [i for i, _ in ref[1]][:1] == [i for i, _ in got[1]][:1]
        assert np.allclose([lp for _, lp in ref[1]], [lp for _, lp in got[1]], atol=1e-3)
        # A distribution: the chosen token is the best (greedy), top list sorted, all <= 0.
        assert got[0] == got[1][0][1] and all(a[1] >= b[1] for a, b in zip(got[1], got[1][1:]))
    runner.remove(0)
    assert bounds  # documents the chunking above


def test_logit_bias_outside_vocabulary_is_refused(engine, tokenizer):
    error = engine.submit(b"t", Generate("bad-bias", tokenizer.encode("hi"), 2, SamplingParams(logit_bias=[[10**7, 1.0]])))
    assert error is not None and error.status == 400 and error.param == "logit_bias"


def test_seeded_request_ignores_what_else_is_drawn_in_the_batch(engine, tokenizer):
    """A seeded request draws from its own generator. Beside 7 others of the same shapes, its
    output is the same whether those others are greedy or sample with their own seeds, since
    its row's logits are the same and no other row's draws touch its generator."""
    prompts = [tokenizer.encode(f"Story {i}: once upon a time") for i in range(8)]

    def run_batch(others: dict) -> list[int]:
        reqs = [Generate("seeded", prompts[0], 16, SamplingParams(temperature=0.9, top_p=0.95, seed=1234))]
        reqs += [Generate(f"o{i}", p, 16, SamplingParams(**others, seed=i)) for i, p in enumerate(prompts[1:])]
        out = {r.rid: [] for r in reqs}
        for r in reqs:
            assert engine.submit(b"t", r) is None
        while engine.has_work:
            for _c, d in engine.step():
                out[d.rid].extend(d.tokens)
        return out["seeded"]

    with_greedy = run_batch({"temperature": 0.0})
    with_sampling = run_batch({"temperature": 1.2})
    assert len(with_greedy) == 16 and with_greedy == with_sampling
