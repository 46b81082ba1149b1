"""Function calling without a model: validation, every output format's parser (whole and
streamed, split at every position), detection and rendering with templates that reproduce
each family's layout (tests/templates), and the grammars' shape."""

from __future__ import annotations

import json
import re

import pytest

from pathlib import Path

from demesne.gateway.chat_template import FALLBACK_TEMPLATE, ChatTemplate, TemplateError
from demesne.gateway.tool_formats import FORMATS, GENERIC, HERMES, LLAMA3, MISTRAL, MISTRAL_V11, detect, grammar, short_id
from demesne.gateway.tools import (
    ToolError,
    ToolStream,
    assistant_calls,
    call_constraint,
    legacy_call,
    legacy_history,
    parse_calls,
    parse_tools,
    template_messages,
    write_calls,
)

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


PARIS = ("get_weather", {"city": "Paris"})
ONE = ("add", {"a": 1})
# What each family's model writes: the content, then the calls.
SAMPLES = {
    "hermes": ("Let me check. ", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>', [PARIS, ONE]),
    "llama3": ("", '{"name": "get_weather", "parameters": {"city": "Paris"}}', [PARIS]),
    "llama3-tag": ("Checking. ", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}', [PARIS]),
    "mistral": ("", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "a1b2c3d4e"}, {"name": "add", "arguments": {"a": 1}, "id": "f5g6h7i8j"}]', [PARIS, ONE]),
    "mistral-v11": ("", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]add[CALL_ID]a1b2c3d4e[ARGS]{"a": 1}', [PARIS, ONE]),
    "generic": ("Let me check. ", '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"arguments": {"a": 1}, "name": "add"}]}', [PARIS, ONE]),
}


def fmt_of(sample: str):
    return FORMATS.get(sample) or FORMATS[sample.split("-")[0]]


def named(calls: list[dict]) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


@pytest.mark.parametrize("sample", sorted(SAMPLES))
def test_parse_splits_content_and_calls(sample):
    prefix, markup, expected = SAMPLES[sample]
    content, calls = parse_calls(prefix + markup, spec(), fmt_of(sample))
    assert content == (prefix.strip() or None)
    assert named(calls) == expected
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    assert len({c["id"] for c in calls}) == len(calls)


def stream(fmt, pieces: list[str], tools=None) -> tuple[str, dict[int, dict], list[dict]]:
    """Feed pieces to a ToolStream: (content, calls by index, every delta)."""
    s = ToolStream(tools or spec(), fmt)
    content, deltas = "", []
    for piece in pieces:
        text, more = s.feed(piece)
        content, deltas = content + text, deltas + more
    text, more = s.finish()
    content, deltas = content + text, deltas + more
    calls: dict[int, dict] = {}
    for d in deltas:
        if "id" in d:  # the first delta of a call: index, id, type, name
            assert d["index"] not in calls and d["type"] == "function" and d["function"]["arguments"] == ""
            calls[d["index"]] = {"id": d["id"], "name": d["function"]["name"], "arguments": ""}
        else:
            assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}
            calls[d["index"]]["arguments"] += d["function"]["arguments"]
    return content, calls, deltas


@pytest.mark.parametrize("sample", sorted(SAMPLES))
def test_streaming_at_every_split_never_leaks_markup(sample):
    prefix, markup, expected = SAMPLES[sample]
    text, fmt = prefix + markup, fmt_of(sample)
    splits = [[text[:cut], text[cut:]] for cut in range(1, len(text))] + [list(text)]
    for pieces in splits:
        content, calls, _ = stream(fmt, pieces)
        assert content == prefix, pieces
        assert sorted(calls) == list(range(len(expected)))
        assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == expected


@pytest.mark.parametrize("sample", sorted(SAMPLES))
def test_arguments_stream_in_pieces_as_they_are_written(sample):
    prefix, markup, expected = SAMPLES[sample]
    _, calls, deltas = stream(fmt_of(sample), list(prefix + markup))
    pieces = [d for d in deltas if "id" not in d and d["index"] == 0]
    assert len(pieces) > 3  # not one piece once the call is over
    assert calls[0]["arguments"] == json.dumps(expected[0][1])  # as the model wrote it


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_text_that_only_looks_like_markup_passes_through(fmt):
    text = 'No tools needed: 1 < 2, <b>bold</b>, [TOOL] {curly} {"tool": 1} [{"a": 1}] <tool_>'
    for pieces in ([text], list(text)):
        content, calls, _ = stream(FORMATS[fmt], pieces)
        assert content == text and calls == {}


def test_llama3_json_that_is_not_a_call_is_the_answer():
    for text in ('{"answer": 42}', '{"name": "nope", "parameters": {}}'):
        assert parse_calls(text, spec(), LLAMA3) == (text, [])
        assert stream(LLAMA3, list(text))[:2] == (text, {})
    # A bare object counts only at the start of the reply.
    late = 'Try {"name": "add", "parameters": {"a": 1}}'
    assert parse_calls(late, spec(), LLAMA3) == (late, [])


@pytest.mark.parametrize("fmt", [HERMES, MISTRAL, MISTRAL_V11, GENERIC])
def test_unknown_names_stay_text_and_parallel_false_takes_one(fmt):
    rm = write_calls(fmt, [("rm_rf", {"path": "/"})])
    assert parse_calls(rm, spec(), fmt) == (rm, [])
    both = write_calls(fmt, [PARIS, ONE])
    assert named(parse_calls(both, spec(parallel_tool_calls=False), fmt)[1]) == [PARIS]
    assert named(parse_calls(both, spec(), fmt)[1]) == [PARIS, ONE]


def test_arguments_in_another_key_order_or_as_a_string_still_parse():
    text = '<tool_call>{"arguments": "{\\"a\\": 3}", "name": "add"}</tool_call>'
    content, calls = parse_calls(text, spec(), HERMES)
    assert content is None and named(calls) == [("add", {"a": 3})]


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_a_call_cut_short_keeps_what_it_has_and_leaks_no_markup(fmt):
    full = ("<|python_tag|>" if fmt == "llama3" else "") + write_calls(FORMATS[fmt], [PARIS])  # not at the start
    cut = full[: full.index("Paris")]
    content, calls = parse_calls("Hi. " + cut, spec(), FORMATS[fmt])
    assert content == "Hi." and len(calls) == 1 and calls[0]["function"]["arguments"] == '{"city": "'
    opener_only = "".join(FORMATS[fmt].openers[0].parts) or "{"
    content, calls = parse_calls("Hi. " + opener_only, spec(), FORMATS[fmt])
    assert calls == [] and content.strip() in ("Hi.", "Hi. {")  # llama3's lone '{' is text


# -- detection and rendering ---------------------------------------------------------------

TEMPLATES = Path(__file__).parent / "templates"
FAMILIES = {"qwen25": HERMES, "hermes": HERMES, "llama31": LLAMA3, "mistral": MISTRAL, "mistral_v11": MISTRAL_V11}


def fixture(name: str) -> ChatTemplate:
    return ChatTemplate((TEMPLATES / f"{name}.jinja").read_text(), "<s>", "</s>", name)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_detection_from_the_template_text(name):
    assert detect(fixture(name).source) is FAMILIES[name]
    assert fixture(name).supports_tools


def test_templates_without_tools_get_the_generic_format():
    assert detect(FALLBACK_TEMPLATE) is GENERIC and detect(None) is GENERIC
    gemma_like = "{% for m in messages %}<start_of_turn>{{ m.role }}\n{{ m.content }}<end_of_turn>\n{% endfor %}"
    assert detect(gemma_like) is GENERIC and not ChatTemplate(gemma_like, "", "", "x").supports_tools


def conversation(call_id: str = "call_0123456789abcdef") -> list[dict]:
    raw_call = {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    return [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": assistant_calls({"tool_calls": [raw_call]}, "messages[2]")},
        {"role": "tool", "content": '{"temp": 21}', "tool_call_id": call_id},
    ]


# Where each family's assistant turn begins, and the markers its layout must show.
LAYOUT = {
    "qwen25": ("<|im_start|>assistant", ["<tools>", "<tool_call>\n{\"name\": \"get_weather\"", "<tool_response>\n{\"temp\": 21}"]),
    "hermes": ("<|im_start|>assistant", ["<tools>", "<|im_start|>tool\n<tool_response>"]),
    "llama31": ("<|start_header_id|>assistant<|end_header_id|>\n\n", ["Environment: ipython", '"parameters": {"city": "Paris"}', "<|start_header_id|>ipython<|end_header_id|>"]),
    "mistral": ("[/INST]", ["[AVAILABLE_TOOLS]", "[TOOL_CALLS][", "[TOOL_RESULTS]"]),
    "mistral_v11": ("[/INST]", ["[AVAILABLE_TOOLS]", '[TOOL_CALLS]get_weather[CALL_ID]', '[ARGS]{"city": "Paris"}', "[TOOL_CONTENT]"]),
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_tools_calls_and_results_render_through_the_family_template(name):
    template, fmt = fixture(name), FAMILIES[name]
    messages = template_messages(conversation(), [WEATHER], fmt, template.supports_tools)
    text = template.render(messages, tools=[WEATHER], add_generation_prompt=False)
    turn, markers = LAYOUT[name]
    for marker in markers:
        assert marker in text
    # What the template wrote for the earlier call is what the parser reads back.
    assistant = text.rsplit(turn, 1)[1]
    assert named(parse_calls(assistant, spec(), fmt)[1]) == [PARIS]


@pytest.mark.parametrize("name, fmt, shows", [("mistral", MISTRAL, ['"id": "{}"', '"call_id": "{}"']), ("mistral_v11", MISTRAL_V11, ["[CALL_ID]{}[ARGS]", "[TOOL_RESULTS]{}[TOOL_CONTENT]"])])
def test_mistral_call_ids_are_shortened_the_same_way_everywhere(name, fmt, shows):
    template = fixture(name)
    with pytest.raises(TemplateError, match="length 9"):  # the family's own check
        template.render(conversation(), tools=[WEATHER])
    text = template.render(template_messages(conversation(), [WEATHER], fmt, True), tools=[WEATHER])
    short = short_id("call_0123456789abcdef")
    assert len(short) == 9 and short.isalnum()
    for shown in shows:
        assert shown.format(short) in text


def test_a_template_without_tools_is_told_about_them_in_the_system_turn():
    template = ChatTemplate(FALLBACK_TEMPLATE, "<bos>", "<eos>", "fallback")
    messages = template_messages(conversation(), [WEATHER], GENERIC, template.supports_tools)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"].startswith("Be brief.\n\nYou can call these functions:\n")
    assert '{"tool_calls": [{"name": "<function name>", "arguments": <arguments object>}]}' in messages[0]["content"]
    assert messages[2]["content"] == '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}'
    assert messages[3]["content"] == 'Tool result (get_weather): {"temp": 21}'
    text = template.render(messages)
    assert named(parse_calls(text.split("Assistant: ")[1].split("\n")[0], spec(), GENERIC)[1]) == [PARIS]


def test_tool_results_merge_into_one_user_turn_for_alternating_templates():
    messages = conversation() + [{"role": "user", "content": "Thanks"}]
    roles = [m["role"] for m in template_messages(messages, None, GENERIC, False)]
    assert roles == ["system", "user", "assistant", "user"]


# -- the grammar -----------------------------------------------------------------------------


def _args_schemas(text: str) -> list[dict]:
    return [json.loads(line.split("%json ", 1)[1]) for line in text.splitlines() if "%json" in line]


def test_forcing_grammar_names_only_allowed_tools():
    text, lazy = call_constraint(spec(tool_choice={"type": "function", "function": {"name": "add"}}), HERMES)
    assert not lazy and '"\\"add\\""' in text and "get_weather" not in text
    text, lazy = call_constraint(spec(tool_choice="required"), LLAMA3)
    assert not lazy and "get_weather" in text and '"\\"parameters\\""' in text


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("lazy", [False, True])
def test_grammar_follows_the_format(fmt, lazy):
    import llguidance

    f = FORMATS[fmt]
    text = grammar(f, [WEATHER], 4, lazy=lazy)
    for part in [p for o in f.openers for p in o.parts] + list(f.closer):
        assert json.dumps(part) in text or re.escape(part).replace("/", "\\/") in text
    assert ("{0,3}" in text) == (f.max_calls > 1)  # Llama 3.x templates take one call a turn
    assert ("[lazy]" in text) == lazy and text.startswith("%llguidance {}")
    error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text)
    assert not error, messages


def test_each_tool_keeps_its_own_defs_and_forced_schemas_are_strict():
    def nested(name, field):
        params = {"$defs": {"P": {"type": "object", "properties": {field: {"type": "integer"}}}}, "type": "object", "properties": {"p": {"$ref": "#/$defs/P"}}}
        return {"type": "function", "function": {"name": name, "parameters": params}}

    tools = parse_tools({"tools": [nested("f", "x"), nested("g", "y")], "tool_choice": "required"})
    schemas = _args_schemas(call_constraint(tools, GENERIC)[0])
    assert [list(s["$defs"]["P"]["properties"]) for s in schemas] == [["x"], ["y"]]
    assert all(s["x-guidance"]["lenient"] is False for s in schemas)
    auto = _args_schemas(call_constraint(parse_tools({"tools": [nested("f", "x")]}), GENERIC)[0])
    assert auto[0]["x-guidance"]["lenient"] is True  # a call the model may make: unknown keywords ignored


def test_openers_that_are_one_token_trigger_by_token():
    """A vocabulary with the opener as one token (Qwen's <tool_call>) opens a run on that
    token; the spelled-out text still does too. A bare '{' never is one (generic, Llama's
    JSON): those open on text alone, Llama's bare JSON only at the start."""
    vocab = {"<tool_call>": 151657, "<|python_tag|>": 128010, "[TOOL_CALLS]": 5, "{": 90}
    for name, fmt in FORMATS.items():
        text, lazy = call_constraint(spec(), fmt, vocab.get)
        start = next(line for line in text.splitlines() if line.startswith("start:"))
        tokens = [t for t in vocab.values() if f"TEXT <[{t}]>" in start]
        assert lazy and tokens == {"hermes": [151657], "llama3": [128010], "mistral": [5], "mistral-v11": [5], "generic": []}[name]
        assert start.count("head") == len(fmt.openers)
    bare = next(line for line in call_constraint(spec(), LLAMA3)[0].splitlines() if line.startswith("head0"))
    assert bare.startswith("head0[lazy]: /[ \\t\\n]*/")


def test_the_cli_offers_every_format():
    from demesne.config import TOOL_FORMATS

    assert TOOL_FORMATS == ("auto", *FORMATS)


@pytest.mark.parametrize(
    "calls, param",
    [
        ("x", "messages[1].tool_calls"),
        (["oops"], "messages[1].tool_calls[0]"),
        ([{"id": "a", "type": "function"}], "messages[1].tool_calls[0]"),
        ([{"id": 5, "type": "function", "function": {"name": "w", "arguments": "{}"}}], "messages[1].tool_calls[0].id"),
        ([{"id": "a", "type": "function", "function": {"name": 3, "arguments": "{}"}}], "messages[1].tool_calls[0].function.name"),
    ],
)
def test_malformed_assistant_calls_are_refused(calls, param):
    with pytest.raises(ToolError) as info:
        assistant_calls({"tool_calls": calls}, "messages[1]")
    assert info.value.param == param


def test_assistant_call_arguments_are_taken_leniently():
    def args(value):
        call = {"id": "a", "type": "function", "function": {"name": "w", "arguments": value}}
        return assistant_calls({"tool_calls": [call]}, "m")[0]["function"]["arguments"]

    assert args('{"c": 1}') == {"c": 1} and args({"c": 1}) == {"c": 1} and args("") == {}
    assert args('{"c": ') == '{"c": '  # cut short earlier: passed on as written


@pytest.mark.parametrize(
    "tool, param",
    [
        ({"type": "function", "function": {"name": "w", "description": 5}}, "tools[0].function.description"),
        ({"type": "function", "function": {"name": "w", "strict": "yes"}}, "tools[0].function.strict"),
        ({"type": "function", "function": {"name": "w", "parameters": {"type": "object", "properties": []}}}, "tools[0].function.parameters"),
        (WEATHER, "tools[1].function.name"),  # the same name twice
    ],
)
def test_more_bad_tools(tool, param):
    with pytest.raises(ToolError) as info:
        parse_tools({"tools": [WEATHER, tool] if tool is WEATHER else [tool]})
    assert info.value.param == param


def test_legacy_function_turns_become_tool_turns():
    history = legacy_history([
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
        {"role": "function", "name": "get_weather", "content": "21"},
        {"role": "function", "name": "get_weather", "content": "again"},  # answers nothing now
    ])
    assert history[1]["tool_calls"] == [{"id": "call_fn1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]
    assert history[2] == {"role": "tool", "content": "21", "tool_call_id": "call_fn1"}
    assert history[3]["tool_call_id"] is None
    legacy = parse_tools({"functions": [WEATHER["function"]], "function_call": "auto"})
    assert legacy.legacy and not legacy.parallel and legacy.choice == "auto"
    assert legacy_call({"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}) == {"name": "f", "arguments": ""}
    assert legacy_call({"index": 0, "function": {"arguments": '{"a'}}) == {"arguments": '{"a'}


def test_a_forced_call_cut_inside_its_opener_leaves_no_content():
    """required: the grammar allowed only markup, so a reply cut after '{"tool_ca' is not text."""
    forced = spec(tool_choice="required")
    assert parse_calls(' {"tool_ca', forced, GENERIC) == (None, [])
    assert parse_calls(' {"tool_ca', spec(), GENERIC) == (' {"tool_ca', [])  # auto: it may be text
    assert stream(GENERIC, list(' {"tool_ca'), forced) == ("", {}, [])


# --- hostile input (issue 9) -------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, param",
    [
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": ["get_weather"]}}}, "tool_choice.function.name"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": {"a": 1}}}}, "tool_choice.function.name"),
        ({"functions": [WEATHER["function"]], "function_call": {"name": ["get_weather"]}}, "tool_choice.function.name"),
        ({"tools": [{**WEATHER, "function": {**WEATHER["function"], "name": f"f{i}"}} for i in range(129)]}, "tools"),
        ({"functions": [{"name": f"f{i}"} for i in range(129)]}, "functions"),
    ],
)
def test_hostile_tools(body, param):
    """Names given as lists were a TypeError (unhashable) and a 500."""
    with pytest.raises(ToolError) as info:
        parse_tools(body)
    assert info.value.param == param


def test_only_the_function_fields_openai_defines_reach_the_template():
    nested: list = []
    for _ in range(900):  # would be a RecursionError in the template's tojson
        nested = [nested]
    tool = {"type": "function", "function": {**WEATHER["function"], "description": "d", "x-extra": nested}}
    got = parse_tools({"tools": [tool]}).tools[0]["function"]
    assert set(got) == {"name", "description", "parameters"}


def call_with(arguments):
    call = {"id": "a", "type": "function", "function": {"name": "w", "arguments": arguments}}
    return assistant_calls({"tool_calls": [call]}, "messages[1]")[0]["function"]["arguments"]


def test_deep_argument_text_is_passed_through_as_text():
    """'[' * 100000 as a history call's arguments was a RecursionError in json.loads (a 500)."""
    for text in ("[" * 100_000, "[" * 65 + "]" * 65, '{"a": ' * 5000 + "1" + "}" * 5000):
        assert call_with(text) == text
    shallow = "[" * 60 + "]" * 60
    assert call_with(shallow) == json.loads(shallow)
    assert call_with('{"s": "' + "[" * 1000 + '"}') == {"s": "[" * 1000}  # brackets in strings do not count


def test_deep_argument_objects_are_refused():
    deep_args: dict = {}
    for _ in range(100):
        deep_args = {"a": deep_args}
    with pytest.raises(ToolError) as info:
        call_with(deep_args)
    assert info.value.param == "messages[1].tool_calls[0].function.arguments"


def test_deep_json_from_the_model_is_no_call():
    """The model can write brackets as deep as it likes: parsing its call must not recurse away."""
    spec_ = parse_tools({"tools": [WEATHER]})
    text = '{"tool_calls": [{"name": "get_weather", "arguments": ' + "[" * 3000 + "]" * 3000 + "}]}"
    content, calls = parse_calls(text, spec_, GENERIC)
    assert calls == []
    args = '{"name": "get_weather", "arguments": "' + "[" * 3000 + "]" * 3000 + '"}'
    assert parse_calls('{"tool_calls": [' + args + "]}", spec_, GENERIC)[1] == []
