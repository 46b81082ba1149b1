"""The gateway's side of the engines: one DEALER socket and listener task per engine, a queue
per request, heartbeats, and the choice of engine for each request.

A reply from an engine is sorted by request id into that request's queue. An engine silent
for ``heartbeat_timeout`` seconds is marked down and its in-flight requests fail with
:class:`EngineUnavailable` (the gateway answers 503); ZeroMQ reconnects by itself, and the
first Pong after that marks the engine up again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from .. import protocol as p
from ..config import GatewayConfig
from .routing import BLOCK, PrefixIndex, block_hashes, choose

log = logging.getLogger("demesne.gateway")


class EngineUnavailable(RuntimeError):
    """No engine can take the request, or its engine stopped answering."""


class EngineRefused(RuntimeError):
    """The engine answered the request with an Error message."""

    def __init__(self, error: p.Error):
        super().__init__(error.message)
        self.error = error


@dataclass(eq=False)
class EngineConn:
    endpoint: str
    sock: zmq.asyncio.Socket
    info: p.ModelInfo | None = None
    stats: dict[str, float] = field(default_factory=dict)
    alive: bool = False
    last_seen: float = 0.0
    inflight: set[str] = field(default_factory=set)
    ponged: asyncio.Event = field(default_factory=asyncio.Event)
    engine_id: str | None = None  # changes when the engine process restarts
    prefix: PrefixIndex = field(default_factory=PrefixIndex)  # what we think it holds
    routed: int = 0  # requests sent here
    routed_cached: int = 0  # prompt tokens the routing expected it to hold

    @property
    def load(self) -> int:
        return len(self.inflight)


class EngineClient:
    def __init__(self, config: GatewayConfig, on_model: Callable[[p.ModelInfo], None] | None = None):
        self.config = config
        self.on_model = on_model  # called once per model id, when an engine first reports it
        self._zctx = zmq.asyncio.Context()
        self.engines = [self._connect(ep) for ep in config.engines]
        self._queues: dict[str, asyncio.Queue] = {}
        self._owner: dict[str, EngineConn] = {}
        self._known_models: set[str] = set()
        self._ids = itertools.count()
        self._prefix = f"{os.getpid():x}-{int(time.time()):x}"
        self._tasks: list[asyncio.Task] = []

    def _connect(self, endpoint: str) -> EngineConn:
        sock = self._zctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        # Queue nothing for an engine that is not connected: a request sent then would run
        # later on a restarted engine for a client that was already told 503.
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.connect(endpoint)
        return EngineConn(endpoint, sock)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._listen(e)) for e in self.engines]
        self._tasks.append(loop.create_task(self._heartbeat()))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for e in self.engines:
            e.sock.close()
        self._zctx.term()

    # -- what the routes use ------------------------------------------------------------

    def models(self) -> dict[str, p.ModelInfo]:
        return {e.info.id: e.info for e in self.engines if e.info is not None and e.alive}

    async def refresh_stats(self, timeout: float = 2.0) -> None:
        """Ask every live engine for its counters now, and wait (briefly) for the answers."""
        waiting = []
        for engine in self.engines:
            if engine.alive:
                engine.ponged.clear()
                self._try_send(engine, p.Ping(time.time()))
                waiting.append(engine.ponged.wait())
        if waiting:
            await asyncio.wait([asyncio.ensure_future(w) for w in waiting], timeout=timeout)

    def any_alive(self) -> bool:
        return any(e.alive for e in self.engines)

    def new_request_id(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    def pick(self, model_id: str, prompt: list[int]) -> EngineConn:
        """The live engine serving ``model_id`` most likely to hold the prompt's prefix, unless
        it is ``--route-slack`` requests busier than the least loaded (routing.py)."""
        candidates = [e for e in self.engines if e.alive and e.info is not None and e.info.id == model_id]
        if not candidates:
            raise EngineUnavailable(f"no engine serving {model_id} is reachable")
        engine, matched = choose(candidates, block_hashes(prompt), self.config.route_slack)
        engine.routed += 1
        engine.routed_cached += matched * BLOCK
        return engine

    async def generate(self, engine: EngineConn, req: p.Generate) -> AsyncIterator[p.Delta]:
        """Send ``req`` and yield its deltas until the one with ``finish``.

        Leaving early (the client went away, a stop string matched) sends an Abort.
        """
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[req.rid] = queue
        self._owner[req.rid] = engine
        engine.inflight.add(req.rid)
        finished = False
        try:
            self._send(engine, req)
            while True:
                item = await queue.get()
                if isinstance(item, p.Delta):
                    finished = item.finish is not None
                    yield item
                    if finished:
                        return
                elif isinstance(item, p.Error):
                    finished = True
                    raise EngineRefused(item)
                else:
                    finished = True
                    raise item
        finally:
            self._forget(req.rid)
            if not finished and engine.alive:
                self._try_send(engine, p.Abort(req.rid))

    def _send(self, engine: EngineConn, msg: p.Message) -> None:
        if not self._try_send(engine, msg):
            raise EngineUnavailable(f"engine {engine.endpoint} is not connected")

    @staticmethod
    def _try_send(engine: EngineConn, msg: p.Message) -> bool:
        # A non-blocking send on an asyncio socket resolves at once: a future that holds
        # zmq.Again when the engine is not connected (IMMEDIATE) or its queue is full.
        sent = engine.sock.send(p.encode(msg), zmq.NOBLOCK)
        return sent.exception() is None

    def _forget(self, rid: str) -> None:
        self._queues.pop(rid, None)
        owner = self._owner.pop(rid, None)
        if owner is not None:
            owner.inflight.discard(rid)

    # -- background tasks ---------------------------------------------------------------

    async def _listen(self, engine: EngineConn) -> None:
        while True:
            frame = await engine.sock.recv()
            try:
                msg = p.decode(frame)
            except p.ProtocolError as exc:
                log.warning("bad frame from %s: %s", engine.endpoint, exc)
                continue
            engine.last_seen = time.monotonic()
            if isinstance(msg, p.Deltas):
                for delta in msg.items:
                    self._deliver(delta.rid, delta)
            elif isinstance(msg, p.Error):
                self._deliver(msg.rid, msg)
            elif isinstance(msg, p.Pong):
                self._on_pong(engine, msg)

    def _deliver(self, rid: str, item) -> None:
        queue = self._queues.get(rid)
        if queue is not None:  # else: the request was abandoned; drop late replies
            queue.put_nowait(item)

    def _on_pong(self, engine: EngineConn, pong: p.Pong) -> None:
        if engine.engine_id != pong.engine_id:  # a new process: its cache starts empty
            engine.engine_id = pong.engine_id
            engine.prefix.clear()
        engine.stats = pong.stats
        engine.ponged.set()
        engine.info = pong.model
        if pong.model.id not in self._known_models:
            self._known_models.add(pong.model.id)
            if self.on_model is not None:
                self.on_model(pong.model)
        if not engine.alive:
            engine.alive = True
            log.info("engine %s is up (%s)", engine.endpoint, pong.model.id)

    async def _heartbeat(self) -> None:
        while True:
            now = time.monotonic()
            for engine in self.engines:
                if engine.alive and now - engine.last_seen > self.config.heartbeat_timeout:
                    self._mark_down(engine)
                self._try_send(engine, p.Ping(time.time()))
            await asyncio.sleep(self.config.heartbeat_interval)

    def _mark_down(self, engine: EngineConn) -> None:
        engine.alive = False
        engine.prefix.clear()
        log.warning("engine %s stopped answering; failing its %d requests", engine.endpoint, len(engine.inflight))
        gone = EngineUnavailable(f"engine {engine.endpoint} stopped answering")
        for rid in list(engine.inflight):
            self._deliver(rid, gone)
