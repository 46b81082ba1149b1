"""Speculative decoding (engine/speculate.py): n-gram drafts, the per-step choice of who
drafts how much, verification by sampling row by row, and the KV of refused drafts removed.

Exactness: verification picks each token by sampling the target model's row for it with the
request's own generator, so a token is kept only if sampling would have produced it. Greedy
outputs are compared with speculation off; a draft's rows are computed in a chunk of several
tokens, not one, which moves logits a little (../shared/LLAMA_FACTS.md), so where the outputs
differ the speculative one must be teacher-forced equal: each token the top choice of the
non-speculative path fed the same tokens, or within MARGIN of it. Sampled rows are checked
statistically on synthetic rows with a three-token support.
"""

from __future__ import annotations

import json
import llama_cpp
import numpy as np
import pytest

from demesne.bench import build_copy_prompts
from demesne.engine.core import Engine
from demesne.engine.request import Sequence
from demesne.engine import speculate
from demesne.engine.draft import vocab_mismatch
from demesne.engine.speculate import MODEL, PROBE, SUBADDITIVE_SLACK, NgramIndex, SpecState, Speculator, StepCosts
from demesne.protocol import Generate, SamplingParams

from conftest import make_engine, run_engine
from test_constraints import schema_grammar

MARGIN = 1.0  # logits: the largest difference batch shapes make on this model (LLAMA_FACTS.md)


# -- drafts and the choice of who drafts, without the model ---------------------------------


def test_ngram_index_proposes_what_followed_the_longest_latest_match():
    index = NgramIndex()
    tokens = [1, 2, 3, 4, 6, 9, 9, 2, 3, 4, 6, 7, 2, 3, 4]
    assert index.draft(tokens, 8) == ([6, 7, 2, 3, 4], 3)  # "2 3 4": the latest occurrence
    tokens += [6]  # incremental: the new token's n-grams join the index
    assert index.draft(tokens, 8) == ([], 0)  # "2 3 4 6" went on with 9, then with 7: a guess
    tokens += [7]
    assert index.draft(tokens, 3) == ([2, 3, 4], 4)  # "3 4 6 7": one occurrence before


def test_an_ambiguous_match_proposes_nothing_even_where_a_shorter_one_would():
    index = NgramIndex()
    assert index.draft([1, 2, 3, 5, 8, 2, 3, 6, 7, 2, 3], 4) == ([], 0)  # "2 3": then 5, then 6
    assert NgramIndex().draft([1, 2, 3, 5, 8, 1, 2, 3, 6, 7, 1, 2, 3], 4) == ([], 0)


def test_ngram_index_never_matches_its_own_end():
    assert NgramIndex().draft([5, 6, 7, 8], 4) == ([], 0)
    assert NgramIndex().draft([5, 6, 5, 6], 4) == ([5, 6], 2)


def fake_costs(seconds_by_rows) -> StepCosts:
    costs = StepCosts()
    costs.calibrate(seconds_by_rows, 64, preemptions=lambda: 0)
    return costs


def test_step_costs_interpolate_extrapolate_and_follow_the_machine():
    costs = fake_costs(lambda n: 0.010 + 0.002 * n)
    assert costs.predict(5) == pytest.approx(0.020)  # between the measured 4 and 6
    assert costs.predict(100) == pytest.approx(0.210)  # beyond 64, on the last slope
    for _ in range(200):
        costs.observe(8, 2 * 0.026)  # the machine got twice as slow (a long context)
    assert costs.predict(16) == pytest.approx(2 * 0.042, rel=0.01)
    bumpy = fake_costs(lambda n: {1: 0.01, 2: 0.03}.get(n, 0.02))
    assert bumpy.predict(3) >= bumpy.predict(2)  # never cheaper with more rows


class Decoding:
    """What the speculator reads of a sequence: its tokens and its draft state."""

    def __init__(self, tokens: list[int], accepted: int, tried: int):
        self.tokens = list(tokens)
        self.spec = SpecState(NgramIndex(), tried, accepted)
        if accepted:  # as if its last draft had been kept whole
            self.spec.reach = 2 * accepted


def offer(tokens: list[int], accepted: int = 0, tried: int = 0) -> Decoding:
    return Decoding(tokens, accepted, tried)


COPYING = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4] * 2 + [3, 1, 4]
LONG_COPY = list(range(100, 300)) + list(range(100, 110))  # drafts of up to 190 tokens


def test_drafts_where_rows_are_cheap_and_not_where_they_are_dear():
    eog = np.zeros(16, bool)
    gpu = Speculator(16, eog)
    gpu.costs = fake_costs(lambda n: 0.010 + 0.0001 * n)  # rows nearly free
    seq = offer(COPYING, accepted=40, tried=40)
    drafts = gpu.propose([seq], [100], room=64)
    assert drafts == {seq: COPYING[3:18]}  # the longest match up to --draft-max in a measured step (16 rows)
    cpu = Speculator(16, eog)
    cpu.costs = fake_costs(lambda n: 0.010 * n)  # each row costs a whole step
    assert cpu.propose([offer(COPYING, 40, 40)], [100], room=64) == {}
    mid = Speculator(16, eog)
    mid.costs = fake_costs(lambda n: 0.010 + 0.002 * n)
    assert mid.propose([offer(COPYING, 40, 40)], [100], room=64)
    bad = offer(COPYING, accepted=0, tried=40)  # this request's drafts always failed
    assert mid.propose([bad], [100], room=64) == {}


def test_a_new_request_probes_and_a_kept_draft_doubles():
    spec = Speculator(64, np.zeros(512, bool))
    spec.costs = fake_costs(lambda n: 0.010 + 0.0001 * n)
    seq = offer(LONG_COPY)
    assert len(spec.propose([seq], [200], room=128)[seq]) == PROBE  # no history yet: a probe
    spec.verified(seq, PROBE, PROBE)  # kept whole: the next step may have twice its rows
    assert len(spec.propose([seq], [200], room=128)[seq]) + 1 == 2 * (PROBE + 1)
    spec.verified(seq, 2 * PROBE + 1, 2 * PROBE + 1)
    assert len(spec.propose([seq], [200], room=128)[seq]) + 1 == 4 * (PROBE + 1)
    spec.verified(seq, 4 * PROBE + 3, 0)  # refused at its first token: a wrong match
    assert len(spec.propose([seq], [200], room=128)[seq]) == PROBE


def test_one_draft_length_per_step_within_room_limits_and_ends():
    eog = np.zeros(16, bool)
    eog[9] = True
    spec = Speculator(16, eog)
    spec.costs = fake_costs(lambda n: 0.010 + 0.0001 * n)
    seqs = [offer(COPYING, 40, 40) for _ in range(4)]
    drafts = spec.propose(seqs, [100] * 4, room=64)
    assert list(drafts.values()) == [[1, 5]] * 4  # stopped before the end token 9
    drafts = spec.propose(seqs, [100, 100, 100, 1], room=64)
    assert len(drafts) >= 2 and len({len(d) for d in drafts.values()}) == 1  # equal lengths: one ubatch
    assert len(drafts.get(seqs[3], [])) <= 1
    assert spec.propose(seqs, [100] * 4, room=0) == {}
    wide = spec.propose(seqs, [100] * 4, room=6)
    assert sum(len(d) for d in wide.values()) <= 6


def test_only_steps_of_measured_sizes_are_chosen():
    """Between two measured sizes the curve is a guess, and on a CPU a bad one (17 rows cost
    40% more than 16 here): every step proposed has a drafts' ubatch of a measured size."""
    spec = Speculator(64, np.zeros(512, bool))
    spec.costs = fake_costs(lambda n: 0.010 + 0.0001 * n)
    for n in range(1, 9):
        seqs = [offer(LONG_COPY, 100, 100) for _ in range(n)]
        for seq in seqs:
            seq.spec.reach = 64
        drafts = spec.propose(seqs, [200] * n, room=512)
        k, s = max(len(d) for d in drafts.values()), len(drafts)
        assert spec.at_knot(n, k, s) and (n * (k + 1) if s == n else k * s) in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


# A CPU-like curve (measured here: 14 ms for one row, 92 ms for 16, 190 ms for 32): a batch
# of 16 decoding requests gains nothing from drafts even at 90% acceptance.
CPU_CURVE = {1: 0.014, 2: 0.028, 3: 0.033, 4: 0.038, 6: 0.050, 8: 0.062, 12: 0.080, 16: 0.092, 24: 0.134, 32: 0.190, 48: 0.280, 64: 0.370}


def cpu_seconds(rows: int) -> float:
    sizes = sorted(CPU_CURVE)
    if rows <= 64:
        return float(np.interp(rows, sizes, [CPU_CURVE[n] for n in sizes]))
    return 0.370 + (rows - 64) * (0.370 - 0.280) / 16


def test_a_large_batch_turns_speculation_off():
    spec = Speculator(16, np.zeros(16, bool))
    spec.costs = fake_costs(CPU_CURVE.__getitem__)
    seqs = [offer(COPYING, 36, 40) for _ in range(16)]
    assert spec.propose(seqs, [100] * 16, room=512) == {}
    assert spec.propose(seqs[:1], [100], room=512)  # alone, the same request drafts


def test_calibration_stops_at_its_budget_and_extrapolates():
    calls = []

    def slow(n: int) -> float:  # a large model on a CPU: a second a row
        calls.append(n)
        return 1.0 * n

    costs = StepCosts()
    costs.calibrate(slow, 64, budget=5.0, preemptions=lambda: 0)
    assert max(calls) == 2 and list(costs.sizes[:3]) == [1, 2, 4]  # then knots up to 64
    assert costs.predict(16) == pytest.approx(16.0)
    assert costs.predict(64) == pytest.approx(64.0)
    flat = StepCosts()  # a top the machine disturbed, flat: rows beyond it are not free
    flat.calibrate(lambda n: {1: 0.05, 2: 0.1}.get(n, 0.12), 544, budget=100.0, preemptions=lambda: 0)
    assert flat.measured == 12 and flat.sizes[-1] == 544
    assert flat.predict(544) == pytest.approx(0.12 + 480 * 0.25 * 0.12 / 64)


class Machine:
    """A decode timer whose machine another process shares during some of the calls
    (making them ``slowdown`` times slower, times ``noise``), and the involuntary context
    switches that sharing causes (a quiet machine causes a few)."""

    def __init__(self, busy_calls: range, slowdown: float = 3.0, noise=lambda: 1.0):
        self.calls, self.busy_calls, self.slowdown, self.noise, self.switches = 0, busy_calls, slowdown, noise, 0

    def time_rows(self, n: int) -> float:
        busy = self.calls in self.busy_calls
        self.calls += 1
        seconds = cpu_seconds(n) * (self.slowdown * self.noise() if busy else 1.0)
        self.switches += int(seconds * (250 if busy else 30))
        return seconds


@pytest.mark.parametrize("busy_calls", [range(1, 12), range(9, 20), range(15, 27)])
def test_calibration_measures_again_what_another_process_disturbed(busy_calls):
    machine = Machine(busy_calls)
    costs = StepCosts()
    costs.calibrate(machine.time_rows, 64, budget=10.0, preemptions=lambda: machine.switches)
    assert costs.disturbed == 0
    assert costs.curve[: len(CPU_CURVE)] == pytest.approx(sorted(CPU_CURVE.values()))
    blind = StepCosts()  # the same disturbance, not seen: the curve is bent
    blind.calibrate(Machine(busy_calls).time_rows, 64, budget=10.0, preemptions=lambda: 0)
    assert blind.curve[: len(CPU_CURVE)] != pytest.approx(sorted(CPU_CURVE.values()))


def test_a_calibration_disturbed_throughout_is_kept_sane():
    rng = np.random.default_rng(3)
    machine = Machine(range(0, 1000), slowdown=1.0, noise=lambda: rng.uniform(1.0, 8.0))
    costs = StepCosts()
    costs.calibrate(machine.time_rows, 64, budget=2.0, preemptions=lambda: machine.switches)
    assert costs.disturbed >= costs.measured - 1 >= 1  # the smallest may slip through as quiet
    for j, n in enumerate(costs.sizes):  # no size dearer than two smaller ones, or a larger one
        assert costs.curve[j] <= SUBADDITIVE_SLACK * (costs.predict(n // 2) + costs.predict(n - n // 2)) + 1e-12
        assert costs.curve[j] <= costs.curve[j:].min() + 1e-12


def test_step_costs_learn_a_wrong_shape_from_the_steps_served():
    """The curve a busy start measured here (ms by rows: 1 23.7, 2 47.6, 3 61.9, 4 61.9, 6 127.8,
    8 1608, the budget spent): with it, steps where some of 16 sequences draft looked nearly
    free and the engine drafted in every step, 20% slower than not drafting. Served steps
    must teach the engine what they cost, so that it stops."""
    bent = {1: 0.0237, 2: 0.0476, 3: 0.0619, 4: 0.0619, 6: 0.1278, 8: 1.608}
    spec = Speculator(16, np.zeros(16, bool))
    spec.costs = StepCosts()
    spec.costs.calibrate(bent.__getitem__, 544, budget=2.0, preemptions=lambda: 0)
    rng = np.random.default_rng(0)
    seqs = [offer(COPYING, 36, 40) for _ in range(16)]
    tokens, seconds = [], []
    for _ in range(400):
        drafts = spec.propose(seqs, [100] * 16, room=2048)
        k = max((len(d) for d in drafts.values()), default=0)
        s = len(drafts)
        took = cpu_seconds(16 * (k + 1)) if s == 16 else cpu_seconds(16) + (cpu_seconds(k * s) if s else 0.0)
        spec.observe(16, k, s, took)
        made = 16
        for seq, draft in drafts.items():
            kept = next((i for i, ok in enumerate(rng.random(len(draft)) < 0.9) if not ok), len(draft))
            spec.verified(seq, len(draft), kept)
            made += kept
        tokens.append(made)
        seconds.append(took)
    late = slice(300, 400)
    assert sum(tokens[late]) / sum(seconds[late]) >= 0.98 * 16 / cpu_seconds(16)
    assert spec.propose(seqs, [100] * 16, room=2048) == {}


def test_steps_where_only_some_draft_learn_their_own_cost():
    spec = Speculator(16, np.zeros(16, bool))
    spec.costs = fake_costs(lambda n: 0.010 + 0.002 * n)
    partial, full, plain = spec.step_seconds(8, 3, 2), spec.step_seconds(8, 3, 8), spec.step_seconds(8, 0, 0)
    for _ in range(300):  # the second ubatch costs more than two steps' sum; the rest as measured
        spec.observe(8, 3, 2, 1.5 * partial)
        spec.observe(8, 0, 0, plain)
        spec.observe(8, 3, 8, full)
    assert spec.step_seconds(8, 3, 2) == pytest.approx(1.5 * partial, rel=0.03)
    assert spec.step_seconds(8, 3, 8) == pytest.approx(full, rel=0.03)
    assert spec.step_seconds(8, 0, 0) == pytest.approx(plain, rel=0.03)
    alone = Speculator(16, np.zeros(16, bool))  # only such steps, all dearer: that is the machine
    alone.costs = fake_costs(lambda n: 0.010 + 0.002 * n)
    for _ in range(100):
        alone.observe(8, 3, 2, 1.5 * partial)
    assert alone.step_seconds(8, 3, 2) == pytest.approx(1.5 * partial, rel=0.01)
    assert alone.step_seconds(8, 3, 8) == pytest.approx(1.5 * full, rel=0.05)


# -- the engine on the real model ------------------------------------------------------------


CHEAP_ROWS = lambda n: 0.010 + 0.0005 * n  # noqa: E731 - a GPU-like curve: drafts pay
# A draft model a tenth of the target's cost (what one is for). The bundled model drafting
# for itself really costs what the target does, and then drafting pays only while this
# machine runs slower than CHEAP_ROWS says: a test of the outputs cannot hang on that.
CHEAP_DRAFTS = lambda n: 0.001 + 0.00005 * n  # noqa: E731


def drafting_engine(model_path: str, **overrides) -> Engine:
    """An engine whose step costs say drafts pay, whatever this machine measured at start
    (under a loaded CI machine the measured curve may say otherwise): what is tested here is
    that drafted outputs are right, not when drafting pays. Its shape stays (the steps run
    would teach it this machine's)."""
    engine = make_engine(model_path, **overrides)
    engine.speculator.costs = fake_costs(CHEAP_ROWS)
    engine.speculator.costs.shape_rate = 0.0
    return engine


@pytest.fixture(scope="module")
def engines(model_path):
    on, off = drafting_engine(model_path), make_engine(model_path, speculative="off")
    yield on, off
    on.runner.close()
    off.runner.close()


def copy_prompt(tokenizer, i: int = 0) -> list[int]:
    return tokenizer.encode(build_copy_prompts(i + 1, 40)[i])


def greedy(engine: Engine, prompt: list[int], max_tokens: int, rid: str) -> list[int]:
    return run_engine(engine, [Generate(rid, prompt, max_tokens, SamplingParams(temperature=0.0))])[rid]


def teacher_forced(engine: Engine, prompt: list[int], output: list[int]) -> list[tuple[int, float]]:
    """For each output token, its logit's distance below the top logit when ``engine`` is fed
    the prompt and the output before it, one decode row per token (the non-speculative shape)."""
    engine.scheduler.drop_cached()  # idle slots emptied: the last one is free to use here
    runner, seq_id = engine.runner, engine.config.max_seqs - 1
    runner.batch.clear()
    runner.batch.add_span(prompt[:-1], 0, seq_id, False)
    runner.decode()
    gaps = []
    for i, token in enumerate(output):
        runner.batch.clear()
        runner.batch.add_span([([*prompt, *output])[len(prompt) - 1 + i]], len(prompt) - 1 + i, seq_id, True)
        row = runner.decode()[0]
        gaps.append((token, float(row.max() - row[token])))
    runner.remove(seq_id)
    return gaps


def test_greedy_outputs_match_speculation_off(engines, tokenizer):
    on, off = engines
    before = on.speculator.accepted
    for i, prompt in enumerate([copy_prompt(tokenizer), tokenizer.encode("1, 2, 3, 4, 5, 6, 7, 8,")]):
        fast = greedy(on, prompt, 64, f"on{i}")
        plain = greedy(off, prompt, 64, f"off{i}")
        if fast != plain:  # shapes differ (a chunk of draft rows vs one row): teacher-forced
            gaps = teacher_forced(off, prompt, fast)
            assert max(gap for _, gap in gaps) <= MARGIN, gaps
            assert sum(gap == 0.0 for _, gap in gaps) >= 0.9 * len(gaps)
    assert on.speculator.accepted - before >= 32  # the copy was mostly drafted


def kv_positions(engine: Engine, seq_id: int) -> int:
    return llama_cpp.llama_memory_seq_pos_max(engine.runner.memory, seq_id) + 1


@pytest.mark.parametrize("layout", ["streams", "unified"])
def test_kv_holds_exactly_the_computed_tokens_after_every_step(model_path, tokenizer, layout):
    engine = drafting_engine(model_path, kv_layout=layout, max_seqs=4)
    try:
        prompt = copy_prompt(tokenizer, 1)
        reqs = [
            Generate("greedy", prompt, 48, SamplingParams(temperature=0.0)),
            Generate("hot", prompt, 48, SamplingParams(temperature=1.3, seed=3, ignore_eos=True)),
            Generate("count", tokenizer.encode("a b c d e f a b c d e f a b"), 24, SamplingParams(temperature=0.0, logprobs=2)),
            # A penalty on repeating tokens refuses drafts that copy (over the draft rows' own
            # context: the penalties see the draft tokens before each row).
            Generate("averse", prompt, 48, SamplingParams(temperature=0.0, repetition_penalty=1.3, ignore_eos=True)),
        ]
        for req in reqs:
            assert engine.submit(b"t", req) is None
        out = {r.rid: [] for r in reqs}
        logprobs = {r.rid: 0 for r in reqs}
        while engine.has_work:
            for _c, delta in engine.step():
                out[delta.rid] += delta.tokens
                logprobs[delta.rid] += len(delta.logprobs or [])
            for seq in engine.scheduler.running:
                if seq.n_computed:
                    assert kv_positions(engine, seq.seq_id) == seq.n_computed, seq.rid
        assert {rid: len(t) for rid, t in out.items()} == {"greedy": 48, "hot": 48, "count": 24, "averse": 48}
        assert logprobs["count"] == 24  # one entry per token, drafted or not
        spec = engine.speculator
        assert spec.accepted > 0 and spec.tried > spec.accepted  # drafts kept and drafts refused
        if layout == "streams":
            for slot in engine.scheduler.slots:  # what an idle slot offers the next request
                assert kv_positions(engine, slot.seq_id) == len(slot.held)
        again = greedy(engine, prompt, 48, "again")  # served from what the first left behind
        assert again[:8] == out["greedy"][:8]
    finally:
        engine.runner.close()


def test_sampled_tokens_keep_the_models_distribution(engines):
    """Two synthetic rows: the first offers tokens A, B, C (0.5, 0.3, 0.2), the draft guesses
    A, and the second row (seen only when A was kept) offers D, E (0.6, 0.4). Whatever the
    draft, the pairs must come out with the model's probabilities."""
    on, _ = engines
    A, B, C, D, E = 11, 12, 13, 14, 15
    rows = np.full((2, on.runner.n_vocab), -np.inf, np.float32)
    rows[0, [A, B, C]] = np.log([0.5, 0.3, 0.2])
    rows[1, [D, E]] = np.log([0.6, 0.4])
    seq = Sequence("s", b"t", 3, 100, SamplingParams(temperature=1.0), [1, 2, 3], rng=np.random.default_rng(7))
    on.scheduler.drop_cached()  # idle slots emptied: the last one is free to use here
    seq.seq_id, seq.spec = on.config.max_seqs - 1, SpecState(NgramIndex(), match=2)
    counts: dict[tuple, int] = {}
    trials = 3000
    kept, on.speculator = on.speculator, Speculator(16, on.runner.eog)  # the engine's counts stay real
    try:
        for _ in range(trials):
            seq.n_computed = 2
            _, picked, _ = on._verify(rows.copy(), seq, 0, [A])
            counts[tuple(picked)] = counts.get(tuple(picked), 0) + 1
    finally:
        on.speculator = kept
    expected = {(A, D): 0.3, (A, E): 0.2, (B,): 0.3, (C,): 0.2}
    assert set(counts) <= set(expected)
    chi2 = sum((counts.get(k, 0) - p * trials) ** 2 / (p * trials) for k, p in expected.items())
    assert chi2 < 16.27, counts  # 3 degrees of freedom, p = 0.001


def test_constrained_requests_do_not_draft(engines, tokenizer):
    on, _ = engines
    grammar = schema_grammar({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]})
    prompt = tokenizer.encode('{"a": "x"} {"a": "x"} {"a": "x"} ')
    before = on.speculator.drafted
    out = run_engine(on, [Generate("json", prompt, 24, SamplingParams(temperature=0.0, grammar=grammar))])
    json.loads(tokenizer.decode(out["json"]))
    assert on.speculator.drafted == before


def test_a_constrained_request_beside_a_drafting_one(model_path, tokenizer):
    """The drafting request (slot 0) takes output rows 0..k, the constrained one (slot 1) the
    row after: its grammar's mask is kept per sequence, not per row."""
    engine = drafting_engine(model_path, max_seqs=2)
    try:
        grammar = schema_grammar({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]})
        out = run_engine(engine, [
            Generate("copy", copy_prompt(tokenizer), 40, SamplingParams(temperature=0.0)),
            Generate("json", tokenizer.encode("A JSON object: "), 40, SamplingParams(temperature=0.7, seed=1, grammar=grammar)),
        ])
        json.loads(tokenizer.decode(out["json"]))
        assert len(out["copy"]) == 40 and engine.speculator.accepted > 0
        assert engine.counters.step_faults == 0
    finally:
        engine.runner.close()


def test_stats_report_drafts(engines):
    stats = engines[0].stats()
    assert stats["spec_accepted_tokens_total"] <= stats["spec_verified_tokens_total"] <= stats["spec_draft_tokens_total"]
    assert 0.0 < stats["spec_acceptance_rate"] <= 1.0
    assert "spec_draft_tokens_total" not in engines[1].stats()


# -- a draft model ---------------------------------------------------------------------------


def test_vocabularies_are_compared_token_by_token():
    texts = ["<pad>", "a", "b"]
    assert vocab_mismatch(3, texts.__getitem__, texts.__getitem__) is None
    other = ["<pad>", "a", "c"]
    assert "token 2" in vocab_mismatch(3, other.__getitem__, texts.__getitem__)


class NoMatches(NgramIndex):
    def draft(self, tokens: list[int], most: int) -> tuple[list[int], int]:
        return [], 0


def test_a_draft_model_drafts_where_ngrams_have_nothing(model_path, tokenizer, engines, monkeypatch):
    """The bundled model as its own draft: its greedy guesses are the target's own, so nearly
    all are kept, and the output is the non-speculative one (or teacher-forced equal). The
    n-grams find nothing here (a greedy base model soon repeats itself, and they would)."""
    monkeypatch.setattr(speculate, "NgramIndex", NoMatches)
    _, off = engines
    engine = drafting_engine(model_path, draft_model=model_path)
    try:
        engine.draft_model.costs = fake_costs(CHEAP_DRAFTS)
        engine.speculator.model_costs = engine.draft_model.costs
        prompt = tokenizer.encode("The history of the city begins in")  # nothing to copy from
        fast = greedy(engine, prompt, 40, "drafted")
        plain = greedy(off, prompt, 40, "plain")
        if fast != plain:
            gaps = teacher_forced(off, prompt, fast)
            assert max(gap for _, gap in gaps) <= MARGIN, gaps
        by_model = engine.speculator.by_size[MODEL]
        assert engine.stats()["spec_model_draft_tokens_total"] >= by_model[1]
        assert by_model[1] >= 10 and by_model[0] >= 0.8 * by_model[1]  # verified, and mostly kept
        # A second request in the same slot keeps the draft stream's common prefix.
        again = greedy(engine, prompt + fast[:5], 20, "again")
        assert again[:5] == fast[5:10]
    finally:
        engine.close()
        engine.runner.close()
