"""End to end with the official ``anthropic`` SDK, unmodified, against /v1/messages on the
bundled model (issue 11): plain, streamed, forced tool_use, a tool_result round trip,
count_tokens, stop sequences, cached tokens and Anthropic's error shapes."""

from __future__ import annotations

import json

import aiohttp
import anthropic
import pytest

from conftest import API_KEY
from test_e2e_api import openai_client
from test_e2e_tools import WEATHER as CHAT_WEATHER

pytestmark = pytest.mark.e2e

_F = CHAT_WEATHER["function"]
WEATHER = {"name": _F["name"], "description": _F["description"], "input_schema": _F["parameters"]}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
GREEDY = {"extra_body": {"temperature": 0.0}}  # (SDK 2.x has no temperature argument; older ones send it as a field)


def client(server, key: str = API_KEY) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=server.url, api_key=key, max_retries=0)


def check_weather(block) -> None:
    assert block.type == "tool_use" and block.name == "get_weather" and block.id
    assert set(block.input) == {"city", "unit"} and isinstance(block.input["city"], str) and block.input["unit"] in ("c", "f")


async def test_a_message_is_the_chat_completion_in_anthropic_shape(server, model_id):
    """The same conversation as a chat completion gives the same prompt and, greedy, the same
    reply. (Each is sent after a first chat completion has cached the prompt: a cold prefill
    and a cached prompt compute the last position in batches of other shapes, which can part
    a near tie; shared/LLAMA_FACTS.md.)"""
    chat_kw = dict(
        model=model_id, max_tokens=12, temperature=0,
        messages=[{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name three colours."}],
    )
    await openai_client(server).chat.completions.create(**chat_kw)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Name three colours."}]}]
    msg = await client(server).messages.create(
        model=model_id, max_tokens=12, system="Answer briefly.", messages=messages, **GREEDY
    )
    assert msg.type == "message" and msg.role == "assistant" and msg.id.startswith("msg_")
    assert msg.model == model_id and msg.stop_reason in ("end_turn", "max_tokens") and msg.stop_sequence is None
    assert [b.type for b in msg.content] == ["text"]
    chat = await openai_client(server).chat.completions.create(**chat_kw)
    assert msg.content[0].text == chat.choices[0].message.content
    u = msg.usage
    assert u.input_tokens + u.cache_read_input_tokens == chat.usage.prompt_tokens
    assert u.output_tokens == chat.usage.completion_tokens and u.cache_creation_input_tokens == 0


async def test_streamed_events_come_in_anthropics_order(server, model_id):
    c = client(server)
    await c.messages.create(model=model_id, max_tokens=1, messages=ASK, **GREEDY)  # cached from here on (as above)
    whole = await c.messages.create(model=model_id, max_tokens=16, messages=ASK, **GREEDY)
    events = [e async for e in await c.messages.create(model=model_id, max_tokens=16, messages=ASK, stream=True, **GREEDY)]
    kinds = [e.type for e in events if e.type != "ping"]  # (the SDK may pass pings on or not)
    assert kinds[:2] == ["message_start", "content_block_start"] and kinds[-2:] == ["message_delta", "message_stop"]
    assert set(kinds[2:-3]) == {"content_block_delta"} and kinds[-3] == "content_block_stop"
    assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == whole.content[0].text
    assert events[-2].delta.stop_reason == whole.stop_reason and events[-2].usage.output_tokens == whole.usage.output_tokens
    async with c.messages.stream(model=model_id, max_tokens=16, messages=ASK, **GREEDY) as stream:
        final = await stream.get_final_message()
    assert final.content[0].text == whole.content[0].text


@pytest.mark.parametrize("stream", [False, True])
async def test_a_forced_tool_use_and_its_result_round_trip(server, model_id, stream):
    c = client(server)
    kw = dict(model=model_id, max_tokens=64, tools=[WEATHER], tool_choice={"type": "tool", "name": "get_weather"}, **GREEDY)
    if stream:
        async with c.messages.stream(messages=ASK, **kw) as s:
            msg = await s.get_final_message()
    else:
        msg = await c.messages.create(messages=ASK, **kw)
    assert msg.stop_reason == "tool_use"
    calls = [b for b in msg.content if b.type == "tool_use"]
    assert len(calls) == 1
    check_weather(calls[0])
    history = ASK + [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in msg.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": calls[0].id, "content": "18 degrees, sunny"}]},
    ]
    answer = await c.messages.create(model=model_id, max_tokens=16, messages=history, tools=[WEATHER], **GREEDY)
    assert answer.type == "message" and answer.stop_reason in ("end_turn", "max_tokens", "tool_use")
    # The result is in the prompt: counting with and without it differs by its tokens.
    without = await c.messages.count_tokens(model=model_id, messages=history[:-1] + [{"role": "user", "content": "ok"}], tools=[WEATHER])
    with_result = await c.messages.count_tokens(model=model_id, messages=history, tools=[WEATHER])
    assert with_result.input_tokens > without.input_tokens


async def test_streamed_tool_use_sends_its_input_as_json_deltas(server, model_id):
    events = [e async for e in await client(server).messages.create(
        model=model_id, max_tokens=64, messages=ASK, tools=[WEATHER],
        tool_choice={"type": "any", "disable_parallel_tool_use": True}, stream=True, **GREEDY
    )]
    starts = [e for e in events if e.type == "content_block_start" and e.content_block.type == "tool_use"]
    assert len(starts) == 1
    index = starts[0].index
    partial = "".join(e.delta.partial_json for e in events if e.type == "content_block_delta" and e.index == index)
    args = json.loads(partial)
    assert set(args) == {"city", "unit"}
    assert [e for e in events if e.type == "message_delta"][0].delta.stop_reason == "tool_use"


async def test_count_tokens_is_the_prompt_a_message_sends(server, model_id):
    c = client(server)
    counted = await c.messages.count_tokens(model=model_id, system="Be brief.", messages=ASK)
    msg = await c.messages.create(model=model_id, max_tokens=2, system="Be brief.", messages=ASK, **GREEDY)
    assert counted.input_tokens == msg.usage.input_tokens + msg.usage.cache_read_input_tokens > 0


async def test_a_stop_sequence_is_reported(server, model_id):
    c = client(server)
    ask = [{"role": "user", "content": "Count: 1, 2, 3, 4,"}]
    free = await c.messages.create(model=model_id, max_tokens=24, messages=ask, **GREEDY)
    text = free.content[0].text
    words = text.split()
    if len(words) < 3:
        pytest.skip(f"the model's reply is too short to cut: {text!r}")
    stop = words[1]
    cut = await c.messages.create(model=model_id, max_tokens=24, messages=ask, stop_sequences=[stop, "zzzz"], **GREEDY)
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert cut.content == [] or cut.content[0].text == text[: text.index(stop)]


async def test_a_resent_conversation_reports_its_cached_tokens(server, model_id):
    c = client(server)
    system = "You are a careful assistant. " * 40
    first = await c.messages.create(model=model_id, max_tokens=8, system=system, messages=ASK, **GREEDY)
    history = ASK + [{"role": "assistant", "content": first.content[0].text if first.content else "?"},
                     {"role": "user", "content": "And in Rome?"}]
    second = await c.messages.create(model=model_id, max_tokens=8, system=system, messages=history, **GREEDY)
    assert second.usage.cache_read_input_tokens >= 200


@pytest.mark.parametrize("body,status,kind", [
    ({"messages": ASK}, 400, "invalid_request_error"),  # no max_tokens
    ({"max_tokens": 4, "messages": []}, 400, "invalid_request_error"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, 400, "invalid_request_error"),
    ({"max_tokens": 4, "messages": ASK, "tool_choice": {"type": "sometimes"}}, 400, "invalid_request_error"),
    ({"max_tokens": 4, "messages": ASK, "model": "no-such-model"}, 404, "not_found_error"),
])
async def test_errors_have_anthropics_shape(server, model_id, body, status, kind):
    headers = {"x-api-key": API_KEY, "anthropic-version": "2023-06-01"}
    async with aiohttp.ClientSession() as http, http.post(
        f"{server.url}/v1/messages", json={"model": model_id, **body}, headers=headers
    ) as r:
        out = await r.json()
    assert r.status == status and out["type"] == "error" and out["error"]["type"] == kind and out["error"]["message"]


async def test_the_sdk_raises_its_own_errors(server, model_id):
    with pytest.raises(anthropic.AuthenticationError) as bad_key:
        await client(server, "wrong-key").messages.create(model=model_id, max_tokens=4, messages=ASK)
    assert bad_key.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.NotFoundError):
        await client(server).messages.create(model="no-such-model", max_tokens=4, messages=ASK)
    with pytest.raises(anthropic.BadRequestError):
        await client(server).messages.create(model=model_id, max_tokens=0, messages=ASK)
