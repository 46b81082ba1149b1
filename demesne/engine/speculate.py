"""Speculative decoding inside the continuous batch: n-gram drafts, verified in the step.

A decoding sequence feeds one token a step: the one it sampled last. With a *draft* of ``k``
guessed tokens after it, the step feeds ``k + 1`` tokens for that sequence, every one with an
output row, so one ``llama_decode`` gives the model's distribution after each of them. The
engine then samples row 0 as it would have anyway; while the token it picks equals the
draft's next token it goes on to the next row (whose context is exactly what the model saw),
and stops at the first difference: that sampled token is kept too (the correction), or, if
every draft token matched, the last row gives one more (the bonus). The tokens kept are the
tokens sampling would have produced without a draft, each drawn from the target model's
distribution with the sequence's own generator in the same order, so greedy and sampled
outputs alike keep the model's distribution (for a draft that puts all its mass on one token,
"accept with probability p(x)" and "sample, then compare" are the same rule). The cells of
the rejected tokens are removed from the sequence's KV.

**Drafts** come from the sequence itself (:class:`NgramIndex`): where its last n tokens
(n = 4, 3, 2, longest first) occurred before, in its prompt or its output, what followed
then is the draft. That costs no model and wins where outputs quote their input: code edits,
extraction, summaries that copy phrases, repeated structure. Where a sequence has no such
match, a small draft model of the same vocabulary (``--draft-model``, draft.py) may write the
draft instead, its decodes counted in the cost.

**What a draft costs is measured, not assumed** (:class:`StepCosts`): the engine times
decodes by how many output rows they have, at start and as it runs. An output row is cheap on a GPU (the weights
are read once for all rows) and not on a CPU, where every row multiplies the output layer
(Gemma 3 270M: 262,144 x 640), and where llama.cpp's separate KV streams put into one ubatch
only sequences that feed equally many tokens: a step in which some sequences draft and some
do not is two ubatches, two passes over the weights. Each step, :meth:`Speculator.propose`
picks one draft length ``k`` and the sequences that draft it so as to maximise expected
tokens per second: a sequence that accepts a share ``a`` of draft tokens adds
``a + a^2 + ... + a^k`` tokens in expectation. ``a`` is the sequence's own rate, starting
from the engine's overall one, so the draft length adapts per sequence, and once the batch
is big enough that rows cost more than they bring, nobody drafts. Only steps whose drafts'
ubatch has a size the curve has a point for are chosen (a measured size no dearer than a
larger one, or beyond those a knot the served steps correct): llama.cpp's CPU kernels take
rows in groups, so the cost is not linear between two points (here 12 rows cost 79 ms, 11
rows 105 ms, 16 rows 102 ms, 17 rows 143 ms), and from 3 rows up an odd size costs more than
the even one above it: on such a machine a sequence drafting alone drafts 1, 3, 5, 7, 11, 15,
23, 31 or 47 tokens, for steps of 2, 4, 6, 8, 12, 16, 24, 32 or 48 rows.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import numpy as np

try:
    import resource
except ImportError:  # Windows: preemptions are not counted
    resource = None

NGRAM_SIZES = (6, 4, 3, 2)  # longest first: a longer match is a better guess
PRIOR_WEIGHT = 4.0  # draft tokens' worth of the engine-wide rate in a sequence's estimate
MEMORY = 0.99  # the engine-wide counts fade by this at each verification
OPTIMISM = 1.5  # standard deviations added to a sequence's estimated acceptance rate
CALIBRATION_SECONDS = 2.0  # the undisturbed seconds the start-up measurement of step costs may take
EVERY_SECONDS = 3.0  # ...and, apart from those, the measurement of every size up to a step's sequences
CALIBRATION_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)  # output rows measured at start
CALIBRATION_TRIES = 4  # rounds over them at most (two undisturbed measurements a size are enough)
CALIBRATION_CAP = 2.0  # times the budget that all measurements, disturbed ones too, may take
MIN_SLOPE = 0.25  # the least cost of a row beyond the measured sizes, over their average
SUBADDITIVE_SLACK = 1.25  # a size may cost this much more than two smaller ones adding up to it
DEAR_SLACK = 1.1  # a size measured this much dearer than a larger one is not worth running as it is
# A quiet machine preempts a decode a few times (timers, kernel threads: measured here up to
# ~40 per second); another process competing for the cores, every scheduler slice (~250 per second).
QUIET_SWITCHES, QUIET_SWITCH_RATE = 2, 100.0
SCALE_RATE = 0.1  # how fast the step-cost scale follows the steps measured (a moving average)
SHAPE_RATE = 0.1  # how fast the curve's knots do, from what sets one size apart from the rest
LEARN_CLIP = 0.5  # the largest log error one step may teach
# A start with earlier starts' step costs times one row and RETIMED more sizes (in turn, those
# under RETIME_MOST seconds) again; it measures them all anew where the sizes timed again are
# slower or faster than before by more than RECHECK_SPEED (one machine here varies by 40%
# from day to day; a size measured twice minutes apart by up to a third).
RETIMED, RETIME_MOST, RECHECK_SPEED = 3, 0.25, 1.6
DRIFT_STARTS = 8  # the typical ratio of a re-timing to the kept least time: a mean over about this many starts
MIN_GAIN = 1.02  # drafting must promise this much more throughput than not drafting


class NgramIndex:
    """Where each n-gram of a sequence last occurred, so what followed it then can be
    proposed now. Incremental: each new token adds one entry per size.

    An n-gram whose last two occurrences were followed by different tokens is stored
    negated and proposes nothing: which one comes now is a guess (the start of a copy, after
    ``\n\ndef``, where every function of the prompt begins), and a wrong guess costs a step of
    draft rows. One more token usually makes a longer match that is not ambiguous."""

    __slots__ = ("tables", "n_indexed")

    def __init__(self) -> None:
        self.tables: tuple[dict, ...] = tuple({} for _ in NGRAM_SIZES)
        self.n_indexed = 1  # continuations indexed: those starting before this position

    def update(self, tokens: list[int]) -> None:
        for q in range(self.n_indexed, len(tokens)):  # an n-gram ending at q - 1, followed by q
            for n, table in zip(NGRAM_SIZES, self.tables):
                if q >= n:
                    key = tuple(tokens[q - n : q])
                    last = table.get(key)
                    table[key] = q if last is None or tokens[abs(last)] == tokens[q] else -q
        self.n_indexed = max(self.n_indexed, len(tokens))

    def draft(self, tokens: list[int], most: int) -> tuple[list[int], int]:
        """Up to ``most`` tokens that followed the last occurrence of the longest n-gram
        ending ``tokens``, and that n; ([], 0) if none occurred or that one is ambiguous."""
        self.update(tokens)
        end = len(tokens)
        for n, table in zip(NGRAM_SIZES, self.tables):
            if end > n:
                q = table.get(tuple(tokens[end - n :]))
                if q is not None:
                    return (tokens[q : min(q + most, end)], n) if q > 0 else ([], 0)
        return [], 0


MODEL = 0  # the "n-gram size" of drafts from the draft model (draft.py)
PROBE = 7  # the longest first draft of a request, or after a draft's first token was refused (a step of 8 rows)
# Acceptance rates assumed before any draft of a source was verified (two drafts' worth).
FIRST_RATE = {6: 0.8, 4: 0.7, 3: 0.6, 2: 0.5, MODEL: 0.6}


@dataclass(slots=True)
class SpecState:
    """One sequence's drafts: its n-gram index and how its drafts fared, by source (n-grams,
    the draft model)."""

    index: NgramIndex
    tried: int = 0  # n-gram draft tokens verified (those after a draft's first refusal were not)
    accepted: int = 0
    model_tried: int = 0  # the same for the draft model's
    model_accepted: int = 0
    match: int = 0  # the n-gram size behind its draft in this step (MODEL: the draft model)
    reach: int = PROBE  # the longest draft it may feed next (see Speculator.verified)

    def rate(self, prior: float, model: bool = False) -> float:
        """An optimistic estimate of the share of draft tokens it accepts (an upper
        confidence bound: a sequence's drafts get tried before its rate is known, and once
        it is, the bound is the rate)."""
        tried, accepted = (self.model_tried, self.model_accepted) if model else (self.tried, self.accepted)
        trials = tried + PRIOR_WEIGHT
        mean = (accepted + PRIOR_WEIGHT * prior) / trials
        return min(1.0, mean + OPTIMISM * (mean * (1.0 - mean) / trials) ** 0.5)

    def count(self, tried: int, accepted: int) -> None:
        if self.match == MODEL:
            self.model_tried += tried
            self.model_accepted += accepted
        else:
            self.tried += tried
            self.accepted += accepted


class StepCosts:
    """Seconds of a step by its number of output rows (in one ubatch).

    The *shape* of the curve is measured at start (:meth:`calibrate`: decodes of 1, 2, 3, 4,
    6, ... rows; not linear on a CPU, where two rows may cost nearly as much as four, so
    nothing is assumed about it) and interpolated between; its *scale* follows every
    decode-only step the engine runs (longer contexts make every step dearer), as a moving
    average of measured over predicted seconds. The shape learns too, slowly, from the steps
    of each size: a start-up measurement another process disturbed, or one that could only
    extrapolate to the sizes verification uses, is corrected by the steps served instead of
    steering every drafting decision for the life of the process.
    """

    def __init__(self) -> None:
        self.sizes = np.zeros(0)
        self.curve = np.zeros(0)
        self.scale = 1.0
        self.mean_error = 0.0  # the recent average log error of predictions (see rescale)
        self.shape_rate = SHAPE_RATE
        self.measured = 0  # sizes the calibration measured (the knots after them are extrapolated)
        self.disturbed = 0  # ...of which it never measured without another process running
        self.knots: frozenset[int] = frozenset()  # the sizes worth running that the curve has a point for
        self.quiet: dict[int, float] = {}  # by size: its least undisturbed time, as measured
        self._noisy: dict[int, float] = {}  # ...and for a size never measured undisturbed, its least
        self.starts = 1  # engine starts whose measurements these are (see calibrate's known)
        self.drift = 0.0  # how much slower than the least times re-timings typically are (log; see _retime)
        self._beyond: tuple[dict, dict] = ({}, {})  # quiet and noisy least times of sizes beyond this engine's (see measurements)

    def calibrate(
        self, time_rows, most: int, budget: float = CALIBRATION_SECONDS, preemptions=None, every: int = 0,
        known: dict | None = None,
    ) -> bool:
        """Measure the curve with ``time_rows(n)`` (seconds of a decode of n output rows),
        from one row up to ``most``, until ``budget`` seconds of undisturbed measurement are
        spent, or twice that in all (a large model on a CPU stops early; beyond the last size
        measured the curve goes on along a fitted slope, to knots at doubling sizes up to
        ``most`` that the served steps then correct). Every size up to ``every`` is measured
        too, within :data:`EVERY_SECONDS` of its own (a decode step has as many rows as
        sequences, and what an odd size costs is no interpolation: see :mod:`.padding`).

        Another process taking the cores only ever adds time, so each size keeps its least
        time; a measurement during which this process was preempted more than a quiet machine
        preempts it (``preemptions()``: involuntary context switches so far) was disturbed
        and is taken again in the next round over the sizes, up to :data:`CALIBRATION_TRIES`
        rounds, while a round still finds the machine quiet at times; a size never measured
        undisturbed keeps its least disturbed time, and :func:`_sane` caps what that can
        bend.

        ``known``: what earlier starts measured with the same model, settings and machine
        (:meth:`measurements`). Then only a few sizes are timed again (:meth:`_retime`), each
        keeping its least time over the starts: on a machine whose measurements of one size
        vary by a third from minute to minute, the curve gets better with every start instead
        of being drawn anew from one. Returns whether the curve was measured anew."""
        preemptions = preemptions or _preemptions
        time_rows(1)  # warm-up: the first decode pays one-time costs
        if known is not None:
            merged = self._retime(known, time_rows, preemptions, every)
            if merged is not None:
                top = max(most, every)
                quiet, noisy = ({n: t for n, t in part.items() if n <= top} for part in merged)
                # Sizes beyond this engine's (an engine of more sequences measured them) stay in the file.
                self._beyond = (
                    {n: min(t) for n, t in merged[0].items() if n > top and t},
                    {n: min(t) for n, t in merged[1].items() if n > top and not merged[0].get(n)},
                )
                self._fit(quiet, noisy, most)
                return False
        self._fit(*self._measure(time_rows, most, budget, preemptions, every), most)
        return True

    def _measure(self, time_rows, most: int, budget: float, preemptions, every: int):
        """By size measured: its undisturbed times, and its disturbed ones (see calibrate)."""
        quiet: dict[int, list[float]] = {}
        noisy: dict[int, list[float]] = {}
        # Rounds over the sizes: what a disturbance spoiled is taken again in a later round,
        # when the other process may be gone, rather than at once.
        # Two budgets of undisturbed seconds: the curve's sizes (up to ``most``) and every size
        # up to ``every``; a size of both counts for both, and is measured while either lasts.
        budgets = {CALIBRATION_SIZES: budget, **({range(1, every + 1): EVERY_SECONDS} if every else {})}
        spent = dict.fromkeys(budgets, 0.0)
        sizes = sorted({n for n in CALIBRATION_SIZES if n <= most} | set(range(1, every + 1)))
        total = 0.0
        for round_ in range(CALIBRATION_TRIES):
            calm = 0  # undisturbed measurements this round
            for n in sizes:
                groups = [g for g in budgets if n in g]
                if total > CALIBRATION_CAP * sum(budgets.values()):
                    break
                if n not in quiet and len(quiet) >= 2 and all(spent[g] > budgets[g] for g in groups):
                    continue
                got = quiet.setdefault(n, [])
                wanted = 2 - len(got) if round_ == 0 else min(1, 2 - len(got))  # later rounds: one more
                for _ in range(wanted):
                    seconds, undisturbed = _timed(time_rows, n, preemptions)
                    total += seconds
                    if undisturbed:
                        got.append(seconds)
                        for g in groups:
                            spent[g] += seconds
                        calm += 1
                    else:
                        noisy.setdefault(n, []).append(seconds)
            if calm == 0 or all(len(got) >= 2 for got in quiet.values()):
                break  # done, or the machine stays busy: the served steps will correct the curve
        return quiet, noisy

    def _fit(self, quiet: dict[int, list[float]], noisy: dict[int, list[float]], most: int) -> None:
        """The curve, its knots and the sizes' undisturbed times from what was measured."""
        sizes = sorted(quiet)
        curve = np.array([min(quiet[n] or noisy[n]) for n in sizes])
        self.measured, self.disturbed = len(sizes), sum(not quiet[n] for n in sizes)
        self.quiet = {n: min(quiet[n]) for n in sizes if quiet[n]}
        self._noisy = {n: min(noisy[n]) for n in sizes if not quiet[n]}
        self.sizes = np.array(sizes, np.float64)
        self.curve = _sane(self.sizes, curve)
        # A size measured undisturbed and dearer than a larger one is no knot: llama.cpp's CPU
        # kernels take rows in groups, and here 3 rows cost 35% more than 4, 15 rows
        # 12% more than 16. A step of that size is not chosen; a decode step of that many
        # sequences is padded (padding.py), which is what the curve, never dearer with more
        # rows, says it costs.
        dear = {n for n, c, fair in zip(sizes, curve, self.curve) if n in self.quiet and c > DEAR_SLACK * fair}
        if self.sizes[-1] < most and len(sizes) >= 2:  # knots for the sizes verification uses
            self._extend(most)
            self.curve = _sane(self.sizes, self.curve)
        self.knots = frozenset(int(n) for n in self.sizes) - dear

    def measurements(self) -> dict:
        """What :meth:`calibrate` measured, as ``known`` for a later start: by size, its least
        undisturbed time (``quiet``), or for a size never measured undisturbed its least time
        (``noisy``); and how many starts measured them (``starts``)."""
        quiet, noisy = self._beyond
        return {
            "quiet": quiet | self.quiet,
            "noisy": noisy | self._noisy,
            "starts": self.starts,
            "drift": self.drift,
        }

    def _retime(self, known: dict, time_rows, preemptions, every: int):
        """One row and the next :data:`RETIMED` sizes of ``known`` in turn (those a decode of
        under :data:`RETIME_MOST` seconds; the larger ones the served steps correct), timed
        twice each, and the sizes up to ``every`` it lacks; every size keeps its least time.
        Returns (quiet, noisy) as :meth:`_measure` does, or None where they do not describe
        this machine now (the sizes timed undisturbed are together slower or faster than
        ``known``, by more than :data:`RECHECK_SPEED` beyond the typical ``drift``, or ``known``
        lacks one row: measure again). A start on a busy machine keeps ``known``."""
        quiet, noisy, starts = known["quiet"], known["noisy"], known.get("starts", 1)
        if 1 not in quiet and 1 not in noisy:
            return None
        cheap = [n for n in sorted({*quiet, *noisy}) if n > 1 and quiet.get(n, noisy.get(n)) < RETIME_MOST]
        turn = [cheap[(starts * RETIMED + i) % len(cheap)] for i in range(min(RETIMED, len(cheap)))]
        lacking = [n for n in range(2, every + 1) if n not in quiet and n not in noisy]
        fresh: dict[int, list[float]] = {}
        busy: dict[int, list[float]] = {}
        for n in sorted({1, *turn, *lacking}):
            for _ in range(2):
                seconds, calm = _timed(time_rows, n, preemptions)
                (fresh if calm else busy).setdefault(n, []).append(seconds)
        # Only sizes timed undisturbed can say this is another machine (or a throttled one): a
        # busy one times nothing better than the least times kept, each size keeping its least
        # (another process only ever adds time). Those least times fall over the starts, so a
        # size timed again is typically slower than what is kept: the check is against that
        # typical ratio (``drift``, a mean over the last starts), or a noisy machine would one
        # day throw away a good entry.
        ratios = [min(fresh[n]) / quiet[n] for n in fresh if n in quiet]
        drift = known.get("drift", 0.0)
        if ratios:
            slower = sum(map(math.log, ratios)) / len(ratios)
            if abs(slower - drift) > math.log(RECHECK_SPEED):
                return None
            drift += (slower - drift) / min(starts + 1, DRIFT_STARTS)
        self.drift = drift
        merged = {n: [t, *fresh.get(n, ())] for n, t in quiet.items()}
        merged.update((n, times) for n, times in fresh.items() if n not in quiet)
        disturbed = {n: [t] for n, t in noisy.items() if n not in merged}
        for n, times in busy.items():
            if n not in merged:
                disturbed.setdefault(n, []).extend(times)
        self.starts = starts + 1
        return {**dict.fromkeys(disturbed, []), **merged}, disturbed

    def unpadded(self, rows: int) -> float:
        """Unscaled seconds of one ubatch of ``rows`` rows as it is, unpadded: as measured
        undisturbed where it was, else from the curve."""
        seconds = self.quiet.get(rows)
        return seconds if seconds is not None else float(np.interp(rows, self.sizes, self.curve))

    def _extend(self, most: int) -> None:
        """Knots at doubling sizes up to ``most``, on a line through the last size measured
        whose slope is fitted to the upper half of the measured sizes (one size's error, bent
        over eight times its rows, would mislead the larger verifications most)."""
        sizes, curve = self.sizes, self.curve
        upper = sizes >= sizes[-1] / 2
        slope = float(np.polyfit(sizes[upper], curve[upper], 1)[0])
        last = edge = sizes[-1]
        extra = []
        while edge < most:
            edge = min(2 * edge, most)
            extra.append(edge)
        extra = np.array(extra, np.float64)
        self.sizes = np.concatenate([sizes, extra])
        # A row costs at least a quarter of the average row so far (a disturbed, flat top
        # would make every verification look free; on a GPU the slope is nearer 0.4 of it).
        slope = max(slope, MIN_SLOPE * curve[-1] / last)
        self.curve = np.concatenate([curve, curve[-1] + slope * (extra - last)])

    def predict(self, rows: int) -> float:
        sizes, curve = self.sizes, self.curve
        if rows <= sizes[-1]:
            return self.scale * float(np.interp(rows, sizes, curve))
        slope = (curve[-1] - curve[-2]) / (sizes[-1] - sizes[-2]) if len(sizes) > 1 else curve[-1]
        return self.scale * float(curve[-1] + slope * (rows - sizes[-1]))

    def rescale(self, seconds: float, predicted: float) -> float:
        """A step predicted to take ``predicted`` seconds took ``seconds``: the scale moves.
        Returns what this step's error says about its own shape: the (log) error less the
        recent average error of all steps. A change common to all sizes (the machine, the
        context length) is the scale's and teaches no shape, however it arrives: only a
        lasting difference between sizes does."""
        error = min(LEARN_CLIP, max(-LEARN_CLIP, math.log(seconds / predicted)))
        self.scale *= math.exp(SCALE_RATE * error)
        self.mean_error += SCALE_RATE * (error - self.mean_error)
        return error - self.mean_error

    def observe(self, rows: int, seconds: float) -> None:
        """A decode of one ubatch of ``rows`` output rows took ``seconds``: the scale moves,
        and the curve's two knots around ``rows`` by what is this size's own."""
        own = self.shape_rate * self.rescale(seconds, self.predict(rows))
        sizes, curve = self.sizes, self.curve
        j = bisect.bisect_left(sizes, rows)
        if j >= len(sizes) or sizes[j] == rows or j == 0:  # at a knot, or beyond the last
            curve[min(j, len(sizes) - 1)] *= math.exp(own)
        else:
            w = (rows - sizes[j - 1]) / (sizes[j] - sizes[j - 1])
            curve[j - 1] *= math.exp((1.0 - w) * own)
            curve[j] *= math.exp(w * own)

    def describe(self) -> str:
        shown = [(int(n), c) for n, c in zip(self.sizes, self.curve) if n in (1, 4, 16, 64) or n == self.sizes[-1]]
        text = ", ".join(f"{n} {'row' if n == 1 else 'rows'} {c * 1e3:.1f} ms" for n, c in shown)
        busy = f"; {self.disturbed} of {self.measured} sizes measured only while another process ran" if self.disturbed else ""
        dear = sorted(n for n in self.quiet if n not in self.knots)
        padded = f"; dearer than a larger size: {', '.join(map(str, dear))} rows" if dear else ""
        return f"{text} ({self.measured} sizes measured{busy}{padded})"


def _sane(sizes: np.ndarray, curve: np.ndarray) -> np.ndarray:
    """A measured curve with its disturbed points pulled down to what the others allow: a
    decode of a + b rows costs about one of a rows plus one of b rows at most (it could be run
    as those two; measured here, 32 rows cost up to 5% more than twice 16), and a size dearer
    than a larger one costs what that one does."""
    curve = curve.copy()
    for j in range(1, len(sizes)):
        for a in sizes[: j]:
            if a > sizes[j] / 2:
                break
            both = np.interp(a, sizes, curve) + np.interp(sizes[j] - a, sizes, curve)
            curve[j] = min(curve[j], SUBADDITIVE_SLACK * both)
    return np.minimum.accumulate(curve[::-1])[::-1]


def _timed(time_rows, n: int, preemptions) -> tuple[float, bool]:
    """Seconds of a decode of ``n`` rows, and whether no other process disturbed it (this
    one was preempted no more than a quiet machine preempts it)."""
    before = preemptions()
    seconds = time_rows(n)
    return seconds, preemptions() - before <= QUIET_SWITCHES + QUIET_SWITCH_RATE * seconds


def _preemptions() -> int:
    """Involuntary context switches of this process so far (0 where the OS does not say)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw if resource is not None else 0


class Speculator:
    """Proposes each step's drafts and keeps the counts."""

    def __init__(self, draft_max: int, eog: np.ndarray, model_costs: StepCosts | None = None, costs: StepCosts | None = None):
        self.draft_max = draft_max
        self.eog = eog  # end-of-generation tokens: a draft stops before one (a sampled end ends)
        self.costs = costs or StepCosts()  # measured by the engine (StepCosts.calibrate)
        self.model_costs = model_costs  # a draft model's decode by rows; None: no draft model
        self.drafted = 0  # draft tokens fed
        self.drafted_by_model = 0  # ...of which the draft model wrote (the rest: n-grams)
        self.tried = 0  # ...of which were verified
        self.accepted = 0  # ...of which were kept
        # By n-gram size: accepted and verified draft tokens, fading (a longer match is a
        # better guess, and how much better depends on the model and the workload).
        self.by_size = {n: [0.0, 0.0] for n in (*NGRAM_SIZES, MODEL)}
        # What steps where some sequences draft and others do not cost over the sum of their
        # two ubatches (the one-token rows of all, then the drafts' other rows), learned.
        self.split = 1.0

    def before_end(self, draft: list[int]) -> list[int]:
        """``draft`` up to its first end-of-generation token: a sampled end ends an output,
        never a guessed one."""
        ends = np.flatnonzero(self.eog[draft]) if draft else ()
        return draft[: ends[0]] if len(ends) else draft

    def size_rate(self, n: int) -> float:
        """The engine's acceptance rate for drafts from n-gram matches of size ``n`` (before
        any were verified: a guess that grows with the match)."""
        accepted, tried = self.by_size[n]
        return (accepted + 2.0 * FIRST_RATE[n]) / (tried + 2.0)

    def propose(self, decoders: list, limits: list[int], room: int) -> dict:
        """Drafts for some of ``decoders`` (sequences each feeding one token this step, with
        the most tokens each may still take after it), within ``room`` extra tokens: a list
        of tokens, or for the draft model to write, how many (all drafts of a step have
        the same length, but for those cut before an end token)."""
        n = len(decoders)
        if room <= 0 or n == 0:
            return {}
        base = self.costs.predict(n)
        offers = []  # (sequence, draft or None for the draft model's, acceptance rate, length)
        for seq, most in zip(decoders, limits):
            state = seq.spec
            if state is None:
                state = seq.spec = SpecState(NgramIndex())
            most = min(most, self.draft_max, room, state.reach)
            if most < 1:
                continue
            draft, state.match = state.index.draft(seq.tokens, most)
            draft = self.before_end(draft)
            if draft:
                offers.append((seq, draft, state.rate(self.size_rate(state.match)), len(draft)))
            elif self.model_costs is not None:
                state.match = MODEL
                offers.append((seq, None, state.rate(self.size_rate(MODEL), model=True), most))
        if not offers:
            return {}
        best, choice = MIN_GAIN * n / base, None
        for k in range(1, max(o[3] for o in offers) + 1):
            able = [(_gain(a, k), i, d is None) for i, (_, d, a, most) in enumerate(offers) if most >= k]
            able.sort(reverse=True)
            gained, by_model = 0.0, 0
            for s, (gain, _, model) in enumerate(able, 1):
                if k * s > room:
                    break
                gained += gain
                by_model += model
                if not self.at_knot(n, k, s):
                    continue
                seconds = self.step_seconds(n, k, s)
                if by_model:  # k decodes of the draft model, a row per sequence it drafts for
                    seconds += k * self.model_costs.predict(by_model)
                if (n + gained) / seconds > best:
                    best, choice = (n + gained) / seconds, (k, [i for _, i, _ in able[:s]])
        if choice is None:
            return {}
        k, chosen = choice
        drafts = {offers[i][0]: offers[i][1][:k] if offers[i][1] else k for i in chosen}
        self.drafted += k * len(drafts)
        self.drafted_by_model += k * sum(offers[i][1] is None for i in chosen)
        return drafts

    def verified(self, seq, drafted: int, accepted: int) -> None:
        tried = min(accepted + 1, drafted)
        seq.spec.count(tried, accepted)
        # Refusals come in runs (a wrong match is wrong from its first token on), which the
        # rate, taking tokens as independent, does not see: after a draft refused at once the
        # next is a probe, and each step may have at most twice the rows of the tokens the
        # last one kept (8 rows, 16, 32, 64 while drafts are kept whole).
        seq.spec.reach = max(PROBE, 2 * accepted + 1)
        self.tried += tried
        self.accepted += accepted
        counts = self.by_size[seq.spec.match]
        counts[0] = MEMORY * counts[0] + accepted
        counts[1] = MEMORY * counts[1] + tried

    def at_knot(self, n: int, k: int, s: int) -> bool:
        """Whether the drafts' ubatch in a step of ``n`` sequences, ``s`` of which feed ``k``
        draft tokens, has a size the cost curve has a point for. Only such steps are chosen:
        between two points the curve interpolates, and what a size costs is not linear in it
        (llama.cpp's CPU kernels take rows in groups: measured here, 17 rows cost 40% more
        than 16, 49 rows 9% more than 48), so a size between two points may cost far more
        than the line between them says."""
        return _draft_rows(n, k, s) in self.costs.knots

    def step_seconds(self, n: int, k: int, s: int) -> float:
        """Predicted seconds of a decode of ``n`` sequences of which ``s`` feed ``k`` draft tokens."""
        rows = _draft_rows(n, k, s)
        if s == 0 or s == n:
            return self.costs.predict(rows)
        return self.split * (self.costs.predict(n) + self.costs.predict(rows))

    def observe(self, n: int, k: int, s: int, seconds: float) -> None:
        """A decode of ``n`` sequences, ``s`` of which fed ``k`` draft tokens, took ``seconds``.
        Every such step teaches the scale (a curve that only steps of two ubatches ran would
        otherwise never learn that it predicts them all wrong); one of two ubatches teaches
        their factor what sets such steps apart from the rest, never below 1: two ubatches
        cost at least what each costs alone. Drafts of a size between the curve's points (a
        draft model's, cut before an end token) teach nothing: they would bend the points around
        them."""
        if s and not self.at_knot(n, k, s):
            return
        if s == 0 or s == n:
            self.costs.observe(_draft_rows(n, k, s), seconds)
            return
        own = self.costs.rescale(seconds, self.step_seconds(n, k, s))
        self.split = max(1.0, self.split * math.exp(self.costs.shape_rate * own))

    def stats(self) -> dict[str, float]:
        return {
            "spec_draft_tokens_total": self.drafted,
            "spec_model_draft_tokens_total": self.drafted_by_model,
            "spec_verified_tokens_total": self.tried,
            "spec_accepted_tokens_total": self.accepted,
            "spec_acceptance_rate": self.accepted / self.tried if self.tried else 0.0,
        }


def _draft_rows(n: int, k: int, s: int) -> int:
    """Rows of the ubatch that carries the drafts in a step of ``n`` sequences, ``s`` of which
    feed ``k`` draft tokens: all of the step's when every sequence drafts (or none does), else
    the second ubatch's (llama.cpp's KV streams put the one-token rows of all in the first)."""
    if s == 0:
        return n
    return n * (k + 1) if s == n else k * s


def _gain(rate: float, k: int) -> float:
    """Expected draft tokens kept of ``k``, each kept with probability ``rate`` once all
    before it were: rate + rate^2 + ... + rate^k."""
    return rate * (1.0 - rate**k) / (1.0 - rate) if rate < 1.0 else float(k)
