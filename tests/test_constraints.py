"""Constrained decoding on llguidance (engine/constraints.py), on the real vocabulary: the
grammars the gateway writes, masks and redraws, errors that end one request, and fuzzing
that must never take the engine down."""

from __future__ import annotations

import json
from concurrent.futures import Future

import jsonschema
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from demesne.engine.constraints import Constraint, GrammarError
from demesne.gateway.structured import output_grammar
from demesne.gateway.tool_formats import FORMATS
from demesne.gateway.tools import call_constraint, parse_tools, write_calls
from demesne.protocol import MAX_GRAMMAR_RULES, Error, Generate, SamplingParams

from conftest import make_engine

ADD_TOOL = {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}
OPENS = {"hermes": "<tool_call>", "llama3": "<|python_tag|>", "mistral": "[TOOL_CALLS][", "mistral-v11": "[TOOL_CALLS]", "generic": '{"tool_calls": ['}
# How a call to "add" goes on after the opener.
HEADS = {fmt: ' {"name": "add"' for fmt in OPENS} | {"mistral-v11": 'add[ARGS]{"a"'}


@pytest.fixture(scope="module")
def engine(model_path):
    engine = make_engine(model_path)
    yield engine
    engine.close()
    engine.runner.close()


def constraint(engine, grammar: str, lazy: bool = False) -> Constraint:
    made = engine.constraints.compile(grammar, lazy)
    return made.result(timeout=120) if isinstance(made, Future) else made


def schema_grammar(schema: dict) -> str:
    return output_grammar({"response_format": {"type": "json_schema", "json_schema": {"schema": schema}}})[0]


def tool_grammar(fmt: str, choice: str = "auto", one_token=lambda text: None) -> tuple[str, bool]:
    return call_constraint(parse_tools({"tools": [ADD_TOOL], "tool_choice": choice}), FORMATS[fmt], one_token)


def feed(c: Constraint, tokenizer, text: str) -> bool:
    """Whether the matcher takes all of ``text`` (what it takes, it keeps)."""
    ids = tokenizer.encode(text, add_special=False)
    return c.matcher.try_consume_tokens(ids) == len(ids)


def one(tokenizer, text: str) -> int:
    return tokenizer.encode(text, add_special=False)[0]


# -- the grammars the gateway writes ------------------------------------------------------------


def test_json_never_lets_a_raw_newline_into_a_string(engine, tokenizer):
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    for body in ({"response_format": {"type": "json_schema", "json_schema": {"schema": schema}}}, {"response_format": {"type": "json_object"}}):
        c = constraint(engine, output_grammar(body)[0])
        assert feed(c, tokenizer, '{"name":"Fred')
        assert c.matcher.validate_tokens([one(tokenizer, "\n")]) == 0
        assert c.matcher.validate_tokens([one(tokenizer, '"')]) == 1


@pytest.mark.parametrize("fmt", sorted(OPENS))
def test_lazy_tool_grammar_lets_text_through_until_a_call_opens(engine, tokenizer, fmt):
    grammar, lazy = tool_grammar(fmt)
    assert lazy
    c = constraint(engine, grammar, lazy)
    assert not c.hot  # nothing is masked ahead while the model writes text
    assert feed(c, tokenizer, "Sure, I can add { that } for you. ")
    assert c.matcher.is_accepting()  # text alone is a whole reply
    assert feed(c, tokenizer, OPENS[fmt])
    assert c.matcher.validate_tokens([one(tokenizer, "hello")]) == 0
    assert feed(c, tokenizer, HEADS[fmt])
    assert not feed(c, tokenizer, '"x"')


def test_llama3_bare_json_opens_a_call_only_at_the_start(engine, tokenizer):
    grammar, lazy = tool_grammar("llama3")
    late = constraint(engine, grammar, lazy)
    assert feed(late, tokenizer, 'I think {"name": "anything goes here"} is fine.')
    start = constraint(engine, grammar, lazy)
    assert feed(start, tokenizer, ' {"name": ')
    assert not feed(start, tokenizer, '"other"')


@pytest.mark.parametrize("fmt", sorted(OPENS))
def test_forced_tool_grammar_accepts_what_the_parser_reads(engine, tokenizer, fmt):
    grammar, lazy = tool_grammar(fmt, "required")
    c = constraint(engine, grammar, lazy)
    assert not lazy and c.hot
    assert c.matcher.validate_tokens([one(tokenizer, "Sure")]) == 0
    key = FORMATS[fmt].args_key
    assert feed(c, tokenizer, write_calls(FORMATS[fmt], [("add", {"a": 2})]).replace(f'"{key}": ', f'"{key}":'))
    assert c.matcher.is_accepting()


def test_a_lazy_grammar_opens_a_call_on_a_token(engine, tokenizer):
    """An opener that is one token of the vocabulary: Gemma's <start_of_turn> stands in for
    Qwen's <tool_call>."""
    token = tokenizer.one_token("<start_of_turn>")
    assert token is not None
    grammar, lazy = tool_grammar("hermes", one_token=lambda text: token if text == "<tool_call>" else None)
    c = constraint(engine, grammar, lazy)
    assert feed(c, tokenizer, "anything at all { <tool_ ")
    assert c.matcher.consume_token(token)
    assert c.matcher.validate_tokens([one(tokenizer, "hello")]) == 0
    assert feed(c, tokenizer, HEADS["hermes"])


# -- masks and redraws --------------------------------------------------------------------------


def test_a_refused_token_is_redrawn_from_the_allowed_ones(engine, tokenizer):
    """A hot row's mask is computed ahead; a refused sample sets every refused token of the
    row to -inf (allowed ones keep their logits) and is drawn again."""
    cons = engine.constraints
    c = constraint(engine, output_grammar({"guided_regex": "[0-9]+"})[0])
    digits = [one(tokenizer, d) for d in "0123456789"]
    row = np.random.default_rng(0).standard_normal(tokenizer.n_vocab).astype(np.float32)
    original = row.copy()
    cons.start_masks([(3, c)])
    cons.wait()
    best = int(row.argmax())
    assert best not in digits
    redrawn = []
    token = cons.pick(3, c, best, row, lambda: redrawn.append(int(row.argmax())) or redrawn[-1])
    assert token in digits and redrawn == [token]
    kept = np.flatnonzero(np.isfinite(row))  # the digits, and the byte tokens that spell them
    assert set(digits) <= set(kept) and np.array_equal(row[kept], original[kept])
    assert all(tokenizer.decode([int(t)]).isdigit() for t in kept)
    cons.start_masks([(3, c)])
    cons.wait()
    assert cons.pick(3, c, digits[7], row, lambda: pytest.fail("an allowed token is kept")) == digits[7]


def test_a_cold_row_computes_no_mask_until_refused(engine, tokenizer):
    cons = engine.constraints
    grammar, lazy = tool_grammar("generic")
    c = constraint(engine, grammar, lazy)
    before = cons.masked_rows
    row = np.zeros(tokenizer.n_vocab, np.float32)
    for token in tokenizer.encode("Sure, here you go", add_special=False):
        cons.start_masks([(0, c)])
        cons.wait()
        assert cons.pick(0, c, token, row, lambda: pytest.fail("nothing refused")) == token
    assert cons.masked_rows == before and not c.hot
    assert feed(c, tokenizer, ' {"tool_calls": [')
    word = one(tokenizer, "hello")
    allowed = one(tokenizer, " {")
    row[allowed] = 5.0
    assert cons.pick(0, c, word, row, lambda: int(row.argmax())) == allowed
    assert c.hot and cons.masked_rows == before + 1


# -- in the engine ------------------------------------------------------------------------------


def run(engine, reqs: list[Generate]) -> dict[str, list[int] | Error]:
    out: dict[str, list[int] | Error] = {}
    for req in reqs:
        error = engine.submit(b"t", req)
        out[req.rid] = error if error is not None else []
    while engine.has_work:
        for _client, msg in engine.step():
            if isinstance(msg, Error):
                out[msg.rid] = msg
            else:
                out[msg.rid].extend(msg.tokens)
    return out


PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 120}, "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}},
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


def test_constrained_requests_beside_free_ones_give_valid_json(engine, tokenizer):
    prompt = tokenizer.encode("A person as JSON: ")
    grammar = schema_grammar(PERSON)
    reqs = [Generate(f"j{i}", prompt, 80, SamplingParams(temperature=1.0, seed=i, grammar=grammar)) for i in range(4)]
    reqs.append(Generate("free", prompt, 20, SamplingParams(temperature=1.0, seed=9)))
    out = run(engine, reqs)
    for i in range(4):
        value = json.loads(tokenizer.decode(out[f"j{i}"]))
        jsonschema.validate(value, PERSON)
    assert len(out["free"]) == 20


def test_a_keyword_llguidance_cannot_enforce_is_refused_naming_it(engine, tokenizer):
    grammar = schema_grammar({"type": "object", "properties": {"a": {"not": {"type": "string"}}}})
    params = SamplingParams(grammar=grammar, grammar_param="response_format")
    out = run(engine, [Generate("not", tokenizer.encode("x"), 4, params), Generate("ok", tokenizer.encode("x"), 4, SamplingParams())])
    error = out["not"]
    assert isinstance(error, Error) and error.status == 400 and error.code == "invalid_grammar"
    assert error.param == "response_format" and '"not"' in error.message
    assert len(out["ok"]) == 4
    again = run(engine, [Generate("not2", tokenizer.encode("x"), 4, params)])["not2"]  # from the cache: at once
    assert isinstance(again, Error) and again.message == error.message


def test_too_many_rules_are_refused_before_compiling(engine, tokenizer):
    grammar = "start: r0\n" + "\n".join(f'r{i}: r{i + 1} | "x"' for i in range(MAX_GRAMMAR_RULES + 1)) + '\nr_end: "y"'
    error = engine.submit(b"t", Generate("rules", tokenizer.encode("x"), 4, SamplingParams(grammar=grammar)))
    assert error is not None and error.status == 400 and "rules" in error.message
    with pytest.raises(GrammarError):
        engine.constraints.compile(grammar, False)


def _chain(n: int) -> dict:
    defs = {f"d{i}": {"type": "object", "properties": {"x": {"$ref": f"#/$defs/d{i + 1}"}}} for i in range(n)}
    return defs | {f"d{n}": {"type": "string"}}


@pytest.mark.parametrize(
    "grammar",
    [
        "start: " + "(" * 30000 + '"a"' + ")" * 30000,  # llguidance refuses past its nesting limit
        "start: r0\n" + "\n".join(f'r{i}: r{i + 1} | "x"' for i in range(MAX_GRAMMAR_RULES - 1)) + f'\nr{MAX_GRAMMAR_RULES - 1}: "y"',
        json.dumps({"grammars": [{"json_schema": {"$defs": _chain(1999), "$ref": "#/$defs/d0"}}]}),
    ],
    ids=["nested-groups", "chain-of-rules", "chain-of-refs"],
)
def test_grammars_deep_enough_to_overflow_a_default_stack_do_not(engine, tokenizer, grammar):
    """A chain of 5,000 rules or 1,000 $refs overflowed llguidance's compiler on an 8 MiB
    stack (a segfault). The compile thread's stack holds the longest chains the engine
    takes: each compiles, or is refused with an error."""
    try:
        constraint(engine, grammar)
    except GrammarError:
        pass
    out = run(engine, [Generate("alive", tokenizer.encode("x"), 2, SamplingParams())])
    assert len(out["alive"]) == 2


def test_a_request_aborted_while_its_grammar_compiles_is_forgotten(engine, tokenizer):
    grammar = schema_grammar({"type": "object", "properties": {"fresh": {"type": "integer"}}})  # not cached yet
    assert engine.submit(b"t", Generate("gone", tokenizer.encode("x"), 4, SamplingParams(grammar=grammar))) is None
    assert engine.compiling and engine.has_work
    engine.abort(b"t", "gone")
    assert not engine.compiling and not engine.by_rid
    while engine.has_work:
        assert engine.step() == []


def test_a_grammar_that_fails_mid_output_ends_only_its_request(engine, tokenizer):
    grammar = schema_grammar(PERSON)
    prompt = tokenizer.encode("A person as JSON: ")
    for rid in ("broken", "fine"):
        assert engine.submit(b"t", Generate(rid, prompt, 40, SamplingParams(temperature=0.0, grammar=grammar))) is None
    while "broken" not in [s.rid for s in engine.scheduler.running] or engine.compiling:
        engine.step()
    broken = engine.by_rid[b"t", "broken"].constraint.matcher
    broken.consume_token(one(tokenizer, "hello"))  # as if llguidance had failed inside
    assert broken.is_error()
    out: dict[str, list] = {"broken": [], "fine": []}
    while engine.has_work:
        for _client, msg in engine.step():
            out[msg.rid].append(msg)
    assert isinstance(out["broken"][-1], Error) and out["broken"][-1].code == "grammar_failed"
    assert out["fine"][-1].finish is not None and not any(isinstance(m, Error) for m in out["fine"])


# -- fuzzing ------------------------------------------------------------------------------------

_KEYWORDS = [
    "type", "properties", "items", "required", "enum", "const", "anyOf", "oneOf", "allOf", "not", "$ref", "$defs",
    "additionalProperties", "patternProperties", "pattern", "format", "minLength", "maxLength", "minimum", "maximum",
    "exclusiveMinimum", "multipleOf", "minItems", "maxItems", "prefixItems", "uniqueItems", "contains", "if", "then",
    "x-guidance", "minProperties", "dependentRequired",
]
_TYPES = st.sampled_from(["object", "array", "string", "integer", "number", "boolean", "null", "bogus"])
_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8) | _TYPES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10,
)
_SCHEMAS = st.recursive(
    st.fixed_dictionaries({"type": _TYPES}) | st.just({}) | st.just({"$ref": "#"}) | st.just({"$ref": "#/$defs/x"}),
    lambda inner: st.dictionaries(
        st.sampled_from(_KEYWORDS), inner | _VALUES | st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_size=5
    ),
    max_leaves=25,
)
_GRAMMAR_TEXT = st.text(alphabet='start:|()[]{}*+?"/\\ab%json<>\n ~&.-0123456789,=', max_size=80)
_TOKENS = st.lists(st.integers(0, 262143), min_size=1, max_size=24)


def _exercise(engine, grammar: str, lazy: bool, tokens: list[int]) -> None:
    """Compile ``grammar`` and drive its matcher with ``tokens`` through the engine's own
    paths; whatever happens must be a GrammarError, an int or None: no other exception."""
    try:
        c = constraint(engine, grammar, lazy)
    except GrammarError:
        return
    cons = engine.constraints
    row = np.zeros(cons.n_vocab, np.float32)
    for token in tokens:
        cons.start_masks([(0, c)])
        cons.wait()
        got = cons.pick(0, c, token, row, lambda: int(np.argmax(row)))
        if got is None:
            assert c.error()
            return
        assert 0 <= got < cons.n_vocab
        row[:] = 0.0


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@FUZZ
@given(schema=_SCHEMAS, tokens=_TOKENS, lazy=st.booleans())
def test_fuzz_random_schemas_never_abort(engine, schema, tokens, lazy):
    try:
        grammar = schema_grammar(schema)
    except Exception as exc:  # the gateway's 400s (ApiError); nothing else
        assert type(exc).__name__ == "ApiError", exc
        return
    _exercise(engine, grammar, lazy, tokens)


@FUZZ
@given(text=_GRAMMAR_TEXT, tokens=_TOKENS, kind=st.sampled_from(["grammar", "guided_regex"]))
def test_fuzz_random_grammars_and_regexes_never_abort(engine, text, tokens, kind):
    try:
        made = output_grammar({kind: text})
    except Exception as exc:
        assert type(exc).__name__ == "ApiError", exc
        return
    _exercise(engine, made[0], False, tokens)


@FUZZ
@given(tokens=_TOKENS, fmt=st.sampled_from(sorted(OPENS)), choice=st.sampled_from(["auto", "required"]))
def test_fuzz_random_tokens_into_tool_grammars_never_abort(engine, tokens, fmt, choice):
    grammar, lazy = tool_grammar(fmt, choice)
    _exercise(engine, grammar, lazy, tokens)


def test_the_engine_still_serves_after_the_fuzzing(engine, tokenizer):
    out = run(engine, [Generate("after", tokenizer.encode("A person as JSON: "), 60, SamplingParams(temperature=0.0, grammar=schema_grammar(PERSON)))])
    jsonschema.validate(json.loads(tokenizer.decode(out["after"])), PERSON)
