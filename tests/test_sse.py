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


def stream(response: Response, timeout: float = 1.0) -> EventStream:
    s = EventStream.__new__(EventStream)
    s.request, s.timeout, s.response = None, timeout, response
    return s


async def test_a_client_that_closes_after_done_ends_the_stream_cleanly():
    # The bench saw it: the client read [DONE] and closed before the chunked terminator went
    # out; aiohttp raised from write_eof and the request was logged as a 500 with a traceback.
    r = Response(eof_error=ClientConnectionResetError("Cannot write to closing transport"))
    await stream(r).close()
    assert r.written == [b"data: [DONE]\n\n"]


async def test_a_stalled_reader_is_still_cut_off():
    with pytest.raises(SlowReader):
        await stream(Response(stall=True), timeout=0.05).close()
