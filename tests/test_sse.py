"""demesne.gateway.sse without a network: what a stream's end does when the client has gone."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp.client_exceptions import ClientConnectionResetError

from demesne.gateway.sse import EventStream, SlowReader


class Response:
    def __init__(self, eof_error=None, stall=False):
        self.written: list[bytes] = []
        self.eof_error = eof_error
        self.stall = stall

    async def write(self, data: bytes) -> None:
        if self.stall:
            await asyncio.sleep(10)
        self.written.append(data)

    async def write_eof(self) -> None:
        if self.eof_error:
            raise self.eof_error


class Transport:
    def __init__(self, buffered: int):
        self.buffered = buffered

    def get_write_buffer_size(self) -> int:
        return self.buffered


class Request:
    def __init__(self, buffered: int):
        self.transport = Transport(buffered)


def stream(response: Response, timeout: float = 1.0, buffered: int = 0) -> EventStream:
    """``buffered``: bytes waiting in the transport (a client that stopped reading)."""
    s = EventStream.__new__(EventStream)
    s.request, s.timeout, s.response = Request(buffered), timeout, response
    return s


async def test_a_client_that_closes_after_done_ends_the_stream_cleanly():
    # The bench saw it: the client read [DONE] and closed before the chunked terminator went
    # out; aiohttp raised from write_eof and the request was logged as a 500 with a traceback.
    r = Response(eof_error=ClientConnectionResetError("Cannot write to closing transport"))
    await stream(r).close()
    assert r.written == [b"data: [DONE]\n\n"]


async def test_a_stalled_reader_is_still_cut_off():
    with pytest.raises(SlowReader):
        await stream(Response(stall=True), timeout=0.05, buffered=1).close()


async def test_a_write_into_a_backed_up_transport_is_timed():
    with pytest.raises(SlowReader):
        await stream(Response(stall=True), timeout=0.05, buffered=1).send({"x": 1})


async def test_a_large_event_is_timed_even_into_an_empty_transport():
    # It alone may fill the transport past its high-water mark, where aiohttp waits.
    with pytest.raises(SlowReader):
        await stream(Response(stall=True), timeout=0.05).send({"x": "y" * EventStream.UNTIMED_WRITE})


async def test_a_small_event_into_an_empty_transport_is_written_without_a_timer(monkeypatch):
    def no_timer(*_args):
        raise AssertionError("a timer was armed")

    monkeypatch.setattr("demesne.gateway.sse._timeout", no_timer)
    monkeypatch.setattr(asyncio, "wait_for", no_timer)
    r = Response()
    await stream(r).send({"x": 1})
    assert r.written == [b'data: {"x":1}\n\n']
