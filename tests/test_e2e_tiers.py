"""End to end: a conversation outlives its engine. The engine keeps what it held on disk when it
stops (SIGTERM), and the next engine on the same --disk-cache restores it for the next turn:
the client sees cached_tokens, the engine prefills only the new turn."""

from __future__ import annotations

import aiohttp
import pytest

from conftest import wait_for
from test_e2e_resilience import engine_stats
from test_prefix_engine import STORY

pytestmark = pytest.mark.e2e


async def test_a_conversation_is_restored_from_disk_after_a_restart(processes, model_id, tmp_path):
    endpoint = processes.endpoint("engine-disk")
    flags = ("--disk-cache", str(tmp_path), "--host-cache", "256M")
    engine = processes.engine(endpoint, *flags)
    gateway, url = processes.gateway([endpoint])
    messages = [{"role": "system", "content": STORY * 6}, {"role": "user", "content": "What did the keeper see?"}]
    body = {"model": model_id, "messages": messages, "max_tokens": 8, "temperature": 0}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/v1/chat/completions", json=body) as r:
            assert r.status == 200
            first = await r.json()
        assert engine.stop() == 0  # drains, then writes what it holds to disk
        assert any(p.suffix == ".kv" for p in tmp_path.iterdir())

        processes.engine(endpoint, *flags)

        async def healthy():
            async with http.get(f"{url}/health") as r:
                return r.status == 200

        await wait_for(healthy, timeout=60)
        before = await engine_stats(http, url)
        reply = first["choices"][0]["message"]["content"]
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]
        async with http.post(f"{url}/v1/chat/completions", json={**body, "messages": messages}) as r:
            assert r.status == 200
            second = await r.json()
        after = await engine_stats(http, url)
    prompt, cached = second["usage"]["prompt_tokens"], second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= first["usage"]["prompt_tokens"] - 8  # the first turn came back from disk
    assert after["kv_restores_disk_total"] - before.get("kv_restores_disk_total", 0) == 1
    assert after["prefill_tokens_total"] - before["prefill_tokens_total"] <= prompt - cached
    gateway.stop()
