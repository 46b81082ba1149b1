"""The engine in-process on the real model: continuous batching, KV accounting, preemption."""

from __future__ import annotations

import numpy as np
import pytest

from demesne.engine.core import Engine
from demesne.protocol import FINISH_LENGTH, Generate, SamplingParams

from conftest import make_engine, run_engine

PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "def fibonacci(n):",
    "1, 2, 3, 4,",
    "In 1492, Columbus",
    "Water boils at",
    "My favourite animal is",
    "To be or not to be",
]
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module", params=["streams", "unified"])
def engine(model_path, request):
    engine = make_engine(model_path, kv_layout=request.param)
    yield engine
    engine.runner.close()


def greedy_requests(tokenizer, max_tokens=24, tag="r") -> list[Generate]:
    return [Generate(f"{tag}{i}", tokenizer.encode(p), max_tokens, GREEDY) for i, p in enumerate(PROMPTS)]


def single_sequence_logits(engine: Engine, tokens: list[int], n_prompt: int) -> np.ndarray:
    """Teacher-forced: the prompt as one chunk, then each given token alone; logits per step."""
    runner, batch = engine.runner, engine.runner.batch
    engine.scheduler.drop_cached()  # room for this side run on seq id 0
    rows = []
    batch.clear()
    batch.add_span(tokens[:n_prompt], 0, 0, True)
    rows.append(runner.decode()[0].copy())
    for pos in range(n_prompt, len(tokens) - 1):
        batch.clear()
        batch.add_span([tokens[pos]], pos, 0, True)
        rows.append(runner.decode()[0].copy())
    runner.remove(0)
    return np.array(rows)


def test_concurrent_greedy_matches_single_sequence_teacher_forced(engine, tokenizer):
    """Exact equality across batch shapes is not guaranteed by llama.cpp (LLAMA_FACTS.md), so
    each token a concurrent run chose is checked against one sequence decoding alone, fed the
    same tokens: it must be that run's top choice or within 0.5 logits of it."""
    concurrent = run_engine(engine, greedy_requests(tokenizer))
    for req in greedy_requests(tokenizer):
        generated = concurrent[req.rid]
        assert len(generated) == req.max_tokens
        logits = single_sequence_logits(engine, req.prompt + generated, len(req.prompt))
        gaps = logits.max(axis=1) - logits[np.arange(len(generated)), generated]
        assert gaps.max() < 0.5, (req.rid, gaps)
    assert_no_private_cells(engine)


def assert_no_private_cells(engine: Engine) -> None:
    """Idle. Unified: every used cell is a cell the prefix trie keeps, and no request seq id
    holds any. Streams: every slot is idle and its stream holds exactly the tokens it keeps."""
    import llama_cpp

    assert not engine.has_work
    pos_max = [llama_cpp.llama_memory_seq_pos_max(engine.runner.memory, i) for i in range(engine.config.max_seqs)]
    if engine.config.streams:
        assert all(slot.owner is None for slot in engine.scheduler.slots)
        assert pos_max == [len(slot.held) - 1 for slot in engine.scheduler.slots]
    else:
        assert engine.scheduler.cells_used() == engine.scheduler.trie.n_cells
        assert pos_max == [-1] * engine.config.max_seqs


def test_one_at_a_time_is_exact_and_deterministic(engine, tokenizer):
    """The same request alone, twice: same batch shapes, so bit-for-bit the same output."""
    req = greedy_requests(tokenizer)[1]
    first = run_engine(engine, [req])[req.rid]
    again = run_engine(engine, [Generate("again", req.prompt, req.max_tokens, GREEDY)])["again"]
    assert first == again


def test_kv_cells_freed_on_finish_and_abort(engine, tokenizer):
    reqs = greedy_requests(tokenizer, max_tokens=200, tag="a")
    for req in reqs:
        engine.submit(b"test", req)
    for _ in range(5):
        engine.step()
    assert engine.scheduler.cells_used() > 0
    for req in reqs[:4]:
        engine.abort(b"test", req.rid)
    engine.step()
    assert {s.rid for s in engine.scheduler.running} == {r.rid for r in reqs[4:]}
    for req in reqs[4:]:
        engine.abort(b"test", req.rid)
    assert_no_private_cells(engine)


def test_errors_not_crashes(engine, tokenizer):
    prompt = tokenizer.encode("hello")
    too_long = engine.submit(b"t", Generate("x1", prompt, 5000, GREEDY))
    assert too_long.status == 400 and str(engine.n_ctx) in too_long.message and "5000" in too_long.message
    assert engine.submit(b"t", Generate("x2", [], 5, GREEDY)).status == 400
    assert engine.submit(b"t", Generate("x3", [10**9], 5, GREEDY)).status == 400
    assert engine.submit(b"t", Generate("x4", prompt, 5, SamplingParams(temperature=0.7, seed=-5))) is None
    assert engine.submit(b"t", Generate("x4", prompt, 5, GREEDY)).status == 400  # id in use
    while engine.has_work:
        engine.step()


@pytest.mark.parametrize("speculative", ["off", "ngram"])
def test_full_cache_makes_requests_wait_not_fail(model_path, tokenizer, speculative):
    """Eight requests that together need ~3x the KV cells: preemption, every one completes,
    and each output equals that request run alone on the same small engine, teacher-forced.
    With speculation, drafts take only cells that are free (and requests that draft finish
    sooner, so preemption may not be needed); draft rows are computed in chunks, which moves
    logits up to ~1.0 (LLAMA_FACTS)."""
    small = make_engine(model_path, ctx_size=512, max_seqs=8, batch_size=64, kv_layout="unified", speculative=speculative)
    try:
        reqs = [Generate(f"p{i}", tokenizer.encode(p), 160, GREEDY) for i, p in enumerate(PROMPTS)]
        out = run_engine(small, reqs)
        assert all(len(out[r.rid]) == 160 for r in reqs)
        if speculative == "off":
            assert small.scheduler.n_preemptions > 0
        assert_no_private_cells(small)
        for req in reqs[:3]:
            tokens = req.prompt + out[req.rid]
            logits = single_sequence_logits(small, tokens, len(req.prompt))
            gaps = logits.max(axis=1) - logits[np.arange(len(out[req.rid])), out[req.rid]]
            assert gaps.max() < (0.5 if speculative == "off" else 1.0), (req.rid, gaps.max())
    finally:
        small.runner.close()


def test_long_prompt_is_chunked_while_others_stream(engine, tokenizer):
    """A 1,500-token prompt with a 512-token budget takes several steps, and a running
    sequence gets a token in each of them."""
    runner_req = Generate("stream", tokenizer.encode("Once upon a time"), 40, GREEDY)
    engine.submit(b"t", runner_req)
    engine.step()  # prefill + first token
    long_req = Generate("long", tokenizer.encode("word " * 1500), 2, GREEDY)
    engine.submit(b"t", long_req)
    streamed = 0
    for _ in range(2):  # 1,502 prompt tokens need three steps of at most 511 beside the stream
        deltas = dict((d.rid, d) for _c, d in engine.step())
        streamed += len(deltas["stream"].tokens)
        assert "long" not in deltas  # still prefilling: no output row yet
    assert streamed == 2
    while engine.has_work:
        engine.step()
    assert engine.stats()["prompt_tokens_total"] >= len(long_req.prompt)
    assert_no_private_cells(engine)


def test_finish_reason_length_at_max_tokens(engine, tokenizer):
    req = Generate("len", tokenizer.encode("1, 2, 3,"), 5, GREEDY)
    engine.submit(b"t", req)
    last = None
    while engine.has_work:
        for _c, d in engine.step():
            last = d
    assert last.finish == FINISH_LENGTH and last.prompt_tokens == len(req.prompt)


# -- faults are contained to their step ----------------------------------------------------


def _step_until_idle(engine) -> dict[str, object]:
    """Step until idle; what each request ended with: a finish reason or an Error."""
    from demesne.protocol import Error

    ends: dict[str, object] = {}
    while engine.has_work:
        for _client, item in engine.step():
            if isinstance(item, Error):
                ends[item.rid] = item
            elif item.finish:
                ends[item.rid] = item.finish
    return ends


def test_an_exception_in_a_step_fails_that_steps_requests_only(engine, tokenizer, monkeypatch):
    from demesne.protocol import Error

    reqs = greedy_requests(tokenizer, max_tokens=6, tag="fault")
    for req in reqs[:2]:
        assert engine.submit(b"test", req) is None
    engine.step()  # both prompts in, first tokens out
    calls = {"n": 0}
    real = engine.sampler.sample

    def broken(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise FloatingPointError("sampler exploded")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.sampler, "sample", broken)
    failed = engine.step()
    assert sorted(e.rid for _, e in failed) == ["fault0", "fault1"]
    assert all(isinstance(e, Error) and e.status == 500 and "sampler exploded" in e.message for _, e in failed)
    assert not engine.by_rid and not engine.scheduler.running
    assert_no_private_cells(engine)
    assert engine.submit(b"test", reqs[2]) is None  # the engine goes on
    assert _step_until_idle(engine) == {"fault2": FINISH_LENGTH}
    assert engine.counters.step_faults == 1


def test_a_failing_decode_is_retried_smaller_then_fails_the_largest_request(engine, tokenizer, monkeypatch):
    from demesne.engine.runner import DecodeError
    from demesne.protocol import Error

    long_prompt = tokenizer.encode(" ".join(PROMPTS * 6))
    short, large = Generate("short", tokenizer.encode(PROMPTS[0]), 4, GREEDY), Generate("large", long_prompt, 4, GREEDY)
    for req in (short, large):
        assert engine.submit(b"test", req) is None
    real, sizes = engine.runner.decode, []

    def failing():  # llama.cpp failing on the big batches only (a compute-buffer allocation, say)
        sizes.append(engine.runner.batch.n_tokens)
        if engine.runner.batch.n_tokens > 20:
            raise DecodeError(-3)
        return real()

    monkeypatch.setattr(engine.runner, "decode", failing)
    ends = _step_until_idle(engine)
    assert sizes[1] <= sizes[0] // 2  # retried with half the batch first
    assert isinstance(ends["large"], Error) and ends["large"].status == 500 and "-3" in ends["large"].message
    assert ends["short"] == FINISH_LENGTH
    assert_no_private_cells(engine)


def test_requests_are_keyed_by_gateway_and_id(engine, tokenizer):
    req = greedy_requests(tokenizer, max_tokens=3, tag="same")[0]
    assert engine.submit(b"gateway-1", req) is None
    assert engine.submit(b"gateway-2", req) is None  # the same id from another gateway
    assert engine.submit(b"gateway-1", req).code == "duplicate_id"
    engine.abort(b"gateway-2", req.rid)
    assert [s.client for s in engine.by_rid.values()] == [b"gateway-1"]
    _step_until_idle(engine)
