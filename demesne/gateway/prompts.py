"""From a request body to the prompt's tokens: reading the JSON, rendering chat messages
with the model's template, tokenizing - the part the completion routes and the token
utilities share. Rendering and tokenizing a long prompt takes seconds (7 s for 7.8 MB), so
it runs off the event loop (``off_loop``) and other streams go on meanwhile (llama.cpp's
tokenizer releases the GIL)."""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any

import orjson
from aiohttp import web

from .chat_template import ClientText
from .errors import bad
from .generation import ModelContext
from .openai import CompletionRequest
from .reasoning import opens_thinking
from .tools import template_messages

_PROMPT_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="demesne-prompt")


async def json_body(request: web.Request):
    raw = await request.read()  # raises 413 past client_max_size
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad(f"the request body is not valid JSON: {exc}", None, "invalid_json") from None


async def off_loop(work):
    return await asyncio.get_running_loop().run_in_executor(_PROMPT_POOL, work)


def calling(req: CompletionRequest) -> bool:
    """Whether this request may call tools (``tool_choice: none`` renders no tools either)."""
    return req.tools is not None and req.tools.choice != "none"


def render_chat(model: ModelContext, req: CompletionRequest) -> tuple[ClientText, str]:
    """The text a chat request's messages (and tools) render to, and the ClientText that
    knows which parts of it the client wrote. A template that refuses raises ValueError."""
    template = model.template
    # What the client wrote is text, even where it spells a control token (ClientText).
    client = ClientText(model.tokenizer.control_pattern)
    tools = client.shield(req.tools.tools) if calling(req) else None
    messages = template_messages(client.shield(req.messages), tools, model.tool_format, template.supports_tools)
    text = template.render(messages, tools=tools if template.supports_tools else None, extra=req.template_kwargs)
    req.thinking_open = opens_thinking(text)
    return client, text


def prompt_tokens(model: ModelContext, req: CompletionRequest) -> tuple[list[int], str]:
    """Token ids of the prompt, and the name of the field they came from."""
    if req.chat:
        client, text = render_chat(model, req)
        bos = not text.startswith(model.template.bos_token)
        return model.tokenizer.encode_segments(client.segments(text), add_special=bos), "messages"
    if isinstance(req.prompt, str):
        return model.tokenizer.encode(req.prompt), "prompt"
    if any(t < 0 or t >= model.info.n_vocab for t in req.prompt):
        raise bad("'prompt' holds token ids outside the vocabulary", "prompt")
    return list(req.prompt), "prompt"


def join_text(value: Any, where: str, kinds: tuple[str, ...] = ("text",), unsupported: tuple[str, ...] = ()) -> str:
    """A string, or text parts (``{"type": one of kinds, "text": ...}``) joined, as the
    Messages and Responses APIs send content; a part of an ``unsupported`` type (an image, a
    file) is refused as such: the served models read text."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise bad(f"'{where}' must be a string or an array of text parts", where, "invalid_type")
    parts = []
    for j, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in kinds and isinstance(part.get("text"), str):
            parts.append(part["text"])
        elif kind in unsupported:
            raise bad(f"'{where}[{j}]': {kind} is not supported; the served models read text", f"{where}[{j}]", "unsupported_content")
        else:
            raise bad(f"'{where}[{j}]' must be a text part ({{\"type\": \"{kinds[0]}\", \"text\": ...}})", f"{where}[{j}]")
    return "".join(parts)
