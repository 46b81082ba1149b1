"""Anthropic's Messages API (``POST /v1/messages``, ``POST /v1/messages/count_tokens``), as the
``anthropic`` SDK and Claude-Code-style tools call it.

A request is translated into the equivalent chat completions request and checked by the same
code (``parse_chat``), so templates, tools, grammars, limits and the prefix cache are the
chat path's; only the shapes differ:

- ``system`` (text or text blocks) becomes the first message; ``text`` blocks become content;
  an assistant's ``tool_use`` blocks become its tool calls and a user's ``tool_result`` blocks
  become tool messages (before the user's own text); ``thinking`` blocks an assistant turn
  carries back are dropped (they are not part of the prompt here); images and documents are
  refused (400): the served models read text. ``thinking`` ``{"type": "disabled"}`` turns a
  template's thinking off (``enable_thinking``); the reasoning comes back as ``thinking``
  blocks (reasoning.py).
- ``tools`` (``name``, ``description``, ``input_schema``) become function tools;
  ``tool_choice`` ``auto`` / ``any`` / ``tool`` / ``none`` become ``auto`` / ``required`` / a
  named function / ``none``; ``disable_parallel_tool_use`` is ``parallel_tool_calls: false``.
- The reply is a ``message`` with ``text`` and ``tool_use`` content blocks; ``stop_reason``
  is ``end_turn``, ``max_tokens``, ``stop_sequence`` (with the sequence) or ``tool_use``;
  ``usage.input_tokens`` excludes ``cache_read_input_tokens`` (the prompt tokens served from
  the prefix cache), as Anthropic counts them.
- Streamed, the event sequence is Anthropic's: ``message_start``, ``ping``, per block
  ``content_block_start`` / ``content_block_delta`` (``text_delta`` or ``input_json_delta``)
  / ``content_block_stop``, then ``message_delta`` (``stop_reason``, output tokens) and
  ``message_stop``; an error after the stream began is an ``error`` event.

Errors on these paths have Anthropic's shape (errors.body_for). Authentication is the
gateway's: ``x-api-key`` is accepted as well as a bearer token; ``anthropic-version`` and
``anthropic-beta`` headers are accepted and not needed.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson
from aiohttp import web

from .errors import ApiError, anthropic_body, bad
from .openai import parse_chat
from .prompts import join_text, json_body, off_loop, prompt_tokens
from .generation import Piece
from .routes import ChoiceParts, Reply, call_finish, follow_one, start_reply, stream_reply, whole_reply
from .sse import EventStream
from .status import json_response, model_context

_CHOICES = {"auto": "auto", "any": "required", "none": "none"}
_NOT_TEXT = ("image", "document")


# -- the request ---------------------------------------------------------------------------


def to_chat(body: Any, *, counting: bool = False) -> dict:
    """The chat completions body equivalent to a Messages API body (checked as it goes)."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", None, "invalid_type")
    if not isinstance(body.get("model"), str):
        raise bad("'model' is required and must be a string", "model", "invalid_type")
    chat: dict[str, Any] = {"model": body["model"], "messages": _system(body.get("system"))}
    if not counting:
        max_tokens = body.get("max_tokens")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise bad("'max_tokens' is required: a positive integer", "max_tokens")
        chat["max_tokens"] = max_tokens
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty array", "messages", "invalid_type")
    for i, message in enumerate(messages):
        chat["messages"] += _message(message, f"messages[{i}]")
    for key in ("temperature", "top_p", "top_k", "stream"):
        if key in body:
            chat[key] = body[key]
    if body.get("stop_sequences") is not None:
        chat["stop"] = body["stop_sequences"]
    if body.get("tools") is not None:
        chat["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        chat.update(_tool_choice(body["tool_choice"]))
    thinking = body.get("thinking")
    if thinking is not None:  # on or off, for templates with the switch (Qwen 3's enable_thinking)
        kind = thinking.get("type") if isinstance(thinking, dict) else None
        if kind not in ("enabled", "disabled", "adaptive"):
            raise bad("'thinking.type' must be enabled, disabled or adaptive", "thinking")
        chat["chat_template_kwargs"] = {"enable_thinking": kind != "disabled"}
        if kind == "enabled" and thinking.get("budget_tokens") is not None:
            chat["reasoning_budget"] = thinking["budget_tokens"]
    return chat


def _system(system: Any) -> list[dict]:
    if system is None:
        return []
    text = join_text(system, "system", unsupported=_NOT_TEXT)
    return [{"role": "system", "content": text}] if text else []


def _message(message: Any, where: str) -> list[dict]:
    if not isinstance(message, dict):
        raise bad(f"'{where}' must be an object", where, "invalid_type")
    role = message.get("role")
    if role not in ("user", "assistant"):
        raise bad(f"'{where}.role' must be 'user' or 'assistant'", f"{where}.role")
    content = message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise bad(f"'{where}.content' must be a string or an array of content blocks", f"{where}.content", "invalid_type")
    texts, calls, results = [], [], []
    for j, block in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "tool_use" and role == "assistant":
            calls.append(_call(block, at))
        elif kind == "tool_result" and role == "user":
            results.append(_result(block, at))
        elif kind in ("thinking", "redacted_thinking") and role == "assistant":
            continue
        elif kind in _NOT_TEXT:
            raise bad(f"'{at}': {kind} blocks are not supported; the served models read text", at, "unsupported_content")
        else:
            raise bad(f"'{at}' is not a content block a {role} message may hold", at)
    if role == "assistant":
        out = {"role": "assistant", "content": "".join(texts) or (None if calls else "")}
        if calls:
            out["tool_calls"] = calls
        return [out]
    user = [{"role": "user", "content": "".join(texts)}] if texts else []
    return results + user


def _call(block: dict, where: str) -> dict:
    if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
        raise bad(f"'{where}' needs a string 'id' and 'name'", where)
    arguments = block.get("input", {})
    if not isinstance(arguments, dict):
        raise bad(f"'{where}.input' must be an object", f"{where}.input", "invalid_type")
    return {"id": block["id"], "type": "function", "function": {"name": block["name"], "arguments": orjson.dumps(arguments).decode()}}


def _result(block: dict, where: str) -> dict:
    if not isinstance(block.get("tool_use_id"), str):
        raise bad(f"'{where}.tool_use_id' must be a string", f"{where}.tool_use_id", "invalid_type")
    content = block.get("content", "")
    text = join_text(content, f"{where}.content", unsupported=_NOT_TEXT)
    if block.get("is_error") is True:
        text = f"Error: {text}"
    return {"role": "tool", "tool_call_id": block["tool_use_id"], "content": text}


def _tools(tools: Any) -> list[dict]:
    if not isinstance(tools, list):
        raise bad("'tools' must be an array", "tools", "invalid_type")
    out = []
    for i, tool in enumerate(tools):
        at = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") not in (None, "custom"):
            raise bad(f"'{at}' must be a custom tool with 'name' and 'input_schema' (server tools are not supported)", at)
        if not isinstance(tool.get("name"), str) or not isinstance(tool.get("input_schema"), dict):
            raise bad(f"'{at}' needs a string 'name' and an object 'input_schema'", at)
        function = {"name": tool["name"], "parameters": tool["input_schema"]}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: Any) -> dict:
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "tool":
        if not isinstance(choice.get("name"), str):
            raise bad("'tool_choice' of type 'tool' needs the tool's 'name'", "tool_choice")
        out: dict[str, Any] = {"tool_choice": {"type": "function", "function": {"name": choice["name"]}}}
    elif kind in _CHOICES:
        out = {"tool_choice": _CHOICES[kind]}
    else:
        raise bad("'tool_choice.type' must be one of auto, any, tool, none", "tool_choice")
    disable = choice.get("disable_parallel_tool_use")
    if disable is not None:
        if not isinstance(disable, bool):
            raise bad("'tool_choice.disable_parallel_tool_use' must be true or false", "tool_choice", "invalid_type")
        if kind != "none":
            out["parallel_tool_calls"] = not disable
    return out


# -- the reply -----------------------------------------------------------------------------


def _usage(input_tokens: int, cached: int, output_tokens: int) -> dict:
    return {
        "input_tokens": input_tokens - cached, "output_tokens": output_tokens,
        "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0,
    }


def _stop(reply: Reply, finish: str, called: bool, matched: str | None, asked: list[str]) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) for a finish."""
    finish = call_finish(finish, called)
    if finish == "length":
        return "max_tokens", None
    if finish == "tool_calls":
        return "tool_use", None
    if matched is not None and matched in asked:
        return "stop_sequence", matched
    return "end_turn", None


def _tool_use(call: dict) -> dict:
    try:
        arguments = orjson.loads(call["function"]["arguments"] or "{}")
    except orjson.JSONDecodeError:  # (the grammar keeps calls valid; a cut-off one may not be)
        arguments = {}
    return {"type": "tool_use", "id": call["id"], "name": call["function"]["name"], "input": arguments}


async def messages(request: web.Request) -> web.StreamResponse:
    body = await json_body(request)
    chat = to_chat(body)
    req = parse_chat(chat)
    if req.stream:
        req.include_usage = True
    asked = list(req.stop)
    reply = await start_reply(request, req)
    message_id = "msg_" + uuid.uuid4().hex[:24]
    try:
        if req.stream:
            return await _stream(request, reply, message_id, asked)
        return await _collect(reply, message_id, asked)
    finally:
        await reply.pieces.aclose()


async def _collect(reply: Reply, message_id: str, asked: list[str]) -> web.Response:
    piece, reasoning, text, calls = await whole_reply(reply)
    reply.finished({0: piece})
    content = [{"type": "thinking", "thinking": reasoning, "signature": ""}] if reasoning else []
    content += ([{"type": "text", "text": text}] if text else []) + [_tool_use(c) for c in calls]
    stop_reason, stop_sequence = _stop(reply, piece.finish, bool(calls), piece.stop, asked)
    return json_response({
        "id": message_id, "type": "message", "role": "assistant", "model": reply.model.info.id,
        "content": content, "stop_reason": stop_reason, "stop_sequence": stop_sequence,
        "usage": _usage(piece.prompt_tokens, piece.cached_tokens, piece.completion_tokens),
    })


class _Blocks:
    """The content blocks of a streamed message: a thinking block for the reasoning, a text
    block opened by the first text, a tool_use block per call; the open one is closed when
    another starts or the message ends."""

    def __init__(self, sse: EventStream):
        self.sse = sse
        self.count = 0
        self.open: tuple[str, int] | None = None  # ("text", -1), ("thinking", -1) or ("call", call index)

    async def _start(self, key: tuple[str, int], block: dict) -> None:
        await self.close()
        self.open = key
        await self.sse.send({"type": "content_block_start", "index": self.count, "content_block": block}, "content_block_start")

    async def _delta(self, delta: dict) -> None:
        await self.sse.send({"type": "content_block_delta", "index": self.count, "delta": delta}, "content_block_delta")

    async def close(self) -> None:
        if self.open is not None:
            await self.sse.send({"type": "content_block_stop", "index": self.count}, "content_block_stop")
            self.open = None
            self.count += 1

    async def text(self, text: str) -> None:
        if not text:
            return
        if self.open != ("text", -1):
            await self._start(("text", -1), {"type": "text", "text": ""})
        await self._delta({"type": "text_delta", "text": text})

    async def thinking(self, text: str) -> None:
        if not text:
            return
        if self.open != ("thinking", -1):
            await self._start(("thinking", -1), {"type": "thinking", "thinking": "", "signature": ""})
        await self._delta({"type": "thinking_delta", "thinking": text})

    async def calls(self, deltas: list[dict]) -> None:
        for d in deltas:
            if "id" in d:  # a call begins
                block = {"type": "tool_use", "id": d["id"], "name": d["function"]["name"], "input": {}}
                await self._start(("call", d["index"]), block)
            if d["function"].get("arguments"):
                await self._delta({"type": "input_json_delta", "partial_json": d["function"]["arguments"]})


async def _stream(request: web.Request, reply: Reply, message_id: str, asked: list[str]) -> web.StreamResponse:
    async def write(sse: EventStream, item: tuple[int, Piece]) -> None:
        _, piece = item
        start = {
            "id": message_id, "type": "message", "role": "assistant", "model": reply.model.info.id, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": _usage(piece.prompt_tokens, piece.cached_tokens, 0),
        }
        await sse.send({"type": "message_start", "message": start}, "message_start")
        await sse.send({"type": "ping"}, "ping")
        blocks = _Blocks(sse)
        parts = ChoiceParts(reply)

        async def add(reasoning: str, text: str, deltas: list[dict]) -> None:
            await blocks.thinking(reasoning)
            await blocks.text(text)
            await blocks.calls(deltas)

        async def failed(exc: ApiError) -> None:  # headers are gone: report in the stream, as Anthropic does
            await sse.send(anthropic_body(exc.status, exc.message), "error")
            await sse.close(done=False)

        piece = await follow_one(reply, parts, piece, add, failed)
        if piece is None:
            return
        await blocks.close()
        reply.finished({0: piece})
        stop_reason, stop_sequence = _stop(reply, piece.finish, parts.called, piece.stop, asked)
        await sse.send({
            "type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
            "usage": {"output_tokens": piece.completion_tokens},
        }, "message_delta")
        await sse.send({"type": "message_stop"}, "message_stop")
        await sse.close(done=False)

    return await stream_reply(request, reply, write)


async def count_tokens(request: web.Request) -> web.Response:
    """``{"input_tokens": n}``: the prompt a Messages request would send, tokenized."""
    body = await json_body(request)
    req = parse_chat(to_chat(body, counting=True))
    model = model_context(request, req.model)
    try:
        tokens, _ = await off_loop(lambda: prompt_tokens(model, req))
    except ValueError as exc:  # the chat template refused the conversation
        raise bad(str(exc), "messages") from None
    return json_response({"input_tokens": len(tokens)})
