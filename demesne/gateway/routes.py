"""The route table and its handlers."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from .. import protocol as p
from .app_keys import CLIENT, CONFIG, FINGERPRINT, OBSERVABILITY
from .engine_client import EngineConn, EngineRefused, EngineUnavailable
from .generation import ModelContext, Piece, generate_text
from .logprobs import LogprobShaper
from .observability import STATS, RequestStats
from .sse import EventStream, SlowReader
from .status import get_model, health, json_response, list_models, metrics, model_context, openapi
from .tools import ToolStream, call_constraint, parse_calls
from .errors import ApiError, bad
from .openai import (
    CompletionRequest,
    Shaper,
    parse_chat,
    parse_completion,
    usage,
)
from .prompts import calling, json_body, off_loop, prompt_tokens
from .reasoning import CLOSING, ThinkSplitter, budgeted, splitter
from . import utilities

log = logging.getLogger("demesne.gateway")


def setup_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_post("/tokenize", utilities.tokenize)
    app.router.add_post("/detokenize", utilities.detokenize)
    app.router.add_post("/apply-template", utilities.apply_template)
    app.router.add_get("/props", utilities.props)
    from . import anthropic  # (they build on this module)

    app.router.add_post("/v1/messages", anthropic.messages)
    app.router.add_post("/v1/messages/count_tokens", anthropic.count_tokens)
    from . import responses

    app.router.add_post("/v1/responses", responses.create)
    app.router.add_get("/v1/responses/{response_id}", responses.retrieve)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await json_body(request)
    return await _complete(request, parse_chat(body), _deadline(request, body))


async def completions(request: web.Request) -> web.StreamResponse:
    body = await json_body(request)
    return await _complete(request, parse_completion(body), _deadline(request, body))


MAX_TIMEOUT = 1e6  # seconds; event loops keep timers in bounded integers


def _deadline(request: web.Request, body: dict) -> float | None:
    """When the request must end (``loop.time()``): ``--request-timeout``, or sooner the
    request's own ``timeout`` (seconds); None for no deadline."""
    limits = [request.app[CONFIG].request_timeout]
    asked = body.get("timeout")
    if asked is not None:
        if isinstance(asked, bool) or not isinstance(asked, (int, float)) or not 0 < asked <= MAX_TIMEOUT:
            raise bad(f"'timeout' must be a number of seconds in (0, {MAX_TIMEOUT:g}]", "timeout")
        limits.append(float(asked))
    limits = [t for t in limits if t]
    return asyncio.get_running_loop().time() + min(limits) if limits else None


# -- a completion, either endpoint ----------------------------------------------------------


def _constrain_calls(model: ModelContext, req: CompletionRequest) -> None:
    """The grammar that forces a call (required, named) or keeps one valid (auto)."""
    if not calling(req) or req.params.grammar:  # auto beside response_format: the format wins
        return
    grammar, lazy = call_constraint(req.tools, model.tool_format, model.tokenizer.one_token)
    req.params.grammar, req.params.grammar_lazy, req.params.grammar_param = grammar, lazy, "tools"


def _budget(n_ctx: int, n_prompt: int, req: CompletionRequest, field: str) -> int:
    if n_prompt == 0:
        raise bad("the prompt is empty", field)
    if n_prompt >= n_ctx:
        raise bad(
            f"This model's maximum context length is {n_ctx} tokens, but the prompt has"
            f" {n_prompt} tokens. Shorten the {field}.",
            field,
            "context_length_exceeded",
        )
    if req.max_tokens is None:
        return n_ctx - n_prompt
    if n_prompt + req.max_tokens > n_ctx:
        raise bad(
            f"This model's maximum context length is {n_ctx} tokens. However, you requested"
            f" {n_prompt + req.max_tokens} tokens ({n_prompt} in the {field}, {req.max_tokens}"
            " in the completion). Reduce the prompt or the completion length.",
            "max_tokens",
            "context_length_exceeded",
        )
    return req.max_tokens


def _each_prompt(req: CompletionRequest) -> list[CompletionRequest]:
    """The request once per prompt of a completions batch (``prompt`` an array of prompts)."""
    if req.chat or not req.prompts or len(req.prompts) == 1:
        return [req]
    return [dataclasses.replace(req, prompt=one) for one in req.prompts]


async def _complete(request: web.Request, req: CompletionRequest, deadline: float | None = None) -> web.StreamResponse:
    reply = await start_reply(request, req, deadline)
    try:
        if req.stream:
            return await _stream(request, reply)
        return await _collect(reply)
    finally:
        await reply.pieces.aclose()


async def start_reply(request: web.Request, req: CompletionRequest, deadline: float | None = None) -> Reply:
    """Check a completion request against its model, send it to an engine (n choices: n
    requests) and return its pieces to shape, whole or streamed. The caller closes
    ``pieces``. Used by the OpenAI routes and by the other APIs translated onto them."""
    model = model_context(request, req.model)
    client = request.app[CLIENT]
    try:
        tokenized = await off_loop(lambda: [prompt_tokens(model, one) for one in _each_prompt(req)])
    except ValueError as exc:  # the chat template refused the conversation
        raise bad(str(exc), "messages") from None
    budgets = [_budget(model.info.n_ctx, len(prompt), req, field) for prompt, field in tokenized]
    _constrain_calls(model, req)
    if any(not 0 <= t < model.info.n_vocab for t, _ in req.params.logit_bias or ()):
        raise bad(f"'logit_bias' names token ids outside the vocabulary [0, {model.info.n_vocab})", "logit_bias")
    if req.params.top_k > model.info.n_vocab:
        raise bad(f"'top_k' must be at most the vocabulary size, {model.info.n_vocab}", "top_k")
    try:
        engines = [client.pick(req.model, prompt) for prompt, _ in tokenized]
    except EngineUnavailable as exc:
        raise ApiError(503, str(exc), None, "engine_unavailable") from None
    stops = req.stop + (list(model.template.stops) if req.chat else [])
    strip = req.chat and model.template.strip_reply
    stats = RequestStats(request.app[OBSERVABILITY], prompt_tokens=sum(len(prompt) for prompt, _ in tokenized))
    request[STATS] = stats
    # n choices are n requests with one prompt: the engine's prefix trie decodes it once.
    # Choice index = prompt index * n + i, as OpenAI numbers a batch's choices.
    reasoning = request.app[CONFIG].reasoning_format if req.chat else "none"

    def choice(prompt: list[int], max_tokens: int, engine: EngineConn, params: p.SamplingParams):
        def start(tokens: list[int], n: int):
            gen = p.Generate(client.new_request_id(), tokens, n, params)
            return generate_text(client, engine, model, gen, stops, strip, deadline, stats)

        def encode(text: str) -> list[int]:  # the model's reasoning as text, the closing tag as markup
            return model.tokenizer.encode_segments([(text[: -len(CLOSING)], False), (CLOSING, True)], add_special=False)

        if req.reasoning_budget is None or splitter(reasoning, model.template.source, req.thinking_open) is None:
            return start(prompt, max_tokens)
        return budgeted(start, prompt, max_tokens, req.reasoning_budget, encode, req.thinking_open)

    streams = [
        choice(prompt, max_tokens, engine, _choice_params(req, i))
        for (prompt, _), max_tokens, engine in zip(tokenized, budgets, engines)
        for i in range(req.n)
    ]
    shaper = Shaper(req.chat, model.info.id, request.app[FINGERPRINT], legacy=bool(req.tools and req.tools.legacy))
    logprobs = [LogprobShaper(model.tokenizer, req.chat) for _ in streams] if req.params.logprobs >= 0 else None
    return Reply(req, model, shaper, _merge(streams), logprobs, len(streams), stats, reasoning)


@dataclass(slots=True)
class Reply:
    """What answering one request takes, whole or streamed."""

    req: CompletionRequest
    model: ModelContext
    shaper: Shaper
    pieces: AsyncIterator[tuple[int, Piece]]  # of every choice, tagged with its index
    logprobs: list[LogprobShaper] | None
    choices: int  # prompts times n
    stats: RequestStats
    reasoning_format: str = "none"  # --reasoning-format for chat; "none" for completions

    def splitter(self) -> ThinkSplitter | None:
        """A reasoning splitter for one choice, if its reasoning is split out."""
        return splitter(self.reasoning_format, self.model.template.source, self.req.thinking_open)

    def split(self, text: str) -> tuple[str | None, str]:
        """A whole reply's (reasoning, answer); reasoning None when not split."""
        s = self.splitter()
        if s is None:
            return None, text
        r1, c1 = s.feed(text)
        r2, c2 = s.finish()
        return r1 + r2, c1 + c2

    def finished(self, finals: dict[int, Piece]) -> dict:
        """The usage object; the request's figures for the access log."""
        use = _usage(finals, self.req.n)
        self.stats.cached_tokens = use["prompt_tokens_details"]["cached_tokens"]
        self.stats.finish = [finals[i].finish for i in sorted(finals)]
        return use


def _choice_params(req: CompletionRequest, index: int) -> p.SamplingParams:
    """Each choice samples on its own: a given seed is offset by the choice's index."""
    if index == 0 or req.params.seed is None:
        return req.params
    return dataclasses.replace(req.params, seed=(req.params.seed + index + 2**63) % 2**64 - 2**63)  # stays in int64


async def _merge(streams: list) -> AsyncIterator[tuple[int, Piece]]:
    """Pieces of several choices as they come, tagged with the choice's index."""
    if len(streams) == 1:  # the common case, without tasks
        try:
            async for piece in streams[0]:
                yield 0, piece
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream) -> None:
        try:
            async for piece in stream:
                await queue.put((index, piece))
        except Exception as exc:  # handed to the consumer, raised there
            await queue.put((index, exc))
        finally:
            await stream.aclose()

    tasks = [asyncio.ensure_future(pump(i, st)) for i, st in enumerate(streams)]
    try:
        open_ = len(streams)
        while open_:
            index, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            open_ -= item.finish is not None
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def next_piece(pieces) -> tuple[int, Piece]:
    try:
        return await pieces.__anext__()
    except EngineRefused as exc:
        e = exc.error
        raise ApiError(e.status, e.message, e.param, e.code) from None
    except EngineUnavailable as exc:
        raise ApiError(503, str(exc), None, "engine_unavailable") from None


def _usage(finals: dict[int, Piece], n: int) -> dict:
    """Each prompt counted once, however many choices it has; completion tokens add up."""
    firsts = [finals[i] for i in range(0, len(finals), n)]
    completion = sum(piece.completion_tokens for piece in finals.values())
    return usage(sum(f.prompt_tokens for f in firsts), completion, sum(f.cached_tokens for f in firsts))


async def _collect(reply: Reply) -> web.Response:
    texts: list[list[str]] = [[] for _ in range(reply.choices)]
    finals: dict[int, Piece] = {}
    while len(finals) < reply.choices:
        index, piece = await next_piece(reply.pieces)
        texts[index].append(piece.text)
        if reply.logprobs is not None:
            reply.logprobs[index].add(piece)
        if piece.finish is not None:
            finals[index] = piece
    choices = [_final_choice(reply, i, "".join(texts[i]), finals[i]) for i in range(reply.choices)]
    return json_response(reply.shaper.response(choices, reply.finished(finals)))


class ChoiceParts:
    """One choice's text as it streams, in the parts every API shapes: reasoning split off,
    then tool-call deltas parsed from the answer (ToolStream), and the answer's text."""

    def __init__(self, reply: Reply):
        self.thinking = reply.splitter()
        self.tools = ToolStream(reply.req.tools, reply.model.tool_format) if calling(reply.req) else None

    @property
    def called(self) -> bool:
        return bool(self.tools and self.tools.called)

    def feed(self, text: str) -> tuple[str, str, list[dict]]:
        """(reasoning, answer text, call deltas) of a piece."""
        reasoning, answer = self.thinking.feed(text) if self.thinking else ("", text)
        text, deltas = self.tools.feed(answer) if self.tools else (answer, [])
        return reasoning, text, deltas

    def finish(self) -> tuple[str, str, list[dict]]:
        """What is held at the end of the reply, in the same parts."""
        reasoning, answer = self.thinking.finish() if self.thinking else ("", "")
        if not self.tools:
            return reasoning, answer, []
        text, deltas = self.tools.feed(answer)
        more, last = self.tools.finish()
        return reasoning, text + more, deltas + last


async def follow_one(reply: Reply, parts: ChoiceParts, piece: Piece, add, failed) -> Piece | None:
    """Stream a one-choice reply from ``piece`` (its first) on: each piece's ``parts``, then
    what they hold back at the end, go to ``add(reasoning, text, call deltas)``; the finishing
    piece is returned. An engine error once the headers are gone goes to ``failed(ApiError)``
    and None is returned (each API reports it in its own stream event)."""
    while True:
        await add(*parts.feed(piece.text))
        if piece.finish is not None:
            break
        try:
            _, piece = await next_piece(reply.pieces)
        except ApiError as exc:
            await failed(exc)
            return None
    await add(*parts.finish())
    return piece


async def whole_reply(reply: Reply) -> tuple[Piece, str | None, str, list[dict]]:
    """A one-choice reply read to its end: the last piece, the reasoning (None when not
    split), the text and the tool calls (OpenAI-shaped; the text without their markup)."""
    texts = []
    while True:
        _, piece = await next_piece(reply.pieces)
        texts.append(piece.text)
        if piece.finish is not None:
            break
    reasoning, text = reply.split("".join(texts))
    if not calling(reply.req):
        return piece, reasoning, text, []
    content, calls = parse_calls(text, reply.req.tools, reply.model.tool_format)
    return piece, reasoning, content or "", calls or []


def _final_choice(reply: Reply, i: int, text: str, final: Piece) -> dict:
    lp = reply.logprobs[i].total if reply.logprobs else None
    reasoning, text = reply.split(text)
    if not calling(reply.req):
        return reply.shaper.choice(i, text, final.finish, lp, reasoning=reasoning)
    content, calls = parse_calls(text, reply.req.tools, reply.model.tool_format)
    return reply.shaper.choice(i, content, call_finish(final.finish, bool(calls)), lp, calls, reasoning=reasoning)


def call_finish(finish: str, called: bool) -> str:
    """"tool_calls" when the turn made calls, unless it was cut short (then "length", as OpenAI)."""
    return "tool_calls" if called and finish != p.FINISH_LENGTH else finish


async def _stream(request: web.Request, reply: Reply) -> web.StreamResponse:
    async def write(sse: EventStream, item: tuple[int, Piece]) -> None:
        await _stream_choices(sse, reply, item)
        await sse.close()

    return await stream_reply(request, reply, write)


async def stream_reply(request: web.Request, reply: Reply, write) -> web.StreamResponse:
    """An event stream that ``write(sse, first_piece)`` fills. The first piece comes before
    the headers, so a refused request still gets its status; a reader that stalls past
    ``--write-timeout`` is cut off."""
    item = await next_piece(reply.pieces)
    sse = EventStream(request, request.app[CONFIG].write_timeout)
    await sse.open()
    try:
        await write(sse, item)
    except SlowReader:  # closing the connection ends the handler; the engine requests are aborted
        log.warning("%s stopped reading its stream for %g s: closed", request.remote, sse.timeout)
        reply.stats.finish.append("write_timeout")
        if request.transport is not None:
            request.transport.abort()
    return sse.response


async def _stream_choices(sse: EventStream, reply: Reply, item: tuple[int, Piece]) -> None:
    req, shaper = reply.req, reply.shaper
    started: set[int] = set()
    finals: dict[int, Piece] = {}
    with_usage = req.include_usage
    parts = [ChoiceParts(reply) for _ in range(reply.choices)]

    async def send(index: int, reasoning: str, text: str, deltas: list[dict], logprobs: dict | None = None) -> None:
        if reasoning:
            await sse.send(shaper.chunk(index, None, with_usage=with_usage, reasoning=reasoning))
        if text or logprobs:
            await sse.send(shaper.chunk(index, text, with_usage=with_usage, logprobs=logprobs))
        await _send_calls(sse, shaper, index, deltas, with_usage)

    while True:
        index, piece = item
        if req.chat and index not in started:
            await sse.send(shaper.chunk(index, "", first=True, with_usage=with_usage))
        started.add(index)
        part = reply.logprobs[index].add(piece) if reply.logprobs is not None else None
        await send(index, *parts[index].feed(piece.text), part)
        if piece.finish is not None:
            finals[index] = piece
            await send(index, *parts[index].finish())
            finish = call_finish(piece.finish, parts[index].called)
            await sse.send(shaper.chunk(index, None if req.chat else "", finish, with_usage=with_usage))
            if len(finals) == reply.choices:
                use = reply.finished(finals)
                if with_usage:
                    await sse.send(shaper.usage_chunk(use))
                return
        try:
            item = await next_piece(reply.pieces)
        except ApiError as exc:  # headers are gone: report in the stream, as OpenAI does
            await sse.send(exc.body())
            return


async def _send_calls(sse: EventStream, shaper: Shaper, index: int, deltas: list[dict], with_usage: bool) -> None:
    """``delta.tool_calls`` entries, one chunk each, as OpenAI streams them."""
    for delta in deltas:
        await sse.send(shaper.chunk(index, None, with_usage=with_usage, tool_calls=[delta]))
