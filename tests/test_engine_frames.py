"""A real engine process against a raw ZeroMQ peer: malformed frames, hostile values and a
gateway of another protocol version are answered, never fatal (issue 9's (d), (f), (j))."""

from __future__ import annotations

import os
import signal
import stat
import time

import orjson
import pytest
import zmq

from demesne import protocol as p

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def engine(processes):
    endpoint = processes.endpoint("engine-frames")
    proc = processes.engine(endpoint)
    zctx = zmq.Context()
    peer = Peer.connect(zctx, proc, endpoint)
    peer.greet()
    yield peer
    peer.sock.close()
    zctx.term()


class Peer:
    def __init__(self, sock, proc, endpoint):
        self.sock, self.proc, self.endpoint = sock, proc, endpoint

    @classmethod
    def connect(cls, zctx, proc, endpoint: str) -> Peer:
        sock = zctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        return cls(sock, proc, endpoint)

    def greet(self, timeout: float = 120) -> None:
        """Ping until the engine answers (its model loads first)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.send({"t": "ping", "sent": 1.0, "version": p.PROTOCOL_VERSION})
            if self.sock.poll(500):
                self.drain()
                return
        raise AssertionError(f"the engine did not answer:\n{self.proc.tail()}")

    def send(self, body) -> None:
        self.sock.send(body if isinstance(body, bytes) else orjson.dumps(body))

    def recv(self, timeout: float = 30.0) -> p.Message:
        assert self.sock.poll(int(timeout * 1000)), "no reply"
        return p.decode(self.sock.recv())

    def drain(self) -> None:
        while self.sock.poll(100):
            self.sock.recv()

    def reply_to(self, rid: str) -> p.Message:
        while True:
            msg = self.recv()
            if isinstance(msg, p.Error) and msg.rid == rid:
                return msg
            if isinstance(msg, p.Deltas) and any(d.rid == rid for d in msg.items):
                return msg

    def alive(self) -> bool:
        self.drain()
        self.send({"t": "ping", "sent": 2.0, "version": p.PROTOCOL_VERSION})
        return isinstance(self.recv(10), p.Pong) and self.proc.popen.poll() is None


def gen(rid: str, **params) -> dict:
    return {"t": "gen", "rid": rid, "prompt": [2, 818, 5279], "max_tokens": 2, "params": params}


@pytest.mark.parametrize(
    "frame",
    [
        b'{"t": "abort", "rid": [1]}',
        b"\xff\xfe not json",
        b"[]",
        b'{"t": "gen"}',
        b'{"t": {"nested": 1}}',
        orjson.dumps({"t": "deltas", "items": [{"rid": "x", "tokens": [1]}]}),  # engine -> gateway only
        orjson.dumps({"t": "err", "rid": "x", "status": 500, "message": "m"}),
    ],
)
def test_malformed_frames_do_not_kill_the_engine(engine, frame):
    engine.send(frame)
    assert engine.alive()


def test_a_malformed_request_that_names_its_id_gets_an_error(engine):
    engine.send({"t": "gen", "rid": "bad-1", "prompt": "not tokens", "max_tokens": 2})
    error = engine.reply_to("bad-1")
    assert isinstance(error, p.Error) and error.status == 400 and "prompt" in error.message
    assert engine.alive()


@pytest.mark.parametrize(
    "field,value",
    [("top_k", 2**63), ("top_k", -5), ("seed", 2**64 - 1), ("temperature", 1e300), ("logprobs", 10**6),
     ("logit_bias", [[10**12, 1.0]]), ("repetition_penalty", 0.0), ("top_p", 0.0)],
)
def test_out_of_range_values_are_refused_by_the_engine_too(engine, field, value):
    rid = f"range-{field}-{value}"[:60]
    engine.send(gen(rid, **{"temperature": 1.0, field: value}))
    error = engine.reply_to(rid)
    assert isinstance(error, p.Error) and (error.status, error.param) == (400, field), error
    assert engine.alive()


def test_a_valid_request_still_runs(engine):
    engine.send(gen("ok-1", temperature=0.0))
    tokens, finish = [], None
    while finish is None:
        msg = engine.reply_to("ok-1")
        assert isinstance(msg, p.Deltas), msg
        for d in msg.items:
            tokens += d.tokens
            finish = d.finish
    assert len(tokens) == 2 and finish == "length"


def test_a_gateway_of_another_version_is_refused(engine):
    engine.send({"t": "ping", "sent": 3.0, "version": 1})
    pong = engine.recv()
    assert isinstance(pong, p.Pong) and pong.version == p.PROTOCOL_VERSION  # so it can refuse us too
    engine.send(gen("old-1"))
    error = engine.reply_to("old-1")
    assert isinstance(error, p.Error) and error.status == 503 and error.code == "protocol_mismatch"
    assert engine.alive()  # a current ping makes it welcome again
    engine.send(gen("new-1", temperature=0.0))
    assert isinstance(engine.reply_to("new-1"), p.Deltas)
    assert engine.proc.tail().count("speaks protocol v1") == 1


def test_the_ipc_socket_is_private(engine):
    path = engine.endpoint.removeprefix("ipc://")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_a_request_from_a_gateway_that_never_pinged_is_refused(engine):
    """A request that waited in a gateway's socket while its engine restarted reaches the new
    process before any ping: it is refused (503), never run for a client already failed."""
    zctx = zmq.Context()
    stranger = Peer.connect(zctx, engine.proc, engine.endpoint)
    try:
        stranger.send(gen("stale-1", temperature=0.0))
        error = stranger.reply_to("stale-1")
        assert isinstance(error, p.Error) and (error.status, error.code) == (503, "engine_restarted"), error
        assert stranger.alive()  # pinged now: welcome
        stranger.send(gen("fresh-1", temperature=0.0))
        assert isinstance(stranger.reply_to("fresh-1"), p.Deltas)
    finally:
        stranger.sock.close()
        zctx.term()


@pytest.mark.parametrize("answer", [True, False])
def test_a_draining_engine_closes_only_after_the_gateway_read_every_reply(processes, answer):
    """SIGTERM mid-request: the request's last delta comes before a closing Pong; the engine
    waits for the gateway's bye (ZeroMQ may drop frames in flight when a connection closes)
    and says so in its log when none comes. Either way it exits cleanly."""
    endpoint = processes.endpoint(f"engine-bye-{answer}")
    proc = processes.engine(endpoint)
    zctx = zmq.Context()
    peer = Peer.connect(zctx, proc, endpoint)
    try:
        peer.greet()
        peer.send({**gen("drained-1", temperature=0.0), "max_tokens": 64})
        first = peer.reply_to("drained-1")
        assert isinstance(first, p.Deltas)
        proc.popen.send_signal(signal.SIGTERM)
        tokens, finish = sum(len(d.tokens) for d in first.items), None
        while True:
            msg = peer.recv(60)
            if isinstance(msg, p.Deltas):
                for d in msg.items:
                    assert finish is None
                    tokens += len(d.tokens)
                    finish = d.finish
            elif isinstance(msg, p.Pong) and msg.closing:
                break
        assert (tokens, finish) == (64, "length")
        if answer:
            peer.send({"t": "ping", "sent": 2.0, "version": p.PROTOCOL_VERSION, "bye": True})
        assert proc.popen.wait(30) == 0
        assert ("closing without a bye" in proc.tail()) is not answer
    finally:
        peer.sock.close()
        zctx.term()
