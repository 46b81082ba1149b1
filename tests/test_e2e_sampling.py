"""End to end with the official client: the sampling fields and logprobs as OpenAI shapes them."""

from __future__ import annotations

import math

import openai
import pytest

from conftest import API_KEY

pytestmark = pytest.mark.e2e


def client(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0)


MESSAGES = [{"role": "user", "content": "Name three colours."}]


async def test_chat_logprobs_shape(server, model_id):
    out = await client(server).chat.completions.create(
        model=model_id, messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    # exactly, though the fallback template's reply drops the space the model writes first
    assert "".join(c.token for c in content) == out.choices[0].message.content
    for item in content:
        assert item.logprob <= 0 and bytes(item.bytes).decode("utf-8", "replace") == item.token
        assert len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob >= item.top_logprobs[2].logprob
        assert math.isclose(item.top_logprobs[0].logprob, item.logprob)  # greedy: the best one


async def test_chat_logprobs_streamed(server, model_id):
    stream = await client(server).chat.completions.create(
        model=model_id, messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True, stream=True
    )
    tokens = []
    async for chunk in stream:
        for choice in chunk.choices:
            if choice.logprobs and choice.logprobs.content:
                tokens += [c.token for c in choice.logprobs.content]
                assert all(c.top_logprobs == [] for c in choice.logprobs.content)
    assert len(tokens) == 5


@pytest.mark.parametrize("stream", [False, True])
async def test_chat_logprobs_spell_exactly_the_content(server, model_id, stream):
    contents = ["Name three colours.", "Write a haiku about rain.", "What is 2+2?", "List two fruits, one per line."]
    for content in contents:
        kw = dict(model=model_id, messages=[{"role": "user", "content": content}], max_tokens=12, logprobs=True, seed=7)
        if not stream:
            out = await client(server).chat.completions.create(**kw)
            text, tokens = out.choices[0].message.content, out.choices[0].logprobs.content
        else:
            text, tokens = "", []
            async for chunk in await client(server).chat.completions.create(**kw, stream=True):
                for choice in chunk.choices:
                    text += choice.delta.content or ""
                    tokens += choice.logprobs.content if choice.logprobs and choice.logprobs.content else []
        assert "".join(t.token for t in tokens) == text, content
        assert b"".join(bytes(t.bytes) for t in tokens) == text.encode(), content


async def test_every_sampling_field_is_accepted(server, model_id):
    c = client(server)
    common = dict(
        model=model_id,
        max_tokens=6,
        temperature=0.7,
        top_p=0.9,
        seed=11,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        logit_bias={"9": -100},
        stop=["\n\n"],
        user="tester",
        extra_body={"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1},
    )
    chat = await c.chat.completions.create(messages=MESSAGES, max_completion_tokens=6, **{k: v for k, v in common.items() if k != "max_tokens"})
    assert chat.choices[0].finish_reason in ("stop", "length")
    stream = await c.completions.create(prompt="Once upon a time", stream=True, stream_options={"include_usage": True}, **common)
    chunks = [x async for x in stream]
    assert chunks[-1].usage.completion_tokens <= 6
    assert chat.system_fingerprint and chunks[0].system_fingerprint


async def test_logit_bias_steers_the_api(server, model_id):
    c = client(server)
    forced = await c.completions.create(
        model=model_id, prompt="My favourite fruit is", max_tokens=3, temperature=0, logit_bias={"236743": 100}, logprobs=1
    )
    assert len(set(forced.choices[0].logprobs.tokens)) == 1


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"logit_bias": {"1": 500}}, "logit_bias"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"extra_body": {"min_p": 2}}, "min_p"),
    ],
)
async def test_bad_sampling_fields_are_400(server, model_id, extra, param):
    body = dict(model=model_id, messages=MESSAGES, max_tokens=2, **extra)
    with pytest.raises(openai.BadRequestError) as info:
        await client(server).chat.completions.create(**body)
    assert info.value.body["param"] == param


@pytest.mark.parametrize("stop, kept", [(", 7", " 5, 6"), ("6, 7", " 5, ")])
async def test_logprobs_stop_where_the_text_stops(server, model_id, stop, kept):
    """A stop string's tokens (held back while it might match, then cut) get no logprobs,
    streamed or not: the tokens always spell exactly the text."""
    kw = dict(model=model_id, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, logprobs=2, stop=[stop])
    out = await client(server).completions.create(**kw)
    choice = out.choices[0]
    assert choice.finish_reason == "stop" and choice.text == kept
    assert "".join(choice.logprobs.tokens) == choice.text
    assert len(choice.logprobs.top_logprobs) == len(choice.logprobs.tokens) == len(choice.logprobs.text_offset)
    text, tokens = "", []
    async for chunk in await client(server).completions.create(**kw, stream=True):
        for c in chunk.choices:
            text += c.text
            if c.logprobs:
                tokens += c.logprobs.tokens
                assert "".join(tokens) == text  # never ahead of the text
    assert text == choice.text and "".join(tokens) == text
