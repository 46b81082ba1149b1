"""One engine as the gateway sees it: the link's state (connected, answering, its model, the
requests in flight) and the DEALER socket behind it, with its options, CURVE keys and the
monitor of its connection events. The engine client (engine_client.py) owns the list."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from .. import curve
from .. import protocol as p
from ..config import GatewayConfig, is_tcp
from .routing import PrefixIndex

# Why a CURVE handshake failed, by monitor event (and, for protocol errors, its value).
HANDSHAKE_FAILURES = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "refused this gateway's public key (add it to the engine's --curve-clients)",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "failed the CURVE handshake (is --engine-key that engine's public key?)",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "failed the handshake (one side uses CURVE and the other does not, or the keys do not match)",
}


@dataclass(eq=False)
class EngineConn:
    """What the gateway knows of one engine; the engine client updates it from Pongs and the
    socket's events."""

    endpoint: str
    sock: zmq.Socket  # plain (not asyncio): the engine client reads it from a descriptor callback
    key: str | None = None  # the engine's public key file (CURVE)
    info: p.ModelInfo | None = None
    stats: dict[str, float] = field(default_factory=dict)
    monitor: zmq.asyncio.Socket | None = None  # connection events of sock
    fd: int = -1  # sock's descriptor while the engine client reads it
    connected: bool = False  # the socket monitor's view of the connection
    responsive: bool = False  # answered a heartbeat within heartbeat_timeout
    draining: bool = False
    refused: str | None = None  # why this gateway will not use it (protocol version, model clash)
    handshake: str | None = None  # why the last handshake failed, until one succeeds
    model_loaded: Callable[[p.ModelInfo], bool] = lambda _info: False  # ModelRegistry.loaded
    retired: bool = False  # no longer listed: finishes its requests, then is closed
    last_seen: float = 0.0
    inflight: set[str] = field(default_factory=set)
    ponged: asyncio.Event = field(default_factory=asyncio.Event)
    engine_id: str | None = None  # changes when the engine process restarts
    prefix: PrefixIndex = field(default_factory=PrefixIndex)  # what we think it holds
    routed: int = 0  # requests sent here
    routed_cached: int = 0  # prompt tokens the routing expected it to hold
    tasks: list[asyncio.Task] = field(default_factory=list)

    @property
    def alive(self) -> bool:
        """Connected, answering and compatible: it serves (maybe draining)."""
        return self.connected and self.responsive and self.refused is None and self.info is not None

    @property
    def ready(self) -> bool:
        """Compatible, and this gateway has loaded its model (models.py)."""
        return self.info is not None and self.refused is None and self.model_loaded(self.info)

    @property
    def routable(self) -> bool:
        return self.alive and self.ready and not self.draining and not self.retired

    @property
    def load(self) -> int:
        return len(self.inflight)


def open_socket(zctx: zmq.asyncio.Context, config: GatewayConfig, identity: bytes, endpoint: str, key: str | None) -> tuple[zmq.Socket, zmq.asyncio.Socket]:
    """A DEALER connecting to ``endpoint``, and the monitor of its connection events (an
    asyncio socket). The DEALER is a plain socket: every token of every stream comes through
    it, and pyzmq's asyncio wrapper costs a future, a task wake-up and a dozen enum operations
    per frame, which on a small machine is CPU taken from llama.cpp's threads."""
    sock = zctx.socket(zmq.DEALER, socket_class=zmq.Socket)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, p.MAX_FRAME_BYTES)  # a peer cannot make us hold more
    if key is not None:
        curve.client_curve(sock, config.curve_key, key)
    # Not IMMEDIATE: with it, ZeroMQ drops the frames that arrived but were not yet read
    # when the connection closes - a drained engine's last deltas. Without it those stay
    # readable; nothing is queued for an engine that is not connected because every send
    # checks `connected` (_try_send), and an engine refuses requests from a gateway that
    # has not pinged that process (proc.py), so one queued in the moment the connection
    # broke never runs on a restarted engine.
    sock.setsockopt(zmq.IMMEDIATE, 0)
    sock.setsockopt(zmq.ROUTING_ID, identity)
    # A host that vanishes while nothing is sent is noticed in ~25 s (a cut link, in
    # --link-timeout: heartbeats are sent every 0.5 s).
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 10)
    sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, 5)
    sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, 3)
    if is_tcp(endpoint):
        curve.set_link_timeout(sock, config.link_timeout)
    monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | curve.HANDSHAKE_EVENTS, f"inproc://demesne-monitor-{uuid.uuid4().hex}")
    sock.connect(endpoint)
    return sock, monitor


def close_socket(engine: EngineConn) -> None:
    engine.sock.disable_monitor()
    engine.monitor.close()
    engine.sock.close()
