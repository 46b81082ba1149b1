"""End to end across real separate hosts: Linux network namespaces joined by veth pairs.

A gateway in one namespace (whose mount namespace hides the model file), two engines of one
model in two others, reached over TCP with CURVE. Requests are served; a gateway with a key
the engines do not know is refused, and so is a peer without CURVE; cutting the link to one
engine mid-stream fails that engine's streams within 3 s with 503 while the other engine's
stream runs on, and the engine is used again once the link is back.

Needs root (namespaces, veth, mounts); skipped with the reason where they cannot be made.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from conftest import BIN, Proc, wait_healthy
from test_e2e_liveness import PROMPT, routed_counts, assert_complete, stream_completion

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="network namespaces are Linux's")

TAG = f"{os.getpid() % 100000}"
NS = {name: f"dm{name}{TAG}" for name in ("gw", "e1", "e2")}
# 10.231.0.0/24: this host <-> gateway; 10.231.1.0/24: gateway <-> e1; 10.231.2.0/24: gateway <-> e2.
GW_HTTP = "10.231.0.2"
ENGINE_IP = {"e1": "10.231.1.2", "e2": "10.231.2.2"}
PORT = 5700


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _veth(outer_ns: str | None, outer: str, outer_ip: str, inner_ns: str, inner: str, inner_ip: str) -> None:
    _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
    _ip("link", "set", inner, "netns", inner_ns)
    _ip("-n", inner_ns, "addr", "add", f"{inner_ip}/24", "dev", inner)
    _ip("-n", inner_ns, "link", "set", inner, "up")
    if outer_ns is not None:
        _ip("link", "set", outer, "netns", outer_ns)
    prefix = ["-n", outer_ns] if outer_ns else []
    _ip(*prefix, "addr", "add", f"{outer_ip}/24", "dev", outer)
    _ip(*prefix, "link", "set", outer, "up")


def _teardown() -> None:
    for ns in NS.values():
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    subprocess.run(["ip", "link", "del", f"dmh{TAG}"], capture_output=True)


def _build_network() -> None:
    if os.geteuid() != 0:
        pytest.skip("making network namespaces needs root")
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        pytest.skip("needs iproute2's `ip` and util-linux's `unshare`")
    _teardown()
    try:
        for ns in NS.values():
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _veth(None, f"dmh{TAG}", "10.231.0.1", NS["gw"], f"dmg{TAG}", GW_HTTP)
        _veth(NS["gw"], f"dmg1{TAG}", "10.231.1.1", NS["e1"], f"dme1{TAG}", ENGINE_IP["e1"])
        _veth(NS["gw"], f"dmg2{TAG}", "10.231.2.1", NS["e2"], f"dme2{TAG}", ENGINE_IP["e2"])
    except subprocess.CalledProcessError as exc:
        _teardown()
        pytest.skip(f"cannot make network namespaces here: {' '.join(exc.cmd)}: {exc.stderr.strip()}")


class Hosts:
    def __init__(self, processes, model_path: str):
        self.processes = processes
        self.model_path = model_path
        self.dir = processes.dir / "hosts"
        self.keys = self.dir / "keys"
        self.clients = self.dir / "gateways"  # the public keys the engines admit
        self.gateway_proc: Proc | None = None

    def spawn(self, ns: str, name: str, args: list[str], hide_model: bool = False) -> Proc:
        log = self.processes.dir / f"{name}-{len(self.processes.procs)}.log"
        command = [str(BIN / name), *args]
        if hide_model:  # a mount namespace of its own, with the model's directory an empty tmpfs
            inner = f"mount -t tmpfs tmpfs {Path(self.model_path).parent} && exec \"$0\" \"$@\""
            command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", inner, *command]
        popen = subprocess.Popen(
            ["ip", "netns", "exec", NS[ns], *command], stdout=log.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        proc = Proc(popen, log)
        self.processes.procs.append(proc)
        return proc

    def keygen(self) -> None:
        subprocess.run([str(BIN / "demesne"), "keygen", str(self.keys), "engine", "gateway", "intruder"], check=True, capture_output=True)
        self.clients.mkdir()
        shutil.copy(self.keys / "gateway.key", self.clients / "gateway.key")

    def engine(self, ns: str) -> Proc:
        return self.spawn(ns, "demesne-engine", [
            "--model", self.model_path, "--listen", f"tcp://{ENGINE_IP[ns]}:{PORT}", "--ctx-size", "8192", "--max-seqs", "4",
            "--threads", "1", "--host-cache", "0",
            "--curve-key", str(self.keys / "engine.key_secret"), "--curve-clients", str(self.clients),
        ])

    def gateway(self, port: int, own_key: str) -> tuple[Proc, str]:
        args = ["--host", GW_HTTP, "--port", str(port), "--curve-key", str(self.keys / f"{own_key}.key_secret"),
                "--engine-key", str(self.keys / "engine.key")]
        for ns in ("e1", "e2"):
            args += ["--engine", self.endpoint(ns)]
        return self.spawn("gw", "demesne-gateway", args, hide_model=True), f"http://{GW_HTTP}:{port}"

    @staticmethod
    def endpoint(ns: str) -> str:
        return f"tcp://{ENGINE_IP[ns]}:{PORT}"


@pytest.fixture(scope="module")
def hosts(processes, model_path):
    _build_network()
    try:
        h = Hosts(processes, model_path)
        h.dir.mkdir()
        h.keygen()
        h.engines = {ns: h.engine(ns) for ns in ("e1", "e2")}
        h.gateway_proc, h.url = h.gateway(9090, "gateway")
        wait_healthy(h.url, h.gateway_proc)
        yield h
    finally:
        _teardown()


async def _both_up(http, url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        async with http.get(f"{url}/health") as r:
            engines = (await r.json())["engines"]
        if len(engines) == 2 and all(e["ready"] for e in engines):
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"engines not both up: {engines}")


async def test_requests_cross_hosts_with_curve_and_no_model_file(hosts, model_id):
    async with aiohttp.ClientSession() as http:
        await _both_up(http, hosts.url)
        async with http.get(f"{hosts.url}/v1/models") as r:
            assert [m["id"] for m in (await r.json())["data"]] == [model_id]
        body = {"model": model_id, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 8, "temperature": 0}
        async with http.post(f"{hosts.url}/v1/chat/completions", json=body) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["usage"]["completion_tokens"] > 0
        # Two at once: the least loaded engine takes the second, so both hosts serve.
        results = await asyncio.gather(*(stream_completion(http, hosts.url, model_id, 24, f"{PROMPT} ({i})") for i in range(2)))
        for result in results:
            assert_complete(result, 24)
        routed = await routed_counts(http, hosts.url)
        assert routed[hosts.endpoint("e1")] >= 1 and routed[hosts.endpoint("e2")] >= 1, routed
    # The gateway's namespace has no model file: it got the vocabulary from an engine.
    assert os.path.exists(hosts.model_path)
    assert not os.path.exists(f"/proc/{hosts.gateway_proc.popen.pid}/root{hosts.model_path}")
    assert "fetching the vocabulary" in hosts.gateway_proc.log.read_text()


async def test_gateway_with_unknown_key_is_refused_and_both_sides_log_it_once(hosts, model_id):
    intruder, url = hosts.gateway(9091, "intruder")
    async with aiohttp.ClientSession() as http:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # answering HTTP, never with an engine
            try:
                async with http.get(f"{url}/health") as r:
                    assert r.status == 503
                    break
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.2)
        await asyncio.sleep(4)  # ZeroMQ retries the handshake every 0.1 s meanwhile
        async with http.post(f"{url}/v1/completions", json={"model": model_id, "prompt": "Hi", "max_tokens": 2}) as r:
            assert r.status == 503
            assert r.headers["Retry-After"]
            assert "refused this gateway's public key" in (await r.json())["error"]["message"]
        gateway_log = intruder.log.read_text()
        assert gateway_log.count("refused this gateway's public key") == 2, gateway_log  # one per engine
        key = (hosts.keys / "intruder.key").read_text().split('public-key = "')[1].split('"')[0]
        for engine in hosts.engines.values():
            assert engine.log.read_text().count(f"public key {key} is not in") == 1, engine.tail()
        # Admitted once its key is in the engines' directory and they re-read it (SIGHUP).
        shutil.copy(hosts.keys / "intruder.key", hosts.clients / "intruder.key")
        try:
            for engine in hosts.engines.values():
                engine.popen.send_signal(signal.SIGHUP)
            await asyncio.to_thread(wait_healthy, url, intruder, 30)
            async with http.post(f"{url}/v1/completions", json={"model": model_id, "prompt": "Hi", "max_tokens": 2}) as r:
                assert r.status == 200
        finally:
            (hosts.clients / "intruder.key").unlink()
            for engine in hosts.engines.values():
                engine.popen.send_signal(signal.SIGHUP)
            intruder.stop()


def test_peer_without_curve_gets_nothing(hosts):
    """A ZeroMQ peer without CURVE, and a raw TCP client, from the gateway's network."""
    probe = f"""
import socket, zmq
ctx = zmq.Context()
s = ctx.socket(zmq.DEALER)
s.connect("{hosts.endpoint('e1')}")
s.send(b'{{"t":"ping","sent":0.0,"version":4}}')
print("zmq-reply" if s.poll(3000) else "zmq-silent")
raw = socket.create_connection(("{ENGINE_IP['e1']}", {PORT}), timeout=3)
raw.sendall(b'{{"t":"ping","sent":0.0,"version":4}}' * 10)
data = b""
try:
    while chunk := raw.recv(4096):
        data += chunk
except OSError:
    pass
print("raw", len(data), b"pong" in data or b"gemma" in data)
"""
    log = hosts.engines["e1"].log
    for _attempt in range(3):
        out = subprocess.run(["ip", "netns", "exec", NS["gw"], sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
        lines = out.stdout.split("\n")
        assert lines[0] == "zmq-silent", out
        # At most ZeroMQ's greeting (its signature and the mechanism's name), never an answer.
        kind, size, answered = lines[1].split()
        assert kind == "raw" and int(size) <= 64 and answered == "False", out
        # The engine logs from its socket monitor; libzmq does not always report a peer that
        # leaves during the greeting (seen in 2 of 5 runs), so the probe may come again.
        deadline = time.monotonic() + 10
        while "peer without CURVE keys" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        if "peer without CURVE keys" in log.read_text():
            break
    assert "peer without CURVE keys" in log.read_text()


async def _complete(http, url: str, model_id: str) -> tuple[int, str | None, float]:
    body = {"model": model_id, "prompt": f"{PROMPT} (not streamed)", "max_tokens": 1500, "temperature": 0}
    async with http.post(f"{url}/v1/completions", json=body) as r:
        await r.read()
        return r.status, r.headers.get("Retry-After"), time.monotonic()


async def test_cut_link_fails_its_streams_fast_and_heals(hosts, model_id):
    async with aiohttp.ClientSession() as http:
        await _both_up(http, hosts.url)
        first = asyncio.ensure_future(stream_completion(http, hosts.url, model_id, 1500, f"{PROMPT} (cut)"))
        await asyncio.sleep(1.5)  # streaming on the first engine listed...
        second = asyncio.ensure_future(stream_completion(http, hosts.url, model_id, 200, f"{PROMPT} (spared)"))
        await asyncio.sleep(1.5)  # ...and the other on the second, the less loaded
        plain = asyncio.ensure_future(_complete(http, hosts.url, model_id))  # a tie: the first engine
        await asyncio.sleep(1.0)
        routed = await routed_counts(http, hosts.url)
        _ip("-n", NS["e1"], "link", "set", f"dme1{TAG}", "down")
        cut = time.monotonic()
        try:
            result = await asyncio.wait_for(first, timeout=10)
            failed_after = time.monotonic() - cut
            assert failed_after < 3.0, failed_after
            assert result["errors"] and result["errors"][-1]["error"]["code"] == "engine_unavailable", result
            status, retry_after, plain_after = await asyncio.wait_for(plain, timeout=10)
            assert status == 503 and retry_after and plain_after - cut < 3.0, (status, plain_after - cut)
            assert_complete(await asyncio.wait_for(second, timeout=120), 200)  # the other host: untouched
        finally:
            _ip("-n", NS["e1"], "link", "set", f"dme1{TAG}", "up")
        await _both_up(http, hosts.url, timeout=30)
        results = await asyncio.gather(*(stream_completion(http, hosts.url, model_id, 8, f"{PROMPT} (after {i})") for i in range(2)))
        for result in results:
            assert_complete(result, 8)
        after = await routed_counts(http, hosts.url)
        assert after[hosts.endpoint("e1")] > routed[hosts.endpoint("e1")], (routed, after)
