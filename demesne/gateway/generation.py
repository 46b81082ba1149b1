"""One request's token stream turned into text pieces: detokenize, stop strings, usage.

Leaving the iteration early (a stop string matched, the client went away, the request's
deadline passed) closes the engine stream, which aborts the request in the engine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from .. import protocol as p
from .chat_template import ChatTemplate
from .engine_client import EngineClient, EngineConn
from .observability import RequestStats
from .tool_formats import ToolFormat
from .tokenizer import IncrementalDetokenizer, StopMatcher, Tokenizer


@dataclass(slots=True)
class ModelContext:
    """What the gateway holds for one served model."""

    info: p.ModelInfo
    tokenizer: Tokenizer
    template: ChatTemplate
    tool_format: ToolFormat


@dataclass(slots=True)
class Piece:
    text: str
    finish: str | None  # "stop" or "length" on the last piece
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    tokens: list[int] | None = None  # with logprobs only: the tokens behind this piece
    logprobs: list | None = None
    released: int = 0  # bytes of the output let through so far (a stop string and what follows are not)
    lead: int | None = 0  # bytes of leading whitespace stripped; None while that may still grow
    stop: str | None = None  # on the last piece: the stop string that ended the output, if one did


class _Output:
    """One choice's text as it is let out: detokenized, cut at a stop string, its leading
    whitespace stripped if asked."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str], strip_leading: bool):
        self._detok = IncrementalDetokenizer(tokenizer)
        self._matcher = StopMatcher(stops)
        self._stripping = strip_leading
        self.released = 0  # bytes of output let through, stripped whitespace included
        self.lead = 0  # bytes of leading whitespace stripped

    @property
    def stopped(self) -> bool:
        return self._matcher.stopped

    @property
    def matched(self) -> str | None:
        return self._matcher.matched

    def add(self, tokens: list[int], final: bool) -> str:
        text = self._matcher.feed(self._detok.add(tokens))
        if final and not self._matcher.stopped:
            text += self._matcher.feed(self._detok.flush()) + self._matcher.flush()
        self.released += len(text.encode())
        if self._stripping and text:
            kept = text.lstrip()
            self.lead += len(text.encode()) - len(kept.encode())
            text = kept
            self._stripping = not text
        return text

    def settled_lead(self, final: bool) -> int | None:
        return None if self._stripping and not final else self.lead


async def generate_text(
    client: EngineClient,
    engine: EngineConn,
    model: ModelContext,
    request: p.Generate,
    stops: list[str],
    strip_leading: bool = False,
    deadline: float | None = None,
    stats: RequestStats | None = None,
) -> AsyncIterator[Piece]:
    """``strip_leading``: drop whitespace before the first visible character. ``deadline``
    (``loop.time()``): past it the request is aborted and ends as if cut by ``max_tokens``."""
    out = _Output(model.tokenizer, stops, strip_leading)
    n_prompt, n_out, cached = len(request.prompt), 0, 0
    last: float | None = None
    stream = client.generate(engine, request)
    if stats is not None:
        stats.on_send(request.rid)
    try:
        while True:
            try:
                delta = await _next_delta(stream, deadline)
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:  # past the deadline: the engine request was aborted
                text = out.add([], final=True)
                yield Piece(text, p.FINISH_LENGTH, n_prompt, n_out, cached, None, None, out.released, out.lead)
                return
            now = time.monotonic()
            if stats is not None:
                stats.on_tokens(len(delta.tokens), None if last is None else now - last)
            last = now if delta.tokens else last
            n_out += len(delta.tokens)
            cached = max(cached, delta.cached_tokens)
            text = out.add(delta.tokens, delta.finish is not None)
            finish = p.FINISH_STOP if out.stopped else delta.finish
            extra = (delta.tokens, delta.logprobs) if delta.logprobs is not None else (None, None)
            yield Piece(text, finish, n_prompt, n_out, cached, *extra, out.released, out.settled_lead(finish is not None), out.matched)
            if finish is not None:
                return
    finally:
        await stream.aclose()


async def _next_delta(stream: AsyncIterator[p.Delta], deadline: float | None) -> p.Delta:
    if deadline is None:
        return await stream.__anext__()
    remaining = deadline - asyncio.get_running_loop().time()
    if remaining <= 0:
        raise asyncio.TimeoutError
    return await asyncio.wait_for(stream.__anext__(), remaining)
