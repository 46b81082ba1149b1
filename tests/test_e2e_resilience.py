"""End to end: clients going away, several gateways, engines dying and coming back, the CLI."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time

import aiohttp
import pytest

from conftest import API_KEY, BIN, free_port, wait_for, wait_healthy

pytestmark = pytest.mark.e2e


async def engine_stats(http, url: str) -> dict[str, float]:
    async with http.get(f"{url}/metrics") as r:
        assert r.status == 200
        text = await r.text()
    stats = {}
    for line in text.splitlines():
        if line.startswith("demesne_") and "{" in line:
            name = line.split("{", 1)[0][len("demesne_") :]
            stats[name] = stats.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return stats


async def test_metrics_exposes_engine_counters(server, http):
    stats = await engine_stats(http, server.url)
    for name in (
        "requests_running",
        "requests_waiting",
        "prompt_tokens_total",
        "generation_tokens_total",
        "decode_seconds_total",
        "sample_seconds_total",
        "kv_cells_used",
        "kv_cells_total",
    ):
        assert name in stats, name
    assert stats["kv_cells_total"] == 32768


async def test_client_disconnect_aborts_in_engine(processes, model_id):
    # An engine of its own: the shared one may still be finishing other tests' requests, and the
    # check below counts every token the engine generates.
    endpoint = processes.endpoint("engine-abort")
    engine = processes.engine(endpoint)
    gateway, url = processes.gateway([endpoint])
    body = {"model": model_id, "prompt": "Once upon a time", "max_tokens": 4000, "temperature": 0, "stream": True}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/v1/completions", json=body) as r:
            assert r.status == 200
            n = 0
            async for line in r.content:
                n += line.startswith(b"data: ")
                if n >= 3:
                    break
            r.connection.transport.abort()  # the client goes away mid-stream

        async def idle():
            s = await engine_stats(http, url)
            # Idle: nothing running or queued, and every used cell is one the prefix trie keeps.
            # The engine's counters reach /metrics as a snapshot that may predate the request
            # (CI read 0 tokens and idle, then 4): the snapshot must count the tokens the
            # client saw (each data line carries at least one) before it can say idle.
            fresh = s["generation_tokens_total"] >= n
            return fresh and not s["requests_running"] and not s["requests_waiting"] and s["kv_cells_used"] == s["prefix_cache_cells"] and s

        before = await wait_for(idle, timeout=10)
        assert before["generation_tokens_total"] < 100
        await asyncio.sleep(1.5)
        after = await engine_stats(http, url)
        assert after["generation_tokens_total"] == before["generation_tokens_total"]
    gateway.stop()
    engine.stop()


async def test_two_gateways_share_one_engine(server, processes, model_id):
    _, second = processes.gateway([server.engine_endpoint])  # no key on this one
    body = {"model": model_id, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    async with aiohttp.ClientSession() as s1, aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as s2:
        r1, r2 = await asyncio.gather(s1.post(f"{second}/v1/completions", json=body), s2.post(f"{server.v1}/completions", json=body))
        a, b = await r1.json(), await r2.json()
    assert r1.status == r2.status == 200
    assert a["choices"][0]["text"] == b["choices"][0]["text"]


async def test_dead_engine_gives_503_then_recovers(processes, model_id):
    endpoint = processes.endpoint("engine-doomed")
    engine = processes.engine(endpoint)
    _, url = processes.gateway([endpoint])
    body = {"model": model_id, "prompt": "Once upon a time", "max_tokens": 4000, "temperature": 0}
    async with aiohttp.ClientSession() as http:
        inflight = asyncio.ensure_future(http.post(f"{url}/v1/completions", json=body))
        await asyncio.sleep(1.0)
        engine.stop(signal.SIGKILL)
        t0 = time.monotonic()
        r = await asyncio.wait_for(inflight, timeout=15)
        assert r.status == 503
        assert (await r.json())["error"]["code"] == "engine_unavailable"
        assert time.monotonic() - t0 < 3  # the closed connection says so at once
        async with http.post(f"{url}/v1/completions", json={**body, "max_tokens": 4}) as r:
            assert r.status == 503
        async with http.get(f"{url}/health") as r:
            assert r.status == 503

        processes.engine(endpoint)  # the engine comes back on the same endpoint

        async def healthy():
            async with http.get(f"{url}/health") as r:
                return r.status == 200

        await wait_for(healthy, timeout=60)
        async with http.post(f"{url}/v1/completions", json={**body, "max_tokens": 4}) as r:
            assert r.status == 200
            assert (await r.json())["usage"]["completion_tokens"] == 4


def test_missing_model_exits_2_with_one_line(tmp_path):
    for cmd in ("demesne-engine", "demesne"):
        args = [str(BIN / cmd)] + (["serve"] if cmd == "demesne" else []) + ["--model", str(tmp_path / "nope.gguf")]
        out = subprocess.run(args, capture_output=True, text=True, timeout=60)
        assert out.returncode == 2
        lines = [l for l in out.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and "nope.gguf" in lines[0], out.stderr
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model")
    out = subprocess.run([str(BIN / "demesne-engine"), "--model", str(junk)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "not a GGUF" in out.stderr


def test_serve_starts_both_and_stops_on_sigterm(model_path, tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "demesne"), "serve", "--port", str(port), "--ctx-size", "16384", "--max-seqs", "4", "--threads", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)},  # where its engine socket goes
    )

    class P:  # the shape wait_healthy expects
        popen = proc

        @staticmethod
        def tail():
            return ""

    try:
        wait_healthy(f"http://127.0.0.1:{port}", P)
        import urllib.request

        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions",
            data=b'{"model": "gemma-3-270m-q4_k_m", "prompt": "Hello", "max_tokens": 3}',
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=40)[0].decode(errors="replace")
    assert proc.returncode == 0, out
    assert "NO API KEY" in out
    assert list(tmp_path.iterdir()) == []  # the engine's socket file is gone
