"""The engine process: a ROUTER socket in and out, and a short loop around Engine.step().

Loop: drain every waiting message without blocking (block briefly when idle), run one step,
send each gateway one frame with all of its deltas. Gateways ping every second; one silent
for ``CLIENT_TIMEOUT`` seconds is taken as gone and its requests are aborted.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import defaultdict

import zmq

from .. import protocol as p
from ..config import EngineConfig
from .core import Engine
from .runner import ModelRunner

log = logging.getLogger("demesne.engine")

IDLE_POLL_MS = 100
CLIENT_TIMEOUT = 15.0


class EngineProc:
    def __init__(self, config: EngineConfig, engine: Engine):
        self.config = config
        self.engine = engine
        # Unique per process: a gateway that sees it change knows the KV cache is new.
        self.engine_id = f"{config.model_id}@{config.listen}#{os.getpid()}.{time.time_ns():x}"
        self.zctx = zmq.Context()
        self.sock = self.zctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(config.listen)
        self.last_seen: dict[bytes, float] = {}
        self.stopping = False

    def run(self) -> None:
        log.info("engine ready: %s on %s", self.config.model_id, self.config.listen)
        while not self.stopping:
            self._drain(0 if self.engine.has_work else IDLE_POLL_MS)
            if self.engine.has_work:
                self._send(self.engine.step())
            self._forget_silent_clients()
        self.close()

    def _drain(self, timeout_ms: int) -> None:
        if not self.sock.poll(timeout_ms):
            return
        while True:
            try:
                client, frame = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:  # not two frames: not one of ours
                continue
            self.last_seen[client] = time.monotonic()
            self._handle(client, frame)

    def _handle(self, client: bytes, frame: bytes) -> None:
        try:
            msg = p.decode(frame)
        except p.ProtocolError as exc:
            log.warning("dropping a bad frame: %s", exc)
            return
        if isinstance(msg, p.Ping):
            self._reply(client, p.Pong(msg.sent, self.engine_id, self.engine.model_info, self.engine.stats()))
        elif isinstance(msg, p.Generate):
            try:
                error = self.engine.submit(client, msg)
            except Exception as exc:  # a request must never take the engine down
                log.exception("refusing request %s", msg.rid)
                error = p.Error(msg.rid, 400, f"invalid request: {exc}", "invalid_request")
            if error is not None:
                self._reply(client, error)
        elif isinstance(msg, p.Abort):
            self.engine.abort(msg.rid)

    def _reply(self, client: bytes, msg: p.Message) -> None:
        self.sock.send_multipart([client, p.encode(msg)])

    def _send(self, deltas: list[tuple[bytes, p.Delta]]) -> None:
        by_client: dict[bytes, list[p.Delta]] = defaultdict(list)
        for client, delta in deltas:
            by_client[client].append(delta)
        for client, items in by_client.items():
            self._reply(client, p.Deltas(items))

    def _forget_silent_clients(self) -> None:
        now = time.monotonic()
        for client, seen in list(self.last_seen.items()):
            if now - seen > CLIENT_TIMEOUT:
                del self.last_seen[client]
                n = self.engine.abort_client(client)
                if n:
                    log.warning("a gateway went silent; aborted its %d requests", n)

    def close(self) -> None:
        self.sock.close()
        self.zctx.term()


def serve_engine(config: EngineConfig) -> None:
    runner = ModelRunner(config)
    engine = Engine(config, runner)
    proc = EngineProc(config, engine)

    def stop(signum, _frame):
        log.info("engine stopping (signal %d)", signum)
        proc.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        proc.run()
    finally:
        runner.close()
