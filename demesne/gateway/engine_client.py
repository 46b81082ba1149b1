"""The gateway's side of the engines: one DEALER socket and listener task per engine, a queue
per request, heartbeats, and the choice of engine for each request.

A reply from an engine is sorted by request id into that request's queue. Whether an engine
can take *new* requests and whether its *running* requests are lost are different questions:

- an engine that has not answered a heartbeat for ``heartbeat_timeout`` seconds (its I/O
  thread answers even mid-step, so it is stopped or the host is starved) gets no new
  requests, but its requests keep waiting: no timeout fails a request still being served;
- an engine whose connection closed (the process exited; ZeroMQ's socket monitor says so at
  once, TCP keepalive for a vanished host) or that restarted (a new engine id) has lost its
  requests: they fail at once with :class:`EngineUnavailable` (the gateway answers 503);
- an engine that is draining (SIGTERM) finishes its requests and gets no new ones; one
  that refuses a request as draining before its Pong said so has it sent to another engine;
- an engine of another protocol version, or claiming a model id that a live engine serves
  with another fingerprint (models.py), is refused, with one log line and a clear 503;
- an engine whose model this gateway has not loaded yet (its vocabulary is on its way) waits.

A cut link (no TCP acknowledgement for ``--link-timeout`` seconds; the kernel acknowledges for
a busy process, so this is never a slow engine) closes the connection, which fails its requests
as above. Engines on TCP are reached with CURVE (curve.py); a failed handshake is logged once.

The engine list is ``--engine`` plus ``--engines-file``; :meth:`EngineClient.reload` (SIGHUP)
re-reads the file: new engines are connected, engines no longer listed take no new requests
and are closed once their requests have finished.

ZeroMQ reconnects by itself; the first compatible Pong after that makes the engine usable.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from .. import curve
from .. import protocol as p
from .. import sockets
from ..config import ConfigError, GatewayConfig
from .engine_link import HANDSHAKE_FAILURES, EngineConn, close_socket, open_socket
from .models import ModelRegistry
from .routing import BLOCK, block_hashes, choose

log = logging.getLogger("demesne.gateway")


DISCONNECT_GRACE = 0.5  # seconds for the listener to read what came before a disconnect
AUTH_RETRY = 5.0  # seconds before trying again an engine that refused our key
VOCAB_TIMEOUT = 120.0  # seconds to receive a vocabulary (megabytes over a slow link)
DRAIN_BATCH = 64  # frames read in one go before the event loop gets a turn


class EngineUnavailable(RuntimeError):
    """No engine can take the request, or its engine stopped answering."""


class EngineRefused(RuntimeError):
    """The engine answered the request with an Error message."""

    def __init__(self, error: p.Error):
        super().__init__(error.message)
        self.error = error


class EngineClient:
    def __init__(self, config: GatewayConfig, registry: ModelRegistry):
        self.config = config
        self.registry = registry
        self._zctx = zmq.asyncio.Context()
        self.identity = uuid.uuid4().bytes  # engines key our requests by it, with their ids
        self.engines: list[EngineConn] = []
        self._queues: dict[str, asyncio.Queue] = {}
        self._owner: dict[str, EngineConn] = {}
        self._vocab_waiters: dict[tuple[EngineConn, str], asyncio.Future] = {}
        self.known_models: set[str] = set()  # every model id an engine has reported
        self._tasks: list[asyncio.Task] = []
        self._loop: asyncio.AbstractEventLoop | None = None  # set by the first _listen
        self._turn = itertools.count()  # --route round-robin
        self._once = curve.OnceLog(log)

    def _connect(self, endpoint: str, key: str | None) -> EngineConn:
        sock, monitor = open_socket(self._zctx, self.config, self.identity, endpoint, key)
        engine = EngineConn(endpoint, sock, key, monitor=monitor, model_loaded=self.registry.loaded)
        self._listen(engine)
        engine.tasks = [asyncio.get_running_loop().create_task(self._watch(engine))]
        self.engines.append(engine)
        return engine

    def _resocket(self, engine: EngineConn) -> None:
        """Connect ``engine`` afresh: ZeroMQ stops retrying once an engine refused our key,
        and the key may be admitted later (the engine re-reads its directory on SIGHUP)."""
        self._close_socket(engine)
        engine.sock, engine.monitor = open_socket(self._zctx, self.config, self.identity, engine.endpoint, engine.key)
        self._listen(engine)

    def _close_socket(self, engine: EngineConn) -> None:
        if engine.fd >= 0:
            self._loop.remove_reader(engine.fd)
            engine.fd = -1
        close_socket(engine)

    async def start(self) -> None:
        for endpoint, key in self.config.engine_list():
            self._connect(endpoint, key)
        self._tasks.append(asyncio.get_running_loop().create_task(self._heartbeat()))

    def reload(self) -> None:
        """Re-read the engine list (SIGHUP): connect new engines, retire unlisted ones."""
        try:
            listed = dict(self.config.engine_list())
        except ConfigError as exc:
            log.error("not reloading the engine list: %s", exc)
            return
        current = {(e.endpoint, e.key): e for e in self.engines if not e.retired}
        for (endpoint, key), engine in current.items():
            if endpoint not in listed or listed[endpoint] != key:
                log.info("engine %s is no longer listed: it takes no new requests and is closed after its %d requests", endpoint, engine.load)
                engine.retired = True
        for endpoint, key in listed.items():
            if (endpoint, key) not in current:
                log.info("engine %s added", endpoint)
                self._connect(endpoint, key)
        self._close_retired()

    def _close_retired(self) -> None:
        for engine in [e for e in self.engines if e.retired and not e.inflight]:
            self.engines.remove(engine)
            for task in engine.tasks:
                task.cancel()
            self._close_socket(engine)

    async def close(self) -> None:
        tasks = self._tasks + [t for e in self.engines for t in e.tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.registry.close()
        for e in self.engines:
            self._close_socket(e)
        self._zctx.term()

    # -- what the routes use ------------------------------------------------------------

    def models(self) -> set[str]:
        """The models with a live engine. Connected is enough: a model does not vanish from the
        list while its engine is busy."""
        return {e.info.id for e in self.engines if e.connected and e.ready and not e.retired}

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
        return any(e.routable for e in self.engines)

    @staticmethod
    def new_request_id() -> str:
        """Unique across gateways and hosts; the engine logs and keys requests by it."""
        return uuid.uuid4().hex

    def pick(self, model_id: str, prompt: list[int]) -> EngineConn:
        """The live engine serving ``model_id`` most likely to hold the prompt's prefix, unless
        it is ``--route-slack`` requests busier than the least loaded (routing.py); with
        ``--route round-robin``, the next one in turn."""
        candidates = [e for e in self.engines if e.routable and e.info.id == model_id]
        if not candidates:
            raise EngineUnavailable(self.why_unavailable(model_id))
        if self.config.route == "round-robin":
            engine, matched = candidates[next(self._turn) % len(candidates)], 0
        else:
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
                    other = self._elsewhere(engine, req, item)
                    if other is not None:
                        engine = other
                        continue
                    finished = True
                    raise EngineRefused(item)
                else:
                    finished = True
                    raise item
        finally:
            self._forget(req.rid)
            if not finished:  # whatever the engine's state: it may still be decoding it
                self._try_send(engine, p.Abort(req.rid))

    def _elsewhere(self, engine: EngineConn, req: p.Generate, error: p.Error) -> EngineConn | None:
        """A request an engine refused because it is draining (its SIGTERM came before the
        Pong saying so) is sent again, as it is, to another engine serving the model, if one
        can take it: the engine did no work on it, and the client need not retry. None: the
        refusal stands."""
        if error.code != "engine_draining" or engine.info is None:
            return None
        _set_draining(engine, True)  # so it is not picked again: at most one resend per engine
        try:
            other = self.pick(engine.info.id, req.prompt)
        except EngineUnavailable:
            return None
        engine.routed -= 1  # it served nothing
        engine.inflight.discard(req.rid)
        self._owner[req.rid] = other
        other.inflight.add(req.rid)
        if not self._try_send(other, req):
            return None
        return other

    def why_unavailable(self, model_id: str) -> str:
        """Why no engine can take a request for ``model_id``, in words for the client."""
        mine = [e for e in self.engines if e.info is None or e.info.id == model_id]
        refused = [e.refused or e.handshake for e in mine if e.refused or e.handshake]
        if refused:
            return refused[0]
        serving = [e for e in mine if e.info is not None and e.connected]
        if any(not e.ready for e in serving):
            return f"the gateway is loading the vocabulary of {model_id} from its engine; retry shortly"
        if any(e.draining for e in serving):
            return f"the engine serving {model_id} is shutting down; retry shortly"
        if serving:
            return f"the engine serving {model_id} is not answering (overloaded or stopped); retry shortly"
        return f"no engine serving {model_id} is reachable"

    def _send(self, engine: EngineConn, msg: p.Message) -> None:
        if not self._try_send(engine, msg):
            raise EngineUnavailable(f"engine {engine.endpoint} is not connected")

    def _try_send(self, engine: EngineConn, msg: p.Message) -> bool:
        """False when the engine is not connected (nothing is queued for it) or its queue is
        full."""
        if not engine.connected:
            return False
        try:
            engine.sock.send(p.encode(msg), zmq.NOBLOCK)
        except zmq.ZMQError:
            return False
        finally:
            # A send may consume the descriptor's signal while frames wait unread: look again.
            self._loop.call_soon(self._drain, engine)
        return True

    def _forget(self, rid: str) -> None:
        self._queues.pop(rid, None)
        owner = self._owner.pop(rid, None)
        if owner is not None:
            owner.inflight.discard(rid)
            if owner.retired and not owner.inflight:
                self._close_retired()

    async def fetch_vocab(self, engine: EngineConn, digest: str) -> bytes:
        """The vocabulary-only GGUF with this digest, from ``engine``."""
        future = asyncio.get_running_loop().create_future()
        self._vocab_waiters[(engine, digest)] = future
        try:
            self._send(engine, p.GetVocab(digest))
            log.info("fetching the vocabulary of %s from engine %s", engine.info.id if engine.info else "?", engine.endpoint)
            return await asyncio.wait_for(future, VOCAB_TIMEOUT)
        finally:
            self._vocab_waiters.pop((engine, digest), None)

    def _on_vocab(self, engine: EngineConn, msg: p.Vocab) -> None:
        future = self._vocab_waiters.get((engine, msg.digest))
        if future is None or future.done():
            return
        if len(msg.data) > (p.MAX_VOCAB_BYTES + 2) // 3 * 4:
            future.set_exception(ValueError(f"the vocabulary is larger than {p.MAX_VOCAB_BYTES} bytes"))
            return
        if not msg.data:
            future.set_exception(ValueError("the engine has no vocabulary of that digest"))
            return
        try:
            future.set_result(base64.b64decode(msg.data, validate=True))
        except binascii.Error:
            future.set_exception(ValueError("the vocabulary is not valid base64"))

    # -- background tasks ---------------------------------------------------------------

    def _listen(self, engine: EngineConn) -> None:
        """Read ``engine``'s frames from a callback on its socket's descriptor. ZeroMQ's
        descriptor only signals that the socket's state changed, so each wake-up (and each
        send, which may take that signal) reads every frame that is ready."""
        self._loop = asyncio.get_running_loop()
        engine.fd = engine.sock.getsockopt(zmq.FD)
        self._loop.add_reader(engine.fd, self._drain, engine)
        self._loop.call_soon(self._drain, engine)

    def _drain(self, engine: EngineConn) -> None:
        sock = engine.sock
        for _ in range(DRAIN_BATCH):
            try:
                # (asking first: a recv that finds nothing raises, and that costs more)
                if sock.closed or not sockets.has_input(sock):
                    return
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.ZMQError as exc:  # closed under us: its successor has its own reader
                log.debug("reading %s: %s", engine.endpoint, exc)
                return
            try:
                self._on_frame(engine, frame)
            except Exception:  # noqa: BLE001 - one frame must not stop the reading
                log.exception("handling a frame from %s", engine.endpoint)
        self._loop.call_soon(self._drain, engine)  # more wait: after the loop's other work

    def _on_frame(self, engine: EngineConn, frame: bytes) -> None:
        try:
            msg = p.decode(frame)
        except p.ProtocolError as exc:
            log.warning("bad frame from %s: %s", engine.endpoint, exc)
            return
        engine.last_seen = time.monotonic()
        if isinstance(msg, p.Deltas):
            for delta in msg.items:
                self._deliver(delta.rid, delta)
        elif isinstance(msg, p.Error):
            self._deliver(msg.rid, msg)
        elif isinstance(msg, p.Pong):
            self._on_pong(engine, msg)
        elif isinstance(msg, p.Vocab):
            self._on_vocab(engine, msg)

    def _deliver(self, rid: str, item) -> None:
        queue = self._queues.get(rid)
        if queue is not None:  # else: the request was abandoned; drop late replies
            queue.put_nowait(item)

    def _on_pong(self, engine: EngineConn, pong: p.Pong) -> None:
        if pong.version != p.PROTOCOL_VERSION:
            self._refuse(engine, pong.version)
            return
        engine.refused = self._clash(engine, pong.model)
        if engine.engine_id != pong.engine_id:  # a new process: its cache starts empty
            if engine.engine_id is not None:
                self._fail_inflight(engine, f"engine {engine.endpoint} restarted")
            engine.engine_id = pong.engine_id
            engine.prefix.clear()
        if pong.closing:  # every reply before this pong has been read and delivered
            self._try_send(engine, p.Ping(time.time(), bye=True))
        engine.stats = pong.stats
        engine.ponged.set()
        engine.info = pong.model
        engine.connected = True  # a pong can beat the monitor's event
        _set_draining(engine, pong.draining)
        self.known_models.add(pong.model.id)
        if not engine.responsive:
            engine.responsive = True
            log.info("engine %s is up (%s)", engine.endpoint, pong.model.id)
        if engine.refused is None:
            self._check_model(engine, pong.model)

    def _check_model(self, engine: EngineConn, info: p.ModelInfo) -> None:
        if not self.registry.loaded(info):
            self.registry.load(info, lambda: self.fetch_vocab(engine, info.vocab_digest))

    def _clash(self, engine: EngineConn, info: p.ModelInfo) -> str | None:
        """Why ``engine`` may not serve ``info``: a live engine serves that id as another model."""
        for other in self.engines:
            if other is not engine and other.alive and other.info.id == info.id and other.info.fingerprint != info.fingerprint:
                why = (
                    f"engine {engine.endpoint} claims model {info.id} with fingerprint {info.fingerprint}, but engine"
                    f" {other.endpoint} serves {info.id} with fingerprint {other.info.fingerprint}: not using it"
                    " (give different models different --model-alias)"
                )
                self._once(("clash", engine.endpoint, info.fingerprint), "%s", why)
                return why
        return None

    def _refuse(self, engine: EngineConn, version: int) -> None:
        if engine.refused is None:
            engine.refused = (
                f"engine {engine.endpoint} speaks protocol v{version}; this gateway speaks"
                f" v{p.PROTOCOL_VERSION} (upgrade one of them)"
            )
            log.error("%s; not using it", engine.refused)

    async def _watch(self, engine: EngineConn) -> None:
        """Connection events: a closed connection means the engine's requests are lost."""
        while True:
            message = parse_monitor_message(await engine.monitor.recv_multipart())
            event = message["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:  # connected, and keys checked (CURVE)
                engine.connected = True
                engine.handshake = None
                self._once.forget(("handshake", engine.endpoint))
                self._try_send(engine, p.Ping(time.time()))
            elif event in HANDSHAKE_FAILURES:
                engine.handshake = f"engine {engine.endpoint} {HANDSHAKE_FAILURES[event]}"
                self._once(("handshake", engine.endpoint), "%s", engine.handshake)
                if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    await asyncio.sleep(AUTH_RETRY)
                    self._resocket(engine)
            elif event == zmq.EVENT_DISCONNECTED and engine.connected:
                engine.connected = engine.responsive = engine.draining = False
                engine.prefix.clear()
                log.warning("engine %s closed the connection", engine.endpoint)
                # The monitor is a socket of its own: frames the engine sent before closing
                # (a drained engine's last deltas) may still wait unread on the data socket.
                # The listener reads them first, however long that takes on a busy host.
                await asyncio.sleep(DISCONNECT_GRACE)
                while not engine.connected and sockets.has_input(engine.sock):
                    self._drain(engine)  # (asking took the descriptor's signal)
                    await asyncio.sleep(0.05)
                if not engine.connected:
                    self._fail_inflight(engine, f"engine {engine.endpoint} went away")

    async def _heartbeat(self) -> None:
        last = time.monotonic()
        while True:
            now = time.monotonic()
            # A beat that comes late means this process was stalled (a busy host): the engines'
            # answers may be waiting unread, so silence proves nothing this time round.
            stalled = now - last > self.config.heartbeat_interval + 1.0
            last = now
            for engine in self.engines:
                if stalled:
                    engine.last_seen = max(engine.last_seen, now - self.config.heartbeat_interval)
                elif engine.responsive and now - engine.last_seen > self.config.heartbeat_timeout:
                    engine.responsive = False
                    log.warning(
                        "engine %s has not answered for %.1f s; no new requests go to it, its %d"
                        " requests keep waiting", engine.endpoint, now - engine.last_seen, len(engine.inflight),
                    )
                self._try_send(engine, p.Ping(time.time()))
            await asyncio.sleep(self.config.heartbeat_interval)

    def _fail_inflight(self, engine: EngineConn, why: str) -> None:
        if engine.inflight:
            log.warning("%s; failing its %d requests", why, len(engine.inflight))
        gone = EngineUnavailable(why)
        for rid in list(engine.inflight):
            self._deliver(rid, gone)


def _set_draining(engine: EngineConn, draining: bool) -> None:
    if draining and not engine.draining:
        log.warning("engine %s is draining; new requests go elsewhere", engine.endpoint)
    engine.draining = draining
