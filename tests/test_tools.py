"""Function-calling pieces: validation, parsing, the streaming hold-back, the forcing grammar."""

from __future__ import annotations

import json

import pytest

from demesne.gateway.tools import CLOSE, OPEN, ToolError, ToolStream, call_grammar, parse_calls, parse_tools

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}}


def spec(**body):
    return parse_tools({"tools": [WEATHER, ADD], **body})


def test_tool_choice_forms():
    assert spec().choice == "auto" and spec().parallel
    assert spec(tool_choice="required").forced
    named = spec(tool_choice={"type": "function", "function": {"name": "add"}})
    assert named.choice == "named" and named.named == "add" and named.forced
    assert not spec(tool_choice="none").forced
    assert parse_tools({}) is None


def test_legacy_functions_map_onto_tools():
    got = parse_tools({"functions": [WEATHER["function"]], "function_call": {"name": "get_weather"}})
    assert got.names == {"get_weather"} and got.choice == "named"


@pytest.mark.parametrize(
    "body, param",
    [
        ({"tools": [{"type": "function", "function": {}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]}, "tools[0].function.parameters"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": []}, "tools"),
        ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ],
)
def test_bad_tools(body, param):
    with pytest.raises(ToolError) as info:
        parse_tools(body)
    assert info.value.param == param


def call_text(name="get_weather", **args) -> str:
    return f'{OPEN}{json.dumps({"name": name, "arguments": args})}{CLOSE}'


def test_parse_calls_splits_content_and_calls():
    text = "Let me check. " + call_text(city="Paris") + "\n" + call_text("add", a=1)
    content, calls = parse_calls(text, spec())
    assert content == "Let me check."
    assert [c["function"]["name"] for c in calls] == ["get_weather", "add"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    assert len({c["id"] for c in calls}) == 2


def test_parse_calls_respects_parallel_false_and_unknown_names():
    text = call_text(city="A") + call_text(city="B")
    assert len(parse_calls(text, spec(parallel_tool_calls=False))[1]) == 1
    content, calls = parse_calls(call_text("rm_rf"), spec())
    assert calls == [] and content == call_text("rm_rf")


def test_a_call_cut_short_never_becomes_content():
    text = call_text(city="Paris") + OPEN + '{"name": "add", "argum'
    content, calls = parse_calls(text, spec())
    assert len(calls) == 1 and content is None


@pytest.mark.parametrize("prefix", ["", "Sure. "])
def test_streaming_holds_markup_back_at_every_split(prefix):
    text = prefix + call_text(city="Paris") + call_text("add", a=2)
    for cut in range(1, len(text)):
        stream = ToolStream(spec())
        sent = stream.feed(text[:cut]) + stream.feed(text[cut:])
        rest, calls = stream.finish()
        assert OPEN not in sent and "<" not in sent.replace(prefix, "")
        assert sent + rest == prefix or (sent + rest).strip() == prefix.strip()
        assert [c["function"]["name"] for c in calls] == ["get_weather", "add"]


def test_streaming_plain_text_passes_through_whole():
    text = "No tools needed: 1 < 2 and <b>bold</b>."
    stream = ToolStream(spec())
    sent = "".join(stream.feed(ch) for ch in text)
    rest, calls = stream.finish()
    assert sent + rest == text and calls == []


def test_forcing_grammar_names_only_allowed_tools():
    seen = {}

    def fake_gbnf(schema):
        seen["schema"] = schema
        return 'root ::= "{}"\n'

    grammar = call_grammar(spec(tool_choice={"type": "function", "function": {"name": "add"}}), fake_gbnf)
    assert seen["schema"]["properties"]["name"] == {"const": "add"}
    assert "call ::=" in grammar and f'root ::= "{OPEN}" call "{CLOSE}"' in grammar
    call_grammar(spec(tool_choice="required"), fake_gbnf)
    assert [v["properties"]["name"]["const"] for v in seen["schema"]["oneOf"]] == ["get_weather", "add"]
