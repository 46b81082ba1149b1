"""End to end with the openai client: tools on the bundled base model, in the generic format
(its own: it has no chat template) and in each family's format (gateways given the family
templates of tests/templates, which the format is detected from)."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest

from conftest import API_KEY, Server

pytestmark = pytest.mark.e2e

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"], "additionalProperties": False},
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def client(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0)


MARKUP = ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>", '"tool_calls"', '{"name"')


def no_markup(content: str | None) -> bool:
    return not any(m in (content or "") for m in MARKUP)


def check_call(name: str, arguments: str) -> None:
    args = json.loads(arguments)
    if name == "get_weather":
        assert set(args) == {"city", "unit"} and isinstance(args["city"], str) and args["unit"] in ("c", "f")
    else:
        assert name == "add" and set(args) == {"a", "b"} and all(isinstance(v, int) for v in args.values())


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
async def test_forced_calls_parse_and_match_the_schema(server, model_id, choice):
    out = await client(server).chat.completions.create(
        model=model_id, messages=ASK, tools=[WEATHER, ADD], tool_choice=choice, max_tokens=200, temperature=0
    )
    message = out.choices[0].message
    assert out.choices[0].finish_reason == "tool_calls" and message.tool_calls
    assert no_markup(message.content)
    for call in message.tool_calls:
        assert call.id.startswith("call_") and call.type == "function"
        check_call(call.function.name, call.function.arguments)
    if isinstance(choice, dict):
        assert {c.function.name for c in message.tool_calls} == {"get_weather"} and len(message.tool_calls) == 1


async def streamed_calls(stream) -> tuple[str, str | None, dict[int, dict]]:
    """(content, finish reason, calls by index with how many argument pieces each came in)."""
    calls: dict[int, dict] = {}
    content, finish = "", None
    async for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for d in choice.delta.tool_calls or []:
                if d.id:  # the first delta of a call
                    assert d.index not in calls and d.type == "function" and d.function.name
                    calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": "", "pieces": 0}
                elif d.function.arguments:
                    calls[d.index]["arguments"] += d.function.arguments
                    calls[d.index]["pieces"] += 1
            finish = choice.finish_reason or finish
    return content, finish, calls


async def test_forced_calls_stream_as_deltas(server, model_id):
    stream = await client(server).chat.completions.create(
        model=model_id, messages=ASK, tools=[WEATHER, ADD], tool_choice="required", max_tokens=200, temperature=0, stream=True
    )
    content, finish, calls = await streamed_calls(stream)
    assert finish == "tool_calls" and calls and no_markup(content)
    assert sorted(calls) == list(range(len(calls)))  # parallel calls, indexed from 0
    for call in calls.values():
        check_call(call["name"], call["arguments"])
        assert call["pieces"] > 1  # the arguments stream as the model writes them


async def test_parallel_calls_when_the_grammar_forces_them(server, model_id, tokenizer):
    """Banning every token that could close the list of calls leaves the grammar only the
    comma: the model must keep calling until the grammar's limit (4) closes the list."""
    closing = [i for i in range(tokenizer.n_vocab) if tokenizer.piece(i).lstrip(b" \t\n").startswith(b"]")]
    out = await client(server).chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": "Add 1 and 2, then 3 and 4."}], tools=[ADD, WEATHER],
        tool_choice="required", max_tokens=300, temperature=0, logit_bias={str(i): -100 for i in closing},
    )
    calls = out.choices[0].message.tool_calls
    assert out.choices[0].finish_reason == "tool_calls" and len(calls) == 4
    assert len({c.id for c in calls}) == 4
    for call in calls:
        check_call(call.function.name, call.function.arguments)
    single = await client(server).chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": "Add 1 and 2, then 3 and 4."}], tools=[ADD, WEATHER],
        tool_choice="required", max_tokens=300, temperature=0, logit_bias={str(i): -100 for i in closing},
        parallel_tool_calls=False,
    )
    assert len(single.choices[0].message.tool_calls) == 1


async def test_round_trip_call_result_answer(server, model_id):
    c = client(server)
    first = await c.chat.completions.create(
        model=model_id, messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=120, temperature=0, parallel_tool_calls=False
    )
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "clear"})},
    ]
    answer = await c.chat.completions.create(model=model_id, messages=history, tools=[WEATHER], max_tokens=30, temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert answer.usage.prompt_tokens > first.usage.prompt_tokens


@pytest.mark.parametrize("max_tokens", [3, 12])  # cut inside the opener, then inside the call
async def test_a_call_cut_short_finishes_with_length(server, model_id, max_tokens):
    for stream in (False, True):
        out = await client(server).chat.completions.create(
            model=model_id, messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=max_tokens, temperature=0, stream=stream
        )
        if stream:
            content, finish, _ = await streamed_calls(out)
        else:
            content, finish = out.choices[0].message.content, out.choices[0].finish_reason
        assert finish == "length" and no_markup(content) and not content


async def test_legacy_functions_answer_with_function_call(server, model_id):
    """Asked with the legacy functions/function_call, the answer is the legacy shape too:
    message.function_call and finish_reason function_call, streamed as delta.function_call;
    and a legacy history (function_call, then a function message) renders."""
    c = client(server)
    kw = dict(model=model_id, messages=ASK, functions=[WEATHER["function"]], function_call={"name": "get_weather"}, max_tokens=60, temperature=0)
    out = await c.chat.completions.create(**kw)
    message = out.choices[0].message
    assert out.choices[0].finish_reason == "function_call" and message.tool_calls is None
    check_call(message.function_call.name, message.function_call.arguments)
    name, arguments, finish = "", "", None
    async for chunk in await c.chat.completions.create(**kw, stream=True):
        for choice in chunk.choices:
            assert choice.delta.tool_calls is None
            if choice.delta.function_call:
                name += choice.delta.function_call.name or ""
                arguments += choice.delta.function_call.arguments or ""
            finish = choice.finish_reason or finish
    assert finish == "function_call"
    check_call(name, arguments)
    history = ASK + [
        {"role": "assistant", "content": None, "function_call": {"name": name, "arguments": arguments}},
        {"role": "function", "name": name, "content": json.dumps({"temperature": 21})},
    ]
    answer = await c.chat.completions.create(model=model_id, messages=history, functions=[WEATHER["function"]], max_tokens=10, temperature=0)
    assert answer.usage.prompt_tokens > out.usage.prompt_tokens


def few_shot() -> list[dict]:
    """Two earlier exchanges in which the assistant called get_weather with unit "c"."""
    history = []
    for city, call_id in (("Oslo", "call_a1"), ("Lima", "call_b2")):
        call = {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": city, "unit": "c"})}}
        history += [
            {"role": "user", "content": f"What is the weather in {city}?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call_id, "content": '{"temperature": 20}'},
            {"role": "assistant", "content": f"It is 20 degrees in {city}."},
        ]
    return history + [{"role": "user", "content": "What is the weather in Rome?"}]


async def test_auto_call_is_kept_valid_by_the_lazy_grammar(server, model_id):
    """auto: the base model, following its history, opens a call by itself; from there the
    lazy grammar holds it to the schema offered now, which allows only unit "k" where the
    history shows "c"."""
    kelvin = json.loads(json.dumps(WEATHER))
    kelvin["function"]["parameters"]["properties"]["unit"] = {"enum": ["k"]}
    for stream in (False, True):
        out = await client(server).chat.completions.create(
            model=model_id, messages=few_shot(), tools=[kelvin], max_tokens=60, temperature=0, stream=stream
        )
        if stream:
            content, finish, calls = await streamed_calls(out)
            calls = [(c["name"], c["arguments"]) for c in calls.values()]
        else:
            message, finish = out.choices[0].message, out.choices[0].finish_reason
            content, calls = message.content, [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
        assert finish == "tool_calls" and no_markup(content)
        assert [(name, json.loads(args)) for name, args in calls] == [("get_weather", {"city": "Rome", "unit": "k"})]


async def test_tool_choice_none_returns_text(server, model_id):
    out = await client(server).chat.completions.create(
        model=model_id, messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=12, temperature=0
    )
    assert out.choices[0].message.tool_calls is None and out.choices[0].finish_reason != "tool_calls"


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, "tools[0].function.parameters"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "missing"}}}, "tool_choice"),
        (
            {"tools": [WEATHER], "messages": ASK + [{"role": "tool", "tool_call_id": "call_nowhere", "content": "21"}]},
            "messages[1].tool_call_id",
        ),
        (  # was a 500: a malformed call in the history
            {"tools": [WEATHER], "messages": ASK + [{"role": "assistant", "content": None, "tool_calls": ["oops"]}]},
            "messages[1].tool_calls[0]",
        ),
        (  # a call that cannot be enforced is refused rather than left to chance
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"p": {"$ref": "https://example.com/p.json"}}}}}], "tool_choice": "required"},
            "tools",
        ),
    ],
)
async def test_bad_tool_input_is_400(server, model_id, kwargs, param):
    body = {"model": model_id, "messages": ASK, "max_tokens": 5, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        await client(server).chat.completions.create(**body)
    assert info.value.body["param"] == param


# -- each family's format, detected from its template ------------------------------------------

TEMPLATES = Path(__file__).parent / "templates"
FAMILIES = ["hermes", "llama31", "mistral", "mistral_v11", "qwen25", "fallback-as-mistral"]
# What the raw output of a forced call holds in each family's format.
WRITES = {"hermes": "<tool_call>", "llama31": '"parameters": ', "mistral": "[TOOL_CALLS][", "mistral_v11": "[ARGS]{", "qwen25": "<tool_call>"}
WRITES["fallback-as-mistral"] = WRITES["mistral"]


def family_args(name: str) -> list[str]:
    if name == "fallback-as-mistral":  # no template with tools: --tool-format picks the markup
        return ["--tool-format", "mistral"]
    return ["--chat-template", str(TEMPLATES / f"{name}.jinja")]


@pytest.fixture(scope="module")
def families(processes, server) -> dict[str, Server]:
    """A gateway per family template on the shared engine (the format is detected), and one
    told the format on the command line."""
    out = {}
    for name in FAMILIES:
        proc, url = processes.gateway([server.engine_endpoint], "--api-key", API_KEY, *family_args(name))
        out[name] = Server(url, server.engine_endpoint, server.engine, proc)
    return out


@pytest.mark.parametrize("family", FAMILIES)
async def test_family_format_forced_call_round_trip(families, model_id, family):
    """required: the call comes out in the family's markup (the grammar), parses, matches
    the schema, streams its arguments in pieces, and goes back through the family's
    template as history (Mistral's 9-character ids included)."""
    c = client(families[family])
    first = await c.chat.completions.create(
        model=model_id, messages=ASK, tools=[WEATHER, ADD], tool_choice="required", max_tokens=150, temperature=0,
        parallel_tool_calls=False, logprobs=True,
    )
    raw = "".join(t.token for t in first.choices[0].logprobs.content)  # the tokens as generated
    assert WRITES[family] in raw  # the format detected from the template
    message = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls" and len(message.tool_calls) == 1 and no_markup(message.content), raw
    call = message.tool_calls[0]
    check_call(call.function.name, call.function.arguments)

    stream = await c.chat.completions.create(
        model=model_id, messages=ASK, tools=[WEATHER, ADD], tool_choice="required", max_tokens=150, temperature=0,
        parallel_tool_calls=False, stream=True,
    )
    content, finish, calls = await streamed_calls(stream)
    assert finish == "tool_calls" and no_markup(content) and len(calls) == 1
    check_call(calls[0]["name"], calls[0]["arguments"])  # (not compared with the first: a cached prefix may flip a near-tie)
    assert calls[0]["pieces"] > 1

    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})},
    ]
    answer = await c.chat.completions.create(model=model_id, messages=history, tools=[WEATHER, ADD], max_tokens=20, temperature=0)
    assert answer.usage.prompt_tokens > first.usage.prompt_tokens
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.parametrize("family", ["llama31", "qwen25"])
async def test_family_named_call_and_none(families, model_id, family):
    c = client(families[family])
    named = await c.chat.completions.create(
        model=model_id, messages=ASK, tools=[WEATHER, ADD], tool_choice={"type": "function", "function": {"name": "add"}}, max_tokens=100, temperature=0
    )
    calls = named.choices[0].message.tool_calls
    assert [x.function.name for x in calls] == ["add"]
    check_call("add", calls[0].function.arguments)
    plain = await c.chat.completions.create(model=model_id, messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=10, temperature=0)
    assert plain.choices[0].message.tool_calls is None
