"""Engine.step(): schedule -> run the model -> sample -> emit deltas. No sockets here.

The process wrapper (proc.py) hands requests in with :meth:`Engine.submit` and
:meth:`Engine.abort` between steps and sends out what :meth:`Engine.step` returns.

A step contains its faults: an exception (or a llama.cpp error) fails the requests of that
step with a 500 naming the cause, and the engine goes on. Requests are keyed by
(gateway, request id), so two gateways may use the same ids.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from ..config import EngineConfig
from ..protocol import FINISH_LENGTH, FINISH_STOP, Delta, Error, Generate, ModelInfo, check_params
from .budget import StepBudget
from .faults import Faults
from .request import Sequence
from .runner import DecodeError, ModelRunner
from .constraints import Constraint, Constraints, GrammarError
from .sampler import Sampler, apply_penalties
from .kv_store import KVStore
from .scheduler import Scheduler, StepPlan
from .slots import SlotScheduler
from .draft import DraftModel
from . import costs_file
from .padding import EVERY_MOST, Padding
from .speculate import Speculator, StepCosts
from .tiers import Tiers

log = logging.getLogger("demesne.engine")


@dataclass(slots=True)
class Counters:
    """Monotonic totals, reported to gateways for /metrics."""

    prompt_tokens: int = 0  # prompt tokens of admitted requests
    cached_tokens: int = 0  # of those, served from the prefix trie
    prefill_tokens: int = 0  # tokens decoded as prompt (recomputation after preemption too)
    generation_tokens: int = 0
    decode_seconds: float = 0.0
    sample_seconds: float = 0.0
    steps: int = 0
    requests_finished: int = 0
    requests_refused: int = 0
    requests_failed: int = 0  # failed by a fault in their step
    step_faults: int = 0
    longest_step_seconds: float = 0.0


def token_logprobs(row: np.ndarray, token: int, top: int) -> list:
    """``[logprob of token, [[id, logprob], ...the top ones]]`` from one row of raw logits.

    Costs a pass of exp over the vocabulary (and a partition when ``top`` > 0), so only rows
    that ask for it pay.
    """
    peak = float(row.max())
    lse = peak + float(np.log(np.exp(row - peak, dtype=np.float32).sum(dtype=np.float64)))
    best: list = []
    if top > 0:
        ids = np.argpartition(row, -top)[-top:]
        ids = ids[np.argsort(-row[ids], kind="stable")]
        best = [[int(i), _finite(float(row[i]) - lse)] for i in ids]
    return [_finite(float(row[token]) - lse), best]


def _finite(logprob: float) -> float:
    """A token the grammar or logit_bias ruled out has logprob -inf, which JSON cannot
    carry: -9999.0, as OpenAI writes it."""
    return max(logprob, -9999.0)


class Engine:
    def __init__(self, config: EngineConfig, runner: ModelRunner):
        self.config = config
        self.runner = runner
        self.n_ctx = runner.n_ctx_seq if config.streams else runner.n_ctx  # the most one request holds
        if config.deterministic:  # room for the pad tokens after a stream's last token (invariant.py)
            self.n_ctx -= runner.invariant.quantum
        self.tiers = _tiers(config, runner)
        self.scheduler = _scheduler(config, runner, self.tiers)
        self.sampler = Sampler(runner.n_vocab, config.max_seqs)  # one row per sequence (drafts' rows: one by one)
        costs = self._step_costs(config, runner)
        self.speculator, self.draft_model = self._speculator(config, runner, costs)
        self.padding = Padding(costs.unpadded, runner.n_ctx_seq, runner.pos_max) if costs and _padded_steps(config) else None
        self.counters = Counters()
        self._eog_ids = np.flatnonzero(runner.eog)
        self.constraints = Constraints(runner.llg_tokenizer, runner.n_vocab, config.max_seqs, int(self._eog_ids[0]))
        self.by_rid: dict[tuple[bytes, str], Sequence] = {}
        self.compiling: dict[Sequence, Future] = {}  # waiting for their grammar (constraints.py)
        self.faults = Faults.from_env()
        self.step_budget = StepBudget(config.batch_size, config.step_target)
        self._failed_decodes = 0  # consecutive llama_decode failures (other than no KV slot)
        self._seed_rng = np.random.default_rng(config.seed)
        bos, eos = runner.bos_eos_text()
        self.model_info = ModelInfo(
            id=config.model_id,
            path=config.model,
            n_ctx=self.n_ctx,
            n_vocab=runner.n_vocab,
            chat_template=runner.chat_template(),
            bos_token=bos,
            eos_token=eos,
        )

    @staticmethod
    def _step_costs(config: EngineConfig, runner: ModelRunner) -> StepCosts | None:
        """What a decode of n rows costs, for speculative decoding and padded steps: measured
        now, or at earlier starts of the same set-up with a few sizes timed again
        (costs_file.py); None if neither is on or the measurement fails (the engine serves
        without them rather than not at all)."""
        drafts, pads = config.speculative != "off", _padded_steps(config)
        if not (drafts or pads):
            return None
        costs = StepCosts()
        most = min(config.batch_size, 2 * config.max_seqs * (config.draft_max + 1)) if drafts else config.max_seqs
        every = min(config.max_seqs, EVERY_MOST) if pads else 0
        path = config.step_costs_file
        key = costs_file.costs_key(config, runner) if path else ""
        try:
            measured = costs.calibrate(runner.time_rows, most, every=every, known=costs_file.load(path, key) if path else None)
        except DecodeError as exc:
            log.warning("measuring step costs failed (%s); serving without speculative decoding or padded steps", exc)
            return None
        if path:
            costs_file.save(path, key, costs.measurements())
        how = "measured" if measured else f"of {costs.starts} starts ({path})"
        log.info("step costs %s: %s", how, costs.describe())
        return costs

    @staticmethod
    def _speculator(config: EngineConfig, runner: ModelRunner, costs: StepCosts | None) -> tuple[Speculator | None, DraftModel | None]:
        """Speculative decoding on the measured step costs (none without them)."""
        if config.speculative == "off" or costs is None:
            return None, None
        draft_model = DraftModel(config, runner) if config.draft_model else None
        return Speculator(config.draft_max, runner.eog, draft_model and draft_model.costs, costs), draft_model

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or bool(self.compiling)

    # -- requests in -------------------------------------------------------------------

    def submit(self, client: bytes, req: Generate) -> Error | None:
        """Queue a request; an Error when it can never be served or the queue is full."""
        error = self._check(client, req)
        if error is None:
            seq = Sequence(
                rid=req.rid,
                client=client,
                prompt_len=len(req.prompt),
                max_tokens=req.max_tokens,
                params=req.params,
                tokens=list(req.prompt),
                rng=self._rng_for(req),
            )
            if req.params.logit_bias:
                pairs = np.asarray(req.params.logit_bias, np.float64).reshape(-1, 2)
                seq.bias_ids, seq.bias_values = pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.float32)
            error = self._constrain(seq) if req.params.grammar else None
            if error is None and seq.constraint is None and req.params.grammar:
                return None  # its grammar is compiling; step() queues it when it is ready
            if error is None:
                error = self._queue(seq)
            if error is None:
                return None
        self.counters.requests_refused += 1
        return error

    def _constrain(self, seq: Sequence) -> Error | None:
        """Give ``seq`` its grammar's matcher, or start compiling the grammar (then the
        sequence waits in ``compiling``); an Error for a grammar that cannot be used."""
        params = seq.params
        try:
            made = self.constraints.compile(params.grammar, params.grammar_lazy)
        except GrammarError as exc:
            return _grammar_error(seq, exc)
        if isinstance(made, Constraint):
            seq.constraint = made
        else:
            self.compiling[seq] = made
            self.by_rid[seq.client, seq.rid] = seq
        return None

    def _queue(self, seq: Sequence) -> Error | None:
        if self.scheduler.add(seq):
            self.by_rid[seq.client, seq.rid] = seq
            return None
        return Error(seq.rid, 429, "the engine's queue is full; retry later", "engine_overloaded")

    def _compiled(self) -> list[tuple[bytes, Error]]:
        """Queue the sequences whose grammar has compiled; errors for those it failed."""
        errors = []
        for seq, future in [(s, f) for s, f in self.compiling.items() if f.done()]:
            del self.compiling[seq]
            del self.by_rid[seq.client, seq.rid]
            try:
                seq.constraint = future.result()
                error = self._queue(seq)
            except GrammarError as exc:
                error = _grammar_error(seq, exc)
            except Exception as exc:  # noqa: BLE001 - this request fails, nothing else
                log.exception("compiling request %s's grammar failed", seq.rid)
                error = Error(seq.rid, 500, f"internal error compiling the grammar: {type(exc).__name__}", "engine_error")
            if error is not None:
                self.counters.requests_refused += 1
                errors.append((seq.client, error))
        return errors

    def _check(self, client: bytes, req: Generate) -> Error | None:
        n_prompt = len(req.prompt)
        if (client, req.rid) in self.by_rid:
            return Error(req.rid, 400, f"request id {req.rid} is already in use", "duplicate_id")
        bad = check_params(req.params, self.runner.n_vocab)
        if bad is not None:
            return Error(req.rid, 400, bad[1], "invalid_value", bad[0])
        if n_prompt == 0:
            return Error(req.rid, 400, "the prompt is empty", "empty_prompt", "prompt")
        if req.max_tokens < 1:
            return Error(req.rid, 400, "max_tokens must be at least 1", "invalid_value", "max_tokens")
        if any(t < 0 or t >= self.runner.n_vocab for t in req.prompt):
            return Error(req.rid, 400, "the prompt holds token ids outside the vocabulary", "invalid_value", "prompt")
        if n_prompt + req.max_tokens > self.n_ctx:
            return Error(
                req.rid, 400,
                f"this model's context holds {self.n_ctx} tokens; the prompt has {n_prompt}"
                f" and max_tokens asks for {req.max_tokens} more",
                "context_length_exceeded", "max_tokens" if n_prompt < self.n_ctx else "messages",
            )
        return None

    def _rng_for(self, req: Generate) -> np.random.Generator | None:
        if req.params.greedy:
            return None
        seed = req.params.seed if req.params.seed is not None else self._seed_rng.integers(2**63)
        return np.random.default_rng(int(seed) % 2**64)  # any integer, negative ones too

    def abort(self, client: bytes, rid: str) -> None:
        seq = self.by_rid.get((client, rid))
        if seq is not None:
            self._release(seq)

    def abort_client(self, client: bytes | None = None) -> list[Sequence]:
        """Abort every request of one gateway (or of all); returns them."""
        gone = [s for s in self.by_rid.values() if client is None or s.client == client]
        for seq in gone:
            self._release(seq)
        return gone

    def _release(self, seq: Sequence) -> None:
        if self.compiling.pop(seq, None) is None:
            self.scheduler.finish(seq)
        seq.constraint = None
        del self.by_rid[seq.client, seq.rid]

    # -- the step ----------------------------------------------------------------------

    def step(self) -> list[tuple[bytes, Delta | Error]]:
        """Run one decode over everything scheduled; return (gateway, delta or error) pairs
        to send. Never raises: a fault fails the requests of this step and nothing else."""
        plan = None
        t0 = time.perf_counter()
        # Outside the try: these requests have left by_rid, so their errors must go out even
        # if the step fails (_compiled contains its own faults, request by request).
        refused = self._compiled() if self.compiling else []
        try:
            self.scheduler.token_budget = self.step_budget.tokens(self.scheduler)
            plan = self.scheduler.schedule()
            if not plan:  # only requests waiting on a disk read or a grammar: do not spin
                time.sleep(0.002)
                return refused
            return refused + self._run(plan)
        except Exception as exc:  # noqa: BLE001 - contained: this step's requests fail
            return refused + self._fail_step(plan, exc)
        finally:
            self.counters.longest_step_seconds = max(self.counters.longest_step_seconds, time.perf_counter() - t0)

    def _run(self, plan: StepPlan) -> list[tuple[bytes, Delta | Error]]:
        decode_only = not plan.node_chunks and all(n == 1 == s.n_remaining for s, n in plan.chunks)
        drafts = self._drafts(plan) if decode_only and self.speculator else {}
        pads, ubatches = self._pads(plan) if decode_only and not drafts and self.padding else ({}, 1)
        outputs, rows, drafted = self._fill_batch(plan, drafts, pads)
        self.faults.before_decode(self.counters.steps + self.counters.step_faults)
        t0 = time.perf_counter()
        # Masks of the constrained rows are computed on another thread while llama.cpp decodes
        # (one mask per sequence with one output row: drafting ones are never constrained).
        self.constraints.start_masks([(i, s.constraint) for i, s in enumerate(outputs) if s.constraint])
        try:
            logits = self.runner.decode()
        except DecodeError as exc:
            return self._on_decode_error(plan, exc)
        finally:
            self.constraints.wait()
            for seq_id, pos in pads.items():  # a throwaway row leaves its idle stream as it was
                self.runner.remove(seq_id, pos, -1)
        self._failed_decodes = 0
        self.scheduler.decoded()
        t1 = time.perf_counter()
        if not drafts:
            self.step_budget.observe(plan.n_tokens - sum(n == 1 for _, n in plan.chunks), t1 - t0)
        lengths = {len(d) for d in drafts.values()}
        if decode_only and self.speculator and len(lengths) <= 1 and ubatches == 1:  # as predicted (no draft cut short)
            self.speculator.observe(len(plan.chunks) + len(pads), max(lengths, default=0), len(drafts), t1 - t0)
        for seq, n in plan.chunks:
            seq.n_computed += n
        for node, n, _ in plan.node_chunks:
            self.scheduler.trie.computed(node, n)
        tokens = self._sample(logits, outputs, rows)
        picks = [(seq, [token], [row]) for seq, token, row in zip(outputs, tokens.tolist(), rows)]
        picks += [self._verify(logits, seq, row, drafts[seq]) for seq, row in drafted]
        t2 = time.perf_counter()
        self._count(t1 - t0, t2 - t1)
        return self._advance(picks, logits)

    def _drafts(self, plan: StepPlan) -> dict[Sequence, list[int]]:
        """Draft tokens for this step's decode rows (speculate.py), where they pay."""
        decoders = [s for s, _ in plan.chunks if s.constraint is None]
        limits = [min(s.max_tokens - s.n_generated, self.n_ctx - len(s.tokens)) - 1 for s in decoders]
        room = min(self.scheduler.token_budget - plan.n_tokens, self.scheduler.spare_cells(plan.n_tokens))
        drafts = self.speculator.propose(decoders, limits, room)
        wanted = [s for s, d in drafts.items() if isinstance(d, int)]
        if wanted:  # the draft model writes these now
            written = self.draft_model.draft(wanted, drafts[wanted[0]])
            for seq in wanted:
                drafts[seq] = self.speculator.before_end(written.get(seq, []))
        return {s: d for s, d in drafts.items() if d}

    def _pads(self, plan: StepPlan) -> tuple[dict[int, int], int]:
        """Throwaway rows for this decode step ({seq id: position}) and its ubatches then."""
        return self.padding.pads([s.seq_id for s, _ in plan.chunks], self.scheduler.idle_ids(), len(self.scheduler.slots))

    def _fill_batch(self, plan: StepPlan, drafts: dict[Sequence, list[int]], pads: dict[int, int]):
        """Write every chunk into the batch, and the throwaway rows among them in order of
        seq id (streams: the chunks come in that order). Returns the sequences that get one
        output row and their rows, and the sequences that feed a draft with the first of
        their rows."""
        batch = self.runner.batch
        batch.clear()
        for node, n, seq_ids in plan.node_chunks:
            start = node.n_cached
            batch.add_span(node.tokens[start : start + n], node.start + start, seq_ids, False)
            self.counters.prefill_tokens += n
        outputs, rows, drafted = [], [], []
        padding = sorted(pads.items(), reverse=True)
        for seq, n in plan.chunks:
            while padding and padding[-1][0] < seq.seq_id:
                _add_pad(batch, *padding.pop())
            start = seq.n_computed
            last = start + n == len(seq.tokens)
            draft = drafts.get(seq)
            if draft:
                drafted.append((seq, batch.n_outputs))
                batch.add_span(seq.tokens[start:] + draft, start, seq.seq_id, True, output_all=True)
            else:
                if last:
                    outputs.append(seq)
                    rows.append(batch.n_outputs)
                batch.add_span(seq.tokens[start : start + n], start, seq.seq_id, last)
            if not seq.counted:
                seq.counted = True
                self.counters.prompt_tokens += seq.prompt_len
                self.counters.cached_tokens += seq.n_cached
            if n > 1 or start < seq.prompt_len:  # not the one-token decode of a sampled token
                self.counters.prefill_tokens += n
        while padding:
            _add_pad(batch, *padding.pop())
        return outputs, rows, drafted

    def _shape(self, row: np.ndarray, seq: Sequence, tokens: list[int]) -> None:
        """logit_bias, ignore_eos and the penalties (over ``tokens``, the row's context), in
        place in llama.cpp's logits buffer."""
        if seq.bias_ids is not None:
            row[seq.bias_ids] += seq.bias_values
        if seq.params.ignore_eos:
            row[self._eog_ids] = -np.inf
        if seq.params.penalized:
            apply_penalties(row, tokens, seq.prompt_len, seq.params)

    def _sample(self, logits: np.ndarray, outputs: list[Sequence], rows: list[int]) -> np.ndarray:
        if not outputs:
            return np.empty(0, np.int64)
        for row, seq in zip(rows, outputs):
            self._shape(logits[row], seq, seq.tokens)
        self.sampler.prepare([s.params for s in outputs])
        tokens = self.sampler.sample(logits, [s.rng for s in outputs], rows if len(rows) < len(logits) else None)
        for i, (row, seq) in enumerate(zip(rows, outputs)):
            if seq.constraint is not None:
                token = self.constraints.pick(i, seq.constraint, int(tokens[i]), logits[row], lambda: self._resample(logits, row, seq))
                tokens[i] = -1 if token is None else token  # -1: the grammar failed
        return tokens

    def _resample(self, logits: np.ndarray, row: int, seq: Sequence) -> int:
        """Sample one row (again, for a grammar: its refused tokens at -inf, so logprobs show
        the constrained row)."""
        self.sampler.prepare([seq.params])
        return int(self.sampler.sample(logits[row : row + 1], [seq.rng])[0])

    def _verify(self, logits: np.ndarray, seq: Sequence, row0: int, draft: list[int]) -> tuple[Sequence, list[int], list[int]]:
        """Sample a drafting sequence's rows in order while the sampled token is the draft's
        next one (speculate.py): its tokens and their rows. The cells of the draft tokens
        after the first miss leave its KV."""
        picked: list[int] = []
        for i in range(len(draft) + 1):
            row = row0 + i
            self._shape(logits[row], seq, seq.tokens + draft[:i] if seq.params.penalized else seq.tokens)
            picked.append(self._resample(logits, row, seq))
            if i == len(draft) or picked[-1] != draft[i]:
                break
        accepted = len(picked) - 1
        seq.n_computed += accepted  # the token fed before the draft is counted with the chunk
        if accepted < len(draft):
            self.runner.remove(seq.seq_id, seq.n_computed, -1)
        self.speculator.verified(seq, len(draft), accepted)
        return seq, picked, list(range(row0, row0 + len(picked)))

    def _advance(self, picks: list[tuple[Sequence, list[int], list[int]]], logits: np.ndarray) -> list[tuple[bytes, Delta | Error]]:
        """Append each sequence's picked tokens (one, or a verified draft's) up to its end."""
        deltas: list[tuple[bytes, Delta | Error]] = []
        eog = self.runner.eog
        for seq, tokens, rows in picks:
            if tokens[0] < 0:
                message = f"the output's grammar failed: {seq.constraint.error()}"
                deltas += self._fail([seq], message, 400, "grammar_failed")
                continue
            for token, row in zip(tokens, rows):
                if eog[token]:
                    seq.finish = FINISH_STOP
                    break
                if seq.params.logprobs >= 0:
                    seq.logprobs.append(token_logprobs(logits[row], token, seq.params.logprobs))
                seq.append(token)
                self.counters.generation_tokens += 1
                if seq.n_generated >= seq.max_tokens or len(seq.tokens) >= self.n_ctx:
                    seq.finish = FINISH_LENGTH
                    break
            deltas.append((seq.client, self._delta(seq)))
            if seq.finish:
                self._release(seq)
                self.counters.requests_finished += 1
        return deltas

    def _delta(self, seq: Sequence) -> Delta:
        first = seq.n_sent == 0
        tokens, logprobs = seq.unsent()
        report = first or seq.finish is not None
        return Delta(
            rid=seq.rid,
            tokens=tokens,
            finish=seq.finish,
            prompt_tokens=seq.prompt_len if report else 0,
            cached_tokens=seq.n_cached if report else 0,
            logprobs=logprobs,
        )

    def _count(self, decode_s: float, sample_s: float) -> None:
        c = self.counters
        c.steps += 1
        c.decode_seconds += decode_s
        c.sample_seconds += sample_s

    def _on_decode_error(self, plan: StepPlan, exc: DecodeError) -> list[tuple[bytes, Delta | Error]]:
        """No KV slot (code 1, KV unchanged: the count of free cells was optimistic because of
        fragmentation): preempt the newest sequence. Any other failure (llama.cpp rolls the
        batch's cells back): retry once with half the batch, then fail the largest request."""
        if exc.code != 1:
            self._roll_back(plan)
        for seq, _ in plan.chunks:  # attached in this step to cells that were not written
            if seq.attached and seq.n_private == 0:
                self.scheduler.detach(seq)
        if exc.code == 1 and len(self.scheduler.running) > 1:
            log.warning("%s with %d tokens; preempting the newest sequence", exc, plan.n_tokens)
            self.scheduler.preempt(self.scheduler.running[-1])
            return []
        self._failed_decodes += 1
        if self._failed_decodes == 1 and plan.n_tokens > 1:
            log.warning("%s with %d tokens; retrying with half the batch", exc, plan.n_tokens)
            self.step_budget.shrink_once(plan.n_tokens // 2)
            return []
        self._failed_decodes = 0
        in_step = [s for s, _ in plan.chunks] + self._waiting_on(plan)
        largest = max(in_step or self.scheduler.running, key=lambda s: len(s.tokens) - s.n_computed)
        log.error("%s again; failing request %s (%d tokens)", exc, largest.rid, len(largest.tokens))
        return self._fail([largest], f"the model failed on this request ({exc})")

    def _roll_back(self, plan: StepPlan) -> None:
        """Drop whatever the failed batch wrote: llama.cpp removes only the failed ubatch's
        cells, and those of earlier ubatches would be written twice by the retry."""
        kv = self.runner
        for seq, _ in plan.chunks:
            kv.remove(seq.seq_id, seq.n_computed, -1)
        for node, _, seq_ids in plan.node_chunks:
            for seq_id in seq_ids:
                kv.remove(seq_id, node.start + node.n_cached, -1)

    def _fail_step(self, plan: StepPlan | None, exc: Exception) -> list[tuple[bytes, Error]]:
        """A fault in a step: fail its requests (all running ones if it failed before it had a
        plan), so the state they leave behind is dropped with them."""
        log.exception("a step failed; failing its requests")
        self.counters.step_faults += 1
        if plan is not None:
            victims = list(dict.fromkeys([s for s, _ in plan.chunks] + self._waiting_on(plan)))
        else:  # scheduling itself failed: what it was admitting may be the cause
            victims = list(self.scheduler.running) + list(self.scheduler.waiting)[:1]
        return self._fail(victims, f"internal error in the engine: {type(exc).__name__}: {exc}")

    def _waiting_on(self, plan: StepPlan) -> list[Sequence]:
        """Running sequences whose prompt path was being computed in ``plan``."""
        nodes = {node for node, _, _ in plan.node_chunks}
        return [s for s in self.scheduler.running if not s.attached and _on_path(s.node, nodes)]

    def _fail(self, seqs: list[Sequence], message: str, status: int = 500, code: str = "engine_error") -> list[tuple[bytes, Error]]:
        out = []
        for seq in seqs:
            if self.by_rid.get((seq.client, seq.rid)) is seq:
                self._release_safely(seq)
                self.counters.requests_failed += 1
                out.append((seq.client, Error(seq.rid, status, message, code)))
        return out

    def fail_all(self, message: str, status: int = 503, code: str = "engine_unavailable") -> list[tuple[bytes, Error]]:
        """Fail every request, running and waiting (shutting down)."""
        return self._fail(list(self.by_rid.values()), message, status, code)

    def _release_safely(self, seq: Sequence) -> None:
        try:
            self._release(seq)
        except Exception:  # noqa: BLE001 - the state was already broken; forget the request
            log.exception("releasing request %s failed", seq.rid)
            self.by_rid.pop((seq.client, seq.rid), None)
            if seq in self.scheduler.running:
                self.scheduler.running.remove(seq)

    # -- reporting ---------------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        c = self.counters
        return {
            "requests_running": len(self.scheduler.running),
            "requests_waiting": len(self.scheduler.waiting),
            "prompt_tokens_total": c.prompt_tokens,
            "prompt_tokens_cached_total": c.cached_tokens,
            "prefill_tokens_total": c.prefill_tokens,
            "generation_tokens_total": c.generation_tokens,
            "decode_seconds_total": c.decode_seconds,
            "sample_seconds_total": c.sample_seconds,
            "steps_total": c.steps,
            "requests_finished_total": c.requests_finished,
            "requests_refused_total": c.requests_refused,
            "requests_failed_total": c.requests_failed,
            "step_faults_total": c.step_faults,
            "longest_step_seconds": c.longest_step_seconds,
            "preemptions_total": self.scheduler.n_preemptions,
            "kv_cells_used": self.scheduler.cells_used(),
            "kv_cells_total": self.runner.n_ctx,
            **self.scheduler.cache_stats(),
            "grammars_compiled_total": self.constraints.compiled,
            "constraint_masks_total": self.constraints.masked_rows,
            "constraint_refusals_total": self.constraints.refused,
            "constraint_mask_seconds_total": self.constraints.mask_seconds,
            "constraint_mask_wait_seconds_total": self.constraints.mask_wait_seconds,
            **(self.tiers.stats() if self.tiers else {}),
            **(self.speculator.stats() if self.speculator else {}),
            **({"step_pad_rows_total": self.padding.rows} if self.padding else {}),
            **(self.runner.invariant.stats() if self.runner.invariant else {}),
        }

    def close(self) -> None:
        """Flush what the disk tier still has to write."""
        self.constraints.close()
        if self.draft_model:
            self.draft_model.close()
        if self.tiers:
            self.tiers.close(self.scheduler.spill)


def _scheduler(config: EngineConfig, runner: ModelRunner, tiers: Tiers | None) -> Scheduler | SlotScheduler:
    if config.streams:
        log.info(
            "KV: %d streams of %d cells (one per running request; --kv-layout unified shares one pool)",
            config.max_seqs, runner.n_ctx_seq,
        )
        return SlotScheduler(
            config.max_seqs, config.batch_size, config.max_waiting, runner, config.prefix_cache, tiers, runner.n_swa,
        )
    return Scheduler(
        runner.n_ctx,
        config.max_seqs,
        config.batch_size,
        config.max_waiting,
        runner,
        config.prefix_cache,
        runner.n_seq_max,
        max_kept_cells=int(runner.n_ctx * config.kept_share()),
        tiers=tiers,
        n_swa=runner.n_swa,
    )


_PAD_TOKEN = np.zeros(1, np.int32)  # any token: a throwaway row's output is never read


def _add_pad(batch, seq_id: int, pos: int) -> None:
    batch.add_span(_PAD_TOKEN, pos, seq_id, True)  # with an output row: the output layer is where rows group


def _padded_steps(config: EngineConfig) -> bool:
    """Whether decode steps get throwaway rows (padding.py): KV streams only (a unified
    cache's ubatches take any rows), and not where --deterministic fixes the shapes."""
    return config.pad_steps and config.streams and not config.deterministic


def _tiers(config: EngineConfig, runner: ModelRunner) -> Tiers | None:
    host = config.host_cache_bytes()
    if host == 0:
        return None
    store = KVStore(host, runner.kv_fingerprint(), config.disk_cache, config.disk_cache_size)
    where = f", then up to {config.disk_cache_size >> 20} MiB in {config.disk_cache}" if config.disk_cache else ""
    log.info("prefix KV tiers: %d MiB of host memory%s", host >> 20, where)
    return Tiers(runner, store)


def _grammar_error(seq: Sequence, exc: GrammarError) -> Error:
    param = seq.params.grammar_param
    return Error(seq.rid, 400, f"'{param}' cannot be enforced: {_clipped(str(exc))}", "invalid_grammar", param)


def _clipped(text: str, most: int = 500) -> str:
    return text if len(text) <= most else text[:most] + "..."


def _on_path(node, nodes: set) -> bool:
    while node is not None:
        if node in nodes:
            return True
        node = node.parent
    return False
