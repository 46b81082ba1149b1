"""End to end: prefix elision and n choices through the API, against --no-prefix-cache."""

from __future__ import annotations

import asyncio

import openai
import pytest

from conftest import API_KEY, wait_for
from test_e2e_resilience import engine_stats

pytestmark = pytest.mark.e2e

SYSTEM = (
    "You are the keeper of an old lighthouse on a rocky coast. You answer questions about the "
    "sea, the weather, ships and the history of the light, briefly and kindly. " * 4
)


@pytest.fixture(scope="module")
def uncached_url(processes):
    endpoint = processes.endpoint("engine-nocache")
    processes.engine(endpoint, "--no-prefix-cache")
    _, url = processes.gateway([endpoint])
    return url


def client_for(base: str, key: str = API_KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base, api_key=key, max_retries=0)


def conversation(question: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


async def test_repeated_prompt_reports_cached_tokens(server, http, model_id):
    client = client_for(server.v1)
    messages = conversation("How tall is the tower?")
    first = await client.chat.completions.create(model=model_id, messages=messages, max_tokens=4, temperature=0)
    second = await client.chat.completions.create(model=model_id, messages=messages, max_tokens=4, temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1
    assert second.choices[0].message.content == first.choices[0].message.content

    async def cached():  # the engine's counters reach /metrics with its next Pong
        stats = await engine_stats(http, server.url)
        return stats["prompt_tokens_cached_total"] > 0 and stats["prefix_cache_nodes"] > 0

    await wait_for(cached, timeout=10)


async def test_cache_and_no_cache_agree(server, uncached_url, model_id):
    """Shared system prompt, several questions, concurrently: outputs with the trie against
    --no-prefix-cache. Where they part, teacher-forced at that position (logprobs of the
    uncached run): the cached choice is within 0.5 nats of the best there."""
    questions = ["How tall is the tower?", "When was the light built?", "What ships pass by?", "Is a storm coming?"]
    prompts = [f"{SYSTEM}\nQuestion: {q}\nAnswer:" for q in questions] * 2  # identical ones too
    kw = dict(model=model_id, max_tokens=16, temperature=0, logprobs=20)
    cached = client_for(server.v1)
    plain = client_for(f"{uncached_url}/v1", "unused")
    with_cache = await asyncio.gather(*(cached.completions.create(prompt=p, **kw) for p in prompts))
    without = await asyncio.gather(*(plain.completions.create(prompt=p, **kw) for p in prompts))
    for c, u in zip(with_cache, without):
        ct, ut = c.choices[0].logprobs.tokens, u.choices[0].logprobs.tokens
        if ct == ut:
            continue
        k = next(i for i, (x, y) in enumerate(zip(ct, ut)) if x != y)
        top = u.choices[0].logprobs.top_logprobs[k]
        assert ct[k] in top and max(top.values()) - top[ct[k]] < 0.5, (k, ct[k], top)
    assert sum(c.usage.prompt_tokens_details.cached_tokens for c in with_cache) > 0
    assert all(u.usage.prompt_tokens_details.cached_tokens == 0 for u in without)


@pytest.mark.parametrize("stream", [False, True])
async def test_n_choices_both_endpoints(server, http, model_id, stream):
    client = client_for(server.v1)
    before = await engine_stats(http, server.url)
    chat = await client.chat.completions.create(
        model=model_id, messages=conversation("Tell me a story."), max_tokens=8, temperature=1.0, n=4, seed=7, stream=stream
    )
    if stream:
        texts = ["", "", "", ""]
        finishes = {}
        async for chunk in chat:
            for choice in chunk.choices:
                texts[choice.index] += choice.delta.content or ""
                if choice.finish_reason:
                    finishes[choice.index] = choice.finish_reason
        assert sorted(finishes) == [0, 1, 2, 3]
    else:
        assert [c.index for c in chat.choices] == [0, 1, 2, 3]
        texts = [c.message.content for c in chat.choices]
        assert chat.usage.completion_tokens <= 32
    assert len(set(texts)) > 1, "choices with different seeds should differ"
    after = await engine_stats(http, server.url)
    # The prompt was decoded once for the four choices (plus each one's last token).
    prompt_len = len(SYSTEM) // 8  # a loose lower bound on the prompt's tokens
    assert after["prefill_tokens_total"] - before["prefill_tokens_total"] < 2 * prompt_len
    completion = await client.completions.create(model=model_id, prompt="Once upon a time", max_tokens=5, n=3, temperature=0.9)
    assert [c.index for c in completion.choices] == [0, 1, 2]
    assert completion.usage.completion_tokens <= 15


async def test_n_out_of_range_is_400(server, http, model_id):
    body = {"model": model_id, "prompt": "hi", "n": 17}
    async with http.post(f"{server.v1}/completions", json=body) as r:
        assert r.status == 400
        assert (await r.json())["error"]["param"] == "n"


@pytest.fixture(scope="module")
def two_engines(processes):
    """Two engines behind one gateway, for prefix-aware routing."""
    endpoints = [processes.endpoint(f"engine-route-{i}") for i in range(2)]
    for endpoint in endpoints:
        processes.engine(endpoint, "--ctx-size", "4096", "--max-seqs", "4")
    _, url = processes.gateway(endpoints)
    return url


async def test_a_prefix_goes_to_the_engine_that_holds_it(two_engines, model_id, tokenizer):
    """One long request per prefix keeps each engine busy (P on the first, Q on the second);
    then a request sharing Q's prefix arrives with both engines equally loaded. By load alone
    it would go to the first engine and decode Q again; routed by prefix, it finds Q cached."""
    client = client_for(f"{two_engines}/v1", "unused")
    p_text = "The river ran past the mill and the mill wheel turned all day long. " * 20
    q_text = "Stars burned over the desert while the caravan slept beside its fires. " * 20
    no_end = {str(t): -100 for t in tokenizer.encode("<eos><end_of_turn>", add_special=False)}
    long = dict(model=model_id, max_tokens=400, temperature=0, stream=True, logit_bias=no_end)
    held = []
    try:
        for text in (p_text, q_text):
            stream = await client.completions.create(prompt=text + "And then", **long)
            held.append(stream)
            await stream.__anext__()  # running on its engine now
        q_again = await client.completions.create(model=model_id, prompt=q_text + "Meanwhile", max_tokens=1, temperature=0)
        q_tokens = len(tokenizer.encode(q_text))
        assert q_again.usage.prompt_tokens_details.cached_tokens >= q_tokens - 2
    finally:
        for stream in held:
            await stream.close()
