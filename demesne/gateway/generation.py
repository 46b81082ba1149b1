"""One request's token stream turned into text pieces: detokenize, stop strings, usage.

Leaving the iteration early (a stop string matched, the client went away) closes the
engine stream, which aborts the request in the engine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from .. import protocol as p
from .chat_template import ChatTemplate
from .engine_client import EngineClient, EngineConn
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


async def generate_text(
    client: EngineClient,
    engine: EngineConn,
    model: ModelContext,
    request: p.Generate,
    stops: list[str],
    strip_leading: bool = False,
) -> AsyncIterator[Piece]:
    """``strip_leading``: drop whitespace before the first visible character."""
    detok = IncrementalDetokenizer(model.tokenizer)
    matcher = StopMatcher(stops)
    n_out = 0
    released = 0
    prompt_tokens = len(request.prompt)
    cached = 0
    stream = client.generate(engine, request)
    try:
        async for delta in stream:
            n_out += len(delta.tokens)
            cached = max(cached, delta.cached_tokens)
            text = matcher.feed(detok.add(delta.tokens))
            finish = delta.finish
            if finish is not None and not matcher.stopped:
                text += matcher.feed(detok.flush())
                text += matcher.flush()
            released += len(text.encode())
            if strip_leading and text:
                text = text.lstrip()
                strip_leading = not text
            extra = (delta.tokens, delta.logprobs, released) if delta.logprobs is not None else (None, None, released)
            if matcher.stopped:
                yield Piece(text, p.FINISH_STOP, prompt_tokens, n_out, cached, *extra)
                return
            yield Piece(text, finish, prompt_tokens, n_out, cached, *extra)
            if finish is not None:
                return
    finally:
        await stream.aclose()
