"""llama-server's token utilities, with its paths and shapes: ``POST /tokenize``,
``POST /detokenize``, ``POST /apply-template`` (the prompt a chat request renders to) and
``GET /props`` (what a client needs to know about a served model).

Each takes an optional ``model`` (body field, or ``?model=`` for ``/props``); a gateway that
serves one model needs none. Bad input is a 400 in OpenAI's error shape, as on ``/v1``.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .app_keys import CLIENT, FINGERPRINT, MODELS
from .errors import bad
from .generation import ModelContext
from .openai import parse_chat
from .prompts import json_body, off_loop, render_chat
from .status import json_response, model_context

MAX_DETOKENIZE = 1 << 20  # token ids in one /detokenize call


def pick_model(request: web.Request, model_id: Any) -> ModelContext:
    """The model a utility call names, or the only one served."""
    if model_id is None:
        served = sorted(request.app[CLIENT].models())
        if len(served) == 1:
            return request.app[MODELS][served[0]]
        if served:
            raise bad(f"'model' is required: this gateway serves {', '.join(served)}", "model")
        return model_context(request, "")  # 503 (no engine up) or 404
    if not isinstance(model_id, str):
        raise bad("'model' must be a string", "model", "invalid_type")
    return model_context(request, model_id)


def _flag(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise bad(f"'{name}' must be true or false", name, "invalid_type")
    return value


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", None, "invalid_type")
    return body


async def tokenize(request: web.Request) -> web.Response:
    """``{"content": str, "add_special": false, "parse_special": true, "with_pieces": false}``
    -> ``{"tokens": [ids]}``, or ``[{"id", "piece"}]`` with pieces (a piece that is not
    whole UTF-8 is its list of bytes, as llama-server gives it)."""
    body = _object(await json_body(request))
    content = body.get("content")
    if not isinstance(content, str):
        raise bad("'content' must be a string", "content", "invalid_type" if content is not None else "missing_required_parameter")
    add_special = _flag(body, "add_special", False)
    parse_special = _flag(body, "parse_special", True)
    with_pieces = _flag(body, "with_pieces", False)
    tokenizer = pick_model(request, body.get("model")).tokenizer
    tokens = await off_loop(lambda: tokenizer.encode(content, add_special, parse_special))
    if not with_pieces:
        return json_response({"tokens": tokens})
    out = []
    for token in tokens:
        raw = tokenizer.piece(token, special=True)
        try:
            piece: str | list[int] = raw.decode("utf-8")
        except UnicodeDecodeError:
            piece = list(raw)
        out.append({"id": token, "piece": piece})
    return json_response({"tokens": out})


async def detokenize(request: web.Request) -> web.Response:
    """``{"tokens": [ids]}`` -> ``{"content": str}``; control tokens are spelled out."""
    body = _object(await json_body(request))
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or len(tokens) > MAX_DETOKENIZE:
        raise bad(f"'tokens' must be an array of at most {MAX_DETOKENIZE} token ids", "tokens", "invalid_type")
    model = pick_model(request, body.get("model"))
    n_vocab = model.info.n_vocab
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < n_vocab for t in tokens):
        raise bad(f"'tokens' must hold token ids in [0, {n_vocab})", "tokens")
    return json_response({"content": model.tokenizer.decode(tokens, special=True)})


async def apply_template(request: web.Request) -> web.Response:
    """A chat completions body -> ``{"prompt": str}``, the text its messages (and tools)
    render to with the model's chat template, generation prompt included."""
    body = _object(await json_body(request))
    model = pick_model(request, body.get("model"))
    req = parse_chat({**body, "model": model.info.id})
    try:
        text = await off_loop(lambda: render_chat(model, req)[1])
    except ValueError as exc:  # the chat template refused the conversation
        raise bad(str(exc), "messages") from None
    return json_response({"prompt": text})


async def props(request: web.Request) -> web.Response:
    """Facts about a served model: context size per request, vocabulary, chat template and
    where it came from, special tokens, and the fingerprint responses carry."""
    model = pick_model(request, request.query.get("model"))
    info, template = model.info, model.template
    return json_response({
        "model": info.id,
        "model_path": info.path,
        "n_ctx": info.n_ctx,
        "n_vocab": info.n_vocab,
        "default_generation_settings": {"n_ctx": info.n_ctx},
        "chat_template": template.source,
        "chat_template_origin": template.origin,
        "chat_template_tools": template.supports_tools,
        "tool_call_format": model.tool_format.name,
        "bos_token": template.bos_token,
        "eos_token": template.eos_token,
        "model_fingerprint": info.fingerprint or None,
        "system_fingerprint": request.app[FINGERPRINT],
        "build_info": request.app[FINGERPRINT],
    })
