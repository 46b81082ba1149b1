"""Shared fixtures: the bundled model, and real engine and gateway processes on it."""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from demesne.config import EngineConfig
from demesne import protocol as p
from demesne.engine.core import Engine
from demesne.engine.model_card import read_card
from demesne.engine.runner import ModelRunner
from demesne.gateway.tokenizer import Tokenizer
from demesne.model import resolve_model
from demesne.protocol import Generate

API_KEY = "test-key-0123456789"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def model_path() -> str:
    return resolve_model(None)


@pytest.fixture(scope="session")
def tokenizer(model_path) -> Tokenizer:
    return Tokenizer(model_path)


def make_engine(model_path: str, **overrides) -> Engine:
    """An in-process engine on the real model: 2 threads, 8 sequences, 16,384 cells (streams:
    2,048 for each sequence; unified: 4,096 in all), 512-token steps unless told."""
    unified = overrides.get("kv_layout") == "unified"
    defaults = {"ctx_size": 4096 if unified else 16384, "max_seqs": 8, "batch_size": 512}
    config = EngineConfig(model=model_path, threads=2, **{**defaults, **overrides})
    return Engine(config, ModelRunner(config))


def run_engine(engine: Engine, requests: list[Generate]) -> dict[str, list[int]]:
    """Submit ``requests``, step until idle; tokens per request id. Every request must finish."""
    out: dict[str, list[int]] = {}
    for req in requests:
        assert engine.submit(b"test", req) is None
        out[req.rid] = []
    finished = set()
    while engine.has_work:
        for _client, delta in engine.step():
            assert delta.rid not in finished
            out[delta.rid].extend(delta.tokens)
            if delta.finish:
                finished.add(delta.rid)
    assert finished == set(out)
    return out


async def wait_for(predicate, timeout: float, interval: float = 0.2):
    """Poll an async predicate until it returns something true; that value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def fake_model(model_id: str, model_path: str, n_ctx: int = 4096) -> tuple[p.ModelInfo, p.Vocab]:
    """What a fake engine on the real model announces, and its answer to GetVocab."""
    card = read_card(model_path)
    info = p.ModelInfo(
        model_id, model_path, n_ctx, 262144, None, "<bos>", "<eos>",
        card.fingerprint, card.vocab_digest, len(card.vocab),
    )
    return info, p.Vocab(card.vocab_digest, base64.b64encode(card.vocab).decode())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    popen: subprocess.Popen
    log: Path

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


class Processes:
    """Starts demesne-engine / demesne-gateway processes and stops them all at the end."""

    def __init__(self, model: str):
        self.model = model
        self.dir = Path(tempfile.mkdtemp(prefix="demesne-test-"))
        self.procs: list[Proc] = []

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Proc:
        log = self.dir / f"{name}-{len(self.procs)}.log"
        popen = subprocess.Popen(
            [str(BIN / name), *args], stdout=log.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
        )
        proc = Proc(popen, log)
        self.procs.append(proc)
        return proc

    def endpoint(self, name: str) -> str:
        return f"ipc://{self.dir}/{name}.sock"

    def engine(self, endpoint: str, *extra: str, env: dict[str, str] | None = None) -> Proc:
        """``env``: e.g. {"DEMESNE_TEST_FAULTS": "step_sleep=8"} (demesne/engine/faults.py)."""
        args = ["--model", self.model, "--listen", endpoint, "--ctx-size", "32768", "--max-seqs", "8", "--threads", "2"]
        return self._spawn("demesne-engine", args + list(extra), env)

    def gateway(self, endpoints: list[str], *extra: str) -> tuple[Proc, str]:
        port = free_port()
        args = ["--port", str(port)] + [a for e in endpoints for a in ("--engine", e)]
        proc = self._spawn("demesne-gateway", args + list(extra))
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc)
        return proc, url

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def wait_healthy(url: str, proc: Proc, timeout: float = 120.0) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"process exited ({proc.popen.returncode}):\n{proc.tail()}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not healthy after {timeout}s:\n{proc.tail()}")


_FIRST_PROC = pytest.StashKey[int]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed end-to-end test carries the logs of the processes it ran (CI keeps nothing
    else): those it started, and the shared server's."""
    report = (yield).get_result()
    procs = item.funcargs.get("processes") if hasattr(item, "funcargs") else None
    if procs is None:
        return
    if report.when == "setup":
        item.stash[_FIRST_PROC] = len(procs.procs)
    elif report.failed:
        first = item.stash.get(_FIRST_PROC, len(procs.procs))
        mine = procs.procs[first:]
        server = item.funcargs.get("server")
        if server is not None:
            mine = [server.engine, server.gateway, *mine]
        for proc in mine:
            report.sections.append((f"log {proc.log.name} (exit {proc.popen.poll()})", proc.tail()))


@pytest.fixture(scope="session")
def processes(model_path):
    procs = Processes(model_path)
    yield procs
    procs.close()


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT
    engine_endpoint: str
    engine: Proc
    gateway: Proc

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"


@pytest.fixture(scope="session")
def server(processes) -> Server:
    """One engine and one key-protected gateway, shared by the end-to-end tests."""
    endpoint = processes.endpoint("engine-main")
    engine = processes.engine(endpoint)
    gateway, url = processes.gateway([endpoint], "--api-key", API_KEY)
    return Server(url, endpoint, engine, gateway)


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as session:
        yield session


@pytest.fixture(scope="session")
def model_id(server) -> str:
    return os.path.splitext(os.path.basename(resolve_model(None)))[0]
