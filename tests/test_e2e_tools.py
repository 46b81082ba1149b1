"""End to end with the openai client: tools on the bundled base model (the generic format)."""

from __future__ import annotations

import json

import openai
import pytest

from conftest import API_KEY

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
    assert message.content is None or "<tool_call>" not in message.content
    for call in message.tool_calls:
        assert call.id.startswith("call_") and call.type == "function"
        check_call(call.function.name, call.function.arguments)
    if isinstance(choice, dict):
        assert {c.function.name for c in message.tool_calls} == {"get_weather"} and len(message.tool_calls) == 1


async def test_forced_calls_stream_as_deltas(server, model_id):
    stream = await client(server).chat.completions.create(
        model=model_id, messages=ASK, tools=[WEATHER, ADD], tool_choice="required", max_tokens=200, temperature=0, stream=True
    )
    calls: dict[int, dict] = {}
    content, finish = "", None
    async for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for d in choice.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                if d.id:
                    assert call["id"] is None and d.type == "function" and d.function.name
                    call["id"], call["name"] = d.id, d.function.name
                call["arguments"] += d.function.arguments or ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls" and calls and "<tool_call>" not in content
    assert sorted(calls) == list(range(len(calls)))  # parallel calls, indexed from 0
    for call in calls.values():
        check_call(call["name"], call["arguments"])


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
    ],
)
async def test_bad_tool_input_is_400(server, model_id, kwargs, param):
    body = {"model": model_id, "messages": ASK, "max_tokens": 5, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        await client(server).chat.completions.create(**body)
    assert info.value.body["param"] == param
