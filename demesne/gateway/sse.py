"""Server-sent events to one client, and what happens when the client stops reading.

A client that takes none of the stream's bytes for the write timeout is cut off
(:class:`SlowReader`), instead of holding its engine requests, and their KV cells, for as
long as it likes. Meanwhile the engine's deltas wait in the request's queue in the gateway,
so that queue is bounded by the write timeout times the decode rate.
"""

from __future__ import annotations

import asyncio
import socket

import orjson
from aiohttp import web


class SlowReader(Exception):
    """The client took none of the stream's bytes for the write timeout."""


class EventStream:
    """A ``text/event-stream`` response whose every write must finish within ``timeout``
    seconds, or :class:`SlowReader` is raised."""

    # The kernel's send buffer for a stream, fixed (Linux doubles it): left alone, Linux grows
    # it to megabytes, minutes of tokens, before a write has to wait. With the 64 KiB aiohttp
    # writes between drains, a client that stops reading blocks the writer within ~150 KiB.
    SEND_BUFFER = 32 * 1024
    # An event this small, into an empty transport buffer, cannot fill it past the transport's
    # high-water mark (64 KiB by default), so it is written without a timer.
    UNTIMED_WRITE = 16 * 1024

    def __init__(self, request: web.Request, timeout: float):
        self.request = request
        self.timeout = timeout
        self.response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})

    async def open(self) -> None:
        await self.response.prepare(self.request)
        transport = self.request.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.SEND_BUFFER)
            except OSError:  # not a TCP socket (tests, unix sockets): leave it
                pass

    async def send(self, obj: dict, event: str | None = None) -> None:
        """One event; ``event`` names it (Anthropic's streams name every event)."""
        head = b"event: " + event.encode() + b"\n" if event else b""
        await self._write(head + b"data: " + orjson.dumps(obj) + b"\n\n")

    async def close(self, done: bool = True) -> None:
        """``done``: OpenAI's closing ``data: [DONE]`` (Anthropic's streams end without it)."""
        if done:
            await self._write(b"data: [DONE]\n\n")
        try:
            await self._within(self.response.write_eof())
        except ConnectionResetError:  # the client had [DONE] and closed before the chunked end
            pass

    async def _write(self, data: bytes) -> None:
        transport = self.request.transport
        if len(data) <= self.UNTIMED_WRITE and transport is not None and transport.get_write_buffer_size() == 0:
            # Nothing waits in the transport, so this write cannot wait for the client: the
            # event goes to the kernel at once or stays buffered below the high-water mark
            # (aiohttp waits only in a drain, and only while the transport is paused above
            # it). A timer per event cost ~15% of the gateway's time per streamed token.
            await self.response.write(data)
        else:
            await self._within(self.response.write(data))

    async def _within(self, write) -> None:
        try:
            if _timeout is None:  # Python 3.10
                await asyncio.wait_for(write, self.timeout)
            else:  # a timer, not a task per event as wait_for makes
                async with _timeout(self.timeout):
                    await write
        except asyncio.TimeoutError:  # (not the built-in TimeoutError before Python 3.11)
            raise SlowReader from None


_timeout = getattr(asyncio, "timeout", None)
