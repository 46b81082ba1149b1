"""`demesne serve`: one engine child process, kept running, and the gateway in this process.

The engine is supervised as systemd would: when it dies it is started again (backoff from
1 s doubling to 30 s, reset after a minute up), and the gateway, which notices the closed
connection at once, answers 503 meanwhile and serves again on the first Pong. An engine that
exits with code 2 (a model or setting that cannot work) is not restarted: serve exits with it.

SIGTERM or SIGINT drains: the engine is told to stop taking requests and finish its running
ones (``--drain-timeout``) while the gateway keeps streaming them; then both stop.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import multiprocessing
import shutil
import signal
import tempfile
import time

from .config import EngineConfig, GatewayConfig, runtime_base

log = logging.getLogger("demesne")

BACKOFF_MIN, BACKOFF_MAX = 1.0, 30.0
STABLE_AFTER = 60.0  # seconds up after which a crash starts the backoff again from the minimum
EXIT_UNUSABLE = 2  # the engine's exit code for a model or setting that cannot work


def private_endpoint() -> tuple[str, str]:
    """A fresh directory only this user can enter (0700), and an IPC endpoint inside it
    (mkdtemp's own default where there is no usable runtime directory: the temp dir)."""
    directory = tempfile.mkdtemp(prefix="demesne-", dir=runtime_base())
    return f"ipc://{directory}/engine.sock", directory


def supervised_engine(config: EngineConfig, log_level: str) -> None:
    """The child's body: Ctrl-C reaches only the parent, which drains us with SIGTERM; and
    we die with the parent rather than run on as an orphan."""
    from .cli import run_engine

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:  # Linux: PR_SET_PDEATHSIG
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    run_engine(config, log_level)


class EngineSupervisor:
    def __init__(self, config: EngineConfig, log_level: str):
        self.config = config
        self.log_level = log_level
        self.proc: multiprocessing.Process | None = None
        self.restarts = 0

    def _start(self) -> None:
        self.proc = multiprocessing.get_context("spawn").Process(
            target=supervised_engine, args=(self.config, self.log_level), name="demesne-engine"
        )
        self.proc.start()

    async def run(self, stop: asyncio.Event) -> int:
        """Keep an engine running until ``stop`` is set, then drain it; serve's exit code."""
        backoff = BACKOFF_MIN
        while True:
            started = time.monotonic()
            self._start()
            while self.proc.is_alive() and not stop.is_set():
                await _wait(stop, 0.2)
            if stop.is_set():
                await self._drain()
                return 0
            code = self.proc.exitcode
            if code == EXIT_UNUSABLE:
                log.error("the engine cannot start (exit code 2); stopping")
                return EXIT_UNUSABLE
            if time.monotonic() - started > STABLE_AFTER:
                backoff = BACKOFF_MIN
            log.error("the engine exited (code %s); starting it again in %.0f s", code, backoff)
            await _wait(stop, backoff)
            if stop.is_set():
                return 0
            backoff = min(backoff * 2, BACKOFF_MAX)
            self.restarts += 1

    async def _drain(self) -> None:
        proc = self.proc
        if proc is None or not proc.is_alive():
            return
        proc.terminate()  # SIGTERM: the engine drains
        deadline = time.monotonic() + self.config.drain_timeout + 15
        while proc.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if proc.is_alive():
            log.error("the engine did not stop in time; killing it")
            proc.kill()
        proc.join()


async def _wait(event: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except asyncio.TimeoutError:
        pass


async def serve(engine_config: EngineConfig, gateway_config: GatewayConfig, log_level: str) -> int:
    from .gateway.app import serve_gateway

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    supervisor = EngineSupervisor(engine_config, log_level)
    supervised = asyncio.ensure_future(supervisor.run(stop))
    await serve_gateway(gateway_config, until=supervised)
    return supervised.result()


def remove_dir(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)
