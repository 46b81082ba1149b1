"""Reasoning split out end to end (issue 11): gateways on the shared engine with templates in
DeepSeek R1's layout (the prompt opens <think>, so the reply starts inside it) and Qwen 3's
(enable_thinking through chat_template_kwargs). The bundled base model never writes
</think>, so under R1's template its whole reply is reasoning: that is what is checked on
chat (whole and streamed), Messages and Responses; splitting at every chunk boundary and a
tool call after the block are unit-tested in test_reasoning.py."""

from __future__ import annotations

from pathlib import Path

import anthropic
import pytest

from conftest import API_KEY
from test_e2e_api import openai_client

pytestmark = pytest.mark.e2e

TEMPLATES = Path(__file__).parent / "templates"
ASK = [{"role": "user", "content": "What is 2 + 2?"}]


class Gateway:
    def __init__(self, url: str):
        self.url, self.v1 = url, f"{url}/v1"


@pytest.fixture(scope="module")
def r1(processes, server):
    _, url = processes.gateway([server.engine_endpoint], "--api-key", API_KEY, "--chat-template", str(TEMPLATES / "deepseek_r1.jinja"))
    return Gateway(url)


@pytest.fixture(scope="module")
def qwen3(processes, server):
    _, url = processes.gateway([server.engine_endpoint], "--api-key", API_KEY, "--chat-template", str(TEMPLATES / "qwen3.jinja"))
    return Gateway(url)


async def test_chat_puts_the_reasoning_in_reasoning_content(r1, model_id):
    client = openai_client(r1)
    kw = dict(model=model_id, messages=ASK, max_tokens=8, temperature=0)
    await client.chat.completions.create(**{**kw, "max_tokens": 1})  # cached from here on
    whole = await client.chat.completions.create(**kw)
    message = whole.choices[0].message
    reasoning = message.model_extra["reasoning_content"]
    assert reasoning and message.content == "" and whole.usage.completion_tokens == 8
    chunks = [c async for c in await client.chat.completions.create(stream=True, **kw)]
    streamed = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks if c.choices)
    assert streamed == reasoning
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


async def test_reasoning_format_none_leaves_it_in_the_content(processes, server, model_id):
    _, url = processes.gateway([server.engine_endpoint], "--api-key", API_KEY, "--reasoning-format", "none",
                               "--chat-template", str(TEMPLATES / "deepseek_r1.jinja"))
    out = await openai_client(Gateway(url)).chat.completions.create(model=model_id, messages=ASK, max_tokens=8, temperature=0)
    assert out.choices[0].message.content and "reasoning_content" not in (out.choices[0].message.model_extra or {})


async def test_enable_thinking_false_through_chat_template_kwargs(qwen3, model_id, http):
    body = {"model": model_id, "messages": ASK, "chat_template_kwargs": {"enable_thinking": False}}
    async with http.post(f"{qwen3.url}/apply-template", json=body) as r:
        prompt = (await r.json())["prompt"]
    assert prompt.rstrip().endswith("</think>")  # the template closed the (empty) block itself
    async with http.post(f"{qwen3.url}/apply-template", json={**body, "chat_template_kwargs": {}}) as r:
        assert "<think>" not in (await r.json())["prompt"]
    async with http.post(f"{qwen3.url}/apply-template", json={**body, "chat_template_kwargs": {"messages": []}}) as r:
        assert r.status == 400 and (await r.json())["error"]["param"] == "chat_template_kwargs"


async def test_messages_and_responses_carry_reasoning_in_their_own_shapes(r1, model_id):
    await openai_client(r1).chat.completions.create(model=model_id, messages=ASK, max_tokens=1)  # the prompt is cached (see above)
    a = anthropic.AsyncAnthropic(base_url=r1.url, api_key=API_KEY, max_retries=0)
    msg = await a.messages.create(model=model_id, max_tokens=8, messages=ASK, extra_body={"temperature": 0})
    assert [b.type for b in msg.content] == ["thinking"] and msg.content[0].thinking
    events = [e async for e in await a.messages.create(model=model_id, max_tokens=8, messages=ASK, stream=True, extra_body={"temperature": 0})]
    assert "".join(e.delta.thinking for e in events if e.type == "content_block_delta") == msg.content[0].thinking
    o = openai_client(r1)
    resp = await o.responses.create(model=model_id, input="What is 2 + 2?", max_output_tokens=8, temperature=0)
    assert resp.output[0].type == "reasoning" and resp.output[0].content[0].text
    events = [e async for e in await o.responses.create(model=model_id, input="What is 2 + 2?", max_output_tokens=8, temperature=0, stream=True)]
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == resp.output[0].content[0].text


async def test_thinking_off_from_the_messages_and_responses_fields(qwen3, model_id):
    """Anthropic's thinking {type: disabled} and Responses' reasoning {effort: none} reach the
    template as enable_thinking false: Qwen 3's then adds its closed empty block to the prompt."""
    a = anthropic.AsyncAnthropic(base_url=qwen3.url, api_key=API_KEY, max_retries=0)
    on = await a.messages.count_tokens(model=model_id, messages=ASK)
    off = await a.messages.count_tokens(model=model_id, messages=ASK, thinking={"type": "disabled"})
    assert off.input_tokens > on.input_tokens
    o = openai_client(qwen3)
    kw = dict(model=model_id, input="What is 2 + 2?", max_output_tokens=1)
    plain = await o.responses.create(**kw)
    none = await o.responses.create(reasoning={"effort": "none"}, **kw)
    assert none.usage.input_tokens == off.input_tokens > plain.usage.input_tokens == on.input_tokens


@pytest.mark.parametrize("stream", [False, True])
async def test_a_reasoning_budget_ends_the_block_and_the_model_answers(r1, model_id, stream):
    """R1's prompt opens the block and the base model never closes it: with a budget of 4
    tokens the block is closed for it and the rest of max_tokens is the answer."""
    kw = dict(model=model_id, messages=ASK, max_tokens=12, temperature=0, extra_body={"reasoning_budget": 4})
    client = openai_client(r1)
    if stream:
        chunks = [c async for c in await client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw)]
        reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks if c.choices)
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        usage = chunks[-1].usage
    else:
        out = await client.chat.completions.create(**kw)
        reasoning, content, usage = out.choices[0].message.model_extra["reasoning_content"], out.choices[0].message.content, out.usage
    assert reasoning.strip() and content.strip()
    assert usage.completion_tokens == 12
    a = anthropic.AsyncAnthropic(base_url=r1.url, api_key=API_KEY, max_retries=0)
    msg = await a.messages.create(model=model_id, max_tokens=12, messages=ASK, thinking={"type": "enabled", "budget_tokens": 4})
    assert [b.type for b in msg.content] == ["thinking", "text"] and msg.usage.output_tokens == 12
