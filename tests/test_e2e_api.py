"""End to end on real processes and the bundled model: the OpenAI API as clients see it."""

from __future__ import annotations

import asyncio

import openai
import orjson
import pytest

from conftest import API_KEY

pytestmark = pytest.mark.e2e

PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "def fibonacci(n):",
    "1, 2, 3, 4,",
    "The best way to cook rice",
    "In 1492, Columbus",
    "Water boils at",
    "My favourite animal is",
    "The theory of relativity",
    "To be or not to be",
    "Python is a programming language that",
    "The weather today",
    "Dear Sir or Madam,",
    "import numpy as np\n",
    "The quick brown fox",
    "Photosynthesis is",
]


async def sse_events(resp) -> list[dict]:
    """Parse an SSE body into its JSON events; asserts it ends with [DONE]."""
    events, done = [], False
    async for raw in resp.content:
        line = raw.decode().strip()
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[len("data: ") :]
        assert not done, "data after [DONE]"
        if data == "[DONE]":
            done = True
        else:
            events.append(orjson.loads(data))
    assert done, "stream did not end with [DONE]"
    return events


def openai_client(server, **kw) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0, **kw)


# -- the happy paths ---------------------------------------------------------------------------


async def test_models_and_health(server, http, model_id):
    async with http.get(f"{server.url}/health") as r:
        assert r.status == 200
        assert (await r.json())["status"] == "ok"
    async with http.get(f"{server.v1}/models") as r:
        body = await r.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [model_id]
    assert body["data"][0]["object"] == "model"
    models = await openai_client(server).models.list()
    assert [m.id for m in models.data] == [model_id]


async def test_chat_completion_shape(server, http, model_id):
    body = {"model": model_id, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "temperature": 0}
    async with http.post(f"{server.v1}/chat/completions", json=body) as r:
        assert r.status == 200
        out = await r.json()
    assert out["id"].startswith("chatcmpl-")
    assert out["object"] == "chat.completion"
    assert out["model"] == model_id
    assert isinstance(out["created"], int)
    choice = out["choices"][0]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    content = choice["message"]["content"]
    assert isinstance(content, str) and content and not content[0].isspace()  # no space after "Assistant:"
    assert choice["finish_reason"] in ("stop", "length")
    use = out["usage"]
    assert use["total_tokens"] == use["prompt_tokens"] + use["completion_tokens"]
    assert 0 < use["completion_tokens"] <= 8


async def test_completion_length_and_usage(server, model_id):
    client = openai_client(server)
    out = await client.completions.create(model=model_id, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0)
    assert out.id.startswith("cmpl-") and out.object == "text_completion"
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 12
    assert out.choices[0].text.startswith(" 5, 6")


async def test_chat_stream_with_openai_client(server, model_id):
    client = openai_client(server)
    stream = await client.chat.completions.create(
        model=model_id,
        messages=[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Count: one, two,"}],
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = await client.chat.completions.create(
        model=model_id,
        messages=[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Count: one, two,"}],
        max_tokens=10,
        temperature=0,
    )
    assert text == whole.choices[0].message.content
    assert text and not text[0].isspace()


async def test_completion_stream_raw_sse(server, http, model_id):
    body = {"model": model_id, "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0, "stream": True}
    async with http.post(f"{server.v1}/completions", json=body) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = await sse_events(r)
    assert all(e["object"] == "text_completion" for e in events)
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert "usage" not in events[0]  # only with stream_options.include_usage


async def test_stop_strings_across_tokens(server, model_id):
    client = openai_client(server)
    base = await client.completions.create(model=model_id, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0)
    text = base.choices[0].text  # " 5, 6, 7, 8, ..."
    stop = "7, 8"  # spans several tokens
    assert stop in text
    out = await client.completions.create(model=model_id, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[stop, "zzz"])
    assert out.choices[0].text == text[: text.index(stop)]
    assert out.choices[0].finish_reason == "stop"
    stream = await client.completions.create(
        model=model_id, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=stop, stream=True
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks) == text[: text.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_seed_reproducible(server, model_id):
    client = openai_client(server)
    kw = dict(model=model_id, prompt="Once upon a time", max_tokens=16, temperature=1.0, top_p=0.95)
    # One after the other, so both see the same batch shapes and hence the same logits.
    a = await client.completions.create(seed=1234, **kw)
    b = await client.completions.create(seed=1234, **kw)
    assert a.choices[0].text == b.choices[0].text
    others = {(await client.completions.create(seed=s, **kw)).choices[0].text for s in range(4)}
    assert len(others) > 1, "different seeds should give different samples"
    unseeded = await client.completions.create(**kw)  # the engine picks a seed
    assert unseeded.usage.completion_tokens == 16



async def test_unicode_output_is_whole_characters(server, model_id):
    client = openai_client(server)
    stream = await client.completions.create(
        model=model_id, prompt="日本の首都は", max_tokens=24, temperature=0, stream=True
    )
    pieces = [c.choices[0].text async for c in stream]
    assert not any("\ufffd" in p for p in pieces)
    assert any(ord(ch) > 0x3000 for ch in "".join(pieces))


# -- concurrency ------------------------------------------------------------------------------


async def test_16_concurrent_greedy_equal_one_at_a_time(server, model_id):
    """16 concurrent greedy requests against the same 16 sent one at a time.

    Comparison: exact where llama.cpp computes the same thing. A batch of 16 rows runs other
    matrix kernels than a batch of one (shared/LLAMA_FACTS.md: logits differ by up to ~1), so
    an exact tie-break can differ. Where two outputs part, the test checks teacher-forced at
    that position: the token the concurrent run chose must be among the one-at-a-time run's
    top 20 there, within 1 nat of its best (same prefix, so a fair comparison; with a KV
    stream per sequence llama.cpp also splits a batch into per-stream ubatches, another shape
    change: 0.53 seen here, and LLAMA_FACTS.md measured up to 0.83 between batch shapes).
    Every token of both runs is its own run's argmax (greedy), before and after a parting.
    How many of the 16 part at all depends on near-ties in these prompts: 8-12 stay identical
    here, CI once saw 7, so the count only has to show that most rows are not disturbed at all.
    """
    client = openai_client(server)
    kw = dict(model=model_id, max_tokens=24, temperature=0, logprobs=20)
    concurrent = await asyncio.gather(*(client.completions.create(prompt=p, **kw) for p in PROMPTS))
    alone = [await client.completions.create(prompt=p, **kw) for p in PROMPTS]
    exact = 0
    for prompt, c, a in zip(PROMPTS, concurrent, alone):
        ct, at = c.choices[0].logprobs.tokens, a.choices[0].logprobs.tokens
        assert len(ct) == c.usage.completion_tokens
        for run in (c, a):
            lp = run.choices[0].logprobs
            for i, (chosen, top) in enumerate(zip(lp.token_logprobs, lp.top_logprobs)):
                assert chosen >= max(top.values()) - 1e-5, (prompt, i, chosen, top)
        if ct == at:
            exact += 1
            assert c.choices[0].text == a.choices[0].text
            continue
        k = next(i for i, (x, y) in enumerate(zip(ct, at)) if x != y)
        top = a.choices[0].logprobs.top_logprobs[k]
        best = max(top.values())
        assert ct[k] in top and best - top[ct[k]] < 1.0, (prompt, k, ct[k], top)
    assert exact >= len(PROMPTS) // 4, f"only {exact} of {len(PROMPTS)} identical"


async def test_completion_prompt_batch_gets_n_choices_per_prompt(server, http, model_id, tokenizer):
    """OpenAI's batch form: choice index = prompt index * n + i; usage counts every prompt."""
    prompts = ["1, 2, 3, 4,", tokenizer.encode("a, b, c, d,"), "Monday, Tuesday,"]
    starts = [" 5", " e", " Wednesday"]  # what each prompt's greedy continuation begins with
    body = {"model": model_id, "prompt": prompts, "n": 2, "max_tokens": 4, "temperature": 0}
    async with http.post(f"{server.v1}/completions", json=body) as r:
        assert r.status == 200, await r.text()
        out = await r.json()
    assert [c["index"] for c in out["choices"]] == list(range(6))
    for c in out["choices"]:
        assert c["text"].startswith(starts[c["index"] // 2]), c
    single = []
    for prompt in prompts:
        async with http.post(f"{server.v1}/completions", json={**body, "prompt": prompt, "n": 1}) as r:
            single.append((await r.json())["usage"])
    assert out["usage"]["prompt_tokens"] == sum(u["prompt_tokens"] for u in single)
    assert out["usage"]["completion_tokens"] == 6 * 4
    async with http.post(f"{server.v1}/completions", json={**body, "stream": True}) as r:
        events = await sse_events(r)
    texts: dict[int, str] = {}
    for event in events:
        for choice in event["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert sorted(texts) == list(range(6))
    for index, text in texts.items():
        assert text.startswith(starts[index // 2]), (index, text)


# -- errors a client can cause -------------------------------------------------------------------


def error_of(body: dict) -> dict:
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    return err


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("chat/completions", {"messages": []}, "messages"),
        ("chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ("chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": 2.5}, "temperature"),
        ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
        ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, "max_tokens"),
        ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "10"}, "max_tokens"),
        ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ("completions", {"prompt": 42}, "prompt"),
        ("completions", {"prompt": "hi", "temperature": "hot"}, "temperature"),
    ],
)
async def test_bad_requests_get_400(server, http, model_id, path, body, param):
    async with http.post(f"{server.v1}/{path}", json={"model": model_id, **body}) as r:
        assert r.status == 400
        err = error_of(await r.json())
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param


async def test_malformed_json_and_non_object(server, http):
    async with http.post(f"{server.v1}/chat/completions", data=b"{not json", headers={"Content-Type": "application/json"}) as r:
        assert r.status == 400
        error_of(await r.json())
    async with http.post(f"{server.v1}/completions", json=[1, 2]) as r:
        assert r.status == 400
        error_of(await r.json())


async def test_prompt_longer_than_context_names_both_numbers(server, http, model_id):
    prompt = "hello " * 5000  # > 4,096 tokens, what one request may hold (32,768 cells / 8 streams)
    async with http.post(f"{server.v1}/completions", json={"model": model_id, "prompt": prompt}) as r:
        assert r.status == 400
        err = error_of(await r.json())
    assert "4096" in err["message"] and err["code"] == "context_length_exceeded"
    n_prompt = [int(w) for w in err["message"].replace(",", " ").split() if w.isdigit() and w != "4096"]
    assert n_prompt and n_prompt[0] > 4096
    async with http.post(f"{server.v1}/completions", json={"model": model_id, "prompt": "hi", "max_tokens": 9000}) as r:
        assert r.status == 400
        err = error_of(await r.json())
    assert "4096" in err["message"] and "9000" in err["message"]


async def test_unknown_model_is_404(server, http):
    async with http.post(f"{server.v1}/completions", json={"model": "gpt-9", "prompt": "hi"}) as r:
        assert r.status == 404
        assert error_of(await r.json())["code"] == "model_not_found"


async def test_unknown_route_and_oversized_body(server, http, model_id):
    async with http.get(f"{server.v1}/nothing-here") as r:
        assert r.status == 404
        error_of(await r.json())
    huge = {"model": model_id, "prompt": "x" * (9 * 1024 * 1024)}
    async with http.post(f"{server.v1}/completions", json=huge) as r:
        assert r.status == 413
        error_of(await r.json())


async def test_api_key_required(server, model_id):
    import aiohttp

    body = {"model": model_id, "prompt": "hi", "max_tokens": 1}
    async with aiohttp.ClientSession() as plain:
        async with plain.post(f"{server.v1}/completions", json=body) as r:
            assert r.status == 401
            assert error_of(await r.json())["code"] == "invalid_api_key"
        async with plain.post(f"{server.v1}/completions", json=body, headers={"Authorization": "Bearer wrong"}) as r:
            assert r.status == 401
        async with plain.get(f"{server.url}/health") as r:
            assert r.status == 200  # open without a key
    with pytest.raises(openai.AuthenticationError):
        await openai.AsyncOpenAI(base_url=server.v1, api_key="nope", max_retries=0).models.list()


async def test_bad_requests_do_not_disturb_others(server, model_id):
    """A flood of bad requests while good ones stream: the good ones finish intact."""
    import aiohttp

    client = openai_client(server)
    good = [client.completions.create(model=model_id, prompt=p, max_tokens=16, temperature=0) for p in PROMPTS[:4]]
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}

    async def bad_one(session, i):
        async with session.post(f"{server.v1}/chat/completions", data=b"{" * (i + 1), headers=headers) as r:
            await r.read()
            return r.status

    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*good, *(bad_one(session, i) for i in range(20)))
    await client.close()
    assert all(r.usage.completion_tokens == 16 for r in results[:4])
    assert set(results[4:]) == {400}
