"""End to end: several models behind one gateway, and engines added and removed while it runs.

Two models (the bundled model under two aliases with different context sizes), each request
served by an engine of its own model, both listed; an engine claiming one of those ids with a
different file is refused; an engine dropped from ``--engines-file`` (SIGHUP) finishes what it
runs and takes nothing new; stopping one model's engine leaves the other model serving.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from conftest import free_port, wait_healthy
from demesne.engine.model_card import read_card
from test_e2e_liveness import PROMPT, assert_complete, stream_completion

A, B = "small-a", "small-b"
TEMPLATES = Path(__file__).parent / "templates"


def _engine(processes, name: str, alias: str, *extra: str, model: str | None = None):
    endpoint = processes.endpoint(name)
    args = ["--model", model or processes.model, "--model-alias", alias, "--listen", endpoint, "--threads", "1", "--host-cache", "0"]
    return endpoint, processes._spawn("demesne-engine", args + list(extra))


@pytest.fixture(scope="module")
def fleet(processes):
    a, engine_a = _engine(processes, "model-a", A, "--ctx-size", "8192", "--max-seqs", "2")  # 4,096 per request
    b, engine_b = _engine(processes, "model-b", B, "--ctx-size", "8192", "--max-seqs", "4")  # 2,048
    listing = processes.dir / "engines.list"
    listing.write_text(f"# engines of two models\n{a}\n{b}  # the small-context one\n")
    port = free_port()
    overrides = ["--chat-template", f"{A}={TEMPLATES / 'qwen25.jinja'}", "--tool-format", f"{B}=mistral"]
    gateway = processes._spawn("demesne-gateway", ["--port", str(port), "--engines-file", str(listing), *overrides])
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, gateway)
    return {"a": a, "b": b, "engine_a": engine_a, "engine_b": engine_b, "gateway": gateway, "url": url, "listing": listing}


async def _models(http, url: str) -> dict[str, int]:
    async with http.get(f"{url}/v1/models") as r:
        return {m["id"]: m["context_length"] for m in (await r.json())["data"]}


async def _wait_models(http, url: str, expected: set[str], timeout: float = 60) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        models = await _models(http, url)
        if set(models) == expected:
            return models
        await asyncio.sleep(0.2)
    raise AssertionError(f"models {models}, expected {expected}")


async def _metrics(http, url: str, prefix: str) -> dict[str, float]:
    async with http.get(f"{url}/metrics") as r:
        text = await r.text()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)}


async def _complete(http, url: str, model: str, max_tokens: int = 4) -> aiohttp.ClientResponse:
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    async with http.post(f"{url}/v1/completions", json=body) as r:
        r.body = await r.json()
        return r


async def test_each_request_goes_to_an_engine_of_its_model(fleet):
    url = fleet["url"]
    async with aiohttp.ClientSession() as http:
        assert await _wait_models(http, url, {A, B}) == {A: 4096, B: 2048}
        before = await _metrics(http, url, "demesne_gateway_routed_total")
        for model in (A, B, A):
            r = await _complete(http, url, model)
            assert r.status == 200 and r.body["model"] == model, r.body
        after = await _metrics(http, url, "demesne_gateway_routed_total")
        key = 'demesne_gateway_routed_total{engine="%s"}'
        assert after[key % fleet["a"]] - before[key % fleet["a"]] == 2
        assert after[key % fleet["b"]] - before[key % fleet["b"]] == 1
        # Each model keeps its own limits: 3,000 tokens fit small-a's context, not small-b's.
        assert (await _complete(http, url, A, 3000)).status == 200
        r = await _complete(http, url, B, 3000)
        assert r.status == 400 and r.body["error"]["code"] == "context_length_exceeded"
        # Each model has its own template and tool-call format (here: one overridden for each).
        props = {}
        for model in (A, B):
            async with http.get(f"{url}/props", params={"model": model}) as r:
                props[model] = await r.json()
        assert "qwen25.jinja" in props[A]["chat_template_origin"] and props[A]["tool_call_format"] == "hermes"
        assert "fallback" in props[B]["chat_template_origin"] and props[B]["tool_call_format"] == "mistral"
        r = await _complete(http, url, "no-such-model")
        assert r.status == 404 and r.body["error"]["code"] == "model_not_found"
        # What Kubernetes inference routers read (Gateway API Inference Extension, llm-d).
        served = await _metrics(http, url, "vllm:")
        for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
            assert f'vllm:{name}{{model_name="{A}"}}' in served and f'vllm:{name}{{model_name="{B}"}}' in served
        assert 0 < served[f'vllm:kv_cache_usage_perc{{model_name="{A}"}}'] <= 1


def _hup(fleet, *lines: str) -> None:
    fleet["listing"].write_text("\n".join(lines) + "\n")
    fleet["gateway"].popen.send_signal(signal.SIGHUP)


async def _fingerprint(http, url: str, model: str) -> str | None:
    async with http.get(f"{url}/props", params={"model": model}) as r:
        return (await r.json()).get("model_fingerprint") if r.status == 200 else None


async def _until(predicate, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.2)


async def test_one_model_id_is_one_model(fleet, processes, model_path, tmp_path):
    """An engine claiming small-a with another file is refused while small-a's engine lives;
    once that engine is gone, it serves small-a with its own vocabulary and template, and the
    first engine, back again, is the one refused, until the other goes."""
    other = tmp_path / "other.gguf"  # the same weights with one metadata byte changed: another model
    data = bytearray(open(model_path, "rb").read())
    at = data.index(b"general.name") + len(b"general.name") + 4 + 8
    data[at] ^= 0x20  # the first letter of the name changes case
    other.write_bytes(bytes(data))
    mine, theirs = read_card(model_path).fingerprint, read_card(str(other)).fingerprint
    c, engine_c = _engine(processes, "model-a-impostor", A, "--ctx-size", "4096", "--max-seqs", "2", model=str(other))
    _hup(fleet, fleet["a"], fleet["b"], c)
    url, log = fleet["url"], fleet["gateway"].log
    async with aiohttp.ClientSession() as http:
        await _until(lambda: _logged(log, "claims model small-a"), "the impostor is not refused")
        await asyncio.sleep(2)  # heartbeats go on; the refusal is logged once
        assert log.read_text().count("claims model small-a") == 1
        routed = await _metrics(http, url, "demesne_gateway_routed_total")
        for _ in range(3):
            assert (await _complete(http, url, A)).status == 200
        after = await _metrics(http, url, "demesne_gateway_routed_total")
        assert after.get(f'demesne_gateway_routed_total{{engine="{c}"}}', 0) == 0
        assert after[f'demesne_gateway_routed_total{{engine="{fleet["a"]}"}}'] - routed[f'demesne_gateway_routed_total{{engine="{fleet["a"]}"}}'] == 3
        assert await _fingerprint(http, url, A) == mine

        fleet["engine_a"].stop()  # small-a's engine goes: the other file now is small-a
        await _until(lambda: _fingerprint_is(http, url, A, theirs), "small-a not reloaded from the other engine")
        assert "model small-a changed" in log.read_text()
        assert (await _complete(http, url, A)).status == 200

        _, fleet["engine_a"] = _engine(processes, "model-a", A, "--ctx-size", "8192", "--max-seqs", "2")  # back
        await _until(lambda: _logged(log, f"engine {fleet['a']} claims model small-a"), "the returning engine is not refused")
        assert await _fingerprint(http, url, A) == theirs

        engine_c.stop()
        _hup(fleet, fleet["a"], fleet["b"])
        await _until(lambda: _fingerprint_is(http, url, A, mine), "small-a not reloaded from its first engine")
        await _wait_models(http, url, {A, B})
        assert (await _complete(http, url, A)).status == 200


async def _logged(log, text: str) -> bool:
    return text in log.read_text()


async def _fingerprint_is(http, url: str, model: str, expected: str) -> bool:
    return await _fingerprint(http, url, model) == expected


async def test_engine_dropped_from_the_list_finishes_its_requests(fleet):
    url = fleet["url"]
    async with aiohttp.ClientSession() as http:
        await _wait_models(http, url, {A, B})
        running = asyncio.ensure_future(stream_completion(http, url, B, 300, f"{PROMPT} (B)"))
        await asyncio.sleep(1.5)
        _hup(fleet, fleet["a"])  # small-b's engine leaves the list mid-stream
        await _wait_models(http, url, {A})
        r = await _complete(http, url, B)
        assert r.status == 503 and r.headers["Retry-After"]  # known, but nothing serves it now
        assert_complete(await asyncio.wait_for(running, timeout=180), 300)  # not dropped
        assert "no longer listed" in fleet["gateway"].log.read_text()
        _hup(fleet, fleet["a"], fleet["b"])  # and back
        await _wait_models(http, url, {A, B})
        assert (await _complete(http, url, B)).status == 200


async def test_stopping_one_models_engine_leaves_the_other_serving(fleet):
    url = fleet["url"]
    async with aiohttp.ClientSession() as http:
        await _wait_models(http, url, {A, B})
        fleet["engine_b"].stop()
        models = await _wait_models(http, url, {A})
        assert models == {A: 4096}
        r = await _complete(http, url, B)
        assert r.status == 503 and r.headers["Retry-After"] and r.body["error"]["code"] == "engine_unavailable"
        results = await asyncio.gather(*(stream_completion(http, url, A, 16, f"{PROMPT} {i}") for i in range(2)))
        for result in results:
            assert_complete(result, 16)
