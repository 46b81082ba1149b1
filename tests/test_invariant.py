"""Batch-invariant decoding (engine/invariant.py) on the real model: a sequence's logits are
the same bits alone and in any crowd, its prompt cut any way; pads leave nothing behind; the
start-up proof fails where the shapes are not kept; the engine refuses what it cannot keep."""

from __future__ import annotations

import llama_cpp
import numpy as np
import pytest

import demesne.engine.invariant as invariant
from conftest import make_engine
from demesne.config import ConfigError, EngineConfig
from demesne.engine.runner import DecodeError, ModelLoadError, ModelRunner
from demesne.protocol import Generate, SamplingParams

SEQS = 8


@pytest.fixture(scope="module")
def runner(model_path):
    r = ModelRunner(EngineConfig(model=model_path, threads=2, ctx_size=16384, max_seqs=SEQS, batch_size=512, deterministic=True))
    yield r
    r.close()


def clear(runner) -> None:
    for s in range(SEQS):
        runner.remove(s)


def decode(runner, spans, invariant_shapes: bool = True) -> np.ndarray:
    """Spans ``(seq, tokens, first position)``, each with an output row for its last token:
    through the invariant decoder, or as one plain llama_decode (the control)."""
    batch = runner.batch
    batch.clear()
    for s, tokens, pos0 in spans:
        batch.add_span(tokens, pos0, s, output_last=True)
    if invariant_shapes:
        return runner.decode().copy()
    saved, runner.invariant = runner.invariant, None
    try:
        return runner.decode().copy()
    finally:
        runner.invariant = saved


def crowd_trials(runner, trials: int, invariant_shapes: bool, first_only: bool = False) -> list[int]:
    """Sequence 3's prompt alone, then beside random other sequences (some feeding as many
    tokens, some not); the trials whose logits differ (``first_only``: up to the first)."""
    differ = []
    for trial in range(trials):
        g = np.random.default_rng(trial)
        t = int(g.integers(1, 14))
        target = g.integers(1000, 50000, t).astype(np.int32)
        clear(runner)
        alone = decode(runner, [(3, target, 0)], invariant_shapes)[0]
        spans = [(3, target, 0)]
        for s in range(SEQS):
            if s != 3 and g.random() < 0.6:
                n = t if g.random() < 0.5 else int(g.integers(1, 14))
                spans.append((s, g.integers(1000, 50000, n).astype(np.int32), 0))
        spans.sort(key=lambda span: span[0])
        clear(runner)
        crowded = decode(runner, spans, invariant_shapes)[[s for s, _, _ in spans].index(3)]
        if not np.array_equal(alone, crowded):
            differ.append(trial)
            if first_only:
                break
    clear(runner)
    return differ


def test_a_sequence_gets_the_same_bits_alone_and_in_any_crowd(runner):
    assert crowd_trials(runner, 40, invariant_shapes=True) == []


def test_without_the_shapes_the_crowd_changes_the_bits(runner):
    """The control: plain llama_decode calls of the same batches do differ."""
    assert crowd_trials(runner, 40, invariant_shapes=False, first_only=True)


def test_prompt_chunking_and_decode_steps_do_not_change_the_bits(runner):
    """A 150-token prompt (three pieces of at most 56) and four decode steps, alone; then
    the prompt fed in chunks of 13, 70 and 67 beside other sequences' decode rows."""
    g = np.random.default_rng(7)
    prompt = g.integers(1000, 50000, 150).astype(np.int32)
    nexts = g.integers(1000, 50000, 4).astype(np.int32)

    def run(cuts, others):
        clear(runner)
        pos = {s: 0 for s in others}
        for s in others:
            decode(runner, [(s, g.integers(1000, 50000, 5).astype(np.int32), 0)])
            pos[s] = 5
        start, out = 0, []
        for cut in cuts:
            spans = [(0, prompt[start:cut], start)] + [(s, np.array([11], np.int32), pos[s]) for s in others]
            out.append(decode(runner, spans)[0])
            start = cut
            for s in others:
                pos[s] += 1
        rows = [out[-1]]
        for i, tok in enumerate(nexts):
            spans = [(0, np.array([tok], np.int32), len(prompt) + i)] + [(s, np.array([12], np.int32), pos[s]) for s in others]
            rows.append(decode(runner, spans)[0])
            for s in others:
                pos[s] += 1
        return np.stack(rows)

    alone = run([150], [])
    assert np.array_equal(alone, run([13, 83, 150], [1, 2, 5]))
    assert np.array_equal(alone, run([56, 150], [3]))
    clear(runner)


def test_pads_leave_no_cells_behind(runner):
    clear(runner)
    decode(runner, [(5, np.arange(1000, 1009, dtype=np.int32), 0)])  # an idle stream inside the range
    pads0 = runner.invariant.pad_tokens
    decode(runner, [(2, np.array([7], np.int32), 0), (7, np.array([8], np.int32), 0)])  # ids 2..7: pads in 3..6
    assert runner.invariant.pad_tokens > pads0
    pos_max = {s: llama_cpp.llama_memory_seq_pos_max(runner.memory, s) for s in range(SEQS)}
    assert pos_max == {0: -1, 1: -1, 2: 0, 3: -1, 4: -1, 5: 8, 6: -1, 7: 0}
    clear(runner)


def test_a_failed_call_leaves_the_kv_as_before_the_step(runner, monkeypatch):
    """Pieces in several calls: the second call fails; the first call's cells are removed,
    so the step failed as one llama_decode would (nothing in KV)."""
    clear(runner)
    real = runner.decode_batch
    calls = []

    def second_fails(batch):
        calls.append(batch.n_tokens)
        if len(calls) == 2:
            raise DecodeError(-1)
        return real(batch)

    monkeypatch.setattr(runner, "decode_batch", second_fails)
    with pytest.raises(DecodeError):
        decode(runner, [(0, np.arange(1000, 1003, dtype=np.int32), 0), (1, np.arange(1000, 1100, dtype=np.int32), 0)])
    assert len(calls) == 2
    assert all(llama_cpp.llama_memory_seq_pos_max(runner.memory, s) == -1 for s in range(SEQS))


def test_the_start_up_proof_refuses_shapes_that_do_not_keep_the_bits(model_path, monkeypatch):
    """Rows one by one do not keep the bits on this CPU, and the fixed probe finds it: no
    random crowd gets to run (on a slow machine the crowds' time can run out before one
    that shows it)."""
    monkeypatch.setattr(invariant, "QUANTA", (1,))
    monkeypatch.setattr(invariant, "CHECK_SECONDS", 0.0)
    monkeypatch.setattr(invariant.InvariantDecoder, "_crowd", lambda self, rng, ids: 0.0)
    with pytest.raises(ModelLoadError, match="other logits in other batch shapes"):
        ModelRunner(EngineConfig(model=model_path, threads=2, ctx_size=4096, max_seqs=4, deterministic=True))


def test_the_start_up_proof_takes_the_first_quantum_that_keeps_the_bits(model_path, monkeypatch):
    """Rows one by one do not keep the bits on this CPU; multiples of 8 do: the engine runs
    with 8 and keeps 8 cells of each stream for pads."""
    monkeypatch.setattr(invariant, "QUANTA", (1, 8))
    engine = make_engine(model_path, deterministic=True, max_seqs=4, ctx_size=4096)
    assert (engine.runner.invariant.quantum, engine.runner.invariant.piece_max) == (8, 56)
    assert engine.n_ctx == engine.runner.n_ctx_seq - 8


def test_deterministic_needs_streams_and_flash_attention(model_path):
    with pytest.raises(ConfigError, match="--kv-layout streams"):
        EngineConfig(model=model_path, deterministic=True, kv_layout="unified")
    with pytest.raises(ConfigError, match="flash attention"):
        EngineConfig(model=model_path, deterministic=True, flash_attn="off")


def test_engine_outputs_alone_equal_outputs_together(model_path, tokenizer):
    """In-process engine, greedy and seeded, with speculation and grammar: each request alone,
    then all at once; the same tokens and logprobs."""
    engine = make_engine(model_path, deterministic=True)
    prompts = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "Dear diary, today",
               "The three laws of", "In 1492,", "Photosynthesis is", "Name a colour:"]

    def requests(tag):
        out = []
        for i, text in enumerate(prompts):
            params = SamplingParams(temperature=0, logprobs=2) if i % 2 else SamplingParams(temperature=1.0, seed=i, logprobs=2)
            if i == 7:
                params = SamplingParams(temperature=1.0, seed=3, logprobs=1, grammar='start: "red" | "green" | "blue"')
            out.append(Generate(f"{tag}{i}", tokenizer.encode(text), 20, params))
        return out

    def run(reqs):  # tokens and logprobs per request (how they are grouped in deltas depends on drafts)
        out = {r.rid[1:]: ([], []) for r in reqs}
        for r in reqs:
            assert engine.submit(b"t", r) is None
        while engine.has_work:
            for _c, d in engine.step():
                out[d.rid[1:]][0].extend(d.tokens)
                out[d.rid[1:]][1].extend(d.logprobs or [])
        return out

    alone = {}
    for r in requests("a"):
        alone.update(run([r]))
    assert run(requests("b")) == alone
    assert tokenizer.decode(alone["7"][0]).strip() in ("red", "green", "blue")
    assert engine.speculator.stats()["spec_accepted_tokens_total"] > 0  # drafts were verified and kept
