"""Batch-invariant decoding (``--deterministic``): every ``llama_decode`` has a shape under
which a row's logits depend on nothing but its own sequence.

llama.cpp's kernels compute each row of a step on its own, but *which* kernel runs depends on
the shape of the micro-batch (shared/LLAMA_FACTS.md; measured on the CPU backend of the
vendored source, llama-cpp-python 0.3.36):

- the quantized matrix kernels work on groups of rows (the repacked Q4_K kernel four at a
  time, llamafile's tiles by four, wider paths by eight) and treat the rest apart, rounding
  differently: a row gives other numbers in a 5-row call than in an 8-row one, and a 4-row
  call differs now and then from an 8-row one (found by randomised trials: with multiples of
  4, 1 of 60 crowds changed a row; with multiples of 8, none of 400). **Every ubatch has a
  multiple of 8** (the first of :data:`QUANTA` the start-up check finds kept) **rows, and so
  do its output rows** (the last layer and
  the output matrix run on the output rows only).
- flash attention sums one query row over its sequence's cells one cell at a time, in cell
  order, unless a sequence brings 64 or more rows to a ubatch (then it works in 64 x 64
  tiles, summing by tile) or a ubatch is one row alone over 512 or more cells (then the
  cells are split across threads). **A sequence brings at most 56 (below 64, a multiple of the quantum) tokens to
  a ubatch**, and a ubatch is never one row alone (it has eight).
- with separate KV streams (``--kv-layout streams``) llama.cpp puts into one ubatch only
  sequences of consecutive ids that feed the same number of tokens, so the engine's batch is
  run here as one ``llama_decode`` per such group.

A step's batch is therefore cut into *pieces* (at most 56 tokens of a sequence)
and run in rounds: round ``r`` decodes the ``r``-th piece of every sequence, one call per
group of equally long pieces. A call's rows are made a multiple of eight by *pad tokens*:
a token in each id between the group's (an idle or waiting stream, at its next position),
more neighbouring ids, or more tokens after each sequence's own, whichever pads least; pads
(else quiet prompt rows) get thrown-away output rows until the outputs are a multiple of
eight too. Pads' cells are removed right after the call, so no stream changes.
Then the logits of every row, and the KV of every token, are the same bits whoever else is
in the step and however a prompt was chunked: a request's output depends on its own inputs.

This holds for the kernels above; other backends (CUDA, Metal, ROCm, Vulkan) pick kernels by
shape in their own ways. :meth:`InvariantDecoder.check` proves it on the running build at
start, and the engine refuses ``--deterministic`` where it fails rather than promise what
the kernels do not keep.

The cells of one sequence must also lie in position order (attention sums them in cell
order): true of a stream of its own (a cut or a rollback frees the stream's tail and
llama.cpp fills from the lowest free cell), not of the unified cell pool, where a sequence's
next cell goes wherever another sequence freed one. Hence streams only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

log = logging.getLogger("demesne.engine")

QUANTA = (8, 16, 32)  # rows of every ubatch: a multiple of the first the start-up check finds kept
FA_TILE = 64  # rows of one sequence at which CPU flash attention works in tiles
PAD_TOKEN = 0
CHECK_CROWDS = 16  # random crowds the start-up check tries...
CHECK_SECONDS = 2.0  # ...or fewer (at least 2) once this much time has gone


class KV(Protocol):
    """What the decoder needs of the runner (runner.ModelRunner)."""

    def decode_batch(self, batch) -> np.ndarray: ...  # logits of the output rows; raises DecodeError
    def pos_max(self, seq_id: int) -> int: ...  # -1 for an empty stream
    def remove(self, seq_id: int, p0: int = -1, p1: int = -1) -> None: ...


class NotInvariant(RuntimeError):
    """This build's kernels give a row other numbers in other shapes: no --deterministic."""


@dataclass(slots=True)
class Piece:
    seq: int
    tokens: np.ndarray
    pos0: int
    outputs: np.ndarray  # per token: its index among the batch's outputs, or -1


class InvariantDecoder:
    """Runs a filled :class:`runner.Batch` as invariant-shaped ``llama_decode`` calls."""

    def __init__(self, kv: KV, batch, n_vocab: int, n_streams: int, n_ctx_seq: int, n_ubatch: int):
        """``batch``: a runner.Batch of its own, of ``n_ubatch`` tokens; ``n_ubatch`` holds a
        row quantum for every stream (the engine's config checks it)."""
        self.kv, self._batch, self.n_vocab = kv, batch, n_vocab
        self.n_streams, self.n_ctx_seq = n_streams, n_ctx_seq
        self.n_ubatch = n_ubatch
        self._use(QUANTA[0])
        self.calls = 0  # llama_decode calls made
        self.pad_tokens = 0  # pad tokens decoded
        self._logits = np.empty((0, n_vocab), np.float32)

    def _use(self, quantum: int) -> None:
        self.quantum = quantum  # rows of every call, and output rows: a multiple of this
        self.piece_max = (FA_TILE - 1) // quantum * quantum  # tokens of one sequence a call

    # -- one step ----------------------------------------------------------------------

    def decode(self, token, pos, seq, output, n_outputs: int) -> np.ndarray:
        """Decode the step's tokens (numpy arrays: token, position, seq id and output flag per
        token, a sequence's tokens consecutive); its logits, ``(n_outputs, n_vocab)`` in the
        order of the flagged tokens, valid until the next call."""
        if self._logits.shape[0] < n_outputs:
            self._logits = np.empty((max(n_outputs, 2 * self._logits.shape[0]), self.n_vocab), np.float32)
        out_index = np.where(output, np.cumsum(output) - 1, -1)
        rounds: list[dict[int, list[Piece]]] = []
        seen: set[int] = set()
        for start, end in _runs(seq):
            s = int(seq[start])
            if s in seen:
                raise ValueError(f"sequence {s}'s tokens are not consecutive in the batch")
            seen.add(s)
            for r, p0 in enumerate(range(start, end, self.piece_max)):
                p1 = min(p0 + self.piece_max, end)
                if r == len(rounds):
                    rounds.append({})
                piece = Piece(s, token[p0:p1], int(pos[p0]), out_index[p0:p1])
                rounds[r].setdefault(p1 - p0, []).append(piece)
        done: list[Piece] = []
        try:
            for groups in rounds:
                for t in sorted(groups):
                    for call in self._calls(sorted(groups[t], key=lambda p: p.seq), t):
                        self._run(*call)
                        done += call[3].values()
        except BaseException:
            for piece in done:  # as a failed llama_decode: the KV as before the step
                self.kv.remove(piece.seq, piece.pos0, -1)
            raise
        return self._logits[:n_outputs]

    def stats(self) -> dict[str, float]:
        return {"deterministic_calls_total": self.calls, "deterministic_pad_tokens_total": self.pad_tokens}

    def _calls(self, pieces: list[Piece], t: int):
        """The calls that decode these equally long pieces: (first id, last id, tokens each,
        the pieces by id); at most ``n_ubatch`` tokens each, so llama.cpp splits none."""
        if t == 1:  # decode rows: one call over the whole id range, gaps padded (1 token each)
            runs = [pieces]
        else:  # prompt pieces: one call per run of consecutive ids (a gap costs t pad tokens)
            runs, run = [], [pieces[0]]
            for piece in pieces[1:]:
                # room in the ubatch for the run padded by tokens after each sequence's
                if piece.seq == run[-1].seq + 1 and (len(run) + 1) * (t + self.quantum - 1) <= self.n_ubatch:
                    run.append(piece)
                else:
                    runs.append(run)
                    run = [piece]
            runs.append(run)
        for run in runs:
            lo, hi = run[0].seq, run[-1].seq
            yield (*self._pad(lo, hi, t), {p.seq: p for p in run})

    def _pad(self, lo: int, hi: int, t: int) -> tuple[int, int, int]:
        """Ids ``[lo', hi']`` and tokens each ``t'`` with ``(hi'-lo'+1) * t'`` a multiple of the
        row quantum, padding least: neighbouring ids (``t`` pad tokens each) or more tokens
        after each sequence's (``hi - lo + 1`` pad tokens a step)."""
        n = hi - lo + 1
        best = None
        if n * t % self.quantum == 0:
            return lo, hi, t
        # more tokens per sequence: every id in the range needs room for them
        t2 = t
        while (n * t2) % self.quantum:
            t2 += 1
        if t2 <= self.piece_max and n * t2 <= self.n_ubatch and all(self._room(s, t2) for s in range(lo, hi + 1)):
            best = (n * (t2 - t), lo, hi, t2)
        # neighbouring ids: above first, then below
        a, b = lo, hi
        while (b - a + 1) * t % self.quantum and (b - a + 2) * t <= self.n_ubatch:
            if b + 1 < self.n_streams and self._room(b + 1, t):
                b += 1
            elif a - 1 >= 0 and self._room(a - 1, t):
                a -= 1
            else:
                break
        if (b - a + 1) * t % self.quantum == 0 and (best is None or (b - a + 1 - n) * t < best[0]):
            best = ((b - a + 1 - n) * t, a, b, t)
        if best is None:
            raise RuntimeError(f"no room to pad sequences {lo}..{hi} ({t} tokens each) to an invariant shape")
        return best[1:]

    def _room(self, seq: int, n: int) -> bool:
        return self.kv.pos_max(seq) + 1 + n <= self.n_ctx_seq

    def _run(self, lo: int, hi: int, t: int, real: dict[int, Piece]) -> None:
        b = self._batch
        b.clear()
        out: dict[int, int] = {}  # row of this call -> the batch's output index (-1: thrown away)
        spare: list[int] = []  # rows without an output: pads first, then the sequences' own
        quiet: list[int] = []
        pads: list[tuple[int, int]] = []  # (seq, first pad position)
        for s in range(lo, hi + 1):
            piece = real.get(s)
            tokens = np.full(t, PAD_TOKEN, np.int32)
            if piece is None:
                k, p0 = 0, self.kv.pos_max(s) + 1
            else:
                k, p0 = len(piece.tokens), piece.pos0
                tokens[:k] = piece.tokens
                for i in np.flatnonzero(piece.outputs >= 0):
                    out[b.n_tokens + int(i)] = int(piece.outputs[i])
                quiet += [b.n_tokens + i for i in range(k) if piece.outputs[i] < 0]
            spare += range(b.n_tokens + k, b.n_tokens + t)
            if k < t:
                pads.append((s, p0 + k))
            b.add_span(tokens, p0, s, output_last=False)
        # The rows that reach the last layer and the output matrix are a multiple of the
        # quantum too (their kernels pick by count as well): pads, else quiet rows, get an
        # output row that is thrown away.
        if out:
            for row in (spare + quiet)[: -len(out) % self.quantum]:
                out[row] = -1
        b.logits[list(out)] = 1
        b.n_outputs = len(out)
        try:
            got = self.kv.decode_batch(b)
            self.calls += 1
            self.pad_tokens += len(spare)
            for j, row in enumerate(sorted(out)):  # output rows come back in batch order
                if out[row] >= 0:
                    self._logits[out[row]] = got[j]
        finally:
            for s, p in pads:
                self.kv.remove(s, p, -1)

    # -- proof at start ----------------------------------------------------------------

    def check(self, crowds: int = CHECK_CROWDS) -> None:
        """Prove the invariance on this build before serving, and find its row quantum: for
        each of :data:`QUANTA` (while a call of that many rows per stream fits a ubatch), one
        sequence's logits (its prompt's last row, then three decode rows) alone and then in
        the same calls as up to seven other sequences fed in lock-step, its prompt cut
        differently (a fixed probe: it finds a quantum that does not keep the bits whatever
        time the crowds get), then ``crowds`` random crowds (a prompt alone, then beside
        random others, some as long, some not) within :data:`CHECK_SECONDS`, must be the
        same bits; the first quantum that keeps them is used. None: :class:`NotInvariant`."""
        worst = None
        for quantum in QUANTA:
            if quantum * self.n_streams > self.n_ubatch:
                break
            self._use(quantum)
            t0 = time.monotonic()
            worst, done = self._trial(crowds)
            if worst == 0.0:
                log.info(
                    "deterministic: batch-invariant shapes hold on this build (multiples of %d rows, at"
                    " most %d tokens of a sequence a call; checked on %d crowds in %.1f s)",
                    quantum, self.piece_max, done, time.monotonic() - t0,
                )
                return
            log.info("deterministic: multiples of %d rows do not keep the bits here (max difference %.3g)", quantum, worst)
        raise NotInvariant(
            "--deterministic: this build's kernels give a row other logits in other batch shapes"
            f" (max difference {worst:.3g} in the start-up check); serve without --deterministic"
            if worst is not None else
            f"--deterministic: --ubatch-size {self.n_ubatch} cannot hold {QUANTA[0]} rows for each of"
            f" {self.n_streams} sequences"
        )

    def _trial(self, crowds: int) -> tuple[float, int]:
        """The largest logit difference the probe and the crowds found, and the crowds tried."""
        rng = np.random.default_rng(20261206)
        prompt, nexts = self._tokens(rng, 37), self._tokens(rng, 3)
        ids = list(range(min(self.n_streams, 8)))
        others = {s: self._tokens(rng, len(prompt) + len(nexts)) for s in ids[1:]}
        try:
            alone = self._probe(0, prompt, nexts, {}, cut=len(prompt))
            crowded = self._probe(0, prompt, nexts, others, cut=13)
            worst = float(np.abs(alone - crowded).max())
            done, deadline = 0, time.monotonic() + CHECK_SECONDS
            while done < crowds and (done < 2 or time.monotonic() < deadline):
                worst = max(worst, self._crowd(rng, ids))
                done += 1
        finally:
            for s in ids:
                self.kv.remove(s)
        return worst, done

    def _tokens(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.integers(1000, min(self.n_vocab, 50000), n).astype(np.int32)

    def _step(self, spans: list[tuple[int, np.ndarray, int, bool]]) -> np.ndarray:
        """Decode spans ``(seq, tokens, first position, output for the last token)``; the
        outputs' logits in sequence-id order."""
        token = np.concatenate([t for _, t, _, _ in spans])
        seq = np.concatenate([np.full(len(t), q, np.int32) for q, t, _, _ in spans])
        position = np.concatenate([np.arange(p, p + len(t), dtype=np.int32) for _, t, p, _ in spans])
        output = np.concatenate([np.eye(1, len(t), len(t) - 1, dtype=bool)[0] & o for _, t, _, o in spans])
        order = np.argsort(seq, kind="stable")
        return self.decode(token[order], position[order], seq[order], output[order], int(output.sum())).copy()

    def _crowd(self, rng: np.random.Generator, ids: list[int]) -> float:
        target = ids[len(ids) // 2]
        t = int(rng.integers(1, 14))
        prompt = self._tokens(rng, t)
        alone = self._step([(target, prompt, 0, True)])[0]
        self.kv.remove(target)
        spans = [(target, prompt, 0, True)]
        for s in ids:
            if s != target and rng.random() < 0.6:
                spans.append((s, self._tokens(rng, t if rng.random() < 0.5 else int(rng.integers(1, 14))), 0, True))
        crowded = self._step(spans)[sorted(s for s, *_ in spans).index(target)]
        for s, *_ in spans:
            self.kv.remove(s)
        return float(np.abs(alone - crowded).max())

    def _probe(self, s: int, prompt: np.ndarray, nexts: np.ndarray, others: dict[int, np.ndarray], cut: int) -> np.ndarray:
        """Sequence ``s``'s logits (its prompt's last row, then one row per token of
        ``nexts``), its prompt fed in two pieces cut at ``cut``; each of ``others`` (at least
        as long as prompt and nexts together) fed in lock-step beside it, as many tokens as
        ``s`` in every step, so that they share its calls (equally long pieces of consecutive
        streams go into one ubatch)."""
        got = []
        fed = 0
        for piece in (prompt[:cut], prompt[cut:], *np.split(nexts, len(nexts))):
            if not len(piece):
                continue
            spans = [(s, piece, fed, True)] + [(o, t[fed:fed + len(piece)], fed, True) for o, t in others.items()]
            logits = self._step(spans)
            fed += len(piece)
            if fed >= len(prompt):
                got.append(logits[sorted(q for q, *_ in spans).index(s)])
        for q in (s, *others):
            self.kv.remove(q)
        return np.stack(got)


def _runs(seq: np.ndarray):
    """(start, end) of each run of equal sequence ids."""
    if not len(seq):
        return
    cuts = np.flatnonzero(seq[1:] != seq[:-1]) + 1
    bounds = np.concatenate([[0], cuts, [len(seq)]])
    for a, b in zip(bounds[:-1], bounds[1:]):
        yield int(a), int(b)

