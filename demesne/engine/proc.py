"""The engine process: an I/O thread that owns the socket, and the step loop beside it.

The I/O thread answers every Ping at once, mid-step too (``llama_decode`` releases the GIL),
so a slow step is never taken for a dead engine. It checks every frame and hands requests to
the step loop through a queue. The step loop: take what arrived, run one step, send its
replies, publish counters. Both use the one ROUTER socket, one at a time under a lock (a
ZeroMQ socket may change threads across a full memory barrier): the step loop sends its
replies itself instead of waking the I/O thread for every token, which on a machine whose
cores all run llama.cpp costs a core's worth of time per token. The I/O thread waits on
the socket's descriptor outside the lock; a send can take that descriptor's signal while
frames wait unread, so after its sends the step loop looks and wakes the I/O thread
(a pipe) if they do.

SIGTERM (or SIGINT) drains: new requests are refused with 503 and gateways are told at once
(they route elsewhere), running requests finish within ``--drain-timeout``, what is left is
failed, and the process exits: after the last replies it sends each gateway a closing Pong
and waits (at most ``BYE_WAIT``) for its ``bye``, since ZeroMQ may drop frames still in flight
when the connection closes. A second signal ends the drain at once. A gateway silent for
``--gateway-timeout`` seconds is taken as gone: its requests are aborted *and* failed, so a
gateway that was only stalled ends those streams with an error instead of waiting forever.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import os
import queue
import select
import signal
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

import zmq
from zmq.utils.monitor import parse_monitor_message

from .. import curve
from .. import protocol as p
from .. import sockets
from ..config import ConfigError, EngineConfig, is_tcp
from .core import Engine
from .model_card import GGUFError, ModelCard, read_card
from .runner import ModelRunner

log = logging.getLogger("demesne.engine")

IDLE_WAIT = 0.1  # seconds the step loop blocks for new work when it has none
IO_WAIT = 0.1  # seconds the I/O thread waits for frames before its housekeeping
STATS_EVERY = 0.1  # seconds between refreshes of the counters Pongs carry
SEND_HWM = 100_000  # frames queued for one slow gateway before ZeroMQ would drop them
BYE_WAIT = 5.0  # seconds the I/O thread waits for gateways to confirm they read everything
_GONE = object()  # in the inbox: a gateway went away


@dataclass(slots=True)
class Status:
    """What the I/O thread reports about the step loop; written by the step loop only."""

    stats: dict[str, float] = field(default_factory=dict)
    draining: bool = False
    step_started: float = 0.0  # monotonic time the running step began; 0 between steps


class EngineIO(threading.Thread):
    """Owns the ROUTER socket: pings answered at once, requests queued, replies sent."""

    def __init__(self, zctx: zmq.Context, config: EngineConfig, engine_id: str, card: ModelCard, model: p.ModelInfo, status: Status):
        super().__init__(name="engine-io", daemon=True)
        self.engine_id, self.card, self.status = engine_id, card, status
        self.model = dataclasses.replace(
            model, fingerprint=card.fingerprint, vocab_digest=card.vocab_digest, vocab_bytes=len(card.vocab),
        )
        self._vocab_frame: bytes | None = None  # the Vocab message, encoded on first request
        self.client_timeout = config.gateway_timeout
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.sock = zctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a gone gateway raises
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a gateway that reconnects keeps its id
        self.sock.setsockopt(zmq.SNDHWM, SEND_HWM)
        self.sock.setsockopt(zmq.MAXMSGSIZE, p.MAX_FRAME_BYTES)  # a peer cannot make us hold more
        self.refusals = curve.OnceLog(log)
        self.auth = self.clients = None
        if config.curve_key is not None:
            self.auth, self.clients = curve.serve_curve(zctx, self.sock, config.curve_key, config.curve_clients, self.refusals)
        if is_tcp(config.listen):
            curve.set_link_timeout(self.sock, config.link_timeout)
        self.monitor = self.sock.get_monitor_socket(curve.HANDSHAKE_EVENTS & ~zmq.EVENT_HANDSHAKE_SUCCEEDED)
        sockets.bind(self.sock, config.listen)
        # Held while a thread uses sock (the I/O thread reading and answering, the step loop
        # sending); reentrant: sends made while handling frames take it again.
        self.lock = threading.RLock()
        self._wake_r, self._wake_w = os.pipe()  # the step loop wakes the I/O thread through it
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._stopping = False  # the step loop is done: close once its replies are read
        self._unreachable: dict[bytes, str] = {}  # gateways a send failed for, and why: forgotten by the I/O thread
        self.last_seen: dict[bytes, float] = {}
        self.refused: set[bytes] = set()  # gateways of another protocol version
        # Gateways that pinged this process (and were not since taken as gone). A gateway
        # pings before it sends requests, so a request from one that has not was queued for
        # an engine process that is gone (the gateway's socket kept it across the restart).
        self.greeted: set[bytes] = set()
        self.announced_drain = False
        self.closing_until: float | None = None  # set once the step loop is done
        self.awaiting_bye: set[bytes] = set()

    # -- the thread ----------------------------------------------------------------------

    def run(self) -> None:
        fds = [self.sock.getsockopt(zmq.FD), self.monitor.getsockopt(zmq.FD), self._wake_r]
        while True:
            with self.lock:
                frames = self._ready_frames()
            for client, frame in frames:
                self._handle(client, frame)
            with self.lock:
                while sockets.has_input(self.monitor):
                    self._handshake_failed()
                if self._stopping and self.closing_until is None:
                    self._start_closing()
                for client, why in self._unreachable.items():
                    if client in self.last_seen:
                        log.warning("a gateway cannot be reached (%s); aborting its requests", why)
                        self._forget(client)
                self._unreachable.clear()
                self._forget_silent()
                self._announce_drain()
                if self._closed():
                    break
                if sockets.has_input(self.sock):
                    continue  # (our own sends may have taken the descriptor's signal)
            select.select(fds, [], [], IO_WAIT)
            self._drain_wakes()
        if self.awaiting_bye:
            log.warning("closing without a bye from %d gateways: their last replies may be lost", len(self.awaiting_bye))
        with self.lock:
            self.sock.disable_monitor()
            self.monitor.close()
            self.sock.close(linger=2000)
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self.auth is not None:
            self.auth.stop()

    def deliver(self, frames: list[tuple[bytes, bytes]]) -> None:
        """The step loop's replies, sent from its own thread."""
        with self.lock:
            for client, frame in frames:
                self._send_frame(client, frame)
            if sockets.has_input(self.sock):
                self._wake()

    def stop(self) -> None:
        """The step loop is done and every reply is sent: start closing."""
        with self.lock:
            self._stopping = True
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except BlockingIOError:  # the pipe is full of wake-ups already
            pass

    def _drain_wakes(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _handshake_failed(self) -> None:
        """A peer failed the handshake: logged once per kind (a refused key is logged, with the
        key, by the authenticator)."""
        event = parse_monitor_message(self.monitor.recv_multipart())
        if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            why = {
                zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "a peer without CURVE keys tried to connect (a gateway without --curve-key and --engine-key, or not a gateway)",
                zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "a peer failed the CURVE handshake (a gateway whose --engine-key is not this engine's public key)",
            }.get(event["value"], f"a peer failed the handshake (ZeroMQ protocol error {event['value']:#x})")
            self.refusals(("protocol", event["value"]), "%s", why)

    def _closed(self) -> bool:
        if self.closing_until is None:
            return False
        return not self.awaiting_bye or time.monotonic() > self.closing_until

    def _start_closing(self) -> None:
        """The step loop is done and every reply is queued: tell each gateway, which answers
        with a bye once it has read all of them."""
        self.closing_until = time.monotonic() + BYE_WAIT
        self.status.draining = True
        pong = self._pong(0.0)
        pong.closing = True
        for client in list(self.greeted):
            self.awaiting_bye.add(client)
            self.send(client, pong)

    def _ready_frames(self) -> list[tuple[bytes, bytes]]:
        """Every frame waiting on the socket (read under the lock, handled outside it: a
        large request takes its time to check, and the step loop may want to send)."""
        frames = []
        while sockets.has_input(self.sock):
            parts = self.sock.recv_multipart(zmq.NOBLOCK)
            if len(parts) == 2:  # else: not one of ours
                self.last_seen[parts[0]] = time.monotonic()
                frames.append((parts[0], parts[1]))
        return frames

    def _handle(self, client: bytes, frame: bytes) -> None:
        try:
            msg = p.decode(frame)
        except p.ProtocolError as exc:
            log.warning("bad frame from a gateway: %s", exc)
            rid = p.request_id(frame)
            if rid is not None:
                self.send(client, p.Error(rid, 400, f"the engine could not read this request ({exc})", "invalid_frame"))
            return
        if isinstance(msg, p.Ping):
            self._on_ping(client, msg)
        elif isinstance(msg, p.GetVocab):
            self._send_frame(client, self._vocab(msg.digest))
        elif self.closing_until is not None:  # the step loop is gone
            if isinstance(msg, p.Generate):
                self.send(client, p.Error(msg.rid, 503, "the engine is shutting down; retry", "engine_draining"))
        elif client in self.refused:
            rid = getattr(msg, "rid", None)
            if isinstance(msg, p.Generate):
                self.send(client, p.Error(rid, 503, f"engine speaks protocol v{p.PROTOCOL_VERSION}; upgrade the gateway", "protocol_mismatch"))
        elif isinstance(msg, p.Generate) and client not in self.greeted:
            log.warning("refusing request %s: its gateway has not pinged this engine process (sent before a restart?)", msg.rid)
            self.send(client, p.Error(msg.rid, 503, "the engine restarted before this request reached it; retry", "engine_restarted"))
        else:
            self.inbox.put((client, msg))

    def _on_ping(self, client: bytes, ping: p.Ping) -> None:
        if ping.bye:
            self.awaiting_bye.discard(client)
            return
        if ping.version != p.PROTOCOL_VERSION:
            if client not in self.refused:
                log.error(
                    "refusing a gateway that speaks protocol v%s; this engine speaks v%d (upgrade one of them)",
                    ping.version, p.PROTOCOL_VERSION,
                )
            self.refused.add(client)
        else:
            self.refused.discard(client)
            self.greeted.add(client)
        self.send(client, self._pong(ping.sent))  # it carries our version: the gateway refuses too

    def _vocab(self, digest: str) -> bytes:
        if digest != self.card.vocab_digest:
            return p.encode(p.Vocab(digest, ""))
        if self._vocab_frame is None:
            self._vocab_frame = p.encode(p.Vocab(digest, base64.b64encode(self.card.vocab).decode()))
        return self._vocab_frame

    def _pong(self, sent: float) -> p.Pong:
        started = self.status.step_started
        return p.Pong(
            sent, self.engine_id, self.model, self.status.stats, p.PROTOCOL_VERSION,
            self.status.draining, time.monotonic() - started if started else 0.0,
        )

    def send(self, client: bytes, msg: p.Message) -> None:
        self._send_frame(client, p.encode(msg))

    def _send_frame(self, client: bytes, frame: bytes) -> None:
        with self.lock:
            try:
                sockets.send_to(self.sock, client, frame)
            except zmq.ZMQError as exc:  # EHOSTUNREACH: it disconnected; EAGAIN: it stopped reading
                self.awaiting_bye.discard(client)
                self._unreachable[client] = exc.strerror  # forgotten by the I/O thread
                self._wake()

    def _forget_silent(self) -> None:
        now = time.monotonic()
        for client, seen in list(self.last_seen.items()):
            if now - seen > self.client_timeout:
                self._forget(client)

    def _forget(self, client: bytes) -> None:
        """A gateway taken as gone: its requests are aborted (by the step loop)."""
        del self.last_seen[client]
        self.greeted.discard(client)
        self.awaiting_bye.discard(client)
        self.inbox.put((client, _GONE))

    def _announce_drain(self) -> None:
        if self.status.draining and not self.announced_drain:
            self.announced_drain = True
            for client in list(self.last_seen):
                self.send(client, self._pong(0.0))


class EngineProc:
    """The step loop, in the main thread; the socket belongs to :class:`EngineIO`."""

    def __init__(self, config: EngineConfig, engine: Engine, card: ModelCard):
        self.config = config
        self.engine = engine
        # Unique per process: a gateway that sees it change knows the KV cache is new.
        engine_id = f"{config.model_id}@{config.listen}#{os.getpid()}.{time.time_ns():x}"
        self.zctx = zmq.Context()
        self.status = Status(stats=engine.stats())
        self.io = EngineIO(self.zctx, config, engine_id, card, engine.model_info, self.status)
        self._stats_at = 0.0
        self.drain_deadline: float | None = None
        self.stop_now = False

    def drain(self) -> None:
        """Stop taking requests; exit once the running ones finish (or the grace runs out)."""
        if self.drain_deadline is None:
            log.info("draining: finishing %d requests within %.0f s", len(self.engine.by_rid), self.config.drain_timeout)
            self.drain_deadline = time.monotonic() + self.config.drain_timeout
            self.status.draining = True
        else:
            self.stop_now = True

    def run(self) -> None:
        self.io.start()
        log.info("engine ready: %s on %s", self.config.model_id, self.config.listen)
        while not self._done():
            self._take(block=not self.engine.has_work)
            if self.engine.has_work:
                self.status.step_started = time.monotonic()
                replies = self.engine.step()
                self.status.step_started = 0.0
                self._send(replies)
            self._publish_stats()
        self._send(self.engine.fail_all("the engine shut down before this request finished"))
        self.close()

    def _publish_stats(self) -> None:
        """Counters for the I/O thread's Pongs (gateways ping every 0.5 s): a few times a
        second is enough, not after every step."""
        now = time.monotonic()
        if now - self._stats_at >= STATS_EVERY:
            self._stats_at = now
            self.status.stats = self.engine.stats()

    def _done(self) -> bool:
        if self.drain_deadline is None:
            return False
        return self.stop_now or not self.engine.has_work or time.monotonic() > self.drain_deadline

    def _take(self, block: bool) -> None:
        """Everything that arrived; waits briefly for the first item when idle."""
        try:
            item = self.io.inbox.get(timeout=IDLE_WAIT) if block else self.io.inbox.get_nowait()
            while True:
                self._on_message(*item)
                item = self.io.inbox.get_nowait()
        except queue.Empty:
            pass

    def _on_message(self, client: bytes, msg) -> None:
        if msg is _GONE:
            gone = self.engine.abort_client(client)
            if gone:
                log.warning("a gateway went away; aborted its %d requests", len(gone))
            self._send([(client, p.Error(s.rid, 503, "the engine lost contact with this gateway", "gateway_gone")) for s in gone])
        elif isinstance(msg, p.Generate):
            self._send([(client, e) for e in [self._submit(client, msg)] if e is not None])
        elif isinstance(msg, p.Abort):
            self.engine.abort(client, msg.rid)

    def _submit(self, client: bytes, msg: p.Generate) -> p.Error | None:
        if self.drain_deadline is not None:
            return p.Error(msg.rid, 503, "the engine is shutting down; retry", "engine_draining")
        try:
            return self.engine.submit(client, msg)
        except Exception as exc:  # noqa: BLE001 - a request must never take the engine down
            log.exception("refusing request %s", msg.rid)
            return p.Error(msg.rid, 400, f"invalid request: {exc}", "invalid_request")

    def _send(self, replies: list[tuple[bytes, p.Delta | p.Error]]) -> None:
        """One frame per gateway with all of its deltas; errors one frame each."""
        if not replies:
            return
        frames: list[tuple[bytes, bytes]] = []
        deltas: dict[bytes, list[p.Delta]] = defaultdict(list)
        for client, item in replies:
            if isinstance(item, p.Delta):
                deltas[client].append(item)
            else:
                frames.append((client, p.encode(item)))
        frames += [(client, p.encode(p.Deltas(items))) for client, items in deltas.items()]
        self.io.deliver(frames)

    def close(self) -> None:
        self.io.stop()
        self.io.join(BYE_WAIT + 5)
        if not self.io.is_alive():  # else term() would wait on its socket; the process ends anyway
            self.zctx.term()


def serve_engine(config: EngineConfig) -> None:
    try:
        card = read_card(config.model)
    except (GGUFError, OSError) as exc:
        raise ConfigError(f"cannot read {config.model}: {exc}") from None
    if len(card.vocab) > p.MAX_VOCAB_BYTES:
        raise ConfigError(f"{config.model}: its vocabulary and metadata take {len(card.vocab)} bytes, more than gateways accept ({p.MAX_VOCAB_BYTES})")
    runner = ModelRunner(config)
    engine = None
    try:
        engine = Engine(config, runner)
        # llguidance's tokenizer, before the first request: built beside the first steps it
        # held the GIL for seconds (a Python loop over the vocabulary) and the first request
        # after start took 1.3 s to its first token instead of 0.2.
        engine.constraints.warm(wait=True)
        proc = EngineProc(config, engine, card)
        signal.signal(signal.SIGTERM, lambda *_: proc.drain())
        signal.signal(signal.SIGINT, lambda *_: proc.drain())
        if proc.io.clients is not None:  # SIGHUP re-reads --curve-clients
            signal.signal(signal.SIGHUP, lambda *_: proc.io.clients.reload())
        proc.run()
    finally:
        if engine is not None:
            engine.close()
        runner.close()
        sockets.remove(config.listen)
