"""Picks the next token of every output row, with numpy, from the exact distribution.

A row's distribution is the softmax of its logits at its temperature, cut by min-p (tokens
below ``min_p`` times the best token's probability), then top-k, then top-p (the smallest set
of likeliest tokens whose mass reaches ``top_p`` of what min-p and top-k left). Nothing else
is dropped: every token with a finite logit is drawn with its true probability, up to float
rounding. With a 262k-token vocabulary sorting a row costs more than a decode step, so no
row is sorted whole:

- one ``argmax`` over the ``(rows, vocab)`` block serves every greedy row and gives each
  row's best logit ``m``;
- **open rows** (no top-k or min-p, or one that keeps too many tokens to list) write their
  unnormalised probabilities ``exp((x - m) / T)`` into a one-row scratch (two or three
  float32 passes, ~0.2 ms on Gemma's vocabulary), sum them per *stripe*, and draw in two
  levels: a stripe by its mass, then a token of that stripe by its probability. That is
  inverse-CDF sampling over the whole row, hence exact, without a running sum over 262k
  values. Stripe ``j`` holds tokens ``j, j + 4096, j + 2 * 4096, ...``: numpy sums a
  ``(64, 4096)`` view down its columns at memory speed, and several times slower along
  short contiguous blocks. min-p, and a top-k too wide to list, zero what they cut first;
- **top-p on an open row** is rejection sampling: draw from the distribution and keep the
  token when the tokens strictly likelier than it hold less than ``top_p`` of the mass,
  which is exactly when a sort would have kept it (one comparison and one dot product over
  the row decide it). A draw is kept with probability at least ``top_p``. After four
  refusals the nucleus is found outright (the likeliest tokens sorted, from a bar low
  enough to hold it) and the rest zeroed; either way the token has the exact distribution;
- **narrow rows** (a top-k, or a min-p, that keeps few tokens) list the tokens they keep
  without a pass over the row's probabilities: each stripe's largest logit is read once,
  and the k-th largest of those is a bar that at least k tokens reach. Every kept token is
  at or above it (and at or above min-p's floor), so only the few tokens there are sorted,
  cut and drawn from;
- every row draws from its own generator, and how many numbers it draws depends on its
  own row alone, so a seeded request gives the same tokens whatever else shares the batch.

Per-row parameters are gathered into arrays once per step by :meth:`Sampler.prepare`.
"""

from __future__ import annotations

import math

import numpy as np

from ..protocol import SamplingParams

_STRIPES = 4096  # a stripe is every 4096th token: 64 tokens on Gemma's 262,144
_NARROW_STRIPES = 256  # a narrow row reads at most this many stripes (16,384 tokens)
_TRIES = 4  # top-p draws refused before the nucleus is found outright
REPEAT_WINDOW = 64  # llama.cpp's default penalty_last_n


def apply_penalties(row: np.ndarray, tokens: list[int], prompt_len: int, p: SamplingParams) -> None:
    """Penalise one row of logits in place: OpenAI's presence and frequency penalties over
    the generated tokens, llama.cpp's repetition penalty over the last 64 tokens."""
    if p.presence_penalty or p.frequency_penalty:
        generated = np.asarray(tokens[prompt_len:], np.int64)
        if generated.size:
            ids, counts = np.unique(generated, return_counts=True)
            row[ids] -= p.presence_penalty + p.frequency_penalty * counts
    if p.repetition_penalty != 1.0:
        ids = np.unique(np.asarray(tokens[-REPEAT_WINDOW:], np.int64))
        values = row[ids]
        row[ids] = np.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)


class Sampler:
    def __init__(self, n_vocab: int, max_rows: int):
        self.n_vocab = n_vocab
        self._temp = np.ones(max_rows)
        self._top_p = np.ones(max_rows)
        self._top_k = np.full(max_rows, n_vocab, np.int64)
        self._min_p = np.zeros(max_rows)
        self._greedy = np.ones(max_rows, bool)
        self._all_greedy = True  # every row prepared is greedy
        # One open row's probabilities as (depth, stripe); the padding past n_vocab stays 0.
        self._probs = np.zeros((-(-n_vocab // _STRIPES), _STRIPES), np.float32)
        self._row = self._probs.reshape(-1)[:n_vocab]
        self._mass = np.empty(_STRIPES, np.float32)
        self._kept = np.empty(n_vocab, bool)

    def prepare(self, params: list[SamplingParams]) -> None:
        """Gather the rows' parameters for the coming :meth:`sample` call."""
        self._all_greedy = all(p.greedy for p in params)  # (numpy's all() costs more on a few rows)
        for i, p in enumerate(params):
            self._greedy[i] = p.greedy
            self._temp[i] = p.temperature if not p.greedy else 1.0
            self._top_p[i] = p.top_p
            self._top_k[i] = min(p.top_k, self.n_vocab) if p.top_k > 0 else self.n_vocab
            self._min_p[i] = p.min_p

    def sample(self, logits: np.ndarray, rngs: list[np.random.Generator | None], rows: list[int] | None = None) -> np.ndarray:
        """Return one token id per row of ``logits`` (rows as given to :meth:`prepare`), or
        per row of ``logits`` listed in ``rows`` (the others are a sequence's draft rows, which
        the engine samples one by one). ``logits`` is read, never written."""
        if rows is None:
            rows = range(logits.shape[0])
            best = logits.argmax(axis=1)
        else:  # row by row: a gather would copy a vocabulary's worth of floats per row
            best = np.fromiter((logits[r].argmax() for r in rows), np.int64, len(rows))
        n = len(rows)
        if self._all_greedy:
            return best
        for i in np.flatnonzero(~self._greedy[:n]):
            x = logits[rows[i]]
            row_max = float(x[best[i]])
            if np.isfinite(row_max):  # a row with no finite logit has nothing to draw from: greedy
                best[i] = self._sample_row(x, row_max, i, rngs[i] or np.random.default_rng())
        return best

    def _sample_row(self, x: np.ndarray, m: float, i: int, rng: np.random.Generator) -> int:
        # Python numbers: a numpy float64 would make numpy compute the float32 row in float64.
        temp, top_p, min_p = float(self._temp[i]), float(self._top_p[i]), float(self._min_p[i])
        top_k = int(self._top_k[i])
        if top_k == self.n_vocab and min_p == 0:
            return self._draw_open(self._probabilities(x, m, temp), top_p, rng)
        stripe_max = _stripe_max(x)
        bar = _narrow_bar(stripe_max, m, temp, top_k if top_k < self.n_vocab else 0, min_p)
        listed = _at_or_above(x, stripe_max, bar, _NARROW_STRIPES)
        if listed is not None:
            return _draw_listed(x, listed, m, temp, top_k, top_p, min_p, rng)
        e = self._probabilities(x, m, temp)
        if min_p > 0:
            _cut(e, np.greater_equal(e, min_p, out=self._kept))
        if top_k < self.n_vocab:
            _cut(e, np.greater_equal(x, _kth_largest(x, stripe_max, top_k), out=self._kept))
        return self._draw_open(e, top_p, rng)

    def _probabilities(self, x: np.ndarray, m: float, temp: float) -> np.ndarray:
        """The row's probabilities relative to its best token, exp((x - m) / T), in scratch."""
        e = self._row
        np.subtract(x, m, out=e)  # before scaling: a tiny T must not cancel large values
        if temp != 1.0:
            np.multiply(e, 1.0 / temp, out=e)
        # exp, not exp2: numpy's float32 exp2 leaves its vector loop wherever a result
        # underflows (~20x slower), which low temperatures and masked tokens make common.
        return np.exp(e, out=e)

    def _draw_open(self, e: np.ndarray, top_p: float, rng: np.random.Generator) -> int:
        mass = self._probs.sum(axis=0, out=self._mass)
        if top_p >= 1.0:
            return _draw_striped(self._probs, mass, rng)
        need = top_p * float(mass.sum(dtype=np.float64))
        for _ in range(_TRIES):
            token = _draw_striped(self._probs, mass, rng)
            # Kept by top-p iff the tokens likelier than it hold less than top_p of the mass.
            if e[token] == 1.0 or self._mass_above(e, e[token]) < need:
                return token
        _cut(e, np.greater_equal(e, self._nucleus_floor(e, need), out=self._kept))
        return _draw_striped(self._probs, self._probs.sum(axis=0, out=self._mass), rng)

    def _mass_above(self, e: np.ndarray, value: float) -> float:
        return float(np.dot(e, np.greater(e, value, out=self._kept)))

    def _nucleus_floor(self, e: np.ndarray, need: float) -> float:
        """The least probability top-p keeps: the likeliest tokens are listed from a bar low
        enough that they hold ``need``, sorted, and cut where their running sum reaches it."""
        for bar in (*(16.0**-j for j in range(1, 32)), 0.0):
            kept = np.greater_equal(e, bar, out=self._kept)
            if np.dot(e, kept) >= need:
                break
        likeliest = np.sort(e[kept])[::-1]
        reach = np.cumsum(likeliest, dtype=np.float64)
        return likeliest[min(int(np.searchsorted(reach, need)), likeliest.size - 1)]


def _cut(e: np.ndarray, kept: np.ndarray) -> None:
    np.multiply(e, kept, out=e)


def _draw_striped(probs: np.ndarray, mass: np.ndarray, rng: np.random.Generator) -> int:
    """Inverse-CDF draw over a row laid out as (depth, stripe): a stripe by its mass, then a
    token of that stripe by its probability."""
    u_stripe, u_token = rng.random(2)
    stripe = _inverse_cdf(mass, u_stripe)
    depth = _inverse_cdf(probs[:, stripe], u_token)
    return depth * probs.shape[1] + stripe


def _inverse_cdf(weights: np.ndarray, u: float) -> int:
    """The index where the running sum of ``weights`` passes ``u`` of their total; never a
    weight of 0, even when rounding puts the target at the very end."""
    cum = np.cumsum(weights, dtype=np.float64)
    i = int(np.searchsorted(cum, u * cum[-1], side="right"))
    return i if i < weights.size else int(np.flatnonzero(weights)[-1])


def _draw_listed(x, ids, m, temp, top_k, top_p, min_p, rng) -> int:
    """Draw from tokens ``ids`` of row ``x``, which hold every token min-p and top-k keep."""
    p = np.exp((x[ids].astype(np.float64) - m) / temp)
    order = np.argsort(-p, kind="stable")[:top_k]  # likeliest first: top-k is a prefix
    p, ids = p[order], ids[order]
    p = p[: np.count_nonzero(p >= min_p) if min_p > 0 else np.count_nonzero(p)]
    cum = np.cumsum(p)
    if top_p < 1.0:  # keep a token while the mass before it is below top_p of the total
        cum = cum[: int(np.searchsorted(cum, top_p * cum[-1])) + 1]
    i = int(np.searchsorted(cum, rng.random() * cum[-1], side="right"))
    return int(ids[min(i, cum.size - 1)])


def _stripe_max(x: np.ndarray) -> np.ndarray | None:
    """The largest logit of each stripe over the whole rows of ``_STRIPES`` tokens; None for
    a vocabulary smaller than one such row."""
    whole = x.size // _STRIPES * _STRIPES
    return x[:whole].reshape(-1, _STRIPES).max(axis=0) if whole else None


def _narrow_bar(stripe_max: np.ndarray | None, m: float, temp: float, top_k: int, min_p: float) -> float:
    """A logit below every token that min-p (if > 0) and top-k (if > 0) keep: either bar
    alone will do. min-p's: p >= min_p * p_max, that is x >= m + T log(min_p), less a slack
    for float32 rounding. top-k's costs a partition, worth it only when min-p's would leave
    more than k stripes to read."""
    bar = m + temp * math.log(min_p) - (1e-3 * temp + 1e-6 * abs(m)) if min_p > 0 else -np.inf
    if top_k and _reaching(stripe_max, bar) > top_k:
        bar = max(bar, _top_k_bar(stripe_max, top_k))
    return bar


def _kth_largest(x: np.ndarray, stripe_max: np.ndarray | None, k: int) -> float:
    """The k-th largest logit: a partition of the tokens at or above the top-k bar, or of
    the whole row when there are fewer stripes than k."""
    bar = _top_k_bar(stripe_max, k)
    values = x[_at_or_above(x, stripe_max, bar, None)] if bar > -np.inf else x
    return float(np.partition(values, values.size - k)[values.size - k])


def _reaching(stripe_max: np.ndarray | None, bar: float) -> int:
    """How many stripes hold a logit at or above ``bar`` (0 without stripes)."""
    return 0 if stripe_max is None else int(np.count_nonzero(stripe_max >= bar))


def _top_k_bar(stripe_max: np.ndarray | None, k: int) -> float:
    """A logit that at least ``k`` tokens reach: the k-th largest stripe maximum (each of
    those k stripes holds a token at or above it); -inf when there are fewer stripes."""
    if stripe_max is None or k > stripe_max.size:
        return -np.inf
    return float(np.partition(stripe_max, stripe_max.size - k)[stripe_max.size - k])


def _at_or_above(x: np.ndarray, stripe_max: np.ndarray | None, bar: float, max_stripes: int | None):
    """Ids of the tokens with logit >= ``bar``, read from the stripes that reach it (and the
    tokens past the last whole row of stripes); None if more than ``max_stripes`` do."""
    if stripe_max is None:
        return np.flatnonzero(x >= bar)
    stripes = np.flatnonzero(stripe_max >= bar)
    if max_stripes is not None and stripes.size > max_stripes:
        return None
    whole = stripe_max.size * (x.size // stripe_max.size)
    depth, col = np.nonzero(x[:whole].reshape(-1, stripe_max.size)[:, stripes] >= bar)
    rest = np.flatnonzero(x[whole:] >= bar) + whole
    return np.concatenate((depth * stripe_max.size + stripes[col], rest))
