"""End to end with the official ``openai`` SDK's ``client.responses`` against /v1/responses on
the bundled model (issue 11): plain, streamed, a forced function call and its output round
trip, previous_response_id continuation (served from the prefix cache), json_schema output,
retrieval and errors."""

from __future__ import annotations

import json

import openai
import pytest

from test_e2e_api import openai_client
from test_e2e_tools import WEATHER as CHAT_WEATHER

pytestmark = pytest.mark.e2e

WEATHER = {"type": "function", **CHAT_WEATHER["function"]}  # the Responses API's flat function tool
ASK = "What is the weather in Paris?"


async def test_a_response_is_the_chat_completion_in_responses_shape(server, model_id):
    client = openai_client(server)
    chat_kw = dict(model=model_id, max_tokens=12, temperature=0,
                   messages=[{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name three colours."}])
    await client.chat.completions.create(**chat_kw)  # the prompt is cached for both (see test_e2e_anthropic.py)
    resp = await client.responses.create(
        model=model_id, instructions="Answer briefly.", input="Name three colours.", max_output_tokens=12, temperature=0
    )
    chat = await client.chat.completions.create(**chat_kw)
    assert resp.object == "response" and resp.id.startswith("resp_") and resp.model == model_id
    assert resp.status in ("completed", "incomplete") and resp.output[0].type == "message"
    assert resp.output_text == chat.choices[0].message.content
    assert resp.usage.input_tokens == chat.usage.prompt_tokens and resp.usage.output_tokens == chat.usage.completion_tokens
    if resp.status == "incomplete":
        assert resp.incomplete_details.reason == "max_output_tokens"


def _check_event_order(events) -> None:
    """One streamed response's events in OpenAI's order, numbered, and its text deltas adding
    up to the final response's text."""
    kinds = [e.type for e in events]
    final = events[-1].response
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed" if final.status == "completed" else "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas and deltas == final.output_text


async def test_streamed_events_come_in_openais_order(server, model_id):
    """Each stream checked against itself: a greedy reply may differ between two requests at a
    near tie, since speculation verifies drafts in batch shapes that depend on the engine's
    state (README: Reproducible outputs; CI once saw "Paris, France." then "Paris.")."""
    client = openai_client(server)
    kw = dict(model=model_id, input=ASK, max_output_tokens=16, temperature=0)
    await client.responses.create(**{**kw, "max_output_tokens": 1})  # cached from here on
    whole = await client.responses.create(**kw)
    assert whole.output_text and whole.status in ("completed", "incomplete")
    _check_event_order([e async for e in await client.responses.create(stream=True, **kw)])
    async with client.responses.stream(**kw) as stream:  # the SDK's helper, which parses every event
        _check_event_order([e async for e in stream])


@pytest.mark.parametrize("stream", [False, True])
async def test_a_forced_function_call_and_its_output_round_trip(server, model_id, stream):
    client = openai_client(server)
    kw = dict(model=model_id, input=ASK, tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"},
              parallel_tool_calls=False, max_output_tokens=64, temperature=0)
    if stream:
        events = [e async for e in await client.responses.create(stream=True, **kw)]
        args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
        done = [e for e in events if e.type == "response.function_call_arguments.done"]
        assert len(done) == 1 and done[0].arguments == args
        resp = events[-1].response
    else:
        resp = await client.responses.create(**kw)
    calls = [item for item in resp.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and resp.status == "completed"
    args = json.loads(calls[0].arguments)
    assert set(args) == {"city", "unit"} and args["unit"] in ("c", "f")
    answer = await client.responses.create(
        model=model_id, previous_response_id=resp.id, tools=[WEATHER], max_output_tokens=8, temperature=0,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "18 degrees, sunny"}],
    )
    assert answer.status in ("completed", "incomplete")
    assert answer.usage.input_tokens_details.cached_tokens >= resp.usage.input_tokens - 1


async def test_previous_response_id_continues_from_the_cache(server, model_id):
    client = openai_client(server)
    first = await client.responses.create(
        model=model_id, input="Here is a long story. " * 40 + "Summarise it.", max_output_tokens=8, temperature=0
    )
    second = await client.responses.create(model=model_id, previous_response_id=first.id, input="Shorter, please.", max_output_tokens=8)
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens > first.usage.input_tokens
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens - 1
    assert (await client.responses.retrieve(first.id)).output_text == first.output_text
    with pytest.raises(openai.NotFoundError):
        await client.responses.create(model=model_id, previous_response_id="resp_nope", input="Hi", max_output_tokens=2)


async def test_json_schema_output_follows_the_schema(server, model_id):
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}, "count": {"type": "integer"}},
              "required": ["colour", "count"], "additionalProperties": False}
    resp = await openai_client(server).responses.create(
        model=model_id, input="Pick a colour and a count.", max_output_tokens=40, temperature=0,
        text={"format": {"type": "json_schema", "name": "pick", "schema": schema, "strict": True}},
    )
    out = json.loads(resp.output_text)
    assert out["colour"] in ("red", "green", "blue") and isinstance(out["count"], int)


@pytest.mark.parametrize("kw,param", [
    ({}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0]"),
    ({"input": "Hi", "tools": [{"type": "web_search"}]}, "tools[0]"),
    ({"input": "Hi", "text": {"format": {"type": "yaml"}}}, "text.format"),
])
async def test_bad_requests_get_400_naming_the_field(server, model_id, kw, param):
    with pytest.raises(openai.BadRequestError) as err:
        await openai_client(server).responses.create(model=model_id, max_output_tokens=2, **kw)
    assert err.value.body["param"] == param


async def test_the_openai_agents_sdk_runs_an_agent_with_a_function_tool(server, model_id):
    """The OpenAI Agents SDK on its default path (the Responses API), unmodified: the model
    is made to call the tool (the bundled base model would not choose to), the SDK runs it
    and, told to stop at the first tool, returns its output."""
    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)  # no export to OpenAI from a test
    seen = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        seen.append(city)
        return f"18 degrees and sunny in {city}"

    agent = Agent(
        name="weather", instructions="Answer with the weather tool.", tools=[get_weather],
        model=OpenAIResponsesModel(model=model_id, openai_client=openai_client(server)),
        model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=64, parallel_tool_calls=False),
        tool_use_behavior="stop_on_first_tool",
    )
    result = await Runner.run(agent, ASK)
    assert len(seen) == 1 and isinstance(seen[0], str)
    assert result.final_output == f"18 degrees and sunny in {seen[0]}"
