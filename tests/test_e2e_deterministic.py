"""End to end: --deterministic gives every request the same bytes whatever else runs (issue 15).

Sixteen requests (greedy and seeded temperature 1, five sharing one long prefix, three sharing
another, three with n = 2, all with logprobs) are sent one at a time, then all together,
arriving staggered, in three different orders. With --deterministic every choice's text,
token logprobs and top logprobs are byte-identical to its one-at-a-time run in every order;
without it the same test sees differences (so it can tell the two apart).
"""

from __future__ import annotations

import asyncio
import random

import aiohttp
import orjson
import pytest

pytestmark = pytest.mark.e2e

SHARED = (
    "The following is a detailed report on the harbour town's fishing fleet, its boats, the"
    " families who crew them and the seasons they follow. "
)
OTHER = "Recipe notes from a mountain kitchen, written down over many winters: "
TAILS = [
    "The oldest boat", "In spring", "The harbour master", "Storms in the north", "Prices at market",
    "The first dish", "Bread and salt", "A winter soup",
    "Once upon a time", "The capital of France is", "def fibonacci(n):", "Dear diary, today",
    "The three laws of", "My favourite colour", "In 1492,", "Photosynthesis is",
]


def requests(model_id: str) -> list[dict]:
    out = []
    for i, tail in enumerate(TAILS):
        prompt = SHARED + tail if i < 5 else OTHER + tail if i < 8 else tail
        body = {"model": model_id, "prompt": prompt, "max_tokens": 24, "logprobs": 2}
        if i % 2:
            body |= {"temperature": 1.0, "seed": 1000 + i}
        else:
            body |= {"temperature": 0}
        if i in (3, 6, 11):
            body |= {"n": 2, "temperature": 1.0, "seed": 7 + i}
        out.append(body)
    return out


async def complete(http: aiohttp.ClientSession, url: str, body: dict, delay: float = 0.0) -> bytes:
    """The request's choices (text, logprobs, finish), as canonical bytes."""
    await asyncio.sleep(delay)
    async with http.post(f"{url}/v1/completions", json=body) as r:
        assert r.status == 200, await r.text()
        reply = await r.json()
    choices = sorted(reply["choices"], key=lambda c: c["index"])
    return orjson.dumps([[c["index"], c["text"], c["logprobs"], c["finish_reason"]] for c in choices])


async def runs(processes, model_id: str, name: str, flags: tuple[str, ...], orders: int) -> tuple[list[bytes], list[list[bytes]]]:
    """On an engine of its own started with ``flags``: each request alone, then all of them
    staggered in ``orders`` shuffled orders."""
    endpoint = processes.endpoint(name)
    engine = processes.engine(endpoint, *flags)
    gateway, url = processes.gateway([endpoint])
    try:
        return await _runs(url, model_id, orders)
    finally:
        gateway.stop()
        engine.stop()


async def _runs(url: str, model_id: str, orders: int) -> tuple[list[bytes], list[list[bytes]]]:
    bodies = requests(model_id)
    async with aiohttp.ClientSession() as http:
        alone = [await complete(http, url, body) for body in bodies]
        together = []
        for k in range(orders):
            rng = random.Random(k)
            order = list(range(len(bodies)))
            rng.shuffle(order)
            delays = {i: 0.08 * slot + rng.uniform(0, 0.05) for slot, i in enumerate(order)}
            got = await asyncio.gather(*(complete(http, url, bodies[i], delays[i]) for i in range(len(bodies))))
            together.append(list(got))
    return alone, together


async def test_deterministic_outputs_do_not_depend_on_load(processes, model_id):
    alone, together = await runs(processes, model_id, "engine-deterministic", ("--deterministic",), orders=3)
    for k, got in enumerate(together):
        differ = [i for i in range(len(alone)) if got[i] != alone[i]]
        assert not differ, f"order {k}: requests {differ} differ from their one-at-a-time outputs"
    assert len({b for b in alone}) == len(alone)  # sixteen different requests, sixteen outputs


async def test_without_the_flag_load_changes_outputs(processes, model_id):
    """The control: the same requests on the default engine part from their one-at-a-time
    outputs (llama.cpp's kernels differ with the batch shape)."""
    alone, together = await runs(processes, model_id, "engine-nondeterministic", (), orders=1)
    differ = [i for i in range(len(alone)) if together[0][i] != alone[i]]
    print(f"without --deterministic, {len(differ)} of {len(alone)} requests differ under load: {differ}")
    assert differ
