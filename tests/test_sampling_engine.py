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


def test_json_grammar_never_lets_a_raw_newline_into_a_string(engine, tokenizer):
    """llama-cpp-python's schema converter allows control characters in strings; demesne
    tightens its ``char`` rule. After ``{"name":"Fred}`` a newline token must be refused."""
    from demesne.gateway.openai import response_grammar

    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    for fmt in ({"type": "json_schema", "json_schema": {"schema": schema}}, {"type": "json_object"}):
        grammar = engine.grammars.new(response_grammar({"response_format": fmt}))
        try:
            for token in tokenizer.encode('{"name":"Fred}', add_special=False):
                assert grammar.allows(token)
                grammar.accept(token)
            newline = tokenizer.encode("\n", add_special=False)[0]
            assert not grammar.allows(newline)
            assert grammar.allows(tokenizer.encode('"', add_special=False)[0])
        finally:
            grammar.close()


ADD_TOOL = {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}
OPENS = {"hermes": "<tool_call>", "llama3": "<|python_tag|>", "mistral": "[TOOL_CALLS][", "mistral-v11": "[TOOL_CALLS]", "generic": '{"tool_calls": ['}
# How a call to "add" goes on after the opener.
HEADS = {fmt: ' {"name": "add"' for fmt in OPENS} | {"mistral-v11": 'add[ARGS]{"a"'}


def _tool_constraint(fmt_name: str, choice: str = "auto"):
    from demesne.gateway.structured import schema_grammar
    from demesne.gateway.tool_formats import FORMATS
    from demesne.gateway.tools import call_constraint, parse_tools

    spec = parse_tools({"tools": [ADD_TOOL], "tool_choice": choice})
    text, patterns, _ = call_constraint(spec, FORMATS[fmt_name], lambda schema: schema_grammar(schema, "tools"))
    return text, patterns


def _feed(grammar, tokenizer, text: str) -> bool:
    """Accept ``text`` token by token while the grammar allows it; whether it all went in."""
    for token in tokenizer.encode(text, add_special=False):
        if not grammar.allows(token):
            return False
        grammar.accept(token)
    return True


@pytest.mark.parametrize("fmt", sorted(OPENS))
def test_lazy_tool_grammar_lets_text_through_until_a_call_opens(engine, tokenizer, fmt):
    """tool_choice auto: free text first; once the output opens a call in the model's
    format, what follows must be a valid call to a listed tool."""
    text, triggers = _tool_constraint(fmt)
    assert triggers
    grammar = engine.grammars.new(text, triggers)
    try:
        assert _feed(grammar, tokenizer, "Sure, I can add { that } for you. ")  # before the trigger: anything
        assert _feed(grammar, tokenizer, OPENS[fmt])
        assert not grammar.allows(tokenizer.encode("hello", add_special=False)[0])
        assert _feed(grammar, tokenizer, HEADS[fmt])
        assert not _feed(grammar, tokenizer, '"x"')
    finally:
        grammar.close()


def test_llama3_bare_json_triggers_only_at_the_start(engine, tokenizer):
    text, triggers = _tool_constraint("llama3")
    late = engine.grammars.new(text, triggers)
    start = engine.grammars.new(text, triggers)
    try:
        assert _feed(late, tokenizer, 'Here: {"name": "x"} is plain JSON in text')
        assert _feed(start, tokenizer, ' {"name"')
        assert not _feed(start, tokenizer, ': "x"')  # now only "add" may follow
    finally:
        late.close()
        start.close()


@pytest.mark.parametrize("fmt", sorted(OPENS))
def test_forced_tool_grammar_accepts_what_the_parser_reads(engine, tokenizer, fmt):
    from demesne.gateway.tool_formats import FORMATS
    from demesne.gateway.tools import write_calls

    text, triggers = _tool_constraint(fmt, "required")
    assert triggers is None
    grammar = engine.grammars.new(text)
    try:
        assert not grammar.allows(tokenizer.encode("Sure", add_special=False)[0])
        key = FORMATS[fmt].args_key
        assert _feed(grammar, tokenizer, write_calls(FORMATS[fmt], [("add", {"a": 2})]).replace(f'"{key}": ', f'"{key}":'))
    finally:
        grammar.close()


@pytest.mark.parametrize("fmt", sorted(OPENS))
def test_a_trigger_fires_only_on_text_the_grammar_accepts(engine, tokenizer, fmt):
    """llama.cpp hands the grammar everything from the trigger's group on, and aborts the
    process if that does not fit. So a match must end inside an opener or a call's head: an
    opener that runs on into anything else (a token such as '>Paris') must not fire."""
    import re

    grammar_text, triggers = _tool_constraint(fmt)
    call = OPENS[fmt] + HEADS[fmt]
    fired = 0
    for lead in ("", "Sure. "):
        for cut in range(1, len(call) + 1):
            for tail in ("", "Paris", "\n", '"x'):
                output = lead + call[:cut] + tail
                # (Python's $ also matches before a final newline; ECMAScript's, llama.cpp's, does not)
                match = next((m for m in (re.search(t[:-1] + r"\Z", output) for t in triggers) if m), None)
                if match is None:
                    continue
                fired += 1
                grammar = engine.grammars.new(grammar_text)
                try:
                    assert _feed(grammar, tokenizer, output[match.start(1) :]), output
                finally:
                    grammar.close()
    assert fired


def test_a_lazy_grammar_can_trigger_on_a_token(engine, tokenizer):
    """Trigger tokens (an opener that is one token of the vocabulary): Gemma's
    <start_of_turn> stands in for Qwen's <tool_call>."""
    token = tokenizer.one_token("<start_of_turn>")
    assert token is not None and tokenizer.one_token("{") is None
    grammar = engine.grammars.new('root ::= "<start_of_turn>" "x"+', None, [token])
    try:
        assert _feed(grammar, tokenizer, "anything at all { <tool_call> ")
        grammar.accept(token)
        assert not grammar.allows(tokenizer.encode("hello", add_special=False)[0])
        assert _feed(grammar, tokenizer, "xx")
    finally:
        grammar.close()


def test_a_rejected_token_is_redrawn_from_the_likeliest_allowed_ones(engine, tokenizer):
    """The mask checks the row's likeliest tokens first (512, then 16,384) and the whole
    vocabulary only when none of those is allowed; either way only allowed tokens stay, with
    their logits."""
    from demesne.engine.grammar import STAGES

    grammar = engine.grammars.new('root ::= [0-9]+')
    try:
        digits = [tokenizer.one_token(d) or tokenizer.encode(d, add_special=False)[0] for d in "0123456789"]
        row = np.random.default_rng(0).standard_normal(tokenizer.n_vocab).astype(np.float32)
        masks, full = engine.grammars.masks, engine.grammars.full_masks
        row[digits] = row.min() - 1  # digits are the least likely: the whole vocabulary
        far = grammar.mask(row)
        assert engine.grammars.full_masks == full + 1
        assert set(digits) <= set(np.flatnonzero(np.isfinite(far)))
        row[digits[:3]] = row.max() + 1  # three digits among the likeliest
        near = grammar.mask(row)
        assert engine.grammars.masks == masks + 2 and engine.grammars.full_masks == full + 1
        kept = np.flatnonzero(np.isfinite(near))
        assert set(digits[:3]) <= set(kept) and len(kept) <= STAGES[0]
        assert np.array_equal(near[kept], row[kept])
        row[digits] = np.sort(row)[-STAGES[0] - 100]  # below the first stage, inside the second
        mid = grammar.mask(row)
        assert engine.grammars.full_masks == full + 1 and set(digits) <= set(np.flatnonzero(np.isfinite(mid)))
    finally:
        grammar.close()
