"""End to end: an engine that is slow, stopped, failing, draining, of another protocol
version, or killed, on real processes and the real model (issue 9's (a)-(c), (e), (f), (k))."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time

import aiohttp
import orjson
import pytest
import zmq
import zmq.asyncio

from conftest import BIN, fake_model, free_port, wait_healthy
from demesne import protocol as p

pytestmark = pytest.mark.e2e

PROMPT = "The history of the printing press begins"
LONG_PROMPT = " ".join([PROMPT] * 12)  # several routing blocks: prefix-aware routing keeps it on one engine


async def stream_completion(http, url: str, model_id: str, max_tokens: int, prompt: str = PROMPT) -> dict:
    """One streamed completion read to the end: its text, finish reason, usage and errors."""
    body = {
        "model": model_id, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True},
    }
    out = {"status": None, "text": "", "finish": None, "usage": None, "errors": [], "done": False}
    async with http.post(f"{url}/v1/completions", json=body) as r:
        out["status"] = r.status
        if r.status != 200:
            out["errors"].append(await r.json())
            return out
        async for line in r.content:
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                out["done"] = True
                break
            event = orjson.loads(data)
            if "error" in event:
                out["errors"].append(event)
                continue
            if event.get("usage"):
                out["usage"] = event["usage"]
            for choice in event.get("choices", []):
                out["text"] += choice.get("text") or ""
                out["finish"] = choice.get("finish_reason") or out["finish"]
    return out


def assert_complete(result: dict, max_tokens: int) -> None:
    assert result["status"] == 200 and not result["errors"], result
    assert result["done"] and result["finish"] in ("length", "stop"), result
    if result["finish"] == "length":
        assert result["usage"]["completion_tokens"] == max_tokens, result


async def metric(http, url: str, name: str) -> float:
    async with http.get(f"{url}/metrics") as r:
        text = await r.text()
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith(f"demesne_{name}{{"))


async def test_engine_stopped_for_10s_loses_no_stream(processes, model_id):
    """(a) SIGSTOP for 10 s in the middle of 8 streams, then SIGCONT: all 8 complete."""
    endpoint = processes.endpoint("engine-stopped")
    engine = processes.engine(endpoint)
    gateway, url = processes.gateway([endpoint])
    async with aiohttp.ClientSession() as http:
        streams = [asyncio.ensure_future(stream_completion(http, url, model_id, 48, f"{PROMPT} ({i})")) for i in range(8)]
        await asyncio.sleep(3)
        engine.popen.send_signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(10)
            async with http.get(f"{url}/health") as r:  # stopped: no new requests go to it...
                assert r.status == 503
        finally:
            engine.popen.send_signal(signal.SIGCONT)
        results = await asyncio.wait_for(asyncio.gather(*streams), timeout=180)
    for result in results:  # ...but none of its running requests failed or was cut short
        assert_complete(result, 48)
    assert "has not answered" in gateway.tail()


async def test_8s_steps_serve_8_requests_with_default_flags(processes, model_id):
    """(b) Every step takes 8 s longer: heartbeats are answered mid-step, nothing fails."""
    endpoint = processes.endpoint("engine-slow")
    processes.engine(endpoint, env={"DEMESNE_TEST_FAULTS": "step_sleep=8"})
    _, url = processes.gateway([endpoint])
    async with aiohttp.ClientSession() as http:
        results = await asyncio.wait_for(
            asyncio.gather(*(stream_completion(http, url, model_id, 3, f"{PROMPT} [{i}]") for i in range(8))), timeout=300
        )
        longest = await metric(http, url, "longest_step_seconds")
    for i, result in enumerate(results):
        assert_complete(result, 3)
        print(f"client {i}: HTTP {result['status']}, {result['usage']['completion_tokens']} tokens, finish {result['finish']}")
    print(f"longest step {longest:.1f} s")
    assert longest >= 8.0


async def test_a_fault_in_a_step_fails_only_that_steps_requests(processes, model_id):
    """(c) The third step raises: the request in it gets a 500 naming the cause; the one
    waiting behind it (one sequence at a time) and the next ones succeed."""
    endpoint = processes.endpoint("engine-faulty")
    engine = processes.engine(endpoint, "--max-seqs", "1", env={"DEMESNE_TEST_FAULTS": "raise_at_step=2"})
    _, url = processes.gateway([endpoint])
    body = {"model": model_id, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    async with aiohttp.ClientSession() as http:
        first = asyncio.ensure_future(http.post(f"{url}/v1/completions", json=body))
        await asyncio.sleep(0.3)
        second = asyncio.ensure_future(http.post(f"{url}/v1/completions", json={**body, "prompt": "Bread is made"}))
        r1, r2 = await asyncio.wait_for(asyncio.gather(first, second), timeout=120)
        assert r1.status == 500
        error = (await r1.json())["error"]
        assert "fault injected" in error["message"] and error["type"] == "server_error"
        assert r2.status == 200 and (await r2.json())["usage"]["completion_tokens"] == 8
        async with http.post(f"{url}/v1/completions", json=body) as r3:
            assert r3.status == 200
        assert await metric(http, url, "step_faults_total") == 1
    assert engine.popen.poll() is None


async def test_sigterm_drains_and_new_requests_go_to_the_other_engine(processes, model_id):
    """(e) SIGTERM during 8 streams: all 8 complete; a new request is served by the other
    engine; the drained engine exits 0."""
    a, b = processes.endpoint("engine-drain-a"), processes.endpoint("engine-drain-b")
    engines = {a: processes.engine(a), b: processes.engine(b)}
    _, url = processes.gateway([a, b], "--route-slack", "100")  # a shared prefix stays on one engine
    async with aiohttp.ClientSession() as http:
        await _wait_engines_up(http, url, 2)
        streams = [asyncio.ensure_future(stream_completion(http, url, model_id, 40, LONG_PROMPT)) for _ in range(8)]
        await asyncio.sleep(2.5)
        routed = await routed_counts(http, url)
        busy, other = (a, b) if routed[a] > routed[b] else (b, a)
        assert routed[busy] == 8, routed
        engines[busy].popen.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        # The same prefix would go to the busy engine; it is draining, so the other serves it.
        async with http.post(f"{url}/v1/completions", json={"model": model_id, "prompt": LONG_PROMPT, "max_tokens": 2}) as r:
            assert r.status == 200, await r.text()
        after = await routed_counts(http, url)
        assert (after[busy], after[other]) == (8, routed[other] + 1)
        results = await asyncio.wait_for(asyncio.gather(*streams), timeout=180)
    for result in results:
        assert_complete(result, 40)
    assert engines[busy].popen.wait(30) == 0


async def test_sigterm_with_one_engine_answers_503_with_retry_after(processes, model_id):
    """(e) With no other engine, requests that come during the drain get 503 + Retry-After."""
    endpoint = processes.endpoint("engine-drain-only")
    # No speculation: a greedy base model repeats itself, and n-gram drafts would finish the
    # stream before the request below comes (the engine would be gone, not draining).
    engine = processes.engine(endpoint, "--speculative", "off")
    _, url = processes.gateway([endpoint])
    async with aiohttp.ClientSession() as http:
        stream = asyncio.ensure_future(stream_completion(http, url, model_id, 1500))
        await asyncio.sleep(2)
        engine.popen.send_signal(signal.SIGTERM)
        await _wait_draining(http, url)
        assert not stream.done(), "the stream ended before the drain: the check below would not test it"
        async with http.post(f"{url}/v1/completions", json={"model": model_id, "prompt": "Hi", "max_tokens": 2}) as r:
            assert r.status == 503 and "Retry-After" in r.headers
            assert "shutting down" in (await r.json())["error"]["message"]
        assert_complete(await asyncio.wait_for(stream, timeout=300), 1500)
    assert engine.popen.wait(30) == 0


async def _wait_draining(http, url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        async with http.get(f"{url}/health") as r:
            if any(e["draining"] for e in (await r.json())["engines"]):
                return
        await asyncio.sleep(0.05)
    raise AssertionError("the gateway never saw the engine draining")


async def _wait_engines_up(http, url: str, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        async with http.get(f"{url}/health") as r:
            if sum(e["up"] for e in (await r.json())["engines"]) == n:
                return
        await asyncio.sleep(0.2)
    raise AssertionError(f"{n} engines not up")


async def routed_counts(http, url: str) -> dict[str, float]:
    async with http.get(f"{url}/metrics") as r:
        text = await r.text()
    out = {}
    for line in text.splitlines():
        if line.startswith("demesne_gateway_routed_total{"):
            out[line.split('"')[1]] = float(line.rsplit(" ", 1)[1])
    return out


async def test_protocol_version_mismatch_is_refused_clearly(processes, model_id):
    """(f) A gateway facing an engine of another protocol version: one log line, a clear
    503 at once, no hang. (The engine side is in test_engine_frames.py.)"""
    endpoint = processes.endpoint("engine-from-the-future")
    zctx = zmq.asyncio.Context()
    sock = zctx.socket(zmq.ROUTER)
    sock.bind(endpoint)

    async def future_engine():
        model = p.ModelInfo(model_id, "/nowhere.gguf", 4096, 262144, None, "<bos>", "<eos>")
        while True:
            client, frame = await sock.recv_multipart()
            body = orjson.loads(frame)
            if body["t"] == "ping":
                pong = {**orjson.loads(p.encode(p.Pong(body["sent"], "future", model, {}))), "version": 999, "novelty": 1}
                await sock.send_multipart([client, orjson.dumps(pong)])

    task = asyncio.ensure_future(future_engine())
    try:
        gateway, url = await asyncio.to_thread(_gateway_unhealthy, processes, endpoint)
        async with aiohttp.ClientSession() as http:
            await asyncio.sleep(2)
            t0 = time.monotonic()
            async with http.post(f"{url}/v1/completions", json={"model": model_id, "prompt": "Hi", "max_tokens": 2}) as r:
                assert r.status == 503
                message = (await r.json())["error"]["message"]
            assert time.monotonic() - t0 < 5
        assert "protocol v999" in message and f"v{p.PROTOCOL_VERSION}" in message
        assert gateway.tail().count("speaks protocol v999") == 1
    finally:
        task.cancel()
        sock.close(0)
        zctx.term()


async def test_replies_sent_before_an_engine_closes_all_arrive(processes, model_path, model_id, tokenizer):
    """An engine that answers a request in a burst of frames and closes its socket at once
    (a drain's last step, then exit): the gateway delivers every token and the finish, none
    lost with the connection. (A socket that drops unread frames on disconnect - ZeroMQ's
    IMMEDIATE - loses the tail here; CI saw a drained stream end one token short.)"""
    endpoint = processes.endpoint("engine-burst-then-close")
    zctx = zmq.asyncio.Context()
    sock = zctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.SNDHWM, 0)  # the whole burst is queued at once
    sock.bind(endpoint)
    model, vocab = fake_model(model_id, model_path)
    token = tokenizer.encode(" word")[-1]
    n = 300

    async def burst_engine():
        while True:
            client, frame = await sock.recv_multipart()
            msg = p.decode(frame)
            if isinstance(msg, p.Ping):
                await sock.send_multipart([client, p.encode(p.Pong(msg.sent, "burst", model, {}))])
            elif isinstance(msg, p.GetVocab):
                await sock.send_multipart([client, p.encode(vocab)])
            elif isinstance(msg, p.Generate):
                for i in range(n):
                    last = i == n - 1
                    delta = p.Delta(msg.rid, [token], "length" if last else None, len(msg.prompt) if last else 0)
                    sock.send_multipart([client, p.encode(p.Deltas([delta]))])
                sock.close(linger=5000)  # everything queued still goes out; then the connection closes
                return

    task = asyncio.ensure_future(burst_engine())
    try:
        _, url = await asyncio.to_thread(processes.gateway, [endpoint])
        async with aiohttp.ClientSession() as http:
            result = await asyncio.wait_for(stream_completion(http, url, model_id, n), timeout=60)
        assert_complete(result, n)
        assert await task is None
    finally:
        task.cancel()
        zctx.term()


async def test_a_request_refused_as_draining_goes_to_another_engine(processes, model_path, model_id, tokenizer):
    """An engine that refuses requests as draining while its Pongs do not yet say so (its
    SIGTERM came mid-step): the gateway sends each such request to the other engine, and the
    client gets its whole completion instead of a 503."""
    zctx = zmq.asyncio.Context()
    model, vocab = fake_model(model_id, model_path)
    token = tokenizer.encode(" word")[-1]
    n = 5
    endpoints = [processes.endpoint("engine-refuses-draining"), processes.endpoint("engine-serves")]
    socks = [zctx.socket(zmq.ROUTER) for _ in endpoints]
    for sock, endpoint in zip(socks, endpoints):
        sock.bind(endpoint)
    refused: list[str] = []

    async def fake_engine(sock, refuse: bool):
        while True:
            client, frame = await sock.recv_multipart()
            msg = p.decode(frame)
            if isinstance(msg, p.Ping):
                await sock.send_multipart([client, p.encode(p.Pong(msg.sent, f"fake-{refuse}", model, {}))])
            elif isinstance(msg, p.GetVocab):
                await sock.send_multipart([client, p.encode(vocab)])
            elif isinstance(msg, p.Generate) and refuse:
                refused.append(msg.rid)
                error = p.Error(msg.rid, 503, "the engine is shutting down; retry", "engine_draining")
                await sock.send_multipart([client, p.encode(error)])
            elif isinstance(msg, p.Generate):
                for i in range(n):
                    last = i == n - 1
                    delta = p.Delta(msg.rid, [token], "length" if last else None, len(msg.prompt) if last else 0)
                    await sock.send_multipart([client, p.encode(p.Deltas([delta]))])

    tasks = [asyncio.ensure_future(fake_engine(sock, refuse)) for sock, refuse in zip(socks, (True, False))]
    try:
        _, url = await asyncio.to_thread(processes.gateway, endpoints, "--route", "round-robin")
        async with aiohttp.ClientSession() as http:
            await _wait_engines_up(http, url, 2)
            results = await asyncio.wait_for(asyncio.gather(*(stream_completion(http, url, model_id, n) for _ in range(4))), timeout=60)
        assert refused  # round-robin sent some to the refusing engine
        for result in results:
            assert_complete(result, n)
    finally:
        for task in tasks:
            task.cancel()
        zctx.destroy(linger=0)


def _gateway_unhealthy(processes, endpoint: str):
    """A gateway whose only engine never becomes healthy: wait for it to listen."""
    port = free_port()
    proc = processes._spawn("demesne-gateway", ["--port", str(port), "--engine", endpoint])
    url = f"http://127.0.0.1:{port}"
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
        except urllib.error.HTTPError:
            return proc, url  # answering, with 503
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    raise RuntimeError(proc.tail())


async def test_stalled_gateway_gets_errors_not_silence(processes, model_id):
    """A gateway stalled past --gateway-timeout: its requests are freed in the engine, and
    its streams end with an error and [DONE] when it wakes, instead of hanging."""
    endpoint = processes.endpoint("engine-gwtimeout")
    processes.engine(endpoint, "--gateway-timeout", "3")
    gateway, url = processes.gateway([endpoint])
    async with aiohttp.ClientSession() as http:
        stream = asyncio.ensure_future(stream_completion(http, url, model_id, 4000))
        await asyncio.sleep(2)
        gateway.popen.send_signal(signal.SIGSTOP)
        await asyncio.sleep(6)
        gateway.popen.send_signal(signal.SIGCONT)
        result = await asyncio.wait_for(stream, timeout=60)
    assert result["done"] and result["errors"], result
    assert "lost contact" in result["errors"][0]["error"]["message"]


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return out


def test_serve_restarts_its_engine_after_sigkill(model_path, tmp_path):
    """(k) The engine of `demesne serve` killed with SIGKILL: service is back by itself."""
    import urllib.request

    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "demesne"), "serve", "--port", str(port), "--ctx-size", "16384", "--max-seqs", "4", "--threads", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)},
    )

    class P:
        popen = proc

        @staticmethod
        def tail():
            return ""

    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, P)
        (engine,) = [c for c in _children(proc.pid) if b"spawn_main" in open(f"/proc/{c}/cmdline", "rb").read()]
        os.kill(engine, signal.SIGKILL)
        t0 = time.monotonic()
        time.sleep(0.5)
        wait_healthy(url, P, timeout=30)
        back = time.monotonic() - t0
        req = urllib.request.Request(
            f"{url}/v1/completions", data=b'{"model": "gemma-3-270m-q4_k_m", "prompt": "Hello", "max_tokens": 3}',
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status == 200
        print(f"service back {back:.1f} s after SIGKILL")
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=90)[0].decode(errors="replace")
    assert proc.returncode == 0, out
    assert "starting it again" in out
    assert list(tmp_path.iterdir()) == []
