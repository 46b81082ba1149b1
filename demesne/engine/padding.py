"""Throwaway rows that make a decode step cheaper (``--kv-layout streams``).

The rows of a decode step cost more than their number says, for two reasons:

- llama.cpp's CPU matrix kernels take rows in groups: a ubatch of an odd number of rows (3
  and up) costs more than one of a row more. Measured on a 2-core CPU, Gemma 3 270M, ms by
  rows (``demesne`` start-up measures this on the machine it serves on)::

      rows  1    2    3    4    5    6    7    8   ...  13    14    15    16
      ms   22   40   70   52   83   68   99   87   ... 140   127   162   145

- with one KV stream per sequence, llama.cpp puts into one ubatch only sequences whose ids
  follow each other (``split_equal``, sequential): decode rows of ids 0, 3 and 4 are two
  ubatches, each a pass over the weights, and a slot freed and taken again leaves such gaps.

A sequence id whose slot is idle can take a *throwaway row*: one token after the end of its
stream, with an output row, its cell removed right after the step and its logits never read.
The output row is what counts: the grouping shows in the output layer (262,144 x 640 on that
model, most of a row's cost), so 16 tokens with 15 output rows cost what 15 tokens do (167 and
171 ms), and 16 with 16 output rows 148 ms. :func:`plan` picks the idle ids to pad so that the step's ubatches, its runs of
consecutive ids, cost least by the measured step costs: three sequences decoding become a
ubatch of four rows, and a gap is closed where one larger ubatch costs less than two. On a GPU
the costs are flat and nothing is padded. What an idle stream holds is untouched: the row goes
after its last cell, and that cell alone is removed.
"""

from __future__ import annotations

from collections.abc import Callable

ROW, IDLE, NONE = "r", "p", "-"  # an id's part in a decode step: a row, may take a throwaway row, neither
PAD_OVERHEAD = 0.01  # what a throwaway row costs beyond its measured share, over one row's step (a KV removal, a ctypes call)
EVERY_MOST = 16  # decode steps of up to this many sequences are measured at each size (beyond: the curve's sizes)
PLANS_KEPT = 512  # plans remembered, by the step's layout of ids (few layouts recur)


def plan(kinds: str, cost: Callable[[int], float], pad_cost: float) -> tuple[tuple[int, ...], int]:
    """The ids to pad, and the ubatches the step then has, for a decode step whose ids are
    ``kinds`` (:data:`ROW`, :data:`IDLE` or :data:`NONE` for each id, in order): the choice whose
    runs of consecutive ids cost least, ``cost(n)`` for a run of n rows, plus ``pad_cost`` for
    each throwaway row. Exact (dynamic programming over where runs start and end), O(ids^2)."""
    n_ids = len(kinds)
    inf = float("inf")
    # best[i]: the least cost of deciding ids < i, where id i - 1 ends no run that goes on
    # (id i may start one); how: (previous i, run end or -1 for id i - 1 skipped).
    best = [inf] * (n_ids + 1)
    how: list[tuple[int, int]] = [(0, -1)] * (n_ids + 1)
    best[0] = 0.0
    for i in range(n_ids):
        if best[i] == inf:
            continue
        if kinds[i] != ROW and best[i] < best[i + 1]:  # id i in no run
            best[i + 1], how[i + 1] = best[i], (i, -1)
        pads = 0
        for end in range(i + 1, n_ids + 1):  # a run of ids i .. end - 1
            kind = kinds[end - 1]
            if kind == NONE:
                break
            pads += kind == IDLE
            if end < n_ids and kinds[end] == ROW:
                continue  # a row right after the run would extend it
            after = min(end + 1, n_ids)  # id end (if any) is in no run
            total = best[i] + cost(end - i) + pad_cost * pads
            if total < best[after]:
                best[after], how[after] = total, (i, end)
    pads_chosen: list[int] = []
    runs = 0
    j = n_ids
    while j > 0:
        i, end = how[j]
        if end >= 0:
            runs += 1
            pads_chosen += [k for k in range(i, end) if kinds[k] == IDLE]
        j = i
    return tuple(sorted(pads_chosen)), runs


class Padding:
    """Throwaway rows for decode steps, from the engine's measured step costs."""

    def __init__(self, cost: Callable[[int], float], n_ctx_seq: int, pos_max: Callable[[int], int]):
        self.cost = cost  # seconds of a ubatch of n rows, as it is
        self.n_ctx_seq = n_ctx_seq  # the cells of one stream
        self.pos_max = pos_max  # the last position a sequence id holds in KV, -1 for none
        self._plans: dict[str, tuple[tuple[int, ...], int]] = {}
        self.rows = 0  # throwaway rows fed

    def pads(self, rows: list[int], idle: list[int], n_ids: int) -> tuple[dict[int, int], int]:
        """For a decode step with one row for each of the ids ``rows``, where the ids ``idle``
        may take a throwaway row: {id: position} of the throwaway rows to add, and the
        ubatches the step then has."""
        kinds = [NONE] * n_ids
        for i in idle:
            kinds[i] = IDLE
        for i in rows:
            kinds[i] = ROW
        while True:
            key = "".join(kinds)
            chosen = self._plans.get(key)
            if chosen is None:
                if len(self._plans) >= PLANS_KEPT:
                    self._plans.clear()
                chosen = self._plans[key] = plan(key, self.cost, PAD_OVERHEAD * self.cost(1))
            pads, runs = chosen
            where = {i: self.pos_max(i) + 1 for i in pads}
            full = [i for i, pos in where.items() if pos >= self.n_ctx_seq]
            if not full:  # a stream with no cell left takes no row (rare: plan again without it)
                self.rows += len(where)
                return where, runs
            for i in full:
                kinds[i] = NONE
