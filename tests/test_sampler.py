"""demesne.engine.sampler on synthetic float32 logits over Gemma's 262,144-token vocabulary.

Frequencies are checked with a chi-square test against the true distribution, computed in
float64 by a full sort: softmax at the temperature, then min-p, top-k and top-p.
"""

import numpy as np
import pytest

from demesne.engine.sampler import Sampler
from demesne.protocol import SamplingParams

V = 262144
GREEDY = SamplingParams(temperature=0.0)


def normal_logits(rows: int, seed: int = 0, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, V)) * scale).astype(np.float32)


def sparse_logits(rows: int, ids, values) -> np.ndarray:
    """Every row: ``values`` at ``ids``, everything else far below (never a candidate)."""
    logits = np.full((rows, V), -1e9, np.float32)
    logits[:, ids] = np.asarray(values, np.float32)
    return logits


def draw(params: SamplingParams, ids, values, n_draws: int, seed: int = 0, rows: int = 40) -> np.ndarray:
    """n_draws tokens sampled from one row's distribution, ``rows`` at a time."""
    sampler = Sampler(V, rows)
    logits = sparse_logits(rows, ids, values)
    rng = np.random.default_rng(seed)
    sampler.prepare([params] * rows)
    out = [sampler.sample(logits, [rng] * rows) for _ in range(-(-n_draws // rows))]
    return np.concatenate(out)[:n_draws]


def softmax(x, temperature=1.0):
    z = np.asarray(x, np.float64) / temperature
    e = np.exp(z - z.max())
    return e / e.sum()


def assert_frequencies(tokens, ids, probs):
    """Chi-square goodness of fit over the candidate tokens (p < 1e-6 fails). An entry of
    ``ids`` may be an array of ids: a group of tokens counted together."""
    probs = np.asarray(probs, np.float64)
    n = len(tokens)
    observed = np.array([np.isin(tokens, i).sum() for i in ids])
    assert observed.sum() == n, "a token outside the candidates was drawn"
    keep = probs > 0
    assert (observed[~keep] == 0).all(), f"a cut token was drawn: {observed}"
    expected = probs[keep] * n
    chi2 = (((observed[keep] - expected) ** 2) / expected).sum()
    # 1e-6 critical values of chi-square for 1..5 degrees of freedom.
    critical = {0: 0.0, 1: 23.9, 2: 27.6, 3: 30.7, 4: 33.4, 5: 35.9}[keep.sum() - 1]
    assert chi2 <= critical + 1e-9, f"observed {observed}, expected {expected.round(1)}, chi2 {chi2:.1f}"


# --- greedy ------------------------------------------------------------------------------------


def test_greedy_rows_equal_argmax():
    logits = normal_logits(8)
    sampler = Sampler(V, 8)
    sampler.prepare([GREEDY] * 8)
    out = sampler.sample(logits, [None] * 8)
    assert out.shape == (8,)
    np.testing.assert_array_equal(out, logits.argmax(axis=1))


def test_top_k_one_is_greedy():
    logits = normal_logits(4, seed=1)
    sampler = Sampler(V, 4)
    sampler.prepare([SamplingParams(temperature=1.5, top_k=1, seed=s) for s in range(4)])
    out = sampler.sample(logits, [np.random.default_rng(s) for s in range(4)])
    np.testing.assert_array_equal(out, logits.argmax(axis=1))


def test_mixed_batch_leaves_greedy_rows_exact():
    logits = normal_logits(8, seed=2, scale=1.0)  # flat: stochastic rows rarely hit argmax
    params = [GREEDY, SamplingParams(1.0), GREEDY, SamplingParams(0.8, top_k=50), GREEDY, SamplingParams(1.2, top_p=0.9), SamplingParams(0.0, top_k=7), GREEDY]
    greedy = [p.greedy for p in params]
    sampler = Sampler(V, 8)
    sampler.prepare(params)
    rngs = [None if g else np.random.default_rng(i) for i, g in enumerate(greedy)]
    out = sampler.sample(logits, rngs)
    best = logits.argmax(axis=1)
    for row, g in enumerate(greedy):
        if g:
            assert out[row] == best[row], row
    stochastic = [r for r, g in enumerate(greedy) if not g]
    assert any(out[r] != best[r] for r in stochastic)  # they really were sampled
    assert all(0 <= out[r] < V for r in stochastic)
    # top_k=50 row: the token is among that row's 50 best.
    assert out[3] in set(np.argsort(-logits[3])[:50].tolist())


def test_tiny_top_p_gives_argmax():
    logits = normal_logits(8, seed=3, scale=1.0)
    sampler = Sampler(V, 8)
    sampler.prepare([SamplingParams(temperature=1.0, top_p=1e-9)] * 8)
    for seed in range(3):
        out = sampler.sample(logits, [np.random.default_rng(seed * 8 + i) for i in range(8)])
        np.testing.assert_array_equal(out, logits.argmax(axis=1))


def test_prepare_replaces_the_previous_rows_parameters():
    logits = normal_logits(4, seed=4, scale=1.0)
    sampler = Sampler(V, 8)
    sampler.prepare([SamplingParams(temperature=2.0)] * 8)
    sampler.sample(normal_logits(8, seed=5), [np.random.default_rng(0)] * 8)
    sampler.prepare([GREEDY] * 4)
    np.testing.assert_array_equal(sampler.sample(logits, [None] * 4), logits.argmax(axis=1))


def test_minus_infinity_tokens_are_never_drawn():
    logits = np.full((2, V), -np.inf, np.float32)
    logits[:, [17, 99]] = [0.0, 0.5]
    sampler = Sampler(V, 2)
    sampler.prepare([SamplingParams(temperature=2.0)] * 2)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(30):
        seen.update(sampler.sample(logits, [rng, rng]).tolist())
    assert seen == {17, 99}


# --- seeds and independence of rows -------------------------------------------------------------


def focus_logits(rows: int, seed: int) -> np.ndarray:
    """~200 plausible tokens per row, the rest out of reach: draws vary, sampling stays fast."""
    rng = np.random.default_rng(seed)
    logits = np.full((rows, V), -1e9, np.float32)
    for r in range(rows):
        ids = rng.choice(V, 200, replace=False)
        logits[r, ids] = rng.standard_normal(200).astype(np.float32)
    return logits


def test_same_seed_same_tokens():
    logits = focus_logits(8, seed=6)
    params = [SamplingParams(temperature=1.0, top_p=0.95, top_k=100)] * 8
    runs = []
    for _ in range(2):
        sampler = Sampler(V, 8)
        sampler.prepare(params)
        rngs = [np.random.default_rng(1000 + i) for i in range(8)]
        runs.append(np.stack([sampler.sample(logits, rngs) for _ in range(20)]))
    np.testing.assert_array_equal(runs[0], runs[1])
    assert len(np.unique(runs[0][:, 0])) > 3  # and the draws do vary from step to step


@pytest.mark.parametrize("position", [0, 3, 7])
def test_a_row_does_not_depend_on_the_rest_of_the_batch(position):
    mine = SamplingParams(temperature=0.9, top_p=0.9, top_k=60, seed=7)
    my_logits = focus_logits(1, seed=8)
    steps = 25

    sampler = Sampler(V, 8)
    sampler.prepare([mine])
    rng = np.random.default_rng(7)
    alone = [int(sampler.sample(my_logits, [rng])[0]) for _ in range(steps)]

    others = [GREEDY, SamplingParams(1.5), SamplingParams(0.5, top_k=3), SamplingParams(1.0, top_p=0.5), GREEDY, SamplingParams(2.0), SamplingParams(0.7)]
    params = others[:position] + [mine] + others[position:]
    batch = focus_logits(8, seed=9)
    batch[position] = my_logits[0]
    sampler = Sampler(V, 8)
    sampler.prepare(params)
    rngs = [None if p.greedy else np.random.default_rng(100 + i) for i, p in enumerate(params)]
    rngs[position] = np.random.default_rng(7)
    together = [int(sampler.sample(batch, rngs)[position]) for _ in range(steps)]

    assert together == alone
    assert len(set(alone)) > 3


# --- the distribution -------------------------------------------------------------------------

IDS = [5, 131072, 262143]  # scattered over the vocabulary, the last one included
N = 2500


@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.8])
def test_frequencies_match_softmax_at_temperature(temperature):
    values = [2.0, 1.0, 0.0]
    tokens = draw(SamplingParams(temperature=temperature), IDS, values, N, seed=int(temperature * 10))
    assert_frequencies(tokens, IDS, softmax(values, temperature))


def test_top_k_cuts_exactly_the_k_best():
    ids = [3, 1000, 77777, 200000, 262000]
    values = [1.0, 3.0, 2.0, 2.5, 1.5]  # order by logit: 1000, 200000, 77777, 262000, 3
    tokens = draw(SamplingParams(temperature=1.0, top_k=3), ids, values, N, seed=11)
    kept = np.array([0, 1, 1, 1, 0], bool)
    probs = np.where(kept, softmax(values), 0.0)
    assert_frequencies(tokens, ids, probs / probs.sum())


def test_top_p_keeps_the_smallest_nucleus():
    ids = [10, 20, 30, 40]
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    values = np.log(probs)
    # Mass before each token: 0, .5, .8, .95. top_p .75 keeps the first two, .85 three.
    for top_p, n_kept, seed in ((0.75, 2, 12), (0.85, 3, 13), (0.4, 1, 14)):
        tokens = draw(SamplingParams(temperature=1.0, top_p=top_p), ids, values, N // 2, seed=seed)
        kept = np.where(np.arange(4) < n_kept, probs, 0.0)
        assert_frequencies(tokens, ids, kept / kept.sum())


def test_top_k_and_top_p_together():
    ids = [1, 2, 3, 4, 5]
    probs = np.array([0.4, 0.25, 0.2, 0.1, 0.05])
    # top_k=3 leaves .4/.85, .25/.85, .2/.85; top_p .6 of that keeps the first two
    # (mass before the third is .65/.85 = .76 >= .6).
    tokens = draw(SamplingParams(temperature=1.0, top_k=3, top_p=0.6), ids, np.log(probs), N // 2, seed=15)
    kept = np.array([0.4, 0.25, 0.0, 0.0, 0.0])
    assert_frequencies(tokens, ids, kept / kept.sum())


def test_temperature_applies_before_top_p():
    # Temperature 0.5 turns [.5, .3, .2] into [.658, .237, .105], and top_p cuts that: at .6
    # only the first token stays (mass before the second is .658), at .7 the first two (before
    # the third: .895). Cut before the temperature, .6 would have kept two.
    ids = [100, 200, 300]
    values = np.log([0.5, 0.3, 0.2])
    sharp = softmax(values, 0.5)
    tokens = draw(SamplingParams(temperature=0.5, top_p=0.6), ids, values, N // 2, seed=16)
    assert_frequencies(tokens, ids, [1.0, 0.0, 0.0])
    tokens = draw(SamplingParams(temperature=0.5, top_p=0.7), ids, values, N // 2, seed=17)
    kept = np.array([sharp[0], sharp[1], 0.0])
    assert_frequencies(tokens, ids, kept / kept.sum())


# --- hostile parameters ------------------------------------------------------------------------


def test_underflowing_temperature_is_greedy_and_harms_no_other_row():
    logits = focus_logits(2, seed=20)
    sampler = Sampler(V, 2)
    sampler.prepare([SamplingParams(temperature=1.0)])
    rng = np.random.default_rng(5)
    alone = [int(sampler.sample(logits[1:], [rng])[0]) for _ in range(10)]

    sampler.prepare([SamplingParams(temperature=1e-46), SamplingParams(temperature=1.0)])
    rng = np.random.default_rng(5)
    with np.errstate(all="ignore"):
        outs = [sampler.sample(logits, [np.random.default_rng(9), rng]) for _ in range(10)]
    assert [int(o[0]) for o in outs] == [int(logits[0].argmax())] * 10
    assert [int(o[1]) for o in outs] == alone




# --- exactness against a full sort ------------------------------------------------------------


def reference(row: np.ndarray, p: SamplingParams) -> np.ndarray:
    """The true distribution of one row, in float64 with a full sort: softmax at the
    temperature, then min-p, top-k and top-p (mass before a kept token < top_p)."""
    z = row.astype(np.float64) / p.temperature
    prob = np.exp(z - z.max())
    prob[prob < p.min_p] = 0.0
    order = np.argsort(-prob, kind="stable")
    if p.top_k > 0:
        prob[order[p.top_k :]] = 0.0
    ranked = prob[order]
    before = np.cumsum(ranked) - ranked
    prob[order[before >= p.top_p * ranked.sum()]] = 0.0
    return prob / prob.sum()


def draw_row(params: SamplingParams, row: np.ndarray, n_draws: int = N, seed: int = 0, rows: int = 40) -> np.ndarray:
    """n_draws tokens sampled from ``row``, ``rows`` copies of it at a time."""
    sampler = Sampler(row.size, rows)
    logits = np.tile(row.astype(np.float32), (rows, 1))
    rng = np.random.default_rng(seed)
    sampler.prepare([params] * rows)
    out = [sampler.sample(logits, [rng] * rows) for _ in range(-(-n_draws // rows))]
    np.testing.assert_array_equal(logits[0], row.astype(np.float32))  # read, never written
    return np.concatenate(out)[:n_draws]


def assert_true_distribution(tokens: np.ndarray, ref: np.ndarray, n_groups: int = 5) -> None:
    """``tokens`` follow ``ref``: chi-square over groups of the likeliest tokens holding about
    equal true mass; no token that ``ref`` gives 0 was drawn."""
    kept = np.flatnonzero(ref)
    kept = kept[np.argsort(-ref[kept], kind="stable")]
    edges = np.searchsorted(np.cumsum(ref[kept]), np.arange(1, n_groups) / n_groups)
    groups = [g for g in np.split(kept, edges) if g.size] + [np.flatnonzero(ref == 0)]
    assert_frequencies(tokens, groups, [ref[g].sum() for g in groups])


def heavy_tail_row(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three likely tokens and 24,000 tokens each below 1e-4 of the best's probability at
    temperature 2, holding ~30% of the mass there; the rest of the vocabulary far below.
    A sampler that keeps only tokens within 1e-4 of the best never draws the tail."""
    rng = np.random.default_rng(seed)
    row = np.full(V, -60.0, np.float32)
    ids = rng.permutation(V)
    row[ids[:3]] = [0.0, -1.0, -2.0]
    tail = ids[3:24003]
    row[tail] = -20.0 - np.linspace(0.0, 1.0, tail.size)  # distinct: a top-p cut falls inside it
    return row, tail


def normal_row(seed: int, scale: float = 3.0) -> np.ndarray:
    return normal_logits(1, seed, scale)[0]


def test_heavy_tail_is_drawn_with_its_true_mass():
    row, tail = heavy_tail_row()
    params = SamplingParams(temperature=2.0)
    ref = reference(row, params)
    assert 0.29 < ref[tail].sum() < 0.32
    assert ref[tail].max() < 1e-4 * ref.max()
    tokens = draw_row(params, row)
    assert_true_distribution(tokens, ref)
    assert np.isin(tokens, tail).sum() > 600 and len(np.unique(tokens)) > 500


@pytest.mark.parametrize("tries", [4, 0])  # 0: every row finds its nucleus outright
@pytest.mark.parametrize("top_p", [0.5, 0.9])
def test_top_p_on_a_heavy_tail_matches_a_full_sort(monkeypatch, top_p, tries):
    import demesne.engine.sampler as sampler_module

    monkeypatch.setattr(sampler_module, "_TRIES", tries)
    row, tail = heavy_tail_row(seed=1)
    params = SamplingParams(temperature=2.0, top_p=top_p)
    ref = reference(row, params)
    if top_p == 0.9:  # the cut falls inside the tail: part of it kept, part not
        assert 0 < np.count_nonzero(ref[tail]) < tail.size
    n_draws = N if tries else N // 2  # finding the nucleus outright costs a sort
    assert_true_distribution(draw_row(params, row, n_draws, seed=int(top_p * 10) + tries), ref)


# 300: too many stripes to list, the open path; 5000: more than there are stripes (a partition)
@pytest.mark.parametrize("top_k", [3, 40, 300, 5000])
def test_top_k_matches_a_full_sort(top_k):
    row = normal_row(seed=30)
    params = SamplingParams(temperature=2.0, top_k=top_k)
    n_draws = N if top_k < 4096 else N // 4
    assert_true_distribution(draw_row(params, row, n_draws, seed=top_k), reference(row, params))


@pytest.mark.parametrize("min_p", [0.5, 0.05])  # 0.05 keeps ~1,000 tokens: the open path
def test_min_p_matches_a_full_sort(min_p):
    row = normal_row(seed=31)
    params = SamplingParams(temperature=2.0, min_p=min_p)
    assert_true_distribution(draw_row(params, row, seed=int(min_p * 100)), reference(row, params))


def test_min_p_inside_a_heavy_tail_matches_a_full_sort():
    row, tail = heavy_tail_row(seed=2)
    params = SamplingParams(temperature=2.0, min_p=3.5e-5)  # cuts the tail in two
    ref = reference(row, params)
    assert 0 < np.count_nonzero(ref[tail]) < tail.size
    assert_true_distribution(draw_row(params, row, seed=3), ref)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.5, min_p=0.01, top_k=50, top_p=0.8),
        SamplingParams(temperature=3.0, top_k=500, top_p=0.6),
        SamplingParams(temperature=0.7, top_p=0.95),
    ],
)
def test_cuts_together_match_a_full_sort(params):
    row = normal_row(seed=32)
    assert_true_distribution(draw_row(params, row, N // 2, seed=4), reference(row, params))


@pytest.mark.parametrize("vocab", [7, 4100])  # smaller than one row of stripes; a ragged last row
@pytest.mark.parametrize("params", [SamplingParams(1.0), SamplingParams(1.0, top_p=0.7), SamplingParams(1.0, top_k=3)])
def test_small_vocabularies_match_a_full_sort(vocab, params):
    row = np.random.default_rng(vocab).normal(0, 1.5, vocab).astype(np.float32)
    assert_true_distribution(draw_row(params, row, seed=5), reference(row, params))


@pytest.mark.parametrize(
    "params",
    [SamplingParams(5.0), SamplingParams(5.0, top_p=0.5), SamplingParams(5.0, top_k=300), SamplingParams(5.0, top_k=20), SamplingParams(5.0, min_p=0.9)],
)
def test_minus_infinity_is_never_drawn_on_any_path(params):
    row = normal_row(seed=33, scale=0.5)  # flat at temperature 5: every finite token is likely
    row[np.random.default_rng(34).random(V) < 0.5] = -np.inf
    tokens = draw_row(params, row, n_draws=400)
    assert np.isfinite(row[tokens]).all()
    assert len(np.unique(tokens)) > (1 if params.top_k or params.min_p else 300)


@pytest.mark.parametrize(
    "mine",
    [SamplingParams(temperature=2.0, top_p=0.7), SamplingParams(temperature=2.0, top_k=300), SamplingParams(temperature=1.5, min_p=0.3)],
)
def test_open_rows_do_not_depend_on_the_rest_of_the_batch(mine):
    my_logits = normal_logits(1, seed=40, scale=1.0)
    steps = 10
    sampler = Sampler(V, 4)
    sampler.prepare([mine])
    rng = np.random.default_rng(7)
    alone = [int(sampler.sample(my_logits, [rng])[0]) for _ in range(steps)]

    params = [SamplingParams(2.0, top_p=0.3), mine, GREEDY, SamplingParams(1.0, top_k=5)]
    batch = normal_logits(4, seed=41, scale=1.0)
    batch[1] = my_logits[0]
    sampler.prepare(params)
    rngs = [np.random.default_rng(100), np.random.default_rng(7), None, np.random.default_rng(101)]
    together = [int(sampler.sample(batch, rngs)[1]) for _ in range(steps)]
    assert together == alone
    assert len(set(alone)) > 3


# --- the parts -------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [262144, 1000, 4096, 4097, 12345])
def test_tokens_at_or_above_a_bar_equal_a_plain_comparison(vocab):
    from demesne.engine.sampler import _at_or_above, _stripe_max

    x = np.random.default_rng(vocab).normal(0, 3, vocab).astype(np.float32)
    for bar in (4.0, 9.0, -np.inf, np.inf):
        got = np.sort(_at_or_above(x, _stripe_max(x), bar, None))
        np.testing.assert_array_equal(got, np.flatnonzero(x >= bar))


@pytest.mark.parametrize("k", [1, 40, 4096, 5000])
def test_top_k_bar_is_reached_by_at_least_k_tokens(k):
    from demesne.engine.sampler import _stripe_max, _top_k_bar

    x = np.random.default_rng(k).normal(0, 3, V).astype(np.float32)
    bar = _top_k_bar(_stripe_max(x), k)
    assert np.count_nonzero(x >= bar) >= k
    assert bar <= np.sort(x)[-k]


def test_inverse_cdf_never_lands_on_a_zero_weight():
    from demesne.engine.sampler import _inverse_cdf

    weights = np.array([0.0, 1.0, 0.0, 2.0, 0.0, 0.0], np.float32)
    assert [_inverse_cdf(weights, u) for u in (0.0, 0.3, 0.34, np.nextafter(1.0, 0.0))] == [1, 1, 3, 3]
    assert _inverse_cdf(weights, 1.0) == 3  # a target rounded up to the total
