"""OpenAI's Responses API (``POST /v1/responses``, ``GET /v1/responses/{id}``), as the
``openai`` SDK's ``client.responses`` and the OpenAI Agents SDK call it.

Like the Messages API (anthropic.py) a request is translated into the chat completions
request it amounts to, so templates, tools, grammars, limits and the prefix cache are the
chat path's:

- ``input``: a string (one user message) or items: messages (``role`` user, assistant,
  system or developer; content a string or ``input_text`` / ``output_text`` parts),
  ``function_call`` items (an assistant's tool calls; consecutive ones are one turn) and
  ``function_call_output`` items (tool results); ``reasoning`` items are dropped; images and
  files are refused (400). ``instructions`` becomes the system message.
- ``tools`` (function tools: ``name``, ``description``, ``parameters``), ``tool_choice``,
  ``parallel_tool_calls``, ``max_output_tokens``, ``temperature``, ``top_p`` and
  ``text.format`` (``json_schema``, ``json_object``) map onto their chat fields.
- ``store`` (default true) keeps the finished response and its conversation in this
  gateway's memory (``--response-store`` responses, least recently used dropped), so a
  request with ``previous_response_id`` continues it: the earlier turns are sent again as a
  prompt prefix, which the prefix cache serves. An unknown id is a 404. (The store is per
  gateway process: with several gateways, continue on the one that answered.)
- The reply is a ``response`` whose ``output`` holds a ``message`` item (``output_text``)
  and ``function_call`` items; streamed, the event sequence is OpenAI's (``response.created``,
  ``response.in_progress``, ``response.output_item.added``, ``response.content_part.added``,
  ``response.output_text.delta`` / ``.done``, ``response.function_call_arguments.delta`` /
  ``.done``, ``response.output_item.done``, ``response.completed`` or
  ``response.incomplete``), every event numbered by ``sequence_number``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from aiohttp import web

from .app_keys import RESPONSES
from .errors import ApiError, bad
from .generation import Piece
from .openai import parse_chat
from .prompts import join_text, json_body
from .response_store import ResponseStore
from .routes import ChoiceParts, Reply, call_finish, follow_one, start_reply, stream_reply, whole_reply
from .sse import EventStream
from .status import json_response

_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}


# -- the request ---------------------------------------------------------------------------


def conversation(body: dict, store: ResponseStore) -> list[dict]:
    """The chat messages of the whole conversation so far, without instructions."""
    previous = body.get("previous_response_id")
    history: list[dict] = []
    if previous is not None:
        if not isinstance(previous, str):
            raise bad("'previous_response_id' must be a string", "previous_response_id", "invalid_type")
        history = list(store.get(previous)[1])
    raw = body.get("input")
    if isinstance(raw, str):
        return history + [{"role": "user", "content": raw}]
    if not isinstance(raw, list) or not raw:
        raise bad("'input' must be a string or a non-empty array of items", "input", "invalid_type")
    for i, item in enumerate(raw):
        history += _item(item, f"input[{i}]", history)
    return history


def _item(item: Any, where: str, history: list[dict]) -> list[dict]:
    if not isinstance(item, dict):
        raise bad(f"'{where}' must be an object", where, "invalid_type")
    kind = item.get("type", "message")
    if kind == "message":
        role = _ROLES.get(item.get("role"))
        if role is None:
            raise bad(f"'{where}.role' must be user, assistant, system or developer", f"{where}.role")
        return [{"role": role, "content": _content(item.get("content"), f"{where}.content")}]
    if kind == "function_call":
        for key in ("call_id", "name", "arguments"):
            if not isinstance(item.get(key), str):
                raise bad(f"'{where}.{key}' must be a string", f"{where}.{key}", "invalid_type")
        call = {"id": item["call_id"], "type": "function", "function": {"name": item["name"], "arguments": item["arguments"]}}
        last = history[-1] if history else None
        if last is not None and last["role"] == "assistant" and last.get("tool_calls"):
            # One turn of several calls (a new dict: the last turn may be a stored response's).
            history[-1] = {**last, "tool_calls": last["tool_calls"] + [call]}
            return []
        return [{"role": "assistant", "content": None, "tool_calls": [call]}]
    if kind == "function_call_output":
        if not isinstance(item.get("call_id"), str):
            raise bad(f"'{where}.call_id' must be a string", f"{where}.call_id", "invalid_type")
        output = item.get("output")
        text = output if isinstance(output, str) else _content(output, f"{where}.output")
        return [{"role": "tool", "tool_call_id": item["call_id"], "content": text}]
    if kind == "reasoning":
        return []
    raise bad(f"'{where}.type' {kind!r} is not supported (message, function_call, function_call_output)", f"{where}.type")


_TEXT = ("input_text", "output_text", "text")
_NOT_TEXT = ("input_image", "input_file", "input_audio")


def _content(content: Any, where: str) -> str:
    return join_text(content, where, _TEXT, _NOT_TEXT)


def to_chat(body: dict, messages: list[dict]) -> dict:
    chat: dict[str, Any] = {"model": body.get("model"), "messages": list(messages)}
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise bad("'instructions' must be a string", "instructions", "invalid_type")
        chat["messages"].insert(0, {"role": "system", "content": instructions})
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    for key in ("temperature", "top_p", "parallel_tool_calls", "stream", "top_logprobs"):
        if body.get(key) is not None:
            chat[key] = body[key]
    if body.get("tools") is not None:
        chat["tools"] = _tools(body["tools"])
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function":
        chat["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    elif choice is not None:
        chat["tool_choice"] = choice
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and reasoning.get("effort") is not None:
        effort = reasoning["effort"]
        if effort not in ("none", "minimal", "low", "medium", "high", "xhigh"):
            raise bad("'reasoning.effort' must be none, minimal, low, medium, high or xhigh", "reasoning.effort")
        # On or off, for templates with the switch (Qwen 3's enable_thinking).
        chat["chat_template_kwargs"] = {"enable_thinking": effort not in ("none", "minimal")}
    fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        chat["response_format"] = {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}}
    elif isinstance(fmt, dict) and fmt.get("type") == "json_object":
        chat["response_format"] = {"type": "json_object"}
    elif fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise bad("'text.format.type' must be text, json_schema or json_object", "text.format")
    return chat


def _tools(tools: Any) -> list[dict]:
    if not isinstance(tools, list):
        raise bad("'tools' must be an array", "tools", "invalid_type")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("name"), str):
            raise bad(f"'tools[{i}]' must be a function tool with a name (built-in tools are not supported)", f"tools[{i}]")
        function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
        function.setdefault("parameters", {"type": "object", "properties": {}})
        out.append({"type": "function", "function": function})
    return out


# -- the reply -----------------------------------------------------------------------------


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class _Shape:
    """One response object, filled in as the reply comes."""

    def __init__(self, body: dict, reply: Reply, response_id: str):
        self.reply = reply
        self.message_id = _new_id("msg")
        self.reasoning_id = _new_id("rs")
        self.response = {
            "id": response_id, "object": "response", "created_at": int(time.time()), "status": "in_progress",
            "error": None, "incomplete_details": None, "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"), "model": reply.model.info.id, "output": [],
            "parallel_tool_calls": body.get("parallel_tool_calls", True) is not False,
            "previous_response_id": body.get("previous_response_id"), "reasoning": {"effort": None, "summary": None},
            "store": body.get("store", True) is not False, "temperature": reply.req.params.temperature,
            "text": body.get("text") or {"format": {"type": "text"}}, "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools") or [], "top_p": reply.req.params.top_p, "truncation": "disabled",
            "usage": None, "user": body.get("user"), "metadata": body.get("metadata") or {},
        }

    def message(self, text: str, status: str) -> dict:
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant", "content": [part]}

    def reasoning(self, text: str, status: str) -> dict:
        return {"type": "reasoning", "id": self.reasoning_id, "status": status, "summary": [],
                "content": [{"type": "reasoning_text", "text": text}]}

    @staticmethod
    def call(call: dict, item_id: str, status: str) -> dict:
        f = call["function"]
        return {"type": "function_call", "id": item_id, "call_id": call["id"], "name": f["name"], "arguments": f["arguments"], "status": status}

    def finish(self, piece: Piece, called: bool) -> None:
        use = self.reply.finished({0: piece})
        done = call_finish(piece.finish, called) != "length"
        self.response["status"] = "completed" if done else "incomplete"
        self.response["incomplete_details"] = None if done else {"reason": "max_output_tokens"}
        self.response["usage"] = {
            "input_tokens": use["prompt_tokens"], "input_tokens_details": {"cached_tokens": use["prompt_tokens_details"]["cached_tokens"]},
            "output_tokens": use["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": use["total_tokens"],
        }


def _remember(request: web.Request, shape: _Shape, messages: list[dict], text: str, calls: list[dict]) -> None:
    if not shape.response["store"]:
        return
    turn: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
    if calls:
        turn["tool_calls"] = calls
    request.app[RESPONSES].put(shape.response, messages + [turn])


async def create(request: web.Request) -> web.StreamResponse:
    body = await json_body(request)
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", None, "invalid_type")
    messages = conversation(body, request.app[RESPONSES])
    req = parse_chat(to_chat(body, messages))
    if req.n != 1:
        raise bad("'n' is not a Responses API field", "n")
    reply = await start_reply(request, req)
    shape = _Shape(body, reply, _new_id("resp"))
    try:
        if req.stream:
            return await _stream(request, reply, shape, messages)
        return await _collect(request, reply, shape, messages)
    finally:
        await reply.pieces.aclose()


async def _collect(request: web.Request, reply: Reply, shape: _Shape, messages: list[dict]) -> web.Response:
    piece, reasoning, text, calls = await whole_reply(reply)
    shape.finish(piece, bool(calls))
    status = "completed" if shape.response["status"] == "completed" else "incomplete"
    output = [shape.reasoning(reasoning, status)] if reasoning else []
    output += [shape.message(text, status)] if text or not calls else []
    shape.response["output"] = output + [shape.call(c, _new_id("fc"), "completed") for c in calls]
    _remember(request, shape, messages, text, calls)
    return json_response(shape.response)


class _Events:
    """Numbered Responses API events on an event stream."""

    def __init__(self, sse: EventStream):
        self.sse, self.n = sse, 0

    async def send(self, kind: str, **fields: Any) -> None:
        await self.sse.send({"type": kind, "sequence_number": self.n, **fields}, kind)
        self.n += 1


async def _stream(request: web.Request, reply: Reply, shape: _Shape, messages: list[dict]) -> web.StreamResponse:
    async def write(sse: EventStream, item: tuple[int, Piece]) -> None:
        _, piece = item
        ev = _Events(sse)
        await ev.send("response.created", response=dict(shape.response))
        await ev.send("response.in_progress", response=dict(shape.response))
        parts = ChoiceParts(reply)
        output: list[dict] = []
        calls: dict[int, dict] = {}  # call index -> its output item
        # The two items that grow by text deltas: where each sits in output, and its text.
        at: dict[str, int] = {}
        grown: dict[str, list[str]] = {"reasoning": [], "message": []}

        async def grow(kind: str, text: str) -> None:
            if not text:
                return
            item_id = shape.reasoning_id if kind == "reasoning" else shape.message_id
            if kind not in at:
                at[kind] = len(output)
                output.append(shape.reasoning("", "in_progress") if kind == "reasoning" else shape.message("", "in_progress"))
                await ev.send("response.output_item.added", output_index=at[kind], item=output[at[kind]])
                if kind == "message":
                    await ev.send("response.content_part.added", item_id=item_id, output_index=at[kind], content_index=0,
                                  part={"type": "output_text", "text": "", "annotations": []})
            grown[kind].append(text)
            extra = {} if kind == "reasoning" else {"logprobs": []}
            name = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
            await ev.send(name, item_id=item_id, output_index=at[kind], content_index=0, delta=text, **extra)

        async def add_calls(deltas: list[dict]) -> None:
            for d in deltas:
                if "id" in d:
                    item = shape.call({"id": d["id"], "function": {"name": d["function"]["name"], "arguments": ""}}, _new_id("fc"), "in_progress")
                    calls[d["index"]] = item
                    output.append(item)
                    await ev.send("response.output_item.added", output_index=len(output) - 1, item=dict(item))
                piece_args = d["function"].get("arguments")
                if piece_args:
                    item = calls[d["index"]]
                    item["arguments"] += piece_args
                    await ev.send("response.function_call_arguments.delta", item_id=item["id"], output_index=output.index(item), delta=piece_args)

        async def add(reasoning: str, text: str, deltas: list[dict]) -> None:
            await grow("reasoning", reasoning)
            await grow("message", text)
            await add_calls(deltas)

        async def failed(exc: ApiError) -> None:  # headers are gone: report in the stream
            await ev.send("error", code=exc.code, message=exc.message, param=exc.param)
            await sse.close(done=False)

        piece = await follow_one(reply, parts, piece, add, failed)
        if piece is None:
            return
        shape.finish(piece, bool(calls))
        status = "completed" if shape.response["status"] == "completed" else "incomplete"
        full = "".join(grown["message"])
        if "reasoning" in at:
            thought = "".join(grown["reasoning"])
            output[at["reasoning"]] = shape.reasoning(thought, status)
            await ev.send("response.reasoning_text.done", item_id=shape.reasoning_id, output_index=at["reasoning"], content_index=0, text=thought)
            await ev.send("response.output_item.done", output_index=at["reasoning"], item=output[at["reasoning"]])
        if "message" in at:
            done = shape.message(full, status)
            output[at["message"]] = done
            await ev.send("response.output_text.done", item_id=shape.message_id, output_index=at["message"], content_index=0, text=full, logprobs=[])
            await ev.send("response.content_part.done", item_id=shape.message_id, output_index=at["message"], content_index=0, part=done["content"][0])
            await ev.send("response.output_item.done", output_index=at["message"], item=done)
        for item in calls.values():
            item["status"] = "completed"
            at = output.index(item)
            await ev.send("response.function_call_arguments.done", item_id=item["id"], output_index=at, arguments=item["arguments"])
            await ev.send("response.output_item.done", output_index=at, item=item)
        shape.response["output"] = output
        call_list = [{"id": c["call_id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls.values()]
        _remember(request, shape, messages, full, call_list)
        await ev.send("response.completed" if status == "completed" else "response.incomplete", response=shape.response)
        await sse.close(done=False)

    return await stream_reply(request, reply, write)


async def retrieve(request: web.Request) -> web.Response:
    """``GET /v1/responses/{id}``: a stored response."""
    return json_response(request.app[RESPONSES].get(request.match_info["response_id"])[0])
